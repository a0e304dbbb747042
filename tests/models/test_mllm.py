"""Image layout and multimodal assembly: token counts of the real models, and parity of the whole image-token
sequence with an independent torch composition (SiglipVisionModel -> Linear/GELU/Linear -> interpolate ->
unpad -> newline -> splice)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dcam_jax.models import config as C
from dcam_jax.models import mllm
from dcam_jax.processing import image as pimg

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# (width, height) -> (high-res grid H x W, image tokens), from reference/backbones.md 2.4 and
# diffusion_cam_reference.md section 1 (computed there with the reference code's own arithmetic).
LAVIDA_TABLE = {(640, 480): ((22, 28), 834), (500, 375): ((14, 18), 462), (384, 384): ((14, 14), 406),
                (480, 640): ((28, 22), 840), (640, 427): ((18, 28), 718), (640, 640): ((28, 28), 1008),
                (1024, 768): ((22, 28), 834), (1920, 1080): ((16, 28), 660)}
LLADA_V_TABLE = {(640, 480): ((40, 54), 2929), (384, 384): ((27, 27), 1485), (500, 375): ((27, 36), 1728),
                 (1024, 768): ((46, 62), 3627), (1920, 1080): ((40, 72), 3649)}


@pytest.mark.parametrize("size", sorted(LAVIDA_TABLE))
def test_lavida_token_counts(size):
    g = pimg.image_geometry(size, C.lavida())
    assert g.highres_shape == LAVIDA_TABLE[size][0]
    assert g.num_image_tokens == LAVIDA_TABLE[size][1]
    assert g.num_views == 1 + g.grid[0] * g.grid[1]


@pytest.mark.parametrize("size", sorted(LLADA_V_TABLE))
def test_llada_v_token_counts(size):
    g = pimg.image_geometry(size, C.llada_v())
    assert g.highres_shape == LLADA_V_TABLE[size][0]
    assert g.num_image_tokens == LLADA_V_TABLE[size][1]
    assert g.capped == (size in [(1024, 768), (1920, 1080)])


def test_layout_positions_are_exact():
    g = pimg.image_geometry((640, 480), C.lavida())
    lay = mllm.image_layout(g, start=37)
    hi, base = lay.positions("highres"), lay.positions("base")
    assert hi.shape == (22, 28) and base.shape == (14, 14)
    allpos = np.concatenate([base.ravel(), hi.ravel(), lay.newline_positions])
    assert sorted(allpos.tolist()) == list(range(37, 37 + 834))  # every token exactly once
    assert lay.stop == 37 + 834
    # a newline closes each row: the token after the last grid token of row r
    np.testing.assert_array_equal(lay.newline_positions, hi[:, -1] + 1)
    assert hi[0, 0] == 37 + 196 and hi[1, 0] == hi[0, 0] + 29
    assert lay.default_view == "highres"
    with pytest.raises(ValueError, match="no 'highres' view"):
        mllm.image_layout(pimg.image_geometry((64, 48), C.tiny_mllm(image_aspect_ratio="pad")), 0).positions("highres")


def test_shifted_layout():
    lay = mllm.image_layout(pimg.image_geometry((500, 375), C.lavida()), 5)
    sh = lay.shifted(10)
    assert sh.start == 15 and np.all(sh.positions() == lay.positions() + 10)


def test_best_resolution_and_pad_crop_geometry():
    pins = C.lavida().grid_pinpoints
    assert pimg.select_best_resolution((640, 480), pins) == (768, 768)
    assert pimg.select_best_resolution((500, 375), pins) == (768, 384)
    assert pimg.select_best_resolution((384, 384), pins) == (384, 768)  # first of two equal candidates


# ------------------------------------------------------------------------------------------------------------
# parity of the whole image-token block with an independent torch composition

TINY = C.tiny_mllm()
TINY_V = C.tiny_mllm(image_aspect_ratio="anyres_max_4", pool_size=None,
                     grid_pinpoints=tuple((i * 28, j * 28) for i in range(1, 5) for j in range(1, 5)))


@pytest.fixture(scope="module")
def tiny_params():
    p = mllm.init_mllm_params(jax.random.key(0), TINY, "float32", scale=0.3)
    rng = np.random.default_rng(0)
    for name in ("ln1", "ln2"):
        p["vision"]["layers"][name]["scale"] = jnp.asarray(
            1 + 0.2 * rng.standard_normal(p["vision"]["layers"][name]["scale"].shape), jnp.float32)
    return p


def _torch_tower(cfg, vp):
    vc = cfg.vision
    tc = transformers.SiglipVisionConfig(hidden_size=vc.width, intermediate_size=vc.mlp_dim,
                                         num_hidden_layers=vc.depth, num_attention_heads=vc.num_heads,
                                         image_size=vc.image_size, patch_size=vc.patch_size,
                                         hidden_act="gelu_pytorch_tanh", layer_norm_eps=vc.ln_eps)
    tc._attn_implementation = "eager"
    m = transformers.SiglipVisionModel(tc).eval().double()
    t = lambda a: torch.from_numpy(np.asarray(a, np.float64))
    L = vp["layers"]
    sd = {"embeddings.patch_embedding.weight": t(vp["patch_embed"]["kernel"]).permute(3, 2, 0, 1),
          "embeddings.patch_embedding.bias": t(vp["patch_embed"]["bias"]),
          "embeddings.position_embedding.weight": t(vp["pos_embed"])}
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
             "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    for i in range(vc.depth):
        for ours, theirs in names.items():
            sd[f"encoder.layers.{i}.{theirs}.weight"] = t(L[ours]["kernel"][i]).T
            sd[f"encoder.layers.{i}.{theirs}.bias"] = t(L[ours]["bias"][i])
        for ln, theirs in (("ln1", "layer_norm1"), ("ln2", "layer_norm2")):
            sd[f"encoder.layers.{i}.{theirs}.weight"] = t(L[ln]["scale"][i])
            sd[f"encoder.layers.{i}.{theirs}.bias"] = t(L[ln]["bias"][i])
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith(("post_layernorm", "head", "embeddings.position_ids")) for k in missing)
    return m


def _torch_image_block(cfg, p, pixel_values, image_size):
    """Reference composition written independently of dcam_jax.models.mllm (LLaVA-NeXT spatial_unpad)."""
    t = lambda a: torch.from_numpy(np.asarray(a, np.float64))
    tower = _torch_tower(cfg, p["vision"])
    x = t(pixel_values).permute(0, 3, 1, 2)
    with torch.no_grad():
        feats = tower(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        pp = p["projector"]
        h = torch.nn.functional.gelu(feats @ t(pp["fc1"]["kernel"]) + t(pp["fc1"]["bias"]))
        h = h @ t(pp["fc2"]["kernel"]) + t(pp["fc2"]["bias"])
        n, P, D = h.shape
        g = int(math.isqrt(P))
        if cfg.pool_size is not None:
            hm = h.view(n, g, g, D).permute(0, 3, 1, 2)
            hm = torch.nn.functional.interpolate(hm, size=(cfg.pool_size, cfg.pool_size), mode="bilinear",
                                                 align_corners=False)
            h = hm.flatten(2).transpose(1, 2)
        u = int(math.isqrt(h.shape[1]))
        base, crops = h[0], h[1:]
        best = pimg.select_best_resolution(image_size, cfg.grid_pinpoints)
        gw, gh = best[0] // cfg.vision.image_size, best[1] // cfg.vision.image_size
        fm = crops.view(gh, gw, u, u, D).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # [D, gh*u, gw*u]
        ow, oh = image_size
        ch, cw = fm.shape[1:]
        if ow / oh > cw / ch:
            pad = (ch - int(oh * (cw / ow))) // 2
            fm = fm[:, pad:ch - pad, :]
        else:
            pad = (cw - int(ow * (ch / oh))) // 2
            fm = fm[:, :, pad:cw - pad]
        if cfg.image_aspect_ratio == "anyres_max_4":
            _, hh, ww = fm.shape
            times = math.sqrt(hh * ww / (cfg.anyres_max_crops * u ** 2))
            if times > 1.1:
                fm = torch.nn.functional.interpolate(fm[None], [int(hh // times), int(ww // times)],
                                                     mode="bilinear")[0]
        nl = t(p["image_newline"])[:, None, None].expand(D, fm.shape[1], 1)
        fm = torch.cat([fm, nl], -1).flatten(1, 2).transpose(0, 1)
        return torch.cat([base, fm], 0).numpy()


def _assert_close_fp32(ours, ref):
    # ours runs in float32, the reference in float64; the random weights give features of magnitude ~5, so the
    # bound is 1e-5 relative to the largest feature (float32 rounding through the tower is ~1e-6 relative)
    err = np.abs(ours - ref).max()
    assert err <= 1e-5 * max(1.0, np.abs(ref).max()), err


@pytest.mark.parametrize("size", [(64, 48), (40, 90), (50, 50)], ids=["wide", "tall", "square"])
def test_image_block_matches_torch_lavida_style(tiny_params, size):
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    proc = pimg.ImageProcessor(TINY)(img)
    ours = np.asarray(mllm.image_tokens(tiny_params, TINY, jnp.asarray(proc.pixel_values), proc.geometry))
    ref = _torch_image_block(TINY, tiny_params, proc.pixel_values, size)
    assert ours.shape == ref.shape == (proc.geometry.num_image_tokens, TINY.lm.d_model)
    _assert_close_fp32(ours, ref)


def test_image_block_matches_torch_with_llada_v_cap(tiny_params):
    size = (110, 70)
    geom = pimg.image_geometry(size, TINY_V)
    assert geom.capped  # the cap path really runs
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    proc = pimg.ImageProcessor(TINY_V)(img)
    ours = np.asarray(mllm.image_tokens(tiny_params, TINY_V, jnp.asarray(proc.pixel_values), proc.geometry))
    ref = _torch_image_block(TINY_V, tiny_params, proc.pixel_values, size)
    assert ours.shape == ref.shape
    _assert_close_fp32(ours, ref)


def test_splice_places_image_block_at_placeholder(tiny_params):
    img = np.random.default_rng(5).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    proc = pimg.ImageProcessor(TINY)(img)
    ids = np.array([1, 2, 3, -200, 4, 5], np.int32)
    emb, lay = mllm.multimodal_embeddings(tiny_params, TINY, ids, proc.pixel_values, proc.geometry)
    N = proc.geometry.num_image_tokens
    assert emb.shape == (5 + N, TINY.lm.d_model) and lay.start == 3 and lay.stop == 3 + N
    block = mllm.image_tokens(tiny_params, TINY, jnp.asarray(proc.pixel_values), proc.geometry)
    np.testing.assert_allclose(np.asarray(emb[3:3 + N]), np.asarray(block), atol=1e-6)
    table = np.asarray(tiny_params["lm"]["embed"])
    np.testing.assert_allclose(np.asarray(emb[:3]), table[[1, 2, 3]], atol=0)
    np.testing.assert_allclose(np.asarray(emb[3 + N:]), table[[4, 5]], atol=0)
    # newline tokens of the layout hold image_newline; grid tokens do not
    np.testing.assert_allclose(np.asarray(emb[lay.newline_positions]),
                               np.broadcast_to(np.asarray(tiny_params["image_newline"]), (len(lay.newline_positions),
                                                                                           TINY.lm.d_model)))
    with pytest.raises(ValueError, match="exactly one image placeholder"):
        mllm.multimodal_embeddings(tiny_params, TINY, np.array([1, 2]), proc.pixel_values, proc.geometry)


def test_preprocessing_views():
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    out = pimg.ImageProcessor(TINY)(arr)
    g = out.geometry
    assert out.pixel_values.shape == (g.num_views, 28, 28, 3) and out.pixel_values.dtype == np.float32
    base = (np.asarray(Image.fromarray(arr).resize((28, 28), Image.BICUBIC), np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(out.pixel_values[0], base, atol=1e-6)
    assert out.pixel_values.min() >= -1 and out.pixel_values.max() <= 1
    # crops tile the padded canvas row-major
    canvas = pimg.resize_and_pad(Image.fromarray(arr), g.best_resolution)
    c = np.asarray(canvas, np.float32) / 127.5 - 1
    gw, gh = g.grid
    for r in range(gh):
        for col in range(gw):
            np.testing.assert_allclose(out.pixel_values[1 + r * gw + col], c[r * 28:(r + 1) * 28, col * 28:(col + 1) * 28],
                                       atol=1e-6)


def test_bad_images_raise(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(pimg.ImageError, match="cannot read image"):
        pimg.load_image(bad)
    with pytest.raises(pimg.ImageError, match="does not exist"):
        pimg.load_image(tmp_path / "nope.png")
    with pytest.raises(pimg.ImageError, match="at least 7 pixels"):
        pimg.ImageProcessor(TINY)(np.zeros((5, 40, 3), np.uint8))
    with pytest.raises(pimg.ImageError, match="dtype float64"):
        pimg.load_image(np.zeros((8, 8, 3)))
    with pytest.warns(UserWarning, match="converted to RGB"):
        rgb = pimg.load_image(np.zeros((9, 9), np.uint8))
    assert rgb.mode == "RGB"
    with pytest.warns(UserWarning, match="mode RGBA"):
        pimg.load_image(Image.new("RGBA", (9, 9)))
