"""Our attribution pass against the authors' way in PyTorch, on the very same weights, measured in one run.

The authors explain a token with one full forward and one backward in PyTorch eager mode, a hook retaining the
gradient of the layer-L hidden state. This script builds transformers' ``LlamaForCausalLM`` from the same random
LaViDa-shaped LM parameters our JAX model uses (float32; LaViDa's prefix-LM attention, or bidirectional with
``--attention=full``, through an explicit 4-D mask), then

1. checks that the torch maps equal ours (``standard`` gradient rule, per-token gradient x activation:
   HiResCAM's raw maps) for the ``clean`` and ``decision`` probes, to 1e-4 of the largest map value;
2. times, as medians over ``--repeats`` after a warm-up, seconds per explained token for:
   - torch, one forward + backward per token, with SDPA attention (the fastest correct path) and eager;
   - JAX, one jitted call per token;
   - JAX, all tokens in one call (vmapped probe states; one forward per distinct state: one for ``clean``, one
     per denoising step for ``decision``; under prefix-LM the prompt's forward once for all states);
   and prints the ratios.

Usage:
  python benchmarks/torch_reference.py                  # ~830 image tokens + 40 text + a 64-token answer
  python benchmarks/torch_reference.py --grid=8 --answer_len=16 --targets=4 --repeats=1   # a quick run
Random weights, nothing downloaded; needs the test extras (torch==2.13.0 CPU, transformers).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np
from absl import flags

import _lm_bench
from dcam_jax.cam import attribution as attr
from dcam_jax.cam import probes
from dcam_jax.cam import config as cam_config
from dcam_jax.cam import explain as ex

REPO = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
_lm_bench.define_flags(grid=27, answer_len=64)
flags.DEFINE_integer("layer", 2, "Hooked block L.")
flags.DEFINE_enum("attention", "prefix_lm", ["prefix_lm", "full"], "LaViDa's prefix-LM attention (the prompt does not "
                  "see the answer) or bidirectional (LLaDA-V).")
_timed = _lm_bench.timed


def main(argv):
    del argv
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from torch_refs import layer_state_and_grad, llama_from_lm_params

    b = _lm_bench.build()
    lm, cfg, params, geom, layout, emb, P = b.lm, b.cfg, b.params, b.geom, b.layout, b.emb, b.P
    pos = np.asarray(layout.positions())  # [H, W] sequence positions of the explained view
    V, G, T, L = FLAGS.vocab, FLAGS.answer_len, FLAGS.targets, FLAGS.layer
    answer, commit, targets = b.answer, b.commit, b.targets
    base = cam_config.CamConfig(method="hirescam", layer=L, refine="none", batch_size=FLAGS.batch_size,
                                attention=FLAGS.attention)

    def jax_maps(probe, tg):
        cam = dataclasses.replace(base, probe=probe)
        return ex.raw_token_maps(params, cfg, cam_config.resolve(cam, cfg), emb, layout, answer, tg,
                                 commit_step=commit)[0]

    decision_states = probes.decision_states(answer, commit, targets, lm.mask_id)  # [T, G]
    states = {"clean": np.repeat(answer[None], T, 0), "decision": decision_states}

    # ---- torch, the authors' way: one forward + backward per explained token
    p_np = jax.tree_util.tree_map(np.asarray, params["lm"])
    emb_t = torch.from_numpy(np.array(emb, np.float32))
    embed_t = torch.from_numpy(np.array(p_np["embed"], np.float32))
    S = P + G
    q_idx, k_idx = np.arange(S)[:, None], np.arange(S)[None, :]
    allowed = np.ones((S, S), bool) if FLAGS.attention == "full" else (q_idx >= P) | (k_idx < P)
    mask = torch.from_numpy(np.where(allowed, 0.0, -1e9).astype(np.float32))[None, None]  # [1, 1, S, S] additive
    models = {impl: llama_from_lm_params(lm, p_np, dtype=torch.float32, attn_implementation=impl)
              for impl in ("sdpa", "eager")}

    def torch_map(m, state, t):
        x = torch.cat([emb_t, embed_t[torch.from_numpy(state.astype(np.int64))]], 0)[None]
        A, Gr, _ = layer_state_and_grad(m, x, mask, L, P + t, answer[t])
        return np.maximum((A[pos] * Gr[pos]).sum(-1), 0.0)

    def torch_all(m, probe):
        return np.stack([torch_map(m, states[probe][k], t) for k, t in enumerate(targets)])

    # ---- 1. parity
    print(f"sequence {S} tokens ({geom.num_image_tokens} image, {FLAGS.text_tokens} text, answer {G}); LM "
          f"{lm.n_layers} x {lm.d_model}, vocab {V}, float32; {FLAGS.attention} attention; hook block {L}; T = {T} "
          f"explained tokens at {len(set(commit[targets].tolist()))} distinct decision steps")
    for probe in ("clean", "decision"):
        ours = np.asarray(jax_maps(probe, targets))
        theirs = torch_all(models["sdpa"], probe)
        err = float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))
        print(f"parity, {probe}: max |ours - torch| / max |torch| = {err:.2e} "
              f"({'ok' if err <= 1e-4 else 'FAILED, over 1e-4'})")
        if err > 1e-4:
            raise SystemExit(f"the {probe} maps differ from the torch reference; timings would compare different "
                             "computations")

    # ---- 2. timing
    rows = {}
    for probe in ("clean", "decision"):
        rows[f"torch SDPA, one backward per token, {probe}"] = _timed(
            lambda probe=probe: torch_all(models["sdpa"], probe), block=False)
        rows[f"torch eager, one backward per token, {probe}"] = _timed(
            lambda probe=probe: torch_all(models["eager"], probe), block=False)
        rows[f"JAX, one call per token, {probe}"] = _timed(
            lambda probe=probe: [jax_maps(probe, [t]) for t in targets])
        rows[f"JAX, all tokens in one call, {probe}"] = _timed(lambda probe=probe: jax_maps(probe, targets))
    print(f"{'variant':<52}{'median s':>10}{'s / token':>11}")
    for name, t in rows.items():
        print(f"{name:<52}{t:>10.3f}{t / T:>11.4f}")
    for probe in ("clean", "decision"):
        ref = rows[f"torch SDPA, one backward per token, {probe}"]
        print(f"{probe}: JAX all-in-one-call is {ref / rows[f'JAX, all tokens in one call, {probe}']:.2f}x faster "
              f"per token than torch SDPA; JAX one-call-per-token {ref / rows[f'JAX, one call per token, {probe}']:.2f}x"
              f"; torch eager / SDPA {rows[f'torch eager, one backward per token, {probe}'] / ref:.2f}x")


if __name__ == "__main__":
    from dcam_jax.tool import run_tool

    run_tool(main)
