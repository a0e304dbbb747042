"""Atomic placement of a checkpoint directory: where it may go, its hidden partial beside it, the final rename.

A checkpoint is built in a hidden partial directory ``.NAME.tmp-<pid>-<hex>`` next to its destination and renamed
into place only once complete. An existing destination is replaced only when asked (``force``), only if it is
itself a dcam_jax checkpoint (or an empty directory), and only after the new one is complete. Partials that killed
writes left behind are removed once their process is gone.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from dcam_jax.checkpoint.layout import MARKER_FILE, CheckpointError


def check_destination(path: str | os.PathLike, force: bool) -> None:
    """Raise unless a checkpoint may be written at ``path``: it must not exist, or (with ``force``) be an empty
    directory or a dcam_jax checkpoint. Called before any work so a long conversion fails fast."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not force:
        raise FileExistsError(f"{path} already exists; pass force=True (--force) to replace it once the new "
                              "checkpoint is complete, or choose another output directory")
    if not path.is_dir() or path.is_symlink():
        raise CheckpointError(f"refusing to replace {path}: it is not a directory")
    if any(path.iterdir()) and not (path / MARKER_FILE).is_file():
        raise CheckpointError(f"refusing to replace {path}: it is not empty and not a dcam_jax checkpoint "
                              f"(no {MARKER_FILE}); remove it yourself if you really mean to")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (one that is not ours to signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _partial_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def make_partial_dir(path: Path) -> Path:
    """Create and return a new, empty partial directory for a write of ``path`` (an absolute path)."""
    # mkdir (not mkdtemp) so the finished checkpoint gets the user's umask permissions, not 0700
    tmp = path.parent / f"{_partial_prefix(path)}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    return tmp


def remove_stale_partials(path: str | os.PathLike) -> list[Path]:
    """Delete the partial checkpoints (``.NAME.tmp-<pid>-*``) that killed writes of ``path`` left beside it, when
    their process is gone. A partial of a running process is kept. Returns the removed folders."""
    path = Path(path).absolute()
    prefix = _partial_prefix(path)
    removed = []
    for d in path.parent.glob(prefix + "*"):
        pid = d.name[len(prefix):].split("-", 1)[0]
        if not (d.is_dir() and pid.isdigit()) or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def place(tmp: Path, path: Path, force: bool) -> None:
    """Rename the complete partial ``tmp`` to ``path``; an existing ``path`` is swapped out, then deleted.

    The destination is checked again (:func:`check_destination`): something may have appeared there while the
    checkpoint was being written.
    """
    check_destination(path, force)
    if not path.exists():
        os.rename(tmp, path)
        return
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except OSError:
        os.rename(old, path)
        raise
    shutil.rmtree(old)
