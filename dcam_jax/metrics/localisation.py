"""Map localisation metrics: resize, Otsu (OpenCV-exact), binarise, Obj-IoU, Func-IoU, contrast, concentration, pointing game."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from dcam_jax.metrics._checks import NEAR_ZERO_BACKGROUND, _CONCENTRATION_EPS, _CONTRAST_EPS, _FLT_EPSILON, _as_float_map, _check_nonnegative, _check_unit_range, _object_region, _prepare


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
