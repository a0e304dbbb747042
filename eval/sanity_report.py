"""The outputs of ``python -m eval.sanity``: the markdown tables (sanity.md), the rank-correlation plot
(sanity.png) and :func:`write`, which writes them with sanity.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from dcam_jax import fileio
from eval.sanity_checks import depth_label

OUTPUTS = ("sanity.json", "sanity.md", "sanity.png")


def _f(v, pct: bool = False) -> str:
    """A table cell: '-' for None or NaN, else 3 decimals (or a percentage with 1 decimal)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def markdown(result: dict) -> str:
    """The tables of a sanity result: rank correlation per method and depth (refined and raw maps; the last
    column says whether the mean at full depth is below 0.5, SPEC 4.6's bar), then the discrimination shares."""
    lines = [f"# Sanity checks: {result['model']['name']}, ShapesWorld {result['config']['split']} "
             f"({result['config']['shapes_preset']})", ""]
    rnd = result.get("randomization")
    if rnd:
        n_layers = result["model"]["n_layers"]
        depth = max(len(r["depths"]) for r in rnd.values())
        lines += [f"## Cascading randomisation ({result['randomization_images']} images, norms "
                  f"{result['config']['norms']})", "",
                  "Mean Spearman rank correlation between the original map and the map with the head and the top "
                  "blocks re-initialised (cumulative from the top, down to block L + 1). Lower is better; SPEC 4.6 "
                  "asks for well below 0.5 at full depth.", ""]
        for kind in ("refined", "raw"):
            head = "| Method | L | words | " + " | ".join(f"{d + 1}: {depth_label(n_layers, d + 1)}"
                                                        for d in range(depth)) + " | < 0.5 at full depth |"
            lines += [f"**{kind} maps**", "", head, "|" + "---|" * (depth + 4)]
            for m, r in rnd.items():
                cells = [_f(x[kind]["mean"]) + (f" ({x[kind]['undefined']} undef.)" if x[kind]["undefined"] else "")
                         for x in r["depths"]]
                cells += ["-"] * (depth - len(cells))
                last = r["depths"][-1][kind]["mean"]
                verdict = "-" if last is None else ("yes" if last < 0.5 else "no")
                lines.append(f"| {m} | {r['layer']} | {r['words']} | " + " | ".join(cells) + f" | {verdict} |")
            lines.append("")
    dis = result.get("discrimination")
    if dis:
        lines += [f"## Two-object discrimination ({dis['images']} two-object images scanned from "
                  f"{dis['scanned']} indices, {dis['images_correct']} with a correct answer, {dis['words']} words)",
                  "", "Share (%) of object words whose map points at the named object rather than the other one: "
                  "mass = more map mass inside the named mask, density = higher mean inside it, pointing = the "
                  "maximum inside it.", "",
                  "| Method | words | mass % | density % | pointing % | raw mass % | raw density % | raw pointing % |",
                  "|" + "---|" * 8]
        for m, r in dis["methods"].items():
            a, b = r["refined"], r["raw"]
            lines.append(f"| {m} | {r['n']} | {_f(a['mass'], True)} | {_f(a['density'], True)} | "
                         f"{_f(a['pointing'], True)} | {_f(b['mass'], True)} | {_f(b['density'], True)} | "
                         f"{_f(b['pointing'], True)} |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Optional[Path]:
    """Line plot of mean rank correlation vs number of randomised layers from the top (refined and raw maps),
    one line per method, 0.3 and 0.5 reference lines. Written atomically; None without randomisation results."""
    rnd = result.get("randomization")
    if not rnd:
        return None
    from dcam_jax.viz import pyplot

    plt = pyplot()
    n_layers = result["model"]["n_layers"]
    depth = max(len(r["depths"]) for r in rnd.values())
    lows = [d[k]["mean"] for r in rnd.values() for d in r["depths"] for k in ("refined", "raw")
            if d[k]["mean"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0), sharey=True)
    for ax, kind in zip(axes, ("refined", "raw")):
        for m, r in rnd.items():
            xs = [d["depth"] for d in r["depths"]]
            ys = [np.nan if d[kind]["mean"] is None else d[kind]["mean"] for d in r["depths"]]
            ax.plot(xs, ys, marker="o", label=f"{m} (L={r['layer']})")
        for y in (0.3, 0.5):
            ax.axhline(y, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(1, depth + 1), [depth_label(n_layers, d) for d in range(1, depth + 1)], fontsize=8)
        ax.set_xlabel("layers randomised from the top (cumulative)")
        ax.set_title(f"{kind} maps", fontsize=10)
        ax.set_ylim(min([-0.2] + [v - 0.05 for v in lows]), 1.05)
    axes[0].set_ylabel("mean Spearman rank correlation")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Cascading randomisation: {result['model']['name']}, {result['randomization_images']} images",
                 fontsize=10)
    return fileio.save_figure(fig, path, dpi=90)


def _nan_to_none(x):
    """``x`` (JSON-like: dicts, lists, tuples, scalars) with every non-finite float as None, tuples as lists."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x


def write(result: dict, out: Path) -> dict:
    """Write :data:`OUTPUTS` into the directory ``out``, each atomically: sanity.json (``result`` with NaN and
    infinities as null), sanity.md (:func:`markdown`) and sanity.png (:func:`plot`, only with randomisation
    results). Returns the result as written to sanity.json."""
    result = _nan_to_none(result)
    fileio.write_text(out / "sanity.json", json.dumps(result, indent=2, allow_nan=False) + "\n")
    fileio.write_text(out / "sanity.md", markdown(result))
    plot(result, out / "sanity.png")
    return result
