"""Every method preset end to end at the array level: ``explain.raw_token_maps(CamConfig(method=m))`` equals a NumPy
computation of the method's documented formula from the hooked activation A and the gradient G of its score.

The table METHODS below is written from the documentation (CamConfig's docstring, SPEC 4.3 / 4.5, the formulas in
attribution's docstring), not read from the preset table, so a preset that silently changes its probe, score,
contrast, hook, attention, gradient rule, aggregation or ReLU on the gradients changes the library's maps and not the
reference. A and G come from the library's lower-level pieces (``_forward_split``, ``_score``; the gradient rules
themselves are checked against finite differences and torch in test_grad_rules.py), computed in one separately
compiled program; the probe states, contrast positions and aggregations are NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcam_jax.cam import attribution as attr
from dcam_jax.cam import config as cam_config
from dcam_jax.cam import explain as ex
from dcam_jax.models import config as C
from dcam_jax.models import llada, mllm
from dcam_jax.processing import image as pimg

# native attention "full", no cam_layer: gradient methods hook block n_layers // 3 = 1. Four blocks, so that two lie
# above it: with one block above, an image token reaches the score only through that block's RMSNorm, which is blind
# to the token's scale, so under the standard rule G_i . A_i = 0 and hirescam's map would be rounding noise.
CFG = C.tiny_mllm(lm=C.tiny_lm(n_layers=4))
MASK = CFG.lm.mask_id
LAYER = 1
ANSWER = np.array([10, 11, 12, 13, 62, 62], np.int32)
VALID = np.array([1, 1, 1, 1, 0, 0], bool)  # the EOS padding is not part of the answer (LLaVA-CAM's sum)
COMMIT = np.array([2, 0, 1, 1, 3, 3], np.int32)
TARGETS = (0, 2)  # position 0 has no previous token: the "previous" contrast uses the next one
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

_BASE = dict(probe="decision", grad_rule="standard", score="logprob", contrast="none", hook="residual",
             attention="full", aggregation="gxa", grad_relu=False)
METHODS = {
    "diffusion_cam": dict(_BASE, grad_rule="conservative", aggregation="gxa"),
    "paper": dict(_BASE, aggregation="gradcam"),
    "reference_compat": dict(_BASE, probe="clean", score="vocab_sum", contrast="previous",
                             aggregation="channel_relu_mean", grad_relu=True),
    "gradcam": dict(_BASE, probe="final", attention="prefix_lm", score="max_logit", aggregation="channel_relu_mean"),
    "llava_cam": dict(_BASE, probe="clean", score="sum_logits", hook="post_attn_norm", aggregation="gradcam",
                      grad_relu=True),
    "layercam": dict(_BASE, aggregation="layercam"),
    "gradcam_pp": dict(_BASE, aggregation="gradcam_pp"),
    "hirescam": dict(_BASE, aggregation="gxa"),
}
# map tolerance relative to the map's max: A and G come from a separately compiled program (same values up to float32
# rounding); Grad-CAM++'s weights divide by 2 G^2 + sum A G^3, which comes close to 0 for some channels and amplifies
# that rounding about a thousandfold
RTOL = dict.fromkeys(("gxa", "gradcam", "channel_relu_mean", "layercam"), 1e-4) | {"gradcam_pp": 1e-2}
# what the gradient depends on (methods that share it share one reference computation)
_GRAD_KEYS = ("probe", "grad_rule", "score", "contrast", "hook", "attention")


def test_the_table_covers_every_gradient_method():
    assert set(METHODS) == set(cam_config.METHODS) - {"tam"}


# ----------------------------------------------------------------------------------------------------------
# NumPy references


def np_state(probe, p):
    """The probe state of target p (SPEC 4.2): decision = tokens committed before p's step; clean = the answer;
    final = every token but those of the last step."""
    if probe == "decision":
        return np.where(COMMIT < COMMIT[p], ANSWER, MASK).astype(np.int32)
    if probe == "final":
        return np.where(COMMIT < COMMIT.max(), ANSWER, MASK).astype(np.int32)
    assert probe == "clean"
    return ANSWER.copy()


def np_contrast(mode, p):
    """(contrast position, token): the previous answer token, the next one for the first position."""
    if mode == "none":
        return 0, 0
    q = p - 1 if p > 0 else p + 1
    return q, int(ANSWER[q])


def np_aggregate(A, G, aggregation, grad_relu):
    """attribution's formulas on A, G [H, W, C] in float64 -> [H, W]."""
    A, G = np.asarray(A, np.float64), np.asarray(G, np.float64)
    Gw = np.maximum(G, 0) if grad_relu else G
    relu = lambda x: np.maximum(x, 0.0)
    if aggregation == "gxa":
        return relu((Gw * A).sum(-1))
    if aggregation == "gradcam":
        return relu(A @ Gw.mean((0, 1)))
    if aggregation == "channel_relu_mean":
        return relu(A * Gw.mean((0, 1))).mean(-1)
    if aggregation == "layercam":
        return relu((relu(G) * A).sum(-1))
    assert aggregation == "gradcam_pp"
    # Grad-CAM++'s Eq. 19 (as pytorch-grad-cam): (sum over h, w of A) * G_ij^3 in the denominator
    den = 2 * G ** 2 + A.sum((0, 1), keepdims=True) * G ** 3
    alpha = np.divide(G ** 2, den, out=np.zeros_like(G), where=den != 0)
    return relu(A @ (alpha * relu(G)).sum((0, 1)))


def _formula(aggregation, grad_relu):
    """A name per distinct formula (layercam and gradcam_pp ignore grad_relu; gxa on ReLU(G) is layercam)."""
    if aggregation == "layercam" or (aggregation == "gxa" and grad_relu):
        return "layercam"
    return aggregation if aggregation == "gradcam_pp" else f"{aggregation}|{grad_relu}"


# ----------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def setup():
    """A random LM (NumPy draws, norm scales around 1) and prompt embeddings with random image tokens laid out as the
    any-resolution processor lays out a 48 x 64 image (no vision tower: nothing here depends on it)."""
    rng = np.random.default_rng(1)
    shapes = jax.eval_shape(lambda k: llada.init_lm_params(k, CFG.lm, "float32"), jax.random.key(0))
    lm = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray((1.0 + 0.2 * rng.standard_normal(a.shape) if "norm" in jax.tree_util.keystr(path)
                                     else 0.3 * rng.standard_normal(a.shape)).astype(np.float32)), shapes)
    ids = np.array([61, 5, 6, -200, 7, 8, 9], np.int32)
    i = mllm.image_token_index(ids)
    layout = mllm.image_layout(pimg.ImageProcessor(CFG)(np.zeros((48, 64, 3), np.uint8)).geometry, i)
    n_img = int(max(layout.positions().max(), layout.newline_positions.max(initial=i))) + 1 - i
    embed = np.asarray(lm["embed"])
    emb = jnp.asarray(np.concatenate([embed[ids[:i]], 0.3 * rng.standard_normal((n_img, CFG.lm.d_model)),
                                      embed[ids[i + 1:]]]).astype(np.float32))
    return {"lm": lm}, emb, layout


@pytest.fixture(scope="module")
def reference(setup):
    """{(grad key, target): (A [H, W, C], G [H, W, C], score)} for every distinct gradient of METHODS, float64,
    computed in one program: A and the vjp from attribution._forward_split, the score from attribution._score."""
    params, emb, layout = setup
    img = layout.positions()
    keys = sorted({tuple(m[k] for k in _GRAD_KEYS) for m in METHODS.values()})

    def run(params, emb):
        out = {}
        for key in keys:
            f = dict(zip(_GRAD_KEYS, key))
            spec = attr.GradSpec(layer=LAYER, hook=f["hook"], attention=f["attention"], score=f["score"],
                                 contrast="position" if f["contrast"] == "previous" else "none",
                                 grad_rule=f["grad_rule"])
            for p in TARGETS:
                A, hN, vjp_fn = attr._forward_split(params["lm"], CFG.lm, spec, emb,
                                                    jnp.asarray(np_state(f["probe"], p)))
                cpos, ctok = np_contrast(f["contrast"], p)
                score = lambda h: attr._score(params["lm"], CFG.lm, spec, h, jnp.asarray(ANSWER),
                                              jnp.asarray(VALID), p, int(ANSWER[p]), cpos, ctok)
                s, cot = jax.value_and_grad(score)(hN)
                (G,) = vjp_fn(cot)
                out[key, p] = (A[0][img], G[0][img], s)
        return out

    compiled = jax.jit(run).lower(params, emb).compile(_FAST_COMPILE)
    return {k: tuple(np.asarray(x, np.float64) for x in v) for k, v in compiled(params, emb).items()}


# ----------------------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("method", list(METHODS))
def test_raw_maps_equal_numpy_formula_of_the_documented_method(setup, reference, method):
    params, emb, layout = setup
    doc = METHODS[method]
    cam = cam_config.resolve(cam_config.CamConfig(method=method), CFG)
    assert cam.layer == LAYER
    maps, scores = ex.raw_token_maps(params, CFG, cam, emb, layout, ANSWER, list(TARGETS), commit_step=COMMIT,
                                     answer_valid=VALID)
    maps, scores = np.asarray(maps, np.float64), np.asarray(scores, np.float64)
    assert maps.shape == (len(TARGETS),) + layout.shape()
    key = tuple(doc[k] for k in _GRAD_KEYS)
    for k, p in enumerate(TARGETS):
        A, G, s = reference[key, p]
        want = np_aggregate(A, G, doc["aggregation"], doc["grad_relu"])
        tol = RTOL[doc["aggregation"]] * want.max()
        assert want.max() > 0, "a trivial reference map cannot tell methods apart"
        np.testing.assert_allclose(maps[k], want, rtol=RTOL[doc["aggregation"]], atol=tol,
                                   err_msg=f"{method}, target {p}")
        np.testing.assert_allclose(scores[k], s, rtol=1e-4, atol=1e-5)
        # the test can tell this method's formula from every other one on these A, G
        for agg in attr.AGGREGATIONS:
            for relu in (False, True):
                if _formula(agg, relu) != _formula(doc["aggregation"], doc["grad_relu"]):
                    assert np.abs(np_aggregate(A, G, agg, relu) - want).max() > 10 * tol, (agg, relu)


def test_tam_maps_are_the_class_logit_of_each_image_token(setup):
    """TAM (gradient-free): ReLU(final-norm hidden state of each image token @ head column of the class), at the
    clean state with the model's attention; the text scores are the same at the answer positions."""
    params, emb, layout = setup
    cam = cam_config.resolve(cam_config.CamConfig(method="tam"), CFG)
    assert (cam.probe, cam.attention, cam.layer) == ("clean", "full", CFG.lm.n_layers - 1)
    maps, text = ex.tam_raw_maps(params, CFG, emb, layout, ANSWER, list(TARGETS), cam.view, cam.attention)
    # the residual stream after the last block = the hooked activation of a GradSpec at the last block
    spec = attr.GradSpec(layer=CFG.lm.n_layers - 1, attention="full")
    h = np.asarray(attr._forward_split(params["lm"], CFG.lm, spec, emb, jnp.asarray(ANSWER))[0][0], np.float64)
    x = h / np.sqrt((h * h).mean(-1, keepdims=True) + CFG.lm.rms_eps) * np.asarray(params["lm"]["final_norm"])
    head = np.asarray(params["lm"]["lm_head"], np.float64)[:, ANSWER[list(TARGETS)]]  # [D, T]
    want = np.maximum(np.einsum("hwd,dt->thw", x[layout.positions()], head), 0.0)
    assert want.max() > 0 and (want == 0).any()
    np.testing.assert_allclose(np.asarray(maps), want, rtol=1e-4, atol=1e-4 * want.max())
    P = emb.shape[0]
    np.testing.assert_allclose(np.asarray(text), np.maximum(x[P:] @ head, 0.0).T, rtol=1e-4, atol=1e-5)
