"""Our attribution pass against the authors' way in PyTorch, on the very same weights, measured in one run.

The authors explain a token with one full forward and one backward in PyTorch eager mode, a hook retaining the
gradient of the layer-L hidden state. This script builds transformers' ``LlamaForCausalLM`` from the same random
LaViDa-shaped LM parameters our JAX model uses (float32; LaViDa's prefix-LM attention, or bidirectional with
``--attention=full``, through an explicit 4-D mask), then

1. checks that the torch maps equal ours (per-token gradient x activation: HiResCAM's raw maps) for the
   ``clean`` and ``decision`` probes, to 1e-4 of the largest map value, for each gradient rule of ``--rules``:
   ``standard``, and ``conservative`` (the default method's) with the same detachments in torch above the hooked
   block (``tests/torch_refs.hold_gates``: held 1/rms factors and attention probabilities);
2. times, as medians over ``--repeats`` after a warm-up, seconds per explained token for:
   - torch, one forward + backward per token, with SDPA attention (the fastest correct path; under the
     conservative rule SDPA below the hook, eager with held probabilities above it) and, with ``--eager``, eager;
   - JAX, one jitted call per token;
   - JAX, all tokens in one call (vmapped probe states; one forward per distinct state: one for ``clean``, one
     per denoising step for ``decision``; under prefix-LM the prompt's forward once for all states);
   and prints the ratios;
3. prints each variant's FLOPs per token, counted from the shapes on the path it takes, and the GFLOP/s it
   reaches: how much work each way does, and how fast each runtime does it.

Usage:
  python benchmarks/torch_reference.py                  # ~830 image tokens + 40 text + a 64-token answer
  python benchmarks/torch_reference.py --grid=8 --answer_len=16 --targets=4 --repeats=1   # a quick run
Random weights, nothing downloaded; needs the test extras (torch==2.13.0 CPU, transformers).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
from absl import flags

import _flops
import _lm_bench
from dcam_jax.cam import probes
from dcam_jax.cam import config as cam_config
from dcam_jax.cam import explain as ex

REPO = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
_lm_bench.define_flags(grid=27, answer_len=64)
flags.DEFINE_integer("layer", 2, "Hooked block L.")
flags.DEFINE_enum("attention", "prefix_lm", ["prefix_lm", "full"], "LaViDa's prefix-LM attention (the prompt does not "
                  "see the answer) or bidirectional (LLaDA-V).")
flags.DEFINE_multi_enum("rules", ["standard", "conservative"], ["standard", "conservative_norm", "conservative"],
                        "Gradient rules to compare (repeat the flag). torch runs the conservative rules with the same "
                        "detachments above the hooked block (tests/torch_refs.hold_gates).")
flags.DEFINE_boolean("eager", True, "Also time torch with transformers' eager attention (the slower correct path).")
_timed = _lm_bench.timed


def torch_token_flops(lm, S: int, layer: int, grad_rule: str) -> int:
    """FLOPs of the authors' way for one token, counted from the shapes (``_flops.block_flops``): the forward of
    all S tokens with logits at every position, then a backward through every block and the head that computes
    activation and weight gradients (the weights require gradients), the attention's reverse being twice its
    forward. Under ``conservative`` the blocks above ``layer`` hold their attention probabilities: their reverse
    attention is only dV = P^T dO, and no gradient reaches their query and key projections."""
    dense, attn = _flops.block_flops(lm, S, S)
    head = 2 * S * lm.d_model * lm.vocab_size
    upper = lm.n_layers - layer - 1
    full_bwd = 2 * dense + 2 * attn
    if grad_rule == "conservative":
        qk = 2 * S * lm.d_model * (lm.n_heads + lm.n_kv_heads) * lm.head_dim
        upper_bwd = 2 * (dense - qk) + attn // 2
    else:
        upper_bwd = full_bwd
    return lm.n_layers * (dense + attn) + 3 * head + (lm.n_layers - upper) * full_bwd + upper * upper_bwd


def main(argv):
    del argv
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from torch_refs import hold_gates, layer_state_and_grad, llama_from_lm_params

    b = _lm_bench.build()
    lm, cfg, params, geom, layout, emb, P = b.lm, b.cfg, b.params, b.geom, b.layout, b.emb, b.P
    pos = np.asarray(layout.positions())  # [H, W] sequence positions of the explained view
    V, G, T, L = FLAGS.vocab, FLAGS.answer_len, FLAGS.targets, FLAGS.layer
    answer, commit, targets = b.answer, b.commit, b.targets
    probes_ = ("clean", "decision")
    cams = {(rule, probe): cam_config.resolve(cam_config.CamConfig(
        method="hirescam", layer=L, refine="none", batch_size=FLAGS.batch_size, attention=FLAGS.attention,
        grad_rule=rule, probe=probe), cfg) for rule in FLAGS.rules for probe in probes_}

    def jax_maps(rule, probe, tg):
        return ex.raw_token_maps(params, cfg, cams[rule, probe], emb, layout, answer, tg, commit_step=commit)[0]

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
    models = {}  # (rule, attention implementation) -> model; the held gates above L for the conservative rules
    for rule in FLAGS.rules:
        for impl in ("sdpa", "eager") if FLAGS.eager else ("sdpa",):
            m = llama_from_lm_params(lm, p_np, dtype=torch.float32, attn_implementation=impl)
            if rule != "standard":
                hold_gates(m, L, rule)
            models[rule, impl] = m

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
    for rule in FLAGS.rules:
        for probe in probes_:
            ours = np.asarray(jax_maps(rule, probe, targets))
            theirs = torch_all(models[rule, "sdpa"], probe)
            err = float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))
            print(f"parity, {rule} rule, {probe}: max |ours - torch| / max |torch| = {err:.2e} "
                  f"({'ok' if err <= 1e-4 else 'FAILED, over 1e-4'})")
            if err > 1e-4:
                raise SystemExit(f"the {rule} {probe} maps differ from the torch reference; timings would compare "
                                 "different computations")

    # ---- 2. timing, and the FLOPs per token of each variant counted from the shapes on the path each takes
    rows, flops = {}, {}
    for rule in FLAGS.rules:
        for probe in probes_:
            for impl in ("sdpa", "eager") if FLAGS.eager else ("sdpa",):
                name = f"torch {'SDPA' if impl == 'sdpa' else impl}, one backward per token, {rule}, {probe}"
                rows[name] = _timed(lambda m=models[rule, impl], probe=probe: torch_all(m, probe), block=False)
                flops[name] = torch_token_flops(lm, S, L, rule)
            name = f"JAX, one call per token, {rule}, {probe}"
            rows[name] = _timed(lambda rule=rule, probe=probe: [jax_maps(rule, probe, [t]) for t in targets])
            flops[name] = sum(_flops.raw_token_maps_flops(cams[rule, probe], lm, P, answer, [t], commit)
                              for t in targets) / T
            name = f"JAX, all tokens in one call, {rule}, {probe}"
            rows[name] = _timed(lambda rule=rule, probe=probe: jax_maps(rule, probe, targets))
            flops[name] = _flops.raw_token_maps_flops(cams[rule, probe], lm, P, answer, targets, commit) / T
    print(f"{'variant':<64}{'median s':>10}{'s / token':>11}{'GFLOP / token':>15}{'GFLOP/s':>9}")
    for name, t in rows.items():
        print(f"{name:<64}{t:>10.3f}{t / T:>11.4f}{flops[name] / 1e9:>15.2f}{flops[name] * T / t / 1e9:>9.1f}")
    for rule in FLAGS.rules:
        for probe in probes_:
            ref = rows[f"torch SDPA, one backward per token, {rule}, {probe}"]
            line = (f"{rule}, {probe}: JAX all-in-one-call is "
                    f"{ref / rows[f'JAX, all tokens in one call, {rule}, {probe}']:.2f}x faster per token than torch "
                    f"SDPA; JAX one-call-per-token {ref / rows[f'JAX, one call per token, {rule}, {probe}']:.2f}x")
            if FLAGS.eager:
                eager = rows[f"torch eager, one backward per token, {rule}, {probe}"]
                line += f"; torch eager / SDPA {eager / ref:.2f}x"
            print(line)


if __name__ == "__main__":
    from dcam_jax.tool import run_tool

    run_tool(main)
