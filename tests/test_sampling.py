"""Masked-diffusion sampler: parity with a plain NumPy reimplementation of the reference loop, schedules,
determinism, batching, Prefix-DLM cache, trajectory bookkeeping, bad inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcam_jax import sampling as gen
from dcam_jax.models import config as C
from dcam_jax.models import llada

CFG = C.tiny_lm(n_layers=2)  # vocab 64: mask 63, eos 62, bos 61, eot 60
MASK = CFG.mask_id
# scale 0.5: logits well separated, so argmax and top-k are free of float near-ties
PARAMS = llada.init_lm_params(jax.random.key(0), CFG, scale=0.5)
# for the fp32 cache-vs-uncached logits check: at scale 0.5 the residual stream reaches ~100, where float32
# reassociation alone (different matmul shapes) moves logits by ~3e-5; at 0.2 it stays ~8 and the error ~4e-6
PARAMS_SMALL = llada.init_lm_params(jax.random.key(0), CFG, scale=0.2)
PROMPTS = np.asarray(jax.random.randint(jax.random.key(1), (2, 6), 0, 60), np.int32)

_lm_logits = jax.jit(llada.lm_logits, static_argnums=1, static_argnames=("attention",))


# --------------------------------------------------------------------------------------------------------
# independent references


def _torch_schedule(n, steps, schedule, shift):
    """Transcription of the references' schedules in torch (LLaDA uniform; LaViDa get_num_transfer_tokens_sch)."""
    torch = pytest.importorskip("torch")
    mask_num = torch.tensor([[n]])
    if schedule == "uniform":
        out = torch.zeros(1, steps, dtype=torch.int64) + mask_num // steps
        out[0, : int(mask_num[0, 0] % steps)] += 1
        return out[0].tolist()
    steps = int(min(steps, mask_num[0]))
    t = torch.linspace(0, 1, steps + 1)
    sig = shift * t / (1 + (shift - 1) * t)
    s = (sig * mask_num[0]).to(torch.int64)
    s = torch.clamp(s[1:] - s[:-1], 1, None)
    delta = s.sum() - mask_num[0]
    j = 0
    while delta > 0:
        j = j % len(s)
        if s[j] == 1:
            j += 1
            continue
        delta -= 1
        s[j] -= 1
        j += 1
    return s.flip(-1).tolist()


def _reference_sample(params, cfg, prompt, *, gen_length, block_length, steps, remasking, schedule, shift,
                      attention, temperature=0.0, key=None, suppress=()):
    """The reference sampler loop in NumPy/Python: full forward with lm_logits every step, float64 softmax,
    host-side top-k sorted by (-confidence, position). Randomness drawn with the documented key contract."""
    prompt = np.asarray(prompt)
    B, P = prompt.shape
    G, V = gen_length, cfg.vocab_size
    nb = G // block_length
    spb = steps // nb
    x = np.full((B, G), cfg.mask_id, np.int64)
    commit = np.full((B, G), -1, np.int64)
    banned = np.zeros(V, bool)
    banned[list(suppress) + [cfg.mask_id]] = True
    row_keys = jax.random.split(key, B) if key is not None else None
    s = 0
    for b in range(nb):
        k_sched = _torch_schedule(block_length, spb, schedule, shift)
        for i in range(spb):
            seq = np.concatenate([prompt, x], axis=1)
            logits = np.asarray(_lm_logits(params, cfg, jnp.asarray(seq), attention=attention,
                                           prefix_len=P if attention == "prefix_lm" else None), np.float64)[:, P:]
            masked = x == cfg.mask_id
            logits = np.where(masked[..., None] & banned, -np.inf, logits)
            noised = logits
            u = None
            if row_keys is not None:
                kk = [jax.random.split(jax.random.fold_in(rk, s)) for rk in row_keys]
                g = np.stack([np.asarray(jax.random.gumbel(k[0], (G, V)), np.float64) for k in kk])
                u = np.stack([np.asarray(jax.random.uniform(k[1], (G,)), np.float64) for k in kk])
                if temperature > 0:
                    noised = logits + temperature * g
            x0 = noised.argmax(-1)
            e = np.exp(logits - logits.max(-1, keepdims=True))
            p = e / e.sum(-1, keepdims=True)
            if remasking == "low_confidence":
                conf = np.take_along_axis(p, x0[..., None], -1)[..., 0]
            elif remasking == "random":
                conf = u
            elif remasking == "margin":
                srt = np.sort(p, -1)[..., ::-1]
                conf = srt[..., 0] - srt[..., 1]
            else:
                conf = (p * np.log(p + 1e-10)).sum(-1)
            lo, hi = b * block_length, (b + 1) * block_length
            for r in range(B):
                cand = [j for j in range(lo, hi) if masked[r, j]]
                pick = sorted(cand, key=lambda j: (-conf[r, j], j))[: k_sched[i]]
                x[r, pick] = x0[r, pick]
                commit[r, pick] = s
            s += 1
    return x, commit


# --------------------------------------------------------------------------------------------------------
# schedules


def test_shift_schedule_issue_arrays():
    want3 = [1] * 13 + [2, 1, 1, 2, 2, 1, 2, 2, 3, 2, 2, 3, 3, 4, 3, 4, 5, 5, 4]
    want033 = [6, 5, 5, 4, 4, 3, 3, 3, 2, 3, 2, 2, 2, 1, 2] + [1] * 17
    np.testing.assert_array_equal(gen.transfer_schedule(64, 32, "shift", 3.0), want3)
    np.testing.assert_array_equal(gen.transfer_schedule(64, 32, "shift", 0.33), want033)
    np.testing.assert_array_equal(gen.answer_schedule(64, 64, 32, "shift", 3.0), want3)
    assert gen.transfer_schedule(64, 32, "shift", 3.0).dtype == np.int32


def test_uniform_schedule_closed_form():
    np.testing.assert_array_equal(gen.transfer_schedule(10, 4), [3, 3, 2, 2])
    np.testing.assert_array_equal(gen.transfer_schedule(8, 8), [1] * 8)
    np.testing.assert_array_equal(gen.answer_schedule(12, 6, 4), [3, 3, 3, 3])
    np.testing.assert_array_equal(gen.answer_schedule(16, 8, 6), [3, 3, 2, 3, 3, 2])


def test_schedules_match_torch_reference():
    pytest.importorskip("torch")
    cases = [(n, s) for n in range(1, 17) for s in range(1, n + 1)]
    cases += [(n, s) for n in (31, 64, 100, 128) for s in sorted({1, 2, 3, 7, 16, 31, n // 2, n})]
    for n, s in cases:
        np.testing.assert_array_equal(gen.transfer_schedule(n, s, "uniform"), _torch_schedule(n, s, "uniform", 0),
                                      err_msg=f"uniform n={n} steps={s}")
        for shift in (3.0, 0.33, 2.0):
            np.testing.assert_array_equal(gen.transfer_schedule(n, s, "shift", shift),
                                          _torch_schedule(n, s, "shift", shift),
                                          err_msg=f"shift={shift} n={n} steps={s}")


# --------------------------------------------------------------------------------------------------------
# parity with the reference loop

PARITY_CASES = [
    # (gen_length, block_length, steps, remasking, schedule, shift, attention, prefix_cache, temperature, suppress)
    (16, 8, 8, "low_confidence", "uniform", 3.0, "full", False, 0.0, ()),
    (16, 16, 5, "margin", "uniform", 3.0, "full", False, 0.0, ()),
    (16, 16, 8, "entropy", "shift", 3.0, "prefix_lm", False, 0.0, ()),
    (16, 4, 8, "low_confidence", "shift", 0.33, "prefix_lm", True, 0.0, ()),
    (16, 8, 16, "random", "uniform", 3.0, "full", False, 0.0, ()),
    (16, 8, 8, "low_confidence", "uniform", 3.0, "full", False, 0.7, (62, 61, 0, 1, 2, 3)),
]


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: f"G{c[0]}-BL{c[1]}-S{c[2]}-{c[3]}-{c[4]}{c[5]}-"
                                                         f"{c[6]}{'-cache' if c[7] else ''}-T{c[8]}")
def test_matches_reference_loop(case):
    G, BL, S, rem, sch, shift, attn, cache, T, sup = case
    key = jax.random.key(7)
    r = gen.sample(PARAMS, CFG, PROMPTS, key=key, gen_length=G, block_length=BL, steps=S, temperature=T,
                   remasking=rem, schedule=sch, shift=shift, attention=attn, prefix_cache=cache, suppress_ids=sup)
    x, commit = _reference_sample(PARAMS, CFG, PROMPTS, gen_length=G, block_length=BL, steps=S, remasking=rem,
                                  schedule=sch, shift=shift, attention=attn, temperature=T, key=key, suppress=sup)
    np.testing.assert_array_equal(np.asarray(r.tokens), x)
    np.testing.assert_array_equal(np.asarray(r.commit_step), commit)
    assert r.num_steps == S and r.tokens.dtype == jnp.int32 and r.commit_step.dtype == jnp.int32
    assert not np.isin(np.asarray(r.tokens), list(sup) + [MASK]).any()
    # the answers are not degenerate (a reference that always agrees trivially would pass otherwise)
    assert len(np.unique(x)) > 4


# --------------------------------------------------------------------------------------------------------
# determinism, keys, batching


def _run(prompts, key, **kw):
    base = dict(gen_length=16, block_length=8, steps=8, temperature=1.0, remasking="random")
    base.update(kw)
    return gen.sample(PARAMS, CFG, prompts, key=key, **base)


def test_same_key_same_result_different_keys_differ():
    a = _run(PROMPTS, jax.random.key(3))
    b = _run(PROMPTS, jax.random.key(3))
    c = _run(PROMPTS, jax.random.key(4))
    for f in ("tokens", "commit_step", "confidence", "step_max_logit"):
        np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)))
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
    assert (np.asarray(a.commit_step) != np.asarray(c.commit_step)).any()


def test_raw_uint32_key_accepted():
    a = _run(PROMPTS, jax.random.PRNGKey(3))
    b = _run(PROMPTS, jax.random.wrap_key_data(jax.random.PRNGKey(3)))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


def test_batch_and_vmap_equal_loop():
    prompts = PROMPTS  # B = 2 shares its compilation with the tests above
    key = jax.random.key(9)
    keys = jax.random.split(key, 2)
    batch = _run(prompts, keys)
    single_key = _run(prompts, key)  # a single key means split(key, B)
    vm = jax.vmap(lambda p, k: _run(p[None], k[None]))(jnp.asarray(prompts), keys)
    for b in range(2):
        one = _run(prompts[b:b + 1], keys[b:b + 1])
        for f in ("tokens", "commit_step"):
            np.testing.assert_array_equal(np.asarray(getattr(batch, f))[b], np.asarray(getattr(one, f))[0])
            np.testing.assert_array_equal(np.asarray(getattr(single_key, f))[b], np.asarray(getattr(one, f))[0])
            np.testing.assert_array_equal(np.asarray(getattr(vm, f))[b, 0], np.asarray(getattr(one, f))[0])
        np.testing.assert_allclose(np.asarray(batch.confidence)[b], np.asarray(one.confidence)[0], rtol=1e-5)


# --------------------------------------------------------------------------------------------------------
# Prefix-DLM cache and trajectory (one debug run shared by several tests)


@functools.lru_cache(maxsize=None)
def _debug_pair(padded: bool):
    prompts, valid = PROMPTS, None
    if padded:  # row 0 has 4 real tokens, row 1 all 6
        prompts = PROMPTS.copy()
        prompts[0, 4:] = CFG.pad_id
        valid = np.asarray([4, 6], np.int32)
    kw = dict(key=jax.random.key(11), gen_length=16, block_length=8, steps=8, remasking="low_confidence",
              schedule="shift", shift=3.0, attention="prefix_lm", valid_len=valid, debug=True)
    return (gen.sample(PARAMS_SMALL, CFG, prompts, prefix_cache=False, **kw),
            gen.sample(PARAMS_SMALL, CFG, prompts, prefix_cache=True, **kw))


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "right-padded"])
def test_prefix_cache_equals_uncached(padded):
    plain, cached = _debug_pair(padded)
    np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(plain.tokens))
    np.testing.assert_array_equal(np.asarray(cached.commit_step), np.asarray(plain.commit_step))
    np.testing.assert_array_equal(np.asarray(cached.states), np.asarray(plain.states))
    lp, lc = np.asarray(plain.step_logits), np.asarray(cached.step_logits)
    finite = np.isfinite(lp)
    np.testing.assert_array_equal(finite, np.isfinite(lc))
    np.testing.assert_allclose(lc[finite], lp[finite], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(cached.confidence), np.asarray(plain.confidence), atol=1e-5)


@pytest.mark.slow
def test_right_padded_prompt_equals_unpadded():
    plain, cached = _debug_pair(True)
    kw = dict(key=jax.random.key(11), gen_length=16, block_length=8, steps=8, remasking="low_confidence",
              schedule="shift", shift=3.0, attention="prefix_lm")
    short = gen.sample(PARAMS_SMALL, CFG, PROMPTS[:1, :4], **kw)
    np.testing.assert_array_equal(np.asarray(plain.tokens)[0], np.asarray(short.tokens)[0])
    np.testing.assert_array_equal(np.asarray(cached.commit_step)[0], np.asarray(short.commit_step)[0])
    # full attention too, through the key-padding mask and explicit positions
    padded = np.concatenate([PROMPTS[:1, :4], np.full((1, 2), CFG.pad_id, np.int32)], 1)
    full_pad = gen.sample(PARAMS, CFG, padded, valid_len=np.asarray([4]), key=jax.random.key(2), gen_length=16,
                          block_length=16, steps=8)
    full_short = gen.sample(PARAMS, CFG, PROMPTS[:1, :4], key=jax.random.key(2), gen_length=16, block_length=16,
                            steps=8)
    np.testing.assert_array_equal(np.asarray(full_pad.tokens), np.asarray(full_short.tokens))


def test_state_at_step_reproduces_recorded_states():
    r, _ = _debug_pair(False)
    S = r.num_steps
    states = np.asarray(r.states)
    assert states.shape == (S + 1, 2, 16)
    assert (states[0] == MASK).all() and (states[S] == np.asarray(r.tokens)).all()
    for s in range(S + 1):
        np.testing.assert_array_equal(np.asarray(gen.state_at_step(r.tokens, r.commit_step, s, MASK)), states[s])
    # traced step index, under jit and vmap
    rebuilt = jax.jit(jax.vmap(lambda s: gen.state_at_step(r.tokens, r.commit_step, s, MASK)))(jnp.arange(S + 1))
    np.testing.assert_array_equal(np.asarray(rebuilt), states)


def test_commit_bookkeeping_consistent():
    r, _ = _debug_pair(False)
    S, commit = r.num_steps, np.asarray(r.commit_step)
    counts = np.asarray(r.num_transfer)
    np.testing.assert_array_equal(counts, gen.answer_schedule(16, 8, 8, "shift", 3.0))
    assert ((commit >= 0) & (commit < S)).all()  # every position committed exactly once
    for b in range(commit.shape[0]):
        np.testing.assert_array_equal(np.bincount(commit[b], minlength=S), counts)
        # block k (positions 8k..8k+7) is decoded in steps 4k..4k+3
        np.testing.assert_array_equal(commit[b] // 4, np.arange(16) // 8)
    # recorded confidences: the committed one is the step's candidate score; no candidate outside the block
    sc = np.asarray(r.step_confidence)
    picked = np.take_along_axis(sc, commit[None], axis=0)[0]
    np.testing.assert_array_equal(picked, np.asarray(r.confidence))
    for s in range(S):
        blk = s // 4
        outside = np.ones(16, bool)
        outside[blk * 8:(blk + 1) * 8] = False
        assert np.isneginf(sc[s][:, outside]).all()
    # cam_logits at T = 0: the max logit (after suppression at masked positions)
    np.testing.assert_allclose(np.asarray(r.step_max_logit), np.asarray(r.step_logits).max(-1), rtol=0, atol=0)
    # low_confidence: the committed score is the softmax probability of the committed token at its step
    lg = np.asarray(r.step_logits, np.float64)
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    tok = np.asarray(r.tokens)
    want = np.array([[p[commit[b, g], b, g, tok[b, g]] for g in range(16)] for b in range(2)])
    np.testing.assert_allclose(np.asarray(r.confidence), want, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------
# multimodal hook, post-processing


def test_prompt_embeds_and_mllm_config():
    mcfg = C.tiny_mllm()
    assert mcfg.lm == C.tiny_lm()  # the tiny multimodal preset wraps the same LM shape
    lm_params = llada.init_lm_params(jax.random.key(0), mcfg.lm, scale=0.5)
    params = {"lm": lm_params, "projector": {}}
    embeds = llada.embed_tokens(lm_params, mcfg.lm, jnp.asarray(PROMPTS))
    kw = dict(key=jax.random.key(1), gen_length=16, block_length=8, steps=8, attention="prefix_lm")
    by_ids = gen.sample(lm_params, mcfg.lm, PROMPTS, **kw)
    by_embeds = gen.sample(params, mcfg, prompt_embeds=embeds, prefix_cache=True, **kw)
    np.testing.assert_array_equal(np.asarray(by_embeds.tokens), np.asarray(by_ids.tokens))
    np.testing.assert_array_equal(np.asarray(by_embeds.commit_step), np.asarray(by_ids.commit_step))


def test_answer_length_and_trim():
    toks = np.array([[5, 6, 62, 62, 60], [1, 2, 3, 4, 5], [60, 7, 62, 1, 1]])
    np.testing.assert_array_equal(gen.answer_length(toks, [62, 60]), [2, 5, 0])
    assert gen.trim_answer(toks, [62, 60]) == [[5, 6], [1, 2, 3, 4, 5], []]
    assert gen.trim_answer(toks[0], [60]) == [5, 6, 62, 62]


# --------------------------------------------------------------------------------------------------------
# bad input

BAD = [
    (dict(gen_length=16, block_length=6, steps=8), "not divisible by block_length"),
    (dict(gen_length=16, block_length=4, steps=6), "not divisible by the number of blocks"),
    (dict(gen_length=16, block_length=4, steps=32), "more than block_length"),
    (dict(gen_length=0, block_length=4, steps=4), "gen_length"),
    (dict(gen_length=16, block_length=8, steps=8, remasking="entrophy"), "remasking"),
    (dict(gen_length=16, block_length=8, steps=8, schedule="cosine"), "schedule"),
    (dict(gen_length=16, block_length=8, steps=8, schedule="shift", shift=0.0), "shift"),
    (dict(gen_length=16, block_length=8, steps=8, prefix_cache=True), "prefix_lm"),
    (dict(gen_length=16, block_length=8, steps=8, attention="causal"), "attention"),
    (dict(gen_length=16, block_length=8, steps=8, temperature=-1.0), "temperature"),
    (dict(gen_length=16, block_length=8, steps=8, suppress_ids=(64,)), "outside the vocabulary"),
    (dict(gen_length=16, block_length=8, steps=8, valid_len=np.array([7, 3])), "valid_len"),
    (dict(gen_length=16, block_length=8, steps=8, valid_len=np.array([3])), "valid_len"),
    (dict(gen_length=16, block_length=8, steps=8, key=jax.random.split(jax.random.key(0), 3)), "key"),
    (dict(gen_length=512, block_length=512, steps=512), "max_seq_len"),
]


@pytest.mark.parametrize("kw,msg", BAD, ids=[m for _, m in BAD])
def test_bad_inputs_raise(kw, msg):
    kw = dict(kw)
    kw.setdefault("key", jax.random.key(0))
    with pytest.raises(ValueError, match=msg):
        gen.sample(PARAMS, CFG, PROMPTS, **kw)


def test_bad_prompt_arguments_raise():
    kw = dict(key=jax.random.key(0), gen_length=16, block_length=8, steps=8)
    with pytest.raises(ValueError, match="exactly one"):
        gen.sample(PARAMS, CFG, **kw)
    with pytest.raises(ValueError, match="exactly one"):
        gen.sample(PARAMS, CFG, PROMPTS, prompt_embeds=jnp.zeros((2, 6, 32)), **kw)
    with pytest.raises(ValueError, match="prompt_embeds"):
        gen.sample(PARAMS, CFG, prompt_embeds=jnp.zeros((2, 6, 31)), **kw)
    with pytest.raises(ValueError, match="prompt_ids"):
        gen.sample(PARAMS, CFG, PROMPTS.astype(np.float32), **kw)
    with pytest.raises(ValueError, match="num_tokens"):
        gen.transfer_schedule(8, 9)
