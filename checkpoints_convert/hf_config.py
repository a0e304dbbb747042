"""The dcam_jax config of a Hugging Face checkpoint: overrides, the HF ``config.json``, the tensor shapes, presets.

Values come, in order of precedence, from ``--override``, the HF ``config.json``, the tensor shapes, and the
architecture's preset; every choice is logged with its source and kept as a "field=value (source)" line. The
vision tower's config is not stored in LLaVA-style checkpoints: width, depth, patch, image size and MLP width come
from the shapes, the number of heads and the LayerNorm epsilon from the preset.

:func:`infer_config` is the whole step; the rest are its parts.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Iterable

from checkpoints_convert import naming
from checkpoints_convert.errors import ConversionError
from checkpoints_convert.safetensors_reader import SafetensorsCheckpoint
from dcam_jax.models import config as config_lib
from dcam_jax.models.config import ConfigError, LMConfig, MLLMConfig

log = logging.getLogger("checkpoints_convert")


# ----------------------------------------------------------------------------------------------------------
# overrides and the HF config


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """["vision.num_heads=4", ...] -> {"vision.num_heads": 4}; values parsed as JSON when they parse."""
    try:
        return config_lib.parse_assignments(items)
    except ConfigError as e:
        raise ConversionError(f"--{e}") from None


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """The parsed ``hf_dir/config.json`` (a JSON object), or {} when the directory has none."""
    f = hf_dir / "config.json"
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{f} must hold a JSON object")
    return data


def _hf_get(hf: dict, *keys):
    """First present, non-null value among ``keys`` of the HF config (dotted keys look into sub-objects)."""
    for k in keys:
        node = hf
        for part in k.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return node, k
    return None, None


def parse_pinpoints(value, view: int) -> tuple[tuple[int, int], ...]:
    """LLaVA ``image_grid_pinpoints`` -> ((width, height), ...) in pixels.

    Accepts a list of pairs, its Python-literal string form, or the range form "(1x1),...,(6x6)" that LLaVA
    expands to every grid (i, j) in the range, times the view size.
    """
    if isinstance(value, str):
        grids = re.findall(r"\((\d+)x(\d+)\)", value)
        if grids:
            (a0, b0), (a1, b1) = (tuple(map(int, grids[0])), tuple(map(int, grids[-1])))
            return tuple((i * view, j * view) for i in range(a0, a1 + 1) for j in range(b0, b1 + 1))
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ConversionError(f"image_grid_pinpoints {value!r} is neither a list of (width, height) pairs nor "
                                  "the '(1x1),...,(6x6)' range form") from None
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value)):
        raise ConversionError(f"image_grid_pinpoints {value!r} must be a non-empty list of (width, height) pairs")
    return tuple((int(p[0]), int(p[1])) for p in value)


class _Decider:
    """Records where each config value came from (override > HF config > tensor shapes > preset)."""

    def __init__(self, overrides: dict[str, Any], arch: str):
        self.overrides = overrides
        self.used: set[str] = set()
        self.arch = arch
        self.lines: list[str] = []

    def pick(self, key: str, *, hf=None, shape=None, preset=None, note: str = ""):
        """Choose a value for config field ``key`` (dotted). hf: (value, hf_key) or None."""
        if key in self.overrides:
            self.used.add(key)
            value, source = self.overrides[key], "--override"
        elif hf is not None and hf[0] is not None:
            value, source = hf[0], f"HF config.json {hf[1]}"
        elif shape is not None:
            value, source = shape, "tensor shapes"
        else:
            value, source = preset, f"preset {self.arch}"
        self.record(key, value, source + (f"; {note}" if note else ""))
        return value

    def record(self, key: str, value, source: str):
        line = f"{key}={value!r} ({source})"
        self.lines.append(line)
        log.info("config: %s", line)


# ----------------------------------------------------------------------------------------------------------
# inferring the config from the tensors


def _shape(ckpt: SafetensorsCheckpoint, name: str, dim: int | None = None):
    if name not in ckpt:
        return None
    s = ckpt.info(name).shape
    if dim is None:
        return s
    return s[dim] if len(s) > dim else None


def _infer_lm(ckpt, hf, dialect, prefix, dec: _Decider, preset: LMConfig, key_prefix: str) -> dict[str, Any]:
    names = ckpt.names()
    n = lambda path, i=None: naming.lm_name(dialect, prefix, path, i)  # noqa: E731
    indices = naming.lm_layer_indices(names, dialect, prefix)
    if not indices:
        raise ConversionError(f"found no transformer blocks ({n(('layers', 'q'), 0)} ...) in the checkpoint")
    shape_n_layers = max(indices) + 1
    embed = _shape(ckpt, n(("embed",)))
    shape_vocab, shape_d = (embed if embed is not None and len(embed) == 2 else (None, None))
    shape_f = _shape(ckpt, n(("layers", "gate"), 0), 0)
    q_out = _shape(ckpt, n(("layers", "q"), 0), 0)
    k_out = _shape(ckpt, n(("layers", "k"), 0), 0)
    K = key_prefix
    d: dict[str, Any] = {}
    # fields the tensors define; an HF config that disagrees means the files do not belong together
    shape_fields = (("vocab_size", shape_vocab, ()), ("d_model", shape_d, ("d_model", "hidden_size")),
                    ("n_layers", shape_n_layers, ("n_layers", "num_hidden_layers")),
                    ("mlp_hidden", shape_f, ("mlp_hidden_size", "intermediate_size")))
    for field, shape_value, hf_keys in shape_fields:
        hf_value, hf_key = _hf_get(hf, *hf_keys) if hf_keys else (None, None)
        if shape_value is not None and hf_value is not None and hf_value != shape_value:
            raise ConversionError(f"HF config.json says {hf_key}={hf_value} but the tensors say {field}="
                                  f"{shape_value}; the config.json does not belong to these weights")
        d[field] = dec.pick(K + field, shape=shape_value, preset=getattr(preset, field))
    d["n_heads"] = dec.pick(K + "n_heads", hf=_hf_get(hf, "n_heads", "num_attention_heads"), preset=preset.n_heads,
                            note="not stored in tensor shapes")
    heads = d["n_heads"]
    shape_head_dim = None
    if q_out is not None and isinstance(heads, int) and heads > 0:
        if q_out % heads:
            raise ConversionError(f"the query projection has {q_out} outputs, not a multiple of n_heads={heads}; "
                                  f"pass the right head count with --override={K}n_heads=N")
        shape_head_dim = q_out // heads
    d["head_dim"] = dec.pick(K + "head_dim", hf=_hf_get(hf, "head_dim"), shape=shape_head_dim, preset=preset.head_dim)
    shape_kv = (k_out // d["head_dim"] if k_out is not None and isinstance(d["head_dim"], int) and d["head_dim"] > 0
                and k_out % d["head_dim"] == 0 else None)
    d["n_kv_heads"] = dec.pick(K + "n_kv_heads", hf=_hf_get(hf, "n_kv_heads", "num_key_value_heads"), shape=shape_kv,
                               preset=preset.n_kv_heads)
    d["rms_eps"] = dec.pick(K + "rms_eps", hf=_hf_get(hf, "rms_norm_eps"), preset=preset.rms_eps)
    d["rope_theta"] = dec.pick(K + "rope_theta", hf=_hf_get(hf, "rope_theta", "rope_parameters.rope_theta"),
                               preset=preset.rope_theta)
    d["max_seq_len"] = dec.pick(K + "max_seq_len", hf=_hf_get(hf, "max_sequence_length", "max_position_embeddings"),
                                preset=preset.max_seq_len)
    vocab = d["vocab_size"]
    for field, hf_key in (("mask_id", "mask_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "pad_token_id"),
                          ("bos_id", "bos_token_id"), ("eot_id", None)):
        hf_value = _hf_get(hf, hf_key) if hf_key else (None, None)
        if hf_value[0] is not None and not (isinstance(hf_value[0], int) and 0 <= hf_value[0] < vocab):
            # LLaDA-V's config.json carries a stale LLaMA-3 bos_token_id (128000) outside the vocabulary
            log.info("config: ignoring HF config.json %s=%r (not a token id of this %d-token vocabulary)",
                     hf_key, hf_value[0], vocab)
            hf_value = (None, None)
        d[field] = dec.pick(K + field, hf=hf_value, preset=getattr(preset, field))
    return d


def _infer_vision(ckpt, dec: _Decider, preset) -> tuple[dict[str, Any], int]:
    """Vision config fields from the tensor shapes, and the number of layers the checkpoint holds."""
    V = naming.VISION
    v = preset.vision
    patch = _shape(ckpt, V + "embeddings.patch_embedding.weight")
    if patch is not None and (len(patch) != 4 or patch[1] != 3 or patch[2] != patch[3]):
        raise ConversionError(f"{V}embeddings.patch_embedding.weight has shape {list(patch)}; expected "
                              "[width, 3, patch, patch]")
    pos = _shape(ckpt, V + "embeddings.position_embedding.weight", 0)
    width = patch[0] if patch is not None else None
    psize = patch[2] if patch is not None else None
    image_size = None
    if pos is not None and psize is not None:
        g = math.isqrt(pos)
        if g * g != pos:
            raise ConversionError(f"the vision position embedding has {pos} rows, not a square grid of patches")
        image_size = g * psize
    mlp = _shape(ckpt, V + "encoder.layers.0.mlp.fc1.weight", 0)
    found = naming.vision_layer_indices(ckpt.names())
    n_found = max(found) + 1 if found else 0
    if not found:
        raise ConversionError(f"arch={dec.arch} needs a vision tower, but the checkpoint has no encoder layers "
                              f"under {V}encoder.layers.N.*; for a language-model-only checkpoint use --arch=llada")
    d: dict[str, Any] = {}
    d["width"] = dec.pick("vision.width", shape=width, preset=v.width)
    d["patch_size"] = dec.pick("vision.patch_size", shape=psize, preset=v.patch_size)
    d["image_size"] = dec.pick("vision.image_size", shape=image_size, preset=v.image_size)
    d["mlp_dim"] = dec.pick("vision.mlp_dim", shape=mlp, preset=v.mlp_dim)
    # LLaVA's SigLipVisionTower deletes the last encoder layer at load time; the released checkpoints were saved
    # after that (26 layers), an untruncated tower (27, and still its pooling head) needs the drop done here.
    has_head = any(n.startswith(V + "head.") for n in ckpt.names())
    if "vision.depth" in dec.overrides:
        depth = dec.pick("vision.depth")
        if not isinstance(depth, int) or depth not in (n_found, n_found - 1):
            raise ConversionError(f"--override=vision.depth={depth!r}: the checkpoint holds {n_found} vision "
                                  f"layers, so depth must be {n_found} (keep all) or {n_found - 1} (drop the last)")
    elif has_head:
        depth = n_found - 1
        dec.record("vision.depth", depth, f"checkpoint holds {n_found} layers and the pooling head, i.e. an "
                   "untruncated SigLIP tower; LLaVA drops its last layer")
    elif n_found == v.depth + 1:
        depth = n_found - 1
        dec.record("vision.depth", depth, f"checkpoint holds {n_found} layers = preset {v.depth} + 1; LLaVA drops "
                   "the last one")
    elif n_found == v.depth:
        depth = n_found
        dec.record("vision.depth", depth, "checkpoint holds exactly the layers the preset runs (last one already "
                   "dropped)")
    else:
        raise ConversionError(
            f"the checkpoint holds {n_found} vision layers and no pooling head, and the preset runs {v.depth}: "
            f"cannot tell whether its last layer is already dropped. Pass --override=vision.depth={n_found - 1} "
            f"(an untruncated tower: drop the last layer, as LLaVA does) or --override=vision.depth={n_found}")
    d["depth"] = depth
    d["num_heads"] = dec.pick("vision.num_heads", preset=v.num_heads, note="not stored in tensor shapes")
    d["ln_eps"] = dec.pick("vision.ln_eps", preset=v.ln_eps, note="not stored in tensor shapes")
    return d, n_found


def _infer_mllm(hf, dec: _Decider, preset: MLLMConfig, arch: str, view: int, grid: int) -> dict[str, Any]:
    d: dict[str, Any] = {}
    merge, _ = _hf_get(hf, "mm_patch_merge_type")
    if merge is not None and merge != "spatial_unpad":
        raise ConversionError(f"HF config.json mm_patch_merge_type={merge!r}: dcam_jax implements only "
                              "'spatial_unpad' (LaViDa, LLaDA-V)")
    proj, _ = _hf_get(hf, "mm_projector_type")
    if proj is not None and proj != "mlp2x_gelu":
        raise ConversionError(f"HF config.json mm_projector_type={proj!r}: dcam_jax implements only 'mlp2x_gelu'")
    d["image_aspect_ratio"] = dec.pick("image_aspect_ratio", hf=_hf_get(hf, "image_aspect_ratio"),
                                       preset=preset.image_aspect_ratio)
    pins = _hf_get(hf, "image_grid_pinpoints")
    if pins[0] is not None:
        pins = (parse_pinpoints(pins[0], view), pins[1])
    d["grid_pinpoints"] = dec.pick("grid_pinpoints", hf=pins, preset=preset.grid_pinpoints)
    if arch == "lavida":
        # LaViDa pools every view after the projector (ALWASY_DO_2DPOOL in its llava_arch.py); its eval wrapper
        # forces bilinear mode with stride 2
        mode, _ = _hf_get(hf, "mm_spatial_pool_mode")
        if mode is not None and mode != "bilinear":
            log.info("config: HF config.json mm_spatial_pool_mode=%r, but LaViDa's evaluation forces 'bilinear'; "
                     "using bilinear", mode)
        stride, _ = _hf_get(hf, "mm_spatial_pool_stride")
        stride = stride if isinstance(stride, int) and stride > 0 else 2
        d["pool_size"] = dec.pick("pool_size", shape=math.ceil(grid / stride),
                                  note=f"LaViDa pools each {grid}x{grid} view bilinearly with stride {stride}")
    else:
        d["pool_size"] = dec.pick("pool_size", preset=preset.pool_size, note="no pooling of image views")
    return d


# ----------------------------------------------------------------------------------------------------------
# the whole step


@dataclasses.dataclass(frozen=True)
class InferredConfig:
    """The result of :func:`infer_config`.

    config: the validated dcam_jax config (LMConfig for arch=llada, else MLLMConfig).
    decisions: "field=value (source)" lines, in the order they were logged.
    vision_layers_found: the number of vision encoder layers the checkpoint holds (0 for arch=llada); the config
      runs ``config.vision.depth`` of them.
    """
    config: LMConfig | MLLMConfig
    decisions: list[str]
    vision_layers_found: int


def infer_config(ckpt: SafetensorsCheckpoint, hf: dict[str, Any], *, arch: str, dialect: str, prefix: str,
                 overrides: dict[str, Any], dtype: str, keep_post_layernorm: bool) -> InferredConfig:
    """Decide every field of the dcam_jax config of ``ckpt`` and validate it.

    hf: the HF config.json (:func:`read_hf_config`). arch: "lavida", "llada_v" or "llada" (not "auto").
    dialect, prefix: the LM naming from :func:`naming.detect_lm_dialect`. overrides: dotted key -> value
    (:func:`parse_overrides`); for arch=llada keys may omit "lm.". dtype: "bfloat16" or "float32", the compute dtype.
    Raises ConversionError naming the offending field and how to fix it.
    """
    if arch == "llada":
        # an LM-only config has no "lm." level; the decider sees every key with it, the config without it
        overrides = {"lm." + (k[3:] if k.startswith("lm.") else k): v for k, v in overrides.items()}
    dec = _Decider(overrides, arch)
    if arch == "llada":
        kind, n_found = "lm", 0
        data = _lm_only_data(ckpt, hf, dialect, prefix, dec, dtype)
    else:
        kind = "mllm"
        data, n_found = _mllm_data(ckpt, hf, arch, dialect, prefix, dec, dtype, keep_post_layernorm)
    # remaining overrides (fields nothing above decides) go straight into the config
    leftover = {k: v for k, v in dec.overrides.items() if k not in dec.used}
    _assign(data, leftover if kind == "mllm" else {k[3:]: v for k, v in leftover.items()}, kind)
    for k, v in leftover.items():
        dec.record(k, v, "--override")
    try:
        config = config_lib.from_json(json.dumps({"kind": kind, "config": data}))
    except ConfigError as e:
        raise ConversionError(f"the inferred config is invalid: {e}. Fix the offending value with "
                              "--override=KEY=VALUE (see the 'config:' log lines for where each value came from)"
                              ) from None
    return InferredConfig(config=config, decisions=dec.lines, vision_layers_found=n_found)


def _lm_only_data(ckpt, hf, dialect, prefix, dec: _Decider, dtype: str) -> dict[str, Any]:
    """The LMConfig fields (as a dict) of a language-model-only checkpoint."""
    preset = config_lib.llada_8b(dtype=dtype)
    data = config_lib.to_dict(preset)
    data.update(_infer_lm(ckpt, hf, dialect, prefix, dec, preset, "lm."))
    data["dtype"] = dec.pick("lm.dtype", preset=dtype, note="--dtype")
    return data


def _mllm_data(ckpt, hf, arch, dialect, prefix, dec: _Decider, dtype: str,
               keep_post_layernorm: bool) -> tuple[dict[str, Any], int]:
    """The MLLMConfig fields (as a nested dict) and the number of vision layers the checkpoint holds."""
    preset = (config_lib.lavida if arch == "lavida" else config_lib.llada_v)(dtype=dtype)
    data = config_lib.to_dict(preset)
    data["name"] = dec.pick("name", preset=arch)
    data["lm"].update(_infer_lm(ckpt, hf, dialect, prefix, dec, preset.lm, "lm."))
    data["lm"]["dtype"] = dec.pick("lm.dtype", preset=dtype, note="--dtype")
    vision, n_found = _infer_vision(ckpt, dec, preset)
    data["vision"].update(vision)
    data["vision"]["dtype"] = dec.pick("vision.dtype", preset=dtype, note="--dtype")
    view = vision["image_size"] if isinstance(vision["image_size"], int) else preset.vision.image_size
    psz = vision["patch_size"] if isinstance(vision["patch_size"], int) and vision["patch_size"] > 0 else 1
    data.update(_infer_mllm(hf, dec, preset, arch, view, view // psz))
    has_post = any(n.startswith(naming.VISION + "post_layernorm.") for n in ckpt.names())
    if keep_post_layernorm and not has_post:
        raise ConversionError("--keep_post_layernorm: the checkpoint has no vision post_layernorm to keep")
    data["has_post_layernorm"] = dec.pick("has_post_layernorm", shape=bool(keep_post_layernorm and has_post),
                                          note="--keep_post_layernorm")
    return data, n_found


def _assign(data: dict, assignments: dict[str, Any], kind: str) -> None:
    try:
        config_lib.assign_dotted(data, assignments)
    except ConfigError as e:
        raise ConversionError(f"--{e} (in the {kind} config)") from None
