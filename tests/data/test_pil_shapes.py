"""Tests for the PIL-drawn shapes (dcam_jax.data.pil_shapes) and their eval.run source (--dataset=pil_shapes).

References are independent of the generator where it matters: masks are checked against the pixels painted with
each object's colour, shapes against their closed-form areas and orientations, captions against a plain rebuild
of ShapesWorld's grammar from the objects' attributes and against shapes.parse_caption.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from absl import flags

from dcam_jax.data import pil_shapes as P
from dcam_jax.data import shapes as S
from eval import config as eval_config
from eval import sources
from eval import store
from eval import run as R

CONFIGS = {
    "dark128": P.PilShapesConfig(),
    "light128": P.PilShapesConfig(background="light"),
    "white160x128": P.PilShapesConfig(background="white", width=160, height=128),
    "dark96x200_rot": P.PilShapesConfig(width=96, height=200, max_rotation_deg=20.0),
}


def _examples(config, count=40, split="test", start=0):
    return [P.make_example(S.split_seed(split, start + i), config) for i in range(count)]


def _reference_caption(e):
    """ShapesWorld's default grammar rebuilt from attributes (left-to-right order, pairs, relations)."""
    phrases = [f"a {c} {s}" for c, s in zip(e.colours, e.shapes)]
    groups = []
    for i in range(0, len(phrases), 2):
        if i + 1 < len(phrases):
            dy, dx = e.centres_yx[i + 1] - e.centres_yx[i]
            rel = ("above" if dy > 0 else "below") if abs(dy) > abs(dx) else ("left of" if dx > 0 else "right of")
            groups.append(f"{phrases[i]} {rel} {phrases[i + 1]}")
        else:
            groups.append(phrases[i])
    return " and ".join(groups)


# ----------------------------------------------------------------------------------------------------------
# the renderer


def test_deterministic_from_seed_and_splits_disjoint():
    for config in CONFIGS.values():
        a, b = P.make_example(S.split_seed("test", 5), config), P.make_example(S.split_seed("test", 5), config)
        assert a.caption == b.caption and a.seed == b.seed
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.masks, b.masks)
        np.testing.assert_array_equal(a.label_map, b.label_map)
    # different seeds (and the same index of another split) give different images
    imgs = [P.make_example(S.split_seed(sp, i)).image for sp in ("test", "validation") for i in range(4)]
    assert len({im.tobytes() for im in imgs}) == len(imgs)
    # iterate() follows split_seed
    it = list(P.iterate("validation", start=3, count=2))
    assert [e.seed for e in it] == [S.split_seed("validation", 3), S.split_seed("validation", 4)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_masks_exact_disjoint_and_placed_apart(name):
    config = CONFIGS[name]
    counts = set()
    for e in _examples(config):
        n = e.num_objects
        counts.add(n)
        assert isinstance(e, S.Example)
        assert e.image.shape == (config.height, config.width, 3) and e.image.dtype == np.uint8
        assert e.masks.shape == (n, config.height, config.width) and e.masks.dtype == bool
        assert 1 <= n <= config.max_objects
        assert len(set(e.colours)) == n and len(set(e.shapes)) == n
        # exact: an object's mask is the set of pixels painted with its colour (hard edges, no anti-aliasing)
        for k in range(n):
            painted = (e.image == np.array(P.fill_rgb(e.colours[k]), np.uint8)).all(-1)
            np.testing.assert_array_equal(e.masks[k], painted, err_msg=f"{name} seed {e.seed} object {k}")
            assert e.masks[k].any()
        assert (e.masks.sum(0) <= 1).all()  # disjoint
        np.testing.assert_array_equal(e.label_map, (e.masks * np.arange(1, n + 1)[:, None, None]).sum(0))
        # everything else is the solid background colour
        bg = np.array(P.background_rgb(e), np.uint8)
        assert (e.image[e.label_map == 0] == bg).all()
        # margin to the border and gaps between objects (a pixel of rasterisation slack)
        for k in range(n):
            y0, x0, y1, x1 = e.bboxes[k]
            assert min(y0, x0, config.height - y1, config.width - x1) >= config.margin - 1
            ys, xs = np.nonzero(e.masks[k])
            assert (y0, x0, y1, x1) == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
            np.testing.assert_allclose(e.centres_yx[k], (ys.mean() + 0.5, xs.mean() + 0.5), atol=1e-3)
        for i in range(n):
            pi = np.argwhere(e.masks[i])
            for j in range(i + 1, n):
                pj = np.argwhere(e.masks[j])
                d = np.sqrt(((pi[:, None, :] - pj[None, :, :]) ** 2).sum(-1)).min()
                assert d >= config.min_gap - 1
    assert counts == {1, 2, 3}


# closed-form area / r^2 and perimeter / r of each outline (see the module docstring); ImageDraw fills the pixels
# its outline touches, so a drawn area exceeds the closed form by up to about one pixel along the perimeter
_PERIMETER = {
    "circle": 2 * math.pi,
    "square": 4 * 1.2 * math.sqrt(2),
    "diamond": 4 * 1.1 * math.sqrt(2),
    "triangle": 3 * 1.15 * math.sqrt(3),
    "cross": 8 * (1.0 - 0.32) + 4 * 2 * 0.32,
    "star": 10 * math.sqrt(1.1 ** 2 + (0.46 * 1.1) ** 2 - 2 * 1.1 * 0.46 * 1.1 * math.cos(math.pi / 5)),
}
_AREA = {
    "circle": math.pi,
    "square": 2 * 1.2 ** 2,
    "diamond": 2 * 1.1 ** 2,
    "triangle": 3 * math.sqrt(3) / 4 * 1.15 ** 2,
    "cross": 8 * 0.32 - (2 * 0.32) ** 2,
    "star": 5 * 1.1 * (0.46 * 1.1) * math.sin(math.pi / 5),
}


@pytest.mark.parametrize("shape", S.SHAPES)
def test_each_word_draws_its_shape(shape):
    size = (96, 96)
    for r, cx, cy in ((12.0, 48.0, 48.0), (20.3, 47.2, 50.6)):
        m = P.shape_mask(shape, cx, cy, r, size)
        assert -0.5 * _PERIMETER[shape] * r <= m.sum() - _AREA[shape] * r ** 2 <= 1.0 * _PERIMETER[shape] * r + 4
        rows = m.sum(1)
        rows = rows[rows > 0]
        top, mid, bottom = rows[1], rows.max(), rows[-2]
        if shape in ("square", "circle", "cross", "diamond"):  # up-down symmetric
            assert abs(int(top) - int(bottom)) <= 2
        if shape == "square":
            assert top >= 0.9 * mid  # flat top
        if shape in ("diamond", "triangle", "star"):
            assert top <= 0.3 * mid  # a point at the top
        if shape == "triangle":
            assert bottom >= 0.8 * mid  # flat base
        if shape == "cross":
            assert top <= 0.45 * mid  # an arm at the top
    # a rotated shape is still drawn exactly by the same call
    m = P.shape_mask(shape, 40.0, 44.0, 15.0, (90, 80), rotation_deg=17.0)
    assert m.shape == (80, 90) and m.any()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_caption_grammar_and_alignment(name):
    config = CONFIGS[name]
    for e in _examples(config, count=30):
        assert e.caption == _reference_caption(e)
        assert S.parse_caption(e.caption) == [(None, c, s) for c, s in zip(e.colours, e.shapes)]
        assert all(w in S.VOCABULARY for w in e.words)
        assert e.word_class == tuple(S.WORD_CLASS[w] for w in e.words)
        for w, k in zip(e.words, e.word_object):
            if S.WORD_CLASS[w] in ("colour", "shape"):
                assert w in (e.colours[k], e.shapes[k])
                np.testing.assert_array_equal(S.attribute_mask(e, w), e.masks[k])
            else:
                assert k is None
        # left-to-right order; related pairs are clear of the diagonals
        assert list(e.centres_yx[:, 1]) == sorted(e.centres_yx[:, 1])
        for i, rel, j in e.relations:
            dy, dx = e.centres_yx[j] - e.centres_yx[i]
            assert abs(math.degrees(math.atan2(abs(dy), abs(dx))) - 45.0) >= config.relation_margin_deg
        # eval.run's caption check accepts the reference caption
        ev = sources.shapes_caption_eval(e, e.caption)
        assert ev["all_correct"] and ev["exact"] and ev["colour_correct"] == e.num_objects


def test_contrast_rule():
    for config in CONFIGS.values():
        for e in _examples(config, count=60):
            bg = P.background_rgb(e)
            for c in e.colours:
                assert P.contrast(c, bg) >= config.min_contrast
                assert c in P.allowed_colours(bg, config)
    assert P.allowed_colours((255, 255, 255)) == tuple(c for c in S.COLOUR_NAMES if c != "white")
    assert P.allowed_colours((40, 40, 40)) == S.COLOUR_NAMES
    # dark backgrounds keep every colour; light ones sometimes lose white; white never has a white object
    dark = [c for e in _examples(CONFIGS["dark128"], 80) for c in e.colours]
    assert set(dark) == set(S.COLOUR_NAMES)
    white = [c for e in _examples(CONFIGS["white160x128"], 80) for c in e.colours]
    assert "white" not in white
    # a stricter rule removes more colours and is honoured
    strict = P.PilShapesConfig(background="light", min_contrast=170.0)
    for e in _examples(strict, count=30):
        assert all(P.contrast(c, P.background_rgb(e)) >= 170.0 for c in e.colours)


def test_config_and_size_validation():
    assert P.parse_size("128") == (128, 128)
    assert P.parse_size("160,128") == (160, 128) == P.parse_size("160x128")
    for bad in ("", "a", "1,2,3", "8", "128,4000"):
        with pytest.raises(ValueError):
            P.parse_size(bad)
    with pytest.raises(ValueError, match="background"):
        P.PilShapesConfig(background="grey")
    with pytest.raises(ValueError, match="max_objects"):
        P.PilShapesConfig(max_objects=9)
    with pytest.raises(ValueError, match="radius_range"):
        P.PilShapesConfig(radius_range=(0.2, 0.3), margin=32)  # too large to fit with the margin
    with pytest.raises(ValueError, match="radius_range"):
        P.PilShapesConfig(radius_range=(0.3, 0.4))
    with pytest.raises(ValueError, match="seed"):
        P.make_example(-1)


# ----------------------------------------------------------------------------------------------------------
# eval.run --dataset=pil_shapes


def test_run_flags_validation_and_cache_keys(tmp_path):
    fv = flags.FlagValues()
    eval_config.define_flags(fv)
    fv(["prog", "--out_dir=x", "--dataset=pil_shapes", "--pil_background=light", "--pil_size=160,128"])
    cfg = eval_config.config_from_flags(fv)
    assert (cfg.dataset, cfg.pil_background, cfg.pil_size) == ("pil_shapes", "light", "160,128")
    assert eval_config.replace_config(cfg, {"pil_background": "white"}).pil_background == "white"
    ok = eval_config.RunConfig(out_dir=str(tmp_path / "o"), dataset="pil_shapes")
    eval_config.validate(ok)
    for change, msg in ((dict(pil_background="grey"), "--pil_background"), (dict(pil_size="12x"), "--pil_size"),
                        (dict(pil_size="16"), "--pil_size"), (dict(split="dev"), "--split")):
        with pytest.raises(ValueError, match=msg):
            eval_config.validate(dataclasses.replace(ok, **change))
    # the source: split seeds, size and background as asked
    src = sources.open_source(dataclasses.replace(ok, pil_size="160,128", pil_background="white"))
    assert isinstance(src, sources.PilShapesSource)
    item = src.item(3)
    ex = P.make_example(S.split_seed("test", 3), P.PilShapesConfig(background="white", width=160, height=128))
    np.testing.assert_array_equal(item.image, ex.image)
    assert item.image.shape == (128, 160, 3) and item.example_id == "pil_shapes-white-160x128-test-3"
    assert item.meta["reference"] == ex.caption
    # generation cache keys: the background and size count ("128" == "128,128"); other datasets' keys unchanged
    samp = dataclasses.make_dataclass("Samp", [("steps", int)])(32)  # a stand-in for the SamplingConfig
    key = lambda c: store.generation_key(c, "toy", samp)[0]
    assert key(ok) == key(dataclasses.replace(ok, pil_size="128,128"))
    assert key(ok) != key(dataclasses.replace(ok, pil_background="light"))
    assert key(ok) != key(dataclasses.replace(ok, pil_size="160,128"))
    shapes_cfg = dataclasses.replace(ok, dataset="shapes")
    assert key(shapes_cfg) == key(dataclasses.replace(shapes_cfg, pil_background="light", pil_size="64"))
    assert "pil_background" not in store.generation_key(shapes_cfg, "toy", samp)[1]


@pytest.fixture(scope="module")
def toy():
    from dcam_jax import api

    return api.load_pretrained("toy")


def _run(toy, out, **kw):
    base = dict(checkpoint="toy", out_dir=str(out), dataset="pil_shapes", split="test", num_examples=2,
                methods=("uniform",), progress=False, plots=False, save_maps=1)
    base.update(kw)
    res = R.run(eval_config.RunConfig(**base), model=toy)
    assert res["examples_done"] == 2
    summary = json.loads((out / "summary.json").read_text())["runs"][0]
    assert summary["dataset"] == "pil_shapes" and summary["examples"]["evaluated"] == 2
    assert summary["caption_accuracy"]["examples"] == 2
    for m in base["methods"]:
        assert summary["results"][m]["matched"]["n"] >= 1
    assert (out / "summary.md").exists()
    recs = [json.loads(x) for x in (out / "records-00000-of-00001.jsonl").read_text().splitlines()]
    return summary, [r for r in recs if r["type"] == "example"], [r for r in recs if r["type"] == "word"]


def test_run_end_to_end_on_the_toy_model(toy, tmp_path):
    """Generation, word alignment, caption accuracy, scoring and the summary on 2 dark 128 px images (the
    uniform pseudo-method only, so nothing but the generator compiles)."""
    out = tmp_path / "run"
    _, examples, words = _run(toy, out)
    assert [e["example_id"] for e in examples] == ["pil_shapes-dark-128x128-test-0", "pil_shapes-dark-128x128-test-1"]
    for e in examples:
        ref = P.make_example(S.split_seed("test", e["example"]))
        assert e["reference"] == ref.caption and e["caption_eval"]["objects"] == ref.num_objects
        assert e["background"] == "dark" and tuple(e["background_rgb"]) == P.background_rgb(ref)
    for w in words:  # matched words name the objects that have the attribute
        if w["status"] == "matched":
            ref = P.make_example(S.split_seed("test", w["example"]))
            attrs = {"colour": ref.colours, "shape": ref.shapes}[w["word_class"]]
            assert w["objects"] == [j for j, v in enumerate(attrs) if v == w["word"]]
    saved = np.load(out / "maps" / "pil_shapes-dark-128x128-test-0.npz")
    assert saved["image"].shape == (128, 128, 3) and saved["label_map"].shape == (128, 128)


@pytest.mark.slow
def test_run_default_method_on_non_square_light_images(toy, tmp_path):
    """The default explanation (diffusion_cam, compiled here: ~15 s on CPU) on 160 x 128 light images: the
    padded-square layout of the toy model and the map -> mask resize work for non-square PIL images."""
    summary, examples, words = _run(toy, tmp_path / "run", methods=("diffusion_cam", "uniform"),
                                    pil_background="light", pil_size="160,128")
    assert examples[0]["example_id"] == "pil_shapes-light-160x128-test-0"
    saved = np.load(tmp_path / "run" / "maps" / "pil_shapes-light-160x128-test-0.npz")
    assert saved["image"].shape == (128, 160, 3)
    assert all(np.isfinite(w["map_mean"]) for w in words)
