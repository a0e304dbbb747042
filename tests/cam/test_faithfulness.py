"""Word faithfulness: the scorer against a direct forward pass, and the curves' end points."""

import jax
import numpy as np
import pytest

from dcam_jax import api
from dcam_jax.cam import faithfulness as fa
from dcam_jax.models import mllm

IMG = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def setup(tiny_model):
    pre = api.prepare(tiny_model, IMG, "describe the image")
    answer = np.array([5, 9, 11, 7, 62, 62, 62, 62], np.int32)
    return pre, answer


def _direct(model, pre, image, answer, positions):
    probe = answer.copy()
    probe[list(positions)] = model.config.lm.mask_id
    proc = model.image_processor(image)
    logits, _ = mllm.mllm_logits(model.params, model.config, pre.prompt_ids, proc.pixel_values, proc.geometry,
                                 answer_ids=probe, attention=model.config.attention)
    P = logits.shape[0] - answer.shape[0]
    logp = np.asarray(jax.nn.log_softmax(logits[P:], -1))
    return sum(float(logp[p, answer[p]]) for p in positions)


def test_scorer_matches_a_direct_forward(tiny_model, setup):
    pre, answer = setup
    other = np.random.default_rng(2).integers(0, 256, IMG.shape, dtype=np.uint8)
    score = fa.word_scorer(tiny_model, pre.prompt_ids, answer, (1, 2), image_shape=IMG.shape[:2])
    got = score(np.stack([IMG, other]))
    want = [_direct(tiny_model, pre, im, answer, (1, 2)) for im in (IMG, other)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert got[0] != pytest.approx(got[1])  # the image matters to the score


def test_curves_start_and_end_at_the_full_and_baseline_scores(tiny_model, setup):
    pre, answer = setup
    maps = np.stack([np.random.default_rng(3).random((6, 8)), np.ones((6, 8))])
    curves = fa.word_faithfulness(tiny_model, IMG, pre.prompt_ids, answer, (2,), maps, num_steps=4,
                                  baseline="mean")
    full = _direct(tiny_model, pre, IMG, answer, (2,))
    base = _direct(tiny_model, pre, fa.baseline_image(IMG, "mean").copy(), answer, (2,))
    for c in curves:
        assert c.fractions[0] == 0 and c.fractions[-1] == 1
        np.testing.assert_allclose([c.deletion[0], c.insertion[-1]], [full, full], atol=1e-4)
        np.testing.assert_allclose([c.deletion[-1], c.insertion[0]], [base, base], atol=1e-4)
    # different maps delete patches in different orders
    assert not np.allclose(curves[0].deletion, curves[1].deletion)


def test_bad_inputs(tiny_model, setup):
    pre, answer = setup
    with pytest.raises(ValueError, match="positions"):
        fa.word_scorer(tiny_model, pre.prompt_ids, answer, (), image_shape=(48, 64))
    with pytest.raises(ValueError, match="positions"):
        fa.word_scorer(tiny_model, pre.prompt_ids, answer, (8,), image_shape=(48, 64))
    with pytest.raises(ValueError, match="baseline"):
        fa.baseline_image(IMG, "grey")
    with pytest.raises(ValueError, match="uint8"):
        fa.word_faithfulness(tiny_model, IMG.astype(np.float32), pre.prompt_ids, answer, (1,), np.ones((1, 6, 8)))
    score = fa.word_scorer(tiny_model, pre.prompt_ids, answer, (1,), image_shape=(48, 64))
    with pytest.raises(ValueError, match="expected images"):
        score(IMG[None, :40])


def test_baseline_image():
    np.testing.assert_array_equal(fa.baseline_image(IMG, "black"), 0)
    m = fa.baseline_image(IMG, "mean")
    assert m.shape == IMG.shape and m.dtype == np.uint8
    np.testing.assert_array_equal(m[0, 0], np.round(IMG.reshape(-1, 3).mean(0)))
