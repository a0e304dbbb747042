"""Deletion and insertion curves: the model's score of a word as image patches are removed or revealed in map order."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from dcam_jax.metrics._checks import _as_float_map, _check_nonnegative
from dcam_jax.metrics.localisation import resize_map


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


def _checked_inputs(score_fn, image, map_hw, num_steps, patch, baseline, batch_size):
    """Validate the arguments of :func:`deletion_insertion_curves`; -> (image [H, W, C], map [h, w] float,
    baseline [H, W, C] in the image's dtype)."""
    img = np.asarray(image)
    if img.ndim != 3 or img.size == 0:
        raise ValueError(f"image must be [H, W, C] with at least one pixel, got shape {img.shape}.")
    if img.dtype.kind not in "fiu":
        raise ValueError(f"image must be a numeric array, got dtype {img.dtype}.")
    if img.dtype.kind == "f" and not np.all(np.isfinite(img)):
        raise ValueError("image contains NaN or infinite values.")
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
    return img, m, base.astype(img.dtype)


def _cell_ranks(m: np.ndarray, size: tuple[int, int], num_steps: int, patch: int):
    """Rank the image's ``patch x patch`` cells by the mean of the map resized to ``size`` = (H, W), ties by
    raster order. -> (rank of each pixel's cell [H, W], cells taken per step [S + 1], fraction of the image
    taken per step [S + 1])."""
    height, width = size
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
    n_top = (np.arange(num_steps + 1) * n_cells) // num_steps  # [S + 1] cells taken per step
    pixels_done = np.concatenate([[0], np.cumsum(cell_size[order])])[n_top]
    return rank_of_cell[cell_of_pixel], n_top, pixels_done / (height * width)


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
    img, m, base = _checked_inputs(score_fn, image, map_hw, num_steps, patch, baseline, batch_size)
    rank_hw, n_top, fractions = _cell_ranks(m, img.shape[:2], num_steps, patch)

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
