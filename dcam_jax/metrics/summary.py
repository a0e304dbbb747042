"""F3 and its mean form, every metric of one map at once, and the summary of many records."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dcam_jax.metrics._checks import CONTRAST_SCALE, _RECORD_KEYS, _as_float_map
from dcam_jax.metrics.localisation import concentration, contrast, obj_iou, pointing_game, resize_map


def _check_metric_values(x: np.ndarray, name: str, upper: float | None) -> None:
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinite values: {x}.")
    if np.any(x < 0) or (upper is not None and np.any(x > upper)):
        bound = f"[0, {upper}]" if upper is not None else "[0, inf)"
        raise ValueError(f"{name} must lie in {bound}, got values in [{x.min()}, {x.max()}].")


def f3(
    obj_iou: Any, contrast: Any, concentration: Any, *, contrast_scale: float = CONTRAST_SCALE
) -> Any:
    """F3 = harmonic mean of (Obj-IoU, min(Contrast / 20, 1), Concentration); 0 if any is 0.

    Broadcasts over arrays. Inputs are fractions (IoU and concentration in [0, 1], not %) and the
    contrast ratio. Example (the paper's COCO row): ``f3(0.3010, 2.58, 0.5141) = 0.2304``.

    Args:
      obj_iou: ``[...]`` Obj-IoU in [0, 1].
      contrast: ``[...]`` contrast ratio >= 0.
      concentration: ``[...]`` concentration in [0, 1].
      contrast_scale: contrast that counts as perfect (20 in the paper).

    Returns:
      float (for scalar inputs) or float64 array ``[...]``.
    """
    iou = np.asarray(obj_iou, dtype=np.float64)
    con = np.asarray(contrast, dtype=np.float64)
    conc = np.asarray(concentration, dtype=np.float64)
    _check_metric_values(iou, "obj_iou", 1.0)
    _check_metric_values(con, "contrast", None)
    _check_metric_values(conc, "concentration", 1.0)
    if not contrast_scale > 0:
        raise ValueError(f"contrast_scale must be > 0, got {contrast_scale}.")
    cs = np.minimum(con / contrast_scale, 1.0)
    iou, cs, conc = np.broadcast_arrays(iou, cs, conc)
    positive = (iou > 0) & (cs > 0) & (conc > 0)
    # Zeros are swapped for 1 before the reciprocals, so no inf/NaN is ever formed.
    recip = [1.0 / np.where(positive, v, 1.0) for v in (iou, cs, conc)]
    h = 3.0 / (recip[0] + recip[1] + recip[2])
    out = np.where(positive, h, 0.0)
    return float(out) if out.ndim == 0 else out


def f3_of_means(
    obj_ious: Sequence[float],
    contrasts: Sequence[float],
    concentrations: Sequence[float],
    *,
    contrast_scale: float = CONTRAST_SCALE,
) -> float:
    """F3 of the means (the paper's table convention): ``f3(mean(iou), mean(C), mean(conc))``.

    The three sequences are averaged separately and may differ in length, so that contrasts of
    near-zero-background images can be left out (as :func:`summarize` does).

    Args:
      obj_ious: ``[N1]`` per-image Obj-IoU.
      contrasts: ``[N2]`` per-image contrast ratios.
      concentrations: ``[N3]`` per-image concentrations.

    Returns:
      float F3 in [0, 1].
    """
    means = []
    for name, values in (
        ("obj_ious", obj_ious),
        ("contrasts", contrasts),
        ("concentrations", concentrations),
    ):
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if v.size == 0:
            raise ValueError(f"{name} is empty; F3 of means needs at least one value.")
        means.append(float(v.mean()))
    return f3(*means, contrast_scale=contrast_scale)


def map_metrics(
    map_hw: Any, mask_hw: Any, *, mode: str = "max", label: int | None = None
) -> dict[str, Any]:
    """All per-map localisation metrics for one map, as one record for :func:`summarize`.

    The map is first resized to the mask with :func:`resize_map` (OpenCV INTER_LINEAR), as the
    authors do. ``mode="max"`` is the authors' protocol (IoU: best class; contrast, concentration
    and pointing game against all objects); ``mode="matched"`` uses the named object ``label`` for
    every metric.

    Args:
      map_hw: ``[h, w]`` float map in [0, 1] at any resolution.
      mask_hw: ``[H, W]`` integer class-id mask.
      mode: ``"max"`` or ``"matched"``.
      label: class id for ``"matched"``.

    Returns:
      dict with ``mode``, ``label`` (class of the IoU), ``obj_iou``, ``precision``, ``recall``,
      ``contrast``, ``contrast_fg_mean``, ``contrast_bg_mean``, ``near_zero_background`` (bool),
      ``concentration``, ``pointing_game`` (bool), ``f3`` (per-image F3).
    """
    m = _as_float_map(map_hw, "map_hw")
    mask = np.asarray(mask_hw)
    if mask.ndim != 2:
        raise ValueError(f"mask_hw must be 2-D [H, W], got shape {mask.shape}.")
    m = resize_map(m, mask.shape)
    iou = obj_iou(m, mask, mode=mode, label=label)
    region_label = label if mode == "matched" else None
    con = contrast(m, mask, label=region_label)
    conc = concentration(m, mask, label=region_label)
    return {
        "mode": mode,
        "label": iou.label,
        "obj_iou": iou.iou,
        "precision": iou.precision,
        "recall": iou.recall,
        "contrast": con.ratio,
        "contrast_fg_mean": con.fg_mean,
        "contrast_bg_mean": con.bg_mean,
        "near_zero_background": con.near_zero_background,
        "concentration": conc,
        "pointing_game": pointing_game(m, mask, label=region_label),
        "f3": f3(iou.iou, con.ratio, conc),
    }


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregates per-map records (from :func:`map_metrics`) into table numbers.

    Contrast is averaged over images whose background mean is >= 1e-6 only; those below are
    counted in ``n_near_zero_background`` (``contrast_all`` keeps the authors' mean over all
    images, for comparison). Per-image F3 is unaffected because F3 caps contrast at 20 anyway.

    Args:
      records: N >= 1 mappings with at least the keys ``obj_iou``, ``precision``, ``recall``,
        ``contrast``, ``near_zero_background``, ``concentration``, ``pointing_game``; all with
        the same ``mode`` if they carry one. Other keys are ignored.

    Returns:
      dict of floats (fractions, not %): ``n``, ``n_near_zero_background``, ``obj_iou``,
      ``precision``, ``recall``, ``contrast``, ``contrast_all``, ``concentration``,
      ``pointing_game`` (hit rate), ``f3_per_image`` (mean of per-image F3), ``f3_of_means``
      (F3 of the means above, the paper's convention).
    """
    if isinstance(records, Mapping) or len(records) == 0:
        raise ValueError("records must be a non-empty sequence of per-map metric dicts.")
    modes = sorted({str(rec["mode"]) for rec in records if "mode" in rec})
    if len(modes) > 1:
        raise ValueError(
            f"records mix Obj-IoU modes {modes}; summarise 'max' and 'matched' records separately."
        )
    cols: dict[str, list[float]] = {k: [] for k in _RECORD_KEYS}
    for i, rec in enumerate(records):
        missing = [k for k in _RECORD_KEYS if k not in rec]
        if missing:
            raise ValueError(f"records[{i}] lacks keys {missing}; build records with map_metrics.")
        for k in _RECORD_KEYS:
            v = float(rec[k])
            if not math.isfinite(v):
                raise ValueError(f"records[{i}][{k!r}] is {v}; records must be finite.")
            cols[k].append(v)
    arr = {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()}
    flagged = arr["near_zero_background"] > 0
    if flagged.all():
        raise ValueError(
            f"all {len(records)} records have a near-zero background mean; contrast (and F3 of "
            "means) is undefined for this set."
        )
    contrast_mean = float(arr["contrast"][~flagged].mean())
    per_image_f3 = f3(arr["obj_iou"], arr["contrast"], arr["concentration"])
    out = {
        "n": len(records),
        "n_near_zero_background": int(flagged.sum()),
        "obj_iou": float(arr["obj_iou"].mean()),
        "precision": float(arr["precision"].mean()),
        "recall": float(arr["recall"].mean()),
        "contrast": contrast_mean,
        "contrast_all": float(arr["contrast"].mean()),
        "concentration": float(arr["concentration"].mean()),
        "pointing_game": float(arr["pointing_game"].mean()),
        "f3_per_image": float(np.mean(per_image_f3)),
    }
    out["f3_of_means"] = f3(out["obj_iou"], contrast_mean, out["concentration"])
    return out
