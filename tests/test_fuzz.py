"""Seeded fuzzing of every file dcam_jax reads: random bytes, truncations and byte flips of images, config JSON,
safetensors files and checkpoint folders. Each case must end in the documented error type or in a correct
result: never another exception, never a silent success on corrupted data."""

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from checkpoints_convert import SafetensorsCheckpoint, SafetensorsError
from dcam_jax import checkpoint as ck
from dcam_jax.models import config as C
from dcam_jax.processing import image as pimg


def _mutations(data: bytes, rng: np.random.Generator, n: int):
    """n corrupted copies of ``data``: truncations, byte flips, inserted garbage, pure noise."""
    out = []
    for k in range(n):
        kind = k % 4
        if kind == 0:
            out.append(data[: int(rng.integers(0, max(1, len(data) - 1)))])
        elif kind == 1:
            b = bytearray(data)
            for i in rng.integers(0, len(b), size=int(rng.integers(1, 9))):
                b[i] ^= int(rng.integers(1, 256))
            out.append(bytes(b))
        elif kind == 2:
            i = int(rng.integers(0, len(data)))
            out.append(data[:i] + rng.bytes(int(rng.integers(1, 64))) + data[i:])
        else:
            out.append(rng.bytes(int(rng.integers(0, 400))))
    return out


def test_fuzz_images(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    sources = {}
    for fmt, mode in (("PNG", "RGB"), ("JPEG", "RGB"), ("PNG", "L"), ("GIF", "P"), ("BMP", "RGB")):
        buf = io.BytesIO()
        Image.fromarray(base).convert(mode).save(buf, format=fmt)
        sources[fmt + mode] = buf.getvalue()
    outcomes = {"ok": 0, "error": 0}
    for name, data in sources.items():
        for k, blob in enumerate(_mutations(data, rng, 40)):
            path = tmp_path / f"{name}_{k}.img"
            path.write_bytes(blob)
            try:
                with _quiet():
                    out = pimg.load_image(path)
            except pimg.ImageError:
                outcomes["error"] += 1
                continue
            # a decodable mutation is an image: RGB, the stored size, and uint8 pixels
            arr = np.asarray(out)
            assert out.mode == "RGB" and arr.dtype == np.uint8 and arr.ndim == 3, name
            outcomes["ok"] += 1
    assert outcomes["error"] > 50 and sum(outcomes.values()) == 200


class _quiet:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


def test_fuzz_config_json():
    rng = np.random.default_rng(1)
    good = C.to_json(C.tiny_mllm()).encode()
    results = {"ok": 0, "error": 0}
    for blob in _mutations(good, rng, 120):
        try:
            text = blob.decode("utf-8")
        except UnicodeDecodeError:
            results["error"] += 1
            continue
        try:
            cfg = C.from_json(text)
        except C.ConfigError:
            results["error"] += 1
            continue
        # a mutation that still parses is a valid, complete config (every check passed)
        assert C.from_json(C.to_json(cfg)) == cfg
        results["ok"] += 1
    assert results["error"] > 80


def _safetensors(path, tensors):
    from safetensors.numpy import save_file

    save_file(tensors, str(path))
    return path.read_bytes()


def test_fuzz_safetensors(tmp_path):
    rng = np.random.default_rng(2)
    good = _safetensors(tmp_path / "good.safetensors",
                        {"a": rng.standard_normal((4, 8)).astype(np.float32), "b": np.arange(6, dtype=np.float32)})
    errors = 0
    for k, blob in enumerate(_mutations(good, rng, 80)):
        d = tmp_path / f"c{k}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(blob)
        try:
            ckpt = SafetensorsCheckpoint.open(d)
            for name in ckpt.names():
                arr = ckpt.read(name)
                assert arr.shape == ckpt.info(name).shape
        except SafetensorsError:
            errors += 1
    assert errors > 30


def test_fuzz_checkpoint_files(tmp_path):
    rng = np.random.default_rng(3)
    cfg = C.tiny_lm()
    from test_checkpoint import _numpy_params

    src = tmp_path / "src"
    params = _numpy_params(cfg)
    ck.save_checkpoint(src, cfg, params)
    files = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file() and p.stat().st_size > 0)
    caught = 0
    for k in range(60):
        rel = files[k % len(files)]
        d = tmp_path / f"m{k}"
        shutil.copytree(src, d)
        data = (d / rel).read_bytes()
        (d / rel).write_bytes(_mutations(data, rng, 4)[k % 4])
        try:
            loaded = ck.load_checkpoint(d)
        except ck.CheckpointError:
            caught += 1
            continue
        if rel.name == ck.MARKER_FILE:
            # the marker holds metadata only (its file list is what protects the rest): a mutation that still
            # parses may change that metadata, never the config or the parameters
            assert loaded.config == cfg
            for a, b in zip(jax_leaves(loaded.params), jax_leaves(params)):
                np.testing.assert_array_equal(np.asarray(a), b)
            continue
        # not caught: only possible when the mutation left the bytes as they were
        assert (d / rel).read_bytes() == data, rel
    assert caught >= 40


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)
