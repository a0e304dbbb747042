"""Gradient CAMs at layer L: parity with an independent torch computation (LlamaForCausalLM with a bidirectional
mask and retain_grad on the layer-L hidden state), finite differences, batched == looped. (Every method preset
against a NumPy computation from A and G: test_methods.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcam_jax.cam import attribution as attr
from dcam_jax.cam import probes
from dcam_jax.cam import config as cam_config
from dcam_jax.cam import explain as ex
from dcam_jax.cam import targets as cam_targets
from dcam_jax.models import config as C
from dcam_jax.models import mllm
from dcam_jax.processing import image as pimg

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from torch_refs import additive_mask, layer_state_and_grad, llama_from_lm_params  # noqa: E402

CFG = C.tiny_mllm(lm=C.tiny_lm(n_layers=3))
G = 6


@pytest.fixture(scope="module")
def setup():
    params = mllm.init_mllm_params(jax.random.key(1), CFG, "float32", scale=0.3)
    img = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    proc = pimg.ImageProcessor(CFG)(img)
    ids = np.array([61, 5, 6, -200, 7, 8, 9], np.int32)
    emb, layout = mllm.multimodal_embeddings(params, CFG, ids, proc.pixel_values, proc.geometry)
    answer = np.array([10, 11, 12, 13, 62, 62], np.int32)
    commit = np.array([2, 0, 1, 1, 3, 3], np.int32)
    return params, emb, layout, answer, commit


def _torch_model(params):
    return llama_from_lm_params(CFG.lm, params["lm"])


def _torch_gradcam(params, emb, layout, state, target, token, layer, prefix_lm=False):
    """Independent reference: hidden_states[layer + 1] is the output of block `layer`; retain_grad on it."""
    m = _torch_model(params)
    x = torch.from_numpy(np.concatenate([np.asarray(emb, np.float64),
                                         np.asarray(params["lm"]["embed"], np.float64)[state]], 0))[None]
    T = x.shape[1]
    P = emb.shape[0]
    allowed = np.ones((1, 1, T, T), bool)
    if prefix_lm:
        allowed[:, :, :P, P:] = False
    mask = additive_mask(allowed)
    A, Gr, logp = layer_state_and_grad(m, x, mask, layer, P + target, token)
    pos = layout.positions()
    A, Gr = A[pos], Gr[pos]  # [H, W, C]
    w = Gr.mean(axis=(0, 1))
    return np.maximum((A * w).sum(-1), 0.0), logp


def _spec(**kw):
    base = dict(layer=1, attention="full", score="logprob")
    base.update(kw)
    return attr.GradSpec(**base)


def _maps(params, emb, layout, spec, state, targets, answer):
    t = np.asarray(targets, np.int32)
    z = np.zeros_like(t)
    return attr.batched_state_maps(params, CFG, spec, 4, emb, jnp.asarray(layout.positions()),
                                   jnp.asarray(np.asarray(state)[None]), jnp.asarray(answer),
                                   jnp.ones(len(answer), bool), jnp.asarray(t[None]), jnp.asarray(answer[t][None]),
                                   jnp.asarray(z[None]), jnp.asarray(z[None]))


@pytest.mark.parametrize("prefix_lm", [False, True], ids=["full", "prefix_lm"])
def test_clean_gradcam_matches_torch(setup, prefix_lm):
    params, emb, layout, answer, _ = setup
    spec = _spec(attention="prefix_lm" if prefix_lm else "full")
    maps, scores = _maps(params, emb, layout, spec, answer, [0, 2], answer)
    for k, tgt in enumerate([0, 2]):
        ref, ref_score = _torch_gradcam(params, emb, layout, answer, tgt, answer[tgt], 1, prefix_lm)
        assert np.abs(np.asarray(maps[0, k]) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
        assert abs(float(scores[0, k]) - ref_score) <= 1e-4
        assert ref.max() > 0  # a non-trivial map


def test_gradient_matches_finite_differences(setup):
    params, emb, layout, answer, _ = setup
    spec = _spec()
    P = emb.shape[0]
    lm, cfg = params["lm"], CFG.lm
    h0 = jnp.concatenate([emb[None], mllm.llada.embed_tokens(lm, cfg, jnp.asarray(answer)[None])], 1)
    Tn = h0.shape[1]
    pos = jnp.arange(Tn)[None]
    A, upper = attr._lower_upper(lm, cfg, spec, h0, pos, None, P)

    def score(a):
        return attr._score(lm, cfg, spec, upper(a).astype(jnp.float32), jnp.asarray(answer),
                           jnp.ones(G, bool), 1, int(answer[1]), 0, 0)

    score = jax.jit(score)
    grad = jax.grad(score)(A)
    rng = np.random.default_rng(0)
    img = layout.positions().ravel()
    for _ in range(5):
        i, c = int(rng.choice(img)), int(rng.integers(cfg.d_model))
        eps = 1e-2
        e = jnp.zeros_like(A).at[0, i, c].set(eps)
        fd = (score(A + e) - score(A - e)) / (2 * eps)
        assert abs(float(fd) - float(grad[0, i, c])) <= 2e-3 * max(1.0, abs(float(fd)))


def test_all_targets_in_one_call_equal_one_at_a_time(setup):
    params, emb, layout, answer, commit = setup
    cam = cam_config.resolve(cam_config.CamConfig(probe="decision", layer=1, refine="none"), CFG)
    targets = [0, 1, 2, 3]
    together, s_all = ex.raw_token_maps(params, CFG, cam, emb, layout, answer, targets, commit_step=commit)
    for k, t in enumerate(targets):
        alone, s1 = ex.raw_token_maps(params, CFG, cam, emb, layout, answer, [t], commit_step=commit)
        np.testing.assert_allclose(np.asarray(together[k]), np.asarray(alone[0]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(s_all[k]), float(s1[0]), rtol=1e-5)


def test_decision_targets_committed_at_one_step_share_one_state(setup):
    """Targets 2 and 3 were committed at the same step, so their decision states are one state: three forwards
    for four targets (the maps are checked against one target at a time above)."""
    _, _, _, answer, commit = setup
    cam = cam_config.resolve(cam_config.CamConfig(probe="decision", layer=1, refine="none"), CFG)
    states, K, groups = ex._probe_states(cam, answer, np.array([0, 1, 2, 3]), commit, None, CFG.lm.mask_id)
    assert K == 1 and groups == [[1], [2, 3], [0]]  # ordered by commit step: 0, 1, 2
    expected = probes.decision_states(answer, commit, [1, 2, 0], CFG.lm.mask_id)
    np.testing.assert_array_equal(states, expected)
    np.testing.assert_array_equal(probes.decision_states(answer, commit, [3], CFG.lm.mask_id)[0], states[1])


def test_decision_state_masks_the_target_and_later_tokens(setup):
    _, _, _, answer, commit = setup
    st = probes.decision_states(answer, commit, [0, 1], mask_id=63)
    # target 0 was committed at step 2: tokens committed at steps 0, 1 are visible, the rest masked
    np.testing.assert_array_equal(st[0], [63, 11, 12, 13, 63, 63])
    np.testing.assert_array_equal(st[1], [63] * 6)


def test_noise_probe_vmap_equals_loop(setup):
    params, emb, layout, answer, _ = setup
    cam = cam_config.resolve(cam_config.CamConfig(probe="noise", layer=1, num_noise_samples=3, refine="none"), CFG)
    key = jax.random.key(3)
    maps, _ = ex.raw_token_maps(params, CFG, cam, emb, layout, answer, [1, 2], key=key)
    states = probes.noise_states(answer, [1, 2], probes.default_noise_ratios(3), key, CFG.lm.mask_id)
    assert np.all(states[0, :, 1] == CFG.lm.mask_id) and np.all(states[1, :, 2] == CFG.lm.mask_id)
    spec = _spec(aggregation="gxa", grad_rule="conservative")  # the diffusion_cam preset
    for ti, t in enumerate([1, 2]):
        loop = np.mean([np.asarray(_maps(params, emb, layout, spec, states[ti, k], [t], answer)[0][0, 0])
                        for k in range(3)], axis=0)
        np.testing.assert_allclose(np.asarray(maps[ti]), loop, rtol=1e-5, atol=1e-6)


def test_aggregations_closed_forms():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((3, 4, 5)).astype(np.float32)
    Gr = rng.standard_normal((3, 4, 5)).astype(np.float32)
    w = Gr.mean((0, 1))
    np.testing.assert_allclose(attr.aggregate(A, Gr, "gradcam"), np.maximum((A * w).sum(-1), 0), rtol=1e-5)
    np.testing.assert_allclose(attr.aggregate(A, Gr, "channel_relu_mean"), np.maximum(A * w, 0).mean(-1), rtol=1e-5)
    np.testing.assert_allclose(attr.aggregate(A, Gr, "layercam"), np.maximum((np.maximum(Gr, 0) * A).sum(-1), 0),
                               rtol=1e-5)
    np.testing.assert_allclose(attr.aggregate(A, Gr, "gxa"), np.maximum((Gr * A).sum(-1), 0), rtol=1e-5)
    wr = np.maximum(Gr, 0).mean((0, 1))
    np.testing.assert_allclose(attr.aggregate(A, Gr, "gradcam", grad_relu=True), np.maximum((A * wr).sum(-1), 0),
                               rtol=1e-5)
    alpha = Gr ** 2 / (2 * Gr ** 2 + A.sum((0, 1), keepdims=True) * Gr ** 3)  # Grad-CAM++ Eq. 19
    wpp = (alpha * np.maximum(Gr, 0)).sum((0, 1))
    np.testing.assert_allclose(attr.aggregate(A, Gr, "gradcam_pp"), np.maximum((A * wpp).sum(-1), 0), rtol=1e-4)


def test_bad_inputs(setup):
    params, emb, layout, answer, commit = setup
    with pytest.raises(ValueError, match="out of range"):
        cam_config.resolve(cam_config.CamConfig(layer=3), CFG)
    with pytest.raises(ValueError, match="needs the generation trajectory"):
        ex.raw_token_maps(params, CFG, cam_config.resolve(cam_config.CamConfig(layer=1), CFG), emb, layout, answer,
                          [0])
    with pytest.raises(ValueError, match=r"needs a resolved CamConfig.*open fields: \[.*'grad_rule'"):
        ex.raw_token_maps(params, CFG, cam_config.CamConfig(layer=1), emb, layout, answer, [0])
    with pytest.raises(ValueError, match="not structurally valid"):
        attr.check_probe_valid(layout.positions(), hidden_len=G, prefix_len=0)
    with pytest.raises(ValueError, match="outside the answer"):
        cam_targets.resolve_targets([9], ["a"] * 6, 4)
    with pytest.raises(ValueError, match="not in the answer"):
        cam_targets.resolve_targets(["zebra"], [" a", " red", " circle"], 3)
    with pytest.raises(ValueError, match="empty"):
        cam_targets.resolve_targets("all", [], 0)
    with pytest.raises(ValueError, match="method="):
        cam_config.CamConfig(method="magic")


def test_word_grouping():
    toks = [" a", " red", " cir", "cle", ",", " and", " a", " blue", " square"]
    words = cam_targets.group_words(toks)
    assert words[:4] == [("a", (0,)), ("red", (1,)), ("circle", (2, 3)), (",", (4,))]
    content = cam_targets.resolve_targets("content", toks, len(toks))
    assert [w for w, _ in content] == ["red", "circle", "blue", "square"]
    assert cam_targets.resolve_targets(["circle"], toks, len(toks)) == [("circle", (2, 3))]


@pytest.mark.parametrize("grad_rule,score", [("standard", "logprob"), ("conservative", "logprob"),
                                             ("conservative_norm", "sum_logits")])
def test_prefix_lm_shared_prompt_forward_equals_whole_sequence(setup, grad_rule, score):
    """Under prefix-LM attention the prompt runs once for all probe states; the maps and scores equal those of the
    whole-sequence forward of every state (decision probe, four targets at three states, rule and score varied)."""
    params, emb, layout, answer, commit = setup
    cam = cam_config.resolve(cam_config.CamConfig(method="hirescam", probe="decision", layer=0, attention="prefix_lm",
                                                  grad_rule=grad_rule, score=score), CFG)
    assert attr.shares_prefix(attr.GradSpec(layer=1, attention="prefix_lm"))
    assert not attr.shares_prefix(attr.GradSpec(layer=1, attention="prefix_lm", hook="post_attn_norm"))
    shared = ex.raw_token_maps(params, CFG, cam, emb, layout, answer, [0, 1, 2, 3], commit_step=commit)
    whole = ex.raw_token_maps(params, CFG, cam, emb, layout, answer, [0, 1, 2, 3], commit_step=commit,
                              share_prefix=False)
    assert float(np.asarray(whole[0]).max()) > 0
    np.testing.assert_allclose(np.asarray(shared[0]), np.asarray(whole[0]), rtol=1e-4,
                               atol=1e-5 * float(np.abs(np.asarray(whole[0])).max()))
    np.testing.assert_allclose(np.asarray(shared[1]), np.asarray(whole[1]), rtol=1e-4, atol=1e-5)


def test_grad_spec_carries_the_resolved_config():
    cam = cam_config.resolve(cam_config.CamConfig(method="diffusion_cam", layer=1), CFG)
    spec = ex.grad_spec(cam, "runner_up")
    assert (spec.layer, spec.hook, spec.attention, spec.score, spec.contrast, spec.aggregation, spec.grad_relu,
            spec.grad_rule) == (1, cam.hook, cam.attention, cam.score, "runner_up", "gxa", False, "conservative")
    with pytest.raises(ValueError, match="resolved"):
        ex.grad_spec(cam_config.CamConfig())


def test_prompt_bucket_lengths():
    assert [ex.prompt_bucket(n) for n in (1, 8, 9, 64, 65, 70, 129, 860, 924, 1025, 1048, 1112)] == \
        [8, 8, 16, 64, 72, 72, 136, 864, 928, 1088, 1088, 1152]
    for n in range(1, 5000):
        b = ex.prompt_bucket(n)
        assert b >= n and b % 8 == 0 and b - n < max(8, n / 16 + 1), n
    assert len({ex.prompt_bucket(n) for n in range(1025, 2049)}) == 16  # sixteen lengths per octave


@pytest.mark.parametrize("attention,layer,rule", [("full", 0, "standard"), ("prefix_lm", 0, "standard"),
                                                  ("prefix_lm", 1, "conservative"), ("full", 1, "conservative_norm")])
def test_prompt_padded_to_its_bucket_gives_the_exact_length_maps(setup, attention, layer, rule):
    """raw_token_maps right-pads the prompt to prompt_bucket(P) rows, masked out as keys, the answer's positions
    unchanged: maps and scores equal those at the exact length (decision probe, three states; the hook right below
    the top block and one block lower, three rules; at block 1 the standard rule's gradient x activation vanishes
    through the top block's RMSNorm, so the held-norm rules are used there); two prompt lengths in one bucket share
    one compiled program, while exact lengths compile one each."""
    params, emb, layout, answer, commit = setup
    P = emb.shape[0]
    assert ex.prompt_bucket(P) > P + 1  # padding rows are really there, for both lengths below
    cam = cam_config.resolve(cam_config.CamConfig(method="hirescam", probe="decision", layer=layer,
                                                  attention=attention, grad_rule=rule), CFG)
    run = lambda e, bucket: ex.raw_token_maps(params, CFG, cam, e, layout, answer, [0, 1, 2, 3], commit_step=commit,
                                              bucket_prompt=bucket)
    padded, exact = run(emb, True), run(emb, False)
    assert float(np.asarray(exact[0]).max()) > 0
    np.testing.assert_allclose(np.asarray(padded[0]), np.asarray(exact[0]), rtol=1e-4,
                               atol=1e-5 * float(np.abs(np.asarray(exact[0])).max()))
    np.testing.assert_allclose(np.asarray(padded[1]), np.asarray(exact[1]), rtol=1e-4, atol=1e-5)
    longer = jnp.concatenate([emb, emb[-1:]])  # one more text row, same bucket
    n = attr.batched_state_maps._cache_size()
    run(longer, True)
    assert attr.batched_state_maps._cache_size() == n
    run(longer, False)
    assert attr.batched_state_maps._cache_size() == n + 1
