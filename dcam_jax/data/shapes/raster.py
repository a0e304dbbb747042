"""Exact rasterisation of the shapes (pixel-centre membership), their textures, and cached pixel grids."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Optional

import numpy as np

from dcam_jax.data.shapes.vocab import SHAPES, SHAPE_EXTENT, TEXTURES, _STAR_INNER, _STAR_OUTER


def _unit_polygon(shape: str) -> Optional[np.ndarray]:
    """[V, 2] (u, v) vertices in radius units (v points down), None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        s = 0.88
        return np.array([(-s, -s), (s, -s), (s, s), (-s, s)])
    if shape == "diamond":
        d = 1.05
        return np.array([(0, -d), (d, 0), (0, d), (-d, 0)])
    if shape == "triangle":
        return np.array([(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)])
    if shape == "cross":
        a, w = 1.0, 0.34
        return np.array([
            (-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w),
            (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w),
        ])
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, _STAR_OUTER, _STAR_INNER)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}.")


def shape_polygon(
    shape: str, centre_yx: Sequence[float], radius: float, rotation_deg: float = 0.0
) -> Optional[np.ndarray]:
    """The outline of a polygonal shape in image coordinates (None for 'circle').

    Args:
      shape: one of SHAPES.
      centre_yx: (y, x) centre in continuous pixel coordinates.
      radius: nominal radius in pixels.
      rotation_deg: clockwise rotation on screen, in degrees.
    Returns:
      vertices: [V, 2] float64 (y, x), in order around the outline.
    """
    uv = _unit_polygon(shape)
    if uv is None:
        return None
    t = math.radians(rotation_deg)
    c, s = math.cos(t), math.sin(t)
    x = radius * (c * uv[:, 0] - s * uv[:, 1]) + centre_yx[1]
    y = radius * (s * uv[:, 0] + c * uv[:, 1]) + centre_yx[0]
    return np.stack([y, x], axis=1)


@functools.lru_cache(maxsize=16)
def _pixel_centres(size: int) -> np.ndarray:
    """[size] float32 pixel-centre coordinates 0.5, 1.5, ... (read-only, cached)."""
    out = np.arange(size, dtype=np.float32) + np.float32(0.5)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=16)
def _grain_pool(size: int) -> np.ndarray:
    """[2 size, 6 size] float32 uniform(-0.35, 0.35) grain from a fixed seed (read-only, cached)."""
    out = np.random.default_rng(20240607).uniform(-0.35, 0.35, (2 * size, 6 * size))
    out = out.astype(np.float32)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=16)
def _upsample_matrices(size: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear upsampling of a [grid, grid] array to [size, size * 3] (channels interleaved).

    Returns (rows [size, grid], cols [grid, size * 3]) float32, read-only and cached, so that
    ``rows @ coarse @ cols`` is the upsampled array repeated on the three channels.
    """
    pos = (np.arange(size, dtype=np.float32) + 0.5) * (grid - 1) / size
    lo = np.minimum(pos.astype(np.int64), grid - 2)
    frac = pos - lo
    rows = np.zeros((size, grid), np.float32)
    rows[np.arange(size), lo] = 1.0 - frac
    rows[np.arange(size), lo + 1] = frac
    cols = np.ascontiguousarray(np.repeat(rows, 3, axis=0).T)
    rows.flags.writeable = False
    cols.flags.writeable = False
    return rows, cols


def _shape_window(
    shape: str, cy: float, cx: float, radius: float, rotation_deg: float, size: int
) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """Rasterise one shape inside its bounding window.

    Returns (y0, x0, inside [h, w] bool, u, v) where u, v are the pixel-centre offsets in the
    shape's own rotated frame, in pixels ([h, w] when rotated, else [1, w] and [h, 1]).
    """
    reach = SHAPE_EXTENT[shape] * radius
    y0, y1 = max(0, int(cy - reach)), min(size, int(math.ceil(cy + reach)) + 1)
    x0, x1 = max(0, int(cx - reach)), min(size, int(math.ceil(cx + reach)) + 1)
    centres = _pixel_centres(size)
    dy = (centres[y0:y1] - np.float32(cy))[:, None]
    dx = (centres[x0:x1] - np.float32(cx))[None, :]
    if rotation_deg:
        t = math.radians(rotation_deg)
        c, s = np.float32(math.cos(t)), np.float32(math.sin(t))
        u, v = c * dx + s * dy, c * dy - s * dx
    else:
        u, v = dx, dy
    au, av = np.abs(u), np.abs(v)
    r = np.float32(radius)
    if shape == "circle":
        inside = u * u + v * v <= r * r
    elif shape == "square":
        inside = np.maximum(au, av) <= np.float32(0.88) * r
    elif shape == "diamond":
        inside = au + av <= np.float32(1.05) * r
    elif shape == "triangle":
        # Apex (0, -r), base corners (+-r, 0.8 r): above the base and inside both slanted edges.
        inside = (v <= np.float32(0.8) * r) & (np.float32(1.8) * au - v <= r)
    elif shape == "cross":
        inside = (np.maximum(au, av) <= r) & (np.minimum(au, av) <= np.float32(0.34) * r)
    elif shape == "star":
        # Fold the angle into one of the ten mirror-symmetric wedges [0, 36 deg] measured from an
        # outer point; there the star is the triangle (centre, outer point, inner point).
        rho = np.sqrt(u * u + v * v)
        phi = np.arctan2(u, -v)  # 0 at the top point
        step = np.float32(2.0 * np.pi / 5.0)
        phi = np.abs(np.mod(phi + step / 2, step) - step / 2)
        p, q = rho * np.cos(phi), rho * np.sin(phi)
        half = math.pi / 5.0
        ox = _STAR_OUTER * radius
        ix, iy = _STAR_INNER * radius * math.cos(half), _STAR_INNER * radius * math.sin(half)
        # Inside iff (p, q) lies on the origin's side of the edge (ox, 0) -> (ix, iy).
        inside = np.float32(ix - ox) * q - np.float32(iy) * (p - np.float32(ox)) >= 0
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}.")
    return y0, x0, inside, u, v


def shape_mask(
    shape: str,
    centre_yx: Sequence[float],
    radius: float,
    image_size: int,
    rotation_deg: float = 0.0,
) -> np.ndarray:
    """Exact (anti-aliasing-free) mask of one shape: pixels whose centre lies inside the outline.

    Args:
      shape: one of SHAPES.
      centre_yx: (y, x) centre in continuous pixel coordinates.
      radius: nominal radius in pixels (> 0).
      image_size: side H = W of the output.
      rotation_deg: rotation in degrees (as in shape_polygon).
    Returns:
      mask: [H, W] bool.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}.")
    if not radius > 0:
        raise ValueError(f"radius={radius!r} must be positive (pixels).")
    out = np.zeros((image_size, image_size), bool)
    y0, x0, inside, _, _ = _shape_window(
        shape, float(centre_yx[0]), float(centre_yx[1]), float(radius), float(rotation_deg),
        image_size,
    )
    out[y0:y0 + inside.shape[0], x0:x0 + inside.shape[1]] = inside
    return out


def _texture_window(kind: str, u: np.ndarray, v: np.ndarray, radius: float, phase: float,
                    orientation: int) -> np.ndarray:
    """[h, w] bool: texture pixels in the shape's frame (stripes or a dot grid), about 1/3 cover."""
    period = np.float32(max(3.0, 0.55 * radius))
    phase = np.float32(phase)
    if kind == "stripes":
        # May come out [1, w] or [h, 1] for unrotated shapes; the caller broadcasts it.
        t = (u, v, (u + v) * np.float32(0.70710678), (u - v) * np.float32(0.70710678))[orientation]
        return np.mod(t / period + phase, np.float32(1.0)) < np.float32(1.0 / 3.0)
    if kind == "dots":
        a = np.mod(u / period + phase, np.float32(1.0)) - np.float32(0.5)
        b = np.mod(v / period + phase, np.float32(1.0)) - np.float32(0.5)
        return a * a + b * b <= np.float32(0.1)
    raise ValueError(f"unknown texture {kind!r}; expected one of {TEXTURES}.")
