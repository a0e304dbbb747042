"""Tower pretraining of the toy model on object-level targets (phases 1a and 1b of ``dcam_jax.toy.train``).

Each object's mask is area-averaged onto a view's token grid, the projected tokens are pooled with those weights,
and small linear heads classify the pooled vector's shape and colour, regress the object's centre and order the
objects; per-token heads read the same targets off every token. This puts the shape of every object at that
object's tokens, where the LM's attention later reads it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dcam_jax.data import shapes
from dcam_jax.models import mllm
from dcam_jax.models.config import MLLMConfig
from dcam_jax.processing import image as pimg
from dcam_jax.toy.model import MAX_OBJECTS, RELATIONS, Params, _rms, image_blocks, token_rms_penalty


def init_object_heads(key: jax.Array, d_model: int, scale: float = 0.02) -> Params:
    """Linear heads for tower pretraining, each {"kernel": [D, n], "bias": [n]}.

    Object heads on pooled object features: shape (6), colour (8), centre (2), order (the object's place in the
    caption, MAX_OBJECTS), relation (to the next object of its caption pair, RELATIONS). Token heads on every image
    token: token_shape (6 + background), token_colour (8 + background).
    """
    sizes = {"shape": len(shapes.SHAPES), "colour": len(shapes.COLOUR_NAMES), "centre": 2,
             "token_shape": len(shapes.SHAPES) + 1, "token_colour": len(shapes.COLOUR_NAMES) + 1,
             "order": MAX_OBJECTS, "relation": len(RELATIONS)}
    ks = jax.random.split(key, len(sizes))
    return {name: {"kernel": scale * jax.random.normal(k, (d_model, n), jnp.float32),
                   "bias": jnp.zeros((n,), jnp.float32)} for k, (name, n) in zip(ks, sizes.items())}


def pool_objects(grid: jax.Array, weights: jax.Array) -> jax.Array:
    """Mask-weighted mean of token features. grid: [B, H, W, D]; weights: [B, M, H, W] -> [B, M, D]."""
    num = jnp.einsum("bhwd,bmhw->bmd", grid, weights)
    return num / jnp.maximum(jnp.sum(weights, axis=(-2, -1)), 1e-6)[..., None]


class GridOut(NamedTuple):
    """Tower-pretraining losses on one token grid. loss: scalar; shape_acc, colour_acc: accuracy of the pooled-object
    heads; centre_err: mean absolute centre error (image fractions); token_shape_acc: accuracy of the token shape head
    on object tokens; order_acc: accuracy of the caption-order head (0 when not trained)."""
    loss: jax.Array
    shape_acc: jax.Array
    colour_acc: jax.Array
    centre_err: jax.Array
    token_shape_acc: jax.Array
    order_acc: jax.Array


def grid_losses(grid: jax.Array, heads: Params, weights: jax.Array, obj_shape: jax.Array, obj_colour: jax.Array,
                obj_centre: jax.Array | None, *, obj_relation: jax.Array | None = None, token_weight: float = 1.0,
                min_cover: float = 0.3, background_weight: float = 0.2, rms_weight: float = 0.0) -> GridOut:
    """Object-level and token-level classification losses on one grid of image tokens.

    grid: [B, h, w, D] tokens; weights: [B, M, h, w] fraction of each token covered by object m; obj_shape,
    obj_colour: [B, M] int (-1 = no object); obj_centre: [B, M, 2] (y, x) in [0, 1] or None (no centre loss,
    e.g. for the high-res grid, whose crops do not know where they sit in the image).

    * object heads: each object's tokens are averaged with its coverage weights, RMS-normalised (no parameters: the
      projected tokens start tiny, and unnormalised heads let the regression drown the classification gradients),
      then linear heads give CE(shape) + CE(colour) [+ L1(centre)] [+ CE(order) + CE(relation) when
      ``obj_relation`` [B, M] is given: the object's index m in the caption and the relation to object m + 1],
      averaged over real objects;
    * token heads (weight ``token_weight``): every token whose largest object covers at least ``min_cover`` of it
      is labelled with that object's shape and colour, other tokens "background" (weighted ``background_weight``);
    * with ``rms_weight`` > 0, that times :func:`token_rms_penalty` of the grid (keeps every token near RMS 1).
    """
    B = grid.shape[0]
    grid = grid.astype(jnp.float32)
    valid = (obj_shape >= 0).astype(jnp.float32)
    n_valid = jnp.maximum(jnp.sum(valid), 1.0)
    pooled = _rms(pool_objects(grid, weights))
    loss, accs = 0.0, {}
    for name, target in (("shape", obj_shape), ("colour", obj_colour)):
        logits = pooled @ heads[name]["kernel"] + heads[name]["bias"]
        tgt = jnp.maximum(target, 0)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tgt[..., None], -1)[..., 0]
        loss = loss + jnp.sum(ce * valid) / n_valid
        accs[name] = jnp.sum((jnp.argmax(logits, -1) == tgt) * valid) / n_valid
    if obj_relation is not None:
        order = jnp.broadcast_to(jnp.arange(obj_shape.shape[1]), obj_shape.shape)
        for name, target in (("order", jnp.minimum(order, MAX_OBJECTS - 1)), ("relation", obj_relation)):
            logits = pooled @ heads[name]["kernel"] + heads[name]["bias"]
            ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), target[..., None], -1)[..., 0]
            loss = loss + jnp.sum(ce * valid) / n_valid
            accs[name] = jnp.sum((jnp.argmax(logits, -1) == target) * valid) / n_valid
    err = jnp.zeros(())
    if obj_centre is not None:
        e = jnp.sum(jnp.abs(pooled @ heads["centre"]["kernel"] + heads["centre"]["bias"] - obj_centre), -1)
        loss = loss + jnp.sum(e * valid) / n_valid
        err = jnp.sum(e * valid) / n_valid / 2
    cover = jnp.max(weights, axis=1)  # [B, h, w]
    owner = jnp.argmax(weights, axis=1)
    on_obj = cover >= min_cover
    tok_w = jnp.where(on_obj, 1.0, background_weight)
    feats = _rms(grid)
    tok_acc = jnp.zeros(())
    for name, target, n_cls in (("token_shape", obj_shape, len(shapes.SHAPES)),
                                ("token_colour", obj_colour, len(shapes.COLOUR_NAMES))):
        lab = jnp.take_along_axis(target, owner.reshape(B, -1), axis=1).reshape(owner.shape)
        lab = jnp.where(on_obj, lab, n_cls)
        logits = feats @ heads[name]["kernel"] + heads[name]["bias"]
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), lab[..., None], -1)[..., 0]
        loss = loss + token_weight * jnp.sum(ce * tok_w) / jnp.sum(tok_w)
        if name == "token_shape":
            tok_acc = jnp.sum((jnp.argmax(logits, -1) == lab) * on_obj) / jnp.maximum(jnp.sum(on_obj), 1.0)
    if rms_weight:
        loss = loss + rms_weight * token_rms_penalty(grid)
    return GridOut(loss, accs["shape"], accs["colour"], err, tok_acc, accs.get("order", jnp.zeros(())))


def view_grids(params: Params, config: MLLMConfig, pixels: jax.Array) -> jax.Array:
    """Projected (and pooled, if the config pools) token grids of single views. pixels: [N, S, S, 3] ->
    [N, u, u, D]; the same as ``mllm.encode_views``."""
    return mllm.encode_views(params, config, pixels)


def view_losses(params: Params, heads: Params, config: MLLMConfig, pixels: jax.Array, weights: jax.Array,
                obj_shape: jax.Array, obj_colour: jax.Array, obj_centre: jax.Array, **kw) -> GridOut:
    """Tower pretraining on single views: ShapesWorld images of the view size, fed as one view each.

    pixels: [N, S, S, 3] normalised; weights: [N, M, u, u]; the rest as :func:`grid_losses`.
    """
    return grid_losses(view_grids(params, config, pixels), heads, weights, obj_shape, obj_colour, obj_centre, **kw)


def object_losses(params: Params, heads: Params, config: MLLMConfig, geometry: pimg.ImageGeometry,
                  pixel_values: jax.Array, w_base: jax.Array, w_hi: jax.Array, obj_shape: jax.Array,
                  obj_colour: jax.Array, obj_centre: jax.Array, obj_relation: jax.Array | None = None,
                  **kw) -> GridOut:
    """Tower pretraining on whole images in the model's layout: :func:`grid_losses` on the base view (with the
    centre, and the caption order and relation when ``obj_relation`` is given: only the base view sees the whole
    image) and on the high-res grid (without), averaged; the accuracies are [2] (base, high-res). For a single-view
    layout (no high-res grid) it is the base-view loss alone, with scalar accuracies.

    pixel_values: [B, n, S, S, 3]; w_base: [B, M, u, u]; w_hi: [B, M, H, W]; obj_shape, obj_colour: [B, M];
    obj_centre: [B, M, 2].
    """
    return object_loss_on_blocks(image_blocks(params, config, pixel_values, geometry), heads, geometry, w_base, w_hi,
                                 obj_shape, obj_colour, obj_centre, obj_relation, **kw)


def object_loss_on_blocks(blocks: jax.Array, heads: Params, geometry: pimg.ImageGeometry, w_base: jax.Array,
                          w_hi: jax.Array, obj_shape: jax.Array, obj_colour: jax.Array, obj_centre: jax.Array,
                          obj_relation: jax.Array | None = None, **kw) -> GridOut:
    """:func:`object_losses` given the image token blocks [B, N_img, D] already computed."""
    B, _, D = blocks.shape
    u = geometry.view_side
    H, W = geometry.highres_shape
    base = blocks[:, :u * u].reshape(B, u, u, D)
    a = grid_losses(base, heads, w_base, obj_shape, obj_colour, obj_centre, obj_relation=obj_relation, **kw)
    if not H:  # single-view layout: the base view is the whole image token block
        return a
    hi = blocks[:, u * u:].reshape(B, H, W + 1, D)[:, :, :W]
    b = grid_losses(hi, heads, w_hi, obj_shape, obj_colour, None, **kw)
    return GridOut(*[(x + y) / 2 if k == 0 else jnp.stack([x, y]) for k, (x, y) in enumerate(zip(a, b))])
