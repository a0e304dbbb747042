"""Forward and forward+vjp-at-layer-L throughput of the LLaDA LM, and compile time vs depth.

Prints, for one preset and sequence length:
  - tokens/s of the jitted forward (logits at the last position only, as the CAM score needs) and of
    forward + vjp at layer L (the Diffusion-CAM attribution pass: one score, gradient at the layer-L residual),
    medians over repeats, compile excluded, and their ratio;
  - compile time of the same forward for a shallow and a deep model of the same width (lax.scan over stacked
    layers keeps it nearly flat), and their ratio.

Usage:
  python benchmarks/forward.py --preset=tiny --seq_len=512
  python benchmarks/forward.py --preset=llada_8b --seq_len=1100 --dtype=bfloat16   # on a GPU
Random weights (the speed does not depend on their values); nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from dcam_jax.models import config as C
from dcam_jax.models import llada

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "small", ["tiny", "small", "llada_8b"],
                  "tiny: 2x32 test model; small: 8 layers of width 512 (CPU); llada_8b: the real 8B shape (GPU).")
flags.DEFINE_integer("seq_len", 512, "Tokens per sequence.")
flags.DEFINE_integer("batch", 1, "Sequences per call.")
flags.DEFINE_integer("layer", None, "Hooked block L for the vjp pass (default n_layers // 3).")
flags.DEFINE_string("dtype", "float32", "Compute and parameter dtype: float32 or bfloat16.")
flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported).")
flags.DEFINE_bool("remat", False, "Rematerialise blocks in the backward pass.")
flags.DEFINE_list("compile_depths", ["4", "32"], "Depths whose compile time is compared (same width).")


def _config() -> C.LMConfig:
    if FLAGS.preset == "tiny":
        cfg = C.tiny_lm(max_seq_len=max(512, FLAGS.seq_len))
    elif FLAGS.preset == "small":
        cfg = C.LMConfig(vocab_size=32000, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, head_dim=64,
                         mlp_hidden=1536, max_seq_len=max(4096, FLAGS.seq_len), mask_id=31999, eos_id=31998,
                         pad_id=31998, bos_id=31997, eot_id=31996)
    else:
        cfg = C.llada_8b()
    return dataclasses.replace(cfg, dtype=FLAGS.dtype, remat=FLAGS.remat)


def _median_time(fn, *args) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _compile_seconds(fn, *args) -> float:
    t0 = time.perf_counter()
    fn.lower(*args).compile()
    return time.perf_counter() - t0


def main(argv):
    del argv
    cfg = _config()
    L = FLAGS.layer if FLAGS.layer is not None else cfg.n_layers // 3
    B, T = FLAGS.batch, FLAGS.seq_len
    params = llada.init_lm_params(jax.random.key(0), cfg)
    ids = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)

    def forward(p, x):
        inp = llada.prepare_inputs(p, cfg, x)
        h = llada.run_blocks(p["layers"], cfg, inp.h0, positions=inp.positions, bias=inp.bias)
        return llada.final_logits(p, cfg, h[:, -1:])

    def forward_vjp(p, x):
        inp = llada.prepare_inputs(p, cfg, x)
        A = llada.run_blocks(p["layers"], cfg, inp.h0, positions=inp.positions, bias=inp.bias, stop=L + 1)

        def upper(a):
            h = llada.run_blocks(p["layers"], cfg, a, positions=inp.positions, bias=inp.bias, start=L + 1)
            return jnp.sum(jax.nn.log_softmax(llada.final_logits(p, cfg, h[:, -1:])[..., 0]))

        s, vjp = jax.vjp(upper, A)
        (g,) = vjp(jnp.ones_like(s))
        return g

    fwd = jax.jit(forward)
    bwd = jax.jit(forward_vjp)
    c_fwd = _compile_seconds(fwd, params, ids)
    c_bwd = _compile_seconds(bwd, params, ids)
    t_fwd = _median_time(fwd, params, ids)
    t_bwd = _median_time(bwd, params, ids)
    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}); preset={FLAGS.preset} layers={cfg.n_layers} "
          f"d_model={cfg.d_model} dtype={cfg.dtype} batch={B} seq_len={T} L={L} remat={cfg.remat}")
    print(f"{'pass':<28}{'median s':>10}{'tokens/s':>12}{'compile s':>11}")
    print(f"{'forward':<28}{t_fwd:>10.4f}{B * T / t_fwd:>12.0f}{c_fwd:>11.2f}")
    print(f"{'forward + vjp at layer L':<28}{t_bwd:>10.4f}{B * T / t_bwd:>12.0f}{c_bwd:>11.2f}")
    print(f"ratio (forward+vjp) / forward: {t_bwd / t_fwd:.2f}x")

    depths = [int(d) for d in FLAGS.compile_depths]
    comp = {}
    for d in depths:
        dc = dataclasses.replace(cfg, n_layers=d)
        pd = jax.eval_shape(lambda k: llada.init_lm_params(k, dc), jax.random.key(0))
        f = jax.jit(lambda p, x, dc=dc: llada.lm_logits(p, dc, x))
        comp[d] = _compile_seconds(f, pd, jax.ShapeDtypeStruct(ids.shape, ids.dtype))
    print("compile time of the forward vs depth (same width): " +
          ", ".join(f"{d} layers {comp[d]:.2f} s" for d in depths) +
          f"; ratio {depths[-1]}/{depths[0]}: {comp[depths[-1]] / comp[depths[0]]:.2f}x")


if __name__ == "__main__":
    from dcam_jax.tool import run_tool

    run_tool(main)
