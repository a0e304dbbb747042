"""PIL-drawn shapes: a held-out check of the toy model drawn by a different renderer than ShapesWorld.

ShapesWorld (``dcam_jax.data.shapes``) rasterises its shapes with its own NumPy code; the toy model was trained on
nothing else. This module draws images with the same closed vocabulary (``shapes.SHAPES``, the fill colours of
``shapes.COLOURS``, the caption grammar) but with PIL's ``ImageDraw`` and its own geometry, placement and
backgrounds, so that a model or an explanation method that only learnt ShapesWorld's rasteriser shows it here.
Everything is a pure function of ``(seed, config)``; :func:`make_example` returns a ``shapes.Example`` (the same
type, the same fields eval.run and ``shapes.attribute_mask`` use).

One module on purpose (a little under 500 lines): an independent renderer must not share ShapesWorld's rasteriser,
placement or backgrounds, so it carries its own small copies of those ideas in one place.

Drawing
-------
Each object is one ImageDraw primitive, never anti-aliased (ImageDraw draws hard edges):

* circle: ``ellipse`` of radius r;
* square: ``regular_polygon`` with 4 sides, circumradius 1.2 r, sides axis-aligned;
* diamond: ``regular_polygon`` with 4 sides, circumradius 1.1 r, turned 45 degrees (corners up, down, left, right);
* triangle: ``regular_polygon`` with 3 sides, circumradius 1.15 r, apex up (equilateral);
* cross: ``polygon`` of 12 corners, arms of half-length r and half-width 0.32 r (a plus sign);
* star: ``polygon`` of 10 corners, 5 points of outer radius 1.1 r, inner radius 0.46 x outer, one point up.

An optional rotation (``max_rotation_deg``, 0 by default as in ShapesWorld's default preset) turns every shape
about its centre. Each object's mask is drawn by the very same ImageDraw call (same primitive, same coordinates)
into its own 'L' image, so the mask is exactly the set of pixels painted with the object's colour.

Placement
---------
1 to 3 objects (``min_objects``..``max_objects``, drawn once per image) of distinct shapes and distinct colours;
radii are ``radius_range`` x min(width, height) (ShapesWorld's default range). Each object's *reach* (the radius of
the disc its outline fits in) keeps ``margin`` pixels from the image border, and the reach discs of any two objects
keep ``min_gap`` pixels apart, so objects never overlap or touch. Later tries favour smaller radii. A layout in
which an object found no place in ``max_placement_tries`` draws is drawn again (with the relation check below, up
to ``LAYOUT_TRIES`` layouts); if none succeeds, the best one is kept and the object is dropped.

Caption
-------
ShapesWorld's grammar with its default switches (no size words, relations on, left-to-right order): objects are
listed left to right by centre x (ties: top to bottom), named ``a colour shape``, grouped in consecutive pairs
joined by the relation of the first to the second, groups joined by ``and``::

    a red circle
    a red circle above a blue square
    a green triangle left of a yellow star and a white cross

Centres are the centroids of the drawn masks (what a viewer sees as the object's middle). The relation of object i
to object j is ``above``/``below`` when ``|dy| > |dx|``, otherwise ``left of``/``right of``; layouts with a related
pair within ``relation_margin_deg`` of a diagonal are drawn again (up to ``LAYOUT_TRIES`` times) so the relation
word is never a coin flip. ``sizes`` are ``small``/``large`` by radius below/above the middle of ``radius_range``
(not said in the caption, as in ShapesWorld's default preset).

Backgrounds and the contrast rule
---------------------------------
``background`` picks a solid background colour from the seed:

* ``dark`` (the required check): HSV hue uniform, saturation in [0, 0.35], value in [0.03, 0.25];
* ``light``: HSV hue uniform, saturation in [0, 0.2], value in [0.75, 0.92];
* ``white``: pure white (255, 255, 255).

Contrast rule: an object colour may be drawn on a background only when the Euclidean distance between its fill
RGB (``shapes.COLOURS[name][0]``) and the background RGB is at least ``min_contrast`` (default 100 of the 441
possible). Colours closer than that are removed from the colours an image may use, so a colour word is always a
true, visible description. On ``dark`` every colour passes; on ``white`` and most ``light`` backgrounds ``white``
is excluded. :func:`allowed_colours` gives the colours an image may use, :func:`contrast` the distance.

Splits
------
Seeds are ShapesWorld's split seeds (``shapes.split_seed``): split k owns [k 2**40, (k + 1) 2**40), so test and
validation never share a seed. The random stream is salted (``_SALT``), so a PIL example is not correlated with the
ShapesWorld example of the same seed.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
from collections.abc import Iterator
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from dcam_jax.data import shapes as sw  # "shapes" is also a config field name

GENERATOR_VERSION = "1.0.0"
BACKGROUND_KINDS: tuple[str, ...] = ("dark", "light", "white")
LAYOUT_TRIES = 20
_SALT = 0x5049_4C53  # "PILS"

# Outline geometry in units of the nominal radius r (see the module docstring).
_SQUARE_R, _DIAMOND_R, _TRIANGLE_R = 1.2, 1.1, 1.15
_CROSS_ARM, _CROSS_HALF_WIDTH = 1.0, 0.32
_STAR_OUTER, _STAR_INNER_RATIO = 1.1, 0.46

# Radius of the disc each outline fits in / r (reach), used for the margin and the gaps.
SHAPE_REACH: dict[str, float] = {
    "circle": 1.0,
    "square": _SQUARE_R,
    "diamond": _DIAMOND_R,
    "triangle": _TRIANGLE_R,
    "cross": math.hypot(_CROSS_ARM, _CROSS_HALF_WIDTH),
    "star": _STAR_OUTER,
}


@dataclasses.dataclass(frozen=True)
class PilShapesConfig:
    """Switches of the PIL renderer.

    Attributes:
      width, height: image size in pixels (16..1024 each); 128 x 128 by default.
      background: 'dark' | 'light' | 'white' (see the module docstring).
      min_objects, max_objects: number of objects, uniform in this range (1..6).
      shapes, colours: the vocabulary to draw from (subsets of shapes.SHAPES / shapes.COLOUR_NAMES); colours are
        further restricted per image by the contrast rule.
      radius_range: (min, max) nominal radius as a fraction of min(width, height).
      max_rotation_deg: each object turned by U(-a, a) degrees (0..22.5, so a square never becomes a diamond).
      margin: minimum distance in pixels from an object's reach disc to the image border.
      min_gap: minimum distance in pixels between the reach discs of two objects.
      min_contrast: minimum Euclidean RGB distance between an object's fill and the background (the contrast rule).
      relation_margin_deg: redraw layouts whose related pairs lie within this many degrees of a diagonal.
      max_placement_tries: placement draws per object before it is dropped.
    """

    width: int = 128
    height: int = 128
    background: str = "dark"
    min_objects: int = 1
    max_objects: int = 3
    shapes: tuple[str, ...] = sw.SHAPES
    colours: tuple[str, ...] = sw.COLOUR_NAMES
    radius_range: tuple[float, float] = (0.14, 0.2)
    max_rotation_deg: float = 0.0
    margin: int = 4
    min_gap: int = 4
    min_contrast: float = 100.0
    relation_margin_deg: float = 10.0
    max_placement_tries: int = 200

    def __post_init__(self):
        _validate(self)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return (self.width, self.height)

    def replace(self, **changes) -> "PilShapesConfig":
        """A copy with the given fields changed (validated)."""
        return dataclasses.replace(self, **changes)


def _validate(c: PilShapesConfig) -> None:
    def bad(field, value, expected):
        raise ValueError(f"PilShapesConfig.{field}={value!r} is invalid: expected {expected}.")

    for field in ("width", "height"):
        v = getattr(c, field)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 16 <= v <= 1024:
            bad(field, v, "an int in [16, 1024] pixels")
    if c.background not in BACKGROUND_KINDS:
        bad("background", c.background, f"one of {BACKGROUND_KINDS}")
    if not isinstance(c.max_objects, (int, np.integer)) or not 1 <= c.max_objects <= 6:
        bad("max_objects", c.max_objects, "an int in [1, 6]")
    if not isinstance(c.min_objects, (int, np.integer)) or not 1 <= c.min_objects <= c.max_objects:
        bad("min_objects", c.min_objects, f"an int in [1, max_objects={c.max_objects}]")
    for field, values, allowed in (("shapes", c.shapes, sw.SHAPES), ("colours", c.colours, sw.COLOUR_NAMES)):
        if (not isinstance(values, tuple) or len(values) < c.max_objects or len(set(values)) != len(values)
                or any(v not in allowed for v in values)):
            bad(field, values, f"a tuple of at least max_objects={c.max_objects} distinct names from {allowed}")
    if (not isinstance(c.radius_range, tuple) or len(c.radius_range) != 2
            or not 0.0 < c.radius_range[0] <= c.radius_range[1] <= 0.3):
        bad("radius_range", c.radius_range, "(min, max) fractions of min(width, height) with 0 < min <= max <= 0.3")
    if c.radius_range[0] * min(c.width, c.height) < 3.0:
        bad("radius_range", c.radius_range, "a minimum radius of at least 3 pixels")
    if not 0.0 <= c.max_rotation_deg <= 22.5:
        bad("max_rotation_deg", c.max_rotation_deg, "a value in [0, 22.5] degrees")
    for field in ("margin", "min_gap"):
        v = getattr(c, field)
        if not isinstance(v, (int, np.integer)) or not 0 <= v <= 32:
            bad(field, v, "an int in [0, 32] pixels")
    if not 0.0 <= c.min_contrast <= 300.0:
        bad("min_contrast", c.min_contrast, "a distance in [0, 300] (RGB units)")
    if not 0.0 <= c.relation_margin_deg <= 20.0:
        bad("relation_margin_deg", c.relation_margin_deg, "a value in [0, 20] degrees")
    if not isinstance(c.max_placement_tries, (int, np.integer)) or c.max_placement_tries < 1:
        bad("max_placement_tries", c.max_placement_tries, "an int >= 1")
    reach = max(SHAPE_REACH[s] for s in c.shapes) * c.radius_range[1] * min(c.width, c.height)
    if 2 * (reach + c.margin) >= min(c.width, c.height):
        bad("radius_range", c.radius_range, "a largest object (with the margin) that fits in the image")


def parse_size(text: str) -> tuple[int, int]:
    """'128' -> (128, 128); '160,128' (or '160x128') -> (width 160, height 128)."""
    parts = str(text).lower().replace("x", ",").split(",")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        vals = []
    if len(vals) not in (1, 2):
        raise ValueError(f"size {text!r}: expected 'N' or 'WIDTH,HEIGHT' in pixels (e.g. 128 or 160,128)")
    w, h = (vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1])
    if not (16 <= w <= 1024 and 16 <= h <= 1024):
        raise ValueError(f"size {text!r}: width and height must be in [16, 1024] pixels")
    return w, h


# ----------------------------------------------------------------------------------------------------------
# colours and the contrast rule


def fill_rgb(colour: str) -> tuple[int, int, int]:
    """The RGB every object named ``colour`` is painted with (ShapesWorld's fill for that word)."""
    return tuple(int(v) for v in sw.COLOURS[colour][0])


def contrast(colour: str, background_rgb) -> float:
    """Euclidean RGB distance between the fill of ``colour`` and ``background_rgb``."""
    return float(np.linalg.norm(np.asarray(fill_rgb(colour), np.float64) - np.asarray(background_rgb, np.float64)))


def allowed_colours(background_rgb, config: PilShapesConfig = PilShapesConfig()) -> tuple[str, ...]:
    """The colours of ``config.colours`` that pass the contrast rule on ``background_rgb``."""
    return tuple(c for c in config.colours if contrast(c, background_rgb) >= config.min_contrast)


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(int(round(255.0 * x)) for x in colorsys.hsv_to_rgb(h, s, v))


def _background_rgb(rng: np.random.Generator, kind: str) -> tuple[int, int, int]:
    h, s, v = rng.random(3).tolist()
    if kind == "dark":
        return _rgb(h, 0.35 * s, 0.03 + 0.22 * v)
    if kind == "light":
        return _rgb(h, 0.2 * s, 0.75 + 0.17 * v)
    return (255, 255, 255)


# ----------------------------------------------------------------------------------------------------------
# drawing


def _rotate(points: np.ndarray, cx: float, cy: float, rotation_deg: float) -> list[tuple[float, float]]:
    """(x, y) offsets [V, 2] turned clockwise on screen by rotation_deg and moved to (cx, cy)."""
    t = math.radians(rotation_deg)
    c, s = math.cos(t), math.sin(t)
    x = c * points[:, 0] - s * points[:, 1] + cx
    y = s * points[:, 0] + c * points[:, 1] + cy
    return [(float(a), float(b)) for a, b in zip(x, y)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, rotation_deg: float,
               fill) -> None:
    """Draw one shape with ImageDraw (no anti-aliasing) centred at (x=cx, y=cy) with nominal radius ``radius``.

    The same call on an 'L' image with fill=255 gives the object's exact mask.
    """
    r = float(radius)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.regular_polygon((cx, cy, _SQUARE_R * r), 4, rotation=-rotation_deg, fill=fill)
    elif shape == "diamond":
        draw.regular_polygon((cx, cy, _DIAMOND_R * r), 4, rotation=45.0 - rotation_deg, fill=fill)
    elif shape == "triangle":
        draw.regular_polygon((cx, cy, _TRIANGLE_R * r), 3, rotation=-rotation_deg, fill=fill)
    elif shape == "cross":
        a, w = _CROSS_ARM * r, _CROSS_HALF_WIDTH * r
        pts = np.array([(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w),
                        (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)])
        draw.polygon(_rotate(pts, cx, cy, rotation_deg), fill=fill)
    elif shape == "star":
        ang = -math.pi / 2 + np.arange(10) * math.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, _STAR_OUTER, _STAR_OUTER * _STAR_INNER_RATIO) * r
        pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
        draw.polygon(_rotate(pts, cx, cy, rotation_deg), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {sw.SHAPES}.")


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: tuple[int, int],
               rotation_deg: float = 0.0) -> np.ndarray:
    """[H, W] bool mask of one shape drawn by :func:`draw_shape` on a ``size`` = (width, height) image."""
    im = Image.new("L", tuple(size), 0)
    draw_shape(ImageDraw.Draw(im), shape, cx, cy, radius, rotation_deg, 255)
    return np.asarray(im) > 0


# ----------------------------------------------------------------------------------------------------------
# layout and caption


@dataclasses.dataclass
class _Obj:
    shape: str
    colour: str
    radius: float
    rotation: float
    cx: float
    cy: float


def _place(rng: np.random.Generator, c: PilShapesConfig, count: int, colours: tuple[str, ...]) -> list[_Obj]:
    w, h = c.width, c.height
    side = min(w, h)
    shape_idx = rng.permutation(len(c.shapes))[:count]
    colour_idx = rng.permutation(len(colours))[:count]
    rot = ((2.0 * rng.random(count) - 1.0) * c.max_rotation_deg).tolist()
    lo, hi = c.radius_range[0] * side, c.radius_range[1] * side
    tries = c.max_placement_tries
    shrink = np.minimum(1.0, 2.0 * (1.0 - np.arange(tries) / tries))  # later tries: smaller radii
    placed: list[_Obj] = []
    for k in range(count):
        shape = c.shapes[int(shape_idx[k])]
        block = rng.random((tries, 3))
        radii = lo + (hi - lo) * shrink * block[:, 0]
        reach = SHAPE_REACH[shape] * radii + c.margin
        cx = reach + (w - 2.0 * reach) * block[:, 1]
        cy = reach + (h - 2.0 * reach) * block[:, 2]
        ok = np.ones(tries, bool)
        for p in placed:
            need = SHAPE_REACH[p.shape] * p.radius + SHAPE_REACH[shape] * radii + c.min_gap
            ok &= np.hypot(cx - p.cx, cy - p.cy) >= need
        hits = np.flatnonzero(ok)
        if hits.size:
            t = int(hits[0])
            placed.append(_Obj(shape, colours[int(colour_idx[k])], float(radii[t]), rot[k], float(cx[t]),
                               float(cy[t])))
    return placed


def _relation(ci, cj) -> str:
    """Relation of object i to object j from centres (y, x) (ShapesWorld's rule)."""
    dy, dx = float(cj[0] - ci[0]), float(cj[1] - ci[1])
    if abs(dy) > abs(dx):
        return "above" if dy > 0 else "below"
    return "left of" if dx > 0 else "right of"


def _clear(centres: np.ndarray, margin_deg: float) -> bool:
    for i in range(0, len(centres) - 1, 2):
        dy, dx = centres[i + 1] - centres[i]
        if abs(math.degrees(math.atan2(abs(dy), abs(dx))) - 45.0) < margin_deg:
            return False
    return True


def caption_words(colours, shapes_, centres_yx) -> tuple[tuple[str, ...], tuple[Optional[int], ...],
                                                           tuple[tuple[int, str, int], ...]]:
    """(words, object per word, relations) of objects already in caption order (ShapesWorld's default grammar)."""
    words: list[str] = []
    objs: list[Optional[int]] = []
    rels: list[tuple[int, str, int]] = []

    def name(k):
        words.extend(("a", colours[k], shapes_[k]))
        objs.extend((None, k, k))

    for start in range(0, len(colours), 2):
        if start:
            words.append("and")
            objs.append(None)
        name(start)
        if start + 1 < len(colours):
            rel = _relation(centres_yx[start], centres_yx[start + 1])
            rels.append((start, rel, start + 1))
            for wd in sw.RELATION_PHRASES[rel]:
                words.append(wd)
                objs.append(None)
            name(start + 1)
    return tuple(words), tuple(objs), tuple(rels)


# ----------------------------------------------------------------------------------------------------------
# examples


def make_example(seed: int, config: PilShapesConfig = PilShapesConfig()) -> sw.Example:
    """One PIL-drawn example, a pure function of (seed, config). One function on purpose: the order of its
    random draws defines the set.

    Returns a ``shapes.Example``: image [H, W, 3] uint8, masks [N, H, W] bool (exact, disjoint), label_map [H, W]
    uint8 (k + 1 = object k of the caption), caption, words, word_object, word_class, shapes, colours, sizes,
    centres_yx (mask centroids), bboxes, relations; textures are 'plain', clutter_mask is empty, background is
    'solid', tone is the background kind (dark, light or white), letterbox is None, antialiased is False, and
    config is the PilShapesConfig (not a ShapesConfig).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative int.")
    if not isinstance(config, PilShapesConfig):
        raise ValueError(f"config must be a PilShapesConfig, got {type(config).__name__}.")
    c = config
    seed = int(seed)
    rng = np.random.default_rng([seed, _SALT])
    bg = _background_rgb(rng, c.background)
    colours = allowed_colours(bg, c)
    wanted = int(rng.integers(c.min_objects, c.max_objects + 1))
    if len(colours) < wanted:  # cannot happen with the shipped palette and thresholds
        raise ValueError(f"background {bg} leaves only {colours} under min_contrast={c.min_contrast}; "
                         f"{wanted} distinct colours are needed (lower min_contrast)")
    size = (c.width, c.height)
    # Redraw layouts that dropped an object or relate a pair near a diagonal; keep the first best one.
    best, best_rank = None, None
    for _ in range(LAYOUT_TRIES):
        objs = _place(rng, c, wanted, colours)
        masks = [shape_mask(o.shape, o.cx, o.cy, o.radius, size, o.rotation) for o in objs]
        cent = np.array([_centroid(m) for m in masks], np.float32).reshape(len(objs), 2)
        order = sorted(range(len(objs)), key=lambda z: (cent[z, 1], cent[z, 0], z))
        rank = (_clear(cent[order], c.relation_margin_deg), len(objs))
        if best_rank is None or rank > best_rank:
            best, best_rank = (objs, masks, cent, order), rank
        if rank == (True, wanted):
            break
    objs, masks, cent, order = best
    n = len(objs)
    image = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(image)
    for o in objs:
        draw_shape(draw, o.shape, o.cx, o.cy, o.radius, o.rotation, fill_rgb(o.colour))
    image = np.asarray(image, np.uint8).copy()
    masks_arr = np.stack([masks[z] for z in order]) if n else np.zeros((0, c.height, c.width), bool)
    label_map = np.zeros((c.height, c.width), np.uint8)
    for k in range(n):
        label_map[masks_arr[k]] = k + 1
    ordered = [objs[z] for z in order]
    centres = cent[order].reshape(n, 2)
    colours_ = tuple(o.colour for o in ordered)
    shapes_ = tuple(o.shape for o in ordered)
    mid = 0.5 * (c.radius_range[0] + c.radius_range[1]) * min(c.width, c.height)
    words, word_obj, rels = caption_words(colours_, shapes_, centres)
    bboxes = np.zeros((n, 4), np.int32)
    for k in range(n):
        rows = masks_arr[k].any(axis=1).nonzero()[0]
        cols = masks_arr[k].any(axis=0).nonzero()[0]
        bboxes[k] = (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)
    return sw.Example(
        seed=seed,
        image=image,
        caption=" ".join(words),
        words=words,
        word_object=word_obj,
        word_class=tuple(sw.WORD_CLASS[w] for w in words),
        masks=masks_arr,
        label_map=label_map,
        clutter_mask=np.zeros((c.height, c.width), bool),
        shapes=shapes_,
        colours=colours_,
        sizes=tuple("large" if o.radius > mid else "small" for o in ordered),
        textures=("plain",) * n,
        radii=np.array([o.radius for o in ordered], np.float32),
        rotations=np.array([o.rotation for o in ordered], np.float32),
        centres_yx=centres,
        bboxes=bboxes,
        z_order=np.asarray(order, np.int32).reshape(n),
        relations=rels,
        background="solid",
        tone=c.background,
        letterbox=None,
        antialiased=False,
        config=c,
    )


def background_rgb(example: sw.Example) -> tuple[int, int, int]:
    """The (solid) background colour of an example: the colour of its pixels outside every object."""
    outside = example.label_map == 0
    return tuple(int(v) for v in example.image[outside][0])


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    """(y, x) centroid of a mask in continuous pixel coordinates (pixel centres at i + 0.5)."""
    ys, xs = np.nonzero(mask)
    return float(ys.mean()) + 0.5, float(xs.mean()) + 0.5


def iterate(split: str, start: int = 0, count: Optional[int] = None,
            config: PilShapesConfig = PilShapesConfig()) -> Iterator[sw.Example]:
    """Examples ``start, start + 1, ...`` of ``split`` (seeds ``shapes.split_seed(split, i)``); endless if None."""
    sw.split_seed(split, start)
    if count is not None and (not isinstance(count, (int, np.integer)) or count < 0):
        raise ValueError(f"count={count!r} must be a non-negative int or None.")

    def gen():
        i = start
        while count is None or i < start + count:
            yield make_example(sw.split_seed(split, i), config)
            i += 1

    return gen()
