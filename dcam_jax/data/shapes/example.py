"""Example: one ShapesWorld image with its caption, masks and word-object alignment."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from dcam_jax.data.shapes.vocab import word_class
from dcam_jax.data.shapes.config import ShapesConfig


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
