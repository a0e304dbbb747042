"""Explanation-quality metrics: localisation (Obj-IoU, Func-IoU, contrast, concentration, pointing
game, F3) and faithfulness (deletion / insertion curves).

Everything here runs on the host in NumPy: the metrics are per map, at the resolution of the
ground-truth mask, and several of them (Otsu, per-class IoU) are histogram or set operations that
gain nothing from jit. Definitions follow SPEC section 6; where the authors' code has a quirk we
either reproduce it (and say so) or refuse the input with a clear error.

Conventions
- A *map* is a float array ``[H, W]`` with values in ``[0, 1]`` (the refined CAM, min-max
  normalised). Metric functions want the map at mask resolution: resize first with
  :func:`resize_map` (OpenCV ``INTER_LINEAR`` semantics, as the authors do), or use
  :func:`map_metrics`, which resizes for you.
- A *mask* is an integer (or bool) array ``[H, W]``: 0 is background, every other value is an
  object class id (COCO category id, GranDf object index, ShapesWorld object id).
- An all-zero mask, or a ``label`` that does not occur in the mask, raises ``ValueError``. The
  authors' code scores such images 0 and averages them in; we make the caller skip them
  explicitly.
- Binarisation: ``u8 = trunc(255 * map)``, ``t = Otsu(u8)`` exactly as OpenCV's THRESH_OTSU,
  ``binary = u8 > t``.

Public API
- :func:`resize_map`, :func:`to_uint8`, :func:`otsu_threshold`, :func:`binarize`
- :func:`obj_iou` -> :class:`IoUResult`, :func:`func_iou`
- :func:`contrast` -> :class:`ContrastResult`, :func:`concentration`, :func:`pointing_game`
- :func:`f3`, :func:`f3_of_means`, :func:`map_metrics`, :func:`summarize`
- :func:`deletion_insertion_curves` -> :class:`FaithfulnessCurves`
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "ContrastResult",
    "FaithfulnessCurves",
    "IoUResult",
    "binarize",
    "concentration",
    "contrast",
    "deletion_insertion_curves",
    "f3",
    "f3_of_means",
    "func_iou",
    "map_metrics",
    "obj_iou",
    "otsu_threshold",
    "pointing_game",
    "resize_map",
    "summarize",
    "to_uint8",
]

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


# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Resizing and binarisation
# ----------------------------------------------------------------------------------------------


def _linear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and weight of i1 for OpenCV INTER_LINEAR along one axis."""
    # OpenCV derives the scale as 1 / (n_out / n_in) in double precision.
    scale = 1.0 / (n_out / n_in)
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    i0 = np.floor(src).astype(np.int64)
    frac = src - i0
    # OpenCV clamps to the border pixel with zero weight on its neighbour (replicate border).
    below = i0 < 0
    frac[below] = 0.0
    i0[below] = 0
    above = i0 >= n_in - 1
    frac[above] = 0.0
    i0[above] = n_in - 1
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, frac


def resize_map(map_hw: Any, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with OpenCV ``cv2.resize(..., INTER_LINEAR)`` semantics.

    Half-pixel centres (``src = (dst + 0.5) * in / out - 0.5``), replicate border, no
    anti-aliasing when shrinking (as OpenCV). Computed in float64 and returned in the input's float
    dtype (float32 for narrower floats); it matches OpenCV to about 3e-6 for maps in [0, 1] (OpenCV
    uses float32 coefficients).

    Args:
      map_hw: ``[..., h, w]`` float map; leading dimensions are batch dimensions.
      size_hw: ``(H, W)`` target size, **height first** (note: ``cv2.resize`` takes ``(W, H)``).

    Returns:
      ``[..., H, W]`` resized map.
    """
    m = _as_float_map(map_hw, "map_hw", ndim=None)
    if m.ndim < 2:
        raise ValueError(
            f"map_hw must have at least 2 dimensions [..., h, w], got shape {m.shape}."
        )
    if (
        not isinstance(size_hw, (tuple, list))
        or len(size_hw) != 2
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size_hw)
        or min(size_hw) <= 0
    ):
        raise ValueError(f"size_hw must be a pair of positive ints (H, W), got {size_hw!r}.")
    out_h, out_w = int(size_hw[0]), int(size_hw[1])
    in_h, in_w = m.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return m.copy()
    y0, y1, fy = _linear_axis(in_h, out_h)
    x0, x1, fx = _linear_axis(in_w, out_w)
    m64 = m.astype(np.float64)
    rows = m64[..., y0, :] * (1.0 - fy)[:, None] + m64[..., y1, :] * fy[:, None]
    out = rows[..., x0] * (1.0 - fx) + rows[..., x1] * fx
    return out.astype(m.dtype)


def to_uint8(map_hw: Any) -> np.ndarray:
    """``trunc(255 * map)`` as uint8, the authors' quantisation before Otsu.

    The product is formed in the map's own float dtype (float32 stays float32, as in the authors'
    ``(heat * 255).astype(np.uint8)``). Values within 1e-6 outside [0, 1] (float rounding of a
    resize) are clipped; anything further out raises.

    Args:
      map_hw: ``[...]`` float map in [0, 1] (any shape).

    Returns:
      uint8 array of the same shape.
    """
    m = _as_float_map(map_hw, "map_hw", ndim=None)
    _check_unit_range(m, "map_hw")
    scaled = m * m.dtype.type(255)
    return np.clip(np.trunc(scaled), 0, 255).astype(np.uint8)


def otsu_threshold(u8: Any) -> int:
    """Otsu threshold of a uint8 image, identical to OpenCV's ``THRESH_OTSU``.

    This replays OpenCV's own loop (``getThreshVal_Otsu``) operation for operation in float64,
    including its details: classes with weight below FLT_EPSILON are skipped (so a constant image
    gives 0), and the first maximum of the between-class variance in that arithmetic wins (so a
    two-level image gives the lower level).

    One caveat, by design: x86 OpenCV builds with Intel IPP (the default pip wheels) hand
    ``THRESH_OTSU`` to IPP, whose closed-source arithmetic can break *exact* ties between two
    different partitions (e.g. three equally spaced, equally frequent grey levels) the other way.
    Both answers then have the same between-class variance. Away from exact ties, the IPP path and
    this function agree (tested on thousands of random, structured and CAM-like images); with
    ``cv2.setUseOptimized(False)`` or on builds without IPP they agree always.

    Args:
      u8: ``[H, W]`` (any shape) uint8 array, at least one pixel.

    Returns:
      The threshold ``t`` in 0..255; pixels ``> t`` are foreground.
    """
    arr = np.asarray(u8)
    if arr.dtype != np.uint8:
        raise ValueError(
            f"u8 must be a uint8 array, got dtype {arr.dtype}; quantise a float map with "
            "to_uint8(map) first."
        )
    if arr.size == 0:
        raise ValueError(f"u8 is empty (shape {arr.shape}); Otsu needs at least one pixel.")
    hist = np.bincount(arr.ravel(), minlength=256)
    scale = 1.0 / arr.size
    # Sum of i * h[i] is an exact integer, so this equals OpenCV's double accumulation.
    mu = float(np.dot(np.arange(256, dtype=np.int64), hist)) * scale
    mu1 = q1 = max_sigma = 0.0
    best = 0
    # A 256-step scalar loop: the exact order of float operations decides ties, so no vectorising.
    for i, count in enumerate(hist.tolist()):
        p_i = count * scale
        mu1 *= q1
        q1 += p_i
        q2 = 1.0 - q1
        if min(q1, q2) < _FLT_EPSILON or max(q1, q2) > 1.0 - _FLT_EPSILON:
            continue
        mu1 = (mu1 + i * p_i) / q1
        mu2 = (mu - q1 * mu1) / q2
        sigma = q1 * q2 * (mu1 - mu2) * (mu1 - mu2)
        if sigma > max_sigma:
            max_sigma = sigma
            best = i
    return best


def binarize(map_hw: Any) -> np.ndarray:
    """Otsu binarisation of a map: ``to_uint8(map) > otsu_threshold(to_uint8(map))``.

    Args:
      map_hw: ``[H, W]`` float map in [0, 1].

    Returns:
      ``[H, W]`` bool foreground.
    """
    m = _as_float_map(map_hw, "map_hw")
    u8 = to_uint8(m)
    return u8 > otsu_threshold(u8)


# ----------------------------------------------------------------------------------------------
# Localisation metrics
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IoUResult:
    """Obj-IoU of one map with its precision and recall, all for the same class.

    Attributes:
      iou: ``|gt & bin| / |gt | bin|`` in [0, 1].
      precision: ``|gt & bin| / |bin|``; 0 when the binarised map is empty.
      recall: ``|gt & bin| / |gt|``.
      label: the class id these numbers refer to.
    """

    iou: float
    precision: float
    recall: float
    label: int


def obj_iou(
    map_hw: Any, mask_hw: Any, *, mode: str = "max", label: int | None = None
) -> IoUResult:
    """Obj-IoU of the Otsu-binarised map against the ground-truth mask.

    Modes:
      - ``"max"`` (the Diffusion-CAM authors' code): IoU with every object class in the mask, keep
        the best; precision and recall are those of that class. Ties go to the smallest class id.
      - ``"matched"`` (TAM's protocol): IoU with the mask of the object the explained word names,
        ``mask == label``.

    Args:
      map_hw: ``[H, W]`` float map in [0, 1] at mask resolution.
      mask_hw: ``[H, W]`` integer class-id mask (0 = background).
      mode: ``"max"`` or ``"matched"``.
      label: class id of the named object; required for ``"matched"``, refused for ``"max"``.

    Returns:
      :class:`IoUResult`.

    Raises:
      ValueError: all-zero mask, ``label`` not in the mask, or malformed inputs.
    """
    m, mask = _prepare(map_hw, mask_hw)
    if mode not in ("max", "matched"):
        raise ValueError(f"mode must be 'max' or 'matched', got {mode!r}.")
    if mode == "max" and label is not None:
        raise ValueError(
            "label is only used with mode='matched'; mode='max' takes the best class in the mask."
        )
    if mode == "matched" and label is None:
        raise ValueError("mode='matched' needs label=<class id of the object the word names>.")
    binary = binarize(m)
    n_bin = int(binary.sum())
    if mode == "matched":
        region = _object_region(mask, label, "mask_hw")
        candidates = [(int(label), region)]
    else:
        _object_region(mask, None, "mask_hw")  # raises on an all-zero mask
        candidates = [(int(c), mask == c) for c in np.unique(mask) if c != 0]
    best = None
    for c, gt in candidates:
        inter = int(np.count_nonzero(gt & binary))
        n_gt = int(np.count_nonzero(gt))
        iou = inter / (n_gt + n_bin - inter)
        if best is None or iou > best.iou:
            best = IoUResult(
                iou=iou,
                precision=inter / n_bin if n_bin else 0.0,
                recall=inter / n_gt,
                label=c,
            )
    return best


def func_iou(function_word_maps: Any, noun_thresholds: Sequence[float]) -> np.ndarray:
    """TAM's Func-IoU: the share of a function word's map that stays below the noun threshold.

    ``fg = mean(noun_thresholds)``; for each function-word map, ``mean(to_uint8(map) < fg)``.
    Following TAM, the noun thresholds are the Otsu thresholds (uint8 units) of the answer's noun
    maps at mask resolution (per noun, the max over its tokens; unmatched nouns included), while
    the function-word maps are used at token resolution. A good function-word map is mostly
    background, so higher is better. Average the returned values over a word's tokens, then over
    words, as TAM does.

    Args:
      function_word_maps: ``[N, h, w]`` float array, or a sequence of N ``[h_i, w_i]`` maps,
        values in [0, 1].
      noun_thresholds: N_noun >= 1 Otsu thresholds in [0, 255].

    Returns:
      ``[N]`` float64 fractions in [0, 1].
    """
    thresholds = np.asarray(noun_thresholds, dtype=np.float64).reshape(-1)
    if thresholds.size == 0:
        raise ValueError(
            "noun_thresholds is empty; Func-IoU needs at least one noun map in the answer "
            "(skip answers without nouns)."
        )
    if not np.all(np.isfinite(thresholds)) or thresholds.min() < 0 or thresholds.max() > 255:
        raise ValueError(
            "noun_thresholds must be finite Otsu thresholds in [0, 255], got "
            f"{thresholds.tolist()}."
        )
    fg = float(thresholds.mean())
    if isinstance(function_word_maps, np.ndarray) or hasattr(function_word_maps, "shape"):
        arr = np.asarray(function_word_maps)
        if arr.ndim != 3:
            raise ValueError(
                "function_word_maps must be [N, h, w] or a list of [h, w] maps, got shape "
                f"{arr.shape}."
            )
        maps = list(arr)
    else:
        maps = list(function_word_maps)
    if not maps:
        raise ValueError("function_word_maps is empty; pass at least one function-word map.")
    out = np.empty(len(maps), dtype=np.float64)
    for i, fm in enumerate(maps):
        m = _as_float_map(fm, f"function_word_maps[{i}]")
        out[i] = float(np.mean(to_uint8(m) < fg))
    return out


@dataclasses.dataclass(frozen=True)
class ContrastResult:
    """Contrast of a map between object and background.

    Attributes:
      ratio: ``fg_mean / (bg_mean + 1e-8)``, exactly the authors' per-image value.
      fg_mean: mean of the map over object pixels.
      bg_mean: mean of the map over background pixels (0 when there are none, as the authors).
      near_zero_background: ``bg_mean < 1e-6``; the ratio is then an artefact of the epsilon
        (up to 1e8). Count such images separately and leave them out of contrast means
        (:func:`summarize` does both).
    """

    ratio: float
    fg_mean: float
    bg_mean: float
    near_zero_background: bool


def contrast(map_hw: Any, mask_hw: Any, *, label: int | None = None) -> ContrastResult:
    """Contrast = mean(map | object) / mean(map | background).

    Args:
      map_hw: ``[H, W]`` non-negative float map at mask resolution.
      mask_hw: ``[H, W]`` integer class-id mask (0 = background).
      label: ``None`` for all objects (``mask > 0``, the authors' choice), or one class id
        (``mask == label``; everything else is background).

    Returns:
      :class:`ContrastResult`.
    """
    m, mask = _prepare(map_hw, mask_hw)
    _check_nonnegative(m, "map_hw")
    region = _object_region(mask, label, "mask_hw")
    m64 = m.astype(np.float64)
    fg_mean = float(m64[region].mean())
    bg_mean = float(m64[~region].mean()) if (~region).any() else 0.0
    return ContrastResult(
        ratio=fg_mean / (bg_mean + _CONTRAST_EPS),
        fg_mean=fg_mean,
        bg_mean=bg_mean,
        near_zero_background=bg_mean < NEAR_ZERO_BACKGROUND,
    )


def concentration(map_hw: Any, mask_hw: Any, *, label: int | None = None) -> float:
    """Concentration = sum(map | object) / sum(map) (the energy-based pointing game).

    An all-zero map gives 0 (it points nowhere; the authors' epsilon gives the same).

    Args:
      map_hw: ``[H, W]`` non-negative float map at mask resolution.
      mask_hw: ``[H, W]`` integer class-id mask (0 = background).
      label: ``None`` for all objects, or one class id.

    Returns:
      float in [0, 1].
    """
    m, mask = _prepare(map_hw, mask_hw)
    _check_nonnegative(m, "map_hw")
    region = _object_region(mask, label, "mask_hw")
    m64 = m.astype(np.float64)
    return float(m64[region].sum() / (m64.sum() + _CONCENTRATION_EPS))


def pointing_game(map_hw: Any, mask_hw: Any, *, label: int | None = None) -> bool:
    """Pointing game: does the map's maximum fall inside the object?

    A hit requires *every* pixel attaining the maximum to lie inside the object, so a flat map
    (or one that peaks equally inside and outside) is a miss unless the object covers it all. For
    a unique maximum this is the usual argmax test. No distance tolerance is applied.

    Args:
      map_hw: ``[H, W]`` float map at mask resolution.
      mask_hw: ``[H, W]`` integer class-id mask (0 = background).
      label: ``None`` for all objects, or one class id.

    Returns:
      bool hit.
    """
    m, mask = _prepare(map_hw, mask_hw)
    region = _object_region(mask, label, "mask_hw")
    peak = m == m.max()
    return bool(np.all(region[peak]))


# ----------------------------------------------------------------------------------------------
# F3 and aggregation
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Faithfulness: deletion / insertion
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FaithfulnessCurves:
    """Deletion and insertion curves of one map.

    Attributes:
      fractions: ``[S + 1]`` fraction of image pixels removed (deletion) or revealed (insertion)
        at each step, from 0 to 1.
      deletion: ``[S + 1]`` scores as the most salient patches are replaced by the baseline
        (lower area = more faithful).
      insertion: ``[S + 1]`` scores as the most salient patches are revealed on the baseline
        (higher area = more faithful).
      deletion_auc: trapezoid area of ``deletion`` over ``fractions``.
      insertion_auc: trapezoid area of ``insertion`` over ``fractions``.
    """

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    deletion_auc: float
    insertion_auc: float


def deletion_insertion_curves(
    score_fn: Callable[[np.ndarray], Any],
    image: Any,
    map_hw: Any,
    *,
    num_steps: int = 16,
    patch: int = 8,
    baseline: Any = 0.0,
    batch_size: int = 16,
) -> FaithfulnessCurves:
    """Deletion and insertion curves (RISE-style) of a saliency map, with batched scoring.

    The image is cut into ``patch x patch`` cells (edge cells may be smaller). Each cell's
    saliency is the mean of the map resized to the image; cells are ranked by decreasing saliency,
    ties by raster order, so the result is deterministic. At step ``k = 0..S`` the top
    ``floor(k * P / S)`` of the P cells are replaced by ``baseline`` (deletion) or are the only
    cells taken from the image, the rest being the baseline (insertion).

    All ``2 (S + 1)`` perturbed images are scored through ``score_fn`` in chunks of exactly
    ``batch_size`` images (the last chunk is padded by repeating its last image and the padding's
    scores are dropped), so a jitted ``score_fn`` compiles once.

    Args:
      score_fn: ``images [N, H, W, C] -> scores [N]``, e.g. the model's log-probability of the
        explained token. Receives NumPy arrays of ``image``'s dtype.
      image: ``[H, W, C]`` image the map explains.
      map_hw: ``[h, w]`` non-negative float map (any resolution; resized to ``[H, W]``).
      num_steps: S, number of steps (1 <= S <= number of cells).
      patch: cell side in pixels (>= 1).
      baseline: scalar or array broadcastable to ``[H, W, C]`` (e.g. 0, the dataset mean, or a
        blurred copy of the image).
      batch_size: images per ``score_fn`` call (>= 1).

    Returns:
      :class:`FaithfulnessCurves`.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.size == 0:
        raise ValueError(f"image must be [H, W, C] with at least one pixel, got shape {img.shape}.")
    if img.dtype.kind not in "fiu":
        raise ValueError(f"image must be a numeric array, got dtype {img.dtype}.")
    if img.dtype.kind == "f" and not np.all(np.isfinite(img)):
        raise ValueError("image contains NaN or infinite values.")
    height, width, _ = img.shape
    m = _as_float_map(map_hw, "map_hw")
    _check_nonnegative(m, "map_hw")
    for name, v in (("num_steps", num_steps), ("patch", patch), ("batch_size", batch_size)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}.")
    if not callable(score_fn):
        raise ValueError(f"score_fn must be callable images [N, H, W, C] -> [N], got {score_fn!r}.")
    try:
        base = np.broadcast_to(np.asarray(baseline), img.shape)
    except ValueError as err:
        raise ValueError(
            f"baseline with shape {np.shape(baseline)} does not broadcast to image shape "
            f"{img.shape}."
        ) from err
    if base.dtype.kind not in "fiu" or (base.dtype.kind == "f" and not np.all(np.isfinite(base))):
        raise ValueError("baseline must be finite and numeric.")
    base = base.astype(img.dtype)

    m = resize_map(m, (height, width)).astype(np.float64)
    n_cy, n_cx = -(-height // patch), -(-width // patch)
    n_cells = n_cy * n_cx
    if num_steps > n_cells:
        raise ValueError(
            f"num_steps={num_steps} exceeds the {n_cells} cells of a {height}x{width} image with "
            f"patch={patch}; use fewer steps or a smaller patch."
        )
    cell_of_pixel = (np.arange(height) // patch)[:, None] * n_cx + (np.arange(width) // patch)[None]
    cell_sum = np.bincount(cell_of_pixel.ravel(), weights=m.ravel(), minlength=n_cells)
    cell_size = np.bincount(cell_of_pixel.ravel(), minlength=n_cells)
    order = np.argsort(-(cell_sum / cell_size), kind="stable")
    rank_of_cell = np.empty(n_cells, dtype=np.int64)
    rank_of_cell[order] = np.arange(n_cells)
    rank_hw = rank_of_cell[cell_of_pixel]

    n_top = (np.arange(num_steps + 1) * n_cells) // num_steps  # [S + 1] cells taken per step
    pixels_done = np.concatenate([[0], np.cumsum(cell_size[order])])[n_top]
    fractions = pixels_done / (height * width)

    # Row j < S + 1 is deletion step j; row S + 1 + j is insertion step j.
    n_images = 2 * (num_steps + 1)
    scores = np.empty(n_images, dtype=np.float64)
    for start in range(0, n_images, batch_size):
        idx = np.arange(start, start + batch_size)
        valid = idx < n_images
        idx = np.minimum(idx, n_images - 1)
        is_deletion = idx <= num_steps
        step = np.where(is_deletion, idx, idx - (num_steps + 1))
        salient = rank_hw[None] < n_top[step][:, None, None]  # [B, H, W]
        take_image = np.where(is_deletion[:, None, None], ~salient, salient)
        batch = np.where(take_image[..., None], img[None], base[None])
        out = np.asarray(score_fn(batch))
        if out.dtype.name.startswith(("bfloat16", "float8")):
            out = out.astype(np.float32)
        if out.shape != (batch_size,):
            raise ValueError(
                f"score_fn returned shape {out.shape} for a batch of {batch_size} images; "
                f"expected ({batch_size},)."
            )
        if out.dtype.kind not in "fiu" or not np.all(np.isfinite(out)):
            raise ValueError(f"score_fn returned non-finite or non-numeric scores: {out}.")
        scores[idx[valid]] = out[valid]
    deletion = scores[: num_steps + 1]
    insertion = scores[num_steps + 1 :]
    return FaithfulnessCurves(
        fractions=fractions,
        deletion=deletion,
        insertion=insertion,
        deletion_auc=float(np.trapezoid(deletion, fractions)),
        insertion_auc=float(np.trapezoid(insertion, fractions)),
    )
