"""The generation cache shared by methods and sweep cells, and the crash-safe record files of a run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
from absl import logging

from dcam_jax import fileio
from eval.config import RunConfig


# ----------------------------------------------------------------------------------------------------------
# generation cache


@dataclasses.dataclass(frozen=True)
class CachedGeneration:
    """The parts of a dcam_jax.api.Generation that explanations need (tokens [G], commit_step [G], ...)."""

    text: str
    tokens: np.ndarray
    token_strings: list[str]
    num_valid: int
    commit_step: np.ndarray
    num_steps: int

    def to_json(self) -> dict:
        """JSON-ready dict (lists of ints)."""
        return {"text": self.text, "tokens": [int(t) for t in self.tokens], "token_strings": list(self.token_strings),
                "num_valid": int(self.num_valid), "commit_step": [int(c) for c in self.commit_step],
                "num_steps": int(self.num_steps)}

    @classmethod
    def from_json(cls, d: dict) -> "CachedGeneration":
        """Inverse of :meth:`to_json`."""
        return cls(d["text"], np.asarray(d["tokens"], np.int32), list(d["token_strings"]), int(d["num_valid"]),
                   np.asarray(d["commit_step"], np.int32), int(d["num_steps"]))


def sampling_config(cfg: RunConfig, model):
    """The model's default SamplingConfig with the sampling flags the user set."""
    from dcam_jax import api

    base = api.default_sampling(model.config)
    changes = {k: getattr(cfg, k) for k in ("gen_length", "block_length", "steps", "temperature", "remasking",
                                            "schedule", "shift") if getattr(cfg, k) is not None}
    return dataclasses.replace(base, **changes)


def generation_key(cfg: RunConfig, checkpoint_id: str, sampling) -> tuple[str, dict]:
    """(hash, description) of everything that decides a generated answer (sampling: the SamplingConfig)."""
    samp = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(sampling).items()}
    desc = {"checkpoint": checkpoint_id, "dtype": cfg.dtype, "dataset": cfg.dataset, "split": cfg.split,
            "data_dir": str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None,
            "shapes_preset": cfg.shapes_preset if cfg.dataset == "shapes" else None, "prompt": cfg.prompt,
            "sampling": samp, "seed": cfg.seed}
    if cfg.dataset == "pil_shapes":  # only here, so that the other datasets' keys (and caches) stay as they were
        from dcam_jax.data import pil_shapes

        w, h = pil_shapes.parse_size(cfg.pil_size)  # "128" and "128,128" are the same images
        desc["pil_background"], desc["pil_size"] = cfg.pil_background, f"{w}x{h}"
    h = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]
    return h, desc


class GenerationCache:
    """Generated answers by example id, backed by an append-only JSONL file per generation setting.

    directory: where ``{hash}.json`` (the settings) and ``{hash}.pNNNNN.jsonl`` (answers written by process N)
    live. Every process reads all processes' files; a torn last line (a crash while writing) is ignored.
    """

    def __init__(self, directory: Path, key: str, desc: dict, process_index: int = 0):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = key
        info = self.directory / f"{key}.json"
        if not info.exists():
            fileio.write_text(info, json.dumps(desc, indent=2, sort_keys=True) + "\n")
        self.path = self.directory / f"{key}.p{process_index:05d}.jsonl"
        self.entries: dict[str, CachedGeneration] = {}
        for p in sorted(self.directory.glob(f"{key}.p*.jsonl")):
            for line in p.read_text().splitlines():
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn line; the example is simply generated again
                self.entries[d["example_id"]] = CachedGeneration.from_json(d["generation"])

    def get(self, example_id: str) -> Optional[CachedGeneration]:
        """The cached answer of ``example_id`` or None."""
        return self.entries.get(example_id)

    def put(self, example_id: str, gen: CachedGeneration) -> None:
        """Cache an answer (appended to this process's file and fsynced)."""
        self.entries[example_id] = gen
        _append_block(self.path, json.dumps({"example_id": example_id, "generation": gen.to_json()}) + "\n")


# ----------------------------------------------------------------------------------------------------------
# crash-safe record files


def _append_block(path: Path, text: str) -> None:
    """Append ``text`` with one write, then flush and fsync, so a block is on disk before the next begins."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def records_path(out_dir: Path, process_index: int, process_count: int) -> Path:
    """``OUT_DIR/records-PPPPP-of-NNNNN.jsonl``: the records file process P of N appends to."""
    return Path(out_dir) / f"records-{process_index:05d}-of-{process_count:05d}.jsonl"


@dataclasses.dataclass
class ScanResult:
    """What a records file holds: completed example indices, the byte length of its complete blocks, and the
    number of lines of an incomplete last block."""

    done: set
    good_bytes: int
    dropped_lines: int


def scan_records(path: Path, *, repair: bool) -> ScanResult:
    """Read a records file block by block (word lines closed by an "example" line).

    A torn or unclosed last block (a crash while writing) is reported in ``dropped_lines``; with ``repair`` the
    file is truncated to its complete blocks and a warning says so. A malformed line *followed by* complete
    blocks is corruption, not a crash, and raises ValueError.
    """
    done, good, pending = set(), 0, 0
    if not path.exists():
        return ScanResult(done, 0, 0)
    data = path.read_bytes()
    offset, bad_at = 0, None
    for raw in data.splitlines(keepends=True):
        end = offset + len(raw)
        try:
            if not raw.endswith(b"\n"):
                raise ValueError("no newline")
            rec = json.loads(raw)
        except ValueError:
            bad_at = bad_at if bad_at is not None else offset
            pending += 1
            offset = end
            continue
        if bad_at is not None:
            raise ValueError(f"{path} is corrupt: a malformed line at byte {bad_at} is followed by valid records; "
                             "this is not a torn write from a crash. Move the file away and rerun with --resume.")
        pending += 1
        if rec.get("type") == "example":
            done.add(int(rec["example"]))
            good, pending = end, 0
        offset = end
    if pending:
        msg = (f"{path}: dropping {pending} line(s) after byte {good}: the last example block is incomplete (the "
               "previous run stopped while writing it); that example will be redone")
        if repair:
            logging.warning(msg)
            with open(path, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
        else:
            logging.info(msg.replace("dropping", "ignoring"))
    return ScanResult(done, good, pending)
