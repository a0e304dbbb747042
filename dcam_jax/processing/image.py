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
from PIL import Image, ImageOps, UnidentifiedImageError

from dcam_jax.models.config import MLLMConfig
from dcam_jax.models.mllm import ImageGeometry  # noqa: F401  (the geometry this module computes)

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


class ImageError(ValueError):
    """An image could not be read or is unusable (corrupt file, wrong shape, too small, too large)."""


# Larger images are refused before their pixels are decoded (a 64-megapixel RGB image is 192 MB of pixels).
MAX_IMAGE_PIXELS = 64_000_000


def _to_rgb(pil: Image.Image, source: str) -> Image.Image:
    """Convert any PIL mode to RGB by a documented rule (see :func:`load_image`)."""
    mode = pil.mode
    if mode == "RGB":
        return pil
    warnings.warn(f"{source} has mode {mode}; converted to RGB", stacklevel=3)
    if mode.startswith("I;16") or mode in ("I", "F"):
        # High bit depth greyscale: scale to 8 bits by the range the mode can hold, never by clipping.
        x = np.asarray(pil, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise ImageError(f"{source} (mode {mode}) holds NaN or infinite pixel values")
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if mode == "F":
            if lo >= 0.0 and hi <= 1.0:
                scale = 255.0
            elif lo >= 0.0 and hi <= 255.0:
                scale = 1.0
            else:
                raise ImageError(f"{source} is a float image with values in [{lo:g}, {hi:g}]; expected [0, 1] or "
                                 "[0, 255]. Rescale it to 8 bits first.")
        elif mode.startswith("I;16") or (lo >= 0.0 and hi <= 65535.0 and hi > 255.0):
            scale = 255.0 / 65535.0
        elif lo >= 0.0 and hi <= 255.0:
            scale = 1.0
        else:
            raise ImageError(f"{source} is a 32-bit integer image with values in [{lo:g}, {hi:g}]; expected "
                             "[0, 65535]. Rescale it to 8 bits first.")
        grey = np.clip(np.rint(x * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in pil.info):
        # Composite onto black, as PIL's plain convert would do for the colour channels.
        rgba = pil.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    try:
        return pil.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
    except (ValueError, OSError) as e:
        raise ImageError(f"{source} has mode {mode}, which cannot be converted to RGB: {e}") from None


# --------------------------------------------------------------------------------------------------------
# loading and validation


def load_image(image: ImageLike, *, min_side: int = 1, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Return an RGB PIL image from a path, a PIL image or a uint8 array [H, W] / [H, W, 3|4].

    Every PIL mode becomes RGB by one rule, with a warning that names the original mode:

    - 16-bit greyscale (``I;16*``) is scaled by 255 / 65535; 32-bit integer (``I``) likewise when its values
      exceed 255, as is when they fit in [0, 255]; float (``F``) by 255 when in [0, 1], as is when in [0, 255].
      Other ranges, NaN or infinities raise :class:`ImageError` (no clipping, no silent rescaling).
    - Alpha (``RGBA``, ``LA``, ``PA``, transparent palettes) is composited onto black.
    - ``L``, ``1``, ``P``, ``CMYK``, ``YCbCr`` and the rest go through PIL's own conversion.

    Files are turned upright by their EXIF orientation tag. A file that is not a readable image, an image
    smaller than ``min_side`` pixels on a side, or one of more than ``max_pixels`` pixels (checked before
    decoding) raises :class:`ImageError`.
    """
    def check_size(size, source):
        if size[0] * size[1] > max_pixels:
            raise ImageError(f"{source} is {size[0]}x{size[1]} pixels, more than the limit of {max_pixels:,}; "
                             "downscale it first (the model sees at most a few hundred pixels per side)")

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.exists(path):
            raise ImageError(f"image file {path!r} does not exist")
        if os.path.isdir(path):
            raise ImageError(f"image path {path!r} is a directory, expected an image file")
        source = repr(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    check_size(im.size, source)
                    im.load()
                    pil = ImageOps.exif_transpose(im)
                    pil = pil.copy() if pil is im else pil
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(f"{source} is too large to decode safely: {e}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(f"cannot read image {path!r}: {e}. Is it a PNG/JPEG file, and is it complete?") from None
    elif isinstance(image, Image.Image):
        pil, source = image, "the given PIL image"
        check_size(pil.size, source)
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            raise ImageError(f"image array has dtype {arr.dtype}; expected uint8 in [0, 255] "
                             "(convert with (x * 255).round().astype(np.uint8))")
        if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4)):
            check_size((arr.shape[1], arr.shape[0]), "the given array")
            pil = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
        else:
            raise ImageError(f"image array has shape {arr.shape}; expected [H, W], [H, W, 3] or [H, W, 4]")
        source = "the given array"
    else:
        raise ImageError(f"unsupported image type {type(image).__name__}; pass a path, a PIL image or a uint8 array")
    pil = _to_rgb(pil, source)
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
