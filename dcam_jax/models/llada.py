"""LLaDA masked-diffusion language model as pure functions of a parameter pytree.

LLaMA-style blocks without a causal mask: RMSNorm (float32), half-split RoPE (float32), multi-head attention
(grouped KV heads supported), SwiGLU MLP, no biases, untied head. Per-layer parameters are stacked on a leading
axis and run with ``lax.scan``; :func:`run_blocks` runs any contiguous range of blocks ``[start, stop)``, so the
Diffusion-CAM code can take ``jax.vjp`` of the upper part of the network at the residual stream after block L.

Parameter pytree (``params["lm"]``; shapes for ``LMConfig`` with N layers):

=====================  ================================
``embed``              [V, D]
``layers/attn_norm``   [N, D]
``layers/q``           [N, D, H*Dh]
``layers/k``           [N, D, KV*Dh]
``layers/v``           [N, D, KV*Dh]
``layers/o``           [N, H*Dh, D]
``layers/mlp_norm``    [N, D]
``layers/gate``        [N, D, F]
``layers/up``          [N, D, F]
``layers/down``        [N, F, D]
``final_norm``         [D]
``lm_head``            [D, V]
=====================  ================================

Gradient rules (a static switch of the backward pass; forward values never change): ``"standard"`` (the plain
derivative), ``"conservative_norm"`` (every RMSNorm is differentiated with its 1/rms factor held constant) and
``"conservative"`` (as ``conservative_norm``, and the attention probabilities held constant too, so gradients reach
other tokens only through the value path). They exist for the attribution pass (SPEC 4.3); the sampler and every
other caller use ``"standard"``.

Attention modes: ``"full"`` (bidirectional; LLaDA, LLaDA-V) and ``"prefix_lm"`` (LaViDa Prefix-DLM: a query at a
position < ``prefix_len`` sees only keys < ``prefix_len``; answer queries see everything). An optional key
validity mask removes padded keys. Positions are explicit, so padding never shifts RoPE phases.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dcam_jax.models.config import LMConfig, MLLMConfig
from dcam_jax.models.layers import linear

Params = dict[str, Any]
ATTENTION_MODES = ("full", "prefix_lm")
GRAD_RULES = ("standard", "conservative_norm", "conservative")
_NEG_INF = -1e30


def compute_dtype(cfg: LMConfig):
    return jnp.dtype(cfg.dtype)


def check_grad_rule(grad_rule: str) -> tuple[bool, bool]:
    """Validate a gradient rule; -> (hold the RMSNorm scales, hold the attention probabilities)."""
    if grad_rule not in GRAD_RULES:
        raise ValueError(f"grad_rule={grad_rule!r}; expected one of {GRAD_RULES}")
    return grad_rule != "standard", grad_rule == "conservative"


# --------------------------------------------------------------------------------------------------------
# initialisation


def init_lm_params(key: jax.Array, cfg: LMConfig, dtype: str | None = None, scale: float = 0.02) -> Params:
    """Random LM parameters (normal(0, scale) matrices, unit norm scales) in ``dtype`` (default cfg.dtype)."""
    dt = jnp.dtype(dtype or cfg.dtype)
    D, F, N = cfg.d_model, cfg.mlp_hidden, cfg.n_layers
    qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"q": (N, D, qd), "k": (N, D, kvd), "v": (N, D, kvd), "o": (N, qd, D),
              "gate": (N, D, F), "up": (N, D, F), "down": (N, F, D)}
    keys = jax.random.split(key, len(shapes) + 2)
    layers = {name: (scale * jax.random.normal(k, s, jnp.float32)).astype(dt)
              for k, (name, s) in zip(keys[:-2], shapes.items())}
    layers["attn_norm"] = jnp.ones((N, D), dt)
    layers["mlp_norm"] = jnp.ones((N, D), dt)
    return {
        "embed": (scale * jax.random.normal(keys[-2], (cfg.vocab_size, D), jnp.float32)).astype(dt),
        "layers": layers,
        "final_norm": jnp.ones((D,), dt),
        "lm_head": (scale * jax.random.normal(keys[-1], (D, cfg.vocab_size), jnp.float32)).astype(dt),
    }


# --------------------------------------------------------------------------------------------------------
# building blocks


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, *, hold_scale: bool = False) -> jax.Array:
    """RMSNorm as in LLaDA / LlamaRMSNorm: normalise in float32, cast back, then multiply by ``scale``.

    x: [..., D]; scale: [D]. Returns x's dtype. ``hold_scale``: differentiate with the 1/rms factor held
    constant (``x * stop_gradient(rsqrt(mean(x^2) + eps))``; the conservative gradient rules); same values.
    """
    xf = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    y = xf * (jax.lax.stop_gradient(inv) if hold_scale else inv)
    return y.astype(x.dtype) * scale.astype(x.dtype)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables for half-split RoPE. positions: [B, T] int -> cos, sin: [B, T, head_dim // 2] float32."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x: [B, T, heads, Dh] with cos, sin: [B, T, Dh/2] in float32 (half-split form), cast back."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def attention_bias(q_pos_idx: jax.Array, k_len: int, *, attention: str = "full", prefix_len=None,
                   key_valid: jax.Array | None = None) -> jax.Array | None:
    """Additive float32 attention bias [B or 1, 1, Tq, Tk] (0 = attend, -1e30 = blocked), or None if unmasked.

    q_pos_idx: [Tq] sequence index of each query (the index into the key axis of the same token).
    attention: "full" or "prefix_lm". prefix_len: int or [B] int (required for "prefix_lm").
    key_valid: [B, Tk] bool, False for padded keys.
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention={attention!r}; expected one of {ATTENTION_MODES}")
    allowed = None
    if attention == "prefix_lm":
        if prefix_len is None:
            raise ValueError("attention='prefix_lm' needs prefix_len (number of prompt tokens)")
        pl = jnp.reshape(jnp.asarray(prefix_len, jnp.int32), (-1, 1, 1))  # [B or 1, 1, 1]
        q = q_pos_idx[None, :, None]
        k = jnp.arange(k_len)[None, None, :]
        allowed = (q >= pl) | (k < pl)  # [B, Tq, Tk]
    if key_valid is not None:
        kv = key_valid[:, None, :].astype(bool)
        allowed = kv if allowed is None else allowed & kv
    if allowed is None:
        return None
    return jnp.where(allowed, 0.0, _NEG_INF).astype(jnp.float32)[:, None, :, :]


def _attend(q, k, v, bias, cfg: LMConfig, hold_probs: bool = False):
    """q: [B, Tq, H, Dh]; k, v: [B, Tk, KV, Dh]; bias: [B|1, 1, Tq, Tk] or None -> [B, Tq, H*Dh].

    hold_probs: differentiate with the softmax probabilities held constant (the ``conservative`` rule)."""
    B, Tq, H, Dh = q.shape
    KV = k.shape[2]
    qg = q.reshape(B, Tq, KV, H // KV, Dh)
    s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) / np.sqrt(Dh)
    if bias is not None:
        s = s + bias[:, :, None]  # [B, 1, 1, Tq, Tk] broadcast over (KV, G)
    p = jax.nn.softmax(s, axis=-1)
    p = (jax.lax.stop_gradient(p) if hold_probs else p).astype(v.dtype)
    o = jnp.einsum("bkgqs,bskd->bqkgd", p, v, preferred_element_type=jnp.float32).astype(q.dtype)
    return o.reshape(B, Tq, H * Dh)


def _qkv(lp: Params, h: jax.Array, cos: jax.Array, sin: jax.Array, cfg: LMConfig, grad_rule: str):
    """Queries [B, T, H, Dh], keys and values [B, T, KV, Dh] of a block's tokens (RoPE applied to q and k).

    Under the ``conservative`` rule the keys carry no gradient (the probabilities that read them are held) and are
    returned as ``stop_gradient``, so a reverse pass through a cache of them skips the key projections."""
    hold_norm, hold_probs = check_grad_rule(grad_rule)
    B, T, _ = h.shape
    a = rms_norm(h, lp["attn_norm"], cfg.rms_eps, hold_scale=hold_norm)
    q = linear(a, lp["q"]).reshape(B, T, cfg.n_heads, cfg.head_dim)
    k = linear(a, lp["k"]).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
    v = linear(a, lp["v"]).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
    k = apply_rope(k, cos, sin)
    return apply_rope(q, cos, sin), (jax.lax.stop_gradient(k) if hold_probs else k), v


def block_kv(lp: Params, h: jax.Array, cos: jax.Array, sin: jax.Array, cfg: LMConfig,
             grad_rule: str = "standard") -> tuple[jax.Array, jax.Array]:
    """Only the keys (RoPE applied) and values a block computes from the residual stream h [B, T, D]:
    (k, v) [B, T, KV, Dh], as :func:`block` returns them. For rows whose block output nothing reads (the top
    block's prompt rows when only answer rows are scored): the rest of the block is not computed."""
    _, k, v = _qkv(lp, h, cos, sin, cfg, grad_rule)
    return k, v


def attention_half(lp: Params, h: jax.Array, cos: jax.Array, sin: jax.Array, bias, cfg: LMConfig,
                   cache_kv: tuple[jax.Array, jax.Array] | None = None, grad_rule: str = "standard"):
    """First half of a block: h + Attn(RMSNorm(h)). Returns (h_mid [B, T, D], (k, v) of these tokens; see
    :func:`_qkv` for the keys under the ``conservative`` rule)."""
    hold_probs = check_grad_rule(grad_rule)[1]
    q, k, v = _qkv(lp, h, cos, sin, cfg, grad_rule)
    k_all, v_all = (k, v) if cache_kv is None else (jnp.concatenate([cache_kv[0], k], 1),
                                                     jnp.concatenate([cache_kv[1], v], 1))
    return h + linear(_attend(q, k_all, v_all, bias, cfg, hold_probs), lp["o"]), (k, v)


def mlp_norm(lp: Params, h_mid: jax.Array, cfg: LMConfig, grad_rule: str = "standard") -> jax.Array:
    """The post-attention RMSNorm output (the MLP input), the activation LLaVA-CAM hooks. [B, T, D]."""
    return rms_norm(h_mid, lp["mlp_norm"], cfg.rms_eps, hold_scale=check_grad_rule(grad_rule)[0])


def mlp_half(lp: Params, h_mid: jax.Array, m: jax.Array) -> jax.Array:
    """Second half of a block given its MLP input m = mlp_norm(h_mid): h_mid + SwiGLU(m). [B, T, D]."""
    g = jax.nn.silu(linear(m, lp["gate"])) * linear(m, lp["up"])
    return h_mid + linear(g, lp["down"])


def block(lp: Params, h: jax.Array, cos: jax.Array, sin: jax.Array, bias, cfg: LMConfig,
          cache_kv: tuple[jax.Array, jax.Array] | None = None, grad_rule: str = "standard"):
    """One LLaDA block. lp: one layer's params (no leading layer axis); h: [B, T, D].

    cache_kv: optional (k, v) [B, P, KV, Dh] of a cached prefix (RoPE already applied to k); the block's own keys
    are appended after them. grad_rule: one of GRAD_RULES (backward pass only).
    Returns (h_out [B, T, D], (k, v) of this block's own tokens, RoPE applied).
    """
    h_mid, kv = attention_half(lp, h, cos, sin, bias, cfg, cache_kv, grad_rule)
    return mlp_half(lp, h_mid, mlp_norm(lp, h_mid, cfg, grad_rule)), kv


def layer_params(layers: Params, i: int) -> Params:
    """One layer's params (index ``i`` of the stacked axis)."""
    return jax.tree.map(lambda a: a[i], layers)


def run_blocks(layers: Params, cfg: LMConfig, h: jax.Array, *, positions: jax.Array, bias=None,
               start: int = 0, stop: int | None = None, cache_kv=None, return_kv: bool = False,
               grad_rule: str = "standard"):
    """Run blocks ``[start, stop)`` with ``lax.scan`` over the stacked layer params.

    layers: the stacked ``params["lm"]["layers"]``; h: [B, T, D] residual stream entering block ``start``;
    positions: [B, T] RoPE positions of these tokens; bias: from :func:`attention_bias` (over all keys);
    cache_kv: optional stacked (k, v) [stop-start, B, P, KV, Dh] of a cached prefix for the same layers.
    Returns h after block ``stop - 1`` ([B, T, D]), and with ``return_kv`` also the stacked (k, v)
    [stop-start, B, T, KV, Dh] of these tokens (RoPE applied to k), e.g. to build a prefix cache.
    grad_rule: one of GRAD_RULES; changes the backward pass only.
    """
    check_grad_rule(grad_rule)
    stop = cfg.n_layers if stop is None else stop
    if not 0 <= start <= stop <= cfg.n_layers:
        raise ValueError(f"block range [{start}, {stop}) is outside [0, {cfg.n_layers}]")
    if start == stop:
        if return_kv:
            B, T = h.shape[:2]
            empty = jnp.zeros((0, B, T, cfg.n_kv_heads, cfg.head_dim), h.dtype)
            return h, (empty, empty)
        return h
    cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
    if start == 0 and stop == cfg.n_layers:
        xs, layer_params = layers, lambda lp: lp
    else:
        # Scan over the block indices and read each block's params out of the whole stack: a slice
        # layers[start:stop] would be copied (XLA materialises it before the scan), as much memory as those weights.
        xs = jnp.arange(start, stop)
        layer_params = lambda i: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False),
                                              layers)

    def body(carry, x):
        lx, ckv = x
        out, kv = block(layer_params(lx), carry, cos, sin, bias, cfg, ckv, grad_rule)
        return out, (kv if return_kv else None)

    if cfg.remat:
        body = jax.checkpoint(body)
    h, kvs = jax.lax.scan(body, h, (xs, cache_kv))
    return (h, kvs) if return_kv else h


def embed_tokens(lm: Params, cfg: LMConfig, input_ids: jax.Array) -> jax.Array:
    """input_ids: [B, T] int -> embeddings [B, T, D] in the compute dtype (no scaling, no positions)."""
    return jnp.take(lm["embed"], input_ids, axis=0).astype(compute_dtype(cfg))


def final_logits(lm: Params, cfg: LMConfig, h: jax.Array, grad_rule: str = "standard") -> jax.Array:
    """Final RMSNorm and untied head. h: [B, T, D] -> logits [B, T, V] float32. grad_rule: backward pass only."""
    x = rms_norm(h, lm["final_norm"], cfg.rms_eps, hold_scale=check_grad_rule(grad_rule)[0])
    return jnp.einsum("btd,dv->btv", x, lm["lm_head"].astype(x.dtype), preferred_element_type=jnp.float32)


class LMInputs(NamedTuple):
    """Resolved forward-pass inputs: embeddings h0 [B, T, D], positions [B, T], attention bias or None."""
    h0: jax.Array
    positions: jax.Array
    bias: Any


def _split_params(params: Params, config) -> tuple[Params, LMConfig]:
    cfg = config.lm if isinstance(config, MLLMConfig) else config
    if not isinstance(cfg, LMConfig):
        raise TypeError(f"config must be an LMConfig or MLLMConfig, got {type(config).__name__}")
    lm = params["lm"] if "lm" in params else params
    for key in ("embed", "layers", "final_norm", "lm_head"):
        if key not in lm:
            raise KeyError(f"LM params lack {key!r}; got keys {sorted(lm)}. Pass the model params "
                           "(with an 'lm' entry) or the LM params themselves.")
    return lm, cfg


def prepare_inputs(lm: Params, cfg: LMConfig, input_ids=None, *, inputs_embeds=None, positions=None,
                   attention: str = "full", prefix_len=None, key_valid=None) -> LMInputs:
    """Embeddings, positions and attention bias for a forward pass over a whole sequence.

    Exactly one of input_ids [B, T] and inputs_embeds [B, T, D] must be given. positions default to arange(T).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    h0 = embed_tokens(lm, cfg, input_ids) if input_ids is not None else inputs_embeds.astype(compute_dtype(cfg))
    if h0.ndim != 3 or h0.shape[-1] != cfg.d_model:
        raise ValueError(f"expected embeddings [B, T, {cfg.d_model}], got {h0.shape}")
    B, T = h0.shape[:2]
    if T > cfg.max_seq_len:
        raise ValueError(f"sequence of {T} tokens exceeds the model's max_seq_len={cfg.max_seq_len}")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    bias = attention_bias(jnp.arange(T), T, attention=attention, prefix_len=prefix_len, key_valid=key_valid)
    return LMInputs(h0, positions, bias)


def lm_hidden(params: Params, config, input_ids=None, *, inputs_embeds=None, positions=None,
              attention: str = "full", prefix_len=None, key_valid=None, stop: int | None = None) -> jax.Array:
    """Residual stream after block ``stop - 1`` (default: all blocks, before the final norm). -> [B, T, D]."""
    lm, cfg = _split_params(params, config)
    x = prepare_inputs(lm, cfg, input_ids, inputs_embeds=inputs_embeds, positions=positions,
                       attention=attention, prefix_len=prefix_len, key_valid=key_valid)
    return run_blocks(lm["layers"], cfg, x.h0, positions=x.positions, bias=x.bias, stop=stop)


def lm_logits(params: Params, config, input_ids=None, *, inputs_embeds=None, positions=None,
              attention: str = "full", prefix_len=None, key_valid=None) -> jax.Array:
    """Logits of the LLaDA LM. input_ids: [B, T] int (or inputs_embeds [B, T, D]) -> [B, T, V] float32.

    attention: "full" (bidirectional) or "prefix_lm" (queries before ``prefix_len`` see only the prefix).
    key_valid: optional [B, T] bool key-padding mask. params may be the whole model's or the LM's own.
    """
    lm, cfg = _split_params(params, config)
    h = lm_hidden(lm, cfg, input_ids, inputs_embeds=inputs_embeds, positions=positions, attention=attention,
                  prefix_len=prefix_len, key_valid=key_valid)
    return final_logits(lm, cfg, h)


# --------------------------------------------------------------------------------------------------------
# Prefix-DLM cache (LaViDa): the prompt's keys and values once, then answer-only steps


class PrefixCache(NamedTuple):
    """Keys and values of a prompt computed alone (prompt queries see only the prompt).

    k, v: [N, B, P, KV, Dh] (RoPE applied to k); key_valid: [B, P] bool; next_pos: [B] int, the RoPE position of
    the first answer token (number of valid prompt tokens when prompts are right-padded).
    """
    k: jax.Array
    v: jax.Array
    key_valid: jax.Array
    next_pos: jax.Array


def build_prefix_cache(params: Params, config, prompt_embeds: jax.Array, *, valid_len=None) -> PrefixCache:
    """Run the prompt alone once. prompt_embeds: [B, P, D]; valid_len: [B] int (right padding) or None."""
    lm, cfg = _split_params(params, config)
    B, P = prompt_embeds.shape[:2]
    key_valid = (jnp.ones((B, P), bool) if valid_len is None
                 else jnp.arange(P)[None, :] < jnp.asarray(valid_len)[:, None])
    x = prepare_inputs(lm, cfg, inputs_embeds=prompt_embeds, key_valid=None if valid_len is None else key_valid)
    _, (k, v) = run_blocks(lm["layers"], cfg, x.h0, positions=x.positions, bias=x.bias, return_kv=True)
    next_pos = jnp.full((B,), P, jnp.int32) if valid_len is None else jnp.asarray(valid_len, jnp.int32)
    return PrefixCache(k, v, key_valid, next_pos)


def answer_logits_cached(params: Params, config, cache: PrefixCache, answer_embeds: jax.Array) -> jax.Array:
    """Logits of the answer tokens given a prefix cache. answer_embeds: [B, G, D] -> [B, G, V] float32.

    Answer queries attend to all valid prompt keys and to every answer key; answer positions continue at
    ``cache.next_pos``. Equals the uncached ``prefix_lm`` forward on [prompt | answer].
    """
    lm, cfg = _split_params(params, config)
    B, G = answer_embeds.shape[:2]
    positions = cache.next_pos[:, None] + jnp.arange(G, dtype=jnp.int32)[None, :]
    key_valid = jnp.concatenate([cache.key_valid, jnp.ones((B, G), bool)], axis=1)
    bias = attention_bias(jnp.arange(G), key_valid.shape[1], key_valid=key_valid)
    h = run_blocks(lm["layers"], cfg, answer_embeds.astype(compute_dtype(cfg)), positions=positions, bias=bias,
                   cache_kv=(cache.k, cache.v))
    return final_logits(lm, cfg, h)
