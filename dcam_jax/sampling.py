"""Masked-diffusion sampling (LLaDA / LLaDA-V / LaViDa) under ``jax.jit`` with a compact trajectory.

The answer of G tokens starts as all [MASK] and is split into ``G // block_length`` blocks decoded left to right
(semi-autoregressive). Each of the ``steps`` steps predicts every masked position at once, picks a token per
position (Gumbel-max at ``temperature``; argmax at 0) and commits the ``k_s`` most confident masked positions of the
current block, ``k_s`` coming from a transfer schedule precomputed on the host. Everything runs in one ``lax.scan``
over all steps (block index = step // steps_per_block) with static shapes.

The trajectory is recorded compactly (SPEC section 3): ``commit_step[b, g]`` is the step at which position g was
committed, so the state before step s is ``state_at_step(tokens, commit_step, s, mask_id)``.

Choices and deviations from the reference code (reference/backbones.md section 5), all deliberate:

* Top-k with a data-dependent k becomes a rank test: ``rank = argsort(argsort(-conf))`` with a stable sort, so
  among equal confidences the lower position wins (``torch.topk`` leaves ties unspecified).
* The [MASK] id is never sampled (its logit is -inf at masked positions, like LLaDA-V's blocked ids). A trained
  model gives it ~0 probability; excluding it keeps "masked" == "not yet committed" exact.
* Softmax, noise and confidences are float32 (the reference uses float64).
* More steps per block than tokens per block is an error (LLaDA would run no-op steps; LaViDa clamps
  ``step_per_block`` to ``block_length``); we refuse rather than silently change the step count.
* Decoding continues through EOS / <|eot_id|> as LLaDA and LaViDa do (the models fill the tail with EOS);
  LLaDA-V's text stop strings are host-side post-processing: :func:`answer_length`, :func:`trim_answer`.

Randomness (a contract the tests rely on): with a single ``key`` the row keys are ``jax.random.split(key, B)``;
with a batch of B keys row b uses ``key[b]``. At step s, ``k_s = fold_in(row_key, s)`` and
``k_gumbel, k_random = split(k_s)``; the Gumbel noise is ``jax.random.gumbel(k_gumbel, (G, V))`` and the
``random`` remasking scores are ``jax.random.uniform(k_random, (G,))``. So a batch equals a loop over its rows.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dcam_jax.models.config import LMConfig
from dcam_jax.models.llada import (PrefixCache, _split_params, answer_logits_cached, build_prefix_cache,
                                   embed_tokens, final_logits, lm_hidden)
from dcam_jax.processing.text import answer_length, trim_answer  # noqa: F401  (re-exported)

REMASKING = ("low_confidence", "random", "margin", "entropy")
SCHEDULES = ("uniform", "shift")
ATTENTION = ("full", "prefix_lm")
# LLaDA-V blocks these at masked positions (EOS, BOS, start/end header): pass as ``suppress_ids``.
LLADA_V_SUPPRESS_IDS = (126081, 126080, 126346, 126347)
_ENTROPY_EPS = 1e-10  # as the reference: sum p * log(p + eps)


@flax.struct.dataclass
class SampleResult:
    """Output of :func:`sample` (a pytree; ``num_steps`` is static).

    tokens: [B, G] int32, the final answer.
    commit_step: [B, G] int32, the step (0 .. S-1, counted over the whole answer) that committed each position.
    confidence: [B, G] float32, the remasking score with which each position was committed.
    step_confidence: [S, B, G] float32, per step the score of every candidate (masked and in the current block);
      -inf elsewhere (the array the top-k ran on).
    step_max_logit: [S, B, G] float32, per step the max over the vocabulary of the (noised) logits at every
      position: the reference's ``cam_logits`` (raw logits at T = 0; at T > 0 ``logits + T * gumbel``, the log of
      the reference's ``exp(logits) / (-log u)^T``).
    num_transfer: [S] int32, the transfer schedule (tokens committed at each step).
    states: [S + 1, B, G] int32 with ``debug=True`` (states[s] = answer before step s), else None.
    step_logits: [S, B, G, V] float32 with ``debug=True`` (the model's logits at each step), else None.
    num_steps: S (static int).
    """

    tokens: jax.Array
    commit_step: jax.Array
    confidence: jax.Array
    step_confidence: jax.Array
    step_max_logit: jax.Array
    num_transfer: jax.Array
    states: Any = None
    step_logits: Any = None
    num_steps: int = flax.struct.field(pytree_node=False, default=0)


# --------------------------------------------------------------------------------------------------------
# host-side schedules


def _linspace01_f32(n: int) -> np.ndarray:
    """``torch.linspace(0, 1, n)`` in float32 as torch computes it: step = 1/(n-1) rounded to float32, the first
    half ``step * i``, the second half ``1 - step * (n-1-i)``, each a fused multiply-add (one rounding). The
    products and differences are exact in float64, so rounding once to float32 reproduces the fma. -> [n]."""
    step = np.float64(np.float32(1.0) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    lo = step * i
    hi = 1.0 - step * (n - 1 - i)
    return np.where(i < n // 2, lo, hi).astype(np.float32)


def transfer_schedule(num_tokens: int, steps: int, schedule: str = "uniform", shift: float = 3.0) -> np.ndarray:
    """How many tokens to commit at each step of one block -> [steps] int32 summing to ``num_tokens``.

    ``uniform`` (LLaDA ``get_num_transfer_tokens``): base = n // steps, the first n % steps steps get one more.
    ``shift`` (LaViDa ``get_num_transfer_tokens_sch``): t = linspace(0, 1, steps + 1) in float32,
    s(t) = shift * t / (1 + (shift - 1) * t), counts = diff(int(s * n)) clamped to >= 1, the excess removed one at
    a time cycling from the front and skipping ones, then reversed. shift > 1 commits few tokens early and many
    late; shift < 1 the opposite. Computed in float32 exactly as the reference does.
    Requires 1 <= steps <= num_tokens (every step commits at least one token).
    """
    if not isinstance(num_tokens, (int, np.integer)) or num_tokens < 1:
        raise ValueError(f"transfer_schedule: num_tokens={num_tokens!r} must be a positive int")
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= num_tokens:
        raise ValueError(f"transfer_schedule: steps={steps!r} must be an int in [1, num_tokens={num_tokens}]; "
                         "more steps than tokens would leave steps that commit nothing")
    n = int(num_tokens)
    if schedule == "uniform":
        counts = np.full(steps, n // steps, np.int64)
        counts[: n % steps] += 1
        return counts.astype(np.int32)
    if schedule != "shift":
        raise ValueError(f"schedule={schedule!r}; expected one of {SCHEDULES}")
    if not (isinstance(shift, (int, float, np.floating)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift={shift!r} must be a finite number > 0 (LaViDa uses 3, or 0.33 for COCO)")
    t = _linspace01_f32(steps + 1)
    # float32 throughout, as torch does with a float32 tensor and Python-float scalars
    sig = (np.float32(shift) * t) / (np.float32(1.0) + np.float32(shift - 1.0) * t)
    cum = (sig * np.float32(n)).astype(np.int64)  # truncation toward zero, as .to(int64)
    counts = np.maximum(np.diff(cum), 1)
    excess = int(counts.sum()) - n
    j = 0
    while excess > 0:  # same walk as the reference: cyclic from the front, skipping entries already at 1
        j %= len(counts)
        if counts[j] != 1:
            counts[j] -= 1
            excess -= 1
        j += 1
    if counts.sum() != n or counts.min() < 1:  # cannot happen for 1 <= steps <= n; guards the invariant
        raise AssertionError(f"transfer_schedule: internal error, counts {counts} do not sum to {n}")
    return counts[::-1].astype(np.int32)


def _check_lengths(gen_length, block_length, steps) -> tuple[int, int]:
    for name, v in (("gen_length", gen_length), ("block_length", block_length), ("steps", steps)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive int")
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} is not divisible by block_length={block_length}; "
                         "choose block_length among the divisors of gen_length")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps={steps} is not divisible by the number of blocks {num_blocks} "
                         f"(gen_length={gen_length} // block_length={block_length}); use a multiple of {num_blocks}")
    spb = steps // num_blocks
    if spb > block_length:
        raise ValueError(f"steps={steps} gives {spb} steps per block, more than block_length={block_length} tokens "
                         f"per block; use steps <= gen_length={gen_length} (each step must commit a token)")
    return num_blocks, spb


def answer_schedule(gen_length: int, block_length: int, steps: int, schedule: str = "uniform",
                    shift: float = 3.0) -> np.ndarray:
    """Transfer counts for the whole answer -> [steps] int32: the block schedule repeated for every block.

    Every block starts fully masked, so all blocks share one schedule of ``block_length`` tokens in
    ``steps // num_blocks`` steps (see :func:`transfer_schedule`).
    """
    num_blocks, spb = _check_lengths(gen_length, block_length, steps)
    return np.tile(transfer_schedule(block_length, spb, schedule, shift), num_blocks)


# --------------------------------------------------------------------------------------------------------
# trajectory helpers


def state_at_step(tokens: jax.Array, commit_step: jax.Array, s, mask_id: int) -> jax.Array:
    """The answer before step ``s``: committed positions keep their token, the rest are [MASK].

    tokens, commit_step: [..., G] int; s: int or int array broadcastable to [..., G] (may be traced, e.g. under
    vmap over steps, or ``commit_step[p]`` for the state that decided position p). s = 0 is all masks,
    s = num_steps the final answer. -> [..., G] int32.
    """
    s = jnp.asarray(s)
    return jnp.where(commit_step < s, tokens, mask_id).astype(jnp.int32)




# --------------------------------------------------------------------------------------------------------
# the jitted sampler


def _row_keys(key, batch: int):
    """Per-row PRNG keys from a single key or a batch of ``batch`` keys (typed or raw uint32[2])."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    if not typed:
        if key.dtype != jnp.uint32 or key.shape[-1:] != (2,):
            raise ValueError(f"key: expected a jax.random.key, a raw uint32 key of shape (2,) or a batch of {batch} "
                             f"keys, got {key.dtype} {key.shape}")
        key = jax.random.wrap_key_data(key)  # one dtype for both kinds, so both share one compilation
    if key.ndim == 0:
        return jax.random.split(key, batch)
    if key.ndim == 1 and key.shape[0] == batch:
        return key
    raise ValueError(f"key: expected a single key or a batch of {batch} keys (one per prompt), "
                     f"got a key array of shape {key.shape}")


def _confidence(logits, x0, remasking: str, k_random):
    """Remasking scores [B, G] float32 from logits [B, G, V] and the chosen tokens x0 [B, G]."""
    if remasking == "random":
        G = logits.shape[1]
        return jax.vmap(lambda k: jax.random.uniform(k, (G,), jnp.float32))(k_random)
    p = jax.nn.softmax(logits, axis=-1)
    if remasking == "low_confidence":
        return jnp.take_along_axis(p, x0[..., None], axis=-1)[..., 0]
    if remasking == "margin":
        top2 = jax.lax.top_k(p, 2)[0]
        return top2[..., 0] - top2[..., 1]
    # entropy: sum p log p (negative entropy; higher = more confident), as the reference
    return jnp.sum(p * jnp.log(p + _ENTROPY_EPS), axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "gen_length", "block_length", "steps_per_block", "remasking",
                                             "attention", "prefix_cache", "use_noise", "suppress", "debug"))
def _sample_core(lm, prompt, valid_len, row_keys, counts, temperature, *, cfg: LMConfig, gen_length: int,
                 block_length: int, steps_per_block: int, remasking: str, attention: str, prefix_cache: bool,
                 use_noise: bool, suppress: tuple[int, ...], debug: bool):
    """prompt: [B, P] int ids or [B, P, D] embeddings; counts: [S] int32. Returns the fields of SampleResult."""
    h_prompt = embed_tokens(lm, cfg, prompt) if prompt.ndim == 2 else prompt.astype(jnp.dtype(cfg.dtype))
    B, P = h_prompt.shape[:2]
    G, V, S = gen_length, cfg.vocab_size, counts.shape[0]
    mask_id = cfg.mask_id

    if prefix_cache:
        cache: PrefixCache = build_prefix_cache(lm, cfg, h_prompt, valid_len=valid_len)

        def answer_logits(x):
            return answer_logits_cached(lm, cfg, cache, embed_tokens(lm, cfg, x))
    else:
        next_pos = jnp.full((B,), P, jnp.int32) if valid_len is None else valid_len.astype(jnp.int32)
        prompt_pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
        # answer positions continue right after the valid prompt tokens (padding never shifts RoPE phases)
        positions = jnp.concatenate([prompt_pos, next_pos[:, None] + jnp.arange(G, dtype=jnp.int32)], axis=1)
        key_valid = None if valid_len is None else jnp.concatenate(
            [jnp.arange(P)[None, :] < valid_len[:, None], jnp.ones((B, G), bool)], axis=1)
        prefix_len = P if attention == "prefix_lm" else None

        def answer_logits(x):
            h0 = jnp.concatenate([h_prompt, embed_tokens(lm, cfg, x)], axis=1)
            h = lm_hidden(lm, cfg, inputs_embeds=h0, positions=positions, attention=attention,
                          prefix_len=prefix_len, key_valid=key_valid)
            return final_logits(lm, cfg, h[:, P:])  # head on the answer slice only

    banned = jnp.zeros((V,), bool).at[jnp.asarray(suppress, jnp.int32)].set(True)
    pos = jnp.arange(G)

    def step(carry, xs):
        x, commit, conf_commit = carry
        s, k = xs
        masked = x == mask_id  # [B, G]; exact because mask_id is never committed
        logits = answer_logits(x)  # [B, G, V] float32
        logits = jnp.where(masked[..., None] & banned, -jnp.inf, logits)
        step_keys = jax.vmap(lambda rk: jax.random.split(jax.random.fold_in(rk, s)))(row_keys)  # [B, 2]
        if use_noise:
            g = jax.vmap(lambda kk: jax.random.gumbel(kk, (G, V), jnp.float32))(step_keys[:, 0])
            noised = logits + temperature * g
        else:
            noised = logits
        x0 = jnp.argmax(noised, axis=-1).astype(jnp.int32)
        max_logit = jnp.max(noised, axis=-1)
        conf = _confidence(logits, x0, remasking, step_keys[:, 1]).astype(jnp.float32)
        blk = s // steps_per_block
        cand = masked & (pos >= blk * block_length) & (pos < (blk + 1) * block_length)
        conf_c = jnp.where(cand, conf, -jnp.inf)
        # rank test instead of top-k with a traced k; stable sort: ties go to the lower position
        order = jnp.argsort(-conf_c, axis=-1, stable=True)
        rank = jnp.argsort(order, axis=-1)
        sel = cand & (rank < k)
        x = jnp.where(sel, x0, x)
        commit = jnp.where(sel, s, commit)
        conf_commit = jnp.where(sel, conf, conf_commit)
        out = (conf_c, max_logit) + ((x, logits) if debug else ())
        return (x, commit, conf_commit), out

    init = (jnp.full((B, G), mask_id, jnp.int32), jnp.full((B, G), S, jnp.int32), jnp.zeros((B, G), jnp.float32))
    (x, commit, conf_commit), outs = jax.lax.scan(step, init, (jnp.arange(S, dtype=jnp.int32), counts))
    res = dict(tokens=x, commit_step=commit, confidence=conf_commit, step_confidence=outs[0],
               step_max_logit=outs[1], num_transfer=counts)
    if debug:
        res["states"] = jnp.concatenate([init[0][None], outs[2]], axis=0)
        res["step_logits"] = outs[3]
    return res


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _checked_prompt(prompt_ids, prompt_embeds, cfg) -> jax.Array:
    """Exactly one of prompt_ids [B, P] int and prompt_embeds [B, P, D] float, checked -> the prompt array."""
    if (prompt_ids is None) == (prompt_embeds is None):
        raise ValueError("pass exactly one of prompt_ids [B, P] (token ids) and prompt_embeds [B, P, D]")
    if prompt_ids is not None:
        prompt = jnp.asarray(prompt_ids)
        if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
            raise ValueError(f"prompt_ids must be an int array [B, P], got {prompt.dtype} {prompt.shape}")
        return prompt.astype(jnp.int32)
    prompt = jnp.asarray(prompt_embeds)
    if prompt.ndim != 3 or prompt.shape[-1] != cfg.d_model or not jnp.issubdtype(prompt.dtype, jnp.floating):
        raise ValueError(f"prompt_embeds must be a float array [B, P, {cfg.d_model}], "
                         f"got {prompt.dtype} {prompt.shape}")
    return prompt


def sample(params, config, prompt_ids=None, *, key, gen_length: int, block_length: int, steps: int,
           temperature: float = 0.0, remasking: str = "low_confidence", schedule: str = "uniform",
           shift: float = 3.0, attention: str = "full", prefix_cache: bool = False, prompt_embeds=None,
           valid_len=None, suppress_ids: Sequence[int] = (), debug: bool = False) -> SampleResult:
    """Masked-diffusion sampling of a G-token answer for B prompts (LLaDA, LLaDA-V, LaViDa semantics).

    Args:
      params: model params (with an "lm" entry) or the LM params. config: MLLMConfig or LMConfig.
      prompt_ids: [B, P] int token ids (text-only prompts); or
      prompt_embeds: [B, P, D] prompt embeddings from the multimodal assembly (exactly one of the two).
        The answer's [MASK]s and committed tokens are embedded with the LM's embedding table.
      key: a PRNG key (rows use ``split(key, B)``) or a batch of B keys (row b uses ``key[b]``).
      gen_length: G; block_length: tokens per semi-autoregressive block (divides G);
      steps: S, total steps over the answer (a multiple of G // block_length, at most G).
      temperature: Gumbel-max temperature (0 = argmax, no noise drawn).
      remasking: "low_confidence" (prob of the chosen token), "random", "margin" (top1 - top2 prob),
        "entropy" (sum p log p).
      schedule: "uniform" (LLaDA) or "shift" (LaViDa, with ``shift``); see :func:`transfer_schedule`.
      attention: "full" (LLaDA, LLaDA-V) or "prefix_lm" (LaViDa Prefix-DLM: prompt queries see only the prompt).
      prefix_cache: compute the prompt's keys/values once; each step runs only the G answer tokens
        (requires attention="prefix_lm"; same tokens and logits as without the cache).
      valid_len: [B] int, number of real tokens of right-padded prompts (padding masked out of attention; answer
        positions continue at valid_len). None: all P tokens are real.
      suppress_ids: token ids never sampled at masked positions (LLaDA-V: ``LLADA_V_SUPPRESS_IDS``); the [MASK]
        id is always suppressed.
      debug: also return the states [S+1, B, G] and per-step logits [S, B, G, V] (tests only: memory S*G*V).

    Returns:
      SampleResult (tokens [B, G], commit_step [B, G], confidence [B, G], step_confidence [S, B, G],
      step_max_logit [S, B, G], num_transfer [S], num_steps = S).

    For the multimodal models: ``sample(model.params, model.config, prompt_embeds=embeds, valid_len=lens, ...)``.
    """
    lm, cfg = _split_params(params, config)
    prompt = _checked_prompt(prompt_ids, prompt_embeds, cfg)
    B, P = prompt.shape[:2]
    if B < 1 or P < 1:
        raise ValueError(f"prompt must have at least one row and one token, got shape {prompt.shape}")
    num_blocks, spb = _check_lengths(gen_length, block_length, steps)
    if P + gen_length > cfg.max_seq_len:
        raise ValueError(f"prompt of {P} tokens + answer of gen_length={gen_length} = {P + gen_length} exceeds the "
                         f"model's max_seq_len={cfg.max_seq_len}; shorten the prompt or the answer")
    if remasking not in REMASKING:
        raise ValueError(f"remasking={remasking!r}; expected one of {REMASKING}")
    if attention not in ATTENTION:
        raise ValueError(f"attention={attention!r}; expected one of {ATTENTION}")
    if prefix_cache and attention != "prefix_lm":
        raise ValueError("prefix_cache=True needs attention='prefix_lm' (with full attention the prompt's keys "
                         "depend on the answer, so they cannot be cached)")
    if not isinstance(temperature, (int, float, np.floating)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be a finite float >= 0 (0 = argmax)")
    counts = answer_schedule(gen_length, block_length, steps, schedule, shift)
    suppress = tuple(sorted({int(i) for i in suppress_ids} | {cfg.mask_id}))
    bad = [i for i in suppress if not 0 <= i < cfg.vocab_size]
    if bad:
        raise ValueError(f"suppress_ids {bad} are outside the vocabulary [0, {cfg.vocab_size})")
    if len(suppress) >= cfg.vocab_size:
        raise ValueError("suppress_ids cover the whole vocabulary; nothing could be sampled")
    if valid_len is not None:
        valid_len = jnp.asarray(valid_len)
        if valid_len.shape != (B,) or not jnp.issubdtype(valid_len.dtype, jnp.integer):
            raise ValueError(f"valid_len must be an int array [B={B}], got {valid_len.dtype} {valid_len.shape}")
        if _is_concrete(valid_len):
            v = np.asarray(valid_len)
            if v.min() < 1 or v.max() > P:
                raise ValueError(f"valid_len values must be in [1, P={P}] (real prompt tokens per row), got {v}")
        valid_len = valid_len.astype(jnp.int32)
    row_keys = _row_keys(jnp.asarray(key) if not hasattr(key, "dtype") else key, B)
    out = _sample_core(lm, prompt, valid_len, row_keys, jnp.asarray(counts), jnp.float32(temperature), cfg=cfg,
                       gen_length=gen_length, block_length=block_length, steps_per_block=spb, remasking=remasking,
                       attention=attention, prefix_cache=bool(prefix_cache), use_noise=temperature > 0,
                       suppress=suppress, debug=bool(debug))
    return SampleResult(**out, num_steps=int(steps))
