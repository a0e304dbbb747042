"""The marker file of a checkpoint and the file manifest it records: writing, reading and verifying.

The marker (``dcam_checkpoint.json``) names the format and its version, the parameter dtype and count, free-form
info, and, from format version 2 on, every other file of the checkpoint with its size and SHA-256, so that a
truncated or altered file is found before its bytes are used.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from dcam_jax.checkpoint.layout import MARKER_FILE, CheckpointError, Path_
from dcam_jax.fileio import file_sha256
from dcam_jax.models.config import LMConfig, MLLMConfig

log = logging.getLogger(__name__)

FORMAT_NAME = "dcam_jax.checkpoint"
FORMAT_VERSION = 2  # 2: the marker lists every file with its size and SHA-256
VERIFY_MODES = ("full", "size", "none")


def file_manifest(root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} of every file under ``root`` except the marker, sorted."""
    root = Path(root)
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if rel == MARKER_FILE:
            continue
        out[rel] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
    return out


def write_marker(root: Path, config: LMConfig | MLLMConfig,
                 written: Mapping[Path_, tuple[tuple[int, ...], str]], info: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``root/dcam_checkpoint.json`` over the files now under ``root``; returns the marker written.

    written: {param path: (shape, dtype name)} of every stored parameter. info: JSON-serialisable notes.
    """
    dtypes = sorted({d for _, d in written.values()})
    marker = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config_kind": "mllm" if isinstance(config, MLLMConfig) else "lm",
        "param_dtype": dtypes[0] if len(dtypes) == 1 else "mixed:" + ",".join(dtypes),
        "num_params": int(sum(int(np.prod(s)) for s, _ in written.values())),
        "created_unix": int(time.time()),
        "info": dict(info),
        "files": file_manifest(root),
    }
    (root / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True))
    return marker


def read_marker(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``dcam_checkpoint.json`` of a checkpoint directory, validated (format name and version)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    marker = path / MARKER_FILE
    if not marker.is_file():
        raise CheckpointError(
            f"{path} is not a dcam_jax checkpoint: it has no {MARKER_FILE}. Convert a Hugging Face checkpoint "
            "with `python -m checkpoints_convert --hf_dir=SRC --out_dir=DST` or save one with save_checkpoint().")
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{marker} is corrupt (not valid JSON: {e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{marker} does not describe a {FORMAT_NAME} (format field: "
                              f"{data.get('format') if isinstance(data, dict) else data!r})")
    version = data.get("version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{marker}: format version {version!r} is not supported by this dcam_jax (reads "
                              f"versions 1..{FORMAT_VERSION}); upgrade dcam_jax or re-convert the checkpoint")
    return data


def verify_files(path: str | os.PathLike, verify: str = "full") -> None:
    """Check a checkpoint's files against the manifest its marker records.

    verify: "full" (sizes and SHA-256 of every file: reads the whole checkpoint once more), "size" (every file
      present with its recorded size), "none". A checkpoint of format version 1 has no manifest: a warning says
      so and nothing is checked.
    Raises :class:`CheckpointError` naming the first missing, resized or altered file.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify={verify!r}, expected one of {VERIFY_MODES}")
    path = Path(path)
    marker = read_marker(path)
    if verify == "none":
        return
    manifest = marker.get("files")
    if manifest is None:
        log.warning("%s was written without a file manifest (format version %s); its files cannot be verified. "
                    "Save it again to add one.", path, marker.get("version"))
        return
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path / MARKER_FILE}: 'files' is not a mapping; the marker is corrupt")
    for rel, want in manifest.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{path}: file {rel} is missing; the checkpoint is incomplete")
        size = f.stat().st_size
        if size != want.get("size"):
            raise CheckpointError(f"{path}: file {rel} has {size} bytes, {want.get('size')} were written; the "
                                  "checkpoint is truncated or corrupt")
        if verify == "full" and file_sha256(f) != want.get("sha256"):
            raise CheckpointError(f"{path}: file {rel} does not match the SHA-256 recorded when it was written; "
                                  "the checkpoint is corrupt (re-convert or re-copy it)")
