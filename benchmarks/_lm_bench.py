"""Shared setup of the attribution benchmarks (explain.py, torch_reference.py): the flags of a random
LaViDa-shaped LM and image layout and the model built from them; and the timers (gpu_scale.py uses them too): a
median over repeats, and the first call's wall time with the XLA compile time spent inside it."""

from __future__ import annotations

import dataclasses
import statistics
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from dcam_jax.models import config as C
from dcam_jax.models import llada, mllm
from dcam_jax.processing.image import ImageGeometry

FLAGS = flags.FLAGS


def define_flags(*, grid: int, answer_len: int) -> None:
    """The model, sequence and timing flags both benchmarks share (defaults: a small CPU-sized model)."""
    flags.DEFINE_integer("d_model", 256, "LM width.")
    flags.DEFINE_integer("n_layers", 6, "LM depth.")
    flags.DEFINE_integer("n_heads", 4, "Attention heads.")
    flags.DEFINE_integer("mlp_hidden", 768, "SwiGLU width.")
    flags.DEFINE_integer("vocab", 4096, "Vocabulary size.")
    flags.DEFINE_integer("text_tokens", 40, "Prompt text tokens besides the image.")
    flags.DEFINE_integer("grid", grid, "High-res grid side: image tokens = 8 x 8 base + grid x (grid + 1) with "
                         "newlines (27: 820 image tokens, LaViDa-like).")
    flags.DEFINE_integer("answer_len", answer_len, "Answer length G.")
    flags.DEFINE_integer("targets", 16, "Explained tokens T.")
    flags.DEFINE_integer("batch_size", 8, "Probe states per vmapped chunk (CamConfig.batch_size).")
    flags.DEFINE_integer("repeats", 3, "Timed repeats (after one warm-up).")


def build(dtype: str = "float32"):
    """The random model and inputs of the flags: lm, cfg, params, geom, layout, emb [P, D], P, answer [G],
    commit [G] (two tokens per step, shuffled), targets (the first T positions)."""
    V = FLAGS.vocab
    lm = C.LMConfig(vocab_size=V, d_model=FLAGS.d_model, n_layers=FLAGS.n_layers, n_heads=FLAGS.n_heads,
                    n_kv_heads=FLAGS.n_heads, head_dim=FLAGS.d_model // FLAGS.n_heads, mlp_hidden=FLAGS.mlp_hidden,
                    max_seq_len=8192, mask_id=V - 1, eos_id=V - 2, pad_id=V - 2, bos_id=V - 3, eot_id=V - 4,
                    dtype=dtype)
    g = FLAGS.grid
    geom = ImageGeometry((64, 64), 5, 8, (2, 2), (64, 64), (0, g, 0, g), (g, g), False)
    P = FLAGS.text_tokens + geom.num_image_tokens
    rng = np.random.default_rng(0)
    G = FLAGS.answer_len
    return types.SimpleNamespace(
        lm=lm, cfg=C.tiny_mllm(lm=lm), params={"lm": llada.init_lm_params(jax.random.key(0), lm)}, geom=geom,
        layout=mllm.image_layout(geom, FLAGS.text_tokens // 2), P=P,
        emb=(0.02 * jax.random.normal(jax.random.key(1), (P, lm.d_model))).astype(jnp.dtype(dtype)),
        answer=rng.integers(0, V - 8, G).astype(np.int32), commit=(rng.permutation(G) // 2).astype(np.int32),
        targets=list(range(FLAGS.targets)))


_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compile_seconds: list[float] = []  # every XLA compile of this process, in order
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **_: _compile_seconds.append(seconds) if event == _BACKEND_COMPILE_EVENT else None)


@dataclasses.dataclass(frozen=True)
class Timing:
    """first_s: wall time of the first call (tracing, compiling and one run); compile_s: the XLA compile time
    spent inside it (summed over every function it compiled); median_s: median wall time of the repeats after it."""

    first_s: float
    compile_s: float
    median_s: float


def first_call(fn, block: bool = True):
    """Run ``fn()`` once (``block``: wait for JAX's results) -> (its output, wall seconds, XLA compile seconds
    spent inside the call)."""
    n = len(_compile_seconds)
    t0 = time.perf_counter()
    out = fn()
    if block:
        jax.block_until_ready(out)
    return out, time.perf_counter() - t0, sum(_compile_seconds[n:])


def measure(fn, repeats: int, block: bool = True) -> Timing:
    """Time ``fn()``: one first call, then ``repeats`` >= 1 timed calls (``block``: wait for JAX's results)."""
    first, compile_s = first_call(fn, block)[1:]
    return Timing(first, compile_s, statistics.median([first_call(fn, block)[1] for _ in range(repeats)]))


def timed(fn, block: bool = True) -> float:
    """Median wall time of ``fn()`` over FLAGS.repeats calls after one warm-up call (``block``: wait for JAX)."""
    return measure(fn, FLAGS.repeats, block).median_s
