"""The registry of explanation methods: a name -> its preset, its raw-map function and its post-processing.

Adding a method is one :func:`register` call (as adding a CAM in pytorch-grad-cam is one small class)::

    methods.register(methods.Method(
        name="my_cam",
        preset=dict(methods.GRAD_BASE, probe="decision", grad_rule="conservative", aggregation="layercam"),
    ))                                       # a gradient CAM: the shared gradient raw maps and refinement
    dj.explain(model, image, config=dj.CamConfig(method="my_cam"))

A method with its own maps passes ``raw_maps=`` (a function of :class:`MapsRequest`) and, if its maps need more
than the refinement chain, ``finish=`` (a function of :class:`FinishRequest`). ``dcam_jax.api`` calls only these
two functions, whatever the method.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dcam_jax.cam import baselines
from dcam_jax.cam import config as cam_config
from dcam_jax.cam import explain as ex
from dcam_jax.cam import refine as rf


@dataclasses.dataclass(frozen=True)
class MapsRequest:
    """What a raw-map function gets: a resolved CamConfig and the prepared arrays of one answer.

    params, config: the model. cam: the resolved CamConfig. prompt_embeds: [P, D]. layout: the ImageLayout.
    answer: [G] answer ids. targets: [N] answer positions to map. commit_step: [G] or None (a given answer).
    answer_valid: [G] bool. key: a PRNG key (noise probes). view: the explained view.
    """

    params: Any
    config: Any
    cam: Any
    prompt_embeds: jax.Array
    layout: Any
    answer: np.ndarray
    targets: Sequence[int]
    commit_step: np.ndarray | None
    answer_valid: np.ndarray
    key: jax.Array | None
    view: str


@dataclasses.dataclass(frozen=True)
class FinishRequest:
    """What a post-processing function gets: the word-level maps and what they came from.

    raw: [T, H, W] raw maps (sub-token maps averaged per word). normalized: the same, min-max normalised.
    aux: whatever the raw-map function returned third. labels: [(word, positions)]. index: {answer position:
    row of the raw-map function's output}. answer: [G] ids. answer_valid: [G] bool. num_steps: denoising steps.
    image_long_side: the input image's long side in pixels. cam: the resolved CamConfig.
    """

    raw: np.ndarray
    normalized: np.ndarray
    aux: Any
    labels: Sequence[tuple[str, tuple[int, ...]]]
    index: Mapping[int, int]
    answer: np.ndarray
    answer_valid: np.ndarray
    num_steps: int
    image_long_side: int
    cam: Any


def gradient_raw_maps(r: MapsRequest):
    """Gradient CAM raw maps at the resolved layer, probe, gradient rule and aggregation -> (maps [N, H, W],
    scores [N], None)."""
    maps, scores = ex.raw_token_maps(r.params, r.config, r.cam, r.prompt_embeds, r.layout, r.answer, r.targets,
                                     commit_step=r.commit_step, answer_valid=r.answer_valid, key=r.key)
    return np.asarray(maps), np.asarray(scores), None


def refine_chain(f: FinishRequest) -> np.ndarray:
    """The refinement chain the CamConfig names (its ``refine`` field or the method's preset) -> [T, H, W]."""
    return np.asarray(rf.refine(f.normalized, cam_config.refine_config(f.cam), token_ids=f.answer,
                                valid=f.answer_valid,
                                num_steps=f.num_steps, image_long_side=f.image_long_side))


def tam_raw_maps(r: MapsRequest):
    """TAM's gradient-free class-logit maps -> (maps [N, H, W], scores [N] (each map's maximum), text scores
    [N, G] for its causal-inference step)."""
    maps, text = ex.tam_raw_maps(r.params, r.config, r.prompt_embeds, r.layout, r.answer, r.targets, r.view,
                                 r.cam.attention)
    maps = np.asarray(maps)
    return maps, maps.reshape(maps.shape[0], -1).max(-1), np.asarray(text)


def tam_finish(f: FinishRequest) -> np.ndarray:
    """TAM's estimated causal inference over the answer's earlier tokens and its rank Gaussian filter."""
    ids = np.asarray([f.answer[ps[0]] for _, ps in f.labels])
    w = f.aux  # [N, G]: class of target j at answer position i
    weights = np.stack([w[f.index[ps[0]], [ps2[0] for _, ps2 in f.labels]] for _, ps in f.labels])
    return np.asarray(baselines.tam_postprocess(jnp.asarray(f.raw), jnp.asarray(ids), jnp.asarray(weights)))


@dataclasses.dataclass(frozen=True)
class Method:
    """One explanation method.

    name: what ``CamConfig(method=...)`` calls it. preset: the CamConfig fields it fixes (user-set fields win).
    raw_maps: MapsRequest -> (maps [N, H, W], scores [N], aux). finish: FinishRequest -> maps [T, H, W].
    layer: the default hooked block, "cam_layer" (the model's chosen block, else n_layers // 3) or "last".
    has_states: whether its maps come from probe states (the trajectory view needs them).
    """

    name: str
    preset: Mapping[str, Any]
    raw_maps: Callable[[MapsRequest], tuple] = gradient_raw_maps
    finish: Callable[[FinishRequest], np.ndarray] = refine_chain
    layer: str = "cam_layer"
    has_states: bool = True

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"method name {self.name!r} must be an identifier (letters, digits, underscores)")
        if self.layer not in ("cam_layer", "last"):
            raise ValueError(f"Method.layer={self.layer!r}; expected 'cam_layer' or 'last'")
        fields = {f.name for f in dataclasses.fields(cam_config.CamConfig)} - {"method"}
        unknown = sorted(set(self.preset) - fields)
        if unknown:
            raise ValueError(f"method {self.name!r}: preset fields {unknown} are not CamConfig fields")
        object.__setattr__(self, "preset", dict(self.preset))


# the table dcam_jax.cam.config reads (CamConfig validates its method name against it)
REGISTRY: dict[str, Method] = cam_config.REGISTRY


def register(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (``replace=True`` to redefine an existing name). Returns it."""
    if not isinstance(method, Method):
        raise TypeError(f"register() takes a Method, got {type(method).__name__}")
    if method.name in REGISTRY and not replace:
        raise ValueError(f"a method named {method.name!r} is already registered; pass replace=True to redefine it")
    REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method from the registry (built-in ones included)."""
    get(name)
    del REGISTRY[name]


names = cam_config.method_names  # the registered method names, in registration order
get = cam_config.get_method  # the registered Method called ``name``; an unknown name raises, listing the known ones


# ----------------------------------------------------------------------------------------------------------
# the built-in methods

# the fields every gradient preset fixes unless it says otherwise
GRAD_BASE = dict(score="logprob", contrast="none", grad_relu=False, hook="residual", refine="none",
                 grad_rule="standard")

for _m in (
    # SPEC 4.3: the default, chosen on ShapesWorld validation by the protocol of SPEC 4.6
    Method("diffusion_cam", dict(GRAD_BASE, probe="decision", grad_rule="conservative", aggregation="gxa",
                                 refine="default")),
    # the paper's formulas as written: plain gradients, channel-weighted Grad-CAM, the whole module chain
    Method("paper", dict(GRAD_BASE, probe="decision", aggregation="gradcam", refine="full")),
    # the authors' released code (SPEC 4.5)
    Method("reference_compat", dict(GRAD_BASE, probe="clean", score="vocab_sum", contrast="previous",
                                    aggregation="channel_relu_mean", grad_relu=True, refine="reference_compat")),
    Method("gradcam", dict(GRAD_BASE, probe="final", attention="prefix_lm", score="max_logit",
                           aggregation="channel_relu_mean")),
    Method("llava_cam", dict(GRAD_BASE, probe="clean", score="sum_logits", aggregation="gradcam", grad_relu=True,
                             hook="post_attn_norm", threshold=0.5)),
    # TAM is gradient-free: score, aggregation and hook do not apply (filled only so the config is complete)
    Method("tam", dict(GRAD_BASE, probe="clean", score="logit", aggregation="gradcam"), raw_maps=tam_raw_maps,
           finish=tam_finish, layer="last", has_states=False),
    Method("layercam", dict(GRAD_BASE, probe="decision", aggregation="layercam")),
    Method("gradcam_pp", dict(GRAD_BASE, probe="decision", aggregation="gradcam_pp")),
    Method("hirescam", dict(GRAD_BASE, probe="decision", aggregation="gxa")),
):
    register(_m)
del _m
