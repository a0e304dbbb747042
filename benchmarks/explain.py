"""Cost of the attribution pass: all answer tokens in one call vs one call per token, and K noise samples vs one.

Prints medians (compile excluded) of the raw-map computation for T answer tokens of one answer:
  - "one call": every target in one jitted, vmapped call (probe "clean": one shared forward, T reverse passes);
  - "per token": T separate calls of the same jitted function, one target each (one forward + one reverse each);
  - "decision": probe "decision" (one forward per distinct decision state, T reverse passes, batched);
  - "noise xK": probe "noise" with K samples per target, and its cost relative to K = 1;
  - "decision, <rule>": the decision probe under each gradient rule (standard, conservative_norm, conservative),
    and the cost of each relative to standard (the rules change only the backward pass);
and seconds per explained token for each, with the ratios. Every variant uses the diffusion_cam preset (gxa
aggregation, conservative rule) unless its name says otherwise.

Then the decision probe for every answer token, under full and prefix-LM attention: the per-state path (one state
per token, each state's whole sequence run) against the library's path (tokens committed at one step share a
state; under prefix-LM the prompt runs forward once for all states), checked equal first. Last, three prompts of
nearby lengths: how many programs compile and how long the first calls take with the prompt padded to its bucket
(the default) and at its exact length.

Usage:
  python benchmarks/explain.py                       # CPU, a small random model
  python benchmarks/explain.py --d_model=4096 --n_layers=32 --vocab=126464 --dtype=bfloat16 --image_tokens=834
Random weights; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import _lm_bench
from dcam_jax.cam import attribution as attr
from dcam_jax.cam import config as cam_config
from dcam_jax.cam import explain as ex
from dcam_jax.cam import probes

FLAGS = flags.FLAGS
_lm_bench.define_flags(grid=16, answer_len=32)
flags.DEFINE_string("dtype", "float32", "float32 or bfloat16.")
flags.DEFINE_list("noise_samples", ["1", "4"], "K values for the noise probe.")
_timed = _lm_bench.timed


def main(argv):
    del argv
    b = _lm_bench.build(FLAGS.dtype)
    lm, cfg, params, geom, layout, emb, P = b.lm, b.cfg, b.params, b.geom, b.layout, b.emb, b.P
    V, G, T = FLAGS.vocab, FLAGS.answer_len, FLAGS.targets
    answer, commit, targets = b.answer, b.commit, b.targets
    base = cam_config.CamConfig(layer=lm.n_layers // 3, refine="none", batch_size=FLAGS.batch_size, attention="full")

    def run(cam, tg):
        return ex.raw_token_maps(params, cfg, cam_config.resolve(cam, cfg), emb, layout, answer, tg, commit_step=commit,
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
    _decision_paths(b, base)
    _prompt_lengths(b, base)


def _per_state_decision(b, cam, targets):
    """The decision probe as one state per target, every state's whole sequence run: raw maps [T, H, W]."""
    r = cam_config.resolve(cam, b.cfg)
    tg = np.asarray(targets, np.int32)
    S = len(tg)
    S2 = -(-S // r.batch_size) * r.batch_size
    col = lambda v: ex._pad_rows(np.asarray(v, np.int32)[:, None], 0, S2)
    spec = ex.grad_spec(r)
    maps, _ = attr.batched_state_maps(
        b.params, b.cfg, spec, r.batch_size, b.emb, jnp.asarray(b.layout.positions(r.view)),
        ex._pad_rows(probes.decision_states(b.answer, b.commit, tg, b.lm.mask_id), 0, S2), jnp.asarray(b.answer),
        jnp.ones(len(b.answer), bool), col(tg), col(b.answer[tg]), col(np.zeros(S)), col(np.zeros(S)),
        share_prefix=False)
    return maps[:S, 0]


def _decision_paths(b, base):
    G = len(b.answer)
    every = list(range(G))
    steps = len(set(b.commit.tolist()))
    print(f"\ndecision probe, all {G} answer tokens ({steps} denoising steps):")
    print(f"{'attention':<12}{'per-state path s/token':>24}{'library path s/token':>22}{'speedup':>9}{'max diff':>10}")
    for attention in ("full", "prefix_lm"):
        cam = dataclasses.replace(base, probe="decision", attention=attention)
        now = lambda: ex.raw_token_maps(b.params, b.cfg, cam_config.resolve(cam, b.cfg), b.emb, b.layout, b.answer,
                                        every, commit_step=b.commit)[0]
        ref = lambda: _per_state_decision(b, cam, every)
        a, r = np.asarray(now()), np.asarray(ref())
        diff = float(np.abs(a - r).max() / max(np.abs(r).max(), 1e-12))
        t_ref, t_now = _timed(ref), _timed(now)
        print(f"{attention:<12}{t_ref / G:>24.4f}{t_now / G:>22.4f}{t_ref / t_now:>8.2f}x{diff:>10.1e}")


def _prompt_lengths(b, base):
    """Three prompts of nearby lengths (4 and 8 more text rows) explained one after the other, with the prompt padded
    to its bucket (the library's default) and at its exact length: programs compiled and wall time of the three
    first calls (compile included), then the steady-state cost of each way."""
    cam = cam_config.resolve(dataclasses.replace(base, probe="decision"), b.cfg)
    extra = jax.random.normal(jax.random.key(3), (8, b.lm.d_model), b.emb.dtype) * 0.02
    embs = [jnp.concatenate([b.emb, extra[:n]]) for n in (0, 4, 8)]
    lengths = [int(e.shape[0]) for e in embs]
    print(f"\nprompts of {lengths} rows (buckets {[ex.prompt_bucket(n) for n in lengths]}), decision probe, "
          f"{len(b.targets)} targets:")
    print(f"{'prompt':<16}{'programs compiled':>19}{'first calls s':>15}{'of it XLA compile s':>21}{'median s':>10}")
    for bucket in (False, True):
        def call(e):
            return ex.raw_token_maps(b.params, b.cfg, cam, e, b.layout, b.answer, b.targets, commit_step=b.commit,
                                     bucket_prompt=bucket)[0]

        attr.batched_state_maps.clear_cache()  # nothing compiled by the sections above counts
        n0 = attr.batched_state_maps._cache_size()
        firsts = [_lm_bench.first_call(lambda e=e: call(e))[1:] for e in embs]
        compiled = attr.batched_state_maps._cache_size() - n0
        steady = _timed(lambda: call(embs[1]))
        print(f"{'bucketed' if bucket else 'exact length':<16}{compiled:>19}{sum(f[0] for f in firsts):>15.2f}"
              f"{sum(f[1] for f in firsts):>21.2f}{steady:>10.3f}")


if __name__ == "__main__":
    from dcam_jax.tool import run_tool

    run_tool(main)
