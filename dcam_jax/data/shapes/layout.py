"""Object placement under the occlusion and gap limits, and the check that relation words are never a coin flip."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import numpy as np

from dcam_jax.data.shapes.vocab import SHAPE_EXTENT, SHAPE_INSCRIBED
from dcam_jax.data.shapes.config import ShapesConfig
from dcam_jax.data.shapes.raster import _shape_window, _texture_window


def _mark_dilated(occupied: np.ndarray, y0: int, x0: int, inside: np.ndarray, gap: int) -> None:
    """OR into occupied [H, W] the window mask inside [h, w] at (y0, x0), grown by ``gap`` pixels
    (4-neighbour dilation, repeated)."""
    h, w = inside.shape
    grown = np.zeros((h + 2 * gap, w + 2 * gap), bool)
    grown[gap:gap + h, gap:gap + w] = inside
    for _ in range(gap):
        step = grown.copy()
        step[1:] |= grown[:-1]
        step[:-1] |= grown[1:]
        step[:, 1:] |= grown[:, :-1]
        step[:, :-1] |= grown[:, 1:]
        grown = step
    n_rows, n_cols = occupied.shape
    top, left = y0 - gap, x0 - gap
    r0, c0 = max(0, top), max(0, left)
    r1, c1 = min(n_rows, top + grown.shape[0]), min(n_cols, left + grown.shape[1])
    occupied[r0:r1, c0:c1] |= grown[r0 - top:r1 - top, c0 - left:c1 - left]


@dataclasses.dataclass
class _Placed:
    shape: str
    colour: str
    size: str
    texture: str
    radius: float
    rotation: float
    cy: float
    cx: float
    y0: int
    x0: int
    inside: np.ndarray  # [h, w] bool, the whole shape (before occlusion) in its window
    tex: Optional[np.ndarray]  # [h, w] bool texture pixels within `inside`, None if plain


@functools.lru_cache(maxsize=8)
def _shrink_schedule(tries: int) -> np.ndarray:
    """[tries] float64: fraction of the radius range open to each placement attempt."""
    out = np.minimum(1.0, 2.0 * (1.0 - np.arange(tries) / tries))
    out.flags.writeable = False
    return out


def _place_objects(rng: np.random.Generator, c: ShapesConfig, count: int,
                   colours: tuple[str, ...], box: tuple[int, int, int, int]) -> list[_Placed]:
    """Sample attributes and positions of ``count`` objects in drawing order, honouring the
    occlusion limits (an object that finds no place is dropped). Colours come from ``colours``;
    objects lie inside ``box`` = (top, left, height, width) in pixels.

    One function on purpose: its random draws, in this order, define the splits."""
    n = c.image_size
    top, left, box_h, box_w = box
    # Few, batched draws: each Generator call costs more than the numbers it returns.
    shape_idx = (rng.permutation(len(c.shapes))[:count] if c.distinct_shapes
                 else (rng.random(count) * len(c.shapes)).astype(np.int64))
    colour_idx = (rng.permutation(len(colours))[:count] if c.distinct_colours
                  else (rng.random(count) * len(colours)).astype(np.int64))
    draws = rng.random((count, 6))
    size_big = (draws[:, 0] < 0.5).tolist()
    rotations = ((2.0 * draws[:, 1] - 1.0) * c.max_rotation_deg).tolist()
    textured = (draws[:, 2] < c.texture_prob).tolist()
    texture_kind = (draws[:, 3] * len(c.textures)).astype(np.int64).tolist()
    tex_phase = draws[:, 4].tolist()
    tex_orient = (draws[:, 5] * 4).astype(np.int64).tolist()
    # Radii are fractions of the scene's short side: a letterboxed scene is a whole scene shrunk
    # into its band, as the processor's pad layout shrinks a non-square picture.
    side = min(box_h, box_w)
    r_lo, r_hi = c.radius_range[0] * side, c.radius_range[1] * side
    tries = c.max_placement_tries
    # Later attempts favour smaller radii so that crowded layouts still fit.
    shrink = _shrink_schedule(tries)
    placed: list[_Placed] = []
    visible: list[np.ndarray] = []  # [H, W] bool current visible pixels of each placed object
    areas: list[int] = []  # full pixel count of each placed object
    visible_count: list[int] = []
    occupied = np.zeros((n, n), bool)  # dilated union of full masks (no-occlusion mode)
    for k in range(count):
        shape = c.shapes[int(shape_idx[k])]
        if c.size_words:
            span = 0.4 * (r_hi - r_lo)
            lo, hi = (r_hi - span, r_hi) if size_big[k] else (r_lo, r_lo + span)
        else:
            lo, hi = r_lo, r_hi
        rotation = rotations[k]
        block = rng.random((tries, 3))
        radii = lo + (hi - lo) * shrink * block[:, 0]
        # A letterbox band may be narrower than the largest radius allows: shrink to fit it.
        radii = np.minimum(radii, 0.48 * min(box_h, box_w) / SHAPE_EXTENT[shape])
        reach = SHAPE_EXTENT[shape] * radii
        centres = (np.array([top, left], np.float64)[None, :] + reach[:, None]
                   + (np.array([box_h, box_w], np.float64)[None, :] - 2.0 * reach[:, None])
                   * block[:, 1:])
        candidates = np.arange(tries)
        if placed:
            # Centres too close make the relation words meaningless; without occlusion, touching
            # inscribed discs mean a certain overlap. Drop those candidates before rasterising.
            prev = np.array([(p.cy, p.cx, p.radius, SHAPE_INSCRIBED[p.shape]) for p in placed])
            dist = np.hypot(centres[:, None, 0] - prev[None, :, 0],
                            centres[:, None, 1] - prev[None, :, 1])
            limit = 0.5 * (prev[None, :, 2] + radii[:, None])
            if not c.occlusion:
                limit = np.maximum(limit, prev[None, :, 2] * prev[None, :, 3]
                                   + SHAPE_INSCRIBED[shape] * radii[:, None] + c.min_gap)
            candidates = candidates[(dist >= limit).all(axis=1)]
        for attempt in candidates.tolist():
            radius = float(radii[attempt])
            cy, cx = centres[attempt].tolist()
            y0, x0, inside, u, v = _shape_window(shape, cy, cx, radius, rotation, n)
            h, w = inside.shape
            window = (slice(y0, y0 + h), slice(x0, x0 + w))
            if not c.occlusion:
                if (occupied[window] & inside).any():
                    continue
            elif any(
                visible_count[j] - np.count_nonzero(visible[j][window] & inside)
                < (1.0 - c.max_occlusion) * areas[j]
                for j in range(len(placed))
            ):
                continue
            tex = None
            texture = "plain"
            if textured[k]:
                texture = c.textures[int(texture_kind[k])]
                tex = inside & _texture_window(texture, u, v, radius, tex_phase[k], tex_orient[k])
            if c.occlusion:
                for j in range(len(placed)):
                    vis = visible[j][window]
                    vis &= ~inside
                    visible_count[j] = int(np.count_nonzero(visible[j]))
                full = np.zeros((n, n), bool)
                full[window] = inside
                visible.append(full)
            area = int(np.count_nonzero(inside))
            areas.append(area)
            visible_count.append(area)
            if not c.occlusion:
                _mark_dilated(occupied, y0, x0, inside, c.min_gap)
            big = size_big[k] if c.size_words else radius > 0.5 * (r_lo + r_hi)
            placed.append(_Placed(
                shape, colours[int(colour_idx[k])], "large" if big else "small", texture,
                radius, rotation, cy, cx, y0, x0, inside, tex,
            ))
            break
    return placed


LAYOUT_TRIES = 20


def _relations_clear(placed: list[_Placed], order: list[int], c: ShapesConfig) -> bool:
    """Whether every pair the caption relates is at least relation_margin_deg off a diagonal."""
    if not c.relations or c.relation_margin_deg <= 0:
        return True
    for i in range(0, len(order) - 1, 2):
        a, b = placed[order[i]], placed[order[i + 1]]
        angle = math.degrees(math.atan2(abs(b.cy - a.cy), abs(b.cx - a.cx)))  # 0..90
        if abs(angle - 45.0) < c.relation_margin_deg:
            return False
    return True
