"""Faithfulness of a word's map to the model: the model's score of the word on perturbed images.

:func:`word_scorer` turns (model, prompt, answer, word positions) into a batched function ``images -> scores``:
the log-probability of the word's tokens at their answer positions, with those positions masked and the rest of
the answer given (one probe state for every method, so methods are compared on the same function). It plugs into
:func:`dcam_jax.metrics.deletion_insertion_curves`, which removes (deletion) or reveals (insertion) image patches
in the order of a map; :func:`word_faithfulness` does both for one map.

A faithful map puts first the patches the model actually uses: deleting them makes the score fall fast (low
deletion AUC) and revealing them alone restores it fast (high insertion AUC).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dcam_jax import metrics
from dcam_jax.models import llada, mllm

BASELINES = ("mean", "black")


def word_scorer(model, prompt_ids: np.ndarray, answer: np.ndarray, positions: Sequence[int], *,
                image_shape: tuple[int, int]) -> Callable[[np.ndarray], np.ndarray]:
    """A batched score function for one answer word.

    Args:
      model: a loaded :class:`dcam_jax.api.Model`.
      prompt_ids: [T] host ids of the chat prompt with its one -200 image placeholder (``Prepared.prompt_ids``).
      answer: [G] int answer token ids (the generated answer, EOS padding included).
      positions: answer positions of the word (its sub-tokens); they are replaced by the mask id.
      image_shape: (H, W) of the images that will be scored (all of the same size, as perturbed copies are).

    Returns:
      ``score(images [N, H, W, 3] uint8) -> [N] float64``: sum over the word's positions of log p(answer token).
    """
    cfg = model.config
    answer = np.asarray(answer, np.int32)
    pos = np.asarray(sorted(positions), np.int32)
    if answer.ndim != 1 or pos.size == 0 or pos.min() < 0 or pos.max() >= answer.shape[0]:
        raise ValueError(f"positions {list(positions)} must be non-empty answer positions in [0, {answer.shape[0]})")
    probe = answer.copy()
    probe[pos] = cfg.lm.mask_id
    weights = np.zeros(answer.shape, np.float32)
    weights[pos] = 1.0
    geometry = model.image_processor(np.zeros(tuple(image_shape) + (3,), np.uint8)).geometry
    ids = tuple(int(i) for i in np.asarray(prompt_ids))
    args = tuple(jnp.asarray(a) for a in (probe, answer, weights))

    def score(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:3] != tuple(image_shape):
            raise ValueError(f"expected images [N, {image_shape[0]}, {image_shape[1]}, 3], got {images.shape}")
        pix = np.stack([model.image_processor(np.asarray(im, np.uint8)).pixel_values for im in images])
        return np.asarray(_batch_scores(model.params, cfg, geometry, ids, jnp.asarray(pix), *args), np.float64)

    return score


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _batch_scores(params, cfg, geometry, ids: tuple[int, ...], pixel_values, probe, answer, weights):
    """[N] sum over answer positions g of weights[g] * log p(answer[g]) at g, for each image of pixel_values
    [N, n, S, S, 3], with ``probe`` [G] as the answer input. Compiled once per (config, geometry, prompt, N)."""
    ids_np = np.asarray(ids, np.int64)

    def one(pv):
        block = mllm.image_tokens(params, cfg, pv, geometry)
        emb, _ = mllm.splice_embeddings(params, cfg, ids_np, block)
        P = emb.shape[0]
        ans = llada.embed_tokens(params["lm"], cfg.lm, probe[None])[0]
        x = jnp.concatenate([emb, ans.astype(emb.dtype)], 0)[None]
        logits = llada.lm_logits(params, cfg, inputs_embeds=x, attention=cfg.attention,
                                 prefix_len=P if cfg.attention == "prefix_lm" else None)[0, P:]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return jnp.sum(weights * jnp.take_along_axis(logp, answer[:, None], -1)[:, 0])

    return jax.vmap(one)(pixel_values)


def baseline_image(image: np.ndarray, kind: str) -> np.ndarray:
    """The fill of removed patches: "mean" (the image's mean colour everywhere) or "black". image: [H, W, 3]."""
    img = np.asarray(image)
    if kind == "mean":
        return np.broadcast_to(np.round(img.reshape(-1, img.shape[-1]).mean(0)).astype(img.dtype), img.shape)
    if kind == "black":
        return np.zeros_like(img)
    raise ValueError(f"unknown faithfulness baseline {kind!r}; expected one of {BASELINES}")


def word_faithfulness(model, image: np.ndarray, prompt_ids: np.ndarray, answer: np.ndarray,
                      positions: Sequence[int], maps: np.ndarray, *, num_steps: int = 16, patch: int | None = None,
                      baseline: str = "mean", batch_size: int | None = None) -> list[metrics.FaithfulnessCurves]:
    """Deletion and insertion curves of several maps of one word (e.g. one per method).

    image: [H, W, 3] uint8 (the image as given to the model, before preprocessing); maps: [K, h, w] non-negative;
    patch: cell side in image pixels (default: the image side covered by one token of the model's first view,
    rounded, at least 1); batch_size: images per forward call (default: all 2 (num_steps + 1) of a map at once).
    Returns K :class:`~dcam_jax.metrics.FaithfulnessCurves` (scores in log-probability).
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image must be [H, W, 3] uint8, got {img.shape} {img.dtype}")
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must be [K, h, w], got shape {maps.shape}")
    if patch is None:
        v = model.config.vision
        patch = max(1, int(round(max(img.shape[:2]) * v.patch_size / v.image_size)))
    score = word_scorer(model, prompt_ids, answer, positions, image_shape=img.shape[:2])
    base = baseline_image(img, baseline)
    batch_size = batch_size or 2 * (num_steps + 1)
    return [metrics.deletion_insertion_curves(score, img, m, num_steps=num_steps, patch=patch, baseline=base,
                                              batch_size=batch_size) for m in maps]
