r"""The ablation table of the evaluation protocol (SPEC 4.6): matched Obj-IoU and pointing game per run, per
ShapesWorld preset and per size of the named object in tokens.

Usage (after ``eval.sweep`` runs on the validation split of two presets)::

    python -m eval.protocol --run_dirs=runs/protocol/refine_default,runs/protocol/refine_easy \
        --out=runs/protocol/refine.md

Each directory in ``--run_dirs`` is an ``eval.run`` output directory or an ``eval.sweep`` directory (every cell
in it is read). Rows are keyed by the cell's name and method; columns are the presets found in the runs (each with
its number of matched object words), the pooled numbers, and matched Obj-IoU per object-size bin (the named
object's visible mask area in image tokens, pooled over presets). Object sizes are recomputed from the
deterministic ShapesWorld example of each record, so old runs need no extra field.

``--ceiling_examples=N`` adds the token-resolution ceiling of each preset found: the matched Obj-IoU and pointing
game of an oracle map that is each object's true mask averaged over every image token (the best a map at the
token grid's resolution can do under the same bilinear resize and Otsu binarisation), over every object of the
first N examples of the split.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from absl import app, flags

from dcam_jax import fileio
from eval import config as eval_config

SIZE_BINS = ((0.0, 3.0, "<=3"), (3.0, 9.0, "3-9"), (9.0, 1e9, ">9"))


@dataclasses.dataclass
class Cell:
    """One eval.run directory: its name (relative to the sweep), run config and object-word records."""

    name: str
    path: Path
    config: dict
    records: list[dict]


def find_cells(run_dirs: Sequence[str]) -> list[Cell]:
    """Every eval.run directory in ``run_dirs`` (a run directory itself, or the cells of a sweep directory)."""
    cells = []
    for d in run_dirs:
        root = Path(d)
        if not root.is_dir():
            raise ValueError(f"--run_dirs: {d} is not a directory")
        dirs = [root] if (root / eval_config.RUN_CONFIG).exists() else sorted(
            p.parent for p in root.glob(f"*/{eval_config.RUN_CONFIG}"))
        if not dirs:
            raise ValueError(f"--run_dirs: {d} holds no eval.run output ({eval_config.RUN_CONFIG} not found)")
        for p in dirs:
            cfg = json.loads((p / eval_config.RUN_CONFIG).read_text())
            recs = []
            for f in sorted(p.glob(eval_config.RECORDS_GLOB)):
                for line in f.read_text().splitlines():
                    if line.strip():
                        r = json.loads(line)
                        if r.get("type") == "word" and r.get("role") == "object" and r.get("matched"):
                            recs.append(r)
            name = p.name if p != root else root.name
            cells.append(Cell(name, p, cfg, recs))
    return cells


class ObjectSizes:
    """Visible mask area, in image tokens, of object k of ShapesWorld example i (cached per example)."""

    def __init__(self, tokens_per_side: int):
        self.tokens_per_side = tokens_per_side
        self._cache: dict[tuple, np.ndarray] = {}

    def __call__(self, split: str, preset: str, index: int, obj: int) -> float:
        from dcam_jax.data import shapes

        key = (split, preset, index)
        if key not in self._cache:
            ex = shapes.make_example(shapes.split_seed(split, index), shapes.preset(preset))
            px_per_token = (ex.masks.shape[1] / self.tokens_per_side) ** 2
            self._cache[key] = ex.masks.reshape(ex.masks.shape[0], -1).sum(1) / px_per_token
        return float(self._cache[key][obj])


def size_bin(tokens: float) -> str:
    for lo, hi, name in SIZE_BINS:
        if lo < tokens <= hi or (lo == 0.0 and tokens <= hi):
            return name
    raise AssertionError(tokens)


def summarize(cells: Iterable[Cell], sizes: ObjectSizes) -> dict:
    """{(cell name, method): {"preset": {p: (n, iou, pointing)}, "all": (n, iou, pointing),
    "size": {bin: (n, iou, pointing)}}} with iou and pointing in %."""
    acc: dict = defaultdict(lambda: {"preset": defaultdict(list), "size": defaultdict(list)})
    for c in cells:
        preset, split = c.config.get("shapes_preset", "default"), c.config.get("split", "validation")
        for r in c.records:
            m = r["matched"]
            row = acc[(c.name, r["method"])]
            row["preset"][preset].append((m["obj_iou"], float(m["pointing_game"])))
            if r.get("objects") and c.config.get("dataset", "shapes") == "shapes":
                t = sizes(split, preset, int(r["example"]), int(r["objects"][0]))
                row["size"][size_bin(t)].append((m["obj_iou"], float(m["pointing_game"])))
    out = {}
    for key, row in acc.items():
        stat = lambda v: (len(v), 100 * float(np.mean([a for a, _ in v])), 100 * float(np.mean([b for _, b in v])))
        pooled = [x for v in row["preset"].values() for x in v]
        out[key] = {"preset": {p: stat(v) for p, v in row["preset"].items()}, "all": stat(pooled),
                    "size": {b: stat(v) for b, v in row["size"].items()}}
    return out


def token_ceiling(split: str, preset: str, num_examples: int, tokens_per_side: int) -> tuple[int, float, float]:
    """(objects, mean matched Obj-IoU %, pointing %) of the oracle map: each object's visible mask averaged over
    each image token ([H, W] -> [t, t], t = tokens_per_side), scored like an explanation map."""
    from dcam_jax import metrics
    from dcam_jax.data import shapes

    ious, hits = [], []
    for i in range(num_examples):
        ex = shapes.make_example(shapes.split_seed(split, i), shapes.preset(preset))
        H, W = ex.label_map.shape
        if H % tokens_per_side or W % tokens_per_side:
            raise ValueError(f"image {H}x{W} is not a multiple of {tokens_per_side} tokens per side")
        for k in range(ex.num_objects):
            oracle = ex.masks[k].reshape(tokens_per_side, H // tokens_per_side, tokens_per_side,
                                         W // tokens_per_side).mean(axis=(1, 3))
            rec = metrics.map_metrics(oracle / max(oracle.max(), 1e-12), ex.masks[k].astype(np.uint8),
                                      mode="matched", label=1)
            ious.append(rec["obj_iou"])
            hits.append(float(rec["pointing_game"]))
    return len(ious), 100 * float(np.mean(ious)), 100 * float(np.mean(hits))


def markdown(summary: dict) -> str:
    """The summary as one markdown table (rows in the order the cells were found)."""
    presets = sorted({p for v in summary.values() for p in v["preset"]})
    head = ["cell", "method"] + [f"{p}: Obj-IoU / pointing % (words)" for p in presets] + \
        ["pooled Obj-IoU / pointing %"] + [f"{b} tokens (words)" for _, _, b in SIZE_BINS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (name, method), v in summary.items():
        cells = [name, method]
        for p in presets:
            s = v["preset"].get(p)
            cells.append(f"{s[1]:.1f} / {s[2]:.1f} ({s[0]})" if s else "")
        cells.append(f"{v['all'][1]:.1f} / {v['all'][2]:.1f}")
        for _, _, b in SIZE_BINS:
            s = v["size"].get(b)
            cells.append(f"{s[1]:.1f} / {s[2]:.1f} ({s[0]})" if s else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


FLAGS = flags.FLAGS
flags.DEFINE_list("run_dirs", None, "eval.run or eval.sweep output directories to tabulate (comma-separated).")
flags.DEFINE_string("out", None, "Write the markdown table here (default: print it only).")
flags.DEFINE_integer("ceiling_examples", 0, "Also report the token-resolution ceiling of each preset over the "
                     "first N examples of the split (0: no).")
flags.DEFINE_integer("tokens_per_side", 8, "Image tokens per side of the explained view (the toy model: 8), to "
                     "express object sizes in tokens.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not FLAGS.run_dirs:
        raise app.UsageError("--run_dirs is required (eval.run or eval.sweep output directories)")
    try:
        cells = find_cells(FLAGS.run_dirs)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    text = markdown(summarize(cells, ObjectSizes(FLAGS.tokens_per_side)))
    if FLAGS.ceiling_examples:
        seen = sorted({(c.config.get("split", "validation"), c.config.get("shapes_preset", "default"))
                       for c in cells})
        text += "\n| token-resolution ceiling | objects | Obj-IoU % | pointing % |\n|---|---|---|---|\n"
        for split, preset in seen:
            n, iou, hit = token_ceiling(split, preset, FLAGS.ceiling_examples, FLAGS.tokens_per_side)
            text += f"| {split}, {preset} | {n} | {iou:.1f} | {hit:.1f} |\n"
    print(text)
    if FLAGS.out:
        fileio.write_text(FLAGS.out, text)


if __name__ == "__main__":
    from dcam_jax.tool import run_tool

    run_tool(main)
