"""The model card's figures: the example sets are what they say, and the figure is written."""

import numpy as np
from PIL import Image

from dcam_jax.data import shapes
from dcam_jax.toy import card_figures as cf


def test_example_sets():
    can = cf.can_examples(8)
    assert len(can) == 8
    tones = {shapes.make_example(shapes.split_seed("test", i), shapes.preset("default")).tone for i in range(200)}
    assert len(tones) == len(shapes.TONE_NAMES)
    sizes = {img.shape[:2] for img, _ in can}
    assert (64, 64) in sizes and any(h != w for h, w in sizes)  # ShapesWorld and non-square PIL drawings
    for img, truth in can:
        assert img.dtype == np.uint8 and shapes.is_well_formed(truth)
    cannot = dict((t, img) for img, t in cf.cannot_examples())
    six = next(t for t in cannot if t.count(" a ") + 1 == 6)
    assert shapes.is_well_formed(six)
    assert any("hexagon" in t for t in cannot) and any("texture" in t for t in cannot)


def test_grid_and_caption(tiny_model, tmp_path):
    img, truth = cf.can_examples(2)[0]
    answer = cf.caption(tiny_model, img)
    assert isinstance(answer, str)
    path = cf.grid([(img, truth, answer), (img, truth, "x")], tmp_path / "g.png", "t", columns=2)
    with Image.open(path) as im:
        assert im.size[0] > 200
