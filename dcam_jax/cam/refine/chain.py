"""The refinement chain: AKD -> DACG -> CBA -> clip and normalise -> SICD, each switched by a RefineConfig."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dcam_jax.cam.refine._common import _as_maps, check_finite
from dcam_jax.cam.refine.akd import _AKD_CHUNK, akd, akd_multi, kernel_sizes_for
from dcam_jax.cam.refine.config import RefineConfig, refine_preset
from dcam_jax.cam.refine.gating import cba, clip_and_normalize, dacg
from dcam_jax.cam.refine.sicd import eci, sicd


def refine_arrays(raw_maps, config: RefineConfig, *, kernel_sizes=None,
                  kernel_candidates: Sequence[int] | None = None, token_ids=None, valid=None,
                  ignore_ids: Sequence[int] = (), context_weights=None, num_steps=None,
                  image_long_side=None, akd_maps=None):
    """The refinement chain as a pure, jit-able function (no host checks; see :func:`refine`).

    raw_maps: [..., H, W] finite float (Grad-CAM maps). config: static.
    kernel_sizes: int [...] per-map AKD sizes, or None to evaluate the adaptive rule in-graph
    from num_steps and image_long_side; kernel_candidates: static sizes to compile (default: all
    odd sizes in the config's clamp range). Unused when config.akd_kernel_size is set.
    akd_maps: [..., H, W] precomputed AKD output (refine() filters on the host-chosen groups),
    used instead of running AKD when given and config.akd is on.
    token_ids / valid / ignore_ids / context_weights: see :func:`sicd` (single variant) and
    :func:`eci` (multi_token variant: maps [..., T, H, W], token_ids [..., T]).
    Returns [..., H, W] in [0, 1] when config.normalize is on.
    """
    raw = _as_maps(raw_maps, "raw_maps")
    x = raw
    if config.akd:
        if akd_maps is not None:
            x = _as_maps(akd_maps, "akd_maps")
        elif config.akd_kernel_size is not None and config.akd_region_level is None:
            x = akd(x, config.akd_kernel_size)
        else:
            if kernel_sizes is None:
                if config.akd_kernel_size is None and (num_steps is None or image_long_side is None):
                    raise ValueError(
                        "refine: the adaptive AKD kernel needs num_steps (real denoising steps) "
                        "and image_long_side (pixels), or explicit kernel_sizes; or set "
                        "RefineConfig.akd_kernel_size.")
                kernel_sizes = kernel_sizes_for(raw, config, num_steps, image_long_side)
            if kernel_candidates is None:
                lo = 1 if config.akd_region_level is not None else config.akd_min_kernel
                kernel_candidates = tuple(range(lo, config.akd_max_kernel + 1, 2))
            x = akd_multi(x, kernel_sizes, kernel_candidates)
    if config.dacg:
        x = dacg(x, config.dacg_sigma, delta_sigma=config.dacg_delta_sigma,
                 delta_mu=config.dacg_delta_mu, delta_mu_prime=config.dacg_delta_mu_prime,
                 alpha_high_var=config.dacg_alpha_high_var,
                 alpha_high_mean=config.dacg_alpha_high_mean,
                 alpha_low_mean=config.dacg_alpha_low_mean,
                 alpha_default=config.dacg_alpha_default, nonzero_eps=config.dacg_nonzero_eps,
                 blur=config.dacg_blur)
    if config.cba:
        x = cba(x, w_nonzero_pct=config.cba_w_nonzero_pct, q_nonzero=config.cba_q_nonzero,
                w_all_pct=config.cba_w_all_pct, q_all=config.cba_q_all,
                w_nonzero_mean=config.cba_w_nonzero_mean, w_max=config.cba_w_max,
                floor=config.cba_floor, nonzero_eps=config.cba_nonzero_eps,
                min_delta=config.cba_min_delta)
    if config.normalize:
        x = clip_and_normalize(x, raw, eps=config.normalize_eps)
    if config.sicd:
        if token_ids is None:
            raise ValueError("refine: config.sicd is on, so token_ids (the answer's ids) are "
                             "needed; pass them or use a preset without SICD.")
        if not config.sicd_ignore_invalid:
            valid, ignore_ids = None, ()
        if config.sicd_variant == "single":
            x = sicd(x, token_ids, valid=valid, ignore_ids=ignore_ids,
                     repeat_weight=config.sicd_repeat_weight,
                     outlier_weight=config.sicd_outlier_weight,
                     outlier_std=config.sicd_outlier_std, alpha_cap=config.sicd_alpha_cap,
                     range_guard=config.sicd_range_guard)
        else:
            x = eci(x, token_ids, context_weights, valid=valid, ignore_ids=ignore_ids,
                    alpha_cap=config.sicd_alpha_cap, range_guard=config.sicd_range_guard)
    if config.baseline_threshold is not None:
        x = jnp.where(x < config.baseline_threshold, jnp.zeros_like(x), x)
    return x


_refine_jit = jax.jit(refine_arrays,
                      static_argnames=("config", "kernel_candidates", "ignore_ids"))


@functools.partial(jax.jit, static_argnames=("config",))
def _adaptive_sizes(raw, num_steps, image_long_side, config):
    return kernel_sizes_for(raw, config, num_steps, image_long_side)


_akd_jit = jax.jit(akd, static_argnums=1)


@functools.partial(jax.jit, static_argnames=("k",))
def _akd_into(flat_nhw, out_nhw, idx, k):
    return out_nhw.at[idx].set(akd(flat_nhw[idx], k))


def _akd_grouped(raw, kernel_sizes: np.ndarray):
    """AKD with per-map sizes, each map filtered once: maps are grouped by size on the host.

    A group of m maps is padded (repeating its first index) to a power of two >= 16, capped at
    the batch size, so a stream of batches compiles a handful of group shapes and no work is
    spent filtering a map at a size it does not use.
    """
    h, w = raw.shape[-2:]
    flat = raw.reshape((-1, h, w))
    n = flat.shape[0]
    ks = kernel_sizes.reshape(-1)
    sizes = np.unique(ks)
    if len(sizes) == 1:
        return raw if int(sizes[0]) == 1 else _akd_jit(raw, int(sizes[0]))
    out = flat  # a window of 1 is the identity: maps of size 1 keep their values
    for k in sizes[sizes > 1]:
        idx = np.flatnonzero(ks == k)
        size = min(n, max(_AKD_CHUNK, 1 << (len(idx) - 1).bit_length()))
        idx = np.concatenate([idx, np.full(size - len(idx), idx[0])]).astype(np.int32)
        out = _akd_into(flat, out, idx, k=int(k))
    return out.reshape(raw.shape)


def refine(raw_maps, config: RefineConfig | None = None, *, token_ids=None, valid=None,
           ignore_ids: Sequence[int] = (), context_weights=None, num_steps: int | None = None,
           image_long_side: int | None = None) -> jax.Array:
    """Refine raw Grad-CAM maps: AKD -> DACG -> CBA -> clip and normalise -> SICD (SPEC 4.4).

    Host wrapper around jitted calls of :func:`refine_arrays`: checks the inputs (NaN/inf
    raise ValueError naming the map), evaluates the adaptive AKD kernel size per map, filters
    each group of maps that share a size once, then runs the rest of the chain in one call.

    raw_maps: [..., H, W] float, finite. config: a :class:`RefineConfig` (default: ``full``).
    token_ids: int [..., G] answer ids (needed when SICD is on; for ``multi_token``, one id per
    map: [..., T] with maps [..., T, H, W]). valid: bool like token_ids, or None; ignore_ids:
    ids that never count (EOS, padding, mask). context_weights: [..., T, T] ECI scores or None.
    num_steps, image_long_side: the real number of denoising steps and the image's longer side
    in pixels (needed by the adaptive AKD kernel). Returns float32 [..., H, W] in [0, 1].
    """
    config = refine_preset("full") if config is None else config
    if not isinstance(config, RefineConfig):
        raise ValueError(f"refine: config must be a RefineConfig (see refine_preset), got "
                         f"{type(config).__name__}.")
    if isinstance(raw_maps, jax.core.Tracer):
        raise ValueError("refine() checks its inputs on the host and cannot be traced; inside "
                         "jit call refine_arrays(raw_maps, config, ...) instead.")
    raw = _as_maps(raw_maps, "raw_maps").astype(jnp.float32)
    if raw.size == 0:
        return raw
    check_finite(raw, "raw_maps")
    ignore_ids = tuple(int(i) for i in ignore_ids)
    if config.sicd:
        if token_ids is None:
            raise ValueError("refine: config.sicd is on, so token_ids (the answer's ids, [..., G])"
                             " are needed; pass them or use a preset without SICD.")
        ids = np.asarray(token_ids)
        if ids.ndim < 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"refine: token_ids must be an int array [..., G], got shape "
                             f"{ids.shape} dtype {ids.dtype}.")
        if valid is not None and np.shape(valid) != ids.shape:
            raise ValueError(f"refine: valid has shape {np.shape(valid)}, expected the shape of "
                             f"token_ids {ids.shape}.")
        lead = raw.shape[:-2]
        if config.sicd_variant == "multi_token":
            if raw.ndim < 3 or ids.shape[-1] != raw.shape[-3]:
                raise ValueError(
                    f"refine: the multi_token SICD variant needs maps [..., T, H, W] and one "
                    f"token id per map [..., T]; got maps {raw.shape}, token_ids {ids.shape}.")
            lead = raw.shape[:-3]
            if context_weights is not None and np.shape(context_weights)[-2:] != (
                    ids.shape[-1], ids.shape[-1]):
                raise ValueError(f"refine: context_weights must be [..., T, T] with T = "
                                 f"{ids.shape[-1]}, got {np.shape(context_weights)}.")
        try:
            np.broadcast_shapes(ids.shape[:-1], lead)
        except ValueError:
            raise ValueError(
                f"refine: token_ids' leading dims {ids.shape[:-1]} do not broadcast against the "
                f"maps' batch dims {lead}; add singleton axes (e.g. token_ids[:, None, :] for "
                "maps [B, T, H, W]).") from None
    if not config.sicd_ignore_invalid:
        valid, ignore_ids = None, ()           # unused by the chain; keeps one compiled version
    akd_maps = None
    if config.akd and config.akd_kernel_size is not None and config.akd_region_level is not None:
        sizes = np.asarray(_adaptive_sizes(raw, 1, 1, config))
        akd_maps = _akd_grouped(raw, sizes)
    elif config.akd and config.akd_kernel_size is None:
        if num_steps is None or image_long_side is None:
            raise ValueError(
                "refine: the adaptive AKD kernel (RefineConfig.akd_kernel_size=None) needs "
                "num_steps (the real number of denoising steps) and image_long_side (pixels); "
                "pass both, or fix the size with dataclasses.replace(config, akd_kernel_size=3).")
        if not num_steps >= 1 or not image_long_side >= 1:
            raise ValueError(f"refine: num_steps={num_steps} and image_long_side="
                             f"{image_long_side} must both be >= 1.")
        kernel_sizes = np.asarray(_adaptive_sizes(raw, num_steps, image_long_side, config))
        akd_maps = _akd_grouped(raw, kernel_sizes)
    return _refine_jit(raw, config, token_ids=token_ids, valid=valid, ignore_ids=ignore_ids,
                       context_weights=context_weights, akd_maps=akd_maps)
