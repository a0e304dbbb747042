"""Peak memory of checkpoint conversion: it must scale with the largest tensor, not with the model.

Writes a synthetic LLaDA-style bf16 checkpoint (OLMo names ``model.transformer.*``, two shards with an index,
about 2 GB with the defaults) into a temporary directory, converts it with ``python -m checkpoints_convert``'s
function in a fresh subprocess, and reads that process's own peak RSS (``ru_maxrss``). A second subprocess that
only imports the converter (and starts the JAX CPU backend, which the orbax writer does) gives the runtime's
baseline. Printed: the largest source and target tensors, baseline, peak, and

    ratio = (peak - baseline) / largest target tensor

which the streaming converter keeps near 1 (one stacked tensor plus one read block); holding the model would
give about (model size / largest tensor). The check passes when ratio < 2.

Usage:
  python benchmarks/convert_memory.py [--d_model=2048 --vocab=126464 --n_layers=10 --mlp_hidden=5632]
      [--dtype=bfloat16] [--repeats=1] [--workdir=/tmp]
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

REPO = Path(__file__).resolve().parents[1]

flags.DEFINE_integer("d_model", 2048, "Model width D.")
flags.DEFINE_integer("vocab", 126464, "Vocabulary size V (the embedding and the head are [V, D] each).")
flags.DEFINE_integer("n_layers", 10, "Number of blocks.")
flags.DEFINE_integer("n_heads", 16, "Attention heads (head_dim = d_model / n_heads).")
flags.DEFINE_integer("mlp_hidden", 5632, "SwiGLU hidden width F.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Output dtype of the conversion.")
flags.DEFINE_integer("repeats", 1, "Conversions to run; the median peak and time are reported.")
flags.DEFINE_string("workdir", None, "Where to put the temporary files (default: the system temp dir).")
FLAGS = flags.FLAGS

BF16_BYTES = 2


def _tensors(d: int, v: int, n: int, f: int) -> list[tuple[str, tuple[int, ...]]]:
    p = "model.transformer."
    out = [(p + "wte.weight", (v, d))]
    for i in range(n):
        b = f"{p}blocks.{i}."
        out += [(b + "attn_norm.weight", (d,)), (b + "q_proj.weight", (d, d)), (b + "k_proj.weight", (d, d)),
                (b + "v_proj.weight", (d, d)), (b + "attn_out.weight", (d, d)), (b + "ff_norm.weight", (d,)),
                (b + "ff_proj.weight", (f, d)), (b + "up_proj.weight", (f, d)), (b + "ff_out.weight", (d, f))]
    out += [(p + "ln_f.weight", (d,)), (p + "ff_out.weight", (v, d))]
    return out


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], rng: np.random.Generator) -> None:
    """A safetensors file of random bf16 values, written one block at a time (no big buffers)."""
    header, offset = {}, 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * BF16_BYTES
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for _, shape in tensors:
            remaining = math.prod(shape)
            while remaining:
                k = min(remaining, 1 << 24)
                # bf16 bit patterns of positive finite numbers below 1 (no NaN / inf)
                fh.write(rng.integers(0, 0x3F80, k, dtype=np.uint16).tobytes())
                remaining -= k


def _child(code: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"subprocess failed:\n{r.stderr[-4000:]}")
    return json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])


_BASELINE = """
import json, resource
import checkpoints_convert.convert, dcam_jax.checkpoint
import orbax.checkpoint.experimental.v1
import jax; jax.devices()
print("RESULT " + json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""

_CONVERT = """
import json, resource, time
from checkpoints_convert import convert
t = time.perf_counter()
convert({src!r}, {out!r}, arch="llada", dtype={dtype!r}, progress=False)
print("RESULT " + json.dumps({{"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                              "seconds": time.perf_counter() - t}}))
"""


def main(argv):
    del argv
    d, v, n, f = FLAGS.d_model, FLAGS.vocab, FLAGS.n_layers, FLAGS.mlp_hidden
    tensors = _tensors(d, v, n, f)
    src_bytes = sum(math.prod(s) for _, s in tensors) * BF16_BYTES
    out_item = 2 if FLAGS.dtype == "bfloat16" else 4
    out_bytes = src_bytes // BF16_BYTES * out_item
    workdir = Path(FLAGS.workdir or tempfile.gettempdir())
    free = shutil.disk_usage(workdir).free
    need = src_bytes + out_bytes + (512 << 20)
    print(f"disk: {free / 2**30:.1f} GiB free in {workdir}, need {need / 2**30:.1f} GiB")
    if free < need:
        sys.exit(f"not enough free disk space in {workdir}; pass --workdir elsewhere or shrink the model")

    largest_src = max(tensors, key=lambda t: math.prod(t[1]))
    largest_src_bytes = math.prod(largest_src[1]) * BF16_BYTES
    # targets: layer tensors are stacked over the N layers
    target_elems = {"lm/embed": v * d, "lm/lm_head": d * v, "lm/layers/gate": n * d * f, "lm/layers/q": n * d * d}
    largest_tgt = max(target_elems, key=target_elems.get)
    largest_tgt_bytes = target_elems[largest_tgt] * out_item

    root = Path(tempfile.mkdtemp(prefix="dcam_convert_mem_", dir=workdir))
    try:
        src = root / "hf"
        src.mkdir()
        t = time.perf_counter()
        rng = np.random.default_rng(0)
        shards = [tensors[: len(tensors) // 2], tensors[len(tensors) // 2:]]
        weight_map = {}
        for i, part in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_shard(src / fname, part, rng)
            weight_map.update({name: fname for name, _ in part})
        (src / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": src_bytes}, "weight_map": weight_map}))
        (src / "config.json").write_text(json.dumps(
            {"model_type": "llada", "d_model": d, "n_heads": FLAGS.n_heads, "n_kv_heads": FLAGS.n_heads,
             "n_layers": n, "mlp_hidden_size": f, "vocab_size": v, "embedding_size": v}))
        print(f"synthetic checkpoint: {len(tensors)} bf16 tensors, {src_bytes / 2**30:.2f} GiB in 2 shards, "
              f"written in {time.perf_counter() - t:.1f} s")

        base = _child(_BASELINE)["peak_kb"] * 1024
        runs = []
        for r in range(FLAGS.repeats):
            out = root / f"out{r}"
            runs.append(_child(_CONVERT.format(src=str(src), out=str(out), dtype=FLAGS.dtype)))
            shutil.rmtree(out)
        peak = statistics.median(x["peak_kb"] for x in runs) * 1024
        secs = statistics.median(x["seconds"] for x in runs)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    ratio = (peak - base) / largest_tgt_bytes
    print(f"model: D={d} V={v} N={n} F={f}; source {mib(src_bytes)} bf16, output {mib(out_bytes)} {FLAGS.dtype}")
    print(f"largest source tensor: {largest_src[0]} {list(largest_src[1])} = {mib(largest_src_bytes)}")
    print(f"largest target tensor: {largest_tgt} = {mib(largest_tgt_bytes)} ({FLAGS.dtype})")
    print(f"baseline RSS (import converter + JAX CPU backend): {mib(base)}")
    print(f"peak RSS during conversion (median of {FLAGS.repeats}): {mib(peak)}; conversion time {secs:.1f} s "
          f"({out_bytes / 2**30 / secs:.2f} GiB/s written)")
    print(f"(peak - baseline) / largest target tensor = {ratio:.2f}  "
          f"[vs the whole output model: {(peak - base) / out_bytes:.2f}]")
    ok = ratio < 2.0
    print(f"{'PASS' if ok else 'FAIL'}: peak - baseline {'<' if ok else '>='} 2 x largest tensor")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    from dcam_jax.tool import run_tool

    run_tool(main)
