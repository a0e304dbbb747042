r"""Write the bundled ShapesWorld sample images that ``dcam demo`` explains.

    python -m dcam_jax.data.shapes_samples --out_dir=dcam_jax/assets/samples

For each of ``--count`` test examples starting at ``--start`` (``default`` preset), writes ``shapes_<i>.png`` (the
image), ``shapes_<i>_labels.png`` (its object label map: 0 = background or clutter, k + 1 = object k of the
caption) and ``shapes_<i>.json`` (seed, split, index, preset, caption, words, their object indices and classes,
background tone). Every file is a pure function of the generator version and the flags; ``tests`` check that
the bundled samples equal what this writes.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from dcam_jax import fileio
from dcam_jax.data import shapes

DEFAULT_START = 100_005
DEFAULT_COUNT = 8


def sample_files(index: int, position: int, preset: str = "default", split: str = "test") -> dict[str, bytes]:
    """{file name: bytes} of one sample: example ``index`` of ``split`` written as sample number ``position``."""
    e = shapes.make_example(shapes.split_seed(split, index), shapes.preset(preset))
    meta = {"seed": e.seed, "split": split, "index": index, "preset": preset, "generator": shapes.GENERATOR_VERSION,
            "caption": e.caption, "words": list(e.words), "word_object": list(e.word_object),
            "word_class": list(e.word_class), "tone": e.tone}

    def png(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()

    return {f"shapes_{position}.png": png(e.image), f"shapes_{position}_labels.png": png(e.label_map),
            f"shapes_{position}.json": (json.dumps(meta, indent=1) + "\n").encode()}


def write_samples(out_dir: str | os.PathLike, start: int = DEFAULT_START, count: int = DEFAULT_COUNT) -> list[Path]:
    """Write ``count`` samples (test examples ``start ..``) into ``out_dir``; returns the written paths."""
    if count < 1 or start < 0:
        raise ValueError(f"need count >= 1 and start >= 0, got count={count}, start={start}")
    out = []
    for k in range(count):
        for name, data in sample_files(start + k, k).items():
            out.append(fileio.write_bytes(Path(out_dir) / name, data))
    return out


def main(argv):
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    paths = write_samples(_FLAGS.out_dir, _FLAGS.start, _FLAGS.count)
    print(f"wrote {len(paths)} files to {_FLAGS.out_dir}")


_FLAGS = None

if __name__ == "__main__":
    from absl import flags

    flags.DEFINE_string("out_dir", "dcam_jax/assets/samples", "Folder to write the samples into.")
    flags.DEFINE_integer("start", DEFAULT_START, "Index of the first ShapesWorld test example.")
    flags.DEFINE_integer("count", DEFAULT_COUNT, "Number of samples.")
    _FLAGS = flags.FLAGS
    from dcam_jax.tool import run_tool

    run_tool(main)
