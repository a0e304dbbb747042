r"""The pictures of the toy model's card: what it can describe, and what it cannot.

    python -m dcam_jax.toy.card_figures --checkpoint=toy --out_dir=docs

Writes two PNGs into ``--out_dir``:

- ``toy_can.png``: ShapesWorld test images of the ``default`` preset (every background tone) and shapes drawn by
  PIL (:mod:`dcam_jax.data.pil_shapes`) on dark, light and white backgrounds at other sizes, each with the true
  caption and the model's (greedy, the model's default sampling);
- ``toy_cannot.png``: inputs outside what it was trained on, with its answers: more objects than four, two
  objects of one colour, a shape it has no word for (a hexagon), a photo-like texture, tiny objects.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from dcam_jax import fileio
from dcam_jax.data import pil_shapes, shapes


def caption(model, image: np.ndarray) -> str:
    """The model's greedy answer for ``image`` [H, W, 3] uint8 with its default prompt and sampling."""
    import jax

    from dcam_jax import api

    return api.generate(model, image, None, key=jax.random.key(0)).text


def can_examples(count: int = 8) -> list[tuple[np.ndarray, str]]:
    """(image, true caption) pairs the model is meant to describe: ShapesWorld test images (one per background
    tone first) and PIL-drawn shapes at other sizes."""
    out, seen = [], set()
    cfg = shapes.preset("default")
    i = 0
    while len(out) < count // 2 and i < 200:
        e = shapes.make_example(shapes.split_seed("test", i), cfg)
        if e.tone not in seen:
            seen.add(e.tone)
            out.append((e.image, e.caption))
        i += 1
    for k, (bg, w, h) in enumerate((("white", 128, 128), ("light", 160, 96), ("dark", 96, 160),
                                    ("white", 200, 120))[:count - len(out)]):
        e = pil_shapes.make_example(shapes.split_seed("test", 7 + k), pil_shapes.PilShapesConfig(
            width=w, height=h, background=bg))
        out.append((e.image, e.caption))
    return out


def cannot_examples() -> list[tuple[np.ndarray, str]]:
    """(image, what is in it) pairs outside the training distribution."""
    rng = np.random.default_rng(0)
    out = []
    # six objects (training has at most four)
    cfg = shapes.preset("default", max_objects=6, min_objects=6, radius_range=(0.1, 0.13), tones=("dark",),
                        antialias_prob=0.0, blur_prob=0.0, jpeg_prob=0.0, letterbox_prob=0.0)
    e = shapes.make_example(shapes.split_seed("test", 3), cfg)
    out.append((e.image, e.caption))
    # two objects of one colour
    cfg = shapes.preset("default", distinct_colours=False, colours=("red",), max_objects=2, min_objects=2,
                        tones=("white",), antialias_prob=0.0, blur_prob=0.0, jpeg_prob=0.0, letterbox_prob=0.0)
    e = shapes.make_example(shapes.split_seed("test", 5), cfg)
    out.append((e.image, e.caption))
    # a shape without a word: a hexagon
    img = Image.new("RGB", (64, 64), (240, 240, 240))
    d = ImageDraw.Draw(img)
    ang = np.linspace(0, 2 * np.pi, 7)[:-1]
    d.polygon([(32 + 16 * np.cos(a), 32 + 16 * np.sin(a)) for a in ang], fill=(45, 95, 245))
    out.append((np.asarray(img), "a blue hexagon (no word for it)"))
    # a photo-like texture
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    tex = np.asarray(Image.fromarray(small).resize((64, 64), Image.BICUBIC))
    out.append((tex, "no shapes: a smooth colour texture"))
    # tiny objects (3 px radius at 64 px; training draws 9 px and up)
    cfg = shapes.preset("default", radius_range=(0.05, 0.055), tones=("light",), antialias_prob=0.0,
                        blur_prob=0.0, jpeg_prob=0.0, letterbox_prob=0.0, min_objects=2, max_objects=2)
    e = shapes.make_example(shapes.split_seed("test", 2), cfg)
    out.append((e.image, e.caption))
    return out


def grid(items: Sequence[tuple[np.ndarray, str, str]], path: str | os.PathLike, title: str,
         columns: int = 4) -> Path:
    """A figure of images with two captions each (truth, model). items: (image, truth, answer)."""
    import textwrap

    from dcam_jax.viz import pyplot

    plt = pyplot()

    rows = -(-len(items) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 4.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (img, truth, answer) in zip(axes.ravel(), items):
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.imshow(img, interpolation="nearest")
        text = textwrap.fill(f"true: {truth}", 44) + "\n" + textwrap.fill(f"model: {answer}", 44)
        ax.set_title(text, fontsize=7.5, loc="left")
    fig.suptitle(title, fontsize=11)
    return fileio.save_figure(fig, path, dpi=90)


def main(argv):
    from absl import app

    from dcam_jax import api

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    model = api.load_pretrained(_FLAGS.checkpoint)
    out = Path(_FLAGS.out_dir)
    can = [(img, truth, caption(model, img)) for img, truth in can_examples()]
    cannot = [(img, truth, caption(model, img)) for img, truth in cannot_examples()]
    for img, truth, answer in can + cannot:
        print(f"true: {truth}\n  model: {answer}")
    grid(can, out / "toy_can.png", "What the toy model describes: ShapesWorld test images and PIL-drawn shapes")
    grid(cannot, out / "toy_cannot.png", "Outside its world: the toy model's answers", columns=5)
    print(f"wrote {out / 'toy_can.png'} and {out / 'toy_cannot.png'}")


_FLAGS = None

if __name__ == "__main__":
    from absl import flags

    flags.DEFINE_string("checkpoint", "toy", "'toy' or a checkpoint directory.")
    flags.DEFINE_string("out_dir", "docs", "Folder for toy_can.png and toy_cannot.png.")
    _FLAGS = flags.FLAGS
    from dcam_jax.tool import run_tool

    run_tool(main)
