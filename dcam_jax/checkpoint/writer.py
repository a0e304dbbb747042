"""Writing dcam_jax checkpoints: :class:`CheckpointWriter` piece by piece, :func:`save_checkpoint` in one call.

:class:`CheckpointWriter` writes the parameters in pieces (orbax partial saves), so a converter holds one tensor at
a time instead of the whole model; :func:`save_checkpoint` is the one-call form for an in-memory pytree. Both are
atomic (:mod:`dcam_jax.checkpoint.atomic`): the checkpoint appears at its path only when complete.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from dcam_jax.checkpoint._orbax import orbax_context, orbax_v1
from dcam_jax.checkpoint.atomic import check_destination, make_partial_dir, place, remove_stale_partials
from dcam_jax.checkpoint.layout import (CONFIG_FILE, PARAMS_DIR, TOKENIZER_DIR, CheckpointError, Params, Path_,
                                        check_params, flatten, fmt_path, is_float_dtype, param_shapes, unflatten)
from dcam_jax.checkpoint.manifest import write_marker
from dcam_jax.models import config as config_lib
from dcam_jax.models.config import LMConfig, MLLMConfig

log = logging.getLogger(__name__)

# Files of a Hugging Face tokenizer directory that a checkpoint carries along (whichever exist).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json")


class CheckpointWriter:
    """Write a checkpoint piece by piece; it appears at ``path`` only when :meth:`commit` succeeds.

    Use as a context manager; an exception inside the ``with`` block (or in :meth:`commit`) removes the temporary
    directory and leaves ``path`` untouched::

        with CheckpointWriter(path, config, tokenizer_files=files) as w:
            w.add({"lm": {"embed": embed_vd}})       # any sub-tree of the final parameter tree
            ...
        # committed here

    Each :meth:`add` is written to disk before it returns, so the caller may drop its arrays right after.
    Leaves may be numpy arrays (any dtype, including ml_dtypes.bfloat16) or jax arrays, and are stored as given.
    """

    def __init__(self, path: str | os.PathLike, config: LMConfig | MLLMConfig, *, force: bool = False,
                 tokenizer_files: Sequence[str | os.PathLike] = (), info: Mapping[str, Any] | None = None):
        self.path = Path(path).absolute()
        self.config = config
        self.force = force
        self.info = dict(info or {})
        self.tokenizer_files = [Path(f) for f in tokenizer_files]
        for f in self.tokenizer_files:
            if not f.is_file():
                raise CheckpointError(f"tokenizer file {f} does not exist")
        self.expected = param_shapes(config)  # raises TypeError on a bad config type
        check_destination(self.path, force)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.removed_stale = remove_stale_partials(self.path)
        for d in self.removed_stale:
            logging.warning("removed %s, a partial checkpoint left by a killed run", d)
        self.tmp = make_partial_dir(self.path)
        self._written: dict[Path_, tuple[tuple[int, ...], str]] = {}
        self._done = False

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        if not self._done:
            self.commit()

    @property
    def written(self) -> dict[Path_, tuple[tuple[int, ...], str]]:
        """{param path: (shape, dtype name)} of everything added so far."""
        return dict(self._written)

    def add(self, subtree: Mapping[str, Any]) -> None:
        """Write a sub-tree of the parameter tree (paths from the root). Each path may be written once."""
        if self._done:
            raise CheckpointError("this CheckpointWriter is already committed or aborted")
        flat = flatten(subtree)
        if not flat:
            return
        self._check_paths(flat)
        leaves = {p: (v if isinstance(v, jax.Array) else np.ascontiguousarray(v)) for p, v in flat.items()}
        _check_values(leaves)
        with orbax_context():
            orbax_v1().partial.save(self.tmp / PARAMS_DIR, unflatten(leaves))
        for p, v in leaves.items():
            self._written[p] = (tuple(v.shape), np.dtype(v.dtype).name)

    def _check_paths(self, flat: Mapping[Path_, Any]) -> None:
        """Each leaf of ``flat`` is a parameter of the layout, not written yet, with the shape the config implies."""
        for p, leaf in flat.items():
            if p not in self.expected:
                raise CheckpointError(f"parameter {fmt_path(p)} is not part of the layout the config implies; "
                                      f"expected paths: {sorted(fmt_path(q) for q in self.expected)}")
            if p in self._written:
                raise CheckpointError(f"parameter {fmt_path(p)} was already written")
            shape = tuple(np.shape(leaf))
            if shape != self.expected[p]:
                raise CheckpointError(f"parameter {fmt_path(p)} has shape {shape}; the config implies "
                                      f"{self.expected[p]}")

    def abort(self) -> None:
        """Remove the temporary directory; ``path`` is left as it was."""
        self._done = True
        shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self) -> Path:
        """Finish the checkpoint and move it to ``path``. Raises if any parameter was not written."""
        if self._done:
            raise CheckpointError("this CheckpointWriter is already committed or aborted")
        try:
            missing = sorted(fmt_path(p) for p in self.expected.keys() - self._written.keys())
            if missing:
                raise CheckpointError(f"cannot commit {self.path}: parameter(s) never written: {missing}")
            with orbax_context():
                orbax_v1().partial.finalize(self.tmp / PARAMS_DIR)
            (self.tmp / CONFIG_FILE).write_text(config_lib.to_json(self.config))
            if self.tokenizer_files:
                (self.tmp / TOKENIZER_DIR).mkdir()
                for f in self.tokenizer_files:
                    shutil.copy2(f, self.tmp / TOKENIZER_DIR / f.name)
            marker = write_marker(self.tmp, self.config, self._written, self.info)
            place(self.tmp, self.path, self.force)
        except BaseException:
            self.abort()
            raise
        self._done = True
        log.info("wrote checkpoint %s (%d params, dtype %s)", self.path, marker["num_params"], marker["param_dtype"])
        return self.path


def _check_values(leaves: Mapping[Path_, np.ndarray | jax.Array]) -> None:
    """Every leaf is floating point and finite."""
    for p, v in leaves.items():
        if not is_float_dtype(v.dtype):
            raise CheckpointError(f"parameter {fmt_path(p)} has dtype {v.dtype}; parameters must be floating point")
        finite = bool(jax.numpy.isfinite(v).all()) if isinstance(v, jax.Array) else bool(
            np.isfinite(v.astype(np.float32) if v.dtype.itemsize < 4 else v).all())
        if not finite:
            raise CheckpointError(f"parameter {fmt_path(p)} holds NaN or infinite values; a checkpoint must be "
                                  "finite (is the source file corrupt?)")


def tokenizer_files_in(directory: str | os.PathLike) -> list[Path]:
    """The known tokenizer files (:data:`TOKENIZER_FILES`) present in ``directory``."""
    d = Path(directory)
    return [d / n for n in TOKENIZER_FILES if (d / n).is_file()]


def save_checkpoint(path: str | os.PathLike, config: LMConfig | MLLMConfig, params: Params, *,
                    tokenizer_dir: str | os.PathLike | None = None, force: bool = False,
                    info: Mapping[str, Any] | None = None) -> Path:
    """Save ``params`` (a pytree matching :func:`param_shapes` of ``config``) as a checkpoint directory ``path``.

    tokenizer_dir: a Hugging Face tokenizer directory whose known files (:data:`TOKENIZER_FILES`) are copied into
    ``path/tokenizer/``; it must hold at least one of them. force: replace an existing checkpoint at ``path``
    (only after the new one is complete). info: JSON-serialisable notes stored in the marker file.
    Leaves are stored in their own dtype. Returns the absolute path.
    """
    files: list[Path] = []
    if tokenizer_dir is not None:
        files = tokenizer_files_in(tokenizer_dir)
        if not files:
            raise CheckpointError(f"tokenizer_dir={tokenizer_dir} holds none of the tokenizer files "
                                  f"{list(TOKENIZER_FILES)}")
    flat = flatten(params)
    check_params({p: tuple(np.shape(v)) for p, v in flat.items()}, config, "save_checkpoint")
    with CheckpointWriter(path, config, force=force, tokenizer_files=files, info=info) as w:
        w.add(params)
    return w.path
