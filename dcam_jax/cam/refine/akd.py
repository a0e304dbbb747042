"""AKD: the rank Gaussian filter (sorting networks over k x k windows) and its adaptive kernel size."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dcam_jax.cam.refine._common import _as_maps, _check_kernel_size
from dcam_jax.cam.refine.config import RefineConfig
from dcam_jax.ops.sorting import batcher_stages, stage_tables


_UNROLL_MAX_INPUTS = 9     # k = 3: 28 comparators, fully unrolled is fastest and compiles fast
_AKD_CHUNK = 16            # maps per chunk for k >= 5 (window slabs of 16 maps stay in cache)


def _rank_gaussian_from_sorted(s, k):
    """Weighted sum of sorted window values s (list of k*k arrays [...]) with rank Gaussian."""
    n = k * k
    c = n // 2
    mean = functools.reduce(jnp.add, s) / n
    var = functools.reduce(jnp.add, [(v - mean) ** 2 for v in s]) / n
    positive = mean > 0
    cov = jnp.sqrt(var) / jnp.where(positive, mean, 1.0)
    spread = cov > 0
    # cov**2 may underflow to 0 (inf scale): the off-centre weights then vanish, no NaN.
    inv_two_var = 0.5 / jnp.where(spread, cov, 1.0) ** 2
    num, den = s[c], jnp.ones_like(mean)
    for d in range(1, c + 1):                 # weights are symmetric in the centred rank
        g = jnp.exp(-float(d * d) * inv_two_var)
        num = num + g * (s[c - d] + s[c + d])
        den = den + 2.0 * g
    out = jnp.where(spread, num / den, s[c])
    return jnp.where(positive, out, jnp.zeros_like(out))


def _rank_gaussian_stacked(x, k):
    """Same as _rank_gaussian_from_sorted on a stacked [k*k, ...] array (compiles faster)."""
    n = k * k
    c = n // 2
    mean = jnp.mean(x, axis=0)
    var = jnp.mean((x - mean) ** 2, axis=0)
    positive = mean > 0
    cov = jnp.sqrt(var) / jnp.where(positive, mean, 1.0)
    spread = cov > 0
    inv_two_var = 0.5 / jnp.where(spread, cov, 1.0) ** 2
    r2 = ((np.arange(n) - c) ** 2).astype(np.float32).reshape((n,) + (1,) * (x.ndim - 1))
    g = jnp.exp(-r2 * inv_two_var)                    # centre weight is exp(0) = 1, never NaN
    out = jnp.where(spread, jnp.sum(g * x, axis=0) / jnp.sum(g, axis=0), x[c])
    return jnp.where(positive, out, jnp.zeros_like(out))


def _windows(x_nhw, k):
    """[k*k, N, H, W]: the k x k reflect-101 neighbourhood of every pixel.

    Two gathers with static reflect-101 index tables (rows, then columns) rather than k*k
    slices of a padded array, which XLA takes seconds to compile for k = 9.
    """
    p = k // 2
    h, w = x_nhw.shape[-2:]
    rows = np.pad(np.arange(h), p, mode="reflect")            # NumPy 'reflect' == reflect-101
    cols = np.pad(np.arange(w), p, mode="reflect")
    row_idx = np.stack([rows[i:i + h] for i in range(k)])     # [k, H]
    col_idx = np.stack([cols[j:j + w] for j in range(k)])     # [k, W]
    win = x_nhw[:, row_idx][..., col_idx]                     # [N, k, H, k, W]
    return jnp.moveaxis(win, (1, 3), (0, 1)).reshape((k * k,) + x_nhw.shape)


def _akd_unrolled(x_nhw, k):
    win = _windows(x_nhw, k)
    s = [win[i] for i in range(k * k)]
    for stage in batcher_stages(k * k):
        for a, b in stage:
            s[a], s[b] = jnp.minimum(s[a], s[b]), jnp.maximum(s[a], s[b])
    return _rank_gaussian_from_sorted(s, k)


def _akd_staged(x_nhw, k):
    n = k * k
    x = _windows(x_nhw, k)                                             # [n, N, H, W]
    partner, keeps_min = stage_tables(n)
    for s in range(partner.shape[0]):
        y = x[partner[s]]
        lo = keeps_min[s].reshape((n,) + (1,) * (x.ndim - 1))
        x = jnp.where(lo, jnp.minimum(x, y), jnp.maximum(x, y))
    return _rank_gaussian_stacked(x, k)


def akd(maps, kernel_size: int):
    """AKD rank Gaussian filter (SPEC 4.4, TAM's rank Gaussian filter with guarded edge cases).

    For every pixel: the k x k window (reflect-101 padding, NumPy's 'reflect'), sorted ascending
    into s_0..s_{k^2-1}; CoV = population std / mean; weights exp(-r^2 / (2 CoV^2)) over centred
    ranks r = i - floor(k^2/2), normalised; output sum_i w_i s_i. Output 0 where the window mean
    is <= 0, the window median where CoV = 0.

    maps: [..., H, W] float. kernel_size: static odd Python int (1 gives max(v, 0)).
    Returns [..., H, W].
    """
    k = _check_kernel_size(kernel_size)
    x = _as_maps(maps, "maps")
    h, w = x.shape[-2:]
    if x.size == 0:
        return x
    return _akd_flat(k)(x.reshape((-1, h, w))).reshape(x.shape)


@functools.lru_cache(maxsize=None)
def _akd_flat(k: int):
    """The filter on [N, H, W] maps, with a batching rule that folds vmapped axes into N.

    Every map is filtered independently, so vmap is just a bigger batch; without the rule XLA
    is handed batched gathers that take seconds longer to compile for the same result. A
    custom_vmap function cannot be differentiated, so a custom_jvp around it differentiates
    the plain implementation instead (the sorting network is piecewise linear).
    """

    def plain(x_nhw):
        n_maps, h, w = x_nhw.shape
        if k * k <= _UNROLL_MAX_INPUTS:
            return _akd_unrolled(x_nhw, k)
        if n_maps <= _AKD_CHUNK:
            return _akd_staged(x_nhw, k)
        n_chunks = -(-n_maps // _AKD_CHUNK)
        pad = n_chunks * _AKD_CHUNK - n_maps
        xc = jnp.pad(x_nhw, ((0, pad), (0, 0), (0, 0))).reshape(n_chunks, _AKD_CHUNK, h, w)
        return lax.map(lambda c: _akd_staged(c, k), xc).reshape(-1, h, w)[:n_maps]

    filt = jax.custom_batching.custom_vmap(plain)

    @filt.def_vmap
    def _rule(axis_size, in_batched, x_bnhw):
        (batched,) = in_batched
        if not batched:
            return filt(x_bnhw), False
        return filt(x_bnhw.reshape((-1,) + x_bnhw.shape[2:])).reshape(x_bnhw.shape), True

    @jax.custom_jvp
    def differentiable(x_nhw):
        return filt(x_nhw)

    @differentiable.defjvp
    def _jvp(primals, tangents):
        return jax.jvp(plain, primals, tangents)

    return differentiable


def akd_multi(maps, kernel_sizes, candidates: Sequence[int] = (3, 5, 7, 9, 11)):
    """AKD with a per-map kernel size chosen among static candidates (jit-able).

    maps: [..., H, W]. kernel_sizes: int [...] (broadcast against maps' leading dims), may be
    traced. candidates: static odd ints; the filter runs once per candidate over the whole batch
    and each map takes the result of the candidate nearest its kernel size (exact when its size
    is a candidate, which :func:`refine` guarantees). Returns [..., H, W].
    """
    cands = tuple(sorted({_check_kernel_size(c, "candidates entry") for c in candidates}))
    if not cands:
        raise ValueError("akd_multi: candidates is empty; give at least one odd kernel size.")
    x = _as_maps(maps, "maps")
    if len(cands) == 1:
        return x if cands[0] == 1 else akd(x, cands[0])
    ks = jnp.broadcast_to(jnp.asarray(kernel_sizes), x.shape[:-2])
    pick = jnp.argmin(jnp.abs(ks[..., None] - jnp.asarray(cands)), axis=-1)    # [...]
    filt = lambda c: x if c == 1 else akd(x, c)  # a window of 1 leaves the map as it is (as refine() does)
    out = filt(cands[0])
    for i, c in enumerate(cands[1:], start=1):
        out = jnp.where((pick == i)[..., None, None], filt(c), out)
    return out


def region_kernel_cap(maps, level: float):
    """The largest odd window that fits the map's high-relevance region (grid-aware AKD cap).

    n = #{tokens >= level * max of the map}; cap = the largest odd k with k * k <= n (1 when the
    region has fewer than 9 tokens: AKD then leaves the map unchanged). A window wider than the
    region mixes the object's tokens with their background, so a rank filter of that size spreads
    a small object's evidence instead of denoising it. maps: [..., H, W] -> int32 [...] (odd >= 1).
    """
    x = _as_maps(maps, "maps").astype(jnp.float32)
    mx = jnp.max(x, axis=(-2, -1), keepdims=True)
    n = jnp.sum((x >= level * mx) & (mx > 0), axis=(-2, -1))
    side = jnp.floor(jnp.sqrt(n.astype(jnp.float32) + 1e-3)).astype(jnp.int32)
    return jnp.maximum(jnp.where(side % 2 == 0, side - 1, side), 1)


def kernel_sizes_for(raw_maps, config: RefineConfig, num_steps=None, image_long_side=None):
    """Per-map AKD kernel sizes of ``config`` (jit-able): the fixed size or the adaptive rule, then the
    region cap when ``config.akd_region_level`` is set. raw_maps: [..., H, W] -> int32 [...]."""
    raw = _as_maps(raw_maps, "raw_maps")
    if config.akd_kernel_size is not None:
        k = jnp.full(raw.shape[:-2], config.akd_kernel_size, jnp.int32)
    else:
        k = adaptive_kernel_size(jnp.std(raw, axis=(-2, -1)), num_steps, image_long_side,
                                 **_akd_constants(config))
    if config.akd_region_level is not None:
        k = jnp.minimum(k, region_kernel_cap(raw, config.akd_region_level))
    return k


def adaptive_kernel_size(map_std, num_steps, image_long_side, *, base: float = 3.0,
                         step_div: float = 16.0, step_cap: float = 2.0, std_mult: float = 5.0,
                         std_cap: float = 2.0, size_div: float = 512.0, size_cap: float = 1.5,
                         min_kernel: int = 3, max_kernel: int = 11):
    """AKD's adaptive kernel size (SPEC 4.4), elementwise and jit-able.

    k = clamp_odd(int(base * min(S/step_div, step_cap) * min(std_mult*std, std_cap)
                  * min(R/size_div, size_cap)), min_kernel, max_kernel)
    where clamp_odd adds 1 to an even value, then clamps. map_std: [...] population std of each
    raw map; num_steps S (real denoising steps) and image_long_side R (pixels): scalars or [...].
    Returns int32 [...] (odd, in [min_kernel, max_kernel]).
    """
    f32 = jnp.float32
    s = jnp.asarray(num_steps, f32)
    r = jnp.asarray(image_long_side, f32)
    std = jnp.asarray(map_std, f32)
    prod = (base * jnp.minimum(s / step_div, step_cap) * jnp.minimum(std_mult * std, std_cap)
            * jnp.minimum(r / size_div, size_cap))
    k = jnp.floor(jnp.maximum(prod, 0.0)).astype(jnp.int32)      # int() of a non-negative float
    k = jnp.where(k % 2 == 0, k + 1, k)
    return jnp.clip(k, min_kernel, max_kernel)


def _akd_constants(config: RefineConfig) -> dict:
    return dict(base=config.akd_base, step_div=config.akd_step_div,
                step_cap=config.akd_step_cap, std_mult=config.akd_std_mult,
                std_cap=config.akd_std_cap, size_div=config.akd_size_div,
                size_cap=config.akd_size_cap, min_kernel=config.akd_min_kernel,
                max_kernel=config.akd_max_kernel)
