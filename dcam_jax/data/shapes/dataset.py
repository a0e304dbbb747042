"""make_example (a pure function of seed and config), split seeds, iteration and batches."""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Iterator, Sequence
from typing import Optional

import numpy as np

from dcam_jax.data.shapes.vocab import COLOUR_NAMES, LETTERBOX_FILL, SHAPES, SPLITS, SPLIT_SIZE, WORD_CLASS, _SPLIT_OFFSET
from dcam_jax.data.shapes.config import ShapesConfig
from dcam_jax.data.shapes.example import Example
from dcam_jax.data.shapes.caption import _caption, max_caption_words
from dcam_jax.data.shapes.render import _COLOUR_U8, _background, _blend_edges, _draw_clutter
from dcam_jax.data.shapes.layout import LAYOUT_TRIES, _place_objects, _relations_clear


def make_example(seed: int, config: ShapesConfig = ShapesConfig()) -> Example:
    """Generate one example, a pure function of (seed, config).

    It stays one function on purpose: the order of its random draws defines every split, and that
    order is easiest to keep fixed when it reads top to bottom in one place.

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
