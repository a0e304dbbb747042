"""The ``mlp2x_gelu`` projector: Linear(W -> D), exact (erf) GELU, Linear(D -> D).

Parameter pytree (``params["projector"]``): ``fc1/kernel`` [W, D], ``fc1/bias`` [D], ``fc2/kernel`` [D, D],
``fc2/bias`` [D].
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dcam_jax.models.layers import linear

Params = dict[str, Any]


def init_projector_params(key: jax.Array, in_dim: int, out_dim: int, dtype="float32", scale: float = 0.02) -> Params:
    """Random projector parameters."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    dt = jnp.dtype(dtype)

    def n(k, s):
        return (scale * jax.random.normal(k, s, jnp.float32)).astype(dt)

    return {"fc1": {"kernel": n(k1, (in_dim, out_dim)), "bias": n(k2, (out_dim,))},
            "fc2": {"kernel": n(k3, (out_dim, out_dim)), "bias": n(k4, (out_dim,))}}


def project(params: Params, x: jax.Array, dtype=None) -> jax.Array:
    """x: [..., W] tower features -> [..., D] LM-space features (exact erf GELU, as torch.nn.GELU())."""
    pp = params["projector"] if "projector" in params else params
    dt = jnp.dtype(dtype) if dtype is not None else x.dtype
    x = x.astype(dt)
    h = linear(x, pp["fc1"]["kernel"]) + pp["fc1"]["bias"].astype(dt)
    h = jax.nn.gelu(h, approximate=False)
    return linear(h, pp["fc2"]["kernel"]) + pp["fc2"]["bias"].astype(dt)
