"""Atomic file writes: a reader (or a crash) never sees half a file.

Each function writes to a hidden temporary file beside the target (``.NAME.tmp<pid>``) and renames it over the
target, which POSIX makes atomic within one folder. The parent folder is created if needed; on failure the
temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable


def _atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically. Returns the path."""
    return _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically. Returns the path."""
    return _atomic(path, lambda tmp: tmp.write_bytes(data))


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 100) -> Path:
    """Lay out, write atomically as PNG and close a matplotlib figure. Returns the path."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        return _atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt.close(fig)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
