"""Explanations of answer tokens at the array level: raw maps of a resolved CamConfig's probe states (gradient
methods) or TAM's logit maps, and the result objects :class:`Explanation` and :class:`TrajectoryExplanation`.

The user-facing ``dcam_jax.explain(model, image, prompt)`` prepares the arrays (prompt embeddings with the image
spliced in, the ImageLayout, the answer and its trajectory), resolves the CamConfig once and calls these.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dcam_jax.cam import attribution as attr
from dcam_jax.cam import probes
from dcam_jax.cam.config import CamConfig, require_resolved
from dcam_jax.models import llada
from dcam_jax.models.config import MLLMConfig
from dcam_jax.models.mllm import ImageLayout

# ----------------------------------------------------------------------------------------------------------
# the result


def maps_to_image(maps: np.ndarray, layout: ImageLayout, view: str, image_size: tuple[int, int],
                  size: tuple[int, int] | None = None) -> np.ndarray:
    """View-space maps [..., h, w] in [0, 1] aligned with the input image (the pad layout's padding cut off) and
    resized bilinearly to ``size`` = (height, width) (default: the image's). -> [..., *size] float32 in [0, 1]."""
    if size is None:
        size = (image_size[1], image_size[0])
    maps = jnp.asarray(maps, jnp.float32)
    lead = maps.shape[:-2]
    maps = maps.reshape((-1,) + maps.shape[-2:])
    box = layout.geometry.pad_box if view == "base" else None
    if box is not None:
        # the base view of the "pad" layout is a square with the image centred: cut the image's part out, at the
        # scale of the requested size (not of the image, whose full size may be thousands of pixels)
        side = max(image_size)
        top, left, h, w = box
        f = min(1.0, max(int(size[0]) / h, int(size[1]) / w))
        side_f = max(1, round(side * f))
        t, l_, hh, ww = (round(v * f) for v in (top, left, h, w))
        hh, ww = max(1, min(hh, side_f - t)), max(1, min(ww, side_f - l_))
        full = jax.image.resize(maps, (maps.shape[0], side_f, side_f), "bilinear", antialias=False)
        maps = full[:, t:t + hh, l_:l_ + ww]
    out = jax.image.resize(maps, (maps.shape[0], int(size[0]), int(size[1])), "bilinear", antialias=False)
    return np.clip(np.asarray(out), 0.0, 1.0).reshape(lead + (int(size[0]), int(size[1])))


@dataclasses.dataclass(frozen=True)
class Explanation:
    """Per-token explanation maps of one answer.

    Attributes:
      maps: [T, H, W] float32 in [0, 1], the refined maps (one per explained token or word).
      raw_maps: [T, H, W] float32, the raw maps before refinement (min-max normalised).
      tokens: T strings, the explained tokens (or words), aligned with ``maps``.
      positions: T tuples of answer positions (several for a word made of sub-tokens).
      scores: [T] the target scores at the probe states (mean over states and sub-tokens).
      text: the answer text; answer_ids: [G] the answer token ids.
      layout: the ImageLayout; view: the explained view; image_size: (width, height) of the input image.
      config: the resolved CamConfig.
    """

    maps: np.ndarray
    raw_maps: np.ndarray
    tokens: list[str]
    positions: list[tuple[int, ...]]
    scores: np.ndarray
    text: str
    answer_ids: np.ndarray
    layout: ImageLayout
    view: str
    image_size: tuple[int, int]
    config: CamConfig

    def image_maps(self, size: tuple[int, int] | None = None, raw: bool = False) -> np.ndarray:
        """Maps aligned with the input image and resized bilinearly to ``size`` = (height, width) (default: the
        input image's); the pad layout's padding is cut off first. ``raw=True`` gives the raw maps. -> [T, *size]."""
        return maps_to_image(self.raw_maps if raw else self.maps, self.layout, self.view, self.image_size, size)

    def to_html(self, path, image, **kwargs):
        """Write the interactive viewer page of this explanation (see :func:`dcam_jax.viewer.write_html`, whose
        keyword arguments ``trajectory``, ``generation``, ``run`` and ``title`` it passes on). image: [H, W, 3]
        uint8. Returns the path."""
        from dcam_jax import viewer

        return viewer.write_html(path, image, {self.config.method: self}, **kwargs)

    def to_dict(self) -> dict:
        """JSON-ready summary (no arrays): answer, tokens, positions, per-map statistics, layout, config."""
        stats = []
        for tok, pos, m, s in zip(self.tokens, self.positions, self.maps, self.scores):
            peak = np.unravel_index(int(np.argmax(m)), m.shape)
            stats.append({"token": tok, "positions": list(pos), "score": float(s), "mean": float(m.mean()),
                          "max": float(m.max()), "peak_row": int(peak[0]), "peak_col": int(peak[1])})
        cfg = dataclasses.asdict(self.config)
        if not isinstance(cfg.get("refine"), (str, type(None))):
            cfg["refine"] = dataclasses.asdict(self.config.refine) if dataclasses.is_dataclass(self.config.refine) \
                else str(self.config.refine)
        return {"answer": self.text, "answer_ids": [int(i) for i in self.answer_ids], "view": self.view,
                "map_shape": list(self.maps.shape[1:]), "image_size": list(self.image_size),
                "layout": self.layout.to_dict(), "tokens": stats, "config": cfg}


@dataclasses.dataclass(frozen=True)
class TrajectoryExplanation:
    """How each explained token's evidence forms over the denoising steps up to the step that decided it.

    Attributes:
      maps: [T, K, H, W] float32 in [0, 1], the raw map at each of K states (each min-max normalised).
      steps: [T, K] int, the denoising step of each state (0: everything masked; the last: the decision state).
      commit_steps: [T] int, the step that committed each token.
      state_texts: T lists of K strings, the answer as it stood at each state (``[MASK]`` for masked tokens).
      tokens, positions: the explained tokens (or words) and their answer positions, as in :class:`Explanation`.
      text: the final answer; num_steps: denoising steps of the generation.
      layout, view, image_size, config: as in :class:`Explanation`.
    """

    maps: np.ndarray
    steps: np.ndarray
    commit_steps: np.ndarray
    state_texts: list[list[str]]
    tokens: list[str]
    positions: list[tuple[int, ...]]
    text: str
    num_steps: int
    layout: ImageLayout
    view: str
    image_size: tuple[int, int]
    config: CamConfig

    def image_maps(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """The state maps aligned with the input image, resized to ``size`` = (height, width). -> [T, K, *size]."""
        return maps_to_image(self.maps, self.layout, self.view, self.image_size, size)


# ----------------------------------------------------------------------------------------------------------
# array-level explanation


def _contrast_for(cam: CamConfig, targets: np.ndarray, answer: np.ndarray):
    """(spec contrast mode, contrast positions [T], contrast tokens [T])."""
    T = len(targets)
    if cam.contrast in ("none", "runner_up"):
        return cam.contrast, np.zeros(T, np.int32), np.zeros(T, np.int32)
    if cam.contrast == "previous":
        # the authors contrast each token with a neighbouring answer token; we use the previous one (the next one
        # for the first token)
        cpos = np.where(targets > 0, targets - 1, np.minimum(targets + 1, len(answer) - 1)).astype(np.int32)
    else:
        q = int(cam.contrast)
        if not 0 <= q < len(answer):
            raise ValueError(f"contrast position {q} is outside the answer (0..{len(answer) - 1})")
        cpos = np.full(T, q, np.int32)
    return "position", cpos, answer[cpos].astype(np.int32)


def _probe_states(cam: CamConfig, answer: np.ndarray, targets: np.ndarray, commit_step, key, mask_id: int):
    """The answer states the gradients are taken at, and which targets each one serves: (states [S, G], K,
    groups). ``groups[s]`` lists the indices into ``targets`` explained at state s; every target is explained at
    K states (K > 1 only for "trajectory" and "noise", whose rows t * K + k are the k-th state of target t).

    One state serves several targets where their states are equal: every target for "clean" and "final", and
    the targets committed at the same denoising step for "decision" (their decision states are one state).
    """
    T = len(targets)
    if cam.probe == "clean":
        return answer[None], 1, [list(range(T))]
    if cam.probe == "final":
        if commit_step is None:
            raise ValueError("probe='final' needs the generation trajectory (commit_step); generate the answer "
                             "with dcam_jax.generate or use probe='clean'")
        last = int(np.max(commit_step))
        return np.where(np.asarray(commit_step) < last, answer, mask_id)[None], 1, [list(range(T))]
    if cam.probe in ("decision", "trajectory") and commit_step is None:
        raise ValueError(f"probe={cam.probe!r} needs the generation trajectory (commit_step): let explain() "
                         "generate the answer (or pass generation=...), or use probe='noise' or 'clean' for a "
                         "given answer")
    if cam.probe == "decision":
        steps = np.asarray(commit_step)[targets]
        unique = np.unique(steps)  # one decision state per step at which some target was committed
        groups = [[int(t) for t in np.flatnonzero(steps == u)] for u in unique]
        first = [g[0] for g in groups]
        return probes.decision_states(answer, commit_step, targets[first], mask_id), 1, groups
    if cam.probe == "trajectory":
        states = probes.trajectory_states(answer, commit_step, targets, cam.num_trajectory_states, mask_id)
    else:  # noise: K partially re-masked states per target
        if key is None:
            raise ValueError("probe='noise' needs a PRNG key (key=jax.random.key(0))")
        ratios = cam.noise_ratios or probes.default_noise_ratios(cam.num_noise_samples)
        states = probes.noise_states(answer, targets, ratios, key, mask_id)
    _, K, G = states.shape
    return states.reshape(T * K, G), K, [[t] for t in range(T) for _ in range(K)]


def _pad_rows(x, axis: int, n: int) -> jax.Array:
    """``x`` extended to length ``n`` along ``axis`` by repeating its last entry."""
    x = np.asarray(x)
    if x.shape[axis] == n:
        return jnp.asarray(x)
    return jnp.asarray(np.take(x, np.minimum(np.arange(n), x.shape[axis] - 1), axis=axis))


def _padded_length(n: int, multiple: int) -> int:
    """Lengths padded so that few shapes compile: 1, 2, 4, then multiples of ``multiple`` (a power of two)."""
    if n <= multiple:
        return 1 << (n - 1).bit_length()
    return -(-n // multiple) * multiple


def prompt_bucket(P: int) -> int:
    """The prompt length the attribution program is compiled for: ``P`` rounded up to a multiple of
    max(8, 2^(bit_length(P - 1) - 5)). Above 128 rows that is sixteen lengths per octave and at most 6.25% more
    rows (860 -> 864, 1048 -> 1088); below, a multiple of 8. Prompts within one bucket share one compiled
    program."""
    step = max(8, 1 << max((P - 1).bit_length() - 5, 0))
    return -(-P // step) * step


def grad_spec(cam: CamConfig, contrast: str = "none") -> attr.GradSpec:
    """The array-level GradSpec of a resolved CamConfig (``contrast``: the spec's mode, see ``_contrast_for``)."""
    require_resolved(cam, "grad_spec")
    return attr.GradSpec(layer=cam.layer, hook=cam.hook, attention=cam.attention, score=cam.score, contrast=contrast,
                         aggregation=cam.aggregation, grad_relu=cam.grad_relu, grad_rule=cam.grad_rule)


def raw_token_maps(params, config: MLLMConfig, cam: CamConfig, prompt_embeds: jax.Array, layout: ImageLayout,
                   answer: np.ndarray, targets: Sequence[int], *, commit_step: np.ndarray | None = None,
                   answer_valid: np.ndarray | None = None, key: jax.Array | None = None, per_state: bool = False,
                   share_prefix: bool = True, bucket_prompt: bool = True):
    """Raw (unnormalised) maps of answer positions ``targets`` for a gradient method.

    cam: a resolved CamConfig (``dcam_jax.cam.config.resolve``); prompt_embeds: [P, D]; answer: [G] final answer
    ids; commit_step: [G] (probes "decision", "trajectory" and "final"); key: PRNG key (probe "noise").
    Returns (maps [T, H, W] float32 averaged over probe states, scores [T]); with ``per_state=True`` the maps of
    every probe state instead, (maps [T, K, H, W], scores [T, K]) with K = 1 for the single-state probes.

    Each distinct probe state runs one forward; the targets it serves share it and each costs one reverse pass
    (see :func:`_probe_states`). Under prefix-LM attention the prompt's forward runs once for all states
    (``share_prefix=False`` turns that off: the same maps, every state's whole sequence run; for benchmarks).
    The prompt is right-padded to :func:`prompt_bucket` rows, masked out as keys, so that prompts of nearby
    lengths reuse one compiled program (``bucket_prompt=False`` compiles for the exact length; the maps agree to
    float rounding).
    """
    require_resolved(cam, "raw_token_maps")
    answer = np.asarray(answer, np.int32)
    G = answer.shape[0]
    targets = np.asarray(targets, np.int32)
    valid = np.ones(G, bool) if answer_valid is None else np.asarray(answer_valid, bool)
    P = int(prompt_embeds.shape[0])
    img = layout.positions(cam.view)
    attr.check_probe_valid(img, P + G, P)
    mode, cpos, ctok = _contrast_for(cam, targets, answer)
    states, K, groups = _probe_states(cam, answer, targets, commit_step, key, config.lm.mask_id)
    # [S, Tg] target fields per state; a short row repeats its last target
    Tg = max(len(g) for g in groups)
    cols = np.array([g + [g[-1]] * (Tg - len(g)) for g in groups], np.int64)
    per = [v[cols] for v in (targets, answer[targets], cpos, ctok)]
    # Pad states and targets per state (repeating the last entry) so that answers with different numbers of
    # targets reuse a few compiled functions; a padded state costs a forward, a padded target a reverse pass.
    S = states.shape[0]
    S2 = S if S == 1 else -(-S // cam.batch_size) * cam.batch_size
    T2 = _padded_length(Tg, 8)
    spec = grad_spec(cam, mode)
    emb, valid_len = prompt_embeds, None
    if bucket_prompt:
        emb = jnp.pad(jnp.asarray(prompt_embeds), ((0, prompt_bucket(P) - P), (0, 0)))
        valid_len = np.int32(P)
    maps, scores = attr.batched_state_maps(
        params, config, spec, cam.batch_size, emb, jnp.asarray(img), _pad_rows(states, 0, S2),
        jnp.asarray(answer), jnp.asarray(valid), *(_pad_rows(_pad_rows(v, 0, S2), 1, T2) for v in per),
        share_prefix=share_prefix, valid_len=valid_len)
    # back to targets: the k-th state of target t is the k-th group that lists t
    where = [[] for _ in range(len(targets))]
    for s, g in enumerate(groups):
        for j, t in enumerate(g):
            where[t].append((s, j))
    rows = np.array([[s for s, _ in w] for w in where], np.int64)  # [T, K]
    slots = np.array([[j for _, j in w] for w in where], np.int64)
    maps, scores = maps[rows, slots], scores[rows, slots]  # [T, K, H, W], [T, K]
    return (maps, scores) if per_state else (maps.mean(1), scores.mean(1))


def tam_raw_maps(params, config: MLLMConfig, prompt_embeds: jax.Array, layout: ImageLayout, answer: np.ndarray,
                 targets: Sequence[int], view: str | None = None, attention: str = "full"):
    """TAM's gradient-free maps: ReLU of the class logit computed at every image position from the final-norm
    hidden state (clean state). Also returns the text scores for estimated causal inference:
    ``text[t, i]`` = ReLU(logit of class y_t at answer position i). -> (maps [T, H, W], text [T, G])."""
    img = layout.positions(view)
    answer = np.asarray(answer, np.int32)
    classes = answer[np.asarray(targets, np.int32)]
    return _tam_jit(params, config, prompt_embeds, jnp.asarray(img), jnp.asarray(answer), jnp.asarray(classes),
                    attention)


def _tam(params, config, prompt_embeds, img, answer, classes, attention):
    lm, cfg = params["lm"], config.lm
    P = prompt_embeds.shape[0]
    emb = jnp.concatenate([prompt_embeds[None].astype(jnp.dtype(cfg.dtype)),
                           llada.embed_tokens(lm, cfg, answer[None])], axis=1)
    h = llada.lm_hidden(lm, cfg, inputs_embeds=emb, attention=attention,
                        prefix_len=P if attention == "prefix_lm" else None)
    x = llada.rms_norm(h[0], lm["final_norm"], cfg.rms_eps).astype(jnp.float32)  # [T_all, D]
    head = lm["lm_head"][:, classes].astype(jnp.float32)  # [D, T]
    maps = jax.nn.relu(jnp.einsum("hwd,dt->thw", x[img], head))
    text = jax.nn.relu(x[P:] @ head).T  # [T, G]
    return maps, text


_tam_jit = jax.jit(_tam, static_argnums=(1, 6))
