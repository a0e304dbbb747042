"""ShapesWorld: a procedural, exactly-labelled image-caption world (SPEC section 7).

Every example is a small RGB image with 1 to 4 flat-coloured objects (shape x colour x size),
drawn without anti-aliasing so that each object's mask is exactly the set of pixels painted with
its colours, a caption that names every object from a small closed vocabulary, and the alignment
from caption words to objects. Everything is a pure function of ``(seed, config)``.

Geometry conventions
--------------------
* Pixel ``(row i, col j)`` covers ``[i, i+1) x [j, j+1)`` in continuous image coordinates; shape
  membership is decided at the pixel centre ``(i + 0.5, j + 0.5)``.
* Points and centres are ``(y, x)`` = (row, column) in those continuous coordinates.
* An object is drawn around its ``centre`` with a nominal ``radius`` r (the circle's radius; the
  other shapes are scaled to look about as large). Its outline fits in a disc of radius
  ``SHAPE_EXTENT[shape] * r`` around the centre, and objects are placed fully inside the image.

Caption grammar (deterministic)
-------------------------------
Objects are listed in *caption order*: left to right by centre x (ties: top to bottom), or a
seeded random order when ``config.caption_order == "random"``. Object index k everywhere
(masks, label map value k+1, attributes) is the k-th object of the caption. Each object is named
``a [size] colour shape``. With ``relations=True`` objects are grouped in consecutive pairs
(0, 1), (2, 3); a pair is joined by the relation of its first object to its second, a lone last
object stands alone, and groups are joined by ``and``::

    a red circle
    a red circle above a blue square
    a green triangle left of a yellow star and a white cross
    a green triangle left of a yellow star and a white cross below a blue diamond

The relation of object i to object j uses centres: if ``|dy| > |dx|`` it is ``above`` (i has the
smaller y) or ``below``, otherwise ``left of`` (i has the smaller x) or ``right of``. With the
default left-to-right order ``right of`` cannot occur; the random order produces it. Layouts with
a related pair near a diagonal (``config.relation_margin_deg``) are redrawn, so that the relation
word is never a coin flip between two apt ones.

Word classes (for evaluation): colour, shape and size words name one object; ``above``,
``below``, ``left``, ``right`` and ``of`` are ``relation`` words (``of`` is a preposition, which
TAM's Func-IoU does not count as a function word); ``a`` and ``and`` are ``function`` words.

Splits
------
``split_seed(split, index)`` maps each split to its own disjoint range of 2**40 seeds, so the
train, validation and test splits can never share an example seed.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import io
import math
from collections.abc import Iterator, Sequence
from typing import Optional

import numpy as np

# Bump when make_example's output for a given (seed, config) changes; the TFDS builder's version
# follows it, so data written by an older generator is never silently mixed with new data.
GENERATOR_VERSION = "2.0.0"

# ----------------------------------------------------------------------------------------------
# Closed vocabulary
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """Every switch and range of ShapesWorld. Use ``preset(name)`` for curated settings.

    Attributes:
      image_size: side of the square image in pixels, 16..512 (64 to 128 intended).
      min_objects, max_objects: number of objects drawn uniformly from this range (1..4 intended;
        at most 8). A layout that cannot place an object after ``max_placement_tries`` drops it.
      shapes: the shapes to draw from (subset of SHAPES).
      colours: the colours to draw from (subset of COLOUR_NAMES).
      radius_range: (min, max) object radius as a fraction of image_size (0.15 at 64 px = 9.6 px).
      size_words: name each object's size ('small'/'large') in the caption; radii are then drawn
        from the lower or upper 40% of radius_range so the two sizes never touch.
      distinct_colours / distinct_shapes: no two objects of an image share a colour / a shape, so
        that every colour and shape word identifies exactly one object whatever the word order.
      max_rotation_deg: each object is rotated by U(-a, a) degrees (keep below 22.5 so a square
        never becomes a diamond).
      backgrounds: background kinds to draw from ('solid', 'gradient').
      tones: background tones to draw from (TONE_NAMES: 'dark', 'mid', 'light', 'white',
        'vivid'), uniformly. Object colours obey the contrast rule (MIN_CONTRAST): an image only
        draws the colours whose fill is far from every background colour.
      noise_amplitude: peak amplitude (0..40 grey levels) of a smooth low-contrast noise texture
        added to the background with probability noise_prob; 0 disables it.
      texture_prob: probability that an object gets a texture (stripes or dots in its darker shade).
      textures: texture kinds to draw from (subset of TEXTURES).
      clutter_range: (min, max) number of small grey distractor blobs (radius 1.5..3.5% of the
        image), drawn under the objects, never named in the caption.
      occlusion: objects may overlap (a later object hides an earlier one); masks are the visible
        pixels. Without occlusion objects keep at least ``min_gap`` pixels apart.
      max_occlusion: the largest fraction of an object's pixels later objects may hide.
      min_gap: minimum gap in pixels between objects when occlusion is off.
      caption_order: 'left_to_right' (by centre x, then y) or 'random' (seeded).
      relations: join object pairs with relation words; otherwise only with 'and'.
      relation_margin_deg: layouts where a related pair's centres lie within this many degrees
        of a diagonal (where 'left of' and 'above' are equally apt) are drawn again, up to
        LAYOUT_TRIES times; 0 keeps every layout.
      max_placement_tries: placement attempts per object before it is dropped.
      antialias_prob: probability that an image's objects get anti-aliased edges (each edge
        pixel blends fill and background by its 2 x 2 supersampled coverage). Masks stay the
        exact pixel-centre masks.
      blur_prob: probability of a Gaussian blur of the finished image (sigma 0.3 to 0.8 px).
      jpeg_prob: probability that the finished image goes through JPEG (quality 35 to 90).
      letterbox_prob: probability that the scene covers only a centred band of the image (55%
        to 90% of one side, objects placed inside it) and the rest is LETTERBOX_FILL grey: what
        the processor's pad layout makes of a non-square picture.
    """

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = COLOUR_NAMES
    radius_range: tuple[float, float] = (0.14, 0.2)
    size_words: bool = False
    distinct_colours: bool = True
    distinct_shapes: bool = True
    max_rotation_deg: float = 0.0
    backgrounds: tuple[str, ...] = BACKGROUNDS
    tones: tuple[str, ...] = TONE_NAMES
    noise_amplitude: float = 6.0
    noise_prob: float = 0.5
    texture_prob: float = 0.2
    textures: tuple[str, ...] = TEXTURES
    clutter_range: tuple[int, int] = (0, 3)
    occlusion: bool = True
    max_occlusion: float = 0.25
    min_gap: int = 1
    caption_order: str = "left_to_right"
    relations: bool = True
    relation_margin_deg: float = 10.0
    max_placement_tries: int = 150
    antialias_prob: float = 0.5
    blur_prob: float = 0.2
    jpeg_prob: float = 0.25
    letterbox_prob: float = 0.2

    def __post_init__(self):
        _validate_config(self)

    def replace(self, **changes) -> "ShapesConfig":
        """A copy with the given fields changed (validated)."""
        return dataclasses.replace(self, **changes)


def _validate_config(c: ShapesConfig) -> None:
    def bad(field: str, value, expected: str):
        raise ValueError(f"ShapesConfig.{field}={value!r} is invalid: expected {expected}.")

    if not isinstance(c.image_size, (int, np.integer)) or not 16 <= c.image_size <= 512:
        bad("image_size", c.image_size, "an int in [16, 512] (64 to 128 is the intended range)")
    if not isinstance(c.max_objects, (int, np.integer)) or not 1 <= c.max_objects <= 8:
        bad("max_objects", c.max_objects, "an int in [1, 8]")
    if not isinstance(c.min_objects, (int, np.integer)) or not 1 <= c.min_objects <= c.max_objects:
        bad("min_objects", c.min_objects, f"an int in [1, max_objects={c.max_objects}]")
    for field, values, allowed in (
        ("shapes", c.shapes, SHAPES),
        ("colours", c.colours, COLOUR_NAMES),
        ("backgrounds", c.backgrounds, BACKGROUNDS),
        ("tones", c.tones, TONE_NAMES),
        ("textures", c.textures, TEXTURES),
    ):
        if not isinstance(values, tuple) or not values:
            bad(field, values, f"a non-empty tuple of names from {allowed}")
        unknown = [v for v in values if v not in allowed]
        if unknown:
            bad(field, values, f"names from {allowed}; unknown: {unknown}")
        if len(set(values)) != len(values):
            bad(field, values, "names without repeats")
    if c.distinct_shapes and len(c.shapes) < c.max_objects:
        bad("shapes", c.shapes, f"at least max_objects={c.max_objects} shapes when "
            "distinct_shapes=True (add shapes, lower max_objects or set distinct_shapes=False)")
    if c.distinct_colours and len(c.colours) < c.max_objects:
        bad("colours", c.colours, f"at least max_objects={c.max_objects} colours when "
            "distinct_colours=True (add colours, lower max_objects or set distinct_colours=False)")
    lo, hi = _pair(c.radius_range, "radius_range")
    reach = max(SHAPE_EXTENT[s] for s in c.shapes)
    if not 0.0 < lo <= hi <= 0.48 / reach:
        bad("radius_range", c.radius_range, f"(min, max) fractions with 0 < min <= max <= "
            f"{0.48 / reach:.3f}, so that the largest of {c.shapes} fits in the image")
    if lo * c.image_size < 3.0:
        bad("radius_range", c.radius_range, f"a minimum radius of at least 3 px at image_size="
            f"{c.image_size} (min fraction >= {3.0 / c.image_size:.3f}) so shapes stay "
            "recognisable")
    if not 0.0 <= c.max_rotation_deg <= 22.5:
        bad("max_rotation_deg", c.max_rotation_deg, "a value in [0, 22.5] degrees")
    if not 0.0 <= c.noise_amplitude <= 40.0:
        bad("noise_amplitude", c.noise_amplitude, "a value in [0, 40] grey levels")
    for field in ("noise_prob", "texture_prob", "antialias_prob", "blur_prob", "jpeg_prob",
                  "letterbox_prob"):
        v = getattr(c, field)
        if not 0.0 <= v <= 1.0:
            bad(field, v, "a probability in [0, 1]")
    _pair(c.clutter_range, "clutter_range")
    clo, chi = c.clutter_range
    if not (all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (clo, chi))
            and 0 <= clo <= chi <= 64):
        bad("clutter_range", c.clutter_range, "(min, max) ints with 0 <= min <= max <= 64")
    if not 0.0 <= c.max_occlusion <= 0.9:
        bad("max_occlusion", c.max_occlusion, "a fraction in [0, 0.9]")
    if not isinstance(c.min_gap, (int, np.integer)) or not 0 <= c.min_gap <= 8:
        bad("min_gap", c.min_gap, "an int in [0, 8] pixels")
    if not 0.0 <= c.relation_margin_deg <= 20.0:
        bad("relation_margin_deg", c.relation_margin_deg, "a value in [0, 20] degrees")
    if c.caption_order not in ("left_to_right", "random"):
        bad("caption_order", c.caption_order, "'left_to_right' or 'random'")
    if not isinstance(c.max_placement_tries, (int, np.integer)) or c.max_placement_tries < 1:
        bad("max_placement_tries", c.max_placement_tries, "an int >= 1")
    for field in ("size_words", "distinct_colours", "distinct_shapes", "occlusion", "relations"):
        if not isinstance(getattr(c, field), bool):
            bad(field, getattr(c, field), "a bool")
    needed = c.max_objects if c.distinct_colours else 1
    for tone in c.tones:
        fewest = min(len(allowed_colours(probe, probe, c.colours)) for probe in _tone_probes(tone))
        if fewest < needed:
            bad("colours", c.colours, f"colours that satisfy the contrast rule on the {tone!r} "
                f"background tone: on its worst background only {fewest} of them lie "
                f"{MIN_CONTRAST:.0f} or more from the background, and an image needs {needed} "
                "(add colours, drop the tone, lower max_objects or set distinct_colours=False)")


def _pair(value, field: str) -> tuple[float, float]:
    if not isinstance(value, tuple) or len(value) != 2:
        raise ValueError(f"ShapesConfig.{field}={value!r} is invalid: expected a (min, max) tuple.")
    return float(value[0]), float(value[1])


# Scenes without rendering variety: hard edges, no blur, no compression, no letterbox.
_CRISP = dict(antialias_prob=0.0, blur_prob=0.0, jpeg_prob=0.0, letterbox_prob=0.0)

PRESETS: dict[str, ShapesConfig] = {
    # One large object on a plain background of any tone: curricula and tower pretraining.
    "easy": ShapesConfig(
        min_objects=1, max_objects=1, radius_range=(0.24, 0.34), backgrounds=("solid",),
        noise_amplitude=0.0, texture_prob=0.0, clutter_range=(0, 0), occlusion=False, **_CRISP,
    ),
    # Several objects on any tone, no other nuisances: the step between easy and default.
    "simple": ShapesConfig(
        radius_range=(0.15, 0.2), backgrounds=("solid",), noise_amplitude=0.0,
        texture_prob=0.0, clutter_range=(0, 0), occlusion=False, **_CRISP,
    ),
    # Every background tone, and the rendering variety other programs produce.
    "default": ShapesConfig(),
    # The default scenes on dark backgrounds only, with hard edges and no resampling.
    "dark": ShapesConfig(tones=("dark",), **_CRISP),
    # Every nuisance on: smaller objects, rotation, heavier occlusion, repeats, random order.
    "hard": ShapesConfig(
        radius_range=(0.1, 0.2), size_words=True, distinct_colours=False, distinct_shapes=False,
        max_rotation_deg=15.0, noise_amplitude=12.0, noise_prob=0.8, texture_prob=0.5,
        clutter_range=(2, 6), max_occlusion=0.4, caption_order="random", relation_margin_deg=5.0,
    ),
}


def preset(name: str, **overrides) -> ShapesConfig:
    """A named ShapesConfig ('easy', 'simple', 'default', 'dark', 'hard') with optional field
    overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown ShapesWorld preset {name!r}; expected one of {tuple(PRESETS)}.")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


# ----------------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One ShapesWorld example. N = number of objects, in caption order; H = W = image_size.

    Attributes:
      seed: the seed it was made from.
      image: [H, W, 3] uint8.
      caption: the caption, words separated by single spaces.
      words: tuple of the caption's words.
      word_object: per word, the index of the object it names (colour, shape, size words) or None.
      word_class: per word, 'colour' | 'shape' | 'size' | 'relation' | 'function'.
      masks: [N, H, W] bool, the visible (painted, not occluded) pixels of each object.
      label_map: [H, W] uint8, 0 = background or clutter, k + 1 = object k.
      clutter_mask: [H, W] bool, visible clutter pixels.
      shapes, colours, textures: per-object names ('plain' = no texture).
      sizes: per object 'small' or 'large' (radius below / above the middle of radius_range).
      radii: [N] float32 radius in pixels.
      rotations: [N] float32 rotation in degrees.
      centres_yx: [N, 2] float32 shape centre (y, x) in continuous pixel coordinates.
      bboxes: [N, 4] int32 (y0, x0, y1, x1) of the visible mask, end exclusive.
      z_order: [N] int32 drawing rank (0 = drawn first, hidden by higher ranks).
      relations: tuple of (i, relation, j) for the pairs the caption relates.
      background: the background kind ('solid' or 'gradient').
      tone: the background tone (one of TONE_NAMES).
      letterbox: (top, left, height, width) of the scene's band when the rest of the image is
        letterbox grey, else None.
      antialiased: whether object edges were blended by their coverage (masks stay exact).
      config: the ShapesConfig it was made with.
    """

    seed: int
    image: np.ndarray
    caption: str
    words: tuple[str, ...]
    word_object: tuple[Optional[int], ...]
    word_class: tuple[str, ...]
    masks: np.ndarray
    label_map: np.ndarray
    clutter_mask: np.ndarray
    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    sizes: tuple[str, ...]
    textures: tuple[str, ...]
    radii: np.ndarray
    rotations: np.ndarray
    centres_yx: np.ndarray
    bboxes: np.ndarray
    z_order: np.ndarray
    relations: tuple[tuple[int, str, int], ...]
    background: str
    tone: str
    letterbox: Optional[tuple[int, int, int, int]]
    antialiased: bool
    config: ShapesConfig

    @property
    def num_objects(self) -> int:
        return len(self.shapes)

    def word_object_array(self) -> np.ndarray:
        """[num_words] int32: the object index per word, -1 for words that name no object."""
        return np.array([-1 if k is None else k for k in self.word_object], np.int32)

    def word_mask(self, position: int) -> np.ndarray:
        """[H, W] bool: visible mask of the object named by the word at ``position`` (all False
        for a word that names no object)."""
        if not 0 <= position < len(self.words):
            raise ValueError(
                f"word position {position} is out of range for a caption of "
                f"{len(self.words)} words."
            )
        k = self.word_object[position]
        if k is None:
            return np.zeros(self.label_map.shape, bool)
        return self.masks[k].copy()


def attribute_mask(example: Example, word: str) -> np.ndarray:
    """Union of the visible masks of every object the content word describes.

    Use it to score a *generated* caption: 'red' -> all red objects, 'star' -> all stars.

    Args:
      example: the example.
      word: a colour, shape or size word.
    Returns:
      mask: [H, W] bool (all False when no object has the attribute).
    """
    cls = word_class(word)
    attrs = {"colour": example.colours, "shape": example.shapes, "size": example.sizes}
    if cls not in attrs:
        raise ValueError(
            f"word {word!r} is a {cls} word; attribute_mask needs a colour, shape or size word."
        )
    mask = np.zeros(example.label_map.shape, bool)
    for k, value in enumerate(attrs[cls]):
        if value == word:
            mask |= example.masks[k]
    return mask


def parse_caption(text: str) -> list[tuple[Optional[str], Optional[str], Optional[str]]]:
    """The objects a (possibly generated, possibly malformed) caption names, in order.

    An object phrase is 'a', then optional size, colour and shape words; a phrase missing a colour
    or a shape yields None in that slot. Words outside the vocabulary are ignored.

    Args:
      text: caption text.
    Returns:
      list of (size, colour, shape) per object phrase.
    """
    objects: list[list[Optional[str]]] = []
    current: Optional[list[Optional[str]]] = None
    slot = {"size": 0, "colour": 1, "shape": 2}
    for word in text.lower().split():
        cls = WORD_CLASS.get(word)
        if cls in slot:
            if current is None or current[slot[cls]] is not None:
                current = [None, None, None]
                objects.append(current)
            current[slot[cls]] = word
            if cls == "shape":
                current = None
        elif cls is not None:
            current = None
    return [tuple(o) for o in objects]


def is_well_formed(text: str, size_words: bool = False) -> bool:
    """Whether ``text`` is a sentence of the caption grammar (module docstring): object phrases
    ``a [size] colour shape``, grouped in pairs joined by one relation phrase, groups joined by
    ``and``. Repeated articles, dangling relations and words outside the vocabulary all fail.

    Args:
      text: a caption, words separated by spaces (an empty caption is not well formed).
      size_words: whether object phrases carry a size word.
    Returns:
      True iff the words parse as a caption.
    """
    words = text.lower().split()
    pos = 0

    def phrase() -> bool:
        nonlocal pos
        need = ("function", "size", "colour", "shape") if size_words else ("function", "colour", "shape")
        chunk = words[pos:pos + len(need)]
        if len(chunk) < len(need) or chunk[0] != "a":
            return False
        if tuple(WORD_CLASS.get(w) for w in chunk[1:]) != need[1:]:
            return False
        pos += len(need)
        return True

    def relation() -> bool:
        nonlocal pos
        for phrase_words in RELATION_PHRASES.values():
            if tuple(words[pos:pos + len(phrase_words)]) == phrase_words:
                pos += len(phrase_words)
                return True
        return False

    while True:
        if not phrase():
            return False
        if pos < len(words) and words[pos] != "and":
            if not relation() or not phrase():
                return False
        if pos == len(words):
            return True
        if words[pos] != "and":
            return False
        pos += 1


def match_phrases(colours: Sequence[str], shapes_: Sequence[str],
                  phrases: Sequence[tuple[Optional[str], Optional[str], Optional[str]]]) -> list[int]:
    """One-to-one assignment of true objects to caption phrases that agrees on the most attributes.

    Colour and shape agreements count one each, and a phrase agreeing on both counts two more, so among
    assignments with equally many agreeing words the one with more correctly bound objects wins (Hungarian
    assignment, exact for any number of phrases).

    Args:
      colours, shapes_: [N] the true objects' colour and shape words.
      phrases: [M] (size, colour, shape) per phrase, as :func:`parse_caption` returns.
    Returns:
      [N] index of the phrase assigned to each object, or -1 (more objects than phrases).
    """
    from scipy.optimize import linear_sum_assignment

    if len(colours) != len(shapes_):
        raise ValueError(f"{len(colours)} colours but {len(shapes_)} shapes")
    assign = [-1] * len(colours)
    if not phrases or not colours:
        return assign
    col = np.array([[p[1] == c for p in phrases] for c in colours], np.int64)  # [N, M]
    shp = np.array([[p[2] == s for p in phrases] for s in shapes_], np.int64)
    rows, cols = linear_sum_assignment(-(col + shp + 2 * col * shp))
    for i, j in zip(rows, cols):
        assign[int(i)] = int(j)
    return assign


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


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
    objects lie inside ``box`` = (top, left, height, width) in pixels."""
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
    r_lo, r_hi = c.radius_range[0] * n, c.radius_range[1] * n
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


def _relation(ci: np.ndarray, cj: np.ndarray) -> str:
    """Relation of object i to object j from centres (y, x)."""
    dy, dx = float(cj[0] - ci[0]), float(cj[1] - ci[1])
    if abs(dy) > abs(dx):
        return "above" if dy > 0 else "below"
    return "left of" if dx > 0 else "right of"


def _caption(c: ShapesConfig, sizes, colours, shapes, centres: np.ndarray):
    words: list[str] = []
    objs: list[Optional[int]] = []
    relations: list[tuple[int, str, int]] = []

    def name(k: int):
        words.append("a")
        objs.append(None)
        if c.size_words:
            words.append(sizes[k])
            objs.append(k)
        words.extend((colours[k], shapes[k]))
        objs.extend((k, k))

    count = len(shapes)
    group = 2 if c.relations else 1
    for start in range(0, count, group):
        if start:
            words.append("and")
            objs.append(None)
        name(start)
        if group == 2 and start + 1 < count:
            rel = _relation(centres[start], centres[start + 1])
            relations.append((start, rel, start + 1))
            for w in RELATION_PHRASES[rel]:
                words.append(w)
                objs.append(None)
            name(start + 1)
    return tuple(words), tuple(objs), tuple(relations)


def max_caption_words(config: ShapesConfig) -> int:
    """Upper bound on the number of words of a caption under ``config``."""
    n = config.max_objects
    per_object = 4 if config.size_words else 3
    if config.relations:
        return n * per_object + 2 * (n // 2) + (math.ceil(n / 2) - 1)
    return n * per_object + (n - 1)


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


def make_example(seed: int, config: ShapesConfig = ShapesConfig()) -> Example:
    """Generate one example, a pure function of (seed, config).

    Clutter is drawn from the random stream last, so switching it off (or changing its amount)
    leaves the background and every object unchanged.

    Args:
      seed: a non-negative int (use split_seed for split-aware seeds).
      config: a ShapesConfig.
    Returns:
      Example with image [H, W, 3] uint8, masks [N, H, W] bool, label_map [H, W] uint8, ...
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative int.")
    if not isinstance(config, ShapesConfig):
        raise ValueError(f"config must be a ShapesConfig, got {type(config).__name__}; "
                         "use shapes.preset(name) or ShapesConfig(...).")
    seed = int(seed)
    # One stream, consumed in a fixed order: background, layout (objects, caption order; redrawn
    # while a relation is ambiguous), clutter. Clutter comes last so that changing it leaves the
    # background and every object unchanged.
    rng = np.random.default_rng(seed)
    n = config.image_size
    backdrop = _background(rng, config)
    image = backdrop.image
    letterbox_u, aspect_u, across_u = rng.random(3).tolist()
    box = (0, 0, n, n)
    if letterbox_u < config.letterbox_prob:
        band = int(round((0.55 + 0.35 * aspect_u) * n))
        offset = (n - band) // 2
        box = (offset, 0, band, n) if across_u < 0.5 else (0, offset, n, band)
    # The object count is drawn once: redrawing it with the layout would favour single objects,
    # which never have an ambiguous relation.
    wanted = int(rng.integers(config.min_objects, config.max_objects + 1))
    for _ in range(LAYOUT_TRIES):
        placed = _place_objects(rng, config, wanted, backdrop.colours, box)
        count = len(placed)
        if config.caption_order == "left_to_right":
            order = sorted(range(count), key=lambda z: (placed[z].cx, placed[z].cy, z))
        else:
            order = [int(z) for z in rng.permutation(count)]
        if _relations_clear(placed, order, config):
            break
    clutter = np.zeros((n, n), bool)
    if config.clutter_range[1] > 0:
        _draw_clutter(rng, config, backdrop.level, image, clutter)

    # Rendering variety draws from its own stream, so switching it off (or changing how much of
    # it there is) leaves the scene itself unchanged.
    fx = np.random.default_rng([seed, 1])
    aa_u, blur_u, sigma_u, jpeg_u, quality_u = fx.random(5).tolist()
    antialias = aa_u < config.antialias_prob

    caption_index = np.empty(count, np.int64)  # drawing index -> caption index
    caption_index[np.asarray(order, np.int64)] = np.arange(count)
    label_map = np.zeros((n, n), np.uint8)
    for z, p in enumerate(placed):
        fill, shade = _COLOUR_U8[p.colour]
        h, w = p.inside.shape
        if antialias:
            _blend_edges(image, p, fill)
        win = image[p.y0:p.y0 + h, p.x0:p.x0 + w]
        win[p.inside] = fill
        if p.tex is not None:
            win[p.tex] = shade
        label_map[p.y0:p.y0 + h, p.x0:p.x0 + w][p.inside] = caption_index[z] + 1
    letterbox = None
    if box != (0, 0, n, n):
        letterbox = box
        top, left, bh, bw = box
        inside_box = np.zeros((n, n), bool)
        inside_box[top:top + bh, left:left + bw] = True
        image[~inside_box] = LETTERBOX_FILL
        clutter &= inside_box
    if blur_u < config.blur_prob or jpeg_u < config.jpeg_prob:
        from PIL import Image, ImageFilter  # the rasteriser itself needs only NumPy
        pil = Image.fromarray(image)
        if blur_u < config.blur_prob:
            pil = pil.filter(ImageFilter.GaussianBlur(radius=0.3 + 0.5 * sigma_u))
        if jpeg_u < config.jpeg_prob:
            buffer = io.BytesIO()
            pil.save(buffer, format="JPEG", quality=int(35 + 55 * quality_u))
            pil = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        image = np.asarray(pil, np.uint8).copy()
    masks = label_map[None] == np.arange(1, count + 1, dtype=np.uint8)[:, None, None]
    bboxes = np.zeros((count, 4), np.int32)
    for z, p in enumerate(placed):
        # The visible pixels lie inside the object's raster window, so search only there.
        k = caption_index[z]
        h, w = p.inside.shape
        win = masks[k, p.y0:p.y0 + h, p.x0:p.x0 + w]
        rows = win.any(axis=1).nonzero()[0]
        cols = win.any(axis=0).nonzero()[0]
        bboxes[k] = (p.y0 + rows[0], p.x0 + cols[0], p.y0 + rows[-1] + 1, p.x0 + cols[-1] + 1)
    objs = [placed[z] for z in order]
    shapes = tuple(p.shape for p in objs)
    colours = tuple(p.colour for p in objs)
    sizes = tuple(p.size for p in objs)
    centres = np.array([(p.cy, p.cx) for p in objs], np.float32).reshape(count, 2)
    words, word_obj, relations = _caption(config, sizes, colours, shapes, centres)
    z_order = np.asarray(order, np.int32).reshape(count)
    return Example(
        seed=seed,
        image=image,
        caption=" ".join(words),
        words=words,
        word_object=word_obj,
        word_class=tuple(WORD_CLASS[w] for w in words),
        masks=masks,
        label_map=label_map,
        clutter_mask=clutter & (label_map == 0),
        shapes=shapes,
        colours=colours,
        sizes=sizes,
        textures=tuple(p.texture for p in objs),
        radii=np.array([p.radius for p in objs], np.float32),
        rotations=np.array([p.rotation for p in objs], np.float32),
        centres_yx=centres,
        bboxes=bboxes,
        z_order=z_order,
        relations=relations,
        background=backdrop.kind,
        tone=backdrop.tone,
        letterbox=letterbox,
        antialiased=antialias,
        config=config,
    )


# ----------------------------------------------------------------------------------------------
# Splits and batches
# ----------------------------------------------------------------------------------------------


def split_seed(split: str, index: int) -> int:
    """The example seed of ``index`` in ``split``; splits own disjoint ranges of 2**40 seeds."""
    if split not in _SPLIT_OFFSET:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}.")
    is_int = isinstance(index, (int, np.integer)) and not isinstance(index, bool)
    if not is_int or not 0 <= index < SPLIT_SIZE:
        raise ValueError(f"index={index!r} for split {split!r} must be an int in [0, 2**40).")
    return _SPLIT_OFFSET[split] + int(index)


def split_of_seed(seed: int) -> tuple[str, int]:
    """Inverse of split_seed: (split, index)."""
    k, index = divmod(int(seed), SPLIT_SIZE)
    if not 0 <= k < len(SPLITS):
        raise ValueError(f"seed={seed!r} belongs to no split (valid seeds are in [0, 3 * 2**40)).")
    return SPLITS[k], index


def iterate(
    split: str, start: int = 0, count: Optional[int] = None, config: ShapesConfig = ShapesConfig()
) -> Iterator[Example]:
    """Examples ``start, start+1, ...`` of ``split`` (``count`` of them, or endless when None).

    Arguments are checked at the call, not at the first ``next``.
    """
    if count is not None and (not isinstance(count, (int, np.integer)) or count < 0):
        raise ValueError(f"count={count!r} must be a non-negative int or None.")
    split_seed(split, start)  # validates split and start
    if not isinstance(config, ShapesConfig):
        raise ValueError(f"config must be a ShapesConfig, got {type(config).__name__}.")

    def examples() -> Iterator[Example]:
        i = start
        while count is None or i < start + count:
            yield make_example(split_seed(split, i), config)
            i += 1

    return examples()


@dataclasses.dataclass(frozen=True, eq=False)
class Batch:
    """A padded batch. B examples, M = config.max_objects, L = max_caption_words(config).

    Attributes:
      images: [B, H, W, 3] uint8.
      captions: tuple of B strings.
      masks: [B, M, H, W] bool, all False for padding objects.
      label_maps: [B, H, W] uint8.
      num_objects: [B] int32.
      shapes: [B, M] int32 index into SHAPES, -1 for padding.
      colours: [B, M] int32 index into COLOUR_NAMES, -1 for padding.
      centres_yx: [B, M, 2] float32 (0 for padding).
      bboxes: [B, M, 4] int32 (0 for padding).
      word_object: [B, L] int32 object per caption word, -1 for words naming none and padding.
      num_words: [B] int32.
      seeds: [B] int64.
    """

    images: np.ndarray
    captions: tuple[str, ...]
    masks: np.ndarray
    label_maps: np.ndarray
    num_objects: np.ndarray
    shapes: np.ndarray
    colours: np.ndarray
    centres_yx: np.ndarray
    bboxes: np.ndarray
    word_object: np.ndarray
    num_words: np.ndarray
    seeds: np.ndarray


def collate(examples: Sequence[Example], config: ShapesConfig) -> Batch:
    """Stack examples made with ``config`` into a padded Batch."""
    b, n, m = len(examples), config.image_size, config.max_objects
    words_max = max_caption_words(config)
    out = Batch(
        images=np.zeros((b, n, n, 3), np.uint8),
        captions=tuple(e.caption for e in examples),
        masks=np.zeros((b, m, n, n), bool),
        label_maps=np.zeros((b, n, n), np.uint8),
        num_objects=np.zeros(b, np.int32),
        shapes=np.full((b, m), -1, np.int32),
        colours=np.full((b, m), -1, np.int32),
        centres_yx=np.zeros((b, m, 2), np.float32),
        bboxes=np.zeros((b, m, 4), np.int32),
        word_object=np.full((b, words_max), -1, np.int32),
        num_words=np.zeros(b, np.int32),
        seeds=np.zeros(b, np.int64),
    )
    for i, e in enumerate(examples):
        if e.image.shape[0] != n or e.num_objects > m or len(e.words) > words_max:
            raise ValueError(
                f"example {i} (seed {e.seed}) does not fit config: image {e.image.shape[0]} px vs "
                f"{n}, {e.num_objects} objects vs max {m}; collate examples made with this config."
            )
        k = e.num_objects
        out.images[i] = e.image
        out.masks[i, :k] = e.masks
        out.label_maps[i] = e.label_map
        out.num_objects[i] = k
        out.shapes[i, :k] = [SHAPES.index(s) for s in e.shapes]
        out.colours[i, :k] = [COLOUR_NAMES.index(c) for c in e.colours]
        out.centres_yx[i, :k] = e.centres_yx
        out.bboxes[i, :k] = e.bboxes
        out.word_object[i, : len(e.words)] = e.word_object_array()
        out.num_words[i] = len(e.words)
        out.seeds[i] = e.seed
    return out


def batch(split: str, indices: Sequence[int], config: ShapesConfig = ShapesConfig()) -> Batch:
    """The examples ``indices`` of ``split`` as one padded Batch (see Batch for shapes)."""
    indices = list(indices)
    if not indices:
        raise ValueError("indices is empty; pass at least one example index.")
    return collate([make_example(split_seed(split, int(i)), config) for i in indices], config)


def image_grid(images: np.ndarray, columns: int = 4, pad: int = 2) -> np.ndarray:
    """Tile images into one picture. images: [B, H, W, 3] uint8 -> [rows*(H+pad)+pad, ..., 3]."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3], got shape {images.shape}.")
    b, h, w, _ = images.shape
    rows = math.ceil(b / columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(b):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h,
             pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    return grid
