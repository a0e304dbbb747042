"""The toy dMLLM: tokenizer, batched training forward (against the one-example model path), training smoke test,
the interim decoder (against a NumPy loop), caption scoring, and the shipped checkpoint."""

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcam_jax.data import shapes
from dcam_jax.models import llada, mllm
from dcam_jax.processing import image as pimg
from dcam_jax.processing import text as ptext
from dcam_jax.toy import evaluate as tev
from dcam_jax.toy import model as tm
from dcam_jax.toy import tokenizer as toy_tok
from dcam_jax.toy import tower_heads as th
from dcam_jax.toy import train as ttrain

ASSET = Path(__file__).resolve().parents[2] / "dcam_jax" / "assets" / "toy"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return ptext.load_tokenizer(toy_tok.save_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer"))


LAYOUTS = ("pad", "anyres")


def tiny_config(layout="pad", **kw):
    """The toy config with tiny widths. layout "pad": the toy's own (one 64 px view of 8 x 8 tokens); "anyres":
    LaViDa's layout at toy scale (32 px views, a base view + 2 x 2 grid of crops with newline tokens), so the
    batched training forward is checked on the any-resolution path too."""
    c = tm.toy_config(**kw)
    vision = dataclasses.replace(c.vision, width=32, depth=1, num_heads=2, mlp_dim=48)
    extra = {}
    if layout == "anyres":
        vision = dataclasses.replace(vision, image_size=32)
        extra = dict(image_aspect_ratio="anyres", grid_pinpoints=((32, 64), (64, 32), (64, 64), (96, 32), (32, 96)))
    return c.replace(lm=dataclasses.replace(c.lm, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=16,
                                            mlp_hidden=48), vision=vision, **extra)


@functools.lru_cache(maxsize=None)
def tiny_params(attention="full", seed=0, layout="pad"):
    # a larger init scale than training uses, so that logits differ visibly between positions
    return mllm.init_mllm_params(jax.random.key(seed), tiny_config(layout, attention=attention), scale=0.2)


# ----------------------------------------------------------------------------------------------------------
# tokenizer


def test_every_caption_word_is_one_token_and_round_trips(tok):
    for w in shapes.VOCABULARY:
        ids = tok(w).input_ids
        assert len(ids) == 1, w
        assert tok.decode(ids) == w
        assert tok.convert_ids_to_tokens(ids[0]) == w
    cap = shapes.make_example(shapes.split_seed("train", 3), shapes.preset("default")).caption
    ids = tok(cap).input_ids
    assert len(ids) == len(cap.split())
    assert tok.decode(ids) == cap  # single spaces between words


def test_tokenizer_ids_match_config_and_vocabulary(tok):
    cfg = tm.toy_config()
    vocab = toy_tok.vocabulary()
    assert len(tok) == len(vocab) == cfg.lm.vocab_size
    assert len(set(vocab)) == len(vocab)
    assert tok.bos_token_id == cfg.lm.bos_id == vocab.index("<|startoftext|>")
    assert tok.eos_token_id == tok.pad_token_id == cfg.lm.eos_id == cfg.lm.pad_id == vocab.index("<|endoftext|>")
    assert tok.convert_tokens_to_ids("<|mdm_mask|>") == cfg.lm.mask_id
    assert tok.convert_tokens_to_ids("<|eot_id|>") == cfg.lm.eot_id
    assert len({cfg.lm.bos_id, cfg.lm.eos_id, cfg.lm.mask_id, cfg.lm.eot_id}) == 4


def test_tokenizer_adds_no_bos_lowercases_and_maps_unknown_words(tok):
    ids = tok("Describe THE image.").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["describe", "the", "image", "."]
    assert tok("a zebra").input_ids[1] == tok.convert_tokens_to_ids("<|unk|>")
    assert tok("\n\nred").input_ids == [tok.convert_tokens_to_ids("\n\n"), tok.convert_tokens_to_ids("red")]


def test_chat_prompt_ids(tok):
    cfg = tm.toy_config()
    ids = ptext.build_prompt_ids(None, cfg, tok)
    t = tok.convert_tokens_to_ids
    # the reference quirk drops the first token of the chunk after <image>: the "\n" newline
    expected = [t("<|startoftext|>"), t("<|start_header_id|>"), t("user"), t("<|end_header_id|>"), t("\n\n"), -200,
                t("describe"), t("the"), t("image"), t("<|eot_id|>"), t("<|start_header_id|>"), t("assistant"),
                t("<|end_header_id|>"), t("\n\n")]
    assert ids.tolist() == expected
    assert cfg.default_prompt == tm.TOY_PROMPT


def test_tokenizer_loads_with_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    d = toy_tok.save_tokenizer(tmp_path / "t")
    assert sorted(p.name for p in d.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                   "tokenizer_config.json"]
    t = AutoTokenizer.from_pretrained(d, local_files_only=True)
    assert t.decode(t("a red circle").input_ids) == "a red circle"
    with pytest.raises(ValueError, match="not a directory"):
        toy_tok.save_tokenizer(tmp_path / "t" / "tokenizer.json")


# ----------------------------------------------------------------------------------------------------------
# host batch


def test_answer_ids_format(tok):
    cfg = tm.toy_config()
    a = tm.answer_ids(["a red circle", "a blue star above a green square"], tok, cfg, 12)
    t = tok.convert_tokens_to_ids
    assert a[0].tolist() == [t("a"), t("red"), t("circle"), cfg.lm.eot_id] + [cfg.lm.eos_id] * 8
    assert a[1, 7] == cfg.lm.eot_id and a[1, 6] == t("square") and (a[1, 8:] == cfg.lm.eos_id).all()
    cls = tm.answer_token_classes(a, tok, cfg)
    names = [tm.TOKEN_CLASSES[c] for c in cls[0, :5]]
    assert names == ["function", "colour", "shape", "eot", "pad"]
    assert tm.TOKEN_CLASSES[cls[1, 3]] == "relation"
    with pytest.raises(ValueError, match="gen_length"):
        tm.answer_ids(["a red circle above a blue square"], tok, cfg, 7)


def test_pair_relations_match_captions():
    cfg = shapes.preset("default")
    b = shapes.batch("train", range(40), cfg)
    rel = tm.pair_relations(b.centres_yx, b.num_objects)
    for i in range(40):
        e = shapes.make_example(shapes.split_seed("train", i), cfg)
        want = np.full(cfg.max_objects, tm.RELATIONS.index("none"))
        for a, r, c in e.relations:
            assert c == a + 1 and a % 2 == 0
            want[a] = tm.RELATIONS.index(r)
        np.testing.assert_array_equal(rel[i], want)


def test_sincos_pos_embed_closed_form():
    pe = tm.sincos_pos_embed(3, 8)
    assert pe.shape == (9, 8)
    # token (row 1, col 2) is index 5; quarter = 2 frequencies 1 and 1/100
    y, x, om = 1.0, 2.0, np.array([1.0, 0.01])
    np.testing.assert_allclose(pe[5], np.concatenate([np.sin(y * om), np.cos(y * om), np.sin(x * om), np.cos(x * om)]),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        tm.sincos_pos_embed(3, 6)


def test_area_weights_match_loop():
    rng = np.random.default_rng(0)
    m = rng.random((2, 3, 16, 16)) > 0.5
    w = tm.area_weights(m, 4)
    ref = np.zeros((2, 3, 4, 4))
    for b in range(2):
        for k in range(3):
            for i in range(4):
                for j in range(4):
                    ref[b, k, i, j] = m[b, k, 4 * i:4 * i + 4, 4 * j:4 * j + 4].mean()
    np.testing.assert_allclose(w, ref, atol=1e-7)
    with pytest.raises(ValueError, match="divisible"):
        tm.area_weights(m, 5)


@functools.lru_cache(maxsize=None)
def _host_batch(tok, layout):
    cfg = tiny_config(layout)
    b = shapes.batch("train", range(3), shapes.preset("default"))
    return tm.make_host_batch(b, cfg, tok, pimg.ImageProcessor(cfg), 24), b


@pytest.fixture(scope="module")
def host_batch(tok):
    return _host_batch(tok, "pad")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_host_batch_shapes_and_targets(tok, layout):
    hb, b = _host_batch(tok, layout)
    cfg = tiny_config(layout)
    g = tm.toy_geometry(cfg)
    S = cfg.vision.image_size
    assert hb.pixel_values.shape == (3, g.num_views, S, S, 3)
    u, (H, W) = g.view_side, g.highres_shape
    assert hb.obj_weights_base.shape == (3, 4, u, u) and hb.obj_weights_hi.shape == (3, 4, H, W)
    # the pooled weights keep each object's area (as a fraction of one cell)
    area = b.masks.sum(axis=(-2, -1)) / (64 * 64)
    np.testing.assert_allclose(hb.obj_weights_base.sum(axis=(-2, -1)) / (u * u), area, atol=1e-6)
    if H:
        np.testing.assert_allclose(hb.obj_weights_hi.sum(axis=(-2, -1)) / (H * W), area, atol=1e-6)
    np.testing.assert_array_equal(hb.obj_shape, b.shapes)
    for i in range(3):
        np.testing.assert_allclose(hb.pixel_values[i], pimg.ImageProcessor(cfg)(b.images[i]).pixel_values)


# ----------------------------------------------------------------------------------------------------------
# batched forward == the one-example model path


def test_toy_layout():
    cfg = tm.toy_config()
    g = tm.toy_geometry(cfg)
    assert g.num_views == 1 and g.grid == (0, 0) and g.num_image_tokens == 64 and g.pad_box is None
    a = tm.toy_geometry(tiny_config("anyres"))
    assert a.num_views == 5 and a.grid == (2, 2) and a.num_image_tokens == 4 * 4 + 8 * 9


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_image_blocks_match_mllm_image_tokens(tok, layout):
    hb, _ = _host_batch(tok, layout)
    cfg, params = tiny_config(layout), tiny_params(layout=layout)
    g = tm.toy_geometry(cfg)
    got = tm.image_blocks(params, cfg, jnp.asarray(hb.pixel_values), g)
    for i in range(3):
        ref = mllm.image_tokens(params, cfg, jnp.asarray(hb.pixel_values[i]), g)
        # the batched and one-image paths round differently in float32: differences of a few ulps of the largest
        # values (|x| up to about 11, one ulp about 1e-6), so the absolute tolerance is scaled to the array
        atol = 4 * np.finfo(np.float32).eps * float(np.abs(np.asarray(ref)).max())
        np.testing.assert_allclose(got[i], ref, rtol=1e-5, atol=atol)
    frozen = tm.image_blocks(params, cfg, jnp.asarray(hb.pixel_values), g, freeze_tower=True)
    np.testing.assert_array_equal(frozen, got)


@pytest.mark.parametrize("attention,layout", [("full", "pad"), ("prefix_lm", "pad"), ("full", "anyres")])
def test_answer_logits_match_mllm_logits(tok, attention, layout):
    hb, _ = _host_batch(tok, layout)
    cfg, params = tiny_config(layout, attention=attention), tiny_params(attention, layout=layout)
    g = tm.toy_geometry(cfg)
    ids = tm.prompt_ids(cfg, tok)
    ans = hb.answers.copy()
    ans[:, ::3] = cfg.lm.mask_id
    blocks = tm.image_blocks(params, cfg, jnp.asarray(hb.pixel_values), g)
    got = tm.answer_logits(params, cfg, tm.prefix_embeddings(params, cfg, ids, blocks), jnp.asarray(ans),
                           attention=attention)
    for i in range(3):
        ref, _ = mllm.mllm_logits(params, cfg, ids, hb.pixel_values[i], g, answer_ids=ans[i], attention=attention)
        np.testing.assert_allclose(got[i], ref[-ans.shape[1]:], rtol=1e-4, atol=1e-4)


def test_resize_pos_embed_matches_opencv():
    import cv2

    pe = np.random.default_rng(0).standard_normal((16, 12)).astype(np.float32)
    got = np.asarray(tm.resize_pos_embed(jnp.asarray(pe), 8))
    ref = cv2.resize(pe.reshape(4, 4, 12), (8, 8), interpolation=cv2.INTER_LINEAR).reshape(64, 12)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(tm.resize_pos_embed(jnp.asarray(pe), 4), pe)
    with pytest.raises(ValueError, match="square"):
        tm.resize_pos_embed(jnp.zeros((15, 4)), 8)


def test_corrupt_masks_at_ratio_t():
    ans = jnp.zeros((64, 400), jnp.int32)
    noisy, masked, t = tm.corrupt(jax.random.key(0), ans, 9)
    np.testing.assert_array_equal(noisy == 9, masked)
    # stratified: one t per 1/B slice of [eps, 1]
    np.testing.assert_array_equal(np.sort(np.floor((np.asarray(t) - 1e-3) / (1 - 1e-3) * 64)), np.arange(64))
    frac = np.asarray(masked).mean(1)
    assert np.abs(frac - np.asarray(t)).max() < 0.1
    again = tm.corrupt(jax.random.key(0), ans, 9)
    np.testing.assert_array_equal(again[1], masked)


@pytest.mark.slow
def test_diffusion_loss_matches_numpy(host_batch, tok):
    hb, _ = host_batch
    cfg, params = tiny_config(), tiny_params()
    g = tm.toy_geometry(cfg)
    ids = tm.prompt_ids(cfg, tok)
    key = jax.random.key(3)
    out = tm.diffusion_loss(params, cfg, g, ids, jnp.asarray(hb.pixel_values), jnp.asarray(hb.answers),
                            jnp.asarray(hb.token_class), key)
    noisy, masked, t = (np.asarray(x) for x in tm.corrupt(key, jnp.asarray(hb.answers), cfg.lm.mask_id))
    total, correct, count = 0.0, np.zeros(len(tm.TOKEN_CLASSES)), np.zeros(len(tm.TOKEN_CLASSES))
    for i in range(3):
        logits, _ = mllm.mllm_logits(params, cfg, ids, hb.pixel_values[i], g, answer_ids=noisy[i])
        logits = np.asarray(logits[-noisy.shape[1]:], np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        for j in range(noisy.shape[1]):
            if masked[i, j]:
                total += -logp[j, hb.answers[i, j]] / t[i]
                count[hb.token_class[i, j]] += 1
                correct[hb.token_class[i, j]] += logits[j].argmax() == hb.answers[i, j]
    np.testing.assert_allclose(out.loss, total / hb.answers.size, rtol=1e-4)
    np.testing.assert_array_equal(out.count, count)
    np.testing.assert_array_equal(out.correct, correct)
    assert out.aux_loss is None


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_grid_losses(grid, heads, weights, obj_shape, obj_colour, obj_centre):
    """grid_losses' documented definition in float64 NumPy, one object / token at a time (no relation heads,
    token_weight 1, min_cover 0.3, background weight 0.2) -> (loss, shape_acc, colour_acc, centre_err, token_acc)."""
    rms = lambda v: v / np.sqrt((v * v).mean(-1, keepdims=True) + 1e-6)
    hd = {k: (np.asarray(v["kernel"], np.float64), np.asarray(v["bias"], np.float64)) for k, v in heads.items()}
    B, M = obj_shape.shape
    n_valid = max(int((obj_shape >= 0).sum()), 1)
    loss, acc, err = 0.0, {"shape": 0.0, "colour": 0.0}, 0.0
    for b in range(B):
        for m in range(M):
            if obj_shape[b, m] < 0:
                continue
            w = weights[b, m]
            # pooled over the object's coverage weights, RMS-normalised, then the linear heads
            v = rms((grid[b] * w[..., None]).sum((0, 1)) / max(w.sum(), 1e-6))
            for name, target in (("shape", obj_shape[b, m]), ("colour", obj_colour[b, m])):
                logits = v @ hd[name][0] + hd[name][1]
                loss -= _np_log_softmax(logits)[target] / n_valid
                acc[name] += (np.argmax(logits) == target) / n_valid
            if obj_centre is not None:
                e = np.abs(v @ hd["centre"][0] + hd["centre"][1] - obj_centre[b, m]).sum()
                loss += e / n_valid
                err += e / n_valid / 2
    tok_acc = None
    for name, target, n_cls in (("token_shape", obj_shape, len(shapes.SHAPES)),
                                ("token_colour", obj_colour, len(shapes.COLOUR_NAMES))):
        num = den = hits = n_obj = 0.0
        for b in range(B):
            for y, x in np.ndindex(*grid.shape[1:3]):
                cover = weights[b, :, y, x]
                on = cover.max() >= 0.3
                lab = target[b, int(np.argmax(cover))] if on else n_cls
                logits = rms(grid[b, y, x]) @ hd[name][0] + hd[name][1]
                tw = 1.0 if on else 0.2
                num -= tw * _np_log_softmax(logits)[lab]
                den += tw
                hits += on and np.argmax(logits) == lab
                n_obj += on
        loss += num / den
        if name == "token_shape":
            tok_acc = hits / max(n_obj, 1.0)
    return loss, acc["shape"], acc["colour"], err, tok_acc


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_object_losses_pool_over_masks(tok, layout):
    hb, _ = _host_batch(tok, layout)
    cfg, params = tiny_config(layout), tiny_params(layout=layout)
    g = tm.toy_geometry(cfg)
    heads = th.init_object_heads(jax.random.key(1), cfg.lm.d_model, scale=1.0)
    out = th.object_losses(params, heads, cfg, g, jnp.asarray(hb.pixel_values), hb.obj_weights_base,
                           hb.obj_weights_hi, hb.obj_shape, hb.obj_colour, hb.obj_centre)
    blocks = np.asarray(tm.image_blocks(params, cfg, jnp.asarray(hb.pixel_values), g), np.float64)
    B, _, D = blocks.shape
    u, (H, W) = g.view_side, g.highres_shape
    base = blocks[:, :u * u].reshape(B, u, u, D)
    # NumPy: the base view's losses (with the centre) and, for any-resolution layouts, the high-res grid's
    # (newline tokens dropped, no centre), averaged
    want = [_np_grid_losses(base, heads, hb.obj_weights_base, hb.obj_shape, hb.obj_colour, hb.obj_centre)]
    if H:
        hi = blocks[:, u * u:].reshape(B, H, W + 1, D)[:, :, :W]
        want.append(_np_grid_losses(hi, heads, hb.obj_weights_hi, hb.obj_shape, hb.obj_colour, None))
    assert (hb.obj_shape >= 0).sum() >= 3 and want[0][0] > 1.0  # real objects, a non-trivial loss
    np.testing.assert_allclose(float(out.loss), np.mean([w[0] for w in want]), rtol=1e-4)
    for k, field in enumerate(("shape_acc", "colour_acc", "centre_err", "token_shape_acc"), start=1):
        ref = [w[k] for w in want]
        if field == "centre_err" and H:
            ref[1] = 0.0  # the high-res grid has no centre loss
        np.testing.assert_allclose(np.asarray(getattr(out, field)), ref if H else ref[0], rtol=1e-4, atol=1e-6,
                                   err_msg=field)
    # the pooling alone: the mask-weighted mean of the tokens
    w = hb.obj_weights_base[0, 0]
    pooled = th.pool_objects(jnp.asarray(base[:1], jnp.float32), jnp.asarray(w[None, None]))[0, 0]
    np.testing.assert_allclose(pooled, (base[0] * w[..., None]).sum((0, 1)) / w.sum(), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_token_rms_penalty_closed_form_and_in_the_losses(host_batch, tok):
    # tokens with RMS 1, 2 and 0.5 (ln 2 = 0.693): penalty = mean(log(rms)^2) = (0 + 2 * ln(2)^2) / 3
    d = 16
    toks = np.stack([np.ones(d), 2 * np.ones(d), 0.5 * np.ones(d)]).astype(np.float32)
    toks[1, ::2] *= -1  # signs do not matter
    np.testing.assert_allclose(tm.token_rms_penalty(jnp.asarray(toks)), 2 * np.log(2.0) ** 2 / 3, rtol=1e-5)
    assert float(tm.token_rms_penalty(jnp.ones((2, 5, d)))) < 1e-10
    # it enters both training losses as weight x penalty of the image tokens
    hb, _ = host_batch
    cfg, params = tiny_config(), tiny_params()
    g = tm.toy_geometry(cfg)
    pix = jnp.asarray(hb.pixel_values)
    pen = float(tm.token_rms_penalty(tm.image_blocks(params, cfg, pix, g)))
    assert pen > 0.1
    args = (params, cfg, g, tm.prompt_ids(cfg, tok), pix, jnp.asarray(hb.answers), jnp.asarray(hb.token_class),
            jax.random.key(3))
    base, withp = (float(tm.diffusion_loss(*args, rms_weight=w).loss) for w in (0.0, 0.5))
    np.testing.assert_allclose(withp - base, 0.5 * pen, rtol=1e-4)
    heads = th.init_object_heads(jax.random.key(1), cfg.lm.d_model)
    obj = (params, heads, cfg, g, pix, hb.obj_weights_base, hb.obj_weights_hi, hb.obj_shape, hb.obj_colour,
           hb.obj_centre)
    base, withp = (float(th.object_losses(*obj, rms_weight=w).loss) for w in (0.0, 0.5))
    np.testing.assert_allclose(withp - base, 0.5 * pen, rtol=1e-4)


@pytest.mark.slow
def test_token_rms_weight_pulls_the_image_tokens_to_rms_one(tok):
    cfg = tiny_config()
    init = tm.init_toy_params(jax.random.key(0), cfg)
    g = tm.toy_geometry(cfg)
    b = shapes.batch("validation", range(8), shapes.preset("easy"))
    pix = jnp.asarray(tm.make_host_batch(b, cfg, tok, pimg.ImageProcessor(cfg), 8).pixel_values)
    pens = {}
    for w in (0.0, 1.0):
        tcfg = ttrain.TrainConfig(view_steps=0, tower_steps=20, tower_batch=4, tower_lr=5e-3, tower_presets=("easy",),
                                  lm_steps=0, finetune_steps=0, warmup_steps=2, token_rms_weight=w)
        params, _ = ttrain.train(tcfg, cfg, tok, progress=False, params=init)
        pens[w] = float(tm.token_rms_penalty(tm.image_blocks(params, cfg, pix, g)))
    # measured: 6.9 without the penalty, 0.51 with it (the tokens of the init are far below RMS 1)
    assert pens[1.0] < 0.25 * pens[0.0], pens


# ----------------------------------------------------------------------------------------------------------
# training


def test_curriculum_parsing():
    c = ttrain.parse_curriculum("easy:50:4, simple:100,default")
    assert c == (("easy", 50, 4), ("simple", 100, 0), ("default", 0, 0))
    assert [ttrain.preset_at(c, s) for s in (0, 49, 50, 149, 150, 10_000)] == \
        ["easy", "easy", "simple", "simple", "default", "default"]
    assert ttrain.stage_at(c, 10) == ("easy", 50, 4)
    with pytest.raises(ValueError, match="step count"):
        ttrain.parse_curriculum("easy,default")
    with pytest.raises(ValueError, match="preset:steps"):
        ttrain.parse_curriculum("easy:x,default")
    with pytest.raises(ValueError, match="unknown ShapesWorld preset"):
        ttrain.TrainConfig(curriculum=(("nope", 0, 0),))
    with pytest.raises(ValueError, match="answer_length"):
        ttrain.TrainConfig(curriculum=(("easy", 0, 99),))


@pytest.mark.parametrize("view_size", [36, 128])
def test_view_size_is_checked_before_any_work(tok, view_size, monkeypatch):
    cfg = tiny_config()  # 64 px views, 8 px patches: 36 is not a multiple of the patch, 128 is larger than a view
    monkeypatch.setattr(tm, "init_toy_params", lambda *a, **k: pytest.fail("initialised before validating"))
    with pytest.raises(ValueError, match=f"view_size={view_size} must be a multiple of the patch size 8 and at "
                                         "most the model's view size 64"):
        ttrain.train(ttrain.TrainConfig(view_size=view_size), cfg, tok, progress=False)


@pytest.mark.slow
def test_training_smoke_loss_decreases(tok):
    cfg = tiny_config()
    tcfg = ttrain.TrainConfig(view_steps=3, view_batch=4, tower_steps=3, tower_batch=4, tower_presets=("easy",),
                              lm_steps=25, batch_size=8, lr=3e-3, warmup_steps=2, freeze_tower_steps=5,
                              curriculum=(("easy", 5, 4), ("easy", 0, 0)), gen_length=8, finetune_steps=3,
                              finetune_preset="easy")
    init = tm.init_toy_params(jax.random.key(0), cfg)
    params, hist = ttrain.train(tcfg, cfg, tok, progress=False, log_every=5, params=init)
    assert [r["phase"] for r in hist] == ["tower_views", "tower_images"] + ["lm"] * 5 + ["finetune"]
    # phase 1a ran on 32 px views (view_size's default) and the position table came back at the model's grid
    assert tcfg.view_size < cfg.vision.image_size
    assert params["vision"]["pos_embed"].shape == init["vision"]["pos_embed"].shape
    assert all(np.isfinite(r["loss"]) for r in hist)
    # the same fixed batch and masks before and after training
    g = tm.toy_geometry(cfg)
    ids = tm.prompt_ids(cfg, tok)
    b = shapes.batch("validation", range(16), shapes.preset("easy"))
    hb = tm.make_host_batch(b, cfg, tok, pimg.ImageProcessor(cfg), 8)

    loss_fn = jax.jit(lambda p, k: tm.diffusion_loss(p, cfg, g, ids, hb.pixel_values, hb.answers, hb.token_class,
                                                     k, pad_weight=tcfg.pad_weight).loss)

    def loss(p):
        return np.mean([float(loss_fn(p, jax.random.key(k))) for k in range(4)])

    # evaluated with the training objective's padding weight: at weight 1 the 8-token answers are mostly
    # padding, which training weights by 0.05, and the decrease would mostly measure the padding tokens
    before, after = loss(init), loss(params)
    # measured: 2.04 -> 1.52 (-25%) after these 25 steps; mask-sampling noise over 4 keys x 16 examples is a few
    # percent, so a 15% drop is a clear signal that the optimiser, schedule and loss are wired together
    assert after < 0.85 * before, (before, after)
    # the tower was frozen for the first 5 LM steps but trained afterwards and in phase 1
    assert not np.allclose(params["vision"]["pos_embed"], init["vision"]["pos_embed"])


def test_init_parts_tower_keeps_tower_and_projector_and_reinitialises_the_rest(tok):
    cfg = tiny_config()
    other = tm.init_toy_params(jax.random.key(11), cfg)
    tcfg = ttrain.TrainConfig(view_steps=0, tower_steps=0, lm_steps=0, finetune_steps=0)
    fresh, _ = ttrain.train(tcfg, cfg, tok, progress=False)
    mixed, _ = ttrain.train(tcfg, cfg, tok, progress=False, params=other, init_parts="tower")
    for part in ("vision", "projector"):
        jax.tree.map(np.testing.assert_array_equal, mixed[part], other[part])
    for part in set(fresh) - {"vision", "projector"}:
        jax.tree.map(np.testing.assert_array_equal, mixed[part], fresh[part])
    assert not np.allclose(fresh["lm"]["embed"], other["lm"]["embed"])
    with pytest.raises(ValueError, match="init_parts"):
        ttrain.train(tcfg, cfg, tok, progress=False, params=other, init_parts="lm")


@pytest.mark.slow
def test_finetune_phase_trains_the_tower_and_equals_a_second_run_from_the_checkpoint(tok):
    cfg = tiny_config()
    init = tm.init_toy_params(jax.random.key(3), cfg)
    common = dict(view_steps=0, tower_steps=0, batch_size=4, warmup_steps=1, gen_length=8,
                  curriculum=(("easy", 0, 0),))
    # phases 2 (tower and projector frozen throughout) + 3 in one run ...
    one = ttrain.TrainConfig(**common, lm_steps=4, freeze_tower_steps=4, finetune_steps=3, finetune_lr=1e-3,
                             finetune_tower_lr_mult=0.5, finetune_preset="easy")
    both, hist = ttrain.train(one, cfg, tok, progress=False, log_every=1, params=init)
    assert [r["phase"] for r in hist] == ["lm"] * 4 + ["finetune"] * 3
    # ... equal phase 2 alone followed by a captioning run from its parameters with phase 3's settings
    first, _ = ttrain.train(dataclasses.replace(one, finetune_steps=0), cfg, tok, progress=False, params=init)
    for part in ("vision", "projector"):
        jax.tree.map(np.testing.assert_array_equal, first[part], init[part])
    second = ttrain.TrainConfig(**common, lm_steps=3, freeze_tower_steps=0, lr=1e-3, tower_lr_mult=0.5,
                                finetune_steps=0)
    chained, _ = ttrain.train(second, cfg, tok, progress=False, params=first)
    jax.tree.map(np.testing.assert_array_equal, both, chained)
    # phase 3 moved the tower and the projector
    assert not np.allclose(both["vision"]["pos_embed"], first["vision"]["pos_embed"])
    assert not np.allclose(both["projector"]["fc1"]["kernel"], first["projector"]["fc1"]["kernel"])
    with pytest.raises(ValueError, match="finetune_steps"):
        ttrain.TrainConfig(finetune_steps=-1)
    with pytest.raises(ValueError, match="unknown ShapesWorld preset 'nope'"):
        ttrain.TrainConfig(finetune_preset="nope")


TINY_OVERRIDES = ["--config_override=lm.d_model=32", "--config_override=lm.n_layers=1",
                  "--config_override=lm.n_heads=2", "--config_override=lm.n_kv_heads=2",
                  "--config_override=lm.head_dim=16", "--config_override=lm.mlp_hidden=48",
                  "--config_override=vision.width=32", "--config_override=vision.depth=1",
                  "--config_override=vision.num_heads=2", "--config_override=vision.mlp_dim=48"]


def _train_cli(*args):
    import subprocess
    import sys

    # captioning only (the tower phases run in-process in test_training_smoke_loss_decreases): this checks the
    # command line's wiring, checkpoint writing and --init_checkpoint
    cmd = [sys.executable, "-m", "dcam_jax.toy.train", "--noprogress", "--log_every=1", "--view_steps=0",
           "--tower_steps=0", "--batch_size=4", "--warmup_steps=1", "--freeze_tower_steps=1", "--curriculum=easy",
           "--finetune_preset=easy", "--gen_length=8", *TINY_OVERRIDES, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    """A tiny checkpoint written by the training command line (2 captioning steps, 1 fine-tuning step)."""
    tmp = tmp_path_factory.mktemp("train_cli")
    out, log = tmp / "ckpt", tmp / "curves.jsonl"
    r = _train_cli(f"--out_dir={out}", f"--log_jsonl={log}", "--lm_steps=2", "--finetune_steps=1")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, log, r.stdout


@pytest.mark.slow
def test_train_cli_end_to_end(cli_checkpoint):
    from dcam_jax import checkpoint as ckpt

    out, log, stdout = cli_checkpoint
    assert "wrote" in stdout
    config, params, tok_dir = ckpt.load_checkpoint(out)
    assert config.name == "toy" and config.lm.n_layers == 1 and tok_dir is not None
    strict = dict(parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    recs = [json.loads(line, **strict) for line in log.read_text().splitlines()]
    assert [x["phase"] for x in recs] == ["lm"] * 2 + ["finetune"] and all(np.isfinite(x["loss"]) for x in recs)
    info = json.loads((out / "dcam_checkpoint.json").read_text(), **strict)["info"]
    assert info["train_config"]["lm_steps"] == 2 and info["init_checkpoint"] is None
    assert set(info["phase_end_time_s"]) == {"lm", "finetune"}
    # a non-empty --out_dir is refused without --force and left as it was
    before = sorted(p.name for p in out.iterdir())
    r = _train_cli(f"--out_dir={out}", "--lm_steps=1")
    assert r.returncode != 0 and "--force" in r.stderr and sorted(p.name for p in out.iterdir()) == before


@pytest.mark.slow
def test_train_cli_init_checkpoint(cli_checkpoint, tmp_path):
    from dcam_jax import checkpoint as ckpt

    out = cli_checkpoint[0]
    _, params, _ = ckpt.load_checkpoint(out)
    # --init_checkpoint starts from the checkpoint's parameters (with no steps they come back unchanged, where a
    # fresh initialisation would differ); training from them is the in-process path of the smoke test
    out2 = tmp_path / "ckpt2"
    r = _train_cli(f"--out_dir={out2}", f"--init_checkpoint={out}", "--lm_steps=0",
                   "--finetune_steps=0")
    assert r.returncode == 0, r.stderr[-3000:]
    _, params2, _ = ckpt.load_checkpoint(out2)
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    # --init_parts=tower takes the tower and projector only, so the LM may differ (here a second layer); the
    # tower of the new checkpoint is the old one, its LM a fresh one of the new shape
    out4 = tmp_path / "ckpt4"
    r = _train_cli(f"--out_dir={out4}", f"--init_checkpoint={out}", "--init_parts=tower", "--lm_steps=0",
                   "--finetune_steps=0", "--config_override=lm.n_layers=2")
    assert r.returncode == 0, r.stderr[-3000:]
    config4, params4, _ = ckpt.load_checkpoint(out4)
    assert config4.lm.n_layers == 2
    for part in ("vision", "projector"):
        jax.tree.map(np.testing.assert_array_equal, params4[part], params[part])
    assert not np.allclose(params4["lm"]["embed"], params["lm"]["embed"])


@pytest.mark.slow
def test_train_cli_refuses_other_architectures(cli_checkpoint, tmp_path):
    out = cli_checkpoint[0]
    # a different tower is refused with --init_parts=tower ...
    r = _train_cli(f"--out_dir={tmp_path / 'ckpt5'}", f"--init_checkpoint={out}", "--init_parts=tower",
                   "--lm_steps=1", "--config_override=vision.depth=2")
    assert r.returncode != 0 and "different vision tower" in r.stderr and not (tmp_path / "ckpt5").exists()
    # ... and a checkpoint of another architecture before any training
    r = _train_cli(f"--out_dir={tmp_path / 'ckpt3'}", f"--init_checkpoint={out}", "--lm_steps=1",
                   "--config_override=lm.n_layers=2")
    assert r.returncode != 0 and "different model config" in r.stderr and not (tmp_path / "ckpt3").exists()


# ----------------------------------------------------------------------------------------------------------
# decoding and scoring


def test_num_transfer_tokens():
    np.testing.assert_array_equal(tev.num_transfer_tokens(10, 4), [3, 3, 2, 2])
    assert tev.num_transfer_tokens(32, 32).tolist() == [1] * 32
    with pytest.raises(ValueError):
        tev.num_transfer_tokens(8, 9)


def _tiny_prefix(host_batch, tok):
    """(hb, cfg, params, geometry, prompt ids, prompt embeddings [B, P, D]) of the tiny model on host_batch."""
    hb, _ = host_batch
    cfg, params = tiny_config(), tiny_params()
    g = tm.toy_geometry(cfg)
    ids = tm.prompt_ids(cfg, tok)
    prefix = tm.prefix_embeddings(params, cfg, ids, tm.image_blocks(params, cfg, jnp.asarray(hb.pixel_values), g))
    return hb, cfg, params, g, ids, prefix


@pytest.mark.slow
def test_greedy_decode_matches_numpy_loop(host_batch, tok):
    hb, cfg, params, g, ids, prefix = _tiny_prefix(host_batch, tok)
    G, steps = 6, 3
    got = np.asarray(tev.greedy_decode(params, cfg, prefix, G, steps))
    for i in range(3):
        x = np.full(G, cfg.lm.mask_id)
        for k in range(steps):
            logits, _ = mllm.mllm_logits(params, cfg, ids, hb.pixel_values[i], g, answer_ids=x)
            logits = np.asarray(logits[-G:], np.float64)
            logits[:, cfg.lm.mask_id] = -np.inf
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            pred = p.argmax(-1)
            conf = np.where(x == cfg.lm.mask_id, p.max(-1), -np.inf)
            for j in np.argsort(-conf, kind="stable")[:2]:
                x[j] = pred[j]
        np.testing.assert_array_equal(got[i], x)
    assert not (got == cfg.lm.mask_id).any()
    # the project's sampler at the default settings gives the same tokens
    np.testing.assert_array_equal(tev.decode(params, cfg, prefix, G, steps, decoder="sampler"), got)


@pytest.mark.slow
def test_block_decoding_matches_numpy_loop(host_batch, tok):
    """--block_length: semi-autoregressive blocks, each filled before the next with its share of the steps."""
    hb, cfg, params, g, ids, prefix = _tiny_prefix(host_batch, tok)
    G, steps, B = 6, 4, 3
    got = tev.decode(params, cfg, prefix, G, steps, decoder="sampler", block_length=B)
    per_block = tev.num_transfer_tokens(B, steps // (G // B))  # LLaDA's schedule inside one block: [2, 1]
    for i in range(2):
        x = np.full(G, cfg.lm.mask_id)
        for b0 in range(0, G, B):
            for n in per_block:
                logits, _ = mllm.mllm_logits(params, cfg, ids, hb.pixel_values[i], g, answer_ids=x)
                logits = np.asarray(logits[-G:], np.float64)
                logits[:, cfg.lm.mask_id] = -np.inf
                p = np.exp(logits - logits.max(-1, keepdims=True))
                p /= p.sum(-1, keepdims=True)
                in_block = (np.arange(G) >= b0) & (np.arange(G) < b0 + B)
                conf = np.where((x == cfg.lm.mask_id) & in_block, p.max(-1), -np.inf)
                for j in np.argsort(-conf, kind="stable")[:n]:
                    x[j] = p[j].argmax()
        np.testing.assert_array_equal(got[i], x)
    with pytest.raises(ValueError, match="one block only"):
        tev.decode(params, cfg, prefix, G, steps, decoder="interim", block_length=B)


def test_score_caption():
    s = tev.score_caption("a red circle above a blue square", ["red", "blue"], ["circle", "square"],
                          "a red circle above a blue square")
    assert s.objects_right and s.in_order and s.exact and s.colour_right == (True, True)
    s = tev.score_caption("a blue square left of a red circle", ["red", "blue"], ["circle", "square"],
                          "a red circle above a blue square")
    assert s.objects_right and not s.in_order and not s.exact
    s = tev.score_caption("a red square above a blue circle", ["red", "blue"], ["circle", "square"], "")
    # colours and shapes all present but bound wrongly
    assert not s.objects_right and sum(s.colour_right) + sum(s.shape_right) == 2
    s = tev.score_caption("a red circle", ["red", "blue"], ["circle", "square"], "")
    assert not s.objects_right and s.colour_right == (True, False) and s.shape_right == (True, False)
    s = tev.score_caption("a red circle and a red circle", ["red"], ["circle"], "")
    assert not s.objects_right and s.colour_right == (True,) and s.num_generated == 2
    # Ending and grammar: a right caption that ran to gen_length without an end token is not well formed, nor is
    # one with a stray article, even when every object is named right.
    s = tev.score_caption("a red circle", ["red"], ["circle"], "a red circle", ended=False)
    assert s.objects_right and not s.ended and not s.well_formed
    s = tev.score_caption("a red circle a", ["red"], ["circle"], "a red circle")
    assert s.objects_right and s.ended and not s.well_formed
    assert tev.score_caption("a red circle", ["red"], ["circle"], "a red circle").well_formed


def test_parse_pil_sets():
    assert tev.parse_pil_sets("dark:128x128, light:160x96,white") == [
        ("dark", 128, 128), ("light", 160, 96), ("white", 128, 128)]
    with pytest.raises(ValueError, match="background must be one of"):
        tev.parse_pil_sets("grey:64x64")
    with pytest.raises(ValueError, match="no PIL sets"):
        tev.parse_pil_sets(" , ")


def test_evaluate_runs_on_a_tiny_model(tok):
    cfg, params = tiny_config(), tiny_params()
    rep = tev.evaluate(params, cfg, tok, num_examples=3, split="validation", batch_size=2, gen_length=8, steps=4,
                       decoder="interim", progress=False)
    summ = rep.summary()
    assert summ["examples"] == 3 and len(rep.generated) == 3
    assert summ["objects"] == sum(shapes.make_example(shapes.split_seed("validation", i)).num_objects
                                  for i in range(3))
    assert 0.0 <= summ["well_formed"] <= summ["ended"] <= 1.0 and "per_set" not in summ


def test_evaluate_reports_each_pil_set(tok):
    from dcam_jax.data import pil_shapes

    cfg, params = tiny_config(), tiny_params()
    sets = [("white", 96, 64), ("dark", 64, 64)]
    rep = tev.evaluate(params, cfg, tok, num_examples=2, split="test", batch_size=2, gen_length=8, steps=4,
                       decoder="interim", progress=False, pil_sets=sets)
    summ = rep.summary()
    assert list(summ["per_set"]) == ["white:96x64", "dark:64x64"] and summ["examples"] == 4
    truth = [pil_shapes.make_example(shapes.split_seed("test", i),
                                     pil_shapes.PilShapesConfig(width=w, height=h, background=b)).caption
             for b, w, h in sets for i in range(2)]
    assert rep.captions == truth


# ----------------------------------------------------------------------------------------------------------
# the shipped checkpoint


def test_shipped_checkpoint_loads_and_captions():
    from dcam_jax import checkpoint as ckpt

    config, params, tok_dir = ckpt.load_checkpoint(ASSET)
    assert config.name == "toy" and config.default_prompt == tm.TOY_PROMPT
    tokenizer = ptext.load_tokenizer(tok_dir)
    assert len(tokenizer) == config.lm.vocab_size
    rep = tev.evaluate(params, config, tokenizer, num_examples=4, split="test", batch_size=4, progress=False)
    ex = [shapes.make_example(shapes.split_seed("test", i), shapes.preset("default")) for i in range(4)]
    for e, text in zip(ex, rep.generated):
        objs = shapes.parse_caption(text)
        assert objs and all(c is not None and s is not None for _, c, s in objs), text
        assert set(text.split()) <= set(shapes.VOCABULARY)
    # a fixed, deterministic check of the shipped weights: the current model (90.0% of test captions exactly right,
    # see docs/toy_model.md) gets test examples 0-3 (three, two, one and one objects; vivid, white and dark
    # backgrounds) exactly right
    assert rep.generated == [e.caption for e in ex]


def test_shipped_checkpoint_was_trained_with_the_defaults():
    # `python -m dcam_jax.toy.train` with no flags must be the recipe of the shipped weights (the model card says
    # so), so a change of a TrainConfig default, or of ShapesWorld's generator, without retraining fails here
    info = json.loads((ASSET / "dcam_checkpoint.json").read_text())["info"]
    assert info["trained_by"] == "python -m dcam_jax.toy.train" and info["init_checkpoint"] is None
    assert info["train_config"] == json.loads(json.dumps(dataclasses.asdict(ttrain.TrainConfig())))
    assert info["shapes_generator"] == shapes.GENERATOR_VERSION


def test_shared_prefix_logits_match_prefix_lm(host_batch, tok):
    hb, _ = host_batch
    cfg, params = tiny_config(attention="prefix_lm"), tiny_params("prefix_lm")
    g = tm.toy_geometry(cfg)
    ids = tm.prompt_ids(cfg, tok)
    prefix = tm.prefix_embeddings(params, cfg, ids, tm.image_blocks(params, cfg, jnp.asarray(hb.pixel_values), g))
    rng = np.random.default_rng(0)
    ans = np.where(rng.random((3, 2) + hb.answers.shape[1:]) < 0.5, cfg.lm.mask_id, hb.answers[:, None])
    got = tm.answer_logits_shared_prefix(params, cfg, prefix, jnp.asarray(ans))
    for k in range(2):
        ref = tm.answer_logits(params, cfg, prefix, jnp.asarray(ans[:, k]), attention="prefix_lm")
        np.testing.assert_allclose(got[:, k], ref, rtol=1e-4, atol=1e-4)
