"""Backgrounds of every tone (solid or gradient, with grain), clutter, anti-aliased edges and colours."""

from __future__ import annotations

import colorsys
import dataclasses
import math

import numpy as np

from dcam_jax.data.shapes.vocab import COLOURS, MIN_CONTRAST, _tone_colour, allowed_colours
from dcam_jax.data.shapes.config import ShapesConfig
from dcam_jax.data.shapes.raster import _grain_pool, _pixel_centres, _shape_window, _upsample_matrices, shape_mask
from dcam_jax.data.shapes.layout import _Placed


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return 255.0 * np.array(colorsys.hsv_to_rgb(h, s, v), np.float32)


BACKGROUND_TRIES = 32


@dataclasses.dataclass(frozen=True)
class _Backdrop:
    image: np.ndarray  # [H, W, 3] uint8
    kind: str
    tone: str
    level: float  # mean brightness in [0, 1]
    colours: tuple[str, ...]  # the config's colours allowed on it by the contrast rule


def _background(rng: np.random.Generator, c: ShapesConfig) -> _Backdrop:
    """The background: kind and tone drawn uniformly, two colours from the tone's HSV box
    (redrawn until enough object colours satisfy the contrast rule), noise."""
    n = c.image_size
    kind = c.backgrounds[int(rng.integers(len(c.backgrounds)))]
    tone = c.tones[int(rng.integers(len(c.tones)))]
    needed = c.max_objects if c.distinct_colours else 1
    for _ in range(BACKGROUND_TRIES):
        hsv = rng.random((2, 3))
        c0 = _tone_colour(tone, *hsv[0])
        c1 = _tone_colour(tone, *hsv[1]) if kind == "gradient" else c0
        allowed = allowed_colours(c0, c1, c.colours)
        if len(allowed) >= needed:
            break
    else:
        raise RuntimeError(
            f"no background of tone {tone!r} in {BACKGROUND_TRIES} draws left {needed} of the "
            f"colours {c.colours} at contrast >= {MIN_CONTRAST}; widen ShapesConfig.colours.")
    angle = rng.uniform(0.0, 2.0 * np.pi)
    noise_draw = rng.random()
    # Compose as [H, W * 3] float32 rows so NumPy never loops over a trailing axis of length 3.
    if kind == "solid":
        img = np.empty((n, 3 * n), np.float32)
        img[:] = np.tile(c0, n)
        level = float(c0.sum()) / (3.0 * 255.0)
    else:
        # Linear ramp from c0 to c1 along `angle`, spanning the image exactly: it is an outer sum
        # of a per-row and a per-column term, each times the colour difference.
        coord = _pixel_centres(n) * np.float32(1.0 / n) - np.float32(0.5)
        cos, sin = math.cos(angle), math.sin(angle)
        half = max((abs(cos) + abs(sin)) * (0.5 - 0.5 / n), 1e-6)
        diff = c1 - c0
        along_x = np.float32(cos / (2 * half)) * coord  # [W]
        along_y = np.float32(sin / (2 * half)) * coord  # [H]
        per_col = (c0 + 0.5 * diff)[None, :] + along_x[:, None] * diff[None, :]  # [W, 3]
        img = per_col.reshape(1, 3 * n) + along_y[:, None] * np.tile(diff, n)[None, :]
        # The ramp is symmetric about its middle, so the mean is the mid colour.
        level = float((c0 + c1).sum()) / (6.0 * 255.0)
    if c.noise_amplitude > 0 and noise_draw < c.noise_prob:
        # Smooth grey value noise (a coarse grid upsampled bilinearly by two small matmuls, the
        # same on the three channels) plus a fine per-channel grain cut at a random offset from a
        # fixed pool (drawing 3 H W fresh numbers would cost more than the rest of the image).
        g = max(2, n // 8)
        rows, cols = _upsample_matrices(n, g)
        grid = rng.random((g, g), dtype=np.float32) * np.float32(2.0) - np.float32(1.0)
        noise = rows @ grid @ cols
        pool = _grain_pool(n)
        dy, dx = rng.integers(n), rng.integers(n)
        noise += pool[dy:dy + n, 3 * dx:3 * dx + 3 * n]
        noise *= np.float32(c.noise_amplitude / 1.35)
        img += noise
        np.clip(img, np.float32(0.0), np.float32(255.0), out=img)
    img += np.float32(0.5)
    return _Backdrop(img.astype(np.uint8).reshape(n, n, 3), kind, tone, level, allowed)


def _draw_clutter(rng: np.random.Generator, c: ShapesConfig, bg_level: float,
                  image: np.ndarray, clutter: np.ndarray) -> None:
    """Paint small grey distractor discs into image [H, W, 3] uint8, marking clutter [H, W] bool."""
    lo, hi = int(c.clutter_range[0]), int(c.clutter_range[1])
    count = int(rng.integers(lo, hi + 1))
    n = c.image_size
    draws = rng.random((count, 6))
    for r_u, y_u, x_u, delta_u, hue, sat_u in draws.tolist():
        r = max(1.0, (0.015 + 0.02 * r_u) * n)
        # Grey-ish, visibly lighter (on dark) or darker (on light) than the background.
        delta = 0.15 + 0.1 * delta_u
        level = bg_level + delta if bg_level < 0.3 else bg_level - delta
        colour = _hsv(hue, 0.12 * sat_u, min(max(level, 0.04), 0.6))
        y0, x0, inside, _, _ = _shape_window("circle", n * y_u, n * x_u, r, 0.0, n)
        h, w = inside.shape
        image[y0:y0 + h, x0:x0 + w][inside] = np.rint(colour).astype(np.uint8)
        clutter[y0:y0 + h, x0:x0 + w] |= inside


def _blend_edges(image: np.ndarray, p: "_Placed", fill: np.ndarray) -> None:
    """Blend the fill of object ``p`` into image [H, W, 3] uint8 by its 2 x 2 supersampled
    coverage (the object's exact pixels are painted afterwards; this sets its soft rim)."""
    n = image.shape[0]
    cover = np.zeros((n, n), np.float32)
    for dy in (-0.25, 0.25):
        for dx in (-0.25, 0.25):
            cover += shape_mask(p.shape, (p.cy - dy, p.cx - dx), p.radius, n, p.rotation)
    cover *= np.float32(0.25)
    rim = cover > 0
    a = cover[rim][:, None]
    blended = image[rim].astype(np.float32) * (1.0 - a) + fill.astype(np.float32) * a
    image[rim] = np.rint(blended).astype(np.uint8)


_COLOUR_U8 = {name: (np.array(fill, np.uint8), np.array(shade, np.uint8))
              for name, (fill, shade) in COLOURS.items()}
