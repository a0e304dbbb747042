"""Host-side image preprocessing (PIL / NumPy only; never inside jit).

Reproduces what the dMLLMs were trained with:

- one view: PIL bicubic resize to the tower's square size, scale to [0, 1], normalise with mean = std = 0.5,
  channels last (NHWC, unlike the torch code);
- any resolution (LaViDa ``anyres``, LLaDA-V ``anyres_max_4``): pick the best pinpoint resolution (largest
  effective resolution, then least waste), resize the image preserving its aspect ratio and paste it centred on
  a black canvas of that size, cut the canvas into square crops row-major, and put the *base view* (the whole
  image squashed to one square) first.

The geometry of the resulting token grid (:class:`ImageGeometry`) is computed here from integers only, with the
same arithmetic as the reference code, so the layout of image tokens in the sequence is known on the host before
anything runs on the device.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from dcam_jax.models.config import MLLMConfig

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


class ImageError(ValueError):
    """An image could not be read or is unusable (corrupt file, wrong shape, too small)."""


# --------------------------------------------------------------------------------------------------------
# loading and validation


def load_image(image: ImageLike, *, min_side: int = 1) -> Image.Image:
    """Return an RGB PIL image from a path, a PIL image or a uint8 array [H, W] / [H, W, 3|4].

    Grayscale, palette and RGBA inputs are converted to RGB with a warning that says so. A file that is not a
    readable image, or an image smaller than ``min_side`` pixels on a side, raises :class:`ImageError`.
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.exists(path):
            raise ImageError(f"image file {path!r} does not exist")
        if os.path.isdir(path):
            raise ImageError(f"image path {path!r} is a directory, expected an image file")
        try:
            with Image.open(path) as im:
                im.load()
                pil = im.copy()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"cannot read image {path!r}: {e}. Is it a PNG/JPEG file, and is it complete?") from None
        source = repr(path)
    elif isinstance(image, Image.Image):
        pil, source = image, "the given PIL image"
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            raise ImageError(f"image array has dtype {arr.dtype}; expected uint8 in [0, 255] "
                             "(convert with (x * 255).round().astype(np.uint8))")
        if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4)):
            pil = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
        else:
            raise ImageError(f"image array has shape {arr.shape}; expected [H, W], [H, W, 3] or [H, W, 4]")
        source = "the given array"
    else:
        raise ImageError(f"unsupported image type {type(image).__name__}; pass a path, a PIL image or a uint8 array")
    if pil.mode != "RGB":
        warnings.warn(f"{source} has mode {pil.mode}; converted to RGB", stacklevel=2)
        if pil.mode in ("RGBA", "LA", "PA") or (pil.mode == "P" and "transparency" in pil.info):
            # composite onto black, as PIL's plain convert would do for the colour channels
            pil = pil.convert("RGBA")
            bg = Image.new("RGBA", pil.size, (0, 0, 0, 255))
            pil = Image.alpha_composite(bg, pil)
        pil = pil.convert("RGB")
    if min(pil.size) < min_side:
        raise ImageError(f"{source} is {pil.size[0]}x{pil.size[1]} pixels; it must be at least {min_side} pixels on "
                         "each side (one vision patch)")
    return pil


def normalize(pil: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Bicubic resize to (size, size), scale to [0, 1], (x - mean) / std. Returns [size, size, 3] float32."""
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.BICUBIC)
    x = np.asarray(pil, dtype=np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


# --------------------------------------------------------------------------------------------------------
# any-resolution arithmetic (integers only, exactly as the reference)


def select_best_resolution(image_size: tuple[int, int], pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Best (width, height) among ``pinpoints`` for an image of ``image_size`` = (width, height).

    Maximises the effective resolution min(scaled area, original area), then minimises the wasted area; the first
    candidate wins ties.
    """
    ow, oh = image_size
    best, best_eff, best_waste = None, 0, math.inf
    for w, h in pinpoints:
        scale = min(w / ow, h / oh)
        dw, dh = int(ow * scale), int(oh * scale)
        eff = min(dw * dh, ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (w, h), eff, waste
    return best


def resize_and_pad(pil: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Aspect-preserving bicubic resize to fit ``target`` = (width, height), pasted centred on black."""
    ow, oh = pil.size
    tw, th = target
    sw, sh = tw / ow, th / oh
    if sw < sh:
        nw, nh = tw, min(math.ceil(oh * sw), th)
    else:
        nh, nw = th, min(math.ceil(ow * sh), tw)
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(pil.resize((nw, nh), Image.BICUBIC), ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def unpad_bounds(grid_hw: tuple[int, int], image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Rows and columns ``(r0, r1, c0, c1)`` of a (H, W) feature map that hold the image, not the black padding."""
    ch, cw = grid_hw
    ow, oh = image_size
    if ow / oh > cw / ch:
        new_h = int(oh * (cw / ow))
        pad = (ch - new_h) // 2
        return pad, ch - pad, 0, cw
    new_w = int(ow * (ch / oh))
    pad = (cw - new_w) // 2
    return 0, ch, pad, cw - pad


@dataclasses.dataclass(frozen=True)
class ImageGeometry:
    """Static description of how one image becomes image tokens (hashable, usable as a jit static argument).

    Attributes:
      image_size: original (width, height) in pixels.
      num_views: views fed to the tower (1 base view + gw*gh crops for any-resolution layouts).
      view_side: tokens per side of one view after optional pooling (u).
      grid: (gw, gh) crops across and down (0, 0 for single-view layouts).
      best_resolution: the chosen pinpoint (width, height), or None.
      unpad: (r0, r1, c0, c1) rows/columns of the (gh*u, gw*u) crop map kept after unpadding.
      highres_shape: (H, W) of the high-resolution grid after unpadding and the optional LLaDA-V cap
        (0, 0 for single-view layouts).
      capped: whether the LLaDA-V cap resized the high-resolution grid.
      pad_box: for the "pad" layout, (top, left, height, width) in pixels of the image inside the padded square
        base view of side max(width, height); None when the base view covers exactly the image.
    """

    image_size: tuple[int, int]
    num_views: int
    view_side: int
    grid: tuple[int, int]
    best_resolution: tuple[int, int] | None
    unpad: tuple[int, int, int, int]
    highres_shape: tuple[int, int]
    capped: bool
    pad_box: tuple[int, int, int, int] | None = None

    @property
    def base_tokens(self) -> int:
        return self.view_side * self.view_side

    @property
    def num_image_tokens(self) -> int:
        """Base view tokens + high-res rows of (W + 1) tokens (a newline closes each row)."""
        H, W = self.highres_shape
        return self.base_tokens + H * (W + 1 if H else 0)


def image_geometry(image_size: tuple[int, int], config: MLLMConfig) -> ImageGeometry:
    """Token-grid geometry of an image of ``image_size`` = (width, height) under ``config``'s layout rules."""
    w, h = int(image_size[0]), int(image_size[1])
    if w <= 0 or h <= 0:
        raise ImageError(f"image size {image_size} must be positive")
    u = config.tokens_per_view_side
    if not config.image_aspect_ratio.startswith("anyres"):
        side = max(w, h)
        box = ((side - h) // 2, (side - w) // 2, h, w) if config.image_aspect_ratio == "pad" and w != h else None
        return ImageGeometry((w, h), 1, u, (0, 0), None, (0, 0, 0, 0), (0, 0), False, box)
    S = config.vision.image_size
    best = select_best_resolution((w, h), config.grid_pinpoints)
    gw, gh = best[0] // S, best[1] // S
    r0, r1, c0, c1 = unpad_bounds((gh * u, gw * u), (w, h))
    H, W = r1 - r0, c1 - c0
    capped = False
    if config.image_aspect_ratio == "anyres_max_4":
        times = math.sqrt(H * W / (config.anyres_max_crops * u ** 2))
        if times > 1.1:
            H, W, capped = int(H // times), int(W // times), True
    return ImageGeometry((w, h), 1 + gw * gh, u, (gw, gh), best, (r0, r1, c0, c1), (H, W), capped)


@dataclasses.dataclass(frozen=True)
class ProcessedImage:
    """pixel_values: [num_views, S, S, 3] float32 NHWC, normalised; geometry: the static token geometry."""

    pixel_values: np.ndarray
    geometry: ImageGeometry


class ImageProcessor:
    """Turns an image into tower inputs and its token geometry, following ``config``'s layout rules.

    >>> proc = ImageProcessor(config)
    >>> out = proc("photo.jpg")          # out.pixel_values [n, S, S, 3], out.geometry
    """

    def __init__(self, config: MLLMConfig):
        self.config = config

    def __repr__(self):
        c = self.config
        return (f"ImageProcessor(view={c.vision.image_size}px, mode={c.image_aspect_ratio!r}, "
                f"pinpoints={len(c.grid_pinpoints)}, tokens_per_view_side={c.tokens_per_view_side})")

    def __call__(self, image: ImageLike) -> ProcessedImage:
        cfg = self.config
        vc = cfg.vision
        pil = load_image(image, min_side=vc.patch_size)
        geom = image_geometry(pil.size, cfg)
        norm = lambda im: normalize(im, vc.image_size, vc.image_mean, vc.image_std)
        if cfg.image_aspect_ratio == "square":
            views = [norm(pil)]
        elif cfg.image_aspect_ratio == "pad":
            views = [norm(expand_to_square(pil, tuple(int(m * 255) for m in vc.image_mean)))]
        else:
            S = vc.image_size
            canvas = resize_and_pad(pil, geom.best_resolution)
            crops = [canvas.crop((x, y, x + S, y + S))
                     for y in range(0, canvas.size[1], S) for x in range(0, canvas.size[0], S)]
            views = [norm(pil)] + [norm(c) for c in crops]
        return ProcessedImage(np.stack(views).astype(np.float32), geom)


def expand_to_square(pil: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad the shorter side with ``fill`` so the image is square, the image centred (LLaVA's ``pad`` mode)."""
    w, h = pil.size
    if w == h:
        return pil
    side = max(w, h)
    out = Image.new("RGB", (side, side), fill)
    out.paste(pil, ((side - w) // 2, (side - h) // 2))
    return out
