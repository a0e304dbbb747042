"""FLOPs of the models' passes, counted from the shapes (no flags, no device work): the benchmarks report TFLOP/s
and GFLOP per explained token with them, and tests check them against XLA's cost analysis of small models."""

from __future__ import annotations

import numpy as np

from dcam_jax.cam import attribution as attr
from dcam_jax.cam import explain as ex
from dcam_jax.models import config as C

# FLOPs, counted from the shapes (XLA's cost analysis counts the body of a scan once, not once per layer or step):
# every matrix product counts 2 FLOPs per multiply-add; the attention scores and the probability-weighted values
# are counted over all Tq x Tk pairs, masked ones included (the implementation computes them); norms, RoPE,
# softmax, activations, embedding look-ups and the sampler's top-k are left out (well under 1% of the total here).


def block_flops(lm: C.LMConfig, tq: int, tk: int) -> tuple[int, int]:
    """(dense, attention) FLOPs of one LM block's forward for ``tq`` query tokens over ``tk`` keys."""
    qd, kvd = lm.n_heads * lm.head_dim, lm.n_kv_heads * lm.head_dim
    dense = 2 * tq * lm.d_model * (2 * qd + 2 * kvd + 3 * lm.mlp_hidden)  # q, k, v, o; gate, up, down
    return dense, 4 * tq * tk * qd  # Q K^T and P V


def lm_flops(lm: C.LMConfig, tq: int, tk: int, head_tokens: int) -> int:
    """One LM forward over ``tq`` queries and ``tk`` keys, the head applied at ``head_tokens`` positions."""
    return lm.n_layers * sum(block_flops(lm, tq, tk)) + 2 * head_tokens * lm.d_model * lm.vocab_size


def image_flops(cfg: C.MLLMConfig, n_views: int) -> int:
    """Tower (patch embedding, encoder layers) and projector over ``n_views`` views."""
    v, D = cfg.vision, cfg.lm.d_model
    P, W, M = v.num_patches, v.width, v.mlp_dim
    layer = 2 * P * (4 * W * W + 2 * W * M) + 4 * P * P * W
    return n_views * (2 * P * v.patch_size ** 2 * 3 * W + v.depth * layer + 2 * P * (W * D + D * D))


def sampling_flops(lm: C.LMConfig, P: int, G: int, steps: int, prefix_cache: bool) -> int:
    """Every step runs the LM (head on the G answer positions); with the cache the prompt runs once alone and a
    step runs only the answer's G queries over the P + G keys."""
    if prefix_cache:
        return lm.n_layers * sum(block_flops(lm, P, P)) + steps * lm_flops(lm, G, P + G, G)
    return steps * lm_flops(lm, P + G, P + G, G)


def _reverse_flops(lm: C.LMConfig, tq: int, tk: int, grad_rule: str) -> int:
    """One block's reverse pass for ``tq`` queries over ``tk`` keys with respect to the activations only (no weight
    gradients: each dense product once more). The reverse attention is dV, dP, dQ, dK (twice the forward's
    products); under the ``conservative`` rule the probabilities are held, so only dV = P^T dO remains and no
    gradient reaches the Q and K projections."""
    dense, attn = block_flops(lm, tq, tk)
    if grad_rule == "conservative":
        return dense - 2 * tq * lm.d_model * (lm.n_heads + lm.n_kv_heads) * lm.head_dim + attn // 2
    return dense + 2 * attn


def _kv_flops(lm: C.LMConfig, rows: int, grad_rule: str | None = None) -> int:
    """The key and value projections of ``rows`` tokens: their forward (``grad_rule`` None), or their reverse with
    respect to the input (under ``conservative`` only the values', as no gradient reaches the keys)."""
    kvd = lm.n_kv_heads * lm.head_dim
    return 2 * rows * lm.d_model * kvd * (1 if grad_rule == "conservative" else 2)


def attribution_flops(lm: C.LMConfig, P: int, G: int, layer: int, grad_rule: str, states: int,
                      targets_per_state: int) -> int:
    """Whole-sequence path: per probe state the forward of all S = P + G tokens, except that the top block computes
    only its prompt rows' keys and values (every score reads answer rows only); per target the head at the target
    and its gradient, then blocks L+1 .. N-1 in reverse (:func:`_reverse_flops`), the top block again for the
    answer rows and the prompt rows' keys and values only."""
    S, N, head = P + G, lm.n_layers, 2 * lm.d_model * lm.vocab_size
    upper = N - layer - 1
    if upper == 0:
        return states * (lm_flops(lm, S, S, 0) + targets_per_state * 2 * head)
    forward = (N - 1) * sum(block_flops(lm, S, S)) + _kv_flops(lm, P) + sum(block_flops(lm, G, S))
    reverse = ((upper - 1) * _reverse_flops(lm, S, S, grad_rule) + _reverse_flops(lm, G, S, grad_rule)
               + _kv_flops(lm, P, grad_rule))
    return states * (forward + targets_per_state * (2 * head + reverse))


def attribution_flops_shared(lm: C.LMConfig, P: int, G: int, layer: int, grad_rule: str, states: int,
                             targets_per_state: int) -> int:
    """Prefix-LM path (``attribution.shares_prefix``): the prompt's P tokens run forward once, of its top block only
    the keys and values; per state only the G answer tokens run forward (over P + G keys); per target the head and
    its gradient, then blocks L+1 .. N-1 in reverse for the answer rows and, through the prompt's keys and values,
    for the prompt rows (of the top block only the key and value projections)."""
    N, head = lm.n_layers, 2 * lm.d_model * lm.vocab_size
    upper = N - layer - 1
    per_target = 2 * head + upper * _reverse_flops(lm, G, P + G, grad_rule)
    if upper:
        per_target += (upper - 1) * _reverse_flops(lm, P, P, grad_rule) + _kv_flops(lm, P, grad_rule)
        prompt = (N - 1) * sum(block_flops(lm, P, P)) + _kv_flops(lm, P)
    else:
        prompt = N * sum(block_flops(lm, P, P))
    return prompt + states * (N * sum(block_flops(lm, G, P + G)) + targets_per_state * per_target)


def raw_token_maps_flops(cam, lm: C.LMConfig, P: int, answer: np.ndarray, targets, commit_step: np.ndarray) -> int:
    """FLOPs of ``explain.raw_token_maps(...)`` for ``targets`` on the path it takes: the prompt padded to its
    bucket (``explain.prompt_bucket``), the probe states it runs (padded to ``cam.batch_size``), the target rows
    per state (padded to 1, 2, 4, 8k) and the shared-prompt path where ``attribution.shares_prefix`` holds. The
    padding rows count as work (they are computed). Residual hook and a plain score as in
    :func:`attribution_flops` (a contrast's second head pass and the ``post_attn_norm`` hook's MLP are not
    counted). cam: a resolved CamConfig; P: the prompt's length before padding; answer, commit_step: [G]."""
    _, _, groups = ex._probe_states(cam, answer, np.asarray(targets), commit_step, None, lm.mask_id)
    states = len(groups) if len(groups) == 1 else -(-len(groups) // cam.batch_size) * cam.batch_size
    per_state = ex._padded_length(max(len(g) for g in groups), 8)
    flops = attribution_flops_shared if attr.shares_prefix(ex.grad_spec(cam)) else attribution_flops
    return flops(lm, ex.prompt_bucket(P), len(answer), cam.layer, cam.grad_rule, states, per_state)
