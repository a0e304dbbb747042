"""The closed vocabulary of ShapesWorld, its background tones and the contrast rule, shape extents and split seeds."""

from __future__ import annotations

import colorsys
import functools
import math
from collections.abc import Sequence

import numpy as np


# Bump when make_example's output for a given (seed, config) changes; the TFDS builder's version
# follows it, so data written by an older generator is never silently mixed with new data.
GENERATOR_VERSION = "2.1.0"


SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")


# name -> (fill RGB, texture RGB). Fills are saturated and far apart; texture colours are darker
# shades of the same hue (white's is a light grey) so a textured object keeps its colour identity,
# and every one of them stays far from the desaturated, dark backgrounds and the grey clutter.
COLOURS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "red": ((225, 35, 35), (140, 20, 20)),
    "green": ((40, 180, 60), (20, 105, 30)),
    "blue": ((45, 95, 245), (25, 50, 150)),
    "yellow": ((245, 220, 35), (160, 140, 20)),
    "purple": ((160, 55, 210), (95, 30, 130)),
    # Pink rather than orange: every colour then starts with a consonant, so the article is
    # always "a" and never depends on the next word.
    "pink": ((250, 110, 190), (165, 60, 120)),
    "white": ((242, 242, 242), (185, 185, 185)),
    "cyan": ((30, 215, 225), (15, 130, 140)),
}


COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)


SIZE_WORDS: tuple[str, ...] = ("small", "large")


RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "above": ("above",),
    "below": ("below",),
    "left of": ("left", "of"),
    "right of": ("right", "of"),
}


FUNCTION_WORDS: tuple[str, ...] = ("a", "and")


RELATION_WORDS: tuple[str, ...] = ("above", "below", "left", "right", "of")


TEXTURES: tuple[str, ...] = ("stripes", "dots")


BACKGROUNDS: tuple[str, ...] = ("solid", "gradient")


# Background tones, each a box in HSV (hue is always free): (s_min, s_span, v_min, v_span).
TONES: dict[str, tuple[float, float, float, float]] = {
    "dark": (0.0, 0.3, 0.08, 0.34),     # dark, desaturated: night, slides, dark mode
    "mid": (0.0, 0.15, 0.42, 0.2),      # mid greys
    "light": (0.0, 0.25, 0.72, 0.18),   # light greys and pastels: paper, screens
    "white": (0.0, 0.05, 0.92, 0.08),   # white and near-white: clip-art, drawings
    "vivid": (0.45, 0.4, 0.45, 0.5),    # saturated colours
}


TONE_NAMES: tuple[str, ...] = tuple(TONES)


# The contrast rule: an object colour may be drawn on a background only if its fill lies at
# least this far (Euclidean distance in RGB, 0..255 per channel) from every colour of the
# background before noise, i.e. from the segment between a gradient's two end colours. A colour
# word therefore always names something visibly different from its surroundings (no white object
# on a white page).
MIN_CONTRAST: float = 90.0


# Grey of the bars that letterboxing paints: the processor's pad colour for image_mean = 0.5.
LETTERBOX_FILL: int = 127


def _segment_distance(point: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> float:
    """Euclidean distance from ``point`` [3] to the RGB segment from c0 [3] to c1 [3]."""
    d = c1 - c0
    length2 = float(d @ d)
    t = 0.0 if length2 == 0.0 else min(1.0, max(0.0, float((point - c0) @ d) / length2))
    return float(np.linalg.norm(point - (c0 + t * d)))


def allowed_colours(c0: Sequence[float], c1: Sequence[float],
                    colours: Sequence[str] = None) -> tuple[str, ...]:
    """The colour names that satisfy the contrast rule on a background ramping from c0 to c1.

    Args:
      c0, c1: [3] RGB (0..255) end colours of the background (equal for a solid one).
      colours: candidate names (default: every colour).
    Returns:
      the names, in the given order, whose fill lies at least MIN_CONTRAST from every colour of
      the segment c0 -> c1.
    """
    a, b = np.asarray(c0, np.float64), np.asarray(c1, np.float64)
    names = COLOUR_NAMES if colours is None else tuple(colours)
    return tuple(n for n in names
                 if _segment_distance(np.asarray(COLOURS[n][0], np.float64), a, b) >= MIN_CONTRAST)


def _tone_colour(tone: str, h: float, s_u: float, v_u: float) -> np.ndarray:
    """[3] float32 RGB of the tone's box at hue h and unit coordinates (s_u, v_u) in [0, 1]."""
    s_min, s_span, v_min, v_span = TONES[tone]
    rgb = colorsys.hsv_to_rgb(h, s_min + s_span * s_u, v_min + v_span * v_u)
    return 255.0 * np.array(rgb, np.float32)


@functools.lru_cache(maxsize=None)
def _tone_probes(tone: str) -> tuple[np.ndarray, ...]:
    """A dense grid of the tone's colours (24 hues x 3 x 3 over saturation and value), on which
    config validation checks the contrast rule."""
    return tuple(_tone_colour(tone, h / 24.0, su, vu)
                 for h in range(24) for su in (0.0, 0.5, 1.0) for vu in (0.0, 0.5, 1.0))


SPLITS: tuple[str, ...] = ("train", "validation", "test")


WORD_CLASSES: tuple[str, ...] = ("colour", "shape", "size", "relation", "function")


# Every word any ShapesWorld caption can contain, in a fixed order (tokenizers are built from it).
VOCABULARY: tuple[str, ...] = (
    FUNCTION_WORDS + RELATION_WORDS + SIZE_WORDS + COLOUR_NAMES + SHAPES
)


WORD_CLASS: dict[str, str] = {
    **{w: "function" for w in FUNCTION_WORDS},
    **{w: "relation" for w in RELATION_WORDS},
    **{w: "size" for w in SIZE_WORDS},
    **{w: "colour" for w in COLOUR_NAMES},
    **{w: "shape" for w in SHAPES},
}


# Outline radius / nominal radius, i.e. how far each shape reaches from its centre.
SHAPE_EXTENT: dict[str, float] = {
    "circle": 1.0,
    "square": 0.88 * math.sqrt(2.0),
    "triangle": math.hypot(1.0, 0.8),
    "diamond": 1.05,
    "cross": math.hypot(1.0, 0.34),
    "star": 1.05,
}


# Radius of the largest disc around the centre inside each shape / nominal radius; two shapes
# whose such discs meet certainly overlap, which rejects crowded placements before rasterising.
SHAPE_INSCRIBED: dict[str, float] = {
    "circle": 1.0,
    "square": 0.88,
    "diamond": 1.05 / math.sqrt(2.0),
    "triangle": 1.0 / math.hypot(1.8, 1.0),
    "cross": 0.34,
    "star": 0.41,
}


# Seeds: split k owns [k * 2**40, (k + 1) * 2**40).
SPLIT_SIZE: int = 1 << 40


_SPLIT_OFFSET = {name: k * SPLIT_SIZE for k, name in enumerate(SPLITS)}


_STAR_OUTER, _STAR_INNER = 1.05, 0.48


def vocabulary() -> tuple[str, ...]:
    """Every word a ShapesWorld caption can contain (lower case, fixed order).

    Returns:
      words: tuple[str] of length len(VOCABULARY); use ``WORD_CLASS[w]`` for a word's class.
    """
    return VOCABULARY


def word_class(word: str) -> str:
    """The class of a caption word: 'colour', 'shape', 'size', 'relation' or 'function'."""
    if word not in WORD_CLASS:
        raise ValueError(
            f"word {word!r} is not in the ShapesWorld vocabulary; expected one of {VOCABULARY}."
        )
    return WORD_CLASS[word]
