"""RefineConfig: every switch and constant of the refinement chain, and its named presets."""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import numpy as np

from dcam_jax.cam.refine._common import _check_kernel_size

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
