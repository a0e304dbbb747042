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

import dataclasses
import json
import functools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

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

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

BlurMode = Literal["spatial", "reference_noop"]
SicdVariant = Literal["single", "multi_token"]


@dataclasses.dataclass(frozen=True)
class RefineConfig:
    """Switches and constants of the refinement chain (SPEC 4.4). Hashable: a static jit arg.

    Switches: ``akd``, ``dacg``, ``cba``, ``normalize`` (clip to [0, max raw] and min-max),
    ``sicd``.

    AKD: ``akd_kernel_size`` fixes k (odd int); None uses the adaptive rule
    ``k = clamp_odd(int(akd_base * min(S/akd_step_div, akd_step_cap) * min(akd_std_mult*std,
    akd_std_cap) * min(R/akd_size_div, akd_size_cap)), akd_min_kernel, akd_max_kernel)``.
    ``akd_region_level`` (None: off) caps k per map at the map's high-relevance region: the
    largest odd k with k * k <= #{tokens >= akd_region_level * max}; a cap of 1 leaves the map
    as it is (see :func:`region_kernel_cap`).

    DACG: percentile ``dacg_alpha_high_var`` if sigma > ``dacg_delta_sigma``, else
    ``dacg_alpha_high_mean`` if mu > ``dacg_delta_mu``, else ``dacg_alpha_low_mean`` if
    mu < ``dacg_delta_mu_prime``, else ``dacg_alpha_default``; non-zero means
    >= ``dacg_nonzero_eps``; 3x3 Gaussian blur with ``dacg_sigma``;
    ``dacg_blur="reference_noop"`` is the authors' exact identity (their column-image blur).

    CBA: delta = ``cba_w_nonzero_pct`` * p``cba_q_nonzero``(non-zero) + ``cba_w_all_pct`` *
    p``cba_q_all``(all) + ``cba_w_nonzero_mean`` * mean(non-zero) + ``cba_w_max`` * max; pixels
    below delta times clip(v / max(delta, ``cba_min_delta``), ``cba_floor``, 1).

    Normalise: ``(E - min) / (max - min + normalize_eps)``.

    SICD: I = ``sicd_repeat_weight`` * r + ``sicd_outlier_weight`` * [M > mean +
    ``sicd_outlier_std`` * std]; alpha = min(<M,I>/<I,I>, ``sicd_alpha_cap``); keep M if the result
    lost more than ``sicd_range_guard`` of the range. None disables the cap / the guard.
    ``sicd_variant="multi_token"`` uses TAM's ECI over the answer's tokens instead of I.
    ``sicd_ignore_invalid=False`` counts every token id (the authors count EOS padding).

    ``baseline_threshold``: zero values below it at the very end (the authors' ``baseline`` mode
    uses 0.4 on the raw map); None disables it.
    """

    akd: bool = True
    dacg: bool = True
    cba: bool = True
    normalize: bool = True
    sicd: bool = True
    # AKD
    akd_kernel_size: int | None = None
    akd_base: float = 3.0
    akd_step_div: float = 16.0
    akd_step_cap: float = 2.0
    akd_std_mult: float = 5.0
    akd_std_cap: float = 2.0
    akd_size_div: float = 512.0
    akd_size_cap: float = 1.5
    akd_min_kernel: int = 3
    akd_max_kernel: int = 11
    akd_region_level: float | None = None
    # DACG
    dacg_delta_sigma: float = 0.22
    dacg_delta_mu: float = 0.35
    dacg_delta_mu_prime: float = 0.25
    dacg_alpha_high_var: float = 90.0
    dacg_alpha_high_mean: float = 75.0
    dacg_alpha_low_mean: float = 80.0
    dacg_alpha_default: float = 85.0
    dacg_nonzero_eps: float = 1e-6
    dacg_sigma: float = 0.3
    dacg_blur: BlurMode = "spatial"
    # CBA
    cba_w_nonzero_pct: float = 0.15
    cba_q_nonzero: float = 50.0
    cba_w_all_pct: float = 0.15
    cba_q_all: float = 60.0
    cba_w_nonzero_mean: float = 0.2
    cba_w_max: float = 0.015
    cba_floor: float = 0.5
    cba_nonzero_eps: float = 1e-6
    cba_min_delta: float = 1e-8
    # clip and normalise
    normalize_eps: float = 0.0
    # SICD
    sicd_variant: SicdVariant = "single"
    sicd_repeat_weight: float = 0.05
    sicd_outlier_weight: float = 0.02
    sicd_outlier_std: float = 2.0
    sicd_alpha_cap: float | None = 0.5
    sicd_range_guard: float | None = 0.1
    sicd_ignore_invalid: bool = True
    # authors' "baseline" ablation
    baseline_threshold: float | None = None

    def __post_init__(self):
        def bad(field, want):
            raise ValueError(
                f"RefineConfig.{field}={getattr(self, field)!r}: expected {want}. "
                "Build configs with refine_preset(name) and dataclasses.replace(...).")

        if self.akd_kernel_size is not None:
            _check_kernel_size(self.akd_kernel_size, "RefineConfig.akd_kernel_size")
        for f in ("akd_min_kernel", "akd_max_kernel"):
            v = getattr(self, f)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1 or v % 2 == 0:
                bad(f, "an odd int >= 1")
        if self.akd_min_kernel > self.akd_max_kernel:
            bad("akd_min_kernel", f"<= akd_max_kernel ({self.akd_max_kernel})")
        for f in ("akd_base", "akd_step_div", "akd_step_cap", "akd_std_mult", "akd_std_cap",
                  "akd_size_div", "akd_size_cap", "dacg_nonzero_eps", "dacg_sigma",
                  "cba_nonzero_eps", "cba_min_delta"):
            if not getattr(self, f) > 0:
                bad(f, "a number > 0")
        for f in ("dacg_alpha_high_var", "dacg_alpha_high_mean", "dacg_alpha_low_mean",
                  "dacg_alpha_default", "cba_q_nonzero", "cba_q_all"):
            if not 0.0 <= getattr(self, f) <= 100.0:
                bad(f, "a percentile in [0, 100]")
        for f in ("cba_w_nonzero_pct", "cba_w_all_pct", "cba_w_nonzero_mean", "cba_w_max",
                  "sicd_repeat_weight", "sicd_outlier_weight", "normalize_eps"):
            if not getattr(self, f) >= 0:
                bad(f, "a number >= 0")
        if not 0.0 <= self.cba_floor <= 1.0:
            bad("cba_floor", "a number in [0, 1]")
        if self.dacg_blur not in ("spatial", "reference_noop"):
            bad("dacg_blur", "'spatial' or 'reference_noop'")
        if self.sicd_variant not in ("single", "multi_token"):
            bad("sicd_variant", "'single' or 'multi_token'")
        if self.sicd_alpha_cap is not None and not self.sicd_alpha_cap >= 0:
            bad("sicd_alpha_cap", "None or a number >= 0")
        if self.sicd_range_guard is not None and not 0.0 <= self.sicd_range_guard <= 1.0:
            bad("sicd_range_guard", "None or a fraction in [0, 1]")
        if self.akd_region_level is not None and not 0.0 < self.akd_region_level <= 1.0:
            bad("akd_region_level", "None or a number in (0, 1]")
        if self.baseline_threshold is not None and not 0.0 <= self.baseline_threshold <= 1.0:
            bad("baseline_threshold", "None or a number in [0, 1]")


PRESET_NAMES = ("default", "full", "none", "akd", "dacg", "cba", "sicd", "reference_compat",
                "reference_baseline")


def refine_preset(name: str) -> RefineConfig:
    """Named configurations, optionally with field overrides: ``"full:akd_kernel_size=3"``,
    ``"akd:akd_kernel_size=5:dacg=true"`` (``NAME[:FIELD=VALUE]...``, values parsed as JSON).

    - ``default``: the chain of the ``diffusion_cam`` method, chosen by the ablation of SPEC 4.6
      (docs/explanation_quality.md): no module, only clip-and-normalise.
    - ``full``: every module with the SPEC defaults (adaptive AKD kernel, spatial DACG blur).
    - ``none``: no module; only clip-and-normalise (the raw map min-max normalised).
    - ``akd`` / ``dacg`` / ``cba`` / ``sicd``: that module alone, plus clip-and-normalise (clean
      single-module ablations; the authors' code always adds SICD, so theirs are not).
    - ``reference_compat``: the authors' released post-processing (SPEC 4.5): k = 3 always (what
      their adaptive rule gives with S = 2 and R = grid height), DACG an exact identity, CBA,
      normalise with their ``+1e-8``, SICD always on and counting every token id given. Their
      1e-6 * max random noise before AKD is not reproduced (we take the median at CoV = 0).
    - ``reference_baseline``: the authors' ``baseline`` ablation: no module, values below 0.4
      zeroed (on the min-max normalised raw map).
    """
    if ":" in name:
        name, *assignments = name.split(":")
        fields = {f.name for f in dataclasses.fields(RefineConfig)}
        changes = {}
        for a in assignments:
            key, eq, raw = a.partition("=")
            if not eq or key not in fields:
                raise ValueError(f"refine_preset: override {a!r} must be FIELD=VALUE with a RefineConfig field; "
                                 f"fields are {sorted(fields)}.")
            try:
                changes[key] = json.loads(raw)
            except json.JSONDecodeError:
                changes[key] = raw
        return dataclasses.replace(refine_preset(name), **changes)
    base = RefineConfig()
    off = dict(akd=False, dacg=False, cba=False, sicd=False)
    if name == "full":
        return base
    if name == "default":
        return dataclasses.replace(base, **off)
    if name == "none":
        return dataclasses.replace(base, **off)
    if name in ("akd", "dacg", "cba", "sicd"):
        return dataclasses.replace(base, **{**off, name: True})
    if name == "reference_compat":
        return dataclasses.replace(
            base, akd_kernel_size=3, dacg_blur="reference_noop", normalize_eps=1e-8,
            sicd_variant="single", sicd_ignore_invalid=False)
    if name == "reference_baseline":
        return dataclasses.replace(base, **off, baseline_threshold=0.4)
    raise ValueError(f"refine_preset: unknown preset {name!r}; expected one of {PRESET_NAMES}.")


# --------------------------------------------------------------------------------------------
# Input checks (host side)
# --------------------------------------------------------------------------------------------

def _check_kernel_size(k, what="kernel_size") -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise ValueError(f"{what}={k!r}: expected a static Python int (odd, >= 1); a kernel size "
                         "cannot be a traced value, use akd_multi for per-map sizes.")
    if k < 1 or k % 2 == 0:
        raise ValueError(f"{what}={k}: expected an odd int >= 1 (the window is centred).")
    return int(k)


def _as_maps(maps, name: str) -> jax.Array:
    x = jnp.asarray(maps)
    if x.ndim < 2:
        raise ValueError(f"{name}: expected maps [..., H, W] with at least 2 dims, got shape "
                         f"{tuple(x.shape)}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
            x = x.astype(jnp.float32)
        else:
            raise ValueError(f"{name}: expected real float maps, got dtype {x.dtype}.")
    elif x.dtype in (jnp.bfloat16, jnp.float16):
        x = x.astype(jnp.float32)
    return x


def check_finite(maps, name: str = "raw_maps") -> None:
    """Raise ValueError naming the first map that holds NaN or inf.

    maps: [..., H, W] (NumPy or concrete JAX array; not usable inside jit).
    """
    if isinstance(maps, jax.core.Tracer):
        raise ValueError(f"check_finite({name}): got a traced array; finiteness is checked on the "
                         "host before jit. Call it outside jit (refine() does).")
    x = _as_maps(maps, name)
    ok = np.asarray(jnp.all(jnp.isfinite(x), axis=(-2, -1)))
    if not ok.all():
        bad = np.argwhere(~ok)
        first = tuple(int(i) for i in bad[0])
        idx = first[0] if len(first) == 1 else first
        raise ValueError(
            f"{name}: map {idx} (of batch shape {tuple(x.shape[:-2])}) contains NaN or inf; "
            f"{len(bad)} map(s) in total are not finite. Maps must be finite: check the step "
            "that produced them (raw Grad-CAM maps are finite for a finite model).")


# --------------------------------------------------------------------------------------------
# Order statistics and percentiles without a sort
# --------------------------------------------------------------------------------------------

def _int_type(dtype):
    if dtype == jnp.float32:
        return jnp.int32, 32
    if dtype == jnp.float64:
        return jnp.int64, 64
    raise ValueError(f"expected float32 or float64 values, got {dtype}.")


def _sortable_bits(x):
    """float -> int with the same order (flip the magnitude bits of negative floats)."""
    it, bits = _int_type(x.dtype)
    i = lax.bitcast_convert_type(x, it)
    mag = jnp.array((1 << (bits - 1)) - 1, it)
    return jnp.where(i < 0, i ^ mag, i)


def _bits_to_float(i, dtype):
    it, bits = _int_type(dtype)
    mag = jnp.array((1 << (bits - 1)) - 1, it)
    return lax.bitcast_convert_type(jnp.where(i < 0, i ^ mag, i), dtype)


def order_statistics(values, ranks):
    """Exact order statistics along the last axis: ``sort(values)[..., ranks]`` without a sort.

    values: [..., N] float32/float64, finite. ranks: [..., R] int in [0, N) (leading dims
    broadcast against values'). Returns [..., R] in values' dtype.

    Bisection on the integer image of the float bit pattern: each round counts the values at or
    below a pivot, so the cost is 32 (64 for float64) vectorised passes of ``R * N`` compares.
    """
    values = jnp.asarray(values)
    ranks = jnp.asarray(ranks)
    lead = jnp.broadcast_shapes(values.shape[:-1], ranks.shape[:-1])
    values = jnp.broadcast_to(values, lead + values.shape[-1:])
    ranks = jnp.broadcast_to(ranks, lead + ranks.shape[-1:])
    key = _sortable_bits(values)                                   # [..., N]
    it, bits = _int_type(values.dtype)
    target = ranks.astype(it) + 1                                  # [..., R]
    lo = jnp.broadcast_to(jnp.min(key, axis=-1, keepdims=True), target.shape)
    hi = jnp.broadcast_to(jnp.max(key, axis=-1, keepdims=True), target.shape)

    def body(_, carry):
        lo, hi = carry
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)                # floor((lo+hi)/2), no overflow
        count = jnp.sum(key[..., None, :] <= mid[..., :, None], axis=-1, dtype=it)
        enough = count >= target
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    lo, _ = lax.fori_loop(0, bits, body, (lo, hi))
    return _bits_to_float(lo, values.dtype)


def _percentiles(values, specs):
    """Linear-interpolation percentiles (NumPy's default) of several subsets in one bisection.

    values: [..., N]. specs: list of (q [...] percent, min_value float | None, empty_value);
    the subset is ``values >= min_value`` (all values when None). Returns a list of [...] arrays;
    a row whose subset is empty gets ``empty_value``.
    """
    n_total = values.shape[-1]
    dt = values.dtype
    ranks, meta = [], []
    for q, min_value, empty in specs:
        if min_value is None:
            n_ex = jnp.zeros(values.shape[:-1], jnp.int32)
        else:
            n_ex = jnp.sum(values < min_value, axis=-1, dtype=jnp.int32)
        n = n_total - n_ex
        q = jnp.broadcast_to(jnp.asarray(q, dt), values.shape[:-1])
        # q * (n - 1) is exact for integral q, so floor() agrees with NumPy's float64 index.
        pos = jnp.maximum(q * (n - 1).astype(dt) / 100.0, 0.0)
        lo = jnp.floor(pos)
        gamma = pos - lo
        lo = lo.astype(jnp.int32)
        hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
        ranks += [jnp.clip(n_ex + lo, 0, n_total - 1), jnp.clip(n_ex + hi, 0, n_total - 1)]
        meta.append((gamma, n, empty))
    stats = order_statistics(values, jnp.stack(ranks, axis=-1))
    out = []
    for i, (gamma, n, empty) in enumerate(meta):
        a, b = stats[..., 2 * i], stats[..., 2 * i + 1]
        diff = b - a
        # NumPy's _lerp: interpolate from the nearer end for accuracy.
        val = jnp.where(gamma >= 0.5, b - diff * (1.0 - gamma), a + diff * gamma)
        out.append(jnp.where(n > 0, val, jnp.asarray(empty, dt)))
    return out


def percentile(values, q, *, min_value: float | None = None, empty_value: float = 0.0):
    """NumPy-style percentile (linear interpolation) over the last axis, optionally of a subset.

    values: [..., N] float. q: percent in [0, 100], scalar or [...] (may be traced).
    min_value: only values ``>= min_value`` take part (all when None). A row with no such value
    returns ``empty_value``. Returns [...].
    """
    values = jnp.asarray(values)
    if values.ndim < 1 or values.shape[-1] == 0:
        raise ValueError(f"percentile: values must be [..., N] with N >= 1, got {values.shape}.")
    if not isinstance(q, jax.core.Tracer):
        qa = np.asarray(q)
        if qa.size and not ((qa >= 0) & (qa <= 100)).all():
            raise ValueError(f"percentile: q={q!r} must lie in [0, 100] (percent, not fraction).")
    if not jnp.issubdtype(values.dtype, jnp.floating):
        values = values.astype(jnp.float32)
    return _percentiles(values, [(q, min_value, empty_value)])[0]


# --------------------------------------------------------------------------------------------
# AKD: rank Gaussian filter
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _batcher_stages(n: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Batcher's odd-even merge sort for n inputs, as stages of disjoint (lo, hi) comparators.

    Built for the next power of two and pruned: comparators always send the min to the lower
    index, so padding at indices >= n would stay +inf and every comparator touching it is a no-op.
    """
    p = 1
    while p < n:
        p *= 2
    stages = []
    width = 1
    while width < p:
        d = width
        while d >= 1:
            stage = []
            for j in range(d % width, p - d, 2 * d):
                for i in range(min(d, p - j - d)):
                    a, b = i + j, i + j + d
                    if a // (2 * width) == b // (2 * width) and b < n:
                        stage.append((a, b))
            if stage:
                stages.append(tuple(stage))
            d //= 2
        width *= 2
    return tuple(stages)


@functools.lru_cache(maxsize=None)
def _stage_tables(n: int):
    """Per stage: partner index of every slot (itself if idle) and whether it keeps the min."""
    stages = _batcher_stages(n)
    partner = np.tile(np.arange(n), (len(stages), 1))
    keeps_min = np.zeros((len(stages), n), bool)
    for s, pairs in enumerate(stages):
        for a, b in pairs:
            partner[s, a], partner[s, b] = b, a
            keeps_min[s, a] = True
    return partner, keeps_min


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
    for stage in _batcher_stages(k * k):
        for a, b in stage:
            s[a], s[b] = jnp.minimum(s[a], s[b]), jnp.maximum(s[a], s[b])
    return _rank_gaussian_from_sorted(s, k)


def _akd_staged(x_nhw, k):
    n = k * k
    x = _windows(x_nhw, k)                                             # [n, N, H, W]
    partner, keeps_min = _stage_tables(n)
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


def kernel_sizes_for(raw_maps, config: "RefineConfig", num_steps=None, image_long_side=None):
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


# --------------------------------------------------------------------------------------------
# DACG
# --------------------------------------------------------------------------------------------

def _gaussian_taps(sigma: float) -> tuple[float, float]:
    if isinstance(sigma, jax.core.Tracer) or not float(sigma) > 0:
        raise ValueError(f"sigma={sigma!r}: expected a static Python float > 0 (the 3-tap "
                         "Gaussian's standard deviation, 0.3 in the paper).")
    # OpenCV builds the kernel in double and rounds once to the image type.
    g = np.exp(-1.0 / (2.0 * float(sigma) ** 2))
    return 1.0 / (1.0 + 2.0 * g), g / (1.0 + 2.0 * g)


def gaussian_blur_3x3(maps, sigma: float = 0.3):
    """3x3 Gaussian blur with reflect-101 border, as cv2.GaussianBlur(m, (3, 3), sigma, sigma).

    maps: [..., H, W] float. sigma: static float > 0. Returns [..., H, W].
    """
    x = _as_maps(maps, "maps")
    c, e = (jnp.asarray(t, x.dtype) for t in _gaussian_taps(sigma))
    pad = [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)]
    p = jnp.pad(x, pad, mode="reflect")
    rows = e * p[..., :, :-2] + c * p[..., :, 1:-1] + e * p[..., :, 2:]     # OpenCV: rows first
    return e * rows[..., :-2, :] + c * rows[..., 1:-1, :] + e * rows[..., 2:, :]


def dacg(maps, sigma: float = 0.3, *, delta_sigma: float = 0.22, delta_mu: float = 0.35,
         delta_mu_prime: float = 0.25, alpha_high_var: float = 90.0,
         alpha_high_mean: float = 75.0, alpha_low_mean: float = 80.0,
         alpha_default: float = 85.0, nonzero_eps: float = 1e-6, blur: BlurMode = "spatial"):
    """DACG, Distribution-Aware Confidence Gating (SPEC 4.4).

    Per map: mu, sigma (population) over all pixels pick the percentile alpha; zeta = the
    alpha-th percentile (linear) of the values >= nonzero_eps (zeta = nonzero_eps when there is
    none); pixels <= zeta take the 3x3 Gaussian blur (sigma, reflect-101) of the whole map, the
    others are unchanged. ``blur="reference_noop"`` returns the maps unchanged (the authors'
    blur of a one-pixel-wide column is an exact identity).

    maps: [..., H, W] float. Returns [..., H, W].
    """
    x = _as_maps(maps, "maps")
    if blur == "reference_noop":
        return x
    if blur != "spatial":
        raise ValueError(f"dacg: blur={blur!r}; expected 'spatial' or 'reference_noop'.")
    if x.size == 0:
        return x
    flat = x.reshape(x.shape[:-2] + (-1,))
    mu = jnp.mean(flat, axis=-1)
    sd = jnp.std(flat, axis=-1)
    alpha = jnp.where(sd > delta_sigma, alpha_high_var,
                      jnp.where(mu > delta_mu, alpha_high_mean,
                                jnp.where(mu < delta_mu_prime, alpha_low_mean, alpha_default)))
    (zeta,) = _percentiles(flat, [(alpha, nonzero_eps, nonzero_eps)])
    blurred = gaussian_blur_3x3(x, sigma)
    return jnp.where(x <= zeta[..., None, None], blurred, x)


# --------------------------------------------------------------------------------------------
# CBA and clip-and-normalise
# --------------------------------------------------------------------------------------------

def cba(maps, *, w_nonzero_pct: float = 0.15, q_nonzero: float = 50.0,
        w_all_pct: float = 0.15, q_all: float = 60.0, w_nonzero_mean: float = 0.2,
        w_max: float = 0.015, floor: float = 0.5, nonzero_eps: float = 1e-6,
        min_delta: float = 1e-8):
    """CBA, Contextual Background Attenuation (SPEC 4.4), the attenuation alone.

    delta = 0.15 * p50(values >= eps) + 0.15 * p60(all) + 0.2 * mean(values >= eps)
    + 0.015 * max (delta = nonzero_eps when no value is >= eps); pixels with v < delta become
    v * clip(v / max(delta, min_delta), floor, 1); the others are unchanged.

    maps: [..., H, W] float. Returns [..., H, W].
    """
    x = _as_maps(maps, "maps")
    if x.size == 0:
        return x
    flat = x.reshape(x.shape[:-2] + (-1,))
    nz = flat >= nonzero_eps
    n_nz = jnp.sum(nz, axis=-1)
    p_nz, p_all = _percentiles(flat, [(q_nonzero, nonzero_eps, 0.0), (q_all, None, 0.0)])
    mean_nz = jnp.sum(jnp.where(nz, flat, 0.0), axis=-1) / jnp.maximum(n_nz, 1)
    delta = (w_nonzero_pct * p_nz + w_all_pct * p_all + w_nonzero_mean * mean_nz
             + w_max * jnp.max(flat, axis=-1))
    delta = jnp.where(n_nz > 0, delta, nonzero_eps)[..., None, None]
    lam = jnp.clip(x / jnp.maximum(delta, min_delta), floor, 1.0)
    return jnp.where(x < delta, x * lam, x)


def clip_and_normalize(maps, raw_maps, *, eps: float = 0.0):
    """Clip to [0, max of the raw map], then min-max normalise each map to [0, 1].

    maps: [..., H, W] (the CBA output); raw_maps: [..., H, W] (refine's input, broadcastable).
    ``(E - min) / (max - min + eps)``; a constant map becomes all zeros. Returns [..., H, W].
    """
    x = _as_maps(maps, "maps")
    raw = _as_maps(raw_maps, "raw_maps")
    if x.size == 0:
        return x
    top = jnp.max(raw, axis=(-2, -1), keepdims=True)
    e = jnp.minimum(jnp.maximum(x, 0.0), top)
    lo = jnp.min(e, axis=(-2, -1), keepdims=True)
    span = jnp.max(e, axis=(-2, -1), keepdims=True) - lo
    nonflat = span > 0
    out = (e - lo) / jnp.where(nonflat, span + eps, 1.0)
    return jnp.where(nonflat, out, jnp.zeros_like(out))


# --------------------------------------------------------------------------------------------
# SICD and ECI
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# The chain
# --------------------------------------------------------------------------------------------

def _akd_constants(config: RefineConfig) -> dict:
    return dict(base=config.akd_base, step_div=config.akd_step_div,
                step_cap=config.akd_step_cap, std_mult=config.akd_std_mult,
                std_cap=config.akd_std_cap, size_div=config.akd_size_div,
                size_cap=config.akd_size_cap, min_kernel=config.akd_min_kernel,
                max_kernel=config.akd_max_kernel)


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
