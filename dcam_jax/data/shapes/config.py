"""ShapesConfig: every switch and range of ShapesWorld, its validation, and the named presets."""

from __future__ import annotations

import dataclasses

import numpy as np

from dcam_jax.data.shapes.vocab import BACKGROUNDS, COLOUR_NAMES, MIN_CONTRAST, SHAPES, SHAPE_EXTENT, TEXTURES, TONE_NAMES, _tone_probes, allowed_colours


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """Every switch and range of ShapesWorld. Use ``preset(name)`` for curated settings.

    Attributes:
      image_size: side of the square image in pixels, 16..512 (64 to 128 intended).
      min_objects, max_objects: number of objects drawn uniformly from this range (1..4 intended;
        at most 8). A layout that cannot place an object after ``max_placement_tries`` drops it.
      shapes: the shapes to draw from (subset of SHAPES).
      colours: the colours to draw from (subset of COLOUR_NAMES).
      radius_range: (min, max) object radius as a fraction of image_size, or of a letterbox
        band's short side (0.15 at 64 px = 9.6 px).
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
        to 90% of one side) and the rest is LETTERBOX_FILL grey: what the processor's pad layout
        makes of a non-square picture. The scene is drawn inside the band with radii that are
        ``radius_range`` fractions of the band's short side, so its objects shrink with it.
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
    letterbox_prob: float = 0.3

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
