"""Input checks and constants shared by the metrics (host side, NumPy)."""

from __future__ import annotations

from typing import Any

import numpy as np


# Background means below this make the contrast ratio meaningless (the authors' 1e-8 epsilon then
# yields ratios up to 1e8 that dominate any mean); such images are flagged and counted apart.
NEAR_ZERO_BACKGROUND = 1e-6


# The authors' epsilons, kept so that per-image values reproduce their code.
_CONTRAST_EPS = 1e-8


_CONCENTRATION_EPS = 1e-8


# Contrast is mapped to [0, 1] as min(C / 20, 1) inside F3 (authors' normalisation).
CONTRAST_SCALE = 20.0


# Slack for float rounding when checking that a map lies in [0, 1] (a bilinear resize of a map in
# [0, 1] can overshoot by a few float32 ulps).
_RANGE_SLACK = 1e-6


# OpenCV's Otsu loop skips classes whose weight is below FLT_EPSILON.
_FLT_EPSILON = float(np.finfo(np.float32).eps)


_RECORD_KEYS = (
    "obj_iou",
    "precision",
    "recall",
    "contrast",
    "near_zero_background",
    "concentration",
    "pointing_game",
)


def _as_float_map(x: Any, name: str, *, ndim: int | None = 2) -> np.ndarray:
    """Returns ``x`` as a finite floating NumPy array, or raises naming ``name``."""
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        # bfloat16 / float8 from JAX arrive as ml_dtypes with kind 'V'; widen them.
        if arr.dtype.name.startswith(("bfloat16", "float8")):
            arr = arr.astype(np.float32)
        else:
            raise ValueError(
                f"{name} must be a floating-point array, got dtype {arr.dtype}; "
                "convert it with .astype(np.float32) (maps are floats in [0, 1])."
            )
    if arr.dtype.itemsize < 4:
        arr = arr.astype(np.float32)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions, got shape {arr.shape}."
        )
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); expected at least one pixel.")
    if not np.all(np.isfinite(arr)):
        n_bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(
            f"{name} contains {n_bad} NaN or infinite values; fix the map upstream "
            "(metrics never impute values)."
        )
    return arr


def _check_unit_range(arr: np.ndarray, name: str) -> None:
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -_RANGE_SLACK or hi > 1.0 + _RANGE_SLACK:
        raise ValueError(
            f"{name} must lie in [0, 1], found values in [{lo:.6g}, {hi:.6g}]; "
            "min-max normalise the map first."
        )


def _check_nonnegative(arr: np.ndarray, name: str) -> None:
    lo = float(arr.min())
    if lo < 0.0:
        raise ValueError(
            f"{name} must be non-negative, found a minimum of {lo:.6g}; "
            "apply ReLU / min-max normalisation first."
        )


def _as_mask(mask: Any, name: str, shape: tuple[int, ...], map_name: str) -> np.ndarray:
    """Returns ``mask`` as an int64 array of ``shape``, or raises naming ``name``."""
    arr = np.asarray(mask)
    if arr.dtype.kind not in "iub":
        raise ValueError(
            f"{name} must be an integer or bool array of class ids (0 = background), got dtype "
            f"{arr.dtype}; a float mask usually means it was resized with interpolation: resize "
            "masks with nearest-neighbour, or resize the map to the mask instead."
        )
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [H, W], got shape {arr.shape}.")
    if arr.shape != tuple(shape):
        raise ValueError(
            f"{name} has shape {arr.shape} but {map_name} has shape {tuple(shape)}; metrics are "
            f"computed at mask resolution: resize the map with resize_map({map_name}, "
            f"{name}.shape) (or call map_metrics, which does it)."
        )
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise ValueError(
            f"{name} has negative values (min {int(arr.min())}); expected 0 for background and "
            "positive class ids for objects."
        )
    return arr


def _object_region(mask: np.ndarray, label: int | None, name: str) -> np.ndarray:
    """[H, W] bool object region: ``mask > 0`` if label is None, else ``mask == label``."""
    if label is None:
        region = mask > 0
        if not region.any():
            raise ValueError(
                f"{name} has no object pixels (all zeros); the metric is undefined for this "
                "image: skip it and count it as missing instead of scoring it 0."
            )
        return region
    label = _as_label(label)
    region = mask == label
    if not region.any():
        present = [int(v) for v in np.unique(mask) if v != 0]
        raise ValueError(
            f"label {label} does not occur in {name} (object ids present: {present}); the "
            "metric is undefined for this word: skip it."
        )
    return region


def _as_label(label: Any) -> int:
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
        raise ValueError(f"label must be a positive int class id, got {label!r}.")
    if int(label) <= 0:
        raise ValueError(f"label must be a positive class id (0 is background), got {label}.")
    return int(label)


def _prepare(map_hw: Any, mask_hw: Any) -> tuple[np.ndarray, np.ndarray]:
    m = _as_float_map(map_hw, "map_hw")
    return m, _as_mask(mask_hw, "mask_hw", m.shape, "map_hw")
