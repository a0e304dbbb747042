"""Frozen configuration dataclasses for the dMLLM backbones, with presets and a JSON round trip.

Three levels:

- :class:`LMConfig`: the LLaDA masked-diffusion language model (LLaMA-style blocks, no causal mask).
- :class:`VisionConfig`: the SigLIP vision tower *as used* by the dMLLMs (the last of the 27 layers already
  dropped, no pooling head, no post-layernorm).
- :class:`MLLMConfig`: the multimodal model: LM + tower + ``mlp2x_gelu`` projector + image layout rules.

Configs are hashable, so they can be passed to ``jax.jit`` as static arguments. Presets:
``llada_8b`` (LM only), ``lavida``, ``llada_v`` (full multimodal), and small ``tiny_*`` presets for tests.

One concept in one module (over 400 lines on purpose): the three levels nest, the presets combine them, and the
JSON round trip has to see all of them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

# Special token ids shared by LLaDA-8B, LaViDa and LLaDA-V (reference/backbones.md section 1.1).
LLADA_MASK_ID = 126336
LLADA_EOS_ID = 126081
LLADA_BOS_ID = 126080
LLADA_EOT_ID = 126348
LLADA_START_HEADER_ID = 126346
LLADA_END_HEADER_ID = 126347
IMAGE_TOKEN_INDEX = -200

LLADA_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)

_DTYPES = ("float32", "bfloat16", "float16")
_ASPECT_MODES = ("anyres", "anyres_max_4", "pad", "square")


class ConfigError(ValueError):
    """A configuration is missing fields, has unknown fields, or holds inconsistent values."""


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """LLaDA language model hyper-parameters.

    Attributes:
      vocab_size: rows of the embedding and of the (untied) head.
      d_model: residual width D.
      n_layers: number of blocks N.
      n_heads: query heads H.
      n_kv_heads: key/value heads (== n_heads for LLaDA-8B; fewer for grouped-query attention).
      head_dim: per-head width (d_model // n_heads for LLaDA-8B).
      mlp_hidden: SwiGLU hidden width F.
      rms_eps: RMSNorm epsilon (normalisation computed in float32).
      rope_theta: RoPE base; half-split ("NeoX") rotation in float32.
      max_seq_len: longest sequence the model accepts (prompt + answer).
      mask_id, eos_id, pad_id, bos_id, eot_id: special token ids.
      dtype: compute dtype ("float32" | "bfloat16" | "float16"); norms, RoPE and softmax run in float32.
      remat: rematerialise each block in the backward pass (saves memory for CAM at long sequences).
    """

    vocab_size: int = 126464
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    mlp_hidden: int = 12288
    rms_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_seq_len: int = 8192
    mask_id: int = LLADA_MASK_ID
    eos_id: int = LLADA_EOS_ID
    pad_id: int = LLADA_EOS_ID
    bos_id: int = LLADA_BOS_ID
    eot_id: int = LLADA_EOT_ID
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        _check_positive(self, ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                               "mlp_hidden", "max_seq_len"))
        _check_positive_float(self, ("rms_eps", "rope_theta"))
        _check_flag(self, "remat")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"LMConfig: n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"LMConfig: head_dim={self.head_dim} must be even for RoPE")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"LMConfig: dtype={self.dtype!r}, expected one of {_DTYPES}")
        for name in ("mask_id", "eos_id", "pad_id", "bos_id", "eot_id"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < self.vocab_size:
                raise ConfigError(f"LMConfig: {name}={v!r} must be an int id inside the vocabulary [0, {self.vocab_size})")

    @property
    def num_params(self) -> int:
        """Exact parameter count of the LM (embedding, blocks, final norm, head)."""
        D, F = self.d_model, self.mlp_hidden
        q = D * self.n_heads * self.head_dim
        kv = 2 * D * self.n_kv_heads * self.head_dim
        o = self.n_heads * self.head_dim * D
        block = q + kv + o + 3 * D * F + 2 * D
        return 2 * self.vocab_size * D + self.n_layers * block + D


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower as used by the dMLLM (pre-LN ViT, learned position embedding, no CLS).

    Attributes:
      image_size: side of one square view in pixels (384 for so400m/14).
      patch_size: patch side in pixels (14).
      width: token width (1152).
      depth: number of encoder layers actually run (26 = 27 minus the dropped last layer).
      num_heads: attention heads (16).
      mlp_dim: MLP hidden width (4304).
      ln_eps: LayerNorm epsilon (1e-6).
      image_mean, image_std: per-channel normalisation after scaling pixels to [0, 1] (0.5, 0.5).
      dtype: compute dtype.
    """

    image_size: int = 384
    patch_size: int = 14
    width: int = 1152
    depth: int = 26
    num_heads: int = 16
    mlp_dim: int = 4304
    ln_eps: float = 1e-6
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    dtype: str = "float32"

    def __post_init__(self):
        _check_positive(self, ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim"))
        _check_positive_float(self, ("ln_eps",))
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if (not isinstance(v, (tuple, list)) or len(v) != 3
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
                raise ConfigError(f"VisionConfig: {name}={v!r} must be three finite numbers")
        if not all(x > 0 for x in self.image_std):
            raise ConfigError(f"VisionConfig: image_std={self.image_std!r} must be positive")
        if self.image_size < self.patch_size:
            raise ConfigError(f"VisionConfig: image_size={self.image_size} is smaller than patch_size={self.patch_size}")
        if self.width % self.num_heads:
            raise ConfigError(f"VisionConfig: width={self.width} is not divisible by num_heads={self.num_heads}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"VisionConfig: dtype={self.dtype!r}, expected one of {_DTYPES}")
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))

    @property
    def grid(self) -> int:
        """Patches per side of one view (27 for 384/14: a 'valid' stride-p convolution ignores the last 6 pixels)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_params(self) -> int:
        """Exact parameter count of the tower as used (no post-layernorm, no head)."""
        W, M = self.width, self.mlp_dim
        embed = self.patch_size * self.patch_size * 3 * W + W + self.num_patches * W
        layer = 4 * (W * W + W) + 2 * 2 * W + (W * M + M) + (M * W + W)
        return embed + self.depth * layer


@dataclasses.dataclass(frozen=True)
class MLLMConfig:
    """The multimodal dMLLM: LM + vision tower + projector + image layout rules.

    Attributes:
      name: preset or model name (informational).
      lm, vision: the two backbones.
      image_aspect_ratio: "anyres" (LaViDa: base view + pinpoint grid), "anyres_max_4" (LLaDA-V: grids up to 6x6,
        the high-res map capped near 4 crops of tokens), "pad" (one view, padded to a square with the mean
        colour) or "square" (one view, squashed).
      grid_pinpoints: candidate (width, height) resolutions in pixels for the any-resolution grid.
      pool_size: if set, each view's projected feature grid is resized bilinearly (no antialias) to this side
        after the projector (LaViDa: 27 -> 14). None keeps the tower grid (LLaDA-V).
      anyres_max_crops: for "anyres_max_4", the token cap in units of one view's tokens (4).
      default_prompt: the prompt used when the user gives none (the toy model stores its training prompt here).
      system_prompt: system message of the chat template (None: no system turn).
      chat_template: "llada" (LLaMA-3 style headers) or "plain" (toy: "<image>\\n{prompt}\\n" without headers).
      has_post_layernorm: whether the converted checkpoint stored the (unused) vision post-layernorm.
      attention: the model's native attention over [prompt | answer]: "full" (LLaDA-V) or "prefix_lm" (LaViDa's
        Prefix-DLM: prompt queries see only the prompt). Sampling and explanations use it unless told otherwise.
      sampling_defaults: (name, value) pairs overriding dcam_jax.SamplingConfig's defaults for this model, e.g.
        (("gen_length", 64), ("steps", 32), ("schedule", "shift")) for LaViDa.
      cam_layer: the hooked LM block L of the gradient explanation methods for this model, chosen on ground truth
        by the protocol of SPEC 4.6 (docs/explanation_quality.md); None: n_layers // 3 (block 10 of 32).
    """

    lm: LMConfig = dataclasses.field(default_factory=LMConfig)
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    name: str = "custom"
    image_aspect_ratio: str = "anyres"
    grid_pinpoints: tuple[tuple[int, int], ...] = ((384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152))
    pool_size: int | None = 14
    anyres_max_crops: int = 4
    default_prompt: str | None = None
    system_prompt: str | None = LLADA_SYSTEM_PROMPT
    chat_template: str = "llada"
    has_post_layernorm: bool = False
    attention: str = "full"
    sampling_defaults: tuple[tuple[str, Any], ...] = ()
    cam_layer: int | None = None

    def __post_init__(self):
        if self.image_aspect_ratio not in _ASPECT_MODES:
            raise ConfigError(
                f"MLLMConfig: image_aspect_ratio={self.image_aspect_ratio!r}, expected one of {_ASPECT_MODES}")
        pins = tuple(tuple(int(v) for v in p) for p in self.grid_pinpoints)
        for p in pins:
            if len(p) != 2 or p[0] % self.vision.image_size or p[1] % self.vision.image_size or min(p) <= 0:
                raise ConfigError(
                    f"MLLMConfig: grid pinpoint {p} must be a positive (width, height) multiple of the view size "
                    f"{self.vision.image_size}")
        if self.image_aspect_ratio.startswith("anyres") and not pins:
            raise ConfigError("MLLMConfig: any-resolution layouts need at least one grid pinpoint")
        object.__setattr__(self, "grid_pinpoints", pins)
        if self.pool_size is not None and not 0 < self.pool_size <= self.vision.grid:
            raise ConfigError(f"MLLMConfig: pool_size={self.pool_size} must be in [1, {self.vision.grid}]")
        items = self.sampling_defaults.items() if isinstance(self.sampling_defaults, Mapping) \
            else self.sampling_defaults
        pairs = tuple((str(k), tuple(v) if isinstance(v, list) else v) for k, v in items)  # hashable
        object.__setattr__(self, "sampling_defaults", pairs)
        if self.attention not in ("full", "prefix_lm"):
            raise ConfigError(f"MLLMConfig: attention={self.attention!r}, expected 'full' or 'prefix_lm'")
        if self.chat_template not in ("llada", "plain"):
            raise ConfigError(f"MLLMConfig: chat_template={self.chat_template!r}, expected 'llada' or 'plain'")
        if self.cam_layer is not None and (isinstance(self.cam_layer, bool) or not isinstance(self.cam_layer, int)
                                           or not 0 <= self.cam_layer < self.lm.n_layers):
            raise ConfigError(f"MLLMConfig: cam_layer={self.cam_layer!r} must be None or a block index in "
                              f"[0, {self.lm.n_layers - 1}]")

    @property
    def tokens_per_view_side(self) -> int:
        """Side u of one view's token grid after optional pooling (14 for LaViDa, 27 for LLaDA-V)."""
        return self.pool_size if self.pool_size is not None else self.vision.grid

    @property
    def projector_params(self) -> int:
        D, W = self.lm.d_model, self.vision.width
        return W * D + D + D * D + D

    @property
    def num_params(self) -> int:
        """Exact total parameter count (LM + tower + projector + image_newline [+ post-layernorm])."""
        post_ln = 2 * self.vision.width if self.has_post_layernorm else 0
        return self.lm.num_params + self.vision.num_params + post_ln + self.projector_params + self.lm.d_model

    def replace(self, **changes) -> "MLLMConfig":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------------------
# JSON round trip


def to_dict(config) -> dict[str, Any]:
    """Nested plain-Python dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def to_json(config, indent: int = 2) -> str:
    kind = {LMConfig: "lm", VisionConfig: "vision", MLLMConfig: "mllm"}[type(config)]
    return json.dumps({"kind": kind, "config": to_dict(config)}, indent=indent, sort_keys=True)


def _build(cls, data: Mapping[str, Any], where: str):
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known fields are {sorted(fields)}")
    missing = sorted(n for n, f in fields.items() if n not in data)
    if missing:
        raise ConfigError(f"{where}: missing field(s) {missing}. A config.json written by dcam_jax has all fields; "
                          "was this file written by another tool?")
    kwargs = dict(data)
    if cls is MLLMConfig:
        kwargs["lm"] = _build(LMConfig, data["lm"], f"{where}.lm")
        kwargs["vision"] = _build(VisionConfig, data["vision"], f"{where}.vision")
        kwargs["grid_pinpoints"] = tuple(tuple(p) for p in data["grid_pinpoints"])
        kwargs["sampling_defaults"] = tuple((k, v) for k, v in data["sampling_defaults"])
    if cls is VisionConfig:
        kwargs["image_mean"] = tuple(data["image_mean"])
        kwargs["image_std"] = tuple(data["image_std"])
    return cls(**kwargs)


def from_json(text: str):
    """Inverse of :func:`to_json`. Raises :class:`ConfigError` on missing or unknown fields."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config JSON does not parse: {e}") from None
    if not isinstance(obj, dict) or "kind" not in obj or "config" not in obj:
        raise ConfigError("config JSON must be an object with keys 'kind' and 'config' (written by dcam_jax)")
    cls = {"lm": LMConfig, "vision": VisionConfig, "mllm": MLLMConfig}.get(obj["kind"])
    if cls is None:
        raise ConfigError(f"config JSON: unknown kind {obj['kind']!r}, expected 'lm', 'vision' or 'mllm'")
    return _build(cls, obj["config"], f"config({obj['kind']})")


def parse_assignments(items) -> dict[str, Any]:
    """["vision.num_heads=4", ...] -> {"vision.num_heads": 4}; values parsed as JSON when they parse."""
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like KEY=VALUE, e.g. vision.num_heads=4")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def assign_dotted(data: dict[str, Any], assignments: Mapping[str, Any]) -> None:
    """Set dotted keys (``vision.num_heads``) of a nested config dict in place; unknown keys raise ConfigError."""
    for key, value in assignments.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section of the config")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"override {key!r}: unknown field {parts[-1]!r}; known: {sorted(node)}")
        node[parts[-1]] = value


def override(config, assignments: Mapping[str, Any] | list[str]):
    """Return a copy of ``config`` with dotted ``KEY=VALUE`` overrides (e.g. ``vision.num_heads=4``).

    ``assignments``: a list of "KEY=VALUE" strings (values parsed as JSON when possible) or a mapping.
    """
    if not isinstance(assignments, Mapping):
        assignments = parse_assignments(assignments)
    data = to_dict(config)
    assign_dotted(data, assignments)
    kind = {LMConfig: "lm", VisionConfig: "vision", MLLMConfig: "mllm"}[type(config)]
    return from_json(json.dumps({"kind": kind, "config": data}))


def _check_positive(cfg, names):
    for n in names:
        v = getattr(cfg, n)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{type(cfg).__name__}: {n}={v!r} must be a positive integer")


def _check_positive_float(cfg, names):
    """Finite, positive real numbers (ints accepted and stored as float)."""
    for n in names:
        v = getattr(cfg, n)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{type(cfg).__name__}: {n}={v!r} must be a finite positive number")
        object.__setattr__(cfg, n, float(v))


def _check_flag(cfg, name):
    if not isinstance(getattr(cfg, name), bool):
        raise ConfigError(f"{type(cfg).__name__}: {name}={getattr(cfg, name)!r} must be true or false")


# ----------------------------------------------------------------------------------------------------------
# Presets


def llada_8b(dtype: str = "bfloat16") -> LMConfig:
    """LLaDA-8B-Instruct language model (also the LM of LaViDa and LLaDA-V)."""
    return LMConfig(dtype=dtype)


def lavida(dtype: str = "bfloat16") -> MLLMConfig:
    """LaViDa (lavida-llada-v1.0-instruct): SigLIP v1 so400m, 5 pinpoints, bilinear 27 -> 14 pooling."""
    return MLLMConfig(
        lm=LMConfig(dtype=dtype), vision=VisionConfig(dtype=dtype), name="lavida",
        image_aspect_ratio="anyres",
        grid_pinpoints=((384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152)),
        pool_size=14, default_prompt="Describe this image in one sentence.", attention="prefix_lm",
        sampling_defaults=(("gen_length", 64), ("block_length", 64), ("steps", 32), ("schedule", "shift"),
                           ("shift", 3.0)))


def llada_v(dtype: str = "bfloat16") -> MLLMConfig:
    """LLaDA-V: SigLIP2 so400m (same architecture), 1x1..6x6 grids, high-res map capped near 4 crops."""
    pins = tuple((i * 384, j * 384) for i in range(1, 7) for j in range(1, 7))
    return MLLMConfig(
        lm=LMConfig(dtype=dtype), vision=VisionConfig(dtype=dtype), name="llada_v",
        image_aspect_ratio="anyres_max_4", grid_pinpoints=pins, pool_size=None,
        default_prompt="Describe this image in one sentence.",
        sampling_defaults=(("gen_length", 128), ("block_length", 128), ("steps", 128),
                           ("suppress_ids", (LLADA_EOS_ID, LLADA_BOS_ID, LLADA_START_HEADER_ID, LLADA_END_HEADER_ID))))


def tiny_lm(**kw) -> LMConfig:
    """A few-thousand-parameter LM for tests (grouped-query attention off by default)."""
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8, mlp_hidden=48,
                max_seq_len=512, mask_id=63, eos_id=62, pad_id=62, bos_id=61, eot_id=60, rope_theta=10000.0)
    base.update(kw)
    return LMConfig(**base)


def tiny_vision(**kw) -> VisionConfig:
    base = dict(image_size=28, patch_size=7, width=24, depth=2, num_heads=2, mlp_dim=40)
    base.update(kw)
    return VisionConfig(**base)


def tiny_mllm(**kw) -> MLLMConfig:
    """A LaViDa-shaped tiny model: 28 px views, 4x4 patches per view pooled to 3x3, 5 pinpoints."""
    base = dict(lm=tiny_lm(), vision=tiny_vision(), name="tiny", image_aspect_ratio="anyres",
                grid_pinpoints=((28, 56), (56, 28), (56, 56), (84, 28), (28, 84)), pool_size=3,
                system_prompt=None, chat_template="plain", default_prompt="describe the image")
    base.update(kw)
    return MLLMConfig(**base)


PRESETS = {"llada_8b": llada_8b, "lavida": lavida, "llada_v": llada_v,
           "tiny_lm": tiny_lm, "tiny_vision": tiny_vision, "tiny_mllm": tiny_mllm}


def get_preset(name: str, **kw):
    """Look up a preset by name (``llada_8b``, ``lavida``, ``llada_v``, ``tiny_lm``, ``tiny_vision``, ``tiny_mllm``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name](**kw)
