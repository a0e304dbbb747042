"""A small, strict, torch-free reader for (sharded) safetensors checkpoints.

The safetensors format is an 8-byte little-endian header length ``N``, a JSON header of ``N`` bytes mapping each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the first byte after the
header), then the raw little-endian tensor bytes. ``safetensors.numpy`` cannot represent bfloat16, so this module
parses the header itself and views the bytes with ``ml_dtypes.bfloat16``.

Memory: tensors are read with ``os.pread`` into fresh buffers, optionally a block of rows at a time
(:meth:`SafetensorsCheckpoint.iter_rows`), so a converter never holds more than the block it is copying. No file
is memory-mapped, so the pages of a multi-gigabyte shard never accumulate in the process's resident set.

Every offset is validated against the file size when the header is read, so a truncated download fails early with
an error that names the file and the first tensor whose bytes are missing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import sys
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit; larger means a corrupt length field

DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "U8": np.dtype(np.uint8),
    "U16": np.dtype(np.uint16),
    "U32": np.dtype(np.uint32),
    "U64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_),
}
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")

if sys.byteorder != "little":  # safetensors stores little-endian bytes and this reader does not swap them
    raise ImportError("checkpoints_convert.safetensors_reader supports little-endian hosts only")


class SafetensorsError(ValueError):
    """A safetensors file or index is missing, truncated, corrupt or inconsistent."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, safetensors dtype string, shape, absolute byte range [start, stop)."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Parse and validate the header of one ``.safetensors`` file.

    Returns {tensor name: TensorInfo} with absolute byte offsets. Raises :class:`SafetensorsError` naming the file
    (and the tensor) when the file is too short for its header, the header is not valid JSON, a dtype is unknown,
    a byte range does not match its shape, or a tensor's bytes extend past the end of the file (truncated file).
    """
    path = Path(path)
    if not path.is_file():
        raise SafetensorsError(f"safetensors file {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: file has {size} bytes, too short to hold a safetensors header "
                                   "(truncated or not a safetensors file)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise SafetensorsError(f"{path}: header length field says {n} bytes but the file has {size} bytes "
                                   "(truncated or not a safetensors file); download it again")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise SafetensorsError(f"{path}: header entry for tensor {name!r} lacks dtype/shape/data_offsets")
        dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}; "
                                   f"known: {sorted(DTYPES)}")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)):
            raise SafetensorsError(f"{path}: tensor {name!r} has a malformed shape {shape!r} or offsets {offs!r}")
        begin, end = offs
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if not 0 <= begin <= end or end - begin != expected:
            raise SafetensorsError(f"{path}: tensor {name!r} ({dtype} {shape}) needs {expected} bytes but its "
                                   f"data_offsets {offs} span {end - begin}; the file is corrupt")
        out[name] = TensorInfo(name, path, dtype, tuple(shape), base + begin, base + end)
    truncated = sorted((i for i in out.values() if i.stop > size), key=lambda i: i.start)
    if truncated:
        first = truncated[0]
        raise SafetensorsError(
            f"{path}: file is truncated: it has {size} bytes but tensor {first.name!r} ({first.dtype} "
            f"{list(first.shape)}) needs bytes up to {first.stop}; {len(truncated)} tensor(s) are incomplete. "
            "Download the file again.")
    return out


class SafetensorsCheckpoint:
    """All tensors of a Hugging Face checkpoint directory: ``model.safetensors`` or an indexed set of shards.

    Open with :meth:`open`. ``infos`` maps every tensor name to its :class:`TensorInfo`. Reading returns numpy
    arrays in the stored dtype (bfloat16 as ``ml_dtypes.bfloat16``); nothing is cached.
    """

    def __init__(self, directory: Path, infos: dict[str, TensorInfo], files: list[Path]):
        self.directory = directory
        self.infos = infos
        self.files = files

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "SafetensorsCheckpoint":
        """Index the tensors of ``directory``.

        Uses ``model.safetensors.index.json`` if present (every file it names must exist, every tensor it lists
        must be in the named file, and the shards must hold no tensor the index does not list); otherwise the
        directory must hold exactly one ``*.safetensors`` file.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise SafetensorsError(f"checkpoint directory {directory} does not exist or is not a directory")
        index_path = directory / INDEX_NAME
        if index_path.is_file():
            return cls._open_index(directory, index_path)
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise SafetensorsError(f"{directory} holds no *.safetensors file and no {INDEX_NAME}; is this a Hugging "
                                   "Face checkpoint directory (PyTorch .bin checkpoints are not supported)?")
        if len(files) > 1:
            raise SafetensorsError(f"{directory} holds {len(files)} .safetensors files "
                                   f"({', '.join(f.name for f in files[:5])}...) but no {INDEX_NAME} saying which "
                                   "tensor is in which file")
        return cls(directory, read_header(files[0]), files)

    @classmethod
    def _open_index(cls, directory: Path, index_path: Path) -> "SafetensorsCheckpoint":
        try:
            index = json.loads(index_path.read_text())
        except json.JSONDecodeError as e:
            raise SafetensorsError(f"{index_path}: not valid JSON ({e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise SafetensorsError(f"{index_path}: expected a non-empty 'weight_map' object (tensor -> file)")
        file_names = sorted(set(weight_map.values()))
        root = directory.resolve()
        outside = [f for f in file_names
                   if not isinstance(f, str) or not f or os.path.isabs(f)
                   or not (root / f).resolve().is_relative_to(root)]
        if outside:
            raise SafetensorsError(f"{index_path} names shard file(s) outside the checkpoint directory {directory}: "
                                   f"{outside[:5]}; shards must be plain file names inside it")
        missing_files = [f for f in file_names if not (directory / f).is_file()]
        if missing_files:
            raise SafetensorsError(f"{index_path} names shard file(s) that do not exist: {missing_files}")
        infos: dict[str, TensorInfo] = {}
        for fname in file_names:
            header = read_header(directory / fname)
            listed = {k for k, v in weight_map.items() if v == fname}
            absent = sorted(listed - set(header))
            if absent:
                raise SafetensorsError(f"{directory / fname}: the index lists tensor(s) {absent[:10]} in this file "
                                       f"but the file does not hold them ({len(absent)} in all)")
            unlisted = sorted(set(header) - listed)
            if unlisted:
                raise SafetensorsError(f"{directory / fname}: holds tensor(s) {unlisted[:10]} that {INDEX_NAME} "
                                       f"does not list for this file ({len(unlisted)} in all); the index is stale")
            infos.update({k: header[k] for k in listed})
        return cls(directory, infos, [directory / f for f in file_names])

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def names(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self.infos)

    def info(self, name: str) -> TensorInfo:
        """Location, dtype and shape of tensor ``name`` (SafetensorsError if absent)."""
        if name not in self.infos:
            raise SafetensorsError(f"tensor {name!r} is not in the checkpoint at {self.directory}")
        return self.infos[name]

    def read(self, name: str) -> np.ndarray:
        """The whole tensor as a new array in its stored dtype. shape: as stored."""
        info = self.info(name)
        return _pread_array(info.file, info.start, info.nbytes, info.np_dtype, info.shape)

    def iter_rows(self, name: str, max_bytes: int = 64 * 1024 * 1024) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (row offset r0, rows [r0:r1] of the tensor) in blocks of at most ``max_bytes`` (>= one row).

        For a tensor of shape [R, ...]; a 0-d or 1-d tensor comes in one block. Each block is a new array, so at
        most one block is alive if the caller drops it before asking for the next.
        """
        info = self.info(name)
        shape = info.shape
        if len(shape) < 2:
            yield 0, self.read(name)
            return
        row_bytes = math.prod(shape[1:]) * info.np_dtype.itemsize
        rows_per_block = max(1, max_bytes // max(row_bytes, 1))
        for r0 in range(0, shape[0], rows_per_block):
            r1 = min(shape[0], r0 + rows_per_block)
            yield r0, _pread_array(info.file, info.start + r0 * row_bytes, (r1 - r0) * row_bytes, info.np_dtype,
                                   (r1 - r0,) + shape[1:])


def _pread_array(path: Path, offset: int, nbytes: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    buf = bytearray(nbytes)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise SafetensorsError(f"{path}: unexpected end of file at byte {offset + done} (the file shrank "
                                       "while being read?)")
            done += got
    finally:
        os.close(fd)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)
