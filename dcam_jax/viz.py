"""Pictures of explanations: heat-map overlays, per-token PNGs and a one-page summary figure.

Host-side only (NumPy, PIL, matplotlib with the non-interactive Agg backend).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def _save_figure(fig, path: str | os.PathLike) -> Path:
    """Lay out, write atomically (creating the parent folder) and close a matplotlib figure; returns the path."""
    from dcam_jax import fileio

    return fileio.save_figure(fig, path, dpi=100)


def resize_map(map_hw: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a [h, w] map to ``size_hw`` = (H, W) (half-pixel centres), clipped to [0, 1]."""
    m = np.asarray(map_hw, np.float32)
    if m.ndim != 2:
        raise ValueError(f"map must be [h, w], got shape {m.shape}")
    img = Image.fromarray(m, mode="F").resize((int(size_hw[1]), int(size_hw[0])), Image.BILINEAR)
    return np.clip(np.asarray(img, np.float32), 0.0, 1.0)


def colorize(map_hw: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """[h, w] map in [0, 1] -> [h, w, 3] uint8 colours."""
    m = np.asarray(map_hw, np.float32)
    if not np.all(np.isfinite(m)):
        raise ValueError("map contains NaN or inf")
    return (255 * _cmap(cmap)(np.clip(m, 0, 1))[..., :3]).astype(np.uint8)


def overlay(image: np.ndarray, map_hw: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a heat map over an image. image: [H, W, 3] uint8; map: [h, w] in [0, 1] (resized to H x W).

    Returns [H, W, 3] uint8.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be [H, W, 3] uint8, got {image.shape} {image.dtype}")
    heat = colorize(resize_map(map_hw, image.shape[:2]), cmap).astype(np.float32)
    return np.clip((1 - alpha) * image.astype(np.float32) + alpha * heat, 0, 255).round().astype(np.uint8)


def safe_name(token: str, index: int) -> str:
    """A file-name-safe label for token ``index``: ``03_red``."""
    clean = re.sub(r"[^A-Za-z0-9_-]+", "_", token.strip()).strip("_") or "tok"
    return f"{index:02d}_{clean[:32]}"


def display_image(image: np.ndarray, min_side: int = 256, max_side: int = 1024) -> np.ndarray:
    """The image at a size fit for looking at: a long side under ``min_side`` is enlarged by a whole factor
    (nearest, pixels stay sharp), one over ``max_side`` is reduced to ``max_side`` (Lanczos); otherwise the image
    itself. image [H, W, 3] uint8 -> [H', W', 3] uint8. Bounds the memory of every picture drawn from it."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be [H, W, 3] uint8, got {image.shape} {image.dtype}")
    if not 1 <= min_side <= max_side:
        raise ValueError(f"need 1 <= min_side ({min_side}) <= max_side ({max_side})")
    h, w = image.shape[:2]
    long = max(h, w)
    if long > max_side:
        f = max_side / long
        size = (max(1, round(w * f)), max(1, round(h * f)))
        return np.asarray(Image.fromarray(image).resize(size, Image.LANCZOS))
    if long < min_side:
        k = min(-(-min_side // long), max_side // long)
        if k > 1:
            return np.asarray(Image.fromarray(image).resize((w * k, h * k), Image.NEAREST))
    return image


def save_overlays(image: np.ndarray, maps: np.ndarray, tokens: Sequence[str], out_dir: str | os.PathLike,
                  alpha: float = 0.5, min_side: int = 256, max_side: int = 1024) -> list[Path]:
    """Write one overlay PNG per token into ``out_dir``. image [H, W, 3] uint8; maps [T, h, w] in [0, 1], aligned
    with the image (each is resized to it). Returns the paths.

    The overlays are drawn on :func:`display_image` (``min_side``, ``max_side``): small images are enlarged so
    they stay readable, large ones reduced so memory stays bounded whatever the input size.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shown = display_image(image, min_side, max_side)
    paths = []
    for i, (m, tok) in enumerate(zip(maps, tokens)):
        p = out / f"overlay_{safe_name(tok, i)}.png"
        Image.fromarray(overlay(shown, m, alpha)).save(p)
        paths.append(p)
    return paths


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (unless a backend is already in use), imported on
    first use so that the library itself does not need matplotlib at import time."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def summary_figure(image: np.ndarray, maps: np.ndarray, tokens: Sequence[str], answer: str,
                   path: str | os.PathLike, *, title: str | None = None, max_tokens: int = 12,
                   raw_maps: np.ndarray | None = None) -> Path:
    """One PNG: the image, the answer with the explained words marked, and a row of overlays (optionally a second
    row with the raw maps before refinement)."""
    plt = pyplot()

    maps = np.asarray(maps)[:max_tokens]
    tokens = list(tokens)[:max_tokens]
    n = len(tokens)
    rows = 2 if raw_maps is not None else 1
    fig, axes = plt.subplots(rows, n + 1, figsize=(2.0 * (n + 1), 2.3 * rows + 0.6), squeeze=False)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("input", fontsize=9)
    for i, (m, t) in enumerate(zip(maps, tokens)):
        axes[0, i + 1].imshow(overlay(image, m))
        axes[0, i + 1].set_title(t.strip(), fontsize=10, fontweight="bold")
    if raw_maps is not None:
        axes[1, 0].axis("off")
        axes[1, 0].text(0.5, 0.5, "raw\n(before\nrefinement)", ha="center", va="center", fontsize=9)
        for i, m in enumerate(np.asarray(raw_maps)[:max_tokens]):
            axes[1, i + 1].imshow(overlay(image, m))
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    marked = answer
    for t in sorted({t.strip() for t in tokens if t.strip()}, key=len, reverse=True):
        marked = re.sub(rf"(?<![\w\[]){re.escape(t)}(?![\w\]])", f"[{t}]", marked)
    fig.suptitle((title + "\n" if title else "") + f"answer: {marked}", fontsize=10)
    return _save_figure(fig, path)


def method_grid(images: Sequence[np.ndarray], labels: Sequence[str], maps: dict[str, Sequence[np.ndarray]],
                path: str | os.PathLike, *, title: str | None = None, masks: Sequence[np.ndarray] | None = None,
                scale: int = 2) -> Path:
    """One PNG comparing methods on the same words: one row per (image, word), the image (with the word's true
    mask outlined when ``masks`` are given) and one overlay column per method.

    images: R images [H, W, 3] uint8; labels: R row labels (e.g. the explained word); maps: method name -> R maps
    [h, w] in [0, 1]; masks: R bool [H, W] or None.
    """
    plt = pyplot()

    R = len(images)
    if len(labels) != R or any(len(v) != R for v in maps.values()):
        raise ValueError(f"method_grid: {R} images, {len(labels)} labels and map lists of lengths "
                         f"{[len(v) for v in maps.values()]}; all must be equal")
    if R == 0 or not maps:
        raise ValueError("method_grid: nothing to draw (no rows or no methods)")
    names = list(maps)
    fig, axes = plt.subplots(R, len(names) + 1, figsize=(1.9 * (len(names) + 1), 1.9 * R + 0.5), squeeze=False)
    for r in range(R):
        img = np.asarray(images[r])
        big = np.asarray(Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST))
        axes[r, 0].imshow(big)
        if masks is not None:
            m = np.asarray(Image.fromarray(np.asarray(masks[r], np.uint8) * 255).resize(
                (big.shape[1], big.shape[0]), Image.NEAREST)) > 0
            axes[r, 0].contour(m, levels=[0.5], colors="white", linewidths=1.0)
        axes[r, 0].set_ylabel(labels[r], fontsize=10, fontweight="bold")
        for c, name in enumerate(names):
            axes[r, c + 1].imshow(overlay(big, np.asarray(maps[name][r])))
            if masks is not None:
                axes[r, c + 1].contour(m, levels=[0.5], colors="white", linewidths=0.8)
    for c, name in enumerate(["image (true mask)" if masks is not None else "image"] + names):
        axes[0, c].set_title(name, fontsize=10)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return _save_figure(fig, path)
