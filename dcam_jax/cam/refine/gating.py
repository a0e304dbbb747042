"""DACG (confidence-gated 3 x 3 blur), CBA (background attenuation) and the clip-and-normalise step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dcam_jax.cam.refine._common import _as_maps
from dcam_jax.cam.refine.config import BlurMode
from dcam_jax.ops.order import _percentiles


def _gaussian_taps(sigma: float) -> tuple[float, float]:
    if isinstance(sigma, jax.core.Tracer) or not float(sigma) > 0:
        raise ValueError(f"sigma={sigma!r}: expected a static Python float > 0 (the 3-tap "
                         "Gaussian's standard deviation, 0.3 in the paper).")
    # OpenCV builds the kernel in double and rounds once to the image type.
    g = np.exp(-1.0 / (2.0 * float(sigma) ** 2))
    return 1.0 / (1.0 + 2.0 * g), g / (1.0 + 2.0 * g)


def gaussian_blur_3x3(maps, sigma: float = 0.3):
    """3x3 Gaussian blur with reflect-101 border, as cv2.GaussianBlur(m, (3, 3), sigma, sigma).

    maps: [..., H, W] float. sigma: static float > 0. Returns [..., H, W].
    """
    x = _as_maps(maps, "maps")
    c, e = (jnp.asarray(t, x.dtype) for t in _gaussian_taps(sigma))
    pad = [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)]
    p = jnp.pad(x, pad, mode="reflect")
    rows = e * p[..., :, :-2] + c * p[..., :, 1:-1] + e * p[..., :, 2:]     # OpenCV: rows first
    return e * rows[..., :-2, :] + c * rows[..., 1:-1, :] + e * rows[..., 2:, :]


def dacg(maps, sigma: float = 0.3, *, delta_sigma: float = 0.22, delta_mu: float = 0.35,
         delta_mu_prime: float = 0.25, alpha_high_var: float = 90.0,
         alpha_high_mean: float = 75.0, alpha_low_mean: float = 80.0,
         alpha_default: float = 85.0, nonzero_eps: float = 1e-6, blur: BlurMode = "spatial"):
    """DACG, Distribution-Aware Confidence Gating (SPEC 4.4).

    Per map: mu, sigma (population) over all pixels pick the percentile alpha; zeta = the
    alpha-th percentile (linear) of the values >= nonzero_eps (zeta = nonzero_eps when there is
    none); pixels <= zeta take the 3x3 Gaussian blur (sigma, reflect-101) of the whole map, the
    others are unchanged. ``blur="reference_noop"`` returns the maps unchanged (the authors'
    blur of a one-pixel-wide column is an exact identity).

    maps: [..., H, W] float. Returns [..., H, W].
    """
    x = _as_maps(maps, "maps")
    if blur == "reference_noop":
        return x
    if blur != "spatial":
        raise ValueError(f"dacg: blur={blur!r}; expected 'spatial' or 'reference_noop'.")
    if x.size == 0:
        return x
    flat = x.reshape(x.shape[:-2] + (-1,))
    mu = jnp.mean(flat, axis=-1)
    sd = jnp.std(flat, axis=-1)
    alpha = jnp.where(sd > delta_sigma, alpha_high_var,
                      jnp.where(mu > delta_mu, alpha_high_mean,
                                jnp.where(mu < delta_mu_prime, alpha_low_mean, alpha_default)))
    (zeta,) = _percentiles(flat, [(alpha, nonzero_eps, nonzero_eps)])
    blurred = gaussian_blur_3x3(x, sigma)
    return jnp.where(x <= zeta[..., None, None], blurred, x)


# --------------------------------------------------------------------------------------------
# CBA and clip-and-normalise
# --------------------------------------------------------------------------------------------

def cba(maps, *, w_nonzero_pct: float = 0.15, q_nonzero: float = 50.0,
        w_all_pct: float = 0.15, q_all: float = 60.0, w_nonzero_mean: float = 0.2,
        w_max: float = 0.015, floor: float = 0.5, nonzero_eps: float = 1e-6,
        min_delta: float = 1e-8):
    """CBA, Contextual Background Attenuation (SPEC 4.4), the attenuation alone.

    delta = 0.15 * p50(values >= eps) + 0.15 * p60(all) + 0.2 * mean(values >= eps)
    + 0.015 * max (delta = nonzero_eps when no value is >= eps); pixels with v < delta become
    v * clip(v / max(delta, min_delta), floor, 1); the others are unchanged.

    maps: [..., H, W] float. Returns [..., H, W].
    """
    x = _as_maps(maps, "maps")
    if x.size == 0:
        return x
    flat = x.reshape(x.shape[:-2] + (-1,))
    nz = flat >= nonzero_eps
    n_nz = jnp.sum(nz, axis=-1)
    p_nz, p_all = _percentiles(flat, [(q_nonzero, nonzero_eps, 0.0), (q_all, None, 0.0)])
    mean_nz = jnp.sum(jnp.where(nz, flat, 0.0), axis=-1) / jnp.maximum(n_nz, 1)
    delta = (w_nonzero_pct * p_nz + w_all_pct * p_all + w_nonzero_mean * mean_nz
             + w_max * jnp.max(flat, axis=-1))
    delta = jnp.where(n_nz > 0, delta, nonzero_eps)[..., None, None]
    lam = jnp.clip(x / jnp.maximum(delta, min_delta), floor, 1.0)
    return jnp.where(x < delta, x * lam, x)


def clip_and_normalize(maps, raw_maps, *, eps: float = 0.0):
    """Clip to [0, max of the raw map], then min-max normalise each map to [0, 1].

    maps: [..., H, W] (the CBA output); raw_maps: [..., H, W] (refine's input, broadcastable).
    ``(E - min) / (max - min + eps)``; a constant map becomes all zeros. Returns [..., H, W].
    """
    x = _as_maps(maps, "maps")
    raw = _as_maps(raw_maps, "raw_maps")
    if x.size == 0:
        return x
    top = jnp.max(raw, axis=(-2, -1), keepdims=True)
    e = jnp.minimum(jnp.maximum(x, 0.0), top)
    lo = jnp.min(e, axis=(-2, -1), keepdims=True)
    span = jnp.max(e, axis=(-2, -1), keepdims=True) - lo
    nonflat = span > 0
    out = (e - lo) / jnp.where(nonflat, span + eps, 1.0)
    return jnp.where(nonflat, out, jnp.zeros_like(out))
