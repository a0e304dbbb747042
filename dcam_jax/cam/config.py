"""CamConfig: which method explains answer tokens and with which knobs; the table of registered methods (their
presets), and the one ``resolve()`` that fills a config's open fields from its method's preset and the model.

``dcam_jax.cam.methods`` defines the method type and the built-in methods and fills :data:`REGISTRY`; this module
only reads it, so the dependency runs one way (methods -> config). Importing any ``dcam_jax.cam`` module runs the
package's ``__init__``, which imports ``methods``, so the table is always filled.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dcam_jax.cam import attribution as attr
from dcam_jax.cam import refine as rf
from dcam_jax.models.config import MLLMConfig

PROBES = ("decision", "trajectory", "noise", "clean", "final")

# name -> dcam_jax.cam.methods.Method, in registration order (filled by dcam_jax.cam.methods.register)
REGISTRY: dict[str, Any] = {}


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(REGISTRY)


def get_method(name: str):
    """The registered ``dcam_jax.cam.methods.Method`` called ``name``; an unknown name raises ValueError listing
    the known ones."""
    if name not in REGISTRY:
        raise ValueError(f"method={name!r}; expected one of {method_names()}")
    return REGISTRY[name]


@dataclasses.dataclass(frozen=True)
class CamConfig:
    """How to explain answer tokens.

    Attributes:
      method: "diffusion_cam" (default: decision probe, conservative gradients, per-token gradient x activation,
        the default refinement), "paper" (the paper's formulas as written: standard gradients, channel-weighted
        Grad-CAM, the full refinement chain), "reference_compat" (the authors' released code), "gradcam" (the
        authors' Grad-CAM baseline), "llava_cam", "tam", "layercam", "gradcam_pp", "hirescam". Fields left as None
        take the method's preset (see :func:`resolve`); anything set explicitly wins.
      layer: hooked block index L (None: :func:`default_layer`: the model's ``cam_layer``, chosen by the protocol
        of SPEC 4.6, else n_layers // 3, i.e. 10 of 32; TAM: the last block).
      probe: "decision" (the state just before the token was committed), "trajectory" (``num_trajectory_states``
        states evenly spaced from the start of generation to the decision state, averaged), "noise" (K random
        re-maskings of the final answer, the target always masked), "clean" (the final answer, teacher-forced),
        "final" (the state before the last denoising step; the authors' Grad-CAM baseline).
      attention: "full" or "prefix_lm"; None: the model's native attention.
      score: "logprob", "logit", "max_logit", "vocab_sum", "sum_logits" (see attribution.GradSpec).
      contrast: "none", "runner_up", or an int answer position whose token is subtracted.
      num_noise_samples / noise_ratios: for probe "noise" (ratios default to an even grid inside (0, 1)).
      num_trajectory_states: for probe "trajectory" (K >= 1 states; K = 1 is the decision state).
      view: "highres" or "base" (the base view of any-resolution layouts); None: high-res when present.
      grad_rule: "standard", "conservative_norm" or "conservative" (see attribution; the backward pass only).
      aggregation: "gxa", "gradcam", "layercam", "gradcam_pp", "channel_relu_mean" (see attribution).
      grad_relu, hook: see attribution.
      refine: a RefineConfig, a preset name of ``refine.PRESET_NAMES`` ("default", "full", "none", "akd", ...),
        or None for the method's default.
      threshold: after max-normalisation, values below it set to 0 (LLaVA-CAM 0.5); None for none.
      batch_size: probe states per vmapped chunk (bounds memory on large models).
    """

    method: str = "diffusion_cam"
    layer: int | None = None
    probe: str | None = None
    attention: str | None = None
    score: str | None = None
    contrast: Any = None
    num_noise_samples: int = 4
    noise_ratios: tuple[float, ...] | None = None
    num_trajectory_states: int = 4
    view: str | None = None
    grad_rule: str | None = None
    aggregation: str | None = None
    grad_relu: bool | None = None
    hook: str | None = None
    refine: Any = None
    threshold: float | None = None
    batch_size: int = 8

    def __post_init__(self):
        get_method(self.method)  # an unknown name raises, listing the registered ones
        if self.probe is not None and self.probe not in PROBES:
            raise ValueError(f"probe={self.probe!r}; expected one of {PROBES}")
        if self.grad_rule is not None and self.grad_rule not in attr.GRAD_RULES:
            raise ValueError(f"grad_rule={self.grad_rule!r}; expected one of {attr.GRAD_RULES}")
        if self.aggregation is not None and self.aggregation not in attr.AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r}; expected one of {attr.AGGREGATIONS}")
        if self.hook is not None and self.hook not in attr.HOOKS:
            raise ValueError(f"hook={self.hook!r}; expected one of {attr.HOOKS}")
        if self.score is not None and self.score not in attr.SCORES:
            raise ValueError(f"score={self.score!r}; expected one of {attr.SCORES}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.num_noise_samples < 1 or self.num_trajectory_states < 1:
            raise ValueError(f"num_noise_samples={self.num_noise_samples} and num_trajectory_states="
                             f"{self.num_trajectory_states} must be >= 1")
        if self.noise_ratios is not None:
            r = tuple(float(x) for x in self.noise_ratios)
            if not r or any(not 0.0 <= x < 1.0 for x in r):
                raise ValueError(f"noise_ratios={self.noise_ratios} must be a non-empty list of values in [0, 1)")
            object.__setattr__(self, "noise_ratios", r)


def __getattr__(name):
    if name == "METHODS":  # the registered method names, as they are now
        return method_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def preset_fields(method: str) -> dict:
    """The fields a method's preset fixes (a copy), e.g. ``preset_fields("diffusion_cam")["grad_rule"]``."""
    return dict(get_method(method).preset)


def reference_compat() -> CamConfig:
    """The authors' released Diffusion-CAM behaviour (SPEC 4.5): clean teacher-forced forward, vocab-sum score
    contrasted with the previous answer token, ReLU on gradients, mean of per-channel ReLU, and the
    ``reference_compat`` refinement (k = 3, DACG a no-op, SICD always on). Never the default.
    The same as ``CamConfig(method="reference_compat")``."""
    return CamConfig(method="reference_compat")


def paper() -> CamConfig:
    """The paper's formulas as written: decision probe, standard gradients, channel-weighted Grad-CAM, the full
    AKD -> DACG -> CBA -> SICD chain with the paper's constants. The same as ``CamConfig(method="paper")``."""
    return CamConfig(method="paper")


def default_layer(method: str, config: MLLMConfig) -> int:
    """The hooked block of ``method`` when none is given: the last block for methods registered with
    ``layer="last"`` (TAM); otherwise the model's ``cam_layer`` (chosen on ground truth for that model) or else
    n_layers // 3."""
    if get_method(method).layer == "last":
        return config.lm.n_layers - 1
    return config.cam_layer if config.cam_layer is not None else config.lm.n_layers // 3


def resolve(cam: CamConfig, config: MLLMConfig) -> CamConfig:
    """Fill every None field of ``cam`` from its method's preset and the model config."""
    preset = preset_fields(cam.method)
    changes = {k: v for k, v in preset.items() if getattr(cam, k) is None}
    if cam.layer is None:
        changes["layer"] = default_layer(cam.method, config)
    if cam.attention is None and "attention" not in changes:
        changes["attention"] = config.attention
    out = dataclasses.replace(cam, **changes)
    attr.check_layer(out.layer, config)
    if out.contrast not in ("none", "runner_up", "previous") and not isinstance(out.contrast, (int, np.integer)):
        raise ValueError(f"contrast={out.contrast!r}; expected 'none', 'runner_up', 'previous' or an answer position")
    return out


def open_fields(cam: CamConfig) -> list[str]:
    """The fields of ``cam`` that :func:`resolve` still has to fill (empty for a resolved config)."""
    fixed = set(preset_fields(cam.method)) | {"layer", "attention"}
    return sorted(f for f in fixed if getattr(cam, f) is None)


def require_resolved(cam: CamConfig, where: str) -> None:
    """Raise ValueError unless ``cam`` is resolved: the array-level functions take the config that
    :func:`resolve` made once per explanation and do not fill defaults themselves."""
    missing = open_fields(cam)
    if missing:
        raise ValueError(f"{where} needs a resolved CamConfig (dcam_jax.cam.config.resolve(cam, model_config)); "
                         f"open fields: {missing}")


def refine_config(cam: CamConfig):
    """The RefineConfig of a CamConfig (its ``refine`` field, or the method's preset)."""
    r = cam.refine
    if r is None:
        r = preset_fields(cam.method).get("refine", "none")
    return rf.refine_preset(r) if isinstance(r, str) else r
