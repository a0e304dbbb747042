"""Cost of the attribution pass: all answer tokens in one call vs one call per token, and K noise samples vs one.

Prints medians (compile excluded) of the raw-map computation for T answer tokens of one answer:
  - "one call": every target in one jitted, vmapped call (probe "clean": one shared forward, T reverse passes);
  - "per token": T separate calls of the same jitted function, one target each (one forward + one reverse each);
  - "decision": probe "decision" (one state per target: T forwards + T reverse passes, batched);
  - "noise xK": probe "noise" with K samples per target, and its cost relative to K = 1;
  - "decision, <rule>": the decision probe under each gradient rule (standard, conservative_norm, conservative),
    and the cost of each relative to standard (the rules change only the backward pass);
and seconds per explained token for each, with the ratios. Every variant uses the diffusion_cam preset (gxa
aggregation, conservative rule) unless its name says otherwise.

Usage:
  python benchmarks/explain.py                       # CPU, a small random model
  python benchmarks/explain.py --d_model=4096 --n_layers=32 --vocab=126464 --dtype=bfloat16 --image_tokens=834
Random weights; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dcam_jax.cam import attribution as attr
from dcam_jax.cam import explain as ex
from dcam_jax.models import config as C
from dcam_jax.models import llada, mllm
from dcam_jax.processing.image import ImageGeometry

FLAGS = flags.FLAGS
flags.DEFINE_integer("d_model", 256, "LM width.")
flags.DEFINE_integer("n_layers", 6, "LM depth.")
flags.DEFINE_integer("n_heads", 4, "Attention heads.")
flags.DEFINE_integer("mlp_hidden", 768, "SwiGLU width.")
flags.DEFINE_integer("vocab", 4096, "Vocabulary size.")
flags.DEFINE_string("dtype", "float32", "float32 or bfloat16.")
flags.DEFINE_integer("text_tokens", 40, "Prompt text tokens besides the image.")
flags.DEFINE_integer("grid", 16, "High-res grid side (image tokens = base 8x8 + grid rows with newlines).")
flags.DEFINE_integer("answer_len", 32, "Answer length G.")
flags.DEFINE_integer("targets", 16, "Explained tokens T.")
flags.DEFINE_list("noise_samples", ["1", "4"], "K values for the noise probe.")
flags.DEFINE_integer("batch_size", 8, "Probe states per vmapped chunk (CamConfig.batch_size).")
flags.DEFINE_integer("repeats", 3, "Timed repeats.")


def _timed(fn):
    jax.block_until_ready(fn())
    ts = []
    for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv):
    del argv
    V = FLAGS.vocab
    lm = C.LMConfig(vocab_size=V, d_model=FLAGS.d_model, n_layers=FLAGS.n_layers, n_heads=FLAGS.n_heads,
                    n_kv_heads=FLAGS.n_heads, head_dim=FLAGS.d_model // FLAGS.n_heads, mlp_hidden=FLAGS.mlp_hidden,
                    max_seq_len=8192, mask_id=V - 1, eos_id=V - 2, pad_id=V - 2, bos_id=V - 3, eot_id=V - 4,
                    dtype=FLAGS.dtype)
    cfg = C.tiny_mllm(lm=lm)
    key = jax.random.key(0)
    lm_params = llada.init_lm_params(key, lm)
    params = {"lm": lm_params}
    g = FLAGS.grid
    geom = ImageGeometry((64, 64), 5, 8, (2, 2), (64, 64), (0, g, 0, g), (g, g), False)
    P = FLAGS.text_tokens + geom.num_image_tokens
    layout = mllm.image_layout(geom, FLAGS.text_tokens // 2)
    emb = (0.02 * jax.random.normal(jax.random.key(1), (P, lm.d_model))).astype(jnp.dtype(lm.dtype))
    rng = np.random.default_rng(0)
    G, T = FLAGS.answer_len, FLAGS.targets
    answer = rng.integers(0, V - 8, G).astype(np.int32)
    commit = rng.permutation(G).astype(np.int32) // 2
    targets = list(range(T))
    base = ex.CamConfig(layer=lm.n_layers // 3, refine="none", batch_size=FLAGS.batch_size, attention="full")

    def run(cam, tg):
        return ex.raw_token_maps(params, cfg, cam, emb, layout, answer, tg, commit_step=commit,
                                 key=jax.random.key(2))[0]

    clean = dataclasses.replace(base, probe="clean")
    t_one = _timed(lambda: run(clean, targets))
    t_per = _timed(lambda: [run(clean, [t]) for t in targets])
    decision = dataclasses.replace(base, probe="decision")
    t_dec = _timed(lambda: run(decision, targets))
    rules = {}
    for rule in attr.GRAD_RULES:
        cam = dataclasses.replace(decision, grad_rule=rule)
        rules[rule] = _timed(lambda cam=cam: run(cam, targets))
    noise = {}
    for k in (int(v) for v in FLAGS.noise_samples):
        cam = dataclasses.replace(base, probe="noise", num_noise_samples=k)
        noise[k] = _timed(lambda cam=cam: run(cam, targets))
    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}); LM {lm.n_layers}x{lm.d_model} vocab {V} {lm.dtype}; "
          f"sequence {P + G} tokens ({geom.num_image_tokens} image); T={T} targets, G={G}; "
          f"batch_size={FLAGS.batch_size}")
    print(f"{'variant':<36}{'median s':>10}{'s / token':>11}")
    rows = [("clean, all targets in one call", t_one), ("clean, one call per token", t_per),
            ("decision, one call", t_dec)] + [(f"noise x{k}, one call", t) for k, t in noise.items()] + \
        [(f"decision, {r}", t) for r, t in rules.items()]
    for name, t in rows:
        print(f"{name:<36}{t:>10.3f}{t / T:>11.4f}")
    print(f"speedup of one call over one call per token: {t_per / t_one:.2f}x")
    for r in attr.GRAD_RULES[1:]:
        print(f"decision {r} cost relative to standard: {rules[r] / rules['standard']:.2f}x")
    ks = sorted(noise)
    for k in ks[1:]:
        print(f"noise x{k} cost relative to x{ks[0]}: {noise[k] / noise[ks[0]]:.2f}x")


if __name__ == "__main__":
    from dcam_jax.cli import run_tool

    run_tool(main)
