"""Masked-diffusion sampler speed: Prefix-DLM cache vs the uncached prefix-LM pass (and full attention).

One run measures every variant side by side on the same random model and prompt: the first call (compile + one
run), then ``--repeats`` timed calls per variant, interleaved round-robin (``jax.block_until_ready``, compile
excluded); it prints medians, answer tokens per second and the speedup of the cache. Toy scale by default (runs on
a laptop CPU)::

    python benchmarks/sampling.py
    python benchmarks/sampling.py --d_model 4096 --n_layers 32 --n_heads 32 --head_dim 128 --mlp_hidden 12288 \\
        --vocab 126464 --dtype bfloat16 --prompt_len 1024      # LaViDa scale, on an accelerator
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dcam_jax import sampling as gen
from dcam_jax.models import llada
from dcam_jax.models.config import LMConfig


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--n_layers", type=int, default=4)
    ap.add_argument("--n_heads", type=int, default=4)
    ap.add_argument("--head_dim", type=int, default=64)
    ap.add_argument("--mlp_hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt_len", type=int, default=384)
    ap.add_argument("--gen_length", type=int, default=64)
    ap.add_argument("--block_length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--schedule", default="shift", choices=gen.SCHEDULES)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip_full", action="store_true", help="skip the full-attention (LLaDA) variant")
    return ap.parse_args(argv)


def _timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def main(argv=None):
    a = parse_args(argv)
    G = a.gen_length
    cfg = LMConfig(vocab_size=a.vocab, d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads,
                   n_kv_heads=a.n_heads, head_dim=a.head_dim, mlp_hidden=a.mlp_hidden,
                   max_seq_len=a.prompt_len + G, mask_id=a.vocab - 1, eos_id=a.vocab - 2, pad_id=a.vocab - 2,
                   bos_id=a.vocab - 3, eot_id=a.vocab - 4, dtype=a.dtype)
    params = llada.init_lm_params(jax.random.key(0), cfg)
    prompt = jax.random.randint(jax.random.key(1), (a.batch, a.prompt_len), 0, a.vocab - 4)
    common = dict(key=jax.random.key(2), gen_length=G, block_length=a.block_length, steps=a.steps,
                  temperature=a.temperature, schedule=a.schedule)
    variants = {
        "prefix_lm, no cache": dict(attention="prefix_lm", prefix_cache=False),
        "prefix_lm, prefix cache": dict(attention="prefix_lm", prefix_cache=True),
    }
    if not a.skip_full:
        variants["full attention (LLaDA)"] = dict(attention="full", prefix_cache=False)

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"model: d_model={a.d_model} layers={a.n_layers} heads={a.n_heads}x{a.head_dim} mlp={a.mlp_hidden} "
          f"vocab={a.vocab} dtype={a.dtype} ({cfg.num_params / 1e6:.1f}M params)")
    print(f"batch={a.batch} prompt={a.prompt_len} answer={G} block={a.block_length} steps={a.steps} "
          f"schedule={a.schedule} T={a.temperature} repeats={a.repeats}")
    print(f"{'variant':<26} {'first call s':>12} {'~compile s':>10} {'median s':>9} {'ms/step':>8} "
          f"{'answer tok/s':>12}")
    fns = {name: (lambda kw=kw: gen.sample(params, cfg, prompt, **common, **kw)) for name, kw in variants.items()}
    first = {name: _timed(fn) for name, fn in fns.items()}  # compile + one run
    # round-robin repeats: a shared, loaded machine then slows every variant alike
    times = {name: [] for name in fns}
    for _ in range(a.repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn)[1])
    med = {name: statistics.median(t) for name, t in times.items()}
    for name in fns:
        print(f"{name:<26} {first[name][1]:12.3f} {first[name][1] - med[name]:10.3f} {med[name]:9.4f} "
              f"{1e3 * med[name] / a.steps:8.2f} {a.batch * G / med[name]:12.1f}")
    plain, cached = "prefix_lm, no cache", "prefix_lm, prefix cache"
    paired = statistics.median(p / c for p, c in zip(times[plain], times[cached]))
    same = bool(np.array_equal(np.asarray(first[plain][0].tokens), np.asarray(first[cached][0].tokens)))
    print(f"speedup of the prefix cache: {med[plain] / med[cached]:.2f}x (ratio of medians), "
          f"{paired:.2f}x (median of paired ratios); identical tokens: {same}")

if __name__ == "__main__":
    main()
