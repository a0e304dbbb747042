"""Streaming the source tensors into a dcam_jax checkpoint writer, one target parameter at a time.

Each target array is preallocated and filled one source tensor at a time (read in blocks of rows, transposed into
place, cast to the output dtype), handed to the writer in batches, and dropped. Peak memory is about one target
tensor plus one block, not the model.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from checkpoints_convert import naming
from checkpoints_convert.plan import Target
from checkpoints_convert.safetensors_reader import SafetensorsCheckpoint
from dcam_jax import checkpoint as ckpt_lib


def write_params(writer: ckpt_lib.CheckpointWriter, ckpt: SafetensorsCheckpoint, plan: Sequence[Target],
                 dtype: np.dtype, *, read_block_bytes: int, write_batch_bytes: int,
                 advance: Callable[[int], object] = lambda n: None) -> int:
    """Fill every target of ``plan`` from ``ckpt`` and add it to ``writer``; returns the number of parameters.

    dtype: the stored numpy dtype (bfloat16 or float32); sources are cast to it.
    read_block_bytes: sources are read in row blocks of about this size, so a 1 GB embedding never needs a
      second 1 GB buffer.
    write_batch_bytes: small targets are grouped into one ``writer.add`` up to this size (each write has a fixed
      cost); a target larger than this is written alone.
    advance: called with 1 after each source tensor (a progress bar's ``update``).
    """
    n_params = 0
    batch: dict[tuple[str, ...], np.ndarray] = {}
    batch_bytes = 0
    for t in plan:
        nbytes = math.prod(t.shape) * dtype.itemsize
        if batch and batch_bytes + nbytes > write_batch_bytes:
            _flush(writer, batch)
            batch_bytes = 0
        arr = np.empty(t.shape, dtype)
        for i, src in enumerate(t.sources):
            _fill(arr[i] if t.stacked else arr, ckpt, src, t.transform, read_block_bytes)
            advance(1)
        batch[t.path] = arr
        batch_bytes += nbytes
        n_params += arr.size
        del arr
    _flush(writer, batch)
    return n_params


def _fill(dst: np.ndarray, ckpt: SafetensorsCheckpoint, name: str, transform: str, block_bytes: int) -> None:
    """Copy source tensor ``name`` into ``dst`` (its target slot), transforming and casting on the way."""
    if transform == naming.CONV:
        dst[...] = ckpt.read(name).transpose(2, 3, 1, 0)
        return
    for r0, rows in ckpt.iter_rows(name, block_bytes):
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
