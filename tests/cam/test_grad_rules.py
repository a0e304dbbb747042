"""Gradient rules (standard / conservative_norm / conservative) compared with independent definitions:
forward values across rules (bitwise); the library's dS/dA at layer L vs central finite differences of a NumPy
float64 upper network whose 1/rms factors (and softmax probabilities) are frozen at A0; raw maps vs a transformers
Llama (float64) with the same .detach()es; vmapped vs looped maps; trajectory states vs a loop definition; the AKD
region cap vs a NumPy reference; error messages."""

from fractions import Fraction
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcam_jax.cam import attribution as attr
from dcam_jax.cam import probes
from dcam_jax.cam import config as cam_config
from dcam_jax.cam import explain as ex
from dcam_jax.cam import refine as rf
from dcam_jax.models import config as C
from dcam_jax.models import llada, mllm
from dcam_jax.processing import image as pimg

CFG = C.tiny_mllm(lm=C.tiny_lm(n_layers=3, n_kv_heads=2))  # grouped KV: 4 query heads share 2 KV heads
L = 0  # hooked block; blocks 1 and 2 are the upper network
MASK = CFG.lm.mask_id
RULES = llada.GRAD_RULES
ATTN = ("full", "prefix_lm")
TARGETS = (0, 1)  # at the probe state below, position 0 is masked and position 1 visible
BATCH = 4
# every (rule, attention, aggregation) the lib fixture computes (standard only with gxa)
COMBOS = tuple((r, a, g) for r in RULES for a in ATTN for g in ("gxa", "gradcam") if r != "standard" or g == "gxa")
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# the factors each rule holds constant (keys of _np_upper's gate dict)
FROZEN = {"standard": (), "conservative_norm": ("inv1", "inv2", "invF"),
          "conservative": ("inv1", "inv2", "invF", "p")}


# ----------------------------------------------------------------------------------------------------------
# shared model, inputs and compiled results


@pytest.fixture(scope="module")
def setup():
    """A random LM (NumPy draws: no RNG compiles; norm scales around 1, not 1) and random prompt embeddings with an
    image block laid out as the any-resolution processor lays out a 48 x 64 image."""
    rng = np.random.default_rng(1)
    shapes = jax.eval_shape(lambda k: llada.init_lm_params(k, CFG.lm, "float32"), jax.random.key(0))
    lm = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray((1.0 + 0.2 * rng.standard_normal(a.shape) if "norm" in jax.tree_util.keystr(path)
                                     else 0.3 * rng.standard_normal(a.shape)).astype(np.float32)), shapes)
    img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    ids = np.array([61, 5, 6, -200, 7, 8, 9], np.int32)
    i = mllm.image_token_index(ids)
    layout = mllm.image_layout(pimg.ImageProcessor(CFG)(img).geometry, i)
    n_img = int(max(layout.positions().max(), layout.newline_positions.max(initial=i))) + 1 - i
    embed = np.asarray(lm["embed"])
    emb = jnp.asarray(np.concatenate([embed[ids[:i]], 0.3 * rng.standard_normal((n_img, CFG.lm.d_model)),
                                      embed[ids[i + 1:]]]).astype(np.float32))
    answer = np.array([10, 11, 12, 13, 62, 62], np.int32)
    commit = np.array([2, 0, 1, 1, 3, 3], np.int32)
    state = np.where(commit < 2, answer, MASK).astype(np.int32)  # [M, 11, 12, 13, M, M]
    params = {"lm": lm}
    return SimpleNamespace(params=params, lm=lm, emb=emb, layout=layout, img=layout.positions(),
                           P=int(emb.shape[0]), answer=answer, commit=commit, state=state)


def _spec(rule, attention="full", aggregation="gxa"):
    return attr.GradSpec(layer=L, attention=attention, aggregation=aggregation, grad_rule=rule)


def _inputs(params, emb, state, attention):
    """h0 [1, T, D], positions [1, T], bias of [prompt | state]."""
    h0 = jnp.concatenate([emb[None], llada.embed_tokens(params["lm"], CFG.lm, jnp.asarray(state)[None])], 1)
    T, P = h0.shape[1], emb.shape[0]
    bias = llada.attention_bias(jnp.arange(T), T, attention=attention,
                                prefix_len=P if attention == "prefix_lm" else None)
    return h0, jnp.arange(T, dtype=jnp.int32)[None], bias


def _run_fast(fn, *args):
    """jit fn with cheap XLA options (these programs are tiny: the default LLVM optimisation costs more to compile
    than it saves) and run it."""
    return jax.jit(fn).lower(*args).compile(_FAST_COMPILE)(*args)


def _maps(s, spec, state, targets):
    """attr.batched_state_maps (as compiled by the library) for one state: -> (maps [Tg, H, W], scores [Tg])."""
    t = np.asarray(targets, np.int32)[None]
    z = np.zeros_like(t)
    m, sc = attr.batched_state_maps(s.params, CFG, spec, BATCH, s.emb, jnp.asarray(s.img),
                                    jnp.asarray(np.asarray(state, np.int32)[None]), jnp.asarray(s.answer),
                                    jnp.ones(len(s.answer), bool), jnp.asarray(t), jnp.asarray(s.answer[t]),
                                    jnp.asarray(z), jnp.asarray(z))
    return np.asarray(m[0]), np.asarray(sc[0])


def _lib_grads(lm, A, pos, bias, rule, P, answer):
    """dS/dA of each target of TARGETS the way attribution._forward_split / state_maps take it: the vjp of the
    upper blocks (run_blocks from L+1 with the rule), applied to the gradient of the score (final_logits with the
    rule, log_softmax) at the final hidden state. -> (scores [Tg], G [Tg, T, D])."""
    upper = lambda a: llada.run_blocks(lm["layers"], CFG.lm, a, positions=pos, bias=bias, start=L + 1,
                                       grad_rule=rule)
    hN, vjp_fn = jax.vjp(upper, A)

    def one(t, tok):
        def score(h):
            x = jax.lax.dynamic_slice_in_dim(h, P + t, 1, axis=1)
            return jax.nn.log_softmax(llada.final_logits(lm, CFG.lm, x, grad_rule=rule)[0, 0])[tok]

        sc, cot = jax.value_and_grad(score)(hN)
        return sc, vjp_fn(cot)[0][0]

    t = np.asarray(TARGETS)
    return jax.vmap(one)(jnp.asarray(t), jnp.asarray(answer[t]))


@pytest.fixture(scope="module")
def lib(setup):
    """What the library computes at setup.state, in two compiled programs (separate compiles cost ~2x more):
      maps[(rule, attention, agg)]  (maps [Tg, H, W], scores [Tg]) of attr.batched_state_maps for TARGETS
      grad[(rule, attention)]       (scores [Tg], G [Tg, T, D]) from _lib_grads
      A[attention]                  the hooked activation [T, D]
    (all float64 NumPy)."""
    s = setup
    t = np.asarray(TARGETS, np.int32)[None]
    z = jnp.zeros_like(jnp.asarray(t))
    rest = (jnp.asarray(s.img), jnp.asarray(s.state[None]), jnp.asarray(s.answer), jnp.ones(len(s.answer), bool),
            jnp.asarray(t), jnp.asarray(s.answer[t]), z, z)

    def maps(params, emb):
        return {"|".join(c): attr.batched_state_maps(params, CFG, _spec(*c), BATCH, emb, *rest) for c in COMBOS}

    def grads(params, emb):
        out = {}
        for attention in ATTN:
            h0, pos, bias = _inputs(params, emb, s.state, attention)
            A = llada.run_blocks(params["lm"]["layers"], CFG.lm, h0, positions=pos, bias=bias, stop=L + 1)
            out[attention] = A[0]
            for rule in RULES:
                out[f"{rule}|{attention}"] = _lib_grads(params["lm"], A, pos, bias, rule, s.P, s.answer)
        return out

    f64 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float64), tree)
    m, g = f64(_run_fast(maps, s.params, s.emb)), f64(_run_fast(grads, s.params, s.emb))
    return SimpleNamespace(maps={c: tuple(x[0] for x in m["|".join(c)]) for c in COMBOS},
                           grad={(r, a): g[f"{r}|{a}"] for r in RULES for a in ATTN}, A={a: g[a] for a in ATTN})


@pytest.fixture(scope="module")
def forward(setup):
    """{(rule, attention): (all blocks, blocks L+1.. from A, final_logits)} at setup.state, one program per rule."""
    s = setup

    def f(rule):
        def run(params, emb):
            out = {}
            layers = params["lm"]["layers"]
            for attention in ATTN:
                h0, pos, bias = _inputs(params, emb, s.state, attention)
                A = llada.run_blocks(layers, CFG.lm, h0, positions=pos, bias=bias, stop=L + 1)
                h = llada.run_blocks(layers, CFG.lm, h0, positions=pos, bias=bias, grad_rule=rule)
                up = llada.run_blocks(layers, CFG.lm, A, positions=pos, bias=bias, start=L + 1, grad_rule=rule)
                out[attention] = (h, up, llada.final_logits(params["lm"], CFG.lm, h, grad_rule=rule))
            return out

        return run

    return {(rule, a): tuple(np.asarray(x) for x in v)
            for rule in RULES for a, v in _run_fast(f(rule), s.params, s.emb).items()}


# ----------------------------------------------------------------------------------------------------------
# 1. forward values


@pytest.mark.parametrize("attention", ATTN)
def test_forward_values_bitwise_equal_across_rules(setup, lib, forward, decision, attention):
    std = forward["standard", attention]
    np.testing.assert_array_equal(std[0], std[1])  # the split at L is the same network
    for rule in RULES[1:]:
        for a, b in zip(forward[rule, attention], std):
            np.testing.assert_array_equal(a, b)
    ref = lib.maps[("standard", attention, "gxa")][1]
    for c in COMBOS:
        if c[1] == attention:
            np.testing.assert_array_equal(lib.maps[c][1], ref)
    for rule in RULES:  # the vjp's own forward
        np.testing.assert_array_equal(lib.grad[rule, attention][0], lib.grad["standard", attention][0])
        # the maps' program (vmapped over targets, batched over states; under prefix-LM the prompt once for all
        # states) computes the same scores up to float rounding
        np.testing.assert_allclose(lib.grad[rule, attention][0], ref, rtol=1e-6)
    if attention == "full":  # batched_state_maps as the library compiles it, conservative rule, at the same state
        assert TARGETS[0] == 0 and np.array_equal(decision.states[0], setup.state)
        np.testing.assert_allclose(decision.alone[0][1][0], ref[0], rtol=1e-6)
        np.testing.assert_allclose(decision.alone[0][0][0], lib.maps[("conservative", "full", "gxa")][0][0],
                                   rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# 2. the gradient is the derivative of the network with frozen gates


def _np_upper(W, a, attention, P, pos_t, tok, gates=None):
    """Independent NumPy float64 upper network: blocks L+1..N-1 on a [T, D], final norm, head, log_softmax[tok] at
    answer position pos_t. gates: {key: value} of factors held at the given value instead of being recomputed
    (keys ("inv1", i), ("inv2", i), "invF": 1/rms; ("p", i): attention probabilities [H, T, T]).
    Returns (score, {key: value} of every factor at this input)."""
    cfg = CFG.lm
    H, KV, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    T = a.shape[0]
    gates = gates or {}
    seen = {}

    def gate(key, value):
        seen[key] = value
        return gates.get(key, value)

    def inv_rms(key, x):
        return gate(key, 1.0 / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_eps))

    ang = np.arange(T)[:, None] * (1.0 / cfg.rope_theta ** (np.arange(0, Dh, 2) / Dh))[None]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def rope(x):  # [T, heads, Dh], half-split
        x1, x2 = x[..., :Dh // 2], x[..., Dh // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    allowed = np.ones((T, T), bool)
    if attention == "prefix_lm":
        allowed[:P, P:] = False
    kv_of = np.arange(H) // (H // KV)
    lw = W["layers"]
    x = a
    for i in range(L + 1, cfg.n_layers):
        h = x * inv_rms(("inv1", i), x) * lw["attn_norm"][i]
        q = rope((h @ lw["q"][i]).reshape(T, H, Dh))
        k = rope((h @ lw["k"][i]).reshape(T, KV, Dh))[:, kv_of]
        v = (h @ lw["v"][i]).reshape(T, KV, Dh)[:, kv_of]
        sc = np.where(allowed[None], np.einsum("qhd,shd->hqs", q, k) / np.sqrt(Dh), -np.inf)
        p = np.exp(sc - sc.max(-1, keepdims=True))
        p = gate(("p", i), p / p.sum(-1, keepdims=True))
        x = x + np.einsum("hqs,shd->qhd", p, v).reshape(T, H * Dh) @ lw["o"][i]
        m = x * inv_rms(("inv2", i), x) * lw["mlp_norm"][i]
        g = m @ lw["gate"][i]
        x = x + (g / (1.0 + np.exp(-g)) * (m @ lw["up"][i])) @ lw["down"][i]
    xt = x[P + pos_t]
    lg = (xt * inv_rms("invF", xt) * W["final_norm"]) @ W["lm_head"]
    return lg[tok] - lg.max() - np.log(np.exp(lg - lg.max()).sum()), seen


def _frozen(seen, rule):
    return {k: v for k, v in seen.items() if (k[0] if isinstance(k, tuple) else k) in FROZEN[rule]}


@pytest.mark.parametrize("attention", ATTN)
def test_gradient_is_finite_differences_of_the_frozen_network(setup, lib, attention):
    s = setup
    t, tok = TARGETS[0], int(s.answer[TARGETS[0]])
    a0 = lib.A[attention]
    W = jax.tree.map(lambda x: np.asarray(x, np.float64), s.lm)
    score0, seen = _np_upper(W, a0, attention, s.P, t, tok)
    rng = np.random.default_rng(0)
    img = s.img.ravel()
    coords = [(int(rng.choice(img)), int(rng.integers(CFG.lm.d_model))) for _ in range(10)]
    d = np.zeros_like(a0)
    d[img] = rng.standard_normal((len(img), a0.shape[1]))  # a random direction over the image tokens
    eps = 1e-4
    errors = {}
    for ref_rule in RULES:
        gates = _frozen(seen, ref_rule)
        f = lambda a: _np_upper(W, a, attention, s.P, t, tok, gates)[0]
        assert abs(f(a0) - score0) < 1e-12  # the frozen function agrees with the network at A0

        def fd(e):
            return (f(a0 + e) - f(a0 - e)) / (2 * eps)

        fd_coords = np.array([fd(np.eye(1, a0.size, i * a0.shape[1] + c).reshape(a0.shape) * eps)
                              for i, c in coords])
        fd_dir = fd(eps * d)
        scale = np.abs(fd_coords).max()
        assert scale > 1e-3
        for rule in RULES:
            sc, G = lib.grad[rule, attention][0][0], lib.grad[rule, attention][1][0]
            assert abs(sc - score0) <= 1e-4 * max(1.0, abs(score0))  # float32 forward vs float64 reference
            g_coords = np.array([G[i, c] for i, c in coords])
            errors[ref_rule, rule] = np.abs(fd_coords - g_coords).max() / scale
            if rule == ref_rule:
                assert errors[ref_rule, rule] <= 1e-4, (ref_rule, errors[ref_rule, rule], fd_coords, g_coords)
                assert abs(fd_dir - float((G * d).sum())) <= 1e-4 * abs(fd_dir), (ref_rule, fd_dir)
    # the rules are really different: each frozen reference disagrees with every other rule's gradient
    for (ref_rule, rule), err in errors.items():
        if ref_rule != rule:
            assert err >= 0.2, (ref_rule, rule, err)
    # the gxa map of batched_state_maps is ReLU(sum_c G_c A_c) at the image positions, with G the vjp above
    for rule in RULES:
        for k, tp in enumerate(TARGETS):
            ref = np.maximum((lib.grad[rule, attention][1][k][s.img] * a0[s.img]).sum(-1), 0.0)
            got = lib.maps[(rule, attention, "gxa")][0][k]
            assert ref.max() > 0
            assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max()), (rule, tp)


# ----------------------------------------------------------------------------------------------------------
# 3. parity with transformers' Llama given the same detachments


@pytest.fixture(scope="module")
def torch_ref():
    """torch and the shared builders of tests/torch_refs.py (imported once: ~6 s)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from torch_refs import additive_mask, hold_gates, layer_state_and_grad, llama_from_lm_params

    return SimpleNamespace(torch=torch, additive_mask=additive_mask, hold_gates=hold_gates,
                           layer_state_and_grad=layer_state_and_grad, llama_from_lm_params=llama_from_lm_params)


def _torch_maps(s, tr, rule, attention):
    """Maps {aggregation: [Tg, H, W]}, gradients [Tg, H, W, D] and scores [Tg] of TARGETS from LlamaForCausalLM
    (float64) with the layer-L output retain_grad()-ed, the RMSNorms above L (and the final norm) using a detached
    1/rms factor and, for "conservative", the softmax probabilities of the layers above L detached
    (``torch_refs.hold_gates``); layers <= L stay as transformers has them."""
    m = tr.llama_from_lm_params(CFG.lm, s.lm)
    calls = tr.hold_gates(m, L, rule)
    held_norm = rule != "standard"
    torch = tr.torch
    lm = s.lm
    x = torch.from_numpy(np.concatenate([np.asarray(s.emb, np.float64),
                                         np.asarray(lm["embed"], np.float64)[s.state]], 0))[None]
    T, P = x.shape[1], s.P
    allowed = np.ones((1, 1, T, T), bool)
    if attention == "prefix_lm":
        allowed[:, :, :P, P:] = False  # prompt queries do not see the answer
    mask = tr.additive_mask(allowed)
    maps, grads, scores = {"gxa": [], "gradcam": []}, [], []
    for t in TARGETS:
        A, Gr, logp = tr.layer_state_and_grad(m, x, mask, L, P + t, s.answer[t])
        A, Gr = A[s.img], Gr[s.img]
        maps["gxa"].append(np.maximum((Gr * A).sum(-1), 0.0))
        maps["gradcam"].append(np.maximum((A * Gr.mean(axis=(0, 1))).sum(-1), 0.0))
        grads.append(Gr)
        scores.append(logp)
    # the patches were on the path: every layer's attention went through hold_gates' function, each held norm once
    assert calls["attention"] == list(range(CFG.lm.n_layers)) * len(TARGETS)
    assert len(calls["norm"]) == (2 * (CFG.lm.n_layers - L - 1) + 1) * len(TARGETS) * held_norm
    return {k: np.stack(v) for k, v in maps.items()}, np.stack(grads), np.array(scores)


@pytest.mark.parametrize("attention", ATTN)
@pytest.mark.parametrize("rule", ["conservative_norm", "conservative"])
def test_maps_match_torch_with_detached_gates(setup, lib, torch_ref, rule, attention):
    ref, ref_grads, ref_scores = _torch_maps(setup, torch_ref, rule, attention)
    for agg in ("gxa", "gradcam"):
        got, scores = lib.maps[(rule, attention, agg)]
        assert ref[agg].max() > 0  # non-trivial maps
        for k in range(len(TARGETS)):
            r = ref[agg][k]
            err = np.abs(got[k] - r).max()
            assert err <= 1e-4 * max(1.0, np.abs(r).max()), (agg, TARGETS[k], err)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-4)
    for k, t in enumerate(TARGETS):  # the whole gradient at the image tokens, not only its ReLU'd aggregates
        g = lib.grad[rule, attention][1][k][setup.img]
        assert np.abs(g - ref_grads[k]).max() <= 1e-4 * np.abs(ref_grads[k]).max(), t


# ----------------------------------------------------------------------------------------------------------
# 4. vmap over states and targets


@pytest.fixture(scope="module")
def decision(setup):
    """ex.raw_token_maps with probe "decision" and the conservative rule (the library's own jit compiles: 4 states
    in one call, and 1 state, which tests 1 and 5 reuse): targets 0..3 together, and one at a time."""
    s = setup
    cam = cam_config.resolve(cam_config.CamConfig(probe="decision", layer=L, grad_rule="conservative", refine="none",
                                                batch_size=BATCH), CFG)
    targets = [0, 1, 2, 3]
    run = lambda t: tuple(np.asarray(x) for x in ex.raw_token_maps(s.params, CFG, cam, s.emb, s.layout, s.answer, t,
                                                                   commit_step=s.commit))
    return SimpleNamespace(cam=cam, targets=targets, together=run(targets), alone=[run([t]) for t in targets],
                           states=probes.decision_states(s.answer, s.commit, targets, MASK))


def test_conservative_decision_maps_vmapped_equal_one_at_a_time(decision):
    r = cam_config.resolve(decision.cam, CFG)
    assert (r.grad_rule, r.aggregation) == ("conservative", "gxa")
    together, s_all = decision.together
    assert together.max() > 0
    for k, (alone, s1) in enumerate(decision.alone):
        np.testing.assert_allclose(together[k], alone[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s_all[k], s1[0], rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# 5. the trajectory probe


def _trajectory_loop(tokens, commit, targets, K, mask_id):
    out = []
    for p in targets:
        c = int(commit[p])
        steps = [c] if K == 1 else [round(Fraction(k * c, K - 1)) for k in range(K)]
        out.append([[int(tokens[j]) if commit[j] < st else mask_id for j in range(len(tokens))] for st in steps])
    return np.array(out, np.int32)


def test_trajectory_states_match_loop_definition():
    rng = np.random.default_rng(0)
    for _ in range(20):
        G = int(rng.integers(3, 12))
        tokens = rng.integers(0, 60, G)
        commit = rng.integers(0, 9, G)
        targets = rng.choice(G, size=min(G, 3), replace=False)
        for K in range(1, 10):  # K - 1 = 6 has exact half steps (k = 5, c = 9: 7.5 -> 8, half to even)
            st = probes.trajectory_states(tokens, commit, targets, K, MASK)
            np.testing.assert_array_equal(st, _trajectory_loop(tokens, commit, targets, K, MASK))
            assert st.shape == (len(targets), K, G) and st.dtype == np.int32
            assert np.all(st[np.arange(len(targets)), :, targets] == MASK)  # the target is masked in every state
            if K > 1:
                assert np.all(st[:, 0] == MASK)  # step 0: nothing committed yet
            np.testing.assert_array_equal(st[:, -1], probes.decision_states(tokens, commit, targets, MASK))
        np.testing.assert_array_equal(probes.trajectory_states(tokens, commit, targets, 1, MASK)[:, 0],
                                      probes.decision_states(tokens, commit, targets, MASK))


def test_trajectory_probe_is_the_mean_of_per_state_maps(setup, decision):
    s = setup
    K, targets = 2, [0, 3]  # 4 states: the compiled shapes of the decision test are reused
    cam = cam_config.CamConfig(probe="trajectory", num_trajectory_states=K, layer=L, grad_rule="conservative",
                       refine="none", batch_size=BATCH)
    r = cam_config.resolve(cam, CFG)
    spec = attr.GradSpec(layer=r.layer, hook=r.hook, attention=r.attention, score=r.score, contrast="none",
                         aggregation=r.aggregation, grad_relu=r.grad_relu, grad_rule=r.grad_rule)
    assert spec == _spec("conservative")
    maps, scores = ex.raw_token_maps(s.params, CFG, r, s.emb, s.layout, s.answer, targets, commit_step=s.commit)
    states = probes.trajectory_states(s.answer, s.commit, targets, K, MASK)
    for ti, t in enumerate(targets):
        per = [_maps(s, spec, states[ti, k], [t]) for k in range(K)]
        assert not np.array_equal(per[0][0], per[1][0])  # the states really differ
        np.testing.assert_allclose(np.asarray(maps[ti]), np.mean([m[0] for m, _ in per], 0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(scores[ti]), np.mean([sc[0] for _, sc in per]), rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# 6. the AKD region cap


def _np_cap(m, level):
    mx = m.max()
    n = int((m >= level * mx).sum()) if mx > 0 else 0
    k = int(np.floor(np.sqrt(n)))
    return max(k - 1 if k % 2 == 0 else k, 1)


def _with_block(bg, top, left, h, w, value=1.0):
    m = bg.copy()
    m[top:top + h, left:left + w] = value
    return m


def test_region_kernel_cap_matches_numpy():
    rng = np.random.default_rng(0)
    bg = rng.uniform(0.0, 0.3, (9, 11)).astype(np.float32)
    hand = {1: _with_block(bg, 4, 5, 1, 1), 3: _with_block(bg, 2, 3, 3, 3), 5: _with_block(bg, 1, 2, 5, 5)}
    hand_maps = np.stack([hand[1], hand[3], hand[5], _with_block(bg, 0, 0, 4, 4), np.zeros_like(bg)])
    np.testing.assert_array_equal(np.asarray(rf.region_kernel_cap(hand_maps, 0.5)), [1, 3, 5, 3, 1])
    # random maps with leading batch dims, several levels, and odd regions (a 1 x 9 line counts 9 tokens)
    maps = rng.uniform(0, 1, (2, 3, 9, 11)).astype(np.float32) ** 4
    maps[0, 0] = _with_block(bg, 3, 1, 1, 9)
    maps[1, 2] = -maps[1, 2]
    for level in (0.2, 0.5, 0.9, 1.0):
        got = np.asarray(rf.region_kernel_cap(maps, level))
        assert got.shape == (2, 3) and got.dtype == np.int32
        np.testing.assert_array_equal(got, [[_np_cap(m, level) for m in row] for row in maps])


def test_refine_region_level_keeps_small_regions_and_filters_large_ones():
    rng = np.random.default_rng(1)
    bg = rng.uniform(0.0, 0.3, (9, 11)).astype(np.float32)
    small = bg.copy()
    small[4, 5], small[4, 6] = 1.0, 0.9  # a 2-token object
    large = bg.copy()
    large[2:7, 3:8] = rng.uniform(0.8, 1.0, (5, 5))
    pair = np.stack([small, large])
    cfg = rf.RefineConfig(akd=True, akd_kernel_size=3, akd_region_level=0.5, dacg=False, cba=False, sicd=False)
    np.testing.assert_array_equal(np.asarray(rf.kernel_sizes_for(pair, cfg)), [1, 3])
    akd3 = np.asarray(_run_fast(lambda x: rf.clip_and_normalize(rf.akd(x, 3), x), jnp.asarray(pair)))  # AKD(3)
    want_small = (small - small.min()) / (small.max() - small.min())  # normalisation only
    # the cases are real: AKD(3) would wipe the small object, and it changes the large map
    assert np.abs(akd3[0] - want_small).max() > 0.3
    assert np.abs(akd3[1] - (large - large.min()) / (large.max() - large.min())).max() > 0.05
    both = np.asarray(rf.refine(pair, cfg))  # one map per kernel size (grouped AKD)
    np.testing.assert_allclose(both[0], want_small, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(both[1], akd3[1], rtol=1e-6, atol=1e-6)
    # a batch whose every map has cap 1 skips AKD altogether
    np.testing.assert_allclose(np.asarray(rf.refine(small[None], cfg))[0], want_small, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# 7. errors


def test_unknown_grad_rule_and_missing_trajectory_raise(setup):
    s = setup
    h0, pos, bias = _inputs(s.params, s.emb, s.state, "full")
    calls = [lambda: attr.GradSpec(layer=0, grad_rule="frozen"),
             lambda: cam_config.CamConfig(grad_rule="frozen"),
             lambda: llada.run_blocks(s.lm["layers"], CFG.lm, h0, positions=pos, grad_rule="frozen"),
             lambda: llada.final_logits(s.lm, CFG.lm, h0, grad_rule="frozen"),
             lambda: llada.check_grad_rule("frozen")]
    for call in calls:
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert "frozen" in msg and all(repr(r) in msg for r in RULES), msg
    with pytest.raises(ValueError, match="noise.*clean|clean.*noise"):
        ex.raw_token_maps(s.params, CFG, cam_config.resolve(cam_config.CamConfig(probe="trajectory", layer=L), CFG),
                          s.emb, s.layout, s.answer, [0])
    with pytest.raises(ValueError, match="num_trajectory_states"):
        cam_config.CamConfig(probe="trajectory", num_trajectory_states=0)
    with pytest.raises(ValueError, match="num_trajectory_states"):
        probes.trajectory_states(s.answer, s.commit, [0], 0, MASK)


@pytest.mark.slow
def test_region_cap_of_one_is_the_identity_in_both_refine_paths():
    # refine() (host-grouped AKD) and refine_arrays() (in-graph akd_multi) agree, negative values included
    m = np.zeros((1, 5, 5), np.float32)
    m[0, 2, 2], m[0, 0, 0] = 1.0, -0.5
    cfg = rf.RefineConfig(akd_kernel_size=3, akd_region_level=0.5, dacg=False, cba=False, sicd=False,
                          normalize=False)
    np.testing.assert_array_equal(np.asarray(rf.refine(m, cfg)), m)
    np.testing.assert_array_equal(np.asarray(rf.refine_arrays(jnp.asarray(m), cfg)), m)
