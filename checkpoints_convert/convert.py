"""Convert a Hugging Face safetensors checkpoint of LLaDA-8B, LaViDa or LLaDA-V into a dcam_jax checkpoint.

:func:`convert` is the whole conversion as a Python function (the CLI in ``__main__`` only parses flags). Each
step has its own module:

1. Index the source tensors (``model.safetensors`` or an indexed set of shards; :mod:`.safetensors_reader`);
   nothing is read yet.
2. Detect the naming dialect and the architecture from the tensor names (:mod:`.naming`).
3. Build the dcam_jax config (:mod:`.hf_config`). Values come, in order of precedence, from ``--override``, the HF
   ``config.json``, the tensor shapes, and the architecture's preset; every choice is logged with its source.
4. Plan every target parameter and its source tensors, and check strictly, before writing anything, that every
   source tensor is used exactly once or dropped on purpose (the last SigLIP layer when the checkpoint still
   holds it, the pooling head ``head.*``, the post-layernorm unless kept), that none is missing, and that every
   shape and dtype is as expected (:mod:`.plan`). Problems are reported together, by name.
5. Write (:mod:`.streaming`): one target tensor at a time, so peak memory is about one target tensor plus one read
   block, not the model. The checkpoint appears at ``out_dir`` only when complete; on any error nothing is left
   behind.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import ml_dtypes
import numpy as np
from tqdm import tqdm

from checkpoints_convert import naming
from checkpoints_convert.errors import ConversionError
from checkpoints_convert.hf_config import infer_config, parse_overrides, parse_pinpoints, read_hf_config
from checkpoints_convert.plan import Target, build_plan, check_plan, dropped_tensors, log_drops
from checkpoints_convert.safetensors_reader import SafetensorsCheckpoint
from checkpoints_convert.streaming import write_params
from dcam_jax import checkpoint as ckpt_lib
from dcam_jax.models.config import LMConfig, MLLMConfig

__all__ = ["ARCHS", "DTYPES", "ConversionError", "ConversionReport", "READ_BLOCK_BYTES", "Target",
           "WRITE_BATCH_BYTES", "build_plan", "convert", "parse_overrides", "parse_pinpoints"]

log = logging.getLogger("checkpoints_convert")

ARCHS = ("auto", "lavida", "llada_v", "llada")
DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
# Sources are read in row blocks of this size, so a 1 GB embedding never needs a second 1 GB buffer.
# convert() reads both sizes from this module when it runs, so callers may tune them here.
READ_BLOCK_BYTES = 16 * 1024 * 1024
# Small targets are grouped into one orbax write up to this size (each write has a fixed cost).
WRITE_BATCH_BYTES = 256 * 1024 * 1024


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
    _check_options(arch, dtype)
    hf_dir, out_dir = Path(hf_dir).expanduser(), Path(out_dir).expanduser()
    ckpt_lib.check_destination(out_dir, force)
    over = parse_overrides(overrides)
    ckpt, hf = _open_source(hf_dir)
    names = ckpt.names()
    arch, dialect, prefix = _detect_arch(hf_dir, names, arch)
    inferred = infer_config(ckpt, hf, arch=arch, dialect=dialect, prefix=prefix, overrides=over, dtype=dtype,
                            keep_post_layernorm=keep_post_layernorm)
    config = inferred.config
    plan = build_plan(config, dialect, prefix)
    dropped = (dropped_tensors(names, config.vision.depth, inferred.vision_layers_found, config.has_post_layernorm)
               if isinstance(config, MLLMConfig) else {})
    consumed = check_plan(ckpt, plan, dropped, dialect, arch)
    log_drops(dropped)
    info = {"converted_from": str(hf_dir.absolute()), "arch": arch, "dialect": dialect,
            "dropped_tensors": len(dropped), "config_decisions": inferred.decisions}
    n_params = _write(ckpt, plan, out_dir, config, DTYPES[dtype], force=force, info=info,
                      tokenizer_files=ckpt_lib.tokenizer_files_in(hf_dir), num_dropped=len(dropped),
                      progress=progress)
    secs = time.time() - t0
    log.info("done: %s, %d parameters (%s) in %.1f s", out_dir, n_params, dtype, secs)
    return ConversionReport(out_dir=out_dir, arch=arch, dialect=dialect, config=config, dtype=dtype,
                            num_source_tensors=len(names), consumed=consumed, dropped=dropped,
                            decisions=inferred.decisions, num_params=n_params, seconds=secs)


def _check_options(arch: str, dtype: str) -> None:
    if arch not in ARCHS:
        raise ConversionError(f"arch={arch!r}; expected one of {ARCHS}")
    if dtype not in DTYPES:
        raise ConversionError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)}")


def _open_source(hf_dir: Path) -> tuple[SafetensorsCheckpoint, dict[str, Any]]:
    """The indexed source tensors and the HF config.json ({} when absent)."""
    ckpt = SafetensorsCheckpoint.open(hf_dir)
    log.info("source: %s, %d tensors in %d file(s)", hf_dir, len(ckpt.names()), len(ckpt.files))
    hf = read_hf_config(hf_dir)
    if hf:
        log.info("source: HF config.json model_type=%r, architectures=%r", hf.get("model_type"),
                 hf.get("architectures"))
    return ckpt, hf


def _detect_arch(hf_dir: Path, names: Sequence[str], arch: str) -> tuple[str, str, str]:
    """(arch, LM naming dialect, LM name prefix) from the tensor names; ``arch`` other than "auto" is kept."""
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
    return arch, dialect, prefix


def _write(ckpt: SafetensorsCheckpoint, plan: list[Target], out_dir: Path, config: LMConfig | MLLMConfig,
           dtype: np.dtype, *, force: bool, info: dict[str, Any], tokenizer_files: list[Path], num_dropped: int,
           progress: bool) -> int:
    """Write the checkpoint atomically (config, params, tokenizer files, info); returns the parameter count."""
    log.info("tokenizer: %s", ", ".join(f.name for f in tokenizer_files) if tokenizer_files
             else "no tokenizer files found")
    with ckpt_lib.CheckpointWriter(out_dir, config, force=force, tokenizer_files=tokenizer_files,
                                   info=info) as writer, \
            tqdm(total=len(ckpt.names()), unit="tensor", desc="converting", disable=not progress) as bar:
        bar.update(num_dropped)
        return write_params(writer, ckpt, plan, dtype, read_block_bytes=READ_BLOCK_BYTES,
                            write_batch_bytes=WRITE_BATCH_BYTES, advance=bar.update)
