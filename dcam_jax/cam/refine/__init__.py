"""Diffusion-CAM refinement modules (SPEC 4.4 and 4.5) as pure, jit- and vmap-able JAX.

The chain applied by :func:`refine` is

    AKD -> DACG -> CBA -> clip to [0, max raw] and min-max normalise -> SICD

with every step switchable and every constant a field of the frozen :class:`RefineConfig`.
Every module takes maps ``[..., H, W]``; the leading dimensions are a batch, so a batch of maps is
one call and ``jax.vmap`` over any leading axis gives the same numbers as a loop.

Public API
- :class:`RefineConfig`, :func:`refine_preset` (``full``, ``none``, ``akd``, ``dacg``, ``cba``,
  ``sicd``, ``reference_compat``, ``reference_baseline``)
- modules: :func:`akd`, :func:`akd_multi`, :func:`adaptive_kernel_size`, :func:`dacg`,
  :func:`gaussian_blur_3x3`, :func:`cba`, :func:`clip_and_normalize`, :func:`sicd`,
  :func:`repeat_ratio`, :func:`eci`
- helpers: :func:`percentile`, :func:`order_statistics`, :func:`check_finite`
- chains: :func:`refine` (host wrapper: validates, picks the AKD kernel sizes, filters each size
  group once, runs the rest in one jitted call) and :func:`refine_arrays` (the pure, jit-able
  chain)

Design decisions (SPEC 4.4 is authoritative; these fill in what it leaves open)
- **AKD kernel size.** The filter needs a static window size but the adaptive rule depends on the
  map's std. :func:`refine` evaluates the rule per map (one tiny jitted call), reads the sizes back
  to the host, groups the maps by size and filters each group once (group shapes padded to powers
  of two so few shapes compile), then runs the rest of the chain in one jitted call. Fully inside
  jit, :func:`refine_arrays` / :func:`akd_multi` instead run every candidate size (all odd sizes
  in the clamp range unless told otherwise) on the whole batch and select per map: correct, but
  each candidate costs a full pass.
- **AKD sort.** The k x k windows are gathered (static reflect-101 index tables) into a
  ``[k*k, N, H, W]`` layout and sorted by Batcher's odd-even merge network (pruned to k*k
  inputs) made of ``minimum``/``maximum`` on whole slabs: fully unrolled for k <= 3, and for
  larger k one vectorised step per network stage (28 stages for k = 9 and 11) over chunks of 16
  maps, so the working set stays in cache. XLA's CPU sort of many short rows is slow, and fully
  unrolled networks for 49+ inputs take minutes to compile. A custom batching rule folds vmapped
  axes into the map batch (vmapped gathers compile several times slower); a custom JVP keeps
  the filter differentiable.
- **AKD edge cases.** CoV = 0 (constant window, mean > 0) outputs the window median; mean <= 0
  outputs 0. No random noise is added (the authors add 1e-6 * max noise to dodge the 0/0).
- **Percentiles** use NumPy's default linear method. They are computed without a sort: the two
  order statistics around the interpolation point are found by bisection on the float's
  bit pattern (exact, 32 rounds of counting), about twice as fast on CPU as XLA's sort of a
  batch of 616-value rows. The values ``>= nonzero_eps`` are the top of the sorted map, so
  percentiles of the non-zero values are order statistics with an offset.
- **Maps without non-zero values.** DACG uses zeta = nonzero_eps and CBA delta = nonzero_eps
  (what the authors' code does), so an all-zero map passes through unchanged and no NaN appears.
- **Constant maps at the normalise step** become all zeros (the authors' code leaves the constant
  value, which may lie outside [0, 1]); a constant map carries no localisation.
- **SICD** counts only valid answer tokens for the repeat ratio: pass ``valid`` ``[..., G]`` bool
  and/or ``ignore_ids`` (static ids such as EOS, padding, mask). ``<I, I> = 0`` leaves the map
  unchanged. ``reference_compat`` counts every entry, as the authors count their EOS padding.
- **multi_token SICD = TAM's ECI** (:func:`eci`), adapted: the interference map of token j is the
  normalised, weighted sum of the maps (at the SICD step, i.e. refined and normalised, not TAM's
  raw logit maps) of the *earlier answer tokens* whose id differs from token j's; the weights are
  caller-given scores ``[..., T, T]`` (TAM: the target class's activation at each context text
  position) or uniform. The scale is the closed-form least-squares alpha. TAM applies no cap and
  no range guard (:func:`eci`'s defaults); inside :func:`refine` the config's ``sicd_alpha_cap``
  and ``sicd_range_guard`` apply to both variants (set them to None for TAM's exact rule).
"""

from __future__ import annotations

from dcam_jax.cam.refine._common import check_finite
from dcam_jax.cam.refine.akd import adaptive_kernel_size, akd, akd_multi, kernel_sizes_for, region_kernel_cap
from dcam_jax.cam.refine.chain import refine, refine_arrays
from dcam_jax.cam.refine.config import PRESET_NAMES, RefineConfig, refine_preset
from dcam_jax.cam.refine.gating import cba, clip_and_normalize, dacg, gaussian_blur_3x3
from dcam_jax.cam.refine.sicd import eci, repeat_ratio, sicd
from dcam_jax.ops.order import order_statistics, percentile

__all__ = [
    "PRESET_NAMES",
    "RefineConfig",
    "adaptive_kernel_size",
    "kernel_sizes_for",
    "region_kernel_cap",
    "akd",
    "akd_multi",
    "cba",
    "check_finite",
    "clip_and_normalize",
    "dacg",
    "eci",
    "gaussian_blur_3x3",
    "order_statistics",
    "percentile",
    "refine",
    "refine_arrays",
    "refine_preset",
    "repeat_ratio",
    "sicd",
]
