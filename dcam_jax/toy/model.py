"""The toy dMLLM: its config preset and a batched forward for training on ShapesWorld.

``toy_config()`` is the real architecture at toy scale: a SigLIP-style tower on 64 px views with 8 px patches
(8 x 8 tokens), the ``mlp2x_gelu`` projector, the single-view ("pad") layout of the shared layout code (a 64 px
ShapesWorld image is one view of 64 image tokens) and a LLaDA LM with bidirectional attention.

Why one view and not LaViDa's base view + high-res grid: at 64 px a 2 x 2 grid of 32 px crops cuts most objects
between crops, and the 32 px base view shrinks them to 1-2 patches, while one 64 px view sees every object whole
(the model card, ``docs/toy_model.md``, has the model's numbers). The any-resolution path is exercised by the
layout, parity and CAM tests on random models, and the batched forward below is tested on both layouts.

Training uses its own batched forward (:func:`answer_logits`) rather than the one-example inference path: every
ShapesWorld image is 64 x 64, so all examples share one :class:`~dcam_jax.processing.image.ImageGeometry` and one
prompt, and the whole batch runs as [B*n] views through the tower and [B, T] through the LM. It is built from the
same model functions (``siglip.vision_features``, ``projector.project``, ``mllm.assemble_image_tokens``,
``llada.run_blocks``), so a model trained with it runs unchanged in ``dcam_jax.generate`` and the CAM code
(``tests/toy/test_toy.py`` checks the logits agree with ``mllm.mllm_logits``) for any layout of the config.

Tower pretraining reads object-level targets off the same image-token block (``dcam_jax.toy.tower_heads``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dcam_jax.data import shapes
from dcam_jax.models import llada, mllm, projector, siglip
from dcam_jax.models.config import IMAGE_TOKEN_INDEX, LMConfig, MLLMConfig, VisionConfig
from dcam_jax.processing import image as pimg
from dcam_jax.processing import text as ptext
from dcam_jax.toy import tokenizer as toy_tok

Params = dict[str, Any]

TOY_PROMPT = "describe the image"
TOY_IMAGE_SIZE = 64
TOY_GEN_LENGTH = 32
MAX_OBJECTS = 4  # objects per ShapesWorld image the order head distinguishes

# Word classes of answer tokens, for per-class learning curves. Index = class id.
TOKEN_CLASSES: tuple[str, ...] = ("colour", "shape", "size", "relation", "function", "eot", "pad")
# Relation classes of the tower's object-level relation head.
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of", "none")


def toy_config(**overrides) -> MLLMConfig:
    """The embedded toy dMLLM (about 1.6 M parameters).

    Vision: 64 px views, 8 px patches (8 x 8 tokens), width 128, 4 layers, 4 heads. LM: width 128, 4 layers,
    4 heads of 32, SwiGLU 384, the toy tokenizer's 49 tokens, bidirectional ("full") attention. Layout: "pad"
    (one view; a non-square image is padded to a square with the mean colour first) and no pooling: a 64 px image
    gives 64 image tokens; with the 13 prompt tokens and a 32-token answer the LM runs on 109 tokens. ``overrides``
    replace top-level MLLMConfig fields (use dataclasses.replace on ``lm`` / ``vision`` for nested ones).
    """
    special = toy_tok.special_token_ids()
    lm = LMConfig(vocab_size=len(toy_tok.vocabulary()), d_model=128, n_layers=4, n_heads=4, n_kv_heads=4,
                  head_dim=32, mlp_hidden=384, rope_theta=10000.0, max_seq_len=512, dtype="float32", **special)
    vision = VisionConfig(image_size=64, patch_size=8, width=128, depth=4, num_heads=4, mlp_dim=384)
    base = dict(lm=lm, vision=vision, name="toy", image_aspect_ratio="pad", grid_pinpoints=(), pool_size=None,
                default_prompt=TOY_PROMPT, system_prompt=None, chat_template="llada", attention="full",
                sampling_defaults=(("gen_length", TOY_GEN_LENGTH), ("block_length", TOY_GEN_LENGTH),
                                   ("steps", TOY_GEN_LENGTH)))
    base.update(overrides)
    return MLLMConfig(**base)


# ----------------------------------------------------------------------------------------------------------
# host-side batch preparation


@dataclasses.dataclass(frozen=True, eq=False)
class HostBatch:
    """One training or evaluation batch, prepared on the host.

    Attributes:
      pixel_values: [B, n, S, S, 3] float32 views of every image (n = geometry.num_views).
      answers: [B, G] int32 answer tokens: caption, <|eot_id|>, then <|endoftext|> padding.
      token_class: [B, G] int32 index into TOKEN_CLASSES per answer token.
      obj_weights_base: [B, M, u, u] float32 fraction of each base-view token covered by object m.
      obj_weights_hi: [B, M, H, W] float32 the same for the high-res grid ([B, M, 0, 0] for single-view layouts).
      obj_shape, obj_colour: [B, M] int32 (-1 for padding objects).
      obj_centre: [B, M, 2] float32 centre (y, x) in [0, 1] image coordinates.
      obj_relation: [B, M] int32 index into RELATIONS of the relation the caption states from object m to object
        m + 1 (objects are paired (0, 1), (2, 3)), "none" for the second of a pair, a lone last object and padding.
      captions: the B captions.
    """

    pixel_values: np.ndarray
    answers: np.ndarray
    token_class: np.ndarray
    obj_weights_base: np.ndarray
    obj_weights_hi: np.ndarray
    obj_shape: np.ndarray
    obj_colour: np.ndarray
    obj_centre: np.ndarray
    obj_relation: np.ndarray
    captions: tuple[str, ...]


def toy_geometry(config: MLLMConfig, image_size: int = TOY_IMAGE_SIZE) -> pimg.ImageGeometry:
    """The token geometry every square ``image_size`` image gets under ``config``."""
    return pimg.image_geometry((image_size, image_size), config)


def prompt_ids(config: MLLMConfig, tokenizer, prompt: str | None = None) -> np.ndarray:
    """Host ids [T_text] of the chat prompt (one -200 image placeholder) for ``prompt`` (default: the config's)."""
    return ptext.build_prompt_ids(prompt, config, tokenizer)


def answer_ids(captions: Sequence[str], tokenizer, config: MLLMConfig, gen_length: int) -> np.ndarray:
    """Answer token ids [B, G]: each caption's words, ``<|eot_id|>``, then ``<|endoftext|>`` up to ``gen_length``.

    This is LLaDA's SFT answer format: the model learns to end its turn and to fill the rest with EOS.
    """
    lm = config.lm
    out = np.full((len(captions), gen_length), lm.eos_id, np.int32)
    for i, c in enumerate(captions):
        ids = tokenizer(c).input_ids
        if len(ids) + 1 > gen_length:
            raise ValueError(f"caption {c!r} has {len(ids)} tokens; with <|eot_id|> it does not fit gen_length="
                             f"{gen_length}. Use a larger gen_length.")
        out[i, :len(ids)] = ids
        out[i, len(ids)] = lm.eot_id
    return out


def answer_token_classes(answers: np.ndarray, tokenizer, config: MLLMConfig) -> np.ndarray:
    """[B, G] int32 class index (TOKEN_CLASSES) of each answer token."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(config.lm.vocab_size)))
    table = np.full(config.lm.vocab_size, TOKEN_CLASSES.index("function"), np.int32)
    for i, w in enumerate(vocab):
        if w in shapes.WORD_CLASS:
            table[i] = TOKEN_CLASSES.index(shapes.WORD_CLASS[w])
    table[config.lm.eot_id] = TOKEN_CLASSES.index("eot")
    table[config.lm.eos_id] = TOKEN_CLASSES.index("pad")
    return table[answers]


def area_weights(masks: np.ndarray, grid: int) -> np.ndarray:
    """Fraction of each cell of a grid x grid partition covered by each mask.

    masks: [..., N, N] bool with N divisible by ``grid`` -> [..., grid, grid] float32 in [0, 1].
    """
    n = masks.shape[-1]
    if masks.shape[-2] != n or n % grid:
        raise ValueError(f"masks must be square [..., N, N] with N divisible by {grid}; got {masks.shape}")
    k = n // grid
    m = masks.reshape(masks.shape[:-2] + (grid, k, grid, k)).astype(np.float32)
    return m.mean(axis=(-3, -1))


def pair_relations(centres_yx: np.ndarray, num_objects: np.ndarray) -> np.ndarray:
    """[B, M] int32 RELATIONS index of object m to object m + 1 for caption pairs (m even, m + 1 < n), else "none".

    centres_yx: [B, M, 2] (y, x); num_objects: [B]. Same rule as the ShapesWorld caption: |dy| > |dx| gives
    above / below, otherwise left of / right of.
    """
    B, M = centres_yx.shape[:2]
    out = np.full((B, M), RELATIONS.index("none"), np.int32)
    for i in range(B):
        for m in range(0, int(num_objects[i]) - 1, 2):
            dy, dx = centres_yx[i, m + 1] - centres_yx[i, m]
            if abs(dy) > abs(dx):
                out[i, m] = RELATIONS.index("above" if dy > 0 else "below")
            else:
                out[i, m] = RELATIONS.index("left of" if dx > 0 else "right of")
    return out


def make_host_batch(b: shapes.Batch, config: MLLMConfig, tokenizer, processor: pimg.ImageProcessor,
                    gen_length: int) -> HostBatch:
    """Turn a ShapesWorld batch into model inputs and targets (see :class:`HostBatch`)."""
    geom = toy_geometry(config, b.images.shape[1])
    if b.images.shape[1] != b.images.shape[2]:
        raise ValueError(f"toy training needs square images, got {b.images.shape[1:3]}")
    pix = np.stack([processor(img).pixel_values for img in b.images])
    answers = answer_ids(b.captions, tokenizer, config, gen_length)
    H, W = geom.highres_shape
    if H != W:
        raise ValueError(f"expected a square high-res grid for square images, got {geom.highres_shape}")
    return HostBatch(
        pixel_values=pix.astype(np.float32),
        answers=answers,
        token_class=answer_token_classes(answers, tokenizer, config),
        obj_weights_base=area_weights(b.masks, geom.view_side),
        obj_weights_hi=(area_weights(b.masks, H) if H else np.zeros(b.masks.shape[:2] + (0, 0), np.float32)),
        obj_shape=b.shapes.astype(np.int32),
        obj_colour=b.colours.astype(np.int32),
        obj_centre=(b.centres_yx / np.float32(b.images.shape[1])).astype(np.float32),
        obj_relation=pair_relations(b.centres_yx, b.num_objects),
        captions=tuple(b.captions),
    )


# ----------------------------------------------------------------------------------------------------------
# batched forward


def image_blocks(params: Params, config: MLLMConfig, pixel_values: jax.Array, geometry: pimg.ImageGeometry, *,
                 freeze_tower: bool = False, freeze_projector: bool = True) -> jax.Array:
    """Image token blocks of a batch of same-geometry images.

    pixel_values: [B, n, S, S, 3] -> [B, N_img, D], the tokens ``mllm.image_tokens`` gives each image (tower,
    projector, optional bilinear pooling, any-resolution layout). ``freeze_tower`` stops gradients at the projector
    output (``freeze_projector=True``) or at the tower output, so a training step skips their backward pass.
    """
    B, n = pixel_values.shape[:2]
    feats = siglip.vision_features(params, config, pixel_values.reshape((B * n,) + pixel_values.shape[2:]))
    if freeze_tower and not freeze_projector:
        feats = jax.lax.stop_gradient(feats)
    x = projector.project(params, feats, dtype=config.lm.dtype)
    if freeze_tower and freeze_projector:
        x = jax.lax.stop_gradient(x)
    g, u = config.vision.grid, config.tokens_per_view_side
    x = x.reshape(B * n, g, g, -1)
    if u != g:
        # the same resize as mllm.encode_views (bilinear, half-pixel centres, no antialias)
        x = jax.image.resize(x.astype(jnp.float32), (B * n, u, u, x.shape[-1]), "bilinear", antialias=False)
    grids = x.astype(jnp.dtype(config.lm.dtype)).reshape((B, n, u, u, x.shape[-1]))
    return jax.vmap(lambda gr: mllm.assemble_image_tokens(gr, params["image_newline"], geometry))(grids)


def prefix_embeddings(params: Params, config: MLLMConfig, ids: np.ndarray, blocks: jax.Array) -> jax.Array:
    """Splice image blocks [B, N_img, D] into the shared prompt ``ids`` [T] (host, one -200) -> [B, P, D]."""
    i = mllm.image_token_index(ids)
    text = llada.embed_tokens(params["lm"], config.lm, jnp.asarray(np.where(ids == IMAGE_TOKEN_INDEX, 0, ids)))
    B = blocks.shape[0]
    before = jnp.broadcast_to(text[:i], (B, i, text.shape[-1]))
    after = jnp.broadcast_to(text[i + 1:], (B, len(ids) - i - 1, text.shape[-1]))
    return jnp.concatenate([before, blocks.astype(text.dtype), after], axis=1)


def answer_logits(params: Params, config: MLLMConfig, prefix: jax.Array, answer_tokens: jax.Array, *,
                  attention: str = "full") -> jax.Array:
    """Logits at the answer positions only. prefix: [B, P, D]; answer_tokens: [B, G] int -> [B, G, V] float32.

    attention: "full" (every token sees every token) or "prefix_lm" (prefix queries see only the prefix).
    """
    lm = params["lm"]
    B, P = prefix.shape[:2]
    G = answer_tokens.shape[1]
    h0 = jnp.concatenate([prefix, llada.embed_tokens(lm, config.lm, answer_tokens)], axis=1)
    T = P + G
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    bias = llada.attention_bias(jnp.arange(T), T, attention=attention, prefix_len=P if attention == "prefix_lm"
                                else None)
    h = llada.run_blocks(lm["layers"], config.lm, h0, positions=positions, bias=bias)
    return llada.final_logits(lm, config.lm, h[:, P:])


def answer_logits_shared_prefix(params: Params, config: MLLMConfig, prefix: jax.Array,
                                answer_tokens: jax.Array) -> jax.Array:
    """Prefix-LM logits of K answers per prompt, the prompt computed once.

    prefix: [B, P, D]; answer_tokens: [B, K, G] int -> logits [B, K, G, V] float32. Equals
    ``answer_logits(..., attention="prefix_lm")`` on each (prefix, answer) pair: prompt queries see only the prompt,
    so its keys and values do not depend on the answer and are shared by the K answers.
    """
    lm, cfg = params["lm"], config.lm
    B, P = prefix.shape[:2]
    _, K, G = answer_tokens.shape
    pos_p = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    _, (k, v) = llada.run_blocks(lm["layers"], cfg, prefix.astype(llada.compute_dtype(cfg)), positions=pos_p,
                                 return_kv=True)
    k, v = jnp.repeat(k, K, axis=1), jnp.repeat(v, K, axis=1)  # [N, B*K, P, KV, Dh]
    emb = llada.embed_tokens(lm, cfg, answer_tokens.reshape(B * K, G))
    pos_a = jnp.broadcast_to(P + jnp.arange(G, dtype=jnp.int32), (B * K, G))
    h = llada.run_blocks(lm["layers"], cfg, emb, positions=pos_a, cache_kv=(k, v))
    return llada.final_logits(lm, cfg, h).reshape(B, K, G, -1)


def corrupt(key: jax.Array, answers: jax.Array, mask_id: int, eps: float = 1e-3):
    """Forward diffusion: mask each answer token with probability t, t stratified over the batch in [eps, 1].

    answers: [B, G] int. Returns (noisy [B, G], masked [B, G] bool, t [B]).
    """
    B, G = answers.shape
    k1, k2 = jax.random.split(key)
    # stratified t (one sample per 1/B slice) lowers the variance of the 1/t-weighted loss
    u = (jax.random.uniform(k1, ()) + jnp.arange(B) / B) % 1.0
    t = eps + (1.0 - eps) * u
    masked = jax.random.uniform(k2, (B, G)) < t[:, None]
    return jnp.where(masked, mask_id, answers), masked, t


class DiffusionOut(NamedTuple):
    """loss: scalar (diffusion loss + aux_weight * aux_loss); correct, count: [len(TOKEN_CLASSES)] argmax hits and
    masked tokens per token class; aux_loss: the object-level loss or None."""
    loss: jax.Array
    correct: jax.Array
    count: jax.Array
    aux_loss: Any = None


def diffusion_loss(params: Params, config: MLLMConfig, geometry: pimg.ImageGeometry, ids: np.ndarray,
                   pixel_values: jax.Array, answers: jax.Array, token_class: jax.Array, key: jax.Array, *,
                   attention: str = "full", freeze_tower: bool = False, aux_loss_fn=None,
                   aux_weight: float = 0.0, num_masks: int = 1, freeze_projector: bool = True,
                   pad_weight: float = 1.0, rms_weight: float = 0.0) -> DiffusionOut:
    """LLaDA SFT loss: sum over masked answer tokens of CE / t, normalised by the number of answer tokens.

    num_masks: K independent maskings of each answer (t stratified over all B*K); with ``attention="prefix_lm"``
    they share one prompt computation (LaViDa's Prefix-DLM trains with two complementary maskings this way).
    pad_weight: weight of the ``<|endoftext|>`` padding tokens in the sum (1 = LLaDA SFT exactly). With 32-token
    answers most tokens are padding, and a fresh LM learns the content words many times more slowly at weight 1.
    rms_weight: weight of :func:`token_rms_penalty` of the image token span (newline tokens of any-resolution layouts
    included); it adds only a constant while tower and projector are frozen (train.py then passes 0).

    pixel_values: [B, n, S, S, 3]; answers, token_class: [B, G] int; ids: host prompt ids with one -200.
    aux_loss_fn: optional object-level loss of the image-token blocks (``blocks -> scalar``, e.g.
    ``dcam_jax.toy.tower_heads.object_loss_on_blocks`` with its heads and targets bound), added with ``aux_weight``.
    """
    blocks = image_blocks(params, config, pixel_values, geometry, freeze_tower=freeze_tower,
                          freeze_projector=freeze_projector)
    prefix = prefix_embeddings(params, config, ids, blocks)
    B, G = answers.shape
    K = num_masks
    answers, token_class = jnp.repeat(answers, K, axis=0), jnp.repeat(token_class, K, axis=0)  # [B*K, G]
    noisy, masked, t = corrupt(key, answers, config.lm.mask_id)
    if K > 1 and attention == "prefix_lm":
        logits = answer_logits_shared_prefix(params, config, prefix, noisy.reshape(B, K, G)).reshape(B * K, G, -1)
    else:
        logits = answer_logits(params, config, jnp.repeat(prefix, K, axis=0), noisy, attention=attention)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(logp, answers[..., None], axis=-1)[..., 0]
    weight = jnp.where(answers == config.lm.eos_id, pad_weight, 1.0)
    loss = jnp.sum(jnp.where(masked, ce * weight, 0.0) / t[:, None]) / answers.size
    hit = (jnp.argmax(logits, -1) == answers) & masked
    onehot = jax.nn.one_hot(token_class, len(TOKEN_CLASSES), dtype=jnp.float32)
    correct = jnp.einsum("bgc,bg->c", onehot, hit.astype(jnp.float32))
    count = jnp.einsum("bgc,bg->c", onehot, masked.astype(jnp.float32))
    aux_loss = None
    if aux_loss_fn is not None:
        aux_loss = aux_loss_fn(blocks)
        loss = loss + aux_weight * aux_loss
    if rms_weight:
        loss = loss + rms_weight * token_rms_penalty(blocks)
    return DiffusionOut(loss, correct, count, aux_loss)


# ----------------------------------------------------------------------------------------------------------
# tower pretraining on object-level targets


def sincos_pos_embed(grid: int, width: int, temperature: float = 10000.0) -> np.ndarray:
    """2-D sine-cosine position embedding [grid * grid, width] (row-major), a locality-aware initialisation for the
    tower's learned ``pos_embed``: a quarter of the channels each for sin(y), cos(y), sin(x), cos(x) at
    geometrically spaced frequencies. width must be divisible by 4."""
    if width % 4:
        raise ValueError(f"width={width} must be divisible by 4 for a 2-D sin-cos embedding")
    y, x = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    q = width // 4
    omega = 1.0 / temperature ** (np.arange(q, dtype=np.float64) / q)
    ay, ax = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega
    return np.concatenate([np.sin(ay), np.cos(ay), np.sin(ax), np.cos(ax)], axis=1).astype(np.float32)


def resize_pos_embed(pos_embed: jax.Array, grid: int) -> jax.Array:
    """Bilinearly resize a square position table [g * g, W] (row-major) to [grid * grid, W] (half-pixel centres, as
    ``jax.image.resize``); the identity when g == grid."""
    g = int(round(pos_embed.shape[0] ** 0.5))
    if g * g != pos_embed.shape[0]:
        raise ValueError(f"pos_embed has {pos_embed.shape[0]} rows, not a square patch grid")
    if g == grid:
        return pos_embed
    x = jax.image.resize(pos_embed.reshape(g, g, -1).astype(jnp.float32), (grid, grid, pos_embed.shape[-1]),
                         "bilinear")
    return x.reshape(grid * grid, -1).astype(pos_embed.dtype)


def init_toy_params(key: jax.Array, config: MLLMConfig, scale: float = 0.02) -> Params:
    """Fresh toy parameters: ``mllm.init_mllm_params`` with the tower's pos_embed set to a 2-D sin-cos table."""
    params = mllm.init_mllm_params(key, config, scale=scale)
    pe = sincos_pos_embed(config.vision.grid, config.vision.width)
    params["vision"]["pos_embed"] = jnp.asarray(pe, params["vision"]["pos_embed"].dtype)
    return params


def _rms(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)


def token_rms_penalty(tokens: jax.Array) -> jax.Array:
    """Mean over tokens of log(RMS of the token)^2: 0 when every token has RMS 1, growing as any token's scale drifts
    away from it in either direction. tokens: [..., D] -> scalar.

    Nothing else fixes the scale of the projected image tokens (the object heads read RMS-normalised features, and
    every LM block reads the residual stream through an RMSNorm), so without it tokens that carry nothing the caption
    needs (background) drift to many times the scale of object tokens (``python -m eval.alignment`` measures it).
    """
    ms = jnp.mean(jnp.square(tokens.astype(jnp.float32)), -1)
    return jnp.mean(jnp.square(0.5 * jnp.log(ms + 1e-12)))


