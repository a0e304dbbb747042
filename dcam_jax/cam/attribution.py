"""Raw gradient CAMs of answer tokens at layer L, for many probe states and targets in one jitted call.

For a probe state x (the answer, some positions [MASK]) and a target answer position p with token y:

    A   = activation at layer L (residual stream after block L, or LLaVA-CAM's post-attention norm output)
    S   = score of y at p computed from A by the upper part of the network (blocks L+1..N, final norm, head)
    G   = dS/dA                                    (one reverse pass, ``jax.vjp`` of the upper part at A)
    map = aggregation(A[img], G[img])              [H, W], img = the view's positions from ImageLayout

The forward pass of a probe state is shared by every target explained at that state (the vjp closure is applied
to a vmapped batch of cotangents); states are batched with ``jax.lax.map`` in chunks of ``batch_size`` so memory
stays bounded at 8B scale.

Gradient rules (``GradSpec.grad_rule``, SPEC 4.3; the forward values never change):
  standard           the plain derivative
  conservative_norm  every RMSNorm above the hook (each block's two and the final norm) differentiated with its
                     1/rms factor held constant
  conservative       as conservative_norm, and the attention probabilities held constant (relevance reaches the
                     image tokens through the value path); with ``gxa`` this is gradient x input of a network whose
                     gates are frozen at their forward values, a conservative decomposition (Ali et al. 2022)

Aggregations (A, G: [H, W, C]):
  gxa                ReLU(sum_c G_c A_c)                              (per-token gradient x activation; HiResCAM)
  gradcam            ReLU(sum_c w_c A_c),  w_c = mean_hw G            (the Grad-CAM / paper formula)
  channel_relu_mean  mean_c ReLU(w_c A_c)                             (the authors' released code)
  layercam           ReLU(sum_c ReLU(G_c) A_c)
  gradcam_pp         ReLU(sum_c w_c A_c), w_c = sum_hw alpha ReLU(G),  alpha = G^2 / (2 G^2 + (sum_hw A) G^3)
Weights optionally use ReLU(G) first (``grad_relu``, the authors' code and LLaVA-CAM).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dcam_jax.models import llada
from dcam_jax.models.config import MLLMConfig

Params = dict[str, Any]

SCORES = ("logprob", "logit", "max_logit", "vocab_sum", "sum_logits")
AGGREGATIONS = ("gxa", "gradcam", "layercam", "gradcam_pp", "channel_relu_mean")
GRAD_RULES = llada.GRAD_RULES
HOOKS = ("residual", "post_attn_norm")


@dataclasses.dataclass(frozen=True)
class GradSpec:
    """Static description of one gradient-CAM computation (hashable: a jit static argument).

    Attributes:
      layer: block index L (0-based); the hooked activation belongs to this block.
      hook: "residual" (block output) or "post_attn_norm" (the MLP input of block L, LLaVA-CAM).
      attention: "full" or "prefix_lm" (the prompt, image included, is the prefix).
      score: "logprob" (log p(y | state) at p), "logit", "max_logit" (largest logit at p), "vocab_sum" (sum of
        all logits at p, the authors' score), "sum_logits" (sum over answer positions q of the logit of y_q at q;
        LLaVA-CAM; the same for every target).
      contrast: "none", "runner_up" (minus the score of the best other token at p) or "position" (minus the score
        of the contrast token at the contrast position given per target).
      aggregation: one of AGGREGATIONS.
      grad_relu: use ReLU(G) in the channel weights.
      grad_rule: one of GRAD_RULES: how the upper network's RMSNorms and attention softmax are differentiated.
    """

    layer: int
    hook: str = "residual"
    attention: str = "full"
    score: str = "logprob"
    contrast: str = "none"
    aggregation: str = "gradcam"
    grad_relu: bool = False
    grad_rule: str = "standard"

    def __post_init__(self):
        for name, value, allowed in (("hook", self.hook, HOOKS), ("score", self.score, SCORES),
                                     ("grad_rule", self.grad_rule, GRAD_RULES),
                                     ("aggregation", self.aggregation, AGGREGATIONS),
                                     ("contrast", self.contrast, ("none", "runner_up", "position")),
                                     ("attention", self.attention, llada.ATTENTION_MODES)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}; expected one of {allowed}")


def check_layer(layer: int, config: MLLMConfig) -> int:
    n = config.lm.n_layers
    if not isinstance(layer, (int, np.integer)) or not 0 <= layer < n:
        raise ValueError(f"layer={layer!r} is out of range: this model has blocks 0..{n - 1}")
    return int(layer)


def check_probe_valid(image_positions: np.ndarray, hidden_len: int, prefix_len: int) -> None:
    """Raise unless the hooked hidden state (``hidden_len`` tokens) holds the whole image span inside the prompt.

    A probe state is structurally valid only if every image token of the chosen view is a position of the hooked
    sequence; e.g. an answer-only pass over a prefix cache holds no image token at all.
    """
    lo, hi = int(image_positions.min()), int(image_positions.max())
    if lo < 0 or hi >= min(hidden_len, prefix_len):
        raise ValueError(
            f"probe state is not structurally valid: the image span [{lo}, {hi}] is not inside the hooked hidden "
            f"state of {hidden_len} tokens whose prompt part has {prefix_len} tokens. Explanations need a pass "
            "that holds the whole image span (the full sequence, not an answer-only cached step).")


# ----------------------------------------------------------------------------------------------------------
# aggregation


def aggregate(A: jax.Array, G: jax.Array, aggregation: str, grad_relu: bool = False) -> jax.Array:
    """Channel aggregation of activations and gradients. A, G: [H, W, C] -> map [H, W] float32 (not normalised)."""
    A = A.astype(jnp.float32)
    G = G.astype(jnp.float32)
    Gw = jax.nn.relu(G) if grad_relu else G
    if aggregation == "gradcam":
        return jax.nn.relu(jnp.einsum("hwc,c->hw", A, Gw.mean(axis=(0, 1))))
    if aggregation == "channel_relu_mean":
        return jax.nn.relu(A * Gw.mean(axis=(0, 1))).mean(-1)
    if aggregation == "layercam":
        return jax.nn.relu(jnp.sum(jax.nn.relu(G) * A, -1))
    if aggregation == "gxa":
        return jax.nn.relu(jnp.sum(Gw * A, -1))
    if aggregation == "gradcam_pp":
        g2, g3 = G * G, G * G * G
        denom = 2 * g2 + jnp.sum(A, axis=(0, 1), keepdims=True) * g3  # Grad-CAM++ Eq. 19: (sum_ab A_ab) G_ij^3
        alpha = jnp.where(denom != 0, g2 / jnp.where(denom != 0, denom, 1.0), 0.0)
        w = jnp.sum(alpha * jax.nn.relu(G), axis=(0, 1))
        return jax.nn.relu(jnp.einsum("hwc,c->hw", A, w))
    raise ValueError(f"aggregation={aggregation!r}; expected one of {AGGREGATIONS}")


# ----------------------------------------------------------------------------------------------------------
# the forward split at layer L


def _answer_rows_above(layers: Params, cfg, rule: str, h: jax.Array, start: int, positions, bias, P: int):
    """Blocks ``start`` .. N-1 from the residual stream h [1, T, D] entering block ``start``, returning the final
    hidden state of the answer rows only, [1, T - P, D]. Every score reads only those rows, so the top block
    computes its prompt rows' keys and values and nothing else (:func:`llada.block_kv`)."""
    N = cfg.n_layers
    if start >= N:
        return h[:, P:]
    h = llada.run_blocks(layers, cfg, h, positions=positions, bias=bias, start=start, stop=N - 1, grad_rule=rule)
    lp = llada.layer_params(layers, N - 1)
    cos, sin = llada.rope_angles(positions, cfg.head_dim, cfg.rope_theta)
    kv_p = llada.block_kv(lp, h[:, :P], cos[:, :P], sin[:, :P], cfg, rule)
    if bias is not None and bias.shape[2] > 1:  # a bias with one query row (key padding only) holds for every row
        bias = bias[:, :, P:]
    out, _ = llada.block(lp, h[:, P:], cos[:, P:], sin[:, P:], bias, cfg, cache_kv=kv_p, grad_rule=rule)
    return out


def _lower_upper(lm: Params, cfg, spec: GradSpec, h0: jax.Array, positions, bias, P: int):
    """Return (A, upper) with A the hooked activation [1, T, D] and upper(A) -> the final hidden state of the
    answer rows (positions P onwards) [1, T - P, D]."""
    layers = lm["layers"]
    L, rule = spec.layer, spec.grad_rule
    if spec.hook == "residual":
        A = llada.run_blocks(layers, cfg, h0, positions=positions, bias=bias, stop=L + 1)

        def upper(a):
            return _answer_rows_above(layers, cfg, rule, a, L + 1, positions, bias, P)

        return A, upper
    h_in = llada.run_blocks(layers, cfg, h0, positions=positions, bias=bias, stop=L)
    lp = llada.layer_params(layers, L)
    cos, sin = llada.rope_angles(positions, cfg.head_dim, cfg.rope_theta)
    h_mid, _ = llada.attention_half(lp, h_in, cos, sin, bias, cfg)
    A = llada.mlp_norm(lp, h_mid, cfg)

    def upper(m):
        h = llada.mlp_half(lp, h_mid, m)
        return _answer_rows_above(layers, cfg, rule, h, L + 1, positions, bias, P)

    return A, upper


def _positions_and_valid(P: int, G: int, valid_len):
    """RoPE positions [1, P + G] and key mask ([1, P + G] bool, or None) of [prompt | answer] where the prompt's
    last ``P - valid_len`` rows are padding (``valid_len`` None: no padding). Padding rows are masked out as keys
    and the answer's positions continue right after the valid prompt, so the valid rows compute exactly what they
    compute without padding."""
    if valid_len is None:
        return jnp.arange(P + G, dtype=jnp.int32)[None], None
    valid_len = jnp.asarray(valid_len, jnp.int32)
    positions = jnp.concatenate([jnp.arange(P, dtype=jnp.int32), valid_len + jnp.arange(G, dtype=jnp.int32)])
    return positions[None], jnp.concatenate([jnp.arange(P) < valid_len, jnp.ones((G,), bool)])[None]


def _forward_split(lm: Params, cfg, spec: GradSpec, prompt_embeds: jax.Array, state: jax.Array, valid_len=None):
    """Forward [prompt | state] split at the hook: (A [1, T, D], the answer rows' final hidden state hN [1, G, D],
    vjp of hN wrt A). valid_len: None, or the number of real prompt rows when prompt_embeds is right-padded."""
    P = prompt_embeds.shape[0]
    ans_emb = llada.embed_tokens(lm, cfg, state[None])
    h0 = jnp.concatenate([prompt_embeds.astype(ans_emb.dtype)[None], ans_emb], axis=1)
    T = h0.shape[1]
    positions, key_valid = _positions_and_valid(P, T - P, valid_len)
    bias = llada.attention_bias(jnp.arange(T), T, attention=spec.attention,
                                prefix_len=P if spec.attention == "prefix_lm" else None, key_valid=key_valid)
    A, upper = _lower_upper(lm, cfg, spec, h0, positions, bias, P)
    hN, vjp_fn = jax.vjp(upper, A)
    return A, hN, vjp_fn


def _score(lm: Params, cfg, spec: GradSpec, hN: jax.Array, answer: jax.Array, answer_valid: jax.Array,
           pos, tok, cpos, ctok):
    """Scalar score of one target from the final hidden state of the answer rows hN [1, G, D] (float32)."""

    def logits_at(q):
        x = jax.lax.dynamic_slice_in_dim(hN, q, 1, axis=1)  # [1, 1, D]
        return llada.final_logits(lm, cfg, x, spec.grad_rule)[0, 0]  # [V]

    def one(q, y):
        lg = logits_at(q)
        if spec.score == "logprob":
            return jax.nn.log_softmax(lg)[y]
        if spec.score == "logit":
            return lg[y]
        if spec.score == "max_logit":
            return jnp.max(lg)
        if spec.score == "vocab_sum":
            return jnp.sum(lg)
        raise AssertionError(spec.score)

    if spec.score == "sum_logits":
        lg = llada.final_logits(lm, cfg, hN, spec.grad_rule)[0]  # [G, V]
        return jnp.sum(jnp.where(answer_valid, jnp.take_along_axis(lg, answer[:, None], 1)[:, 0], 0.0))
    s = one(pos, tok)
    if spec.contrast == "runner_up":
        lg = jax.lax.stop_gradient(logits_at(pos))
        runner = jnp.argmax(jnp.where(jnp.arange(lg.shape[0]) == tok, -jnp.inf, lg))
        s = s - one(pos, runner)
    elif spec.contrast == "position":
        s = s - one(cpos, ctok)
    return s


def state_maps(params: Params, config: MLLMConfig, spec: GradSpec, prompt_embeds: jax.Array,
               image_positions: jax.Array, state: jax.Array, answer: jax.Array, answer_valid: jax.Array,
               target_pos: jax.Array, target_tok: jax.Array, contrast_pos: jax.Array, contrast_tok: jax.Array,
               valid_len=None):
    """Raw maps of several targets at ONE probe state (one forward, one vmapped reverse pass).

    prompt_embeds: [P, D] (image spliced in), right-padded when ``valid_len`` (int scalar, the number of real
    prompt rows) is given; image_positions: [H, W] int sequence positions of the view;
    state: [G] answer ids at this probe state (mask ids where masked); answer: [G] the final answer ids;
    answer_valid: [G] bool, real answer tokens (for "sum_logits"); target_pos/target_tok/contrast_pos/contrast_tok:
    [Tg] int. Returns (maps [Tg, H, W] float32, not normalised; scores [Tg] float32).
    """
    lm, cfg = params["lm"], config.lm
    A, hN, vjp_fn = _forward_split(lm, cfg, spec, prompt_embeds, state, valid_len)

    def one_target(pos, tok, cpos, ctok):
        score_fn = lambda h: _score(lm, cfg, spec, h.astype(jnp.float32), answer, answer_valid,
                                    pos, tok, cpos, ctok)
        s, cot = jax.value_and_grad(score_fn)(hN)
        (G,) = vjp_fn(cot.astype(hN.dtype))
        return aggregate(A[0][image_positions], G[0][image_positions], spec.aggregation, spec.grad_relu), s

    return jax.vmap(one_target)(target_pos, target_tok, contrast_pos, contrast_tok)


@functools.partial(jax.jit, static_argnums=(1, 2))
def grad_activation_alignment(params: Params, config: MLLMConfig, spec: GradSpec, prompt_embeds: jax.Array,
                              image_positions: jax.Array, state: jax.Array, answer: jax.Array,
                              target_pos: jax.Array, target_tok: jax.Array):
    """How the score's gradient at each image token relates to that token's hooked activation (a diagnostic).

    Channel-weighted Grad-CAM needs a token's activation A_i to carry the direction the score's gradient G_i
    points to; when the upper network reads A only through RMSNorm, which is blind to each token's scale, G_i is
    orthogonal to A_i and the channel-weighted map loses the object's own terms. Same inputs as
    :func:`state_maps` (``spec.score`` / ``spec.attention`` / ``spec.hook`` / ``spec.layer`` are used; no
    contrast; the prompt at its exact length, no ``valid_len``). Returns (cos [Tg, H, W] = G_i . A_i /
    (|G_i| |A_i|), gnorm [Tg, H, W] = |G_i|, anorm [H, W] = |A_i|), float32. ``anorm`` shows the other way the
    channel-weighted map can fail: when the tokens the score does not depend on have much larger states than
    those it does (high-norm background tokens), sum_c w_c A_c is dominated by them.
    """
    lm, cfg = params["lm"], config.lm
    A, hN, vjp_fn = _forward_split(lm, cfg, spec, prompt_embeds, state)
    valid = jnp.ones(answer.shape, bool)
    a = A[0][image_positions].astype(jnp.float32)

    def one_target(pos, tok):
        score_fn = lambda h: _score(lm, cfg, spec, h.astype(jnp.float32), answer, valid, pos, tok, pos, tok)
        cot = jax.grad(score_fn)(hN)
        (G,) = vjp_fn(cot.astype(hN.dtype))
        g = G[0][image_positions].astype(jnp.float32)
        gn, an = jnp.linalg.norm(g, axis=-1), jnp.linalg.norm(a, axis=-1)
        den = gn * an
        return jnp.where(den > 0, jnp.sum(g * a, -1) / jnp.where(den > 0, den, 1.0), 0.0), gn

    cos, gn = jax.vmap(one_target)(target_pos, target_tok)
    return cos, gn, jnp.linalg.norm(a, axis=-1)


def _batched_state_maps(params, config, spec, batch_size, prompt_embeds, image_positions, states, answer,
                        answer_valid, target_pos, target_tok, contrast_pos, contrast_tok, share_prefix=True,
                        valid_len=None):
    """states: [S, G]; targets: [S, Tg]. -> (maps [S, Tg, H, W], scores [S, Tg]).

    With ``share_prefix`` and :func:`shares_prefix` true, the prompt runs forward once for all states (the maps are
    the same; ``share_prefix=False`` runs every state's whole sequence, the reference the benchmarks compare).
    valid_len: None, or the number of real rows of a right-padded prompt_embeds (see :func:`state_maps`)."""
    if share_prefix and shares_prefix(spec):
        prefix = _prefix_part(params["lm"], config.lm, spec, prompt_embeds, valid_len)

        def f(xs):
            st, tp, tt, cp, ct = xs
            return _prefix_state_maps(params["lm"], config.lm, spec, prefix, image_positions, st, answer,
                                      answer_valid, tp, tt, cp, ct)
    else:
        def f(xs):
            st, tp, tt, cp, ct = xs
            return state_maps(params, config, spec, prompt_embeds, image_positions, st, answer, answer_valid,
                              tp, tt, cp, ct, valid_len)

    return jax.lax.map(f, (states, target_pos, target_tok, contrast_pos, contrast_tok),
                       batch_size=min(batch_size, states.shape[0]))


batched_state_maps = jax.jit(_batched_state_maps, static_argnums=(1, 2, 3), static_argnames=("share_prefix",))


# ----------------------------------------------------------------------------------------------------------
# prefix-LM: the prompt's forward once for every probe state


def _prefix_part(lm: Params, cfg, spec: GradSpec, prompt_embeds: jax.Array, valid_len=None):
    """What no probe state changes under prefix-LM attention (the prompt never sees the answer): the prompt's
    hooked activation A_p [1, P, D], its keys and values below and above the hook ([L+1, 1, P, KV, Dh] and
    [N-L-1, 1, P, KV, Dh]), the vjp from the upper keys and values back to A_p, and ``valid_len``."""
    layers, L, P = lm["layers"], spec.layer, prompt_embeds.shape[0]
    h0 = prompt_embeds[None].astype(llada.compute_dtype(cfg))
    positions, key_valid = _positions_and_valid(P, 0, valid_len)
    bias = None if key_valid is None else llada.attention_bias(jnp.arange(P), P, key_valid=key_valid)
    A_p, kv_lo = llada.run_blocks(layers, cfg, h0, positions=positions, bias=bias, stop=L + 1, return_kv=True)
    N, rule = cfg.n_layers, spec.grad_rule

    def upper_kv(a):
        if L + 1 >= N:
            return llada.run_blocks(layers, cfg, a, positions=positions, start=N, return_kv=True)[1]
        # blocks L+1 .. N-2 whole; of the top block only the keys and values (nothing reads its prompt rows' output)
        h, (k, v) = llada.run_blocks(layers, cfg, a, positions=positions, bias=bias, start=L + 1, stop=N - 1,
                                     return_kv=True, grad_rule=rule)
        cos, sin = llada.rope_angles(positions, cfg.head_dim, cfg.rope_theta)
        kt, vt = llada.block_kv(llada.layer_params(layers, N - 1), h, cos, sin, cfg, rule)
        return jnp.concatenate([k, kt[None]]), jnp.concatenate([v, vt[None]])

    kv_up, vjp_p = jax.vjp(upper_kv, A_p)
    return A_p, kv_lo, kv_up, vjp_p, valid_len


def _prefix_state_maps(lm: Params, cfg, spec: GradSpec, prefix, image_positions, state, answer, answer_valid,
                       target_pos, target_tok, contrast_pos, contrast_tok):
    """:func:`state_maps` under prefix-LM attention given :func:`_prefix_part`: only the answer's rows run forward
    (over the cached prompt keys and values); each target's reverse pass goes from its score through the answer
    rows into the upper keys and values and then through the shared prompt vjp to A_p."""
    A_p, kv_lo, kv_up, vjp_p, valid_len = prefix
    layers, L, P, G = lm["layers"], spec.layer, A_p.shape[1], state.shape[0]
    positions, key_valid = _positions_and_valid(P, G, valid_len)
    positions = positions[:, P:]
    # answer queries see every key but a padded prompt's padding
    bias = None if key_valid is None else llada.attention_bias(jnp.arange(G), P + G, key_valid=key_valid)
    A_s = llada.run_blocks(layers, cfg, llada.embed_tokens(lm, cfg, state[None]), positions=positions, bias=bias,
                           stop=L + 1, cache_kv=kv_lo)

    def upper(kv):
        return llada.run_blocks(layers, cfg, A_s, positions=positions, bias=bias, start=L + 1, cache_kv=kv,
                                grad_rule=spec.grad_rule)

    hN, vjp_s = jax.vjp(upper, kv_up)

    def one_target(pos, tok, cpos, ctok):
        score_fn = lambda h: _score(lm, cfg, spec, h.astype(jnp.float32), answer, answer_valid,
                                    pos, tok, cpos, ctok)
        s, cot = jax.value_and_grad(score_fn)(hN)
        (dkv,) = vjp_s(cot.astype(hN.dtype))
        (G_p,) = vjp_p(dkv)
        return aggregate(A_p[0][image_positions], G_p[0][image_positions], spec.aggregation, spec.grad_relu), s

    return jax.vmap(one_target)(target_pos, target_tok, contrast_pos, contrast_tok)


def shares_prefix(spec: GradSpec) -> bool:
    """Whether :func:`batched_state_maps` runs the prompt once for all states: prefix-LM attention and the
    residual hook (LLaVA-CAM's post-attention hook takes the general path)."""
    return spec.attention == "prefix_lm" and spec.hook == "residual"


def normalize_maps(maps: jax.Array) -> jax.Array:
    """Min-max normalise each map of [..., H, W] to [0, 1]; a constant map becomes all zeros."""
    lo = maps.min(axis=(-2, -1), keepdims=True)
    hi = maps.max(axis=(-2, -1), keepdims=True)
    rng = hi - lo
    return jnp.where(rng > 0, (maps - lo) / jnp.where(rng > 0, rng, 1.0), 0.0)
