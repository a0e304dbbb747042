"""The plots of an evaluation summary (``eval.report``): metric bars, example overlays, faithfulness curves.

Each function takes the summary dictionary that ``eval.report.build_summary`` makes (or a run directory) and
writes one PNG atomically.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

from dcam_jax import fileio
from dcam_jax.viz import pyplot


def plot_metrics(summary: dict, path: Path) -> Path:
    """Bar chart: one panel per metric, one bar per method (and mode), for the first run of ``summary``."""
    plt = pyplot()
    s = summary["runs"][0]
    metrics_ = [("obj_iou", "Obj-IoU"), ("precision", "precision"), ("recall", "recall"),
                ("contrast", "contrast (x)"), ("concentration", "concentration"),
                ("pointing_game", "pointing game"), ("f3_of_means", "F3 (of means)")]
    modes = s["metric_modes"]
    methods = s["methods"]
    fig, axes = plt.subplots(2, 4, figsize=(13.0, 6.6), squeeze=False)
    axes = axes.reshape(1, -1)
    width = 0.8 / max(len(modes), 1)
    x = np.arange(len(methods))
    for ax, (key, title) in zip(axes[0], metrics_):
        for j, mode in enumerate(modes):
            vals = [(s["results"][m].get(mode) or {}).get(key) for m in methods]
            ax.bar(x + j * width, [np.nan if v is None else v for v in vals], width, label=mode)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x + width * (len(modes) - 1) / 2, methods, rotation=45, ha="right", fontsize=8)
    ax = axes[0, -1]
    fi = [(s["results"][m].get("func_iou") or {}).get("mean") for m in methods]
    ax.bar(x, [np.nan if v is None else v for v in fi], 0.6, color="grey")
    ax.set_title("Func-IoU", fontsize=10)
    ax.set_xticks(x, methods, rotation=45, ha="right", fontsize=8)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{Path(s['run_dir']).name}: {s['dataset']}, {s['examples']['evaluated']} images", fontsize=10)
    fileio.save_figure(fig, path, dpi=90)
    return path


def _natural(p: Path):
    """Sort key: 'shapes-test-2' before 'shapes-test-10'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.stem)]


def plot_examples(run_dir: Path, method: str, path: Path, *, max_examples: int = 6, max_words: int = 6) -> \
        Optional[Path]:
    """Grid of overlays from ``run_dir/maps/*.npz``: one row per example (image, then the object words' maps
    of ``method``). Returns None when no saved maps hold ``method``."""
    from dcam_jax import viz

    files = sorted((run_dir / "maps").glob("*.npz"), key=_natural) if (run_dir / "maps").is_dir() else []
    rows = []
    for f in files:
        with np.load(f) as z:
            if f"maps__{method}" not in z.files:
                continue
            roles = list(z["roles"])
            keep = [k for k, r in enumerate(roles) if r == "object"][:max_words]
            rows.append((f.stem, z["image"], str(z["answer"]), [str(z["words"][k]) for k in keep],
                         [str(z["status"][k]) for k in keep], z[f"maps__{method}"][keep].astype(np.float32)))
        if len(rows) >= max_examples:
            break
    if not rows:
        return None
    plt = pyplot()
    cols = 1 + max(max(len(r[3]) for r in rows), 1)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.9 * cols, 2.1 * len(rows)), squeeze=False)
    for i, (name, image, answer, words, status, maps) in enumerate(rows):
        axes[i, 0].imshow(image)
        axes[i, 0].set_title(name, fontsize=7)
        axes[i, 0].set_ylabel(answer[:40], fontsize=6)
        for j in range(cols - 1):
            ax = axes[i, j + 1]
            if j < len(words):
                ax.imshow(viz.overlay(image, np.clip(maps[j], 0, 1)))
                ax.set_title(words[j] + (" (halluc.)" if status[j] == "hallucinated" else ""), fontsize=8)
            else:
                ax.axis("off")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{method}: object word maps", fontsize=10)
    fileio.save_figure(fig, path, dpi=90)
    return path


def plot_faithfulness(summary: dict, path: Path) -> Optional[Path]:
    """Mean deletion and insertion curves per method (first run of ``summary``); None when not measured."""
    s = summary["runs"][0]
    rows = [(m, s["results"][m].get("faithfulness")) for m in s["methods"]]
    rows = [(m, f) for m, f in rows if f and "mean_deletion_curve" in f]
    if not rows:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for m, f in rows:
        x = f["curve_fractions"]
        axes[0].plot(x, f["mean_deletion_curve"], label=f"{m} (AUC {f['deletion_auc']:.2f})")
        axes[1].plot(x, f["mean_insertion_curve"], label=f"{m} (AUC {f['insertion_auc']:.2f})")
    for ax, title in zip(axes, ("deletion: most salient patches removed first (lower is better)",
                                "insertion: most salient patches revealed first (higher is better)")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("fraction of the image")
        ax.set_ylabel("mean log p(word)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fileio.save_figure(fig, path, dpi=90)
    return path
