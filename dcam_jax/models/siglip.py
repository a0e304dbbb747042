"""SigLIP vision tower (as used by LaViDa / LLaDA-V) as pure functions.

Patchify (a Dense on flattened 14x14x3 patches, equal to the stride-14 convolution) -> + learned position
embedding (no CLS token) -> ``depth`` pre-LN encoder layers (LN1 -> MHA with biases -> residual; LN2 -> fc1 ->
tanh-GELU -> fc2 -> residual). No post-layernorm, no pooling head: the output is the residual stream after the
last layer run, which equals ``hidden_states[-2]`` of the full 27-layer HF model.

Parameter pytree (``params["vision"]``; L = depth, W = width, M = mlp_dim, p = patch_size, P = num_patches):

==========================  ==================
``patch_embed/kernel``      [p, p, 3, W] (HWIO)
``patch_embed/bias``        [W]
``pos_embed``               [P, W]
``layers/ln1/{scale,bias}`` [L, W]
``layers/{q,k,v,o}/kernel`` [L, W, W]
``layers/{q,k,v,o}/bias``   [L, W]
``layers/ln2/{scale,bias}`` [L, W]
``layers/fc1/kernel``       [L, W, M]
``layers/fc1/bias``         [L, M]
``layers/fc2/kernel``       [L, M, W]
``layers/fc2/bias``         [L, W]
==========================  ==================
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dcam_jax.models.config import MLLMConfig, VisionConfig
from dcam_jax.models.layers import linear

Params = dict[str, Any]


def init_vision_params(key: jax.Array, cfg: VisionConfig, dtype: str | None = None, scale: float = 0.02) -> Params:
    """Random tower parameters in ``dtype`` (default cfg.dtype)."""
    dt = jnp.dtype(dtype or cfg.dtype)
    W, M, L, p = cfg.width, cfg.mlp_dim, cfg.depth, cfg.patch_size
    ks = iter(jax.random.split(key, 16))

    def normal(shape):
        return (scale * jax.random.normal(next(ks), shape, jnp.float32)).astype(dt)

    def dense(i, o):
        return {"kernel": normal((L, i, o)), "bias": normal((L, o))}

    def ln():
        return {"scale": jnp.ones((L, W), dt), "bias": jnp.zeros((L, W), dt)}

    return {
        "patch_embed": {"kernel": normal((p, p, 3, W)), "bias": normal((W,))},
        "pos_embed": normal((cfg.num_patches, W)),
        "layers": {"ln1": ln(), "q": dense(W, W), "k": dense(W, W), "v": dense(W, W), "o": dense(W, W),
                   "ln2": ln(), "fc1": dense(W, M), "fc2": dense(M, W)},
    }


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32. x: [..., W]."""
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, -1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), -1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def patchify(pixels: jax.Array, patch: int) -> jax.Array:
    """pixels: [N, S, S, 3] -> [N, (S//p)^2, p*p*3] in row-major patch order, (kh, kw, c) inside a patch."""
    N, S, _, C = pixels.shape
    g = S // patch
    # a 'valid' stride-p convolution never sees the last S - g*p rows and columns
    x = pixels[:, :g * patch, :g * patch].reshape(N, g, patch, g, patch, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(N, g * g, patch * patch * C)


def _dense(x, p):
    return linear(x, p["kernel"]) + p["bias"].astype(x.dtype)


def _encoder_layer(lp: Params, x: jax.Array, cfg: VisionConfig) -> jax.Array:
    N, P, W = x.shape
    H = cfg.num_heads
    dh = W // H
    a = layer_norm(x, lp["ln1"]["scale"], lp["ln1"]["bias"], cfg.ln_eps)
    q, k, v = (_dense(a, lp[n]).reshape(N, P, H, dh) for n in ("q", "k", "v"))
    s = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(dh)
    pr = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("nhqk,nkhd->nqhd", pr, v, preferred_element_type=jnp.float32).astype(x.dtype)
    x = x + _dense(o.reshape(N, P, W), lp["o"])
    m = layer_norm(x, lp["ln2"]["scale"], lp["ln2"]["bias"], cfg.ln_eps)
    return x + _dense(jax.nn.gelu(_dense(m, lp["fc1"]), approximate=True), lp["fc2"])


def _vision_parts(params: Params, config) -> tuple[Params, VisionConfig]:
    cfg = config.vision if isinstance(config, MLLMConfig) else config
    if not isinstance(cfg, VisionConfig):
        raise TypeError(f"config must be a VisionConfig or MLLMConfig, got {type(config).__name__}")
    vp = params["vision"] if "vision" in params else params
    return vp, cfg


def vision_features(params: Params, config, pixel_values: jax.Array) -> jax.Array:
    """Tower output before the projector.

    pixel_values: [N, S, S, 3] float32, NHWC, normalised ((x/255 - mean) / std), S = config image_size.
    Returns [N, P, W] in the compute dtype, P = (S / patch)^2 patches in row-major order.
    """
    vp, cfg = _vision_parts(params, config)
    if pixel_values.ndim != 4 or pixel_values.shape[1:] != (cfg.image_size, cfg.image_size, 3):
        raise ValueError(f"pixel_values must be [N, {cfg.image_size}, {cfg.image_size}, 3] (NHWC, normalised); "
                         f"got {tuple(pixel_values.shape)}. Use dcam_jax.processing.image to preprocess images.")
    dt = jnp.dtype(cfg.dtype)
    patches = patchify(pixel_values.astype(dt), cfg.patch_size)
    kernel = vp["patch_embed"]["kernel"].reshape(-1, cfg.width)
    x = patches @ kernel.astype(dt) + vp["patch_embed"]["bias"].astype(dt)
    x = x + vp["pos_embed"].astype(dt)[None]

    def body(h, lp):
        return _encoder_layer(lp, h, cfg), None

    x, _ = jax.lax.scan(body, x, vp["layers"])
    return x
