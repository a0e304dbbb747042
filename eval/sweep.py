r"""A grid of evaluation runs in one process: the model is loaded once and generated answers are shared.

Usage (a layer x refinement ablation of Diffusion-CAM on ShapesWorld)::

    python -m eval.sweep --checkpoint=toy --dataset=shapes --num_examples=200 --out_dir=runs/sweep_layers \
        --grid="layer=1,2,3;refine=full,none;methods=diffusion_cam"

``--grid`` is a list of ``FLAG=VALUE,VALUE,...`` separated by ``;``. FLAG is any flag of ``eval.run`` (``method``
is accepted for ``methods``; several methods in one cell are joined with ``+``: ``methods=gradcam+uniform``;
``none`` sets an optional flag back to its default). Every other flag of ``eval.run`` (below) is the base
configuration of every cell. The sweep runs the cartesian product of the values, each cell into
``OUT_DIR/<flag>-<value>__...`` with its own records and summary, and writes ``OUT_DIR/sweep_summary.json`` and
``OUT_DIR/sweep_summary.md`` (one row per cell and method).

Answers are generated once per example and setting: cells that differ only in CAM flags (layer, probe, refine,
method, ...) share ``OUT_DIR/generations``, so a 6-cell grid generates each answer once. ``--resume`` resumes
every cell.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import Sequence

from absl import app, flags, logging

from dcam_jax import fileio
from eval import config as eval_config
from eval import run as run_lib


def parse_grid(text: str) -> list[tuple[str, list[str]]]:
    """``"layer=1,2;refine=full,none"`` -> ``[("layer", ["1", "2"]), ("refine", ["full", "none"])]``.

    Raises ValueError for an empty grid, a part without ``=``, a flag listed twice or a flag without values.
    """
    if not text or not text.strip():
        raise ValueError("--grid is empty; write e.g. --grid='layer=1,2,3;refine=full,none'")
    out, seen = [], set()
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"--grid part {part!r} has no '='; write FLAG=VALUE,VALUE,...")
        key, values = part.split("=", 1)
        key = key.strip()
        name = "methods" if key == "method" else key
        if name in seen:
            raise ValueError(f"--grid lists {key!r} twice")
        seen.add(name)
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise ValueError(f"--grid flag {key!r} has no values")
        out.append((key, vals))
    if not out:
        raise ValueError("--grid has no FLAG=VALUES parts")
    return out


def cell_name(assignment: dict[str, str]) -> str:
    """A directory name for one grid cell: ``layer-1__refine-full``."""
    parts = [f"{k}-{v}" for k, v in assignment.items()]
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", "__".join(parts))


def cells(base: eval_config.RunConfig, grid: Sequence[tuple[str, list[str]]], sweep_dir: Path) -> \
        list[tuple[dict[str, str], eval_config.RunConfig]]:
    """The (assignment, RunConfig) of every cell, validated (bad flags or values fail before any work)."""
    fixed = {"out_dir", "resume", "overwrite"}
    for key, _ in grid:
        if key in fixed:
            raise ValueError(f"--grid cannot vary {key!r}; the sweep sets it for every cell")
    out = []
    gen_dir = base.generation_cache_dir or str(sweep_dir / "generations")
    for combo in itertools.product(*[[(k, v) for v in vals] for k, vals in grid]):
        assignment = dict(combo)
        cfg = eval_config.replace_config(base, assignment)
        cfg = dataclasses.replace(cfg, out_dir=str(sweep_dir / cell_name(assignment)), generation_cache_dir=gen_dir)
        eval_config.validate(cfg)
        out.append((assignment, cfg))
    return out


def run_sweep(base: eval_config.RunConfig, grid: Sequence[tuple[str, list[str]]], sweep_dir: str | Path, *,
              model=None) -> dict:
    """Run every cell of ``grid`` over ``base`` (see the module docstring) and write the sweep summary.

    model: a loaded dcam_jax.api.Model used for every cell whose checkpoint is ``base.checkpoint`` (others are
    loaded once each). Returns {"cells": [{"assignment", "out_dir", "summary", "calls"}], "summary_md": str}.
    """
    from eval import report

    sweep_dir = Path(sweep_dir)
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise ValueError(f"--out_dir={sweep_dir} exists and is a file; pass a directory")
    todo = cells(base, grid, sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    models = {}
    if model is not None:
        models[(base.checkpoint, base.dtype, base.mesh_model)] = model
    caches: dict = {}
    results = []
    for n, (assignment, cfg) in enumerate(todo):
        logging.info("sweep cell %d/%d: %s", n + 1, len(todo), assignment)
        mkey = (cfg.checkpoint, cfg.dtype, cfg.mesh_model)
        if mkey not in models:
            models[mkey] = run_lib.load_model(cfg)
        res = run_lib.run(cfg, model=models[mkey], generation_caches=caches)
        results.append({"assignment": assignment, "out_dir": cfg.out_dir, "calls": res["calls"],
                        "summary": report.summarize_run(report.load_run(cfg.out_dir))})
    text = sweep_markdown(results, [k for k, _ in grid])
    fileio.write_text(sweep_dir / "sweep_summary.md", text)
    fileio.write_text(sweep_dir / "sweep_summary.json", json.dumps(
        {"grid": [[k, v] for k, v in grid], "base": base.to_json_dict(), "cells": results}, indent=2,
        allow_nan=False) + "\n")
    return {"cells": results, "summary_md": text}


def sweep_markdown(results: Sequence[dict], keys: Sequence[str]) -> str:
    """One row per (cell, method): the cell's grid values, Obj-IoU per mode, contrast, concentration, F3, Func-IoU."""
    from eval.report import fmt_pct as pct

    head = "| " + " | ".join(keys) + " | method | words | Obj-IoU matched % | Obj-IoU max % | Contrast | Conc. % | " \
        "Pointing % | F3 (of means) % | Func-IoU % |"
    lines = [head, "|" + "---|" * (len(keys) + 9)]
    for r in results:
        s = r["summary"]
        for m in s["methods"]:
            res = s["results"][m]
            mt, mx = res.get("matched"), res.get("max")
            ref = mt or mx
            fi = res.get("func_iou")
            vals = " | ".join(r["assignment"][k] for k in keys)
            contrast = "-" if not ref or ref["contrast"] is None else f"{ref['contrast']:.2f}x"
            lines.append(f"| {vals} | {m} | {ref['n'] if ref else 0} | {pct(mt and mt['obj_iou'])} | "
                         f"{pct(mx and mx['obj_iou'])} | {contrast} | {pct(ref and ref['concentration'])} | "
                         f"{pct(ref and ref['pointing_game'])} | {pct(ref and ref['f3_of_means'])} | "
                         f"{pct(fi and fi['mean'])} |")
    return "# Sweep\n\nContrast, concentration, pointing and F3 are from the matched mode when it is on.\n\n" + \
        "\n".join(lines) + "\n"


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """The flags of ``python -m eval.sweep``: every flag of eval.run (the base of each cell) plus --grid."""
    eval_config.define_flags(fv)
    flags.DEFINE_string("grid", None, "Cells to run: 'FLAG=V1,V2;FLAG2=V3,...' over eval.run flags (e.g. "
                        "'layer=1,2,3;refine=full,none;methods=diffusion_cam'); methods in one cell are joined "
                        "with '+'. --out_dir is the sweep directory; each cell writes a subdirectory.",
                        flag_values=fv)
    if fv is flags.FLAGS:
        from eval import config as run_config

        flags.adopt_module_key_flags(run_config, flag_values=fv)


def main(argv):
    """Entry point of ``python -m eval.sweep``: parse the grid, load the model once, run every cell."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag (see --help)")
    fv = flags.FLAGS
    try:
        grid = parse_grid(fv.grid or "")
        base = eval_config.config_from_flags(fv)
        if not base.out_dir:
            raise ValueError("--out_dir (the sweep directory) is required")
        todo = cells(base, grid, Path(base.out_dir))
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    run_lib.init_distributed(base)
    model = None
    if all(k != "checkpoint" for k, _ in grid):
        try:
            model = run_lib.load_model(base)
        except (FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
            raise app.UsageError(f"--checkpoint={base.checkpoint}: {e}") from None
    res = run_sweep(base, grid, base.out_dir, model=model)
    print(res["summary_md"])
    print(f"wrote {len(res['cells'])} cells and {Path(base.out_dir) / 'sweep_summary.md'}")


if __name__ == "__main__":
    define_flags()
    from dcam_jax.tool import run_tool

    run_tool(main)
