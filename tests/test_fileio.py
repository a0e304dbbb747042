"""Atomic writes: the target appears whole or not at all, failures leave the old file and no temporary."""

import pytest

from dcam_jax import fileio


def test_write_text_replaces_whole_and_creates_parents(tmp_path):
    p = tmp_path / "a" / "b" / "summary.json"
    fileio.write_text(p, "one")
    fileio.write_text(p, "two")
    assert p.read_text() == "two"
    assert [f.name for f in p.parent.iterdir()] == ["summary.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    p = tmp_path / "fig.png"
    p.write_bytes(b"old")

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig = plt.figure()

    def broken(path, **kw):
        open(path, "wb").write(b"half")
        raise RuntimeError("disk full")

    fig.savefig = broken
    with pytest.raises(RuntimeError, match="disk full"):
        fileio.save_figure(fig, p)
    assert p.read_bytes() == b"old" and sorted(f.name for f in tmp_path.iterdir()) == ["fig.png"]
    fileio.write_bytes(p, b"new")
    assert p.read_bytes() == b"new"


def test_file_sha256_reads_in_chunks_and_matches_hashlib(tmp_path):
    import hashlib

    data = bytes(range(256)) * 9000  # over two 1 MiB chunks
    p = tmp_path / "blob.bin"
    p.write_bytes(data)
    assert fileio.file_sha256(p) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert fileio.file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
