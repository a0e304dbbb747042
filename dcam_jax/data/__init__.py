"""Data sets: ShapesWorld (procedural, exact masks) and its TFDS builder (``data.shapes_tfds``).

The TFDS builder lives in its own module so that importing ``dcam_jax.data`` does not import
tensorflow_datasets.
"""

from dcam_jax.data.shapes import (
    COLOUR_NAMES,
    COLOURS,
    PRESETS,
    SHAPES,
    SPLITS,
    VOCABULARY,
    WORD_CLASS,
    WORD_CLASSES,
    Batch,
    Example,
    ShapesConfig,
    attribute_mask,
    batch,
    collate,
    image_grid,
    iterate,
    make_example,
    max_caption_words,
    parse_caption,
    preset,
    shape_mask,
    shape_polygon,
    split_of_seed,
    split_seed,
    vocabulary,
    word_class,
)

__all__ = [
    "COLOUR_NAMES", "COLOURS", "PRESETS", "SHAPES", "SPLITS", "VOCABULARY", "WORD_CLASS",
    "WORD_CLASSES", "Batch", "Example", "ShapesConfig", "attribute_mask", "batch", "collate",
    "image_grid", "iterate", "make_example", "max_caption_words", "parse_caption", "preset",
    "shape_mask", "shape_polygon", "split_of_seed", "split_seed", "vocabulary", "word_class",
]
