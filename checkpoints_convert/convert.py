"""Convert a Hugging Face safetensors checkpoint of LLaDA-8B, LaViDa or LLaDA-V into a dcam_jax checkpoint.

:func:`convert` is the whole conversion as a Python function (the CLI in ``__main__`` only parses flags).

Steps:

1. Index the source tensors (``model.safetensors`` or an indexed set of shards); nothing is read yet.
2. Detect the naming dialect and the architecture from the tensor names (and the HF ``config.json``).
3. Build the dcam_jax config. Values come, in order of precedence, from ``--override``, the HF ``config.json``,
   the tensor shapes, and the architecture's preset; every choice is logged with its source. The vision tower's
   config is not stored in LLaVA-style checkpoints: width, depth, patch, image size and MLP width come from the
   shapes, the number of heads and the LayerNorm epsilon from the preset.
4. Plan every target parameter and its source tensors, and check strictly, before writing anything, that every
   source tensor is used exactly once or dropped on purpose (the last SigLIP layer when the checkpoint still
   holds it, the pooling head ``head.*``, the post-layernorm unless kept), that none is missing, and that every
   shape and dtype is as expected. Problems are reported together, by name.
5. Write: each target array is preallocated and filled one source tensor at a time (read in blocks of rows,
   transposed into place, cast to the output dtype), handed to the checkpoint writer, and dropped. Peak memory is
   about one target tensor plus one block, not the model. The checkpoint appears at ``out_dir`` only when
   complete; on any error nothing is left behind.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import ml_dtypes
import numpy as np
from tqdm import tqdm

from checkpoints_convert import naming
from checkpoints_convert.safetensors_reader import FLOAT_DTYPES, SafetensorsCheckpoint
from dcam_jax import checkpoint as ckpt_lib
from dcam_jax.models import config as config_lib
from dcam_jax.models.config import ConfigError, LMConfig, MLLMConfig

log = logging.getLogger("checkpoints_convert")

ARCHS = ("auto", "lavida", "llada_v", "llada")
DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
# Sources are read in row blocks of this size, so a 1 GB embedding never needs a second 1 GB buffer.
READ_BLOCK_BYTES = 16 * 1024 * 1024
# Small targets are grouped into one orbax write up to this size (each write has a fixed cost).
WRITE_BATCH_BYTES = 256 * 1024 * 1024


class ConversionError(ValueError):
    """The source checkpoint cannot be converted as asked (missing / unexpected / mis-shaped tensors, ...)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One dcam_jax parameter: its path, full shape, and source tensor(s) (one per layer if stacked)."""
    path: tuple[str, ...]
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    transform: str
    stacked: bool

    def source_shape(self) -> tuple[int, ...]:
        s = self.shape[1:] if self.stacked else self.shape
        if self.transform == naming.TRANSPOSE:
            return s[::-1]
        if self.transform == naming.CONV:  # ours [kh, kw, I, O] <- torch [O, I, kh, kw]
            return (s[3], s[2], s[0], s[1])
        return s


@dataclasses.dataclass
class ConversionReport:
    """What :func:`convert` did."""
    out_dir: Path
    arch: str
    dialect: str
    config: LMConfig | MLLMConfig
    dtype: str
    num_source_tensors: int
    consumed: list[str]
    dropped: dict[str, str]  # source name -> reason
    decisions: list[str]  # "field=value (source)" lines, as logged
    num_params: int
    seconds: float


# ----------------------------------------------------------------------------------------------------------
# overrides and the HF config


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """["vision.num_heads=4", ...] -> {"vision.num_heads": 4}; values parsed as JSON when they parse."""
    try:
        return config_lib.parse_assignments(items)
    except ConfigError as e:
        raise ConversionError(f"--{e}") from None


def _read_hf_config(hf_dir: Path) -> dict[str, Any]:
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
# inferring the config


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
# planning


def build_plan(config: LMConfig | MLLMConfig, dialect: str, prefix: str) -> list[Target]:
    """Every target parameter with its source names, from the config (shapes: dcam_jax.checkpoint.param_shapes)."""
    shapes = ckpt_lib.param_shapes(config)
    plan = []
    for path, shape in shapes.items():
        if path[0] == "lm":
            template, transform = naming.LM_NAMES[dialect][path[1:]]
            template = template.replace("{p}", prefix)
        elif path[0] == "vision":
            template, transform = naming.VISION_NAMES[path[1:]]
        else:
            template, transform = naming.OTHER_NAMES[path]
        stacked = "{i}" in template
        sources = tuple(template.format(i=i) for i in range(shape[0])) if stacked else (template,)
        plan.append(Target(path, shape, sources, transform, stacked))
    return plan


def _dropped(names: Sequence[str], depth: int, n_found: int, keep_post_ln: bool) -> dict[str, str]:
    V = naming.VISION
    out = {}
    for n in names:
        m = naming.VISION_LAYER_RE.match(n)
        if m and depth <= int(m.group(1)) < n_found:
            out[n] = f"vision layer {m.group(1)}: LLaVA's tower deletes the last SigLIP layer"
        elif n.startswith(V + "head."):
            out[n] = "SigLIP pooling head: replaced by identity in LLaVA's tower"
        elif n.startswith(V + "post_layernorm.") and not keep_post_ln:
            out[n] = "SigLIP post-layernorm: unused by the models (keep it with --keep_post_layernorm)"
    return out


def _check_plan(ckpt: SafetensorsCheckpoint, plan: list[Target], dropped: dict[str, str], dialect: str,
                arch: str) -> list[str]:
    present = set(ckpt.names())
    expected: dict[str, Target] = {}
    for t in plan:
        for s in t.sources:
            expected[s] = t
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected) - set(dropped))
    wrong_shape = sorted(f"{s}: {list(ckpt.info(s).shape)}, expected {list(t.source_shape())}"
                         for s, t in expected.items() if s in present and ckpt.info(s).shape != t.source_shape())
    wrong_dtype = sorted(f"{s}: {ckpt.info(s).dtype}" for s in expected if s in present
                         and ckpt.info(s).dtype not in FLOAT_DTYPES)
    if missing or unexpected or wrong_shape or wrong_dtype:
        lines = [f"cannot convert {ckpt.directory} as arch={arch} ({dialect}-style names):"]
        for title, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                             ("tensors with the wrong shape", wrong_shape),
                             ("tensors that are not floating point", wrong_dtype)):
            if items:
                shown = items[:40]
                more = f" ... and {len(items) - 40} more" if len(items) > 40 else ""
                lines.append(f"  {len(items)} {title}: " + ", ".join(shown) + more)
        if unexpected and arch == "llada" and naming.has_multimodal_parts(unexpected):
            lines.append("  (the checkpoint has a vision tower / projector: use --arch=auto, lavida or llada_v)")
        if wrong_shape:
            lines.append("  (shape-free settings such as head counts come from the HF config.json or the preset; "
                         "fix them with --override, e.g. --override=vision.num_heads=16)")
        raise ConversionError("\n".join(lines))
    return sorted(expected)


# ----------------------------------------------------------------------------------------------------------
# copying


def _fill(dst: np.ndarray, ckpt: SafetensorsCheckpoint, name: str, transform: str) -> None:
    """Copy source tensor ``name`` into ``dst`` (its target slot), transforming and casting on the way."""
    if transform == naming.CONV:
        dst[...] = ckpt.read(name).transpose(2, 3, 1, 0)
        return
    for r0, rows in ckpt.iter_rows(name, READ_BLOCK_BYTES):
        if transform == naming.COPY:
            if rows.ndim >= 2:
                dst[r0:r0 + rows.shape[0]] = rows
            else:
                dst[...] = rows
        else:  # torch [out, in] rows r0.. -> our columns r0..
            if rows.dtype != dst.dtype:
                rows = rows.astype(dst.dtype)  # cast while contiguous, then the strided copy moves native items
            # sub-blocks keep both sides of the strided copy in cache (about 3x faster for large matrices)
            for j in range(0, rows.shape[0], 256):
                blk = rows[j:j + 256]
                dst[:, r0 + j:r0 + j + blk.shape[0]] = blk.T
        del rows


def _flush(writer: ckpt_lib.CheckpointWriter, batch: dict) -> None:
    if batch:
        writer.add(ckpt_lib.unflatten(batch))
        batch.clear()


# ----------------------------------------------------------------------------------------------------------
# the conversion


def convert(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, arch: str = "auto", dtype: str = "bfloat16",
            overrides: Sequence[str] = (), force: bool = False, keep_post_layernorm: bool = False,
            progress: bool = True) -> ConversionReport:
    """Convert the Hugging Face checkpoint in ``hf_dir`` into a dcam_jax checkpoint at ``out_dir``.

    arch: "auto" (from the tensor names), "lavida", "llada_v" (multimodal) or "llada" (LM only).
    dtype: "bfloat16" or "float32", the stored parameter dtype (and the config's compute dtype).
    overrides: "KEY=VALUE" config assignments, e.g. "vision.num_heads=4" or "lm.rope_theta=10000" (for
      arch=llada keys may omit "lm."). They take precedence over everything else.
    force: replace an existing checkpoint at ``out_dir`` once the new one is complete.
    keep_post_layernorm: store the (unused) SigLIP post-layernorm as vision/post_ln (has_post_layernorm=True).
    progress: show a tqdm bar over source tensors.
    Raises ConversionError / SafetensorsError / FileExistsError with messages that name the problem; on any error
    ``out_dir`` is left as it was and no temporary directory remains.
    """
    t0 = time.time()
    if arch not in ARCHS:
        raise ConversionError(f"arch={arch!r}; expected one of {ARCHS}")
    if dtype not in DTYPES:
        raise ConversionError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)}")
    hf_dir, out_dir = Path(hf_dir).expanduser(), Path(out_dir).expanduser()
    ckpt_lib.check_destination(out_dir, force)
    over = parse_overrides(overrides)
    ckpt = SafetensorsCheckpoint.open(hf_dir)
    names = ckpt.names()
    log.info("source: %s, %d tensors in %d file(s)", hf_dir, len(names), len(ckpt.files))
    hf = _read_hf_config(hf_dir)
    if hf:
        log.info("source: HF config.json model_type=%r, architectures=%r", hf.get("model_type"),
                 hf.get("architectures"))

    dialect, prefix, problems = naming.detect_lm_dialect(names)
    if problems:
        raise ConversionError(f"{hf_dir}: unknown architecture: " + "; ".join(problems))
    if dialect is None:
        raise ConversionError(
            f"{hf_dir}: unknown architecture: found no LLaDA language-model tensors (expected "
            f"'model.transformer.wte.weight' and 'model.transformer.blocks.N.*' (LLaDA-8B, LaViDa) or "
            f"'model.embed_tokens.weight' and 'model.layers.N.*' (LLaDA-V)). First tensor names: {names[:8]}")
    multimodal = naming.has_multimodal_parts(names)
    if arch == "auto":
        arch = ("lavida" if dialect == "olmo" else "llada_v") if multimodal else "llada"
        log.info("arch: %s (from the tensor names: %s-style LM names%s)", arch, dialect,
                 ", vision tower and projector present" if multimodal else ", no vision tower")
    else:
        log.info("arch: %s (as requested); LM names are %s-style", arch, dialect)

    dec = _Decider(over, arch)
    out_dt = dtype
    if arch == "llada":
        over = {(k[3:] if k.startswith("lm.") else k): v for k, v in over.items()}
        dec.overrides = {"lm." + k: v for k, v in over.items()}
        preset = config_lib.llada_8b(dtype=out_dt)
        data = config_lib.to_dict(preset)
        data.update(_infer_lm(ckpt, hf, dialect, prefix, dec, preset, "lm."))
        data["dtype"] = dec.pick("lm.dtype", preset=out_dt, note="--dtype")
        n_found_v, depth_v = 0, 0
        kind = "lm"
    else:
        preset = (config_lib.lavida if arch == "lavida" else config_lib.llada_v)(dtype=out_dt)
        data = config_lib.to_dict(preset)
        data["name"] = dec.pick("name", preset=arch)
        data["lm"].update(_infer_lm(ckpt, hf, dialect, prefix, dec, preset.lm, "lm."))
        data["lm"]["dtype"] = dec.pick("lm.dtype", preset=out_dt, note="--dtype")
        vision, n_found_v = _infer_vision(ckpt, dec, preset)
        data["vision"].update(vision)
        data["vision"]["dtype"] = dec.pick("vision.dtype", preset=out_dt, note="--dtype")
        depth_v = vision["depth"]
        view = vision["image_size"] if isinstance(vision["image_size"], int) else preset.vision.image_size
        psz = vision["patch_size"] if isinstance(vision["patch_size"], int) and vision["patch_size"] > 0 else 1
        data.update(_infer_mllm(hf, dec, preset, arch, view, view // psz))
        has_post = any(n.startswith(naming.VISION + "post_layernorm.") for n in names)
        if keep_post_layernorm and not has_post:
            raise ConversionError("--keep_post_layernorm: the checkpoint has no vision post_layernorm to keep")
        data["has_post_layernorm"] = dec.pick("has_post_layernorm", shape=bool(keep_post_layernorm and has_post),
                                              note="--keep_post_layernorm")
        kind = "mllm"
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

    plan = build_plan(config, dialect, prefix)
    dropped = _dropped(names, depth_v, n_found_v, config.has_post_layernorm) if kind == "mllm" else {}
    consumed = _check_plan(ckpt, plan, dropped, dialect, arch)
    _log_drops(dropped)

    out_np = DTYPES[dtype]
    info = {"converted_from": str(hf_dir.absolute()), "arch": arch, "dialect": dialect,
            "dropped_tensors": len(dropped), "config_decisions": dec.lines}
    tok_files = ckpt_lib.tokenizer_files_in(hf_dir)
    log.info("tokenizer: %s", ", ".join(f.name for f in tok_files) if tok_files else "no tokenizer files found")
    n_params = 0
    with ckpt_lib.CheckpointWriter(out_dir, config, force=force, tokenizer_files=tok_files, info=info) as writer, \
            tqdm(total=len(names), unit="tensor", desc="converting", disable=not progress) as bar:
        bar.update(len(dropped))
        batch: dict[tuple[str, ...], np.ndarray] = {}
        batch_bytes = 0
        for t in plan:
            nbytes = math.prod(t.shape) * out_np.itemsize
            if batch and batch_bytes + nbytes > WRITE_BATCH_BYTES:
                _flush(writer, batch)
                batch_bytes = 0
            arr = np.empty(t.shape, out_np)
            for i, src in enumerate(t.sources):
                _fill(arr[i] if t.stacked else arr, ckpt, src, t.transform)
                bar.update(1)
            batch[t.path] = arr
            batch_bytes += nbytes
            n_params += arr.size
            del arr
        _flush(writer, batch)
    secs = time.time() - t0
    log.info("done: %s, %d parameters (%s) in %.1f s", out_dir, n_params, dtype, secs)
    return ConversionReport(out_dir=out_dir, arch=arch, dialect=dialect, config=config, dtype=dtype,
                            num_source_tensors=len(names), consumed=consumed, dropped=dropped, decisions=dec.lines,
                            num_params=n_params, seconds=secs)


def _assign(data: dict, assignments: dict[str, Any], kind: str) -> None:
    try:
        config_lib.assign_dotted(data, assignments)
    except ConfigError as e:
        raise ConversionError(f"--{e} (in the {kind} config)") from None


def _log_drops(dropped: dict[str, str]) -> None:
    by_reason: dict[str, list[str]] = {}
    for n, r in dropped.items():
        by_reason.setdefault(r, []).append(n)
    for reason, items in sorted(by_reason.items()):
        log.info("dropping %d tensor(s): %s (e.g. %s)", len(items), reason, items[0])
