"""Tests for ShapesWorld (dcam_jax.data.shapes) and its TFDS builder (dcam_jax.data.shapes_tfds).

References are independent of the generator: scikit-image rasterises the shape outlines, the
captions are rebuilt from object attributes by a separate plain implementation, relations are
recomputed from centres, and occlusion is re-derived from per-object full masks.
"""

import colorsys
import dataclasses
import re

import numpy as np
import pytest
from skimage.draw import disk, polygon

from dcam_jax.data import shapes as S
from dcam_jax.data.shapes import render

PRESET_NAMES = tuple(S.PRESETS)


def _examples(name, count, split="validation", start=0, **overrides):
    config = S.preset(name, **overrides)
    return config, [S.make_example(S.split_seed(split, start + i), config) for i in range(count)]


def _skimage_mask(shape, centre_yx, radius, rotation, size):
    """Reference rasteriser: pixel (i, j) centre is (i + 0.5, j + 0.5) in our coordinates."""
    out = np.zeros((size, size), bool)
    if shape == "circle":
        rr, cc = disk((centre_yx[0] - 0.5, centre_yx[1] - 0.5), radius, shape=(size, size))
    else:
        verts = S.shape_polygon(shape, centre_yx, radius, rotation)
        rr, cc = polygon(verts[:, 0] - 0.5, verts[:, 1] - 0.5, shape=(size, size))
    out[rr, cc] = True
    return out


def _full_masks(e):
    """[N, H, W] full (un-occluded) masks re-rasterised from the example's attributes."""
    n = e.image.shape[0]
    return np.stack([
        S.shape_mask(e.shapes[k], e.centres_yx[k], float(e.radii[k]), n, float(e.rotations[k]))
        for k in range(e.num_objects)
    ]) if e.num_objects else np.zeros((0, n, n), bool)


def _reference_caption(e, config):
    """Caption rebuilt from attributes with the documented grammar (plain, loop-free of shapes)."""
    phrases = []
    for k in range(e.num_objects):
        words = ["a"] + ([e.sizes[k]] if config.size_words else []) + [e.colours[k], e.shapes[k]]
        phrases.append(" ".join(words))
    if not config.relations:
        return " and ".join(phrases)
    groups = []
    for i in range(0, len(phrases), 2):
        if i + 1 < len(phrases):
            dy = e.centres_yx[i + 1][0] - e.centres_yx[i][0]
            dx = e.centres_yx[i + 1][1] - e.centres_yx[i][1]
            if abs(dy) > abs(dx):
                rel = "above" if dy > 0 else "below"
            else:
                rel = "left of" if dx > 0 else "right of"
            groups.append(f"{phrases[i]} {rel} {phrases[i + 1]}")
        else:
            groups.append(phrases[i])
    return " and ".join(groups)


# ---------------------------------------------------------------------------------------------
# Shapes and geometry
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", S.SHAPES)
def test_shape_mask_matches_skimage_rasterisation(shape):
    rng = np.random.default_rng(7)
    size = 64
    for _ in range(60):
        radius = rng.uniform(3.0, 20.0)
        cy, cx = rng.uniform(1.3 * radius, size - 1.3 * radius, size=2)
        rotation = rng.uniform(-22.5, 22.5)
        ours = S.shape_mask(shape, (cy, cx), radius, size, rotation)
        ref = _skimage_mask(shape, (cy, cx), radius, rotation, size)
        assert np.array_equal(ours, ref), (shape, radius, cy, cx, rotation)
        # The outline stays within the documented reach.
        yy, xx = np.nonzero(ours)
        reach = np.hypot(yy + 0.5 - cy, xx + 0.5 - cx).max()
        assert reach <= S.SHAPE_EXTENT[shape] * radius + 1e-4


def test_inscribed_disc_lies_inside_each_shape():
    size = 96
    for shape in S.SHAPES:
        radius = 30.0
        mask = S.shape_mask(shape, (48.3, 47.6), radius, size)
        inner = S.shape_mask("circle", (48.3, 47.6), S.SHAPE_INSCRIBED[shape] * radius - 0.01, size)
        assert not np.any(inner & ~mask), shape


def test_shapes_are_pairwise_distinct_at_small_radius():
    # At radius 6 px every pair of shapes still differs in many pixels (recognisable at 64 px).
    masks = {s: S.shape_mask(s, (20.2, 20.7), 6.0, 40) for s in S.SHAPES}
    for a in S.SHAPES:
        for b in S.SHAPES:
            if a < b:
                assert np.count_nonzero(masks[a] ^ masks[b]) >= 12, (a, b)


def test_gradient_background_matches_a_per_pixel_formula_and_noise_stays_low():
    n = 48
    config = S.preset("default", image_size=n, backgrounds=("gradient",), tones=("dark",),
                      noise_amplitude=0.0)
    noisy = config.replace(noise_amplitude=10.0, noise_prob=1.0)
    for seed in range(4):
        backdrop = render._background(np.random.default_rng(seed), config)
        image, kind, level = backdrop.image, backdrop.kind, backdrop.level
        # Replay the documented draws: kind, tone, two HSV colours in the dark box, the angle.
        rng = np.random.default_rng(seed)
        rng.integers(1)
        rng.integers(1)
        hsv = rng.random((2, 3)) * np.array([1.0, 0.3, 0.34]) + np.array([0.0, 0.0, 0.08])
        c0, c1 = (255.0 * np.array(colorsys.hsv_to_rgb(*hsv[i])) for i in range(2))
        angle = rng.uniform(0.0, 2.0 * np.pi)
        ramp = np.zeros((n, n))
        for y in range(n):
            for x in range(n):
                u, v = (x + 0.5) / n - 0.5, (y + 0.5) / n - 0.5
                ramp[y, x] = np.cos(angle) * u + np.sin(angle) * v
        ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
        ref = np.floor(c0 + ramp[..., None] * (c1 - c0) + 0.5)
        assert kind == "gradient"
        assert np.abs(image.astype(np.float64) - ref).max() <= 1.0
        assert abs(level - image.mean() / 255.0) < 2e-3
        # Noise is low-contrast: within its amplitude of the clean ramp, but present.
        with_noise = render._background(np.random.default_rng(seed), noisy).image
        diff = with_noise.astype(np.int32) - image.astype(np.int32)
        assert np.abs(diff).max() <= 11 and np.abs(diff).mean() > 1.0


# ---------------------------------------------------------------------------------------------
# Determinism and splits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "hard"])
def test_same_seed_same_bytes_and_different_seeds_differ(name):
    config = S.preset(name)
    for seed in (0, 17, S.split_seed("test", 123)):
        a, b = S.make_example(seed, config), S.make_example(seed, config)
        assert a.image.tobytes() == b.image.tobytes()
        assert a.masks.tobytes() == b.masks.tobytes()
        assert a.label_map.tobytes() == b.label_map.tobytes()
        assert a.caption == b.caption and a.word_object == b.word_object
        assert a.centres_yx.tobytes() == b.centres_yx.tobytes()
    images = {S.make_example(seed, config).image.tobytes() for seed in range(40)}
    assert len(images) == 40


def test_clutter_changes_nothing_but_clutter_pixels():
    # Crisp rendering: blur, JPEG and soft edges would spread each clutter disc's pixels.
    with_clutter = S.preset("dark", clutter_range=(4, 6))
    without = S.preset("dark", clutter_range=(0, 0))
    for seed in range(30):
        a, b = S.make_example(seed, with_clutter), S.make_example(seed, without)
        assert a.caption == b.caption
        assert np.array_equal(a.masks, b.masks) and np.array_equal(a.label_map, b.label_map)
        assert not b.clutter_mask.any()
        assert a.clutter_mask.any()
        # Outside the clutter, identical pixels: the background did not move.
        assert np.array_equal(a.image[~a.clutter_mask], b.image[~a.clutter_mask])
        # Clutter pixels are the only differences and they are never on an object.
        changed = np.any(a.image != b.image, axis=-1)
        assert not np.any(changed & ~a.clutter_mask)
        assert not np.any(a.clutter_mask & (a.label_map > 0))


def test_splits_never_share_seeds():
    ranges = {}
    for split in S.SPLITS:
        lo, hi = S.split_seed(split, 0), S.split_seed(split, S.SPLIT_SIZE - 1)
        assert hi - lo == S.SPLIT_SIZE - 1  # consecutive, strictly increasing
        ranges[split] = (lo, hi)
        assert S.split_of_seed(lo) == (split, 0)
        assert S.split_of_seed(hi) == (split, S.SPLIT_SIZE - 1)
        with pytest.raises(ValueError, match="index"):
            S.split_seed(split, S.SPLIT_SIZE)
        with pytest.raises(ValueError, match="index"):
            S.split_seed(split, -1)
    # Closed intervals of seeds are pairwise disjoint, so no index of one split can ever reach
    # another split's seeds.
    spans = sorted(ranges.values())
    for (lo_a, hi_a), (lo_b, hi_b) in zip(spans, spans[1:]):
        assert hi_a < lo_b
    # And, concretely, on the first indices.
    sets = [{S.split_seed(split, i) for i in range(5000)} for split in S.SPLITS]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    with pytest.raises(ValueError, match="split"):
        S.split_seed("dev", 0)
    with pytest.raises(ValueError, match="no split"):
        S.split_of_seed(3 * S.SPLIT_SIZE)


def test_iterate_yields_split_examples_in_order():
    got = list(S.iterate("validation", start=5, count=3, config=S.preset("easy")))
    assert [e.seed for e in got] == [S.split_seed("validation", i) for i in (5, 6, 7)]
    ref = S.make_example(S.split_seed("validation", 6), S.preset("easy"))
    assert np.array_equal(got[1].image, ref.image)
    endless = S.iterate("train", config=S.preset("easy"))
    assert [next(endless).seed for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="count"):
        S.iterate("train", 0, -1)
    with pytest.raises(ValueError, match="split"):
        S.iterate("dev", 0, 2)


# ---------------------------------------------------------------------------------------------
# Masks, pixels, occlusion
# ---------------------------------------------------------------------------------------------


CRISP = dict(antialias_prob=0.0, blur_prob=0.0, jpeg_prob=0.0, letterbox_prob=0.0)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_masks_agree_with_painted_pixels(name):
    # Crisp rendering: every object pixel then carries exactly its fill or texture colour.
    config, examples = _examples(name, 40, **CRISP)
    for e in examples:
        n = config.image_size
        assert e.image.shape == (n, n, 3) and e.image.dtype == np.uint8
        assert e.masks.shape == (e.num_objects, n, n) and e.masks.dtype == bool
        assert e.label_map.dtype == np.uint8
        # Label map and masks are the same partition.
        for k in range(e.num_objects):
            assert np.array_equal(e.masks[k], e.label_map == k + 1)
            assert e.masks[k].any(), "every object keeps visible pixels"
        assert int(e.label_map.max()) <= e.num_objects
        # Every masked pixel carries its object's fill or texture colour ...
        for k in range(e.num_objects):
            fill, shade = (np.array(c, np.uint8) for c in S.COLOURS[e.colours[k]])
            px = e.image[e.masks[k]]
            is_fill = np.all(px == fill, axis=-1)
            is_shade = np.all(px == shade, axis=-1)
            assert np.all(is_fill | is_shade)
            assert is_fill.mean() > 0.5, "textures keep the colour identity"
            if e.textures[k] == "plain":
                assert is_fill.all()
            else:
                assert is_shade.any(), "a textured object shows its texture"
        # ... and, by the contrast rule, no background pixel is near the fill of an object of
        # the image (noise moves each channel by at most noise_amplitude, rounding by 1).
        background = e.image[(e.label_map == 0) & ~e.clutter_mask].astype(np.float64)
        fills = np.array([S.COLOURS[c][0] for c in e.colours], np.float64)
        gap = np.linalg.norm(background[:, None] - fills[None], axis=-1).min()
        assert gap >= S.MIN_CONTRAST - np.sqrt(3.0) * (config.noise_amplitude + 1.0), (e.tone, gap)
        # The visible masks are the painted objects re-rasterised in drawing order.
        full = _full_masks(e)
        ref = np.zeros((n, n), np.uint8)
        for k in np.argsort(e.z_order):
            ref[full[k]] = k + 1
        assert np.array_equal(ref, e.label_map)
        # Bounding boxes enclose the visible masks exactly.
        for k in range(e.num_objects):
            rows, cols = np.nonzero(e.masks[k])
            assert tuple(e.bboxes[k]) == (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)


@pytest.mark.parametrize("name", ["default", "hard"])
def test_occlusion_keeps_each_object_recognisable(name):
    config, examples = _examples(name, 60)
    overlapped = 0
    for e in examples:
        full = _full_masks(e)
        for k in range(e.num_objects):
            # Visible = full minus every object drawn later.
            later = [j for j in range(e.num_objects) if e.z_order[j] > e.z_order[k]]
            hidden = np.any(full[later], axis=0) if later else np.zeros_like(full[k])
            assert np.array_equal(e.masks[k], full[k] & ~hidden)
            visible_fraction = e.masks[k].sum() / full[k].sum()
            assert visible_fraction >= 1.0 - config.max_occlusion - 1e-9
            overlapped += visible_fraction < 1.0
    assert overlapped > 0, "the occlusion presets must actually produce overlaps"


@pytest.mark.parametrize("name", ["easy", "simple"])
def test_no_occlusion_keeps_objects_apart(name):
    config, examples = _examples(name, 60)
    for e in examples:
        full = _full_masks(e)
        assert np.array_equal(full, e.masks)  # nothing hidden
        for i in range(e.num_objects):
            # Grow object i by min_gap pixels (4-neighbour steps) by brute force over offsets.
            ys, xs = np.nonzero(full[i])
            grown = np.zeros_like(full[i])
            g = config.min_gap
            for dy in range(-g, g + 1):
                for dx in range(-g, g + 1):
                    if abs(dy) + abs(dx) <= g:
                        yy, xx = ys + dy, xs + dx
                        ok = (yy >= 0) & (yy < grown.shape[0]) & (xx >= 0) & (xx < grown.shape[1])
                        grown[yy[ok], xx[ok]] = True
            for j in range(e.num_objects):
                if j != i:
                    assert not np.any(grown & full[j])


def test_objects_lie_fully_inside_the_image():
    config, examples = _examples("default", 60)
    for e in examples:
        n = config.image_size
        for k in range(e.num_objects):
            reach = S.SHAPE_EXTENT[e.shapes[k]] * e.radii[k]
            assert reach - 1e-4 <= e.centres_yx[k][0] <= n - reach + 1e-4
            assert reach - 1e-4 <= e.centres_yx[k][1] <= n - reach + 1e-4
            side = n if e.letterbox is None else min(e.letterbox[2:])
            lo, hi = config.radius_range[0] * side, config.radius_range[1] * side
            assert lo - 1e-4 <= e.radii[k] <= hi + 1e-4


# ---------------------------------------------------------------------------------------------
# Captions and alignment
# ---------------------------------------------------------------------------------------------


def test_vocabulary_is_closed_and_classified():
    vocab = S.vocabulary()
    assert len(set(vocab)) == len(vocab)
    assert all(re.fullmatch(r"[a-z]+", w) for w in vocab)
    assert set(vocab) == set(S.WORD_CLASS)
    assert {S.word_class(w) for w in vocab} == set(S.WORD_CLASSES)
    assert [w for w in vocab if S.word_class(w) == "colour"] == list(S.COLOUR_NAMES)
    assert [w for w in vocab if S.word_class(w) == "shape"] == list(S.SHAPES)
    with pytest.raises(ValueError, match="vocabulary"):
        S.word_class("purplish")


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_captions_use_the_vocabulary_and_align_with_objects(name):
    config, examples = _examples(name, 80)
    seen = set()
    for e in examples:
        assert re.fullmatch(r"[a-z]+( [a-z]+)*", e.caption)
        assert e.caption.split(" ") == list(e.words)
        assert set(e.words) <= set(S.VOCABULARY)
        assert len(e.words) <= S.max_caption_words(config)
        assert e.caption == _reference_caption(e, config)
        assert len(e.word_object) == len(e.words) == len(e.word_class)
        attrs = {"colour": e.colours, "shape": e.shapes, "size": e.sizes}
        named = {"colour": [], "shape": [], "size": []}
        for w, k, cls in zip(e.words, e.word_object, e.word_class):
            assert cls == S.WORD_CLASS[w]
            if cls in attrs:
                assert k is not None and attrs[cls][k] == w
                named[cls].append(k)
            else:
                assert k is None
        # Every object is named exactly once by a colour and once by a shape, in caption order.
        assert named["colour"] == list(range(e.num_objects))
        assert named["shape"] == list(range(e.num_objects))
        if config.size_words:
            assert named["size"] == list(range(e.num_objects))
        if config.caption_order == "left_to_right":
            xs = e.centres_yx[:, 1]
            assert np.all(np.diff(xs) >= 0)
        if config.distinct_colours:
            assert len(set(e.colours)) == e.num_objects
        if config.distinct_shapes:
            assert len(set(e.shapes)) == e.num_objects
        seen.update(e.words)
    assert set(S.COLOUR_NAMES) <= seen and set(S.SHAPES) <= seen


def test_max_caption_words_is_a_tight_bound():
    for changes in ({}, {"relations": False}, {"size_words": True}):
        config, examples = _examples("default", 150, letterbox_prob=0.0, **changes)
        lengths = [len(e.words) for e in examples]
        assert max(lengths) == S.max_caption_words(config), changes


def test_relation_words_follow_the_centres():
    counts = {}
    for name in ("default", "hard"):
        config, examples = _examples(name, 120)
        for e in examples:
            expected = []
            for i in range(0, e.num_objects - 1, 2):
                (yi, xi), (yj, xj) = e.centres_yx[i], e.centres_yx[i + 1]
                if abs(yj - yi) > abs(xj - xi):
                    rel = "above" if yi < yj else "below"
                else:
                    rel = "left of" if xi < xj else "right of"
                expected.append((i, rel, i + 1))
                counts[rel] = counts.get(rel, 0) + 1
            assert list(e.relations) == expected
    # Left-to-right order in 'default' plus random order in 'hard' reach every relation.
    assert set(counts) == {"above", "below", "left of", "right of"}


@pytest.mark.parametrize("name", ["default", "hard"])
def test_related_pairs_stay_off_the_diagonals(name):
    config, examples = _examples(name, 150)
    margin = config.relation_margin_deg
    assert margin > 0
    for e in examples:
        for i, _, j in e.relations:
            dy, dx = np.abs(e.centres_yx[j] - e.centres_yx[i])
            angle = np.degrees(np.arctan2(dy, dx))
            assert abs(angle - 45.0) >= margin - 1e-3
    # With the margin off, near-diagonal pairs do occur (so the check above is not vacuous).
    _, loose = _examples(name, 150, relation_margin_deg=0.0)
    angles = [np.degrees(np.arctan2(*np.abs(e.centres_yx[j] - e.centres_yx[i])))
              for e in loose for i, _, j in e.relations]
    assert any(abs(a - 45.0) < margin for a in angles)


@pytest.mark.parametrize("name", ["default", "hard"])
def test_sizes_split_the_radius_range(name):
    config, examples = _examples(name, 60)
    for e in examples:
        # Sizes are relative to the scene: the whole image, or a letterbox band's short side.
        side = config.image_size if e.letterbox is None else min(e.letterbox[2:])
        lo, hi = config.radius_range[0] * side, config.radius_range[1] * side
        middle = 0.5 * (lo + hi)
        for size, radius in zip(e.sizes, e.radii):
            assert (size == "large") == (radius > middle)
            if config.size_words:  # the two sizes keep a gap of 20% of the range
                span = 0.4 * (hi - lo)
                assert radius <= lo + span + 1e-4 or radius >= hi - span - 1e-4


def test_word_mask_and_attribute_mask():
    config, examples = _examples("hard", 30)
    for e in examples:
        for pos, k in enumerate(e.word_object):
            m = e.word_mask(pos)
            assert np.array_equal(m, e.masks[k] if k is not None else np.zeros_like(m))
        for word in set(e.colours) | set(e.shapes):
            ref = np.zeros(e.label_map.shape, bool)
            for k in range(e.num_objects):
                if word in (e.colours[k], e.shapes[k]):
                    ref |= e.label_map == k + 1
            assert np.array_equal(S.attribute_mask(e, word), ref)
        absent = [c for c in S.COLOUR_NAMES if c not in e.colours][0]
        assert not S.attribute_mask(e, absent).any()
    with pytest.raises(ValueError, match="relation word"):
        S.attribute_mask(examples[0], "above")
    with pytest.raises(ValueError, match="out of range"):
        examples[0].word_mask(99)


def test_parse_caption_reads_back_the_objects():
    for name in ("default", "hard"):
        config, examples = _examples(name, 30)
        for e in examples:
            sizes = e.sizes if config.size_words else (None,) * e.num_objects
            assert S.parse_caption(e.caption) == list(zip(sizes, e.colours, e.shapes))
    assert S.parse_caption("a red and a blue star xyz a circle") == [
        (None, "red", None), (None, "blue", "star"), (None, None, "circle")]
    assert S.parse_caption("") == []


# ---------------------------------------------------------------------------------------------
# Presets, batches, errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_generates_valid_examples_for_many_seeds(name):
    config, examples = _examples(name, 150, split="train", start=1000)
    counts = np.bincount([e.num_objects for e in examples], minlength=config.max_objects + 1)
    assert counts[0] == 0
    assert counts[config.min_objects:config.max_objects + 1].sum() == len(examples)
    # Placement rarely gives up: every allowed count actually occurs.
    assert np.all(counts[config.min_objects:config.max_objects + 1] > 0)
    for e in examples:
        assert e.clutter_mask.dtype == bool and not np.any(e.clutter_mask & (e.label_map > 0))
        assert e.background in config.backgrounds
        assert set(e.textures) <= {"plain", *config.textures}
        assert np.all(np.abs(e.rotations) <= config.max_rotation_deg)
        assert sorted(e.z_order.tolist()) == list(range(e.num_objects))


@pytest.mark.parametrize("name", ["simple", "default", "hard"])
def test_object_counts_stay_close_to_uniform(name):
    # Neither dropped placements nor redrawn layouts may skew the number of objects much.
    config, examples = _examples(name, 400, split="train")
    counts = np.bincount([e.num_objects for e in examples], minlength=config.max_objects + 1)[1:]
    expected = len(examples) / config.max_objects
    assert counts.min() >= 0.75 * expected, counts


@pytest.mark.parametrize("size", [16, 96, 128])
def test_other_image_sizes(size):
    config = S.preset("default", image_size=size, radius_range=(max(0.14, 3.0 / size), 0.2))
    for seed in range(10):
        e = S.make_example(seed, config)
        assert e.image.shape == (size, size, 3) and e.label_map.shape == (size, size)
        for k in range(e.num_objects):
            assert np.array_equal(e.masks[k], e.label_map == k + 1)


def test_batch_equals_stacked_examples():
    config = S.preset("hard")
    indices = [3, 0, 11, 7, 5]
    b = S.batch("test", indices, config)
    m, words_max = config.max_objects, S.max_caption_words(config)
    assert b.images.shape == (5, 64, 64, 3) and b.images.dtype == np.uint8
    assert b.masks.shape == (5, m, 64, 64) and b.word_object.shape == (5, words_max)
    for row, i in enumerate(indices):
        e = S.make_example(S.split_seed("test", i), config)
        k = e.num_objects
        assert b.seeds[row] == e.seed and b.captions[row] == e.caption
        assert np.array_equal(b.images[row], e.image)
        assert np.array_equal(b.label_maps[row], e.label_map)
        assert np.array_equal(b.masks[row, :k], e.masks) and not b.masks[row, k:].any()
        assert b.num_objects[row] == k and b.num_words[row] == len(e.words)
        assert [S.SHAPES[s] for s in b.shapes[row, :k]] == list(e.shapes)
        assert [S.COLOUR_NAMES[c] for c in b.colours[row, :k]] == list(e.colours)
        assert np.all(b.shapes[row, k:] == -1) and np.all(b.colours[row, k:] == -1)
        assert np.array_equal(b.centres_yx[row, :k], e.centres_yx)
        assert np.array_equal(b.bboxes[row, :k], e.bboxes)
        ref_words = [-1 if o is None else o for o in e.word_object]
        assert b.word_object[row, : len(ref_words)].tolist() == ref_words
        assert np.all(b.word_object[row, len(ref_words):] == -1)
    with pytest.raises(ValueError, match="indices is empty"):
        S.batch("train", [], config)
    with pytest.raises(ValueError, match="does not fit"):
        S.collate([S.make_example(0, S.preset("default", image_size=32))], config)


def test_image_grid_tiles_images():
    images = np.stack([np.full((4, 5, 3), i * 20, np.uint8) for i in range(6)])
    grid = S.image_grid(images, columns=4, pad=1)
    assert grid.shape == (2 * 5 + 1, 4 * 6 + 1, 3)
    assert np.all(grid[1:5, 1:6] == 0) and np.all(grid[6:10, 7:12] == 100)
    assert np.all(grid[6:10, 13:18] == 255)  # empty slot stays white
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        S.image_grid(np.zeros((4, 4, 3), np.uint8))


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(image_size=8), "image_size"),
        (dict(image_size=64.0), "image_size"),
        (dict(max_objects=0), "max_objects"),
        (dict(min_objects=3, max_objects=2), "min_objects"),
        (dict(shapes=("circle", "hexagon")), "hexagon"),
        (dict(shapes=()), "shapes"),
        (dict(colours=("red", "red", "blue", "green")), "repeats"),
        (dict(shapes=("circle", "square"), max_objects=4), "distinct_shapes"),
        (dict(radius_range=(0.3, 0.2)), "radius_range"),
        (dict(radius_range=(0.2, 0.4)), "fits in the image"),
        (dict(radius_range=(0.01, 0.2)), "at least 3 px"),
        (dict(max_rotation_deg=45.0), "max_rotation_deg"),
        (dict(max_occlusion=1.0), "max_occlusion"),
        (dict(texture_prob=1.5), "texture_prob"),
        (dict(clutter_range=(3, 1)), "clutter_range"),
        (dict(caption_order="alphabetical"), "caption_order"),
        (dict(relation_margin_deg=30.0), "relation_margin_deg"),
        (dict(backgrounds=("plasma",)), "backgrounds"),
        (dict(occlusion=1), "occlusion"),
    ],
)
def test_bad_config_is_rejected_clearly(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(S.ShapesConfig(), **changes)


def test_bad_arguments_are_rejected_clearly():
    with pytest.raises(ValueError, match="preset"):
        S.preset("medium")
    with pytest.raises(ValueError, match="seed"):
        S.make_example(-1)
    with pytest.raises(ValueError, match="seed"):
        S.make_example(1.5)
    with pytest.raises(ValueError, match="ShapesConfig"):
        S.make_example(0, {"image_size": 64})
    with pytest.raises(ValueError, match="unknown shape"):
        S.shape_mask("hexagon", (5, 5), 3, 16)
    with pytest.raises(ValueError, match="radius"):
        S.shape_mask("circle", (5, 5), 0.0, 16)


# ---------------------------------------------------------------------------------------------
# TFDS builder round trip
# ---------------------------------------------------------------------------------------------


def _check_record(record, e, shapes_tfds):
    assert record["seed"] == e.seed
    assert np.array_equal(record["image"], e.image)
    assert np.array_equal(np.asarray(record["label_map"])[..., 0], e.label_map)
    text = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
    assert text(record["caption"]) == e.caption
    assert S.BACKGROUNDS[record["background"]] == e.background
    assert S.TONE_NAMES[record["tone"]] == e.tone
    n = e.image.shape[0]
    assert tuple(np.asarray(record["letterbox"]).tolist()) == (e.letterbox or (0, 0, n, n))
    assert bool(record["antialiased"]) == e.antialiased
    assert [text(w) for w in record["words"]] == list(e.words)
    assert list(record["word_object"]) == e.word_object_array().tolist()
    assert [S.WORD_CLASSES[c] for c in record["word_class"]] == list(e.word_class)
    objects = record["objects"]
    assert [S.SHAPES[s] for s in objects["shape"]] == list(e.shapes)
    assert [S.COLOUR_NAMES[c] for c in objects["colour"]] == list(e.colours)
    assert [S.SIZE_WORDS[s] for s in objects["size"]] == list(e.sizes)
    assert [shapes_tfds.TEXTURE_NAMES[t] for t in objects["texture"]] == list(e.textures)
    assert np.array_equal(np.reshape(objects["bbox"], (-1, 4)), e.bboxes)
    assert np.array_equal(np.reshape(objects["centre_yx"], (-1, 2)), e.centres_yx)
    assert np.array_equal(np.asarray(objects["radius"], np.float32), e.radii)
    assert np.array_equal(np.asarray(objects["rotation"], np.float32), e.rotations)
    assert list(objects["z_order"]) == e.z_order.tolist()
    rel = record["relations"]
    got = [(int(a), shapes_tfds.RELATION_NAMES[r], int(b))
           for a, r, b in zip(rel["subject"], rel["relation"], rel["object"])]
    assert got == list(e.relations)


def test_tfds_round_trip_data_source_and_grain(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    grain = pytest.importorskip("grain")
    from dcam_jax.data import shapes_tfds

    counts = {"train": 10, "validation": 3, "test": 3}
    shapes_tfds.build(tmp_path, "default", num_examples=counts)
    config = S.preset("default")
    source = tfds.data_source("shapes_world/default", data_dir=str(tmp_path), download=False)
    assert {str(k): len(v) for k, v in source.items()} == counts
    for split, count in counts.items():
        for i in range(count):
            # Record i of a split is example i of that split (write-time shuffling is off).
            _check_record(source[split][i], S.make_example(S.split_seed(split, i), config),
                          shapes_tfds)

    # grain: fixed-shape records, batched, equal to the numpy batch generator.
    dataset = grain.MapDataset.source(source["train"]).map(shapes_tfds.RecordToArrays(config))
    batches = list(dataset.batch(4))[:2]
    for bi, got in enumerate(batches):
        ref = S.batch("train", range(4 * bi, 4 * bi + 4), config)
        assert np.array_equal(got["image"], ref.images)
        assert np.array_equal(got["masks"], ref.masks)
        assert np.array_equal(got["label_map"], ref.label_maps)
        assert np.array_equal(got["shapes"], ref.shapes)
        assert np.array_equal(got["colours"], ref.colours)
        assert np.array_equal(got["word_object"], ref.word_object)
        assert np.array_equal(got["num_words"], ref.num_words)
        examples = [S.make_example(S.split_seed("train", i), config)
                    for i in range(4 * bi, 4 * bi + 4)]
        assert [S.TONE_NAMES[t] for t in got["tone"]] == [e.tone for e in examples]
        assert np.array_equal(got["seed"], ref.seeds)
        assert [str(c) for c in got["caption"]] == list(ref.captions)


def test_tfds_custom_config_round_trip_and_errors(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from dcam_jax.data import shapes_tfds

    tiny = S.preset("easy", image_size=32)
    builder = shapes_tfds.build(tmp_path, "easy", shapes_config=tiny, name="tiny32",
                                num_examples={"train": 4, "validation": 0, "test": 2})
    assert set(builder.info.splits) == {"train", "test"}
    source = tfds.data_source("shapes_world/tiny32", data_dir=str(tmp_path), download=False)
    for i in range(2):
        _check_record(source["test"][i], S.make_example(S.split_seed("test", i), tiny), shapes_tfds)
    arrays = shapes_tfds.RecordToArrays(tiny)(source["train"][1])
    assert arrays["image"].shape == (32, 32, 3) and arrays["masks"].shape == (1, 32, 32)
    with pytest.raises(ValueError, match="expected"):
        shapes_tfds.RecordToArrays(S.preset("easy"))(source["train"][1])

    with pytest.raises(ValueError, match="already holds"):
        shapes_tfds.build(tmp_path, "easy", shapes_config=tiny, name="tiny32",
                          num_examples={"train": 5, "validation": 0, "test": 2})
    with pytest.raises(ValueError, match="needs its own name"):
        shapes_tfds.make_builder(tmp_path, "easy", shapes_config=tiny)
    with pytest.raises(ValueError, match="another preset"):
        shapes_tfds.make_builder(tmp_path, "easy", shapes_config=tiny, name="hard")
    with pytest.raises(ValueError, match="unknown split"):
        shapes_tfds.make_builder(tmp_path, num_examples={"dev": 3})
    with pytest.raises(ValueError, match="every split"):
        shapes_tfds.make_builder(tmp_path, num_examples={"train": 0, "validation": 0, "test": 0})
    with pytest.raises(ValueError, match="uint8"):
        shapes_tfds.encode_png(np.zeros((4, 4, 3), np.float32))


def test_match_phrases_is_the_best_assignment():
    """Against brute force over every partial injection: the most agreeing words, then the most bound objects."""
    import itertools

    rng = np.random.default_rng(0)
    cols, shps = S.COLOUR_NAMES[:3], S.SHAPES[:3]
    for _ in range(200):
        n, m = int(rng.integers(0, 4)), int(rng.integers(0, 5))
        colours = [str(rng.choice(cols)) for _ in range(n)]
        shapes_ = [str(rng.choice(shps)) for _ in range(n)]
        phrases = [(None, rng.choice(list(cols) + [None]), rng.choice(list(shps) + [None])) for _ in range(m)]

        def value(assign):
            c = sum(phrases[j][1] == colours[i] for i, j in enumerate(assign) if j >= 0)
            s = sum(phrases[j][2] == shapes_[i] for i, j in enumerate(assign) if j >= 0)
            b = sum(phrases[j][1] == colours[i] and phrases[j][2] == shapes_[i] for i, j in enumerate(assign) if j >= 0)
            return c + s + 2 * b

        best = max(value(p) for p in itertools.permutations(list(range(m)) + [-1] * n, n))
        got = S.match_phrases(colours, shapes_, phrases)
        assert len(got) == n and value(got) == best
        used = [j for j in got if j >= 0]
        assert len(used) == len(set(used)) == min(n, m)
    with pytest.raises(ValueError, match="colours but"):
        S.match_phrases(["red"], [], [])


# ---------------------------------------------------------------------------------------------
# Backgrounds of every tone, the contrast rule, rendering variety
# ---------------------------------------------------------------------------------------------


def test_every_tone_is_drawn_and_in_its_box():
    config = S.preset("default", backgrounds=("solid",), noise_amplitude=0.0, **CRISP)
    seen = {}
    for i in range(200):
        e = S.make_example(S.split_seed("train", i), config)
        corner = e.image[0, 0].astype(np.float64) / 255.0
        h, sat, val = colorsys.rgb_to_hsv(*corner)
        seen.setdefault(e.tone, []).append((sat, val))
    assert set(seen) == set(S.TONE_NAMES)
    for tone, points in seen.items():
        s_min, s_span, v_min, v_span = S.TONES[tone]
        sats, vals = np.array(points).T
        tol = 3.0 / 255.0  # uint8 rounding
        assert vals.min() >= v_min - tol and vals.max() <= v_min + v_span + tol, tone
        assert sats.max() <= s_min + s_span + 0.05, tone


def test_contrast_rule_names_the_right_colours():
    white = (250.0, 250.0, 250.0)
    assert "white" not in S.allowed_colours(white, white)
    assert "yellow" in S.allowed_colours(white, white)
    dark = (20.0, 20.0, 25.0)
    assert set(S.allowed_colours(dark, dark)) == set(S.COLOUR_NAMES)
    # A gradient counts all its colours: white is refused once the ramp reaches white.
    assert "white" in S.allowed_colours(dark, dark)
    assert "white" not in S.allowed_colours(dark, white)
    # Closed form: the distance from a fill to a solid background.
    red = np.array(S.COLOURS["red"][0], np.float64)
    near = red + np.array([S.MIN_CONTRAST - 1.0, 0.0, 0.0]) / 1.0
    near = np.clip(near, 0, 255)
    assert "red" not in S.allowed_colours(near, near)


def test_a_colour_word_is_never_drawn_on_a_background_it_fails_the_rule_on():
    config = S.preset("default", noise_amplitude=0.0, clutter_range=(0, 0), **CRISP)
    for i in range(150):
        e = S.make_example(S.split_seed("validation", i), config)
        background = e.image[e.label_map == 0].astype(np.float64)
        for colour in e.colours:
            fill = np.array(S.COLOURS[colour][0], np.float64)
            assert np.linalg.norm(background - fill, axis=-1).min() >= S.MIN_CONTRAST - 2.0, (
                e.tone, colour)


def test_config_whose_colours_fail_the_contrast_rule_is_refused_before_drawing():
    with pytest.raises(ValueError, match="contrast rule on the 'white'"):
        S.ShapesConfig(colours=("white",), tones=("white",), max_objects=1)
    with pytest.raises(ValueError, match="contrast rule on the 'light'"):
        S.ShapesConfig(colours=("white", "pink", "purple", "red"), tones=("dark", "light"))
    # The same colours are fine on tones where they stand out.
    S.ShapesConfig(colours=("white",), tones=("dark",), max_objects=1)


def test_rendering_variety_keeps_the_scene_and_masks():
    crisp = S.preset("default", **CRISP)
    for i in range(30):
        seed = S.split_seed("test", i)
        base = S.make_example(seed, crisp)
        for field in ("antialias_prob", "blur_prob", "jpeg_prob"):
            e = S.make_example(seed, crisp.replace(**{field: 1.0}))
            assert e.caption == base.caption and np.array_equal(e.label_map, base.label_map)
            assert e.image.shape == base.image.shape and e.image.dtype == np.uint8
        aa = S.make_example(seed, crisp.replace(antialias_prob=1.0))
        assert aa.antialiased and not base.antialiased
        # Anti-aliasing changes pixels only on outlines: within one pixel (8-neighbourhood) of
        # an object's whole outline, where a 2 x 2 subsample can fall on either side. The
        # painted pixels of later objects cover earlier objects' rims as before.
        changed = np.any(aa.image != base.image, axis=-1)
        edge = np.zeros_like(changed)
        for m in _full_masks(base):
            padded = np.pad(m, 1)
            windows = [padded[1 + dy:1 + dy + m.shape[0], 1 + dx:1 + dx + m.shape[1]]
                       for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
            edge |= np.logical_or.reduce(windows) & ~np.logical_and.reduce(windows)
        assert changed.any() and not np.any(changed & ~edge)


def test_letterbox_bands_hold_every_object_and_bars_are_pad_grey():
    config = S.preset("default", letterbox_prob=1.0, antialias_prob=0.0, blur_prob=0.0,
                      jpeg_prob=0.0)
    n = config.image_size
    orientations = set()
    for i in range(40):
        e = S.make_example(S.split_seed("train", i), config)
        top, left, h, w = e.letterbox
        assert (h == n) != (w == n) and 0.55 * n - 1 <= min(h, w) <= 0.9 * n + 1
        orientations.add(h == n)
        band = np.zeros((n, n), bool)
        band[top:top + h, left:left + w] = True
        assert not np.any((e.label_map > 0) & ~band) and not np.any(e.clutter_mask & ~band)
        assert np.all(e.image[~band] == S.LETTERBOX_FILL)
        assert e.num_objects >= 1
        # The scene shrinks with its band, as a padded non-square picture does.
        side = min(h, w)
        lo, hi = config.radius_range[0] * side, config.radius_range[1] * side
        assert np.all((e.radii >= lo - 1e-4) & (e.radii <= hi + 1e-4)), (e.radii, lo, hi)
    assert orientations == {True, False}


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_generated_caption_is_well_formed(name):
    config, examples = _examples(name, 60)
    assert all(S.is_well_formed(e.caption, config.size_words) for e in examples)


def test_malformed_captions_are_recognised():
    good = "a green triangle left of a yellow star and a white cross"
    assert S.is_well_formed(good)
    for bad in ("", "a", "a a red circle", "a red circle and", "a red circle above",
                "a red circle above a blue square above a red star", "a white cross a a white square",
                "a red circle and and a blue star", "a red red circle", "a red circle left a blue star",
                good + " of", "a small red circle"):
        assert not S.is_well_formed(bad), bad
    assert S.is_well_formed("a small red circle", size_words=True)
    assert not S.is_well_formed("a red circle", size_words=True)
