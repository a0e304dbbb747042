"""ShapesWorld as a TFDS data set: array_record files, PNG images, no TensorFlow needed.

Build it once, then stream it with ``tfds.data_source`` and grain::

    from dcam_jax.data import shapes_tfds
    shapes_tfds.build("/data/tfds", preset="default", num_examples={"train": 100_000})
    source = tfds.data_source("shapes_world/default", data_dir="/data/tfds", download=False)
    ds = (grain.MapDataset.source(source["train"]).shuffle(seed=0)
          .map(shapes_tfds.RecordToArrays(shapes.preset("default"))).batch(64))

Records keep generation order (shuffling at write time is disabled): record ``i`` of split ``s`` is
``shapes.make_example(shapes.split_seed(s, i), config)``, and every record also stores its seed.

TensorFlow is only needed by TFDS to *encode* numpy images; we hand it PNG bytes made with PIL
instead, and reading array_record through ``tfds.data_source`` decodes PNG with PIL.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, Mapping, Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from dcam_jax.data import shapes

NAME = "shapes_world"
DEFAULT_NUM_EXAMPLES: dict[str, int] = {"train": 512, "validation": 128, "test": 128}
TEXTURE_NAMES: tuple[str, ...] = ("plain",) + shapes.TEXTURES
RELATION_NAMES: tuple[str, ...] = tuple(shapes.RELATION_PHRASES)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of image: [H, W, 3] or [H, W] or [H, W, 1] uint8."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(
            f"encode_png expects a uint8 [H, W], [H, W, 1] or [H, W, 3] array, got {image.dtype} "
            f"{image.shape}."
        )
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclasses.dataclass(eq=False)
class ShapesWorldConfig(tfds.core.BuilderConfig):
    """A TFDS builder config: the ShapesConfig every example is generated with.

    The presets ('easy', 'simple', 'default', 'dark', 'hard') are registered configs; any other name is a
    custom config that TFDS reads back from the files it wrote (their dataset_info.json).
    """

    shapes_config: shapes.ShapesConfig = shapes.ShapesConfig()


def make_config(
    name: str = "default", shapes_config: Optional[shapes.ShapesConfig] = None
) -> ShapesWorldConfig:
    """A ShapesWorldConfig.

    Args:
      name: config name (the sub-directory under ``data_dir/shapes_world``); when shapes_config is
        None it must be a preset name and selects that preset.
      shapes_config: the ShapesConfig, or None for ``shapes.preset(name)``.
    """
    if shapes_config is None:
        shapes_config = shapes.preset(name)
    if not isinstance(shapes_config, shapes.ShapesConfig):
        raise ValueError(
            f"shapes_config must be a ShapesConfig, got {type(shapes_config).__name__}."
        )
    return ShapesWorldConfig(
        name=name,
        description="ShapesWorld " + json.dumps(dataclasses.asdict(shapes_config), sort_keys=True),
        shapes_config=shapes_config,
    )


def _split_counts(num_examples: Optional[Mapping[str, int]]) -> dict[str, int]:
    """Examples per split: the defaults (train 512, validation 128, test 128) updated by
    num_examples; counts must be ints in [0, 2**40)."""
    counts = dict(DEFAULT_NUM_EXAMPLES)
    for split, count in (num_examples or {}).items():
        if split not in shapes.SPLITS:
            raise ValueError(f"num_examples has unknown split {split!r}; expected {shapes.SPLITS}.")
        is_int = isinstance(count, (int, np.integer)) and not isinstance(count, bool)
        if not is_int or not 0 <= count < shapes.SPLIT_SIZE:
            raise ValueError(f"num_examples[{split!r}]={count!r} must be an int in [0, 2**40).")
        counts[split] = int(count)
    if not any(counts.values()):
        raise ValueError("num_examples asks for 0 examples in every split; ask for at least one.")
    return counts


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
    """ShapesWorld: procedural images, captions, label maps and word-to-object alignment.

    Args (besides the usual data_dir, config, file_format):
      num_examples: examples to write per split when preparing, e.g. {"train": 100_000};
        missing splits get the defaults (train 512, validation 128, test 128); 0 skips a split.
    """

    VERSION = tfds.core.Version(shapes.GENERATOR_VERSION)
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [make_config(name) for name in shapes.PRESETS]
    DEFAULT_CONFIG_NAME = "default"
    # TFDS finds a builder's source file through `importlib_resources`, an etils[epath] extra that
    # may be missing (it is here); the path only serves to look for a checksums file, and we
    # download nothing, so name the file directly.
    code_path = epath.Path(__file__)

    def __init__(self, *, num_examples: Optional[Mapping[str, int]] = None, **kwargs):
        self._num_examples = _split_counts(num_examples)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config.shapes_config
        n = c.image_size
        feats = tfds.features
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n", 1)[0],
            features=feats.FeaturesDict({
                "seed": feats.Scalar(dtype=np.int64),
                "image": feats.Image(shape=(n, n, 3), encoding_format="png"),
                # 0 = background or clutter, k + 1 = object k (caption order).
                "label_map": feats.Image(shape=(n, n, 1), encoding_format="png"),
                "caption": feats.Text(),
                "background": feats.ClassLabel(names=shapes.BACKGROUNDS),
                "tone": feats.ClassLabel(names=shapes.TONE_NAMES),
                # (top, left, height, width) of the scene's band; (0, 0, H, W) without letterbox.
                "letterbox": feats.Tensor(shape=(4,), dtype=np.int32),
                "antialiased": feats.Scalar(dtype=np.bool_),
                "words": feats.Sequence(feats.Text()),
                # Object index per word, -1 for words that name no object.
                "word_object": feats.Sequence(feats.Scalar(dtype=np.int32)),
                "word_class": feats.Sequence(feats.ClassLabel(names=shapes.WORD_CLASSES)),
                "objects": feats.Sequence({
                    "shape": feats.ClassLabel(names=shapes.SHAPES),
                    "colour": feats.ClassLabel(names=shapes.COLOUR_NAMES),
                    "size": feats.ClassLabel(names=shapes.SIZE_WORDS),
                    "texture": feats.ClassLabel(names=TEXTURE_NAMES),
                    "radius": feats.Scalar(dtype=np.float32),
                    "rotation": feats.Scalar(dtype=np.float32),
                    "centre_yx": feats.Tensor(shape=(2,), dtype=np.float32),
                    # (y0, x0, y1, x1) of the visible mask in pixels, end exclusive.
                    "bbox": feats.Tensor(shape=(4,), dtype=np.int32),
                    "z_order": feats.Scalar(dtype=np.int32),
                }),
                "relations": feats.Sequence({
                    "subject": feats.Scalar(dtype=np.int32),
                    "relation": feats.ClassLabel(names=RELATION_NAMES),
                    "object": feats.Scalar(dtype=np.int32),
                }),
            }),
            # Keep generation order so that record i is example i of the split.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: every example is generated
        return {
            split: self._generate_examples(split, count)
            for split, count in self._num_examples.items()
            if count > 0
        }

    def _generate_examples(self, split: str, count: int):
        c = self.builder_config.shapes_config
        for index in range(count):
            example = shapes.make_example(shapes.split_seed(split, index), c)
            yield index, example_to_features(example)


def example_to_features(example: shapes.Example) -> dict[str, Any]:
    """The TFDS feature dict of an example (images as PNG bytes)."""
    return {
        "seed": np.int64(example.seed),
        "image": encode_png(example.image),
        "label_map": encode_png(example.label_map),
        "caption": example.caption,
        "background": example.background,
        "tone": example.tone,
        "letterbox": np.array(example.letterbox or (0, 0) + example.image.shape[:2], np.int32),
        "antialiased": np.bool_(example.antialiased),
        "words": list(example.words),
        "word_object": example.word_object_array(),
        "word_class": list(example.word_class),
        "objects": {
            "shape": list(example.shapes),
            "colour": list(example.colours),
            "size": list(example.sizes),
            "texture": list(example.textures),
            "radius": example.radii,
            "rotation": example.rotations,
            "centre_yx": example.centres_yx.reshape(-1, 2),
            "bbox": example.bboxes.reshape(-1, 4),
            "z_order": example.z_order,
        },
        "relations": {
            "subject": np.array([r[0] for r in example.relations], np.int32),
            "relation": [r[1] for r in example.relations],
            "object": np.array([r[2] for r in example.relations], np.int32),
        },
    }


def make_builder(
    data_dir: str | os.PathLike,
    preset: str = "default",
    *,
    shapes_config: Optional[shapes.ShapesConfig] = None,
    num_examples: Optional[Mapping[str, int]] = None,
    name: Optional[str] = None,
) -> ShapesWorld:
    """A ShapesWorld builder writing array_record files under ``data_dir``.

    Args:
      data_dir: TFDS data directory.
      preset: a preset name ('easy', 'simple', 'default', 'dark', 'hard'): the registered config used when
        neither shapes_config nor name says otherwise.
      shapes_config: a custom ShapesConfig; it needs a ``name`` of its own.
      num_examples: examples per split, e.g. {"train": 1000} (defaults: 512 / 128 / 128).
      name: config name, i.e. the directory ``data_dir/shapes_world/<name>``; must not be another
        preset's name.
    """
    base = shapes.preset(preset)  # validates the preset name
    custom = shapes_config is not None and shapes_config != base
    if custom and name is None:
        raise ValueError(
            f"a custom shapes_config differs from preset {preset!r} and needs its own name= "
            "(the name picks the directory it is written to)."
        )
    if name is not None and name != preset and name in shapes.PRESETS:
        raise ValueError(f"name={name!r} is another preset's name; choose a new config name.")
    if name is None or name == preset:
        config: Any = preset  # a registered config, by name
    else:
        config = make_config(name, shapes_config if custom else base)
    return ShapesWorld(data_dir=os.fspath(data_dir), config=config, file_format="array_record",
                       num_examples=num_examples)


def build(data_dir: str | os.PathLike, preset: str = "default", **kwargs) -> ShapesWorld:
    """make_builder(...) then write the data set (nothing is downloaded). Returns the builder.

    TFDS reuses a data set already written in the same place; if that one has other split sizes
    than asked for, this raises instead of silently handing back the old one.
    """
    builder = make_builder(data_dir, preset, **kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    wanted = {s: n for s, n in _split_counts(kwargs.get("num_examples")).items() if n > 0}
    found = {str(s): int(info.num_examples) for s, info in builder.info.splits.items()}
    if found != wanted:
        raise ValueError(
            f"{builder.data_dir} already holds ShapesWorld with splits {found}, not the requested "
            f"{wanted}; delete that directory or build under another data_dir or name=."
        )
    return builder


class RecordToArrays:
    """Turns a decoded record into fixed-shape arrays, so grain (or np.stack) can batch it.

    Returns a dict with M = config.max_objects, L = shapes.max_caption_words(config):
      image [H, W, 3] uint8, label_map [H, W] uint8, masks [M, H, W] bool,
      num_objects int32, shapes [M] int32 (-1 pad), colours [M] int32 (-1 pad),
      bboxes [M, 4] int32, centres_yx [M, 2] float32, word_object [L] int32 (-1 none/pad),
      num_words int32, seed int64, caption str, tone int32 (index in shapes.TONE_NAMES),
      letterbox [4] int32 (top, left, height, width of the scene), antialiased bool.
    """

    def __init__(self, config: shapes.ShapesConfig):
        if not isinstance(config, shapes.ShapesConfig):
            raise ValueError(f"config must be a ShapesConfig, got {type(config).__name__}.")
        self.config = config

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
        c = self.config
        n, m, words_max = c.image_size, c.max_objects, shapes.max_caption_words(c)
        image = np.asarray(record["image"], np.uint8)
        if image.shape != (n, n, 3):
            raise ValueError(
                f"record image has shape {image.shape}, expected {(n, n, 3)} for this config; "
                "use the ShapesConfig the data set was built with."
            )
        label_map = np.asarray(record["label_map"], np.uint8).reshape(n, n)
        objects = record["objects"]
        k = len(objects["shape"])
        word_object = np.asarray(record["word_object"], np.int32)
        if k > m or word_object.shape[0] > words_max:
            raise ValueError(
                f"record has {k} objects and {word_object.shape[0]} words; this config allows "
                f"{m} and {words_max}. Use the ShapesConfig the data set was built with."
            )

        def padded(values, shape, dtype, fill):
            out = np.full(shape, fill, dtype)
            out[:k] = np.asarray(values, dtype).reshape((k,) + shape[1:])
            return out

        words = np.full(words_max, -1, np.int32)
        words[: word_object.shape[0]] = word_object
        return {
            "image": image,
            "label_map": label_map,
            "masks": label_map[None] == np.arange(1, m + 1, dtype=np.uint8)[:, None, None],
            "num_objects": np.int32(k),
            "shapes": padded(objects["shape"], (m,), np.int32, -1),
            "colours": padded(objects["colour"], (m,), np.int32, -1),
            "bboxes": padded(objects["bbox"], (m, 4), np.int32, 0),
            "centres_yx": padded(objects["centre_yx"], (m, 2), np.float32, 0.0),
            "word_object": words,
            "num_words": np.int32(word_object.shape[0]),
            "seed": np.int64(record["seed"]),
            "caption": _text(record["caption"]),
            "tone": np.int32(record["tone"]),
            "letterbox": np.asarray(record["letterbox"], np.int32).reshape(4),
            "antialiased": np.bool_(record["antialiased"]),
        }


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
