"""LLaDA LM: parity with transformers' LlamaForCausalLM under a bidirectional mask, and internal properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcam_jax.models import config as C
from dcam_jax.models import llada

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from torch_refs import additive_mask, llama_from_lm_params  # noqa: E402

CFG_MHA = C.tiny_lm(n_layers=3)
CFG_GQA = C.tiny_lm(n_layers=2, n_heads=4, n_kv_heads=2)


def _random_params(cfg, seed):
    p = llada.init_lm_params(jax.random.key(seed), cfg, scale=0.2)
    # non-trivial norm scales so that a mix-up of the norms would show
    rng = np.random.default_rng(seed)
    p["layers"]["attn_norm"] = jnp.asarray(1 + 0.3 * rng.standard_normal(p["layers"]["attn_norm"].shape), jnp.float32)
    p["layers"]["mlp_norm"] = jnp.asarray(1 + 0.3 * rng.standard_normal(p["layers"]["mlp_norm"].shape), jnp.float32)
    p["final_norm"] = jnp.asarray(1 + 0.3 * rng.standard_normal(p["final_norm"].shape), jnp.float32)
    return p


def _torch_llama(cfg, p):
    return llama_from_lm_params(cfg, p)


def _torch_logits(m, ids, mask_bool=None):
    T = ids.shape[1]
    allowed = np.ones((ids.shape[0], 1, T, T), bool) if mask_bool is None else mask_bool
    add = additive_mask(allowed)
    with torch.no_grad():
        return m(input_ids=torch.from_numpy(np.asarray(ids)), attention_mask=add).logits.numpy()


@pytest.mark.parametrize("cfg", [CFG_MHA, CFG_GQA], ids=["mha", "gqa"])
def test_full_attention_matches_llama(cfg):
    p = _random_params(cfg, 0)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 11))
    ours = np.asarray(llada.lm_logits(p, cfg, jnp.asarray(ids)))
    ref = _torch_logits(_torch_llama(cfg, p), ids)
    assert np.abs(ours - ref).max() <= 1e-4


def test_prefix_lm_matches_llama_with_block_mask():
    cfg = CFG_MHA
    p = _random_params(cfg, 2)
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 12))
    P = 7
    allowed = np.ones((1, 1, 12, 12), bool)
    allowed[:, :, :P, P:] = False  # prompt queries cannot see answer keys
    ours = np.asarray(llada.lm_logits(p, cfg, jnp.asarray(ids), attention="prefix_lm", prefix_len=P))
    ref = _torch_logits(_torch_llama(cfg, p), ids, allowed)
    assert np.abs(ours - ref).max() <= 1e-4
    full = np.asarray(llada.lm_logits(p, cfg, jnp.asarray(ids)))
    assert np.abs(full[:, :P] - ours[:, :P]).max() > 1e-3  # the mask really changes prompt positions


def test_bidirectional_last_token_changes_first_position():
    cfg = CFG_MHA
    p = _random_params(cfg, 4)
    ids = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, (1, 9)))
    a = llada.lm_logits(p, cfg, ids)
    b = llada.lm_logits(p, cfg, ids.at[0, -1].set((ids[0, -1] + 1) % cfg.vocab_size))
    assert float(jnp.abs(a[0, 0] - b[0, 0]).max()) > 1e-5


def test_split_at_layer_equals_full_pass():
    cfg = CFG_MHA
    p = _random_params(cfg, 6)
    ids = jnp.asarray(np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 8)))
    x = llada.prepare_inputs(p, cfg, ids)
    h1 = llada.run_blocks(p["layers"], cfg, x.h0, positions=x.positions, bias=x.bias, stop=1)
    h3 = llada.run_blocks(p["layers"], cfg, h1, positions=x.positions, bias=x.bias, start=1)
    np.testing.assert_allclose(np.asarray(llada.final_logits(p, cfg, h3)),
                               np.asarray(llada.lm_logits(p, cfg, ids)), atol=1e-6)


def test_a_block_range_reads_the_stacked_weights_without_copying_them():
    # XLA would materialise layers[start:stop] before the scan: at 8B that is gigabytes of weights copied per call.
    cfg = C.tiny_lm(d_model=256, n_layers=6, head_dim=64, mlp_hidden=1024, vocab_size=64)
    layers = llada.init_lm_params(jax.random.key(0), cfg)["layers"]
    weights = sum(a.nbytes for a in jax.tree.leaves(layers))
    h = jnp.zeros((1, 8, cfg.d_model), jnp.float32)
    pos = jnp.arange(8)[None]
    temp = {}
    for start, stop in ((0, 6), (2, 6), (0, 4)):
        f = jax.jit(lambda L, h, a=start, b=stop: llada.run_blocks(L, cfg, h, positions=pos, start=a, stop=b))
        temp[start, stop] = f.lower(layers, h).compile().memory_analysis().temp_size_in_bytes
    # a part of the stack needs no more scratch memory than the whole (up to its index vector), far less than its
    # own weights
    assert temp[2, 6] <= temp[0, 6] + 1024 and temp[0, 4] <= temp[0, 6] + 1024, temp
    # the measurement sees a copy: slicing the stack inside the jitted function costs the slice's weights
    cfg4 = C.tiny_lm(d_model=256, n_layers=4, head_dim=64, mlp_hidden=1024, vocab_size=64)
    sliced = jax.jit(lambda L, h: llada.run_blocks(jax.tree.map(lambda a: a[2:6], L), cfg4, h, positions=pos))
    copied = sliced.lower(layers, h).compile().memory_analysis().temp_size_in_bytes
    assert copied >= temp[0, 6] + 0.9 * weights * 4 / 6, (copied, temp, weights)
    x = llada.run_blocks(layers, cfg, h + 1.0, positions=pos, start=2, stop=6)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(sliced(layers, h + 1.0)))


def test_remat_and_jit_equal_eager():
    cfg = CFG_MHA
    p = _random_params(cfg, 8)
    ids = jnp.asarray(np.random.default_rng(9).integers(0, cfg.vocab_size, (1, 6)))
    eager = llada.lm_logits(p, cfg, ids)
    jitted = jax.jit(llada.lm_logits, static_argnums=1)(p, cfg, ids)
    import dataclasses
    remat = jax.jit(llada.lm_logits, static_argnums=1)(p, dataclasses.replace(cfg, remat=True), ids)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5)
    np.testing.assert_allclose(np.asarray(remat), np.asarray(eager), atol=1e-5)


def test_key_padding_mask_and_positions_make_padding_invisible():
    cfg = CFG_GQA
    p = _random_params(cfg, 10)
    ids = np.random.default_rng(11).integers(0, cfg.vocab_size, (1, 7))
    ref = np.asarray(llada.lm_logits(p, cfg, jnp.asarray(ids)))
    padded = np.concatenate([ids, np.full((1, 3), cfg.pad_id)], 1)
    valid = np.arange(10)[None] < 7
    ours = np.asarray(llada.lm_logits(p, cfg, jnp.asarray(padded), key_valid=jnp.asarray(valid)))
    np.testing.assert_allclose(ours[:, :7], ref, atol=1e-5)


def test_prefix_cache_equals_uncached_prefix_lm():
    cfg = CFG_GQA
    p = _random_params(cfg, 12)
    rng = np.random.default_rng(13)
    ids = rng.integers(0, cfg.vocab_size, (2, 13))
    P = 9
    full = np.asarray(llada.lm_logits(p, cfg, jnp.asarray(ids), attention="prefix_lm", prefix_len=P))
    emb = llada.embed_tokens(p, cfg, jnp.asarray(ids))
    cache = llada.build_prefix_cache(p, cfg, emb[:, :P])
    ans = np.asarray(llada.answer_logits_cached(p, cfg, cache, emb[:, P:]))
    np.testing.assert_allclose(ans, full[:, P:], atol=1e-5)


def test_prefix_cache_with_right_padded_prompt():
    cfg = CFG_MHA
    p = _random_params(cfg, 14)
    rng = np.random.default_rng(15)
    prompt = rng.integers(0, cfg.vocab_size, (1, 6))
    answer = rng.integers(0, cfg.vocab_size, (1, 4))
    ref = np.asarray(llada.lm_logits(p, cfg, jnp.asarray(np.concatenate([prompt, answer], 1)),
                                     attention="prefix_lm", prefix_len=6))[:, 6:]
    padded = np.concatenate([prompt, np.full((1, 3), cfg.pad_id)], 1)
    cache = llada.build_prefix_cache(p, cfg, llada.embed_tokens(p, cfg, jnp.asarray(padded)),
                                     valid_len=jnp.asarray([6]))
    ans = np.asarray(llada.answer_logits_cached(p, cfg, cache, llada.embed_tokens(p, cfg, jnp.asarray(answer))))
    np.testing.assert_allclose(ans, ref, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    cfg = CFG_MHA
    p = _random_params(cfg, 16)
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="attention="):
        llada.lm_logits(p, cfg, ids, attention="causal")
    with pytest.raises(ValueError, match="prefix_len"):
        llada.lm_logits(p, cfg, ids, attention="prefix_lm")
    with pytest.raises(ValueError, match="block range"):
        llada.lm_hidden(p, cfg, ids, stop=cfg.n_layers + 1)
    with pytest.raises(ValueError, match="max_seq_len"):
        llada.lm_logits(p, cfg, jnp.zeros((1, cfg.max_seq_len + 1), jnp.int32))
    with pytest.raises(KeyError, match="lm_head"):
        llada.lm_logits({"embed": p["embed"], "layers": p["layers"], "final_norm": p["final_norm"]}, cfg, ids)


@pytest.mark.parametrize("rule", ["standard", "conservative"])
def test_block_kv_is_the_keys_and_values_a_block_returns(rule):
    cfg = CFG_GQA
    p = _random_params(cfg, 11)
    lp = llada.layer_params(p["layers"], 1)
    h = jnp.asarray(np.random.default_rng(12).standard_normal((2, 7, cfg.d_model)), jnp.float32)
    cos, sin = llada.rope_angles(jnp.broadcast_to(jnp.arange(3, 10), (2, 7)), cfg.head_dim, cfg.rope_theta)
    _, (k_ref, v_ref) = llada.block(lp, h, cos, sin, None, cfg, grad_rule=rule)
    k, v = llada.block_kv(lp, h, cos, sin, cfg, rule)
    assert k.shape == v.shape == (2, 7, cfg.n_kv_heads, cfg.head_dim)
    np.testing.assert_array_equal(np.asarray(k), np.asarray(k_ref))
    np.testing.assert_array_equal(np.asarray(v), np.asarray(v_ref))
    # the rule reaches the backward pass: the held 1/rms factor changes dv/dh, not v
    dv = lambda r: jax.grad(lambda x: llada.block_kv(lp, x, cos, sin, cfg, r)[1].sum())(h)
    assert float(jnp.abs(dv("standard") - dv("conservative")).max()) > 1e-4
    with pytest.raises(ValueError):
        llada.block_kv(lp, h, cos, sin, cfg, "nope")
