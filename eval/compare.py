r"""One figure comparing explanation methods on the same ShapesWorld words (true masks outlined).

Usage::

    python -m eval.compare --checkpoint=toy --split=test --examples=0,1,2,3 \
        --methods=paper,diffusion_cam,hirescam --out=docs/method_comparison.png

Each example's answer is generated once (greedy) and every method explains the same answer; one row per example
shows the first word of the answer that is the colour or shape of exactly one object of the image
(``--words_per_example`` for more), with that object's true mask outlined in white.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", "toy", "'toy' (the embedded model) or a converted checkpoint directory.")
flags.DEFINE_string("split", "test", "ShapesWorld split: train | validation | test.")
flags.DEFINE_string("shapes_preset", "default", "ShapesWorld preset (easy, simple, default, hard).")
flags.DEFINE_list("examples", ["0", "1", "2", "3"], "Example indices of the split (one or more rows each).")
flags.DEFINE_integer("words_per_example", 1, "Object words shown per example (rows).")
flags.DEFINE_list("methods", ["paper", "diffusion_cam", "hirescam"], "Methods, one column each (see "
                  "`python -m eval.run --help` for the names).")
flags.DEFINE_string("out", None, "Output PNG path (required).")
flags.DEFINE_integer("seed", 0, "Seed of the sampler (greedy decoding does not use it).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not FLAGS.out:
        raise app.UsageError("--out is required (a .png path)")
    import jax

    import dcam_jax as dj
    from dcam_jax import api, viz
    from dcam_jax.cam import targets as cam_targets
    from dcam_jax.data import shapes

    try:
        cams = {m: dj.CamConfig(method=m) for m in FLAGS.methods}
        indices = [int(i) for i in FLAGS.examples]
        cfg = shapes.preset(FLAGS.shapes_preset)
        if FLAGS.split not in shapes.SPLITS:
            raise ValueError(f"--split={FLAGS.split!r}; expected one of {shapes.SPLITS}")
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    model = dj.load_pretrained(FLAGS.checkpoint)
    images, labels, masks = [], [], []
    maps: dict[str, list] = {m: [] for m in FLAGS.methods}
    for i in indices:
        example = shapes.make_example(shapes.split_seed(FLAGS.split, i), cfg)
        pre = api.prepare(model, example.image, None)
        g = dj.generate(model, example.image, None, key=jax.random.key(FLAGS.seed), prepared=pre)
        words = cam_targets.group_words(g.token_strings[:g.num_valid])
        chosen = []
        for w, _ in words:
            hits = [k for k, (c, s) in enumerate(zip(example.colours, example.shapes)) if w in (c, s)]
            if len(hits) == 1 and w not in [x for x, _ in chosen]:
                chosen.append((w, hits[0]))
        for w, k in chosen[:FLAGS.words_per_example]:
            images.append(example.image)
            labels.append(f"#{i} {w}")
            masks.append(example.masks[k])
            for m, cam in cams.items():
                e = dj.explain(model, example.image, None, targets=[w], config=cam, generation=g)
                maps[m].append(e.maps[0])
    if not images:
        raise app.UsageError("no example's answer names an object unambiguously; try other --examples")
    path = viz.method_grid(images, labels, maps, FLAGS.out, masks=masks,
                           title=f"{model.config.name}, ShapesWorld {FLAGS.split}: the same words under each method")
    print(f"wrote {Path(path)} ({len(images)} rows x {len(maps)} methods)")


if __name__ == "__main__":
    from dcam_jax.tool import run_tool

    run_tool(main)
