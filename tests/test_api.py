"""The public API end to end on a tiny random model: generate, explain (every method), targets, outputs."""

import json

import jax
import numpy as np
import pytest

import dcam_jax as dj
from dcam_jax import api
from dcam_jax.cam import config as cam_config
from dcam_jax.cam import explain as ex

IMG = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def generation(tiny_model):
    return dj.generate(tiny_model, IMG, "describe the image", key=jax.random.key(0))


def test_generate_records_a_consistent_trajectory(tiny_model, generation):
    g = generation
    assert g.tokens.shape == (8,) and g.commit_step.shape == (8,) and g.num_steps == 8
    assert sorted(g.commit_step.tolist()) == list(range(8))  # uniform schedule: one token per step
    assert len(g.token_strings) == 8 and 0 <= g.num_valid <= 8
    assert g.layout.stop <= len(g.prompt_ids) - 1 + g.layout.num_tokens
    again = dj.generate(tiny_model, IMG, "describe the image", key=jax.random.key(0))
    np.testing.assert_array_equal(again.tokens, g.tokens)


def test_explain_all_tokens(tiny_model, generation):
    cam = dj.CamConfig(refine="none")
    e = dj.explain(tiny_model, IMG, "describe the image", targets="all", config=cam, generation=generation)
    H, W = generation.layout.shape()
    T = generation.num_valid
    assert e.maps.shape == (T, H, W) and e.raw_maps.shape == (T, H, W)
    assert np.all((e.maps >= 0) & (e.maps <= 1)) and np.all(np.isfinite(e.maps))
    assert [p for p in e.positions] == [(i,) for i in range(T)]
    assert e.image_maps().shape == (T, 48, 64)
    assert e.image_maps((10, 20)).shape == (T, 10, 20)
    json.dumps(e.to_dict())  # JSON-ready


@pytest.mark.parametrize("method", ["diffusion_cam", "paper", "reference_compat", "gradcam", "llava_cam", "tam",
                                    "layercam", "gradcam_pp", "hirescam"])
def test_every_method_gives_normalised_maps(tiny_model, generation, method):
    e = dj.explain(tiny_model, IMG, "describe the image", targets=[0, 1], config=dj.CamConfig(method=method),
                   generation=generation)
    assert e.maps.shape[0] == 2 and e.maps.dtype == np.float32
    assert np.all(np.isfinite(e.maps)) and e.maps.min() >= 0 and e.maps.max() <= 1
    assert e.config.method == method


def test_llava_cam_is_one_map_for_the_whole_answer(tiny_model, generation):
    e = dj.explain(tiny_model, IMG, "describe the image", targets=[0, 1], config=dj.CamConfig(method="llava_cam"),
                   generation=generation)
    np.testing.assert_allclose(e.raw_maps[0], e.raw_maps[1])  # its score sums over all answer positions
    assert set(np.unique(e.maps[e.maps < 0.5])) <= {0.0}  # values below 0.5 of the max are zeroed


def test_given_answer_needs_a_probe_without_trajectory(tiny_model):
    with pytest.raises(ValueError, match="needs the generation trajectory"):
        dj.explain(tiny_model, IMG, "describe the image", answer="a red circle")
    e = dj.explain(tiny_model, IMG, "describe the image", answer="a red circle and a blue square",
                   targets=["circle", "square"], config=dj.CamConfig(probe="clean", refine="none"))
    assert e.tokens == ["circle", "square"] and e.positions == [(2,), (6,)]
    e2 = dj.explain(tiny_model, IMG, "describe the image", answer="a red circle", targets="content",
                    config=dj.CamConfig(probe="noise", num_noise_samples=2, refine="none"))
    assert e2.tokens == ["red", "circle"]


def test_reference_compat_preset_runs(tiny_model, generation):
    e = dj.explain(tiny_model, IMG, "describe the image", targets=[1, 2], config=dj.reference_compat(),
                   generation=generation)
    assert e.config.score == "vocab_sum" and e.config.aggregation == "channel_relu_mean" and e.config.grad_relu
    assert np.all(np.isfinite(e.maps))


def test_bad_inputs(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        dj.explain(tiny_model, IMG, "   ", answer=[0, 1], config=dj.CamConfig(probe="clean"))
    with pytest.raises(ValueError, match="must not contain"):
        dj.generate(tiny_model, IMG, "look <image>")
    bad = tmp_path / "x.png"
    bad.write_text("not an image")
    from dcam_jax.processing.image import ImageError
    with pytest.raises(ImageError, match="cannot read image"):
        dj.generate(tiny_model, str(bad), "describe the image")
    with pytest.raises(FileNotFoundError, match="embedded"):
        api.BUILTIN["missing"] = tmp_path / "nothing"
        try:
            dj.load_pretrained("missing")
        finally:
            del api.BUILTIN["missing"]


def test_default_prompt_is_used(tiny_model):
    g = dj.generate(tiny_model, IMG, None, key=jax.random.key(0))
    g2 = dj.generate(tiny_model, IMG, tiny_model.config.default_prompt, key=jax.random.key(0))
    np.testing.assert_array_equal(g.prompt_ids, g2.prompt_ids)


def test_image_maps_of_a_padded_view_cover_only_the_image():
    from dcam_jax.models import config as C
    from dcam_jax.models.mllm import image_layout
    from dcam_jax.processing.image import image_geometry

    cfg = C.tiny_mllm(image_aspect_ratio="pad")
    geom = image_geometry((40, 20), cfg)
    assert geom.pad_box == (10, 0, 20, 40)
    u = geom.view_side
    m = np.random.default_rng(0).random((1, u, u)).astype(np.float32)
    e = ex.Explanation(maps=m, raw_maps=m, tokens=["x"], positions=[(0,)], scores=np.zeros(1), text="x",
                       answer_ids=np.zeros(1, np.int32), layout=image_layout(geom, 0), view="base",
                       image_size=(40, 20), config=dj.CamConfig())
    im = e.image_maps()
    assert im.shape == (1, 20, 40)
    # independent: PIL bilinear upsampling of the square map to 40 x 40, then the image's rows 10..29
    from dcam_jax.viz import resize_map
    np.testing.assert_allclose(im[0], resize_map(m[0], (40, 40))[10:30], atol=1e-5)


def test_default_layer_is_the_models_cam_layer_else_a_third_of_depth(tiny_model):
    from dcam_jax.models.config import ConfigError

    cfg = tiny_model.config
    n = cfg.lm.n_layers
    assert cfg.cam_layer is None
    assert cam_config.resolve(dj.CamConfig(), cfg).layer == n // 3
    assert cam_config.resolve(dj.CamConfig(method="tam"), cfg).layer == n - 1
    chosen = cfg.replace(cam_layer=n - 1)
    for method in ("diffusion_cam", "paper", "hirescam", "gradcam"):
        assert cam_config.resolve(dj.CamConfig(method=method), chosen).layer == n - 1
    assert cam_config.resolve(dj.CamConfig(method="tam"), chosen).layer == n - 1
    assert cam_config.resolve(dj.CamConfig(layer=0), chosen).layer == 0  # an explicit layer wins
    for bad in (n, -1, True, 1.0):
        with pytest.raises(ConfigError, match="cam_layer"):
            cfg.replace(cam_layer=bad)


def test_shipped_toy_model_records_the_layer_the_protocol_chose():
    # docs/toy_model.md: blocks 0 and 1 tie on validation Obj-IoU, block 1 is cheaper and ahead on pooled pointing
    m = dj.load_pretrained("toy")
    assert m.config.cam_layer == 1 and cam_config.resolve(dj.CamConfig(), m.config).layer == 1
    assert cam_config.resolve(dj.CamConfig(method="tam"), m.config).layer == m.config.lm.n_layers - 1


@pytest.mark.parametrize("field,value,names", [
    ("method", "grad-cam", ["diffusion_cam", "paper", "reference_compat", "hirescam"]),
    ("probe", "middle", ["decision", "trajectory", "noise", "clean", "final"]),
    ("grad_rule", "lrp", ["standard", "conservative_norm", "conservative"]),
    ("aggregation", "hirescam", ["gxa", "gradcam", "layercam", "gradcam_pp"]),
])
def test_unknown_names_are_refused_with_the_valid_ones(field, value, names):
    with pytest.raises(ValueError, match=f"{field}='{value}'") as err:
        dj.CamConfig(**{field: value})
    assert all(n in str(err.value) for n in names)


def test_unknown_refine_preset_names_the_presets(tiny_model, generation):
    with pytest.raises(ValueError, match="unknown preset 'smooth'") as err:
        dj.explain(tiny_model, IMG, "describe the image", targets=[0], generation=generation,
                   config=dj.CamConfig(refine="smooth"))
    assert "default" in str(err.value) and "full" in str(err.value)


def test_presets_fix_their_documented_fields():
    assert cam_config.preset_fields("diffusion_cam") == dict(
        probe="decision", score="logprob", contrast="none", grad_relu=False, hook="residual",
        grad_rule="conservative", aggregation="gxa", refine="default")
    assert {k: cam_config.preset_fields("paper")[k] for k in ("probe", "grad_rule", "aggregation", "refine")} == dict(
        probe="decision", grad_rule="standard", aggregation="gradcam", refine="full")
    assert {k: cam_config.preset_fields("hirescam")[k] for k in ("grad_rule", "aggregation", "refine")} == dict(
        grad_rule="standard", aggregation="gxa", refine="none")
    r = cam_config.preset_fields("reference_compat")
    assert (r["probe"], r["score"], r["contrast"], r["aggregation"], r["grad_relu"], r["refine"]) == (
        "clean", "vocab_sum", "previous", "channel_relu_mean", True, "reference_compat")
    assert dj.paper() == dj.CamConfig(method="paper") and dj.reference_compat().method == "reference_compat"


def test_default_maps_are_the_normalised_gradient_times_activation(tiny_model, generation):
    """Values, not ranges: the default method's maps of two answer tokens equal the min-max normalised NumPy
    ReLU(sum_c G_c A_c) at each token's decision state, with A the residual stream after block n_layers // 3 and G
    the conservative gradient of the token's log-probability (its default refinement only clips and normalises)."""
    from dcam_jax.cam import attribution as attr

    cfg, g = tiny_model.config, generation
    targets = (0, 1)
    e = dj.explain(tiny_model, IMG, "describe the image", targets=list(targets), generation=g)
    emb = api.prepare(tiny_model, IMG, "describe the image").prompt_embeds
    spec = attr.GradSpec(layer=cfg.lm.n_layers // 3, attention=cfg.attention, grad_rule="conservative")
    answer, valid = jax.numpy.asarray(g.tokens), jax.numpy.ones(len(g.tokens), bool)

    def a_and_g(lm, emb):  # A and dS/dA of each target at its decision state (the tokens committed before it)
        out = []
        for p in targets:
            state = np.where(g.commit_step < g.commit_step[p], g.tokens, cfg.lm.mask_id)
            A, hN, vjp_fn = attr._forward_split(lm, cfg.lm, spec, emb, jax.numpy.asarray(state))
            s, cot = jax.value_and_grad(lambda h: attr._score(lm, cfg.lm, spec, h, answer, valid, p,
                                                              int(g.tokens[p]), 0, 0))(hN)
            out.append((A[0], vjp_fn(cot)[0][0], s))
        return out

    fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    lm = tiny_model.params["lm"]
    img = g.layout.positions()
    for k, (A, G, s) in enumerate(jax.jit(a_and_g).lower(lm, emb).compile(fast)(lm, emb)):
        A, G = (np.asarray(x, np.float64)[img] for x in (A, G))
        m = np.maximum((A * G).sum(-1), 0.0)
        assert m.max() > 0 and (m < m.max()).any()
        m = (m - m.min()) / (m.max() - m.min())
        np.testing.assert_allclose(e.raw_maps[k], m, atol=2e-5, err_msg=f"target {targets[k]}")
        np.testing.assert_allclose(e.maps[k], m, atol=2e-5)
        np.testing.assert_allclose(e.scores[k], float(s), rtol=1e-5, atol=1e-6)
