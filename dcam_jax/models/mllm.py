"""Multimodal assembly: image views -> tower -> projector -> pooled grid -> image tokens spliced into the text.

Image token block of one image (LLaVA-NeXT ``spatial_unpad``):

    [ base view: u*u tokens, no newline | high-res rows: H x (W + 1) tokens, an ``image_newline`` closing each row ]

The base view is the whole image squashed to one square view; the high-res grid is the crops' feature maps laid
side by side (gh*u x gw*u), with the rows/columns that only saw black padding removed ("unpad"), and for LLaDA-V
bilinearly shrunk when it exceeds ~4 views of tokens. Single-view layouts ("pad", "square") have only the base view.

:class:`ImageLayout` is the one place that knows where image tokens sit in the sequence: for each view, the
sequence positions of its grid tokens as an [H, W] index array (newline tokens excluded). All CAM code slices
image tokens through it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dcam_jax.models import llada, projector, siglip
from dcam_jax.models.config import IMAGE_TOKEN_INDEX, MLLMConfig

Params = dict[str, Any]


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


# --------------------------------------------------------------------------------------------------------
# layout


@dataclasses.dataclass(frozen=True, eq=False)
class ImageLayout:
    """Where one image's tokens sit in a sequence.

    Attributes:
      geometry: the image's :class:`ImageGeometry`.
      start: sequence index of the first image token.
      views: view name ("base", and "highres" for any-resolution layouts) -> [H, W] int32 sequence positions.
      newline_positions: [H_highres] int32 positions of the newline tokens (empty for single-view layouts).
    """

    geometry: ImageGeometry
    start: int
    views: dict[str, np.ndarray]
    newline_positions: np.ndarray

    @property
    def stop(self) -> int:
        """One past the last image token."""
        return self.start + self.geometry.num_image_tokens

    @property
    def num_tokens(self) -> int:
        return self.geometry.num_image_tokens

    @property
    def default_view(self) -> str:
        return "highres" if "highres" in self.views else "base"

    def positions(self, view: str | None = None) -> np.ndarray:
        """[H, W] sequence positions of ``view`` (default: the high-res grid when there is one)."""
        view = view or self.default_view
        if view not in self.views:
            raise ValueError(f"this image has no {view!r} view; available views: {sorted(self.views)}")
        return self.views[view]

    def shape(self, view: str | None = None) -> tuple[int, int]:
        return tuple(self.positions(view).shape)

    def shifted(self, offset: int) -> "ImageLayout":
        """The same layout with every position moved by ``offset`` (e.g. after left context is added)."""
        return ImageLayout(self.geometry, self.start + offset, {k: v + offset for k, v in self.views.items()},
                           self.newline_positions + offset)

    def to_dict(self) -> dict:
        g = self.geometry
        return {"start": self.start, "stop": self.stop, "image_size": list(g.image_size), "grid": list(g.grid),
                "best_resolution": list(g.best_resolution) if g.best_resolution else None,
                "views": {k: list(v.shape) for k, v in self.views.items()}, "capped": g.capped}

    def __repr__(self):
        views = ", ".join(f"{k}={v.shape[0]}x{v.shape[1]}" for k, v in self.views.items())
        return f"ImageLayout(tokens [{self.start}, {self.stop}), {views})"


def image_layout(geometry: ImageGeometry, start: int = 0) -> ImageLayout:
    """Exact token positions of an image block that begins at sequence index ``start``."""
    u = geometry.view_side
    base = start + np.arange(u * u, dtype=np.int32).reshape(u, u)
    views = {"base": base}
    H, W = geometry.highres_shape
    newlines = np.zeros((0,), np.int32)
    if H:
        row0 = start + u * u + np.arange(H, dtype=np.int32)[:, None] * (W + 1)
        views["highres"] = row0 + np.arange(W, dtype=np.int32)[None, :]
        newlines = (row0[:, 0] + W).astype(np.int32)
    return ImageLayout(geometry, int(start), views, newlines)


# --------------------------------------------------------------------------------------------------------
# image tokens


def init_mllm_params(key: jax.Array, config: MLLMConfig, dtype: str | None = None, scale: float = 0.02) -> Params:
    """Random parameters for the whole multimodal model."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    dt = dtype or config.lm.dtype
    return {"lm": llada.init_lm_params(k1, config.lm, dt, scale),
            "vision": siglip.init_vision_params(k2, config.vision, dt, scale),
            "projector": projector.init_projector_params(k3, config.vision.width, config.lm.d_model, dt, scale),
            "image_newline": (scale * jax.random.normal(k4, (config.lm.d_model,), jnp.float32)).astype(dt)}


def encode_views(params: Params, config: MLLMConfig, pixel_values: jax.Array) -> jax.Array:
    """Views -> LM-space token grids. pixel_values: [n, S, S, 3] -> [n, u, u, D] (pooled when config says so)."""
    feats = siglip.vision_features(params, config, pixel_values)  # [n, g*g, W]
    x = projector.project(params, feats, dtype=config.lm.dtype)
    n, g = x.shape[0], config.vision.grid
    x = x.reshape(n, g, g, -1)
    u = config.tokens_per_view_side
    if u != g:
        # bilinear, half-pixel centres, no antialias: equals torch interpolate(mode="bilinear", align_corners=False)
        x = jax.image.resize(x.astype(jnp.float32), (n, u, u, x.shape[-1]), "bilinear", antialias=False)
    return x.astype(jnp.dtype(config.lm.dtype))


def assemble_image_tokens(view_grids: jax.Array, newline: jax.Array, geometry: ImageGeometry) -> jax.Array:
    """Lay out one image's views as a token block.

    view_grids: [n, u, u, D] from :func:`encode_views`; newline: [D]; geometry: static.
    Returns [geometry.num_image_tokens, D].
    """
    n, u, _, D = view_grids.shape
    if n != geometry.num_views or u != geometry.view_side:
        raise ValueError(f"got {n} views of {u}x{u} tokens, geometry expects {geometry.num_views} views of "
                         f"{geometry.view_side}x{geometry.view_side}")
    base = view_grids[0].reshape(u * u, D)
    H, W = geometry.highres_shape
    if not H:
        return base
    gw, gh = geometry.grid
    crops = view_grids[1:].reshape(gh, gw, u, u, D).transpose(0, 2, 1, 3, 4).reshape(gh * u, gw * u, D)
    r0, r1, c0, c1 = geometry.unpad
    grid = crops[r0:r1, c0:c1]
    if geometry.capped:
        grid = jax.image.resize(grid.astype(jnp.float32), (H, W, D), "bilinear", antialias=False).astype(grid.dtype)
    rows = jnp.concatenate([grid, jnp.broadcast_to(newline.astype(grid.dtype), (H, 1, D))], axis=1)
    return jnp.concatenate([base, rows.reshape(H * (W + 1), D)], axis=0)


def image_tokens(params: Params, config: MLLMConfig, pixel_values: jax.Array, geometry: ImageGeometry) -> jax.Array:
    """pixel_values [n, S, S, 3] -> image token block [N_img, D] (tower, projector, pooling, layout)."""
    return assemble_image_tokens(encode_views(params, config, pixel_values), params["image_newline"], geometry)


# --------------------------------------------------------------------------------------------------------
# splicing


def image_token_index(input_ids: np.ndarray) -> int:
    """Index of the single image placeholder (-200) in host-side ``input_ids`` [T]."""
    ids = np.asarray(input_ids)
    if ids.ndim != 1:
        raise ValueError(f"input_ids must be one sequence [T], got shape {ids.shape}")
    where = np.flatnonzero(ids == IMAGE_TOKEN_INDEX)
    if len(where) != 1:
        raise ValueError(f"expected exactly one image placeholder ({IMAGE_TOKEN_INDEX}) in the prompt ids, found "
                         f"{len(where)}. Build prompts with dcam_jax.processing.text.build_prompt_ids.")
    return int(where[0])


def splice_embeddings(params: Params, config: MLLMConfig, input_ids: np.ndarray, image_block: jax.Array):
    """Replace the placeholder in ``input_ids`` [T] (host) by ``image_block`` [N_img, D].

    Returns (embeddings [T - 1 + N_img, D], start index of the image block).
    """
    i = image_token_index(input_ids)
    ids = np.asarray(input_ids, np.int32)
    text = llada.embed_tokens(params["lm"], config.lm, jnp.asarray(np.where(ids == IMAGE_TOKEN_INDEX, 0, ids)))
    return jnp.concatenate([text[:i], image_block.astype(text.dtype), text[i + 1:]], axis=0), i


def multimodal_embeddings(params: Params, config: MLLMConfig, input_ids: np.ndarray, pixel_values,
                          geometry: ImageGeometry):
    """Prompt embeddings with the image spliced in.

    input_ids: host int array [T] with one -200 placeholder; pixel_values: [n, S, S, 3].
    Returns (embeddings [T - 1 + N_img, D], :class:`ImageLayout`).
    """
    i = image_token_index(input_ids)
    block = _image_tokens_jit(params, config, jnp.asarray(pixel_values), geometry)
    emb, _ = splice_embeddings(params, config, input_ids, block)
    return emb, image_layout(geometry, i)


_image_tokens_jit = jax.jit(image_tokens, static_argnums=(1, 3))


def mllm_logits(params: Params, config: MLLMConfig, input_ids: np.ndarray, pixel_values, geometry: ImageGeometry,
                *, answer_ids=None, attention: str = "full") -> tuple[jax.Array, ImageLayout]:
    """Full multimodal forward: logits [T_total, V] of [prompt with image | answer_ids].

    attention: "full" or "prefix_lm" (the prompt, image included, is the prefix).
    """
    emb, layout = multimodal_embeddings(params, config, input_ids, pixel_values, geometry)
    P = emb.shape[0]
    if answer_ids is not None:
        ans = llada.embed_tokens(params["lm"], config.lm, jnp.asarray(answer_ids, jnp.int32)[None])[0]
        emb = jnp.concatenate([emb, ans], axis=0)
    logits = llada.lm_logits(params, config, inputs_embeds=emb[None], attention=attention,
                             prefix_len=P if attention == "prefix_lm" else None)
    return logits[0], layout
