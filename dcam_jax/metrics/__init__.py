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

from dcam_jax.metrics._checks import CONTRAST_SCALE, NEAR_ZERO_BACKGROUND  # noqa: F401
from dcam_jax.metrics.localisation import (  # noqa: F401
    ContrastResult, IoUResult, binarize, concentration, contrast, func_iou, obj_iou, otsu_threshold, pointing_game,
    resize_map, to_uint8)
from dcam_jax.metrics.summary import f3, f3_of_means, map_metrics, summarize  # noqa: F401
from dcam_jax.metrics.curves import FaithfulnessCurves, deletion_insertion_curves  # noqa: F401

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
