"""SICD (least-squares removal of repeated-token interference) and TAM's ECI."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from jax import lax

from dcam_jax.cam.refine._common import _as_maps


def _valid_tokens(token_ids, valid, ignore_ids):
    ids = jnp.asarray(token_ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"token_ids: expected integer ids [..., G], got dtype {ids.dtype}.")
    if ids.ndim < 1:
        raise ValueError(f"token_ids: expected [..., G] with at least 1 dim, got {ids.shape}.")
    v = jnp.ones(ids.shape, bool) if valid is None else jnp.asarray(valid, bool)
    ids, v = jnp.broadcast_arrays(ids, v)
    for t in ignore_ids:
        v = v & (ids != int(t))
    return ids, v


def repeat_ratio(token_ids, valid=None, *, ignore_ids: Sequence[int] = ()):
    """SICD's r: distinct ids occurring more than once / number of answer tokens.

    Only valid entries count (``valid`` [..., G] bool, broadcastable; ``ignore_ids`` static ids
    such as EOS, padding or mask are invalid too). No valid entry gives r = 0.
    token_ids: int [..., G]. Returns float32 [...].
    """
    ids, v = _valid_tokens(token_ids, valid, ignore_ids)
    same = (ids[..., :, None] == ids[..., None, :]) & v[..., :, None] & v[..., None, :]
    g = ids.shape[-1]
    earlier = jnp.tril(jnp.ones((g, g), bool), k=-1)          # [g, h]: h < g
    seen_before = jnp.any(same & earlier, axis=-1)
    repeated = v & ~seen_before & (jnp.sum(same, axis=-1) > 1)
    n_valid = jnp.sum(v, axis=-1)
    n_rep = jnp.sum(repeated, axis=-1)
    return jnp.where(n_valid > 0, n_rep / jnp.maximum(n_valid, 1), 0.0).astype(jnp.float32)


def _debias(m, interference, alpha_cap, range_guard):
    """M' = ReLU(M - alpha* I), alpha* = <M,I>/<I,I> (capped); guard on the lost range."""
    ii = jnp.sum(interference * interference, axis=(-2, -1), keepdims=True)
    mi = jnp.sum(m * interference, axis=(-2, -1), keepdims=True)
    has = ii > 0
    alpha = mi / jnp.where(has, ii, 1.0)
    if alpha_cap is not None:
        alpha = jnp.minimum(alpha, alpha_cap)
    out = jnp.maximum(m - alpha * interference, 0.0)
    if range_guard is not None:
        def span(a):
            return jnp.max(a, axis=(-2, -1), keepdims=True) - jnp.min(a, axis=(-2, -1),
                                                                     keepdims=True)
        has = has & (span(out) >= (1.0 - range_guard) * span(m))
    return jnp.where(has, out, m)


def sicd(maps, token_ids, *, valid=None, ignore_ids: Sequence[int] = (),
         repeat_weight: float = 0.05, outlier_weight: float = 0.02, outlier_std: float = 2.0,
         alpha_cap: float | None = 0.5, range_guard: float | None = 0.1):
    """SICD, Single-Instance Causal Debiasing (SPEC 4.4).

    I = repeat_weight * r everywhere + outlier_weight where M > mean(M) + outlier_std * std(M)
    (population std), r = :func:`repeat_ratio`; alpha* = min(<M,I>/<I,I>, alpha_cap);
    M' = ReLU(M - alpha* I); M is kept where M' lost more than ``range_guard`` of M's range,
    and where <I,I> = 0.

    maps: [..., H, W] float. token_ids: int [..., G], the answer's ids; its leading dims
    broadcast against maps' leading dims (e.g. maps [T, H, W] with token_ids [G]).
    valid: bool [..., G] or None. Returns [..., H, W].
    """
    x = _as_maps(maps, "maps")
    r = repeat_ratio(token_ids, valid, ignore_ids=ignore_ids)
    r = jnp.broadcast_to(r, x.shape[:-2])[..., None, None].astype(x.dtype)
    mean = jnp.mean(x, axis=(-2, -1), keepdims=True)
    std = jnp.std(x, axis=(-2, -1), keepdims=True)
    interference = repeat_weight * r + outlier_weight * (x > mean + outlier_std * std)
    return _debias(x, interference.astype(x.dtype), alpha_cap, range_guard)


def eci(maps, token_ids, weights=None, *, valid=None, ignore_ids: Sequence[int] = (),
        alpha_cap: float | None = None, range_guard: float | None = None,
        weight_eps: float = 1e-8):
    """TAM's estimated causal inference over all tokens of one answer at once.

    For token j: context = earlier tokens i < j that are valid and whose id differs from j's;
    w_ji = ReLU(weights[j, i]) on the context, normalised by (sum + weight_eps); interference
    I_j = sum_i w_ji maps_i (the *input* maps, as TAM uses the raw maps of earlier tokens);
    alpha_j = <M_j, I_j> / <I_j, I_j> (closed form of TAM's scalar minimisation); output
    ReLU(M_j - alpha_j I_j); unchanged where <I_j, I_j> = 0 or token j is invalid.
    TAM applies no cap and no guard; ``alpha_cap``/``range_guard`` add SICD's.

    maps: [..., T, H, W] float, one map per answer token. token_ids: int [..., T] aligned with
    the maps. weights: [..., T, T] scores (row j = explained token, column i = context token) or
    None for uniform. valid: bool [..., T] or None. Returns [..., T, H, W].
    """
    x = _as_maps(maps, "maps")
    if x.ndim < 3:
        raise ValueError(f"eci: maps must be [..., T, H, W], got shape {tuple(x.shape)}.")
    ids, v = _valid_tokens(token_ids, valid, ignore_ids)
    t = x.shape[-3]
    if ids.shape[-1] != t:
        raise ValueError(f"eci: token_ids has {ids.shape[-1]} entries but maps has {t} token "
                         "maps; give one id per map (the explained answer tokens).")
    earlier = jnp.tril(jnp.ones((t, t), bool), k=-1)                    # [j, i]: i < j
    ctx = earlier & (ids[..., :, None] != ids[..., None, :]) & v[..., :, None] & v[..., None, :]
    w = jnp.ones(ctx.shape, x.dtype) if weights is None else jnp.maximum(
        jnp.asarray(weights, x.dtype), 0.0)
    w = jnp.where(ctx, w, 0.0)
    w = w / (jnp.sum(w, axis=-1, keepdims=True) + weight_eps)
    interference = jnp.einsum("...ji,...ihw->...jhw", w, x, precision=lax.Precision.HIGHEST)
    return _debias(x, interference, alpha_cap, range_guard)
