r"""Tables and plots of evaluation runs written by ``eval.run`` (or the cells of ``eval.sweep``).

Usage::

    python -m eval.report --run_dirs=runs/toy_shapes                 # print the tables, rewrite summary + plots
    python -m eval.report --run_dirs=runs/a,runs/b --out_dir=runs/cmp  # compare runs side by side

For each run directory the per-process record files (``records-*.jsonl``) are merged; an example that appears
twice (a rerun with another process count) is counted once, and a block cut short by a crash is ignored. Per
method and Obj-IoU mode the table gives (averaged over the scored *words*, all images pooled, as TAM does):

- Obj-IoU, precision and recall of the Otsu-binarised map (%),
- contrast = mean(map | object) / mean(map | background) (x), averaged over words whose background mean is not
  ~0; those are counted in the "bg~0" column instead of letting 1e8 ratios dominate,
- concentration = share of the map's energy on the object (%), pointing game hit rate (%),
- F3 per image (mean of per-word F3) and F3 of the means (the paper's table convention) (%),
- Func-IoU (TAM): the share of a function word's map below the answer's mean noun threshold (%),
- with ``eval.run --faithfulness``: mean deletion and insertion AUC of the model's log-probability of each object
  word as image patches are removed / revealed in the order of its map (dcam_jax.cam.faithfulness).

``matched`` scores a word against the object it names (TAM's protocol); ``max`` takes the best IoU over all
objects in the image (the Diffusion-CAM authors' code). For ShapesWorld there is also a per word class table
(colour / shape / size), the hallucination counts and the caption accuracy of the model.

Writes into the run directory (or ``--out_dir``): ``summary.json``, ``summary.md``, ``plots/metrics.png`` (a bar
per method and metric), ``plots/examples_{method}.png`` (overlays of the saved example maps) and, with
faithfulness measured, ``plots/faithfulness.png`` (mean deletion and insertion curves per method), drawn by
``eval.plots``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from absl import app, flags, logging

from dcam_jax import fileio
from eval.config import RECORDS_GLOB
from eval.plots import plot_examples, plot_faithfulness, plot_metrics

METRIC_KEYS = ("obj_iou", "precision", "recall", "contrast", "concentration", "pointing_game", "f3_per_image",
               "f3_of_means")


# ----------------------------------------------------------------------------------------------------------
# reading


def read_blocks(path: Path) -> tuple[list[dict], list[dict], int]:
    """Complete example blocks of one records file: (word records, example records, ignored lines).

    Lines after the last ``"type": "example"`` line (an interrupted block) are ignored and counted.
    """
    words, examples, pending = [], [], []
    ignored = 0
    for raw in path.read_bytes().splitlines(keepends=True):
        try:
            if not raw.endswith(b"\n"):
                raise ValueError("torn line")
            rec = json.loads(raw)
        except ValueError:
            ignored += 1 + len(pending)
            pending = []
            continue
        if rec.get("type") == "example":
            words.extend(pending)
            examples.append(rec)
            pending = []
        else:
            pending.append(rec)
    return words, examples, ignored + len(pending)


def load_run(run_dir: str | Path) -> dict:
    """Merge one run directory's records. Returns {"config", "words", "examples", "duplicates", "ignored_lines"}.

    Raises ValueError if ``run_dir`` holds no records files.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist")
    files = sorted(run_dir.glob(RECORDS_GLOB))
    if not files:
        raise ValueError(f"{run_dir} holds no {RECORDS_GLOB} files; is it an eval.run output directory?")
    conf_path = run_dir / "run_config.json"
    config = json.loads(conf_path.read_text()) if conf_path.exists() else {}
    seen: set[int] = set()
    words, examples = [], []
    duplicates = ignored = 0
    for p in files:
        w, e, n = read_blocks(p)
        ignored += n
        keep = set()
        for rec in e:
            i = int(rec["example"])
            if i in seen:
                duplicates += 1
                continue
            seen.add(i)
            keep.add(i)
            examples.append(rec)
        words.extend(r for r in w if int(r["example"]) in keep)
    if duplicates:
        logging.warning("%s: %d examples appear in more than one records file; each is counted once", run_dir,
                        duplicates)
    examples.sort(key=lambda r: int(r["example"]))
    return {"run_dir": str(run_dir), "config": config, "words": words, "examples": examples,
            "duplicates": duplicates, "ignored_lines": ignored}


# ----------------------------------------------------------------------------------------------------------
# aggregation


def summarize_mode(records: Sequence[dict]) -> Optional[dict]:
    """Table numbers of per-word metric dicts of one mode (dcam_jax.metrics.summarize), or None when empty.

    When every record has a near-zero background, contrast and F3 of means are None instead of an error.
    """
    from dcam_jax import metrics

    if not records:
        return None
    if all(r["near_zero_background"] for r in records):
        keys = ("obj_iou", "precision", "recall", "concentration", "pointing_game")
        out = {k: float(np.mean([float(r[k]) for r in records])) for k in keys}
        out.update(n=len(records), n_near_zero_background=len(records), contrast=None,
                   contrast_all=float(np.mean([r["contrast"] for r in records])),
                   f3_per_image=float(np.mean([r["f3"] for r in records])), f3_of_means=None)
        return out
    return metrics.summarize(records)


def _caption_accuracy(examples: Sequence[dict]) -> Optional[dict]:
    evals = [e["caption_eval"] for e in examples if e.get("caption_eval")]
    if not evals:
        return None
    objs = sum(c["objects"] for c in evals)
    return {"examples": len(evals), "all_objects_correct": sum(c["all_correct"] for c in evals) / len(evals),
            "exact_caption": sum(c["exact"] for c in evals) / len(evals),
            "colour_accuracy": sum(c["colour_correct"] for c in evals) / max(objs, 1),
            "shape_accuracy": sum(c["shape_correct"] for c in evals) / max(objs, 1),
            "bound_accuracy": sum(c["bound_correct"] for c in evals) / max(objs, 1), "objects": objs}


def _faithfulness(recs: Sequence[dict]) -> Optional[dict]:
    """Means of the per-word deletion / insertion AUCs (log-probability x fraction of the image), or None."""
    if not recs:
        return None
    out = {k: float(np.mean([r[k] for r in recs])) for k in ("deletion_auc", "insertion_auc", "full_score",
                                                               "baseline_score")}
    out["insertion_minus_deletion"] = out["insertion_auc"] - out["deletion_auc"]
    out["n"] = len(recs)
    if all("deletion" in r for r in recs):  # mean curves on a common grid of fractions (image sizes may differ)
        steps = max(len(r["fractions"]) for r in recs)
        grid = np.linspace(0.0, 1.0, steps)
        out["curve_fractions"] = [float(v) for v in grid]
        for k in ("deletion", "insertion"):
            out[f"mean_{k}_curve"] = [float(v) for v in np.mean(
                [np.interp(grid, r["fractions"], r[k]) for r in recs], axis=0)]
    return out


def paired_faithfulness(words: Sequence[dict], methods: Sequence[str]) -> Optional[dict]:
    """The first method's AUCs minus each other method's, paired over the words both scored (same example and
    word): {other: {"n", "deletion", "deletion_se", "insertion", "insertion_se"}} (means and standard errors of
    the per-word differences), or None when fewer than two methods have faithfulness records."""
    by = {m: {(r["example_id"], r["word_index"]): r["faithfulness"] for r in words
              if r["method"] == m and r.get("faithfulness")} for m in methods}
    ref = methods[0] if methods else None
    if ref is None or not by[ref] or not any(by[m] for m in methods[1:]):
        return None
    out = {}
    for m in methods[1:]:
        keys = sorted(set(by[ref]) & set(by[m]))
        if len(keys) < 2:
            continue
        row: dict[str, Any] = {"n": len(keys)}
        for k in ("deletion", "insertion"):
            d = np.array([by[ref][q][f"{k}_auc"] - by[m][q][f"{k}_auc"] for q in keys])
            row[k], row[f"{k}_se"] = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
        out[m] = row
    return {"reference": ref, "against": out}


def faithfulness_table(summary: dict) -> str:
    """Markdown table of the deletion / insertion AUCs per method (empty string when none were measured)."""
    rows = [(m, summary["results"][m].get("faithfulness")) for m in summary["methods"]]
    if not any(f for _, f in rows):
        return ""
    lines = ["| Method | words | Deletion AUC (lower is better) | Insertion AUC (higher is better) | "
             "Insertion - deletion | score of the full image | score of the baseline image |", "|" + "---|" * 7]
    for m, f in rows:
        if f:
            lines.append(f"| {m} | {f['n']} | {f['deletion_auc']:.3f} | {f['insertion_auc']:.3f} | "
                         f"{f['insertion_minus_deletion']:.3f} | {f['full_score']:.3f} | {f['baseline_score']:.3f} |")
    paired = summary.get("paired_faithfulness")
    if paired and paired["against"]:
        lines += ["", f"Paired over the same words, {paired['reference']} minus:", "",
                  "| Method | words | Deletion AUC (SE) | Insertion AUC (SE) |", "|---|---|---|---|"]
        for m, r in paired["against"].items():
            lines.append(f"| {m} | {r['n']} | {r['deletion']:+.3f} ({r['deletion_se']:.3f}) | "
                         f"{r['insertion']:+.3f} ({r['insertion_se']:.3f}) |")
    return "\n".join(lines)


def summarize_run(run: dict) -> dict:
    """The summary of one loaded run (see :func:`load_run`): counts, per-method tables, class breakdown."""
    cfg = run["config"]
    examples, words = run["examples"], run["words"]
    evaluated = [e for e in examples if not e.get("skipped")]
    skipped = Counter(e["skipped"] for e in examples if e.get("skipped"))
    status = Counter()
    for e in evaluated:
        status.update(e.get("counts", {}))
    methods = list(cfg.get("methods") or dict.fromkeys(r["method"] for r in words))
    modes = list(cfg.get("metric_mode") or ["matched", "max"])
    table: dict[str, Any] = {}
    for m in methods:
        recs = [r for r in words if r["method"] == m]
        entry: dict[str, Any] = {}
        for mode in modes:
            entry[mode] = summarize_mode([r[mode] for r in recs if r.get(mode)])
        entry["faithfulness"] = _faithfulness([r["faithfulness"] for r in recs if r.get("faithfulness")])
        fi = [r["func_iou"] for r in recs if r.get("role") == "function" and r.get("func_iou") is not None]
        entry["func_iou"] = {"n": len(fi), "mean": float(np.mean(fi))} if fi else None
        classes = sorted({r["word_class"] for r in recs if r.get("role") == "object"})
        entry["by_class"] = {c: {mode: summarize_mode([r[mode] for r in recs if r["word_class"] == c
                                                       and r.get(mode)]) for mode in modes} for c in classes}
        table[m] = entry
    ds_skipped = Counter(d["reason"] for d in cfg.get("dataset_skipped", []))
    return {
        "run_dir": run["run_dir"],
        "dataset": cfg.get("dataset"), "checkpoint": cfg.get("checkpoint"), "split": cfg.get("split"),
        "methods": methods, "metric_modes": modes,
        "examples": {"evaluated": len(evaluated), "skipped_at_read": dict(skipped),
                     "left_out_up_front": dict(ds_skipped), "duplicates": run["duplicates"],
                     "ignored_lines": run["ignored_lines"],
                     "without_object_words": sum(1 for e in evaluated if not e.get("counts", {}).get("object_words"))},
        "words": dict(status),
        "caption_accuracy": _caption_accuracy(evaluated),
        "results": table,
        **({"paired_faithfulness": paired} if (paired := paired_faithfulness(words, methods)) else {}),
    }


def build_summary(run_dirs: Sequence[str | Path]) -> dict:
    """Summaries of several runs: {"runs": [summary per run dir]}."""
    return {"runs": [summarize_run(load_run(d)) for d in run_dirs]}


# ----------------------------------------------------------------------------------------------------------
# tables


def fmt_pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def method_table(summary: dict, mode: str) -> str:
    """Markdown table of one run summary's methods in one Obj-IoU mode."""
    head = ("| Method | words | Obj-IoU % | Precision % | Recall % | Contrast | bg~0 | Conc. % | Pointing % | "
            "F3 (per word) % | F3 (of means) % | Func-IoU % |")
    lines = [head, "|" + "---|" * 12]
    for m in summary["methods"]:
        r = summary["results"][m]
        s = r.get(mode)
        fi = r.get("func_iou")
        if s is None:
            lines.append(f"| {m} | 0 | - | - | - | - | - | - | - | - | - | {fmt_pct(fi['mean']) if fi else '-'} |")
            continue
        lines.append(f"| {m} | {s['n']} | {fmt_pct(s['obj_iou'])} | {fmt_pct(s['precision'])} | "
                     f"{fmt_pct(s['recall'])} | "
                     f"{_x(s['contrast'])} | {s['n_near_zero_background']} | {fmt_pct(s['concentration'])} | "
                     f"{fmt_pct(s['pointing_game'])} | {fmt_pct(s['f3_per_image'])} | {fmt_pct(s['f3_of_means'])} | "
                     f"{fmt_pct(fi['mean']) if fi else '-'} |")
    return "\n".join(lines)


def class_table(summary: dict) -> str:
    """Markdown table: Obj-IoU (each mode), concentration and pointing game per method and word class."""
    modes = summary["metric_modes"]
    head = "| Method | class | words | " + " | ".join(f"Obj-IoU {m} %" for m in modes) + " | Conc. % | Pointing % |"
    lines = [head, "|" + "---|" * (5 + len(modes))]
    for m in summary["methods"]:
        for c, per_mode in summary["results"][m]["by_class"].items():
            ref = next((per_mode[x] for x in modes if per_mode.get(x)), None)
            if ref is None:
                continue
            ious = " | ".join(fmt_pct(per_mode[x]["obj_iou"]) if per_mode.get(x) else "-" for x in modes)
            lines.append(f"| {m} | {c} | {ref['n']} | {ious} | {fmt_pct(ref['concentration'])} | "
                         f"{fmt_pct(ref['pointing_game'])} |")
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    """The full markdown report of a :func:`build_summary` result."""
    parts = []
    for s in summary["runs"]:
        ex = s["examples"]
        parts.append(f"## {s['run_dir']}\n\nmodel `{s['checkpoint']}`, dataset `{s['dataset']}` split "
                     f"`{s['split']}`: {ex['evaluated']} images evaluated.")
        notes = []
        if ex["skipped_at_read"]:
            notes.append("skipped while reading: " + ", ".join(f"{n} x {r}" for r, n in ex["skipped_at_read"].items()))
        if ex["left_out_up_front"]:
            notes.append("left out up front: " + ", ".join(f"{n} x {r}" for r, n in
                                                            ex["left_out_up_front"].items()))
        if ex["without_object_words"]:
            notes.append(f"{ex['without_object_words']} answers had no object word")
        if ex["duplicates"] or ex["ignored_lines"]:
            notes.append(f"{ex['duplicates']} duplicate examples and {ex['ignored_lines']} lines of incomplete "
                         "blocks ignored")
        w = s["words"]
        if w:
            notes.append("object words: " + ", ".join(f"{w.get(k, 0)} {k}" for k in
                                                      ("matched", "hallucinated", "unmatched", "absent") if
                                                      w.get(k)) + f"; function words: {w.get('function', 0)}")
        ca = s.get("caption_accuracy")
        if ca:
            notes.append(f"captions: all objects named correctly in {fmt_pct(ca['all_objects_correct'])}% of images; "
                         f"colour {fmt_pct(ca['colour_accuracy'])}%, shape {fmt_pct(ca['shape_accuracy'])}%, bound "
                         f"{fmt_pct(ca['bound_accuracy'])}% of {ca['objects']} objects; exact captions "
                         f"{fmt_pct(ca['exact_caption'])}%")
        if notes:
            parts.append("\n".join(f"- {n}" for n in notes))
        for mode in s["metric_modes"]:
            what = ("the object the word names (TAM)" if mode == "matched"
                    else "best IoU over all objects (Diffusion-CAM authors)")
            parts.append(f"### Obj-IoU mode `{mode}`: {what}\n\n{method_table(s, mode)}")
        ft = faithfulness_table(s)
        if ft:
            parts.append("### Faithfulness: deletion and insertion of image patches in map order\n\nScores are the "
                         "model's log-probability of the word (its positions masked, the rest of the answer given); "
                         "AUC over the fraction of the image removed (deletion) or revealed (insertion).\n\n" + ft)
        if any(len(s["results"][m]["by_class"]) > 1 for m in s["methods"]) and \
                all(len(s["results"][m]["by_class"]) <= 8 for m in s["methods"]):
            parts.append(f"### Per word class\n\n{class_table(s)}")
    if len(summary["runs"]) > 1:
        parts.append("## Comparison\n\n" + comparison_table(summary))
    return "\n\n".join(parts) + "\n"


def comparison_table(summary: dict) -> str:
    """One row per (run, method): Obj-IoU matched and max, contrast, concentration, F3 of means (matched)."""
    lines = ["| run | method | Obj-IoU matched % | Obj-IoU max % | Contrast | Conc. % | F3 (of means) % | "
             "Func-IoU % |", "|" + "---|" * 8]
    for s in summary["runs"]:
        for m in s["methods"]:
            r = s["results"][m]
            mt, mx = r.get("matched"), r.get("max")
            ref = mt or mx
            fi = r.get("func_iou")
            lines.append(f"| {Path(s['run_dir']).name} | {m} | {fmt_pct(mt['obj_iou']) if mt else '-'} | "
                         f"{fmt_pct(mx['obj_iou']) if mx else '-'} | {_x(ref['contrast']) if ref else '-'} | "
                         f"{fmt_pct(ref['concentration']) if ref else '-'} | "
                         f"{fmt_pct(ref['f3_of_means']) if ref else '-'} "
                         f"| {fmt_pct(fi['mean']) if fi else '-'} |")
    return "\n".join(lines)


def write_outputs(out_dir: str | Path, summary: dict, *, plots: bool = True) -> list[Path]:
    """Write summary.json, summary.md and (optionally) plots into ``out_dir``. Returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    written.append(fileio.write_text(out / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n"))
    written.append(fileio.write_text(out / "summary.md", markdown(summary)))
    if plots:
        written.append(plot_metrics(summary, out / "plots" / "metrics.png"))
        q = plot_faithfulness(summary, out / "plots" / "faithfulness.png")
        if q is not None:
            written.append(q)
        for s in summary["runs"]:
            for m in s["methods"]:
                tag = f"{Path(s['run_dir']).name}_{m}" if len(summary["runs"]) > 1 else m
                q = plot_examples(Path(s["run_dir"]), m, out / "plots" / f"examples_{tag}.png")
                if q is not None:
                    written.append(q)
    return written


# ----------------------------------------------------------------------------------------------------------
# CLI


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """Define the flags of ``python -m eval.report`` on ``fv``."""
    flags.DEFINE_list("run_dirs", None, "Comma-separated eval.run output directories (sweep cells work too).",
                      flag_values=fv)
    flags.DEFINE_string("out_dir", None, "Where to write summary.json, summary.md and plots/ (default: the run "
                        "directory when there is one; required for several).", flag_values=fv)
    flags.DEFINE_bool("plots", True, "Also write the PNG plots.", flag_values=fv)


def main(argv):
    """Entry point of ``python -m eval.report``: merge, summarise, print and write."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; pass --run_dirs=DIR[,DIR...]")
    fv = flags.FLAGS
    if not fv.run_dirs:
        raise app.UsageError("--run_dirs is required (one or more eval.run output directories)")
    if len(fv.run_dirs) > 1 and not fv.out_dir:
        raise app.UsageError("several --run_dirs need --out_dir for the combined report")
    try:
        summary = build_summary(fv.run_dirs)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    out = Path(fv.out_dir or fv.run_dirs[0])
    written = write_outputs(out, summary, plots=fv.plots)
    print(markdown(summary))
    print("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    define_flags()
    from dcam_jax.tool import run_tool

    run_tool(main)
