"""grad_activation_alignment against finite differences of the forward pass (Euler: d/de S((1+e) A_i) = G_i . A_i)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcam_jax import api
from dcam_jax.cam import attribution as attr
from dcam_jax.models import llada

IMG = np.random.default_rng(4).integers(0, 256, (48, 64, 3), dtype=np.uint8)


@pytest.mark.slow
@pytest.mark.parametrize("layer", [0, 1])
def test_alignment_matches_finite_differences(tiny_model, layer):
    """tiny_model has 3 blocks. Above block 1 only block 2 remains, which reads an image token only through the
    RMSNorm of its attention input, so the score is scale-invariant in A_i (up to the norm's eps, negligible at
    this init scale) and G_i . A_i = 0 (closed form);
    above block 0, block 1's update is added to A_i before block 2's norm, and G_i . A_i is not 0."""
    m = tiny_model
    cfg = m.config
    pre = api.prepare(m, IMG, "describe the image")
    answer = np.array([5, 9, 11, 7, 62, 62, 62, 62], np.int32)
    state = answer.copy()
    state[[1, 2]] = cfg.lm.mask_id
    img = pre.layout.positions(pre.layout.default_view)
    spec = attr.GradSpec(layer=layer, attention=cfg.attention)
    targets = np.array([1, 2], np.int32)
    cos, gnorm, anorm = attr.grad_activation_alignment(m.params, cfg, spec, pre.prompt_embeds, jnp.asarray(img),
                                                jnp.asarray(state), jnp.asarray(answer), jnp.asarray(targets),
                                                jnp.asarray(answer[targets]))
    assert cos.shape == gnorm.shape == (2,) + img.shape and anorm.shape == img.shape
    assert np.all(np.abs(cos) <= 1 + 1e-6) and np.all(gnorm >= 0)

    # the same quantities from forward passes only
    lm = m.params["lm"]
    P = pre.prompt_embeds.shape[0]
    h0 = jnp.concatenate([pre.prompt_embeds[None], llada.embed_tokens(lm, cfg.lm, jnp.asarray(state)[None])], 1)
    T = h0.shape[1]
    pos = jnp.arange(T)[None]
    bias = llada.attention_bias(jnp.arange(T), T, attention=cfg.attention,
                                prefix_len=P if cfg.attention == "prefix_lm" else None)
    A = llada.run_blocks(lm["layers"], cfg.lm, h0, positions=pos, bias=bias, stop=layer + 1)

    def score(a, t):
        h = llada.run_blocks(lm["layers"], cfg.lm, a, positions=pos, bias=bias, start=layer + 1)
        return jax.nn.log_softmax(llada.final_logits(lm, cfg.lm, h[:, P + t:P + t + 1]))[0, 0, answer[t]]

    eps = 0.05  # central differences: O(eps^2) error; float32 noise of the score / eps stays far below atol
    a_norms = np.asarray(jnp.linalg.norm(A[0][img], axis=-1))
    np.testing.assert_allclose(anorm, a_norms, rtol=1e-5)
    for k, t in enumerate(targets):
        dot = np.asarray(cos[k] * gnorm[k]) * a_norms
        scale_of = (np.asarray(gnorm[k]) * a_norms).max()
        if layer == 1:
            assert np.abs(dot).max() < 1e-5 * scale_of
        else:
            assert np.abs(dot).max() > 1e-2 * scale_of
        for (r, c) in [(0, 0), tuple(np.unravel_index(int(np.argmax(np.abs(dot))), img.shape)),
                       tuple(np.unravel_index(int(np.argmax(gnorm[k])), img.shape))]:
            i = int(img[r, c])
            scale = lambda e: A.at[0, i].multiply(1.0 + e)
            fd = (float(score(scale(eps), t)) - float(score(scale(-eps), t))) / (2 * eps)
            a_norm = float(jnp.linalg.norm(A[0, i]))
            np.testing.assert_allclose(float(cos[k, r, c]) * float(gnorm[k, r, c]) * a_norm, fd, rtol=2e-2, atol=1e-5)
