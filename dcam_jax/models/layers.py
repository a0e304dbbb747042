"""Small shared building blocks of the backbones."""

from __future__ import annotations

import jax


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., D_in] @ w [D_in, D_out] -> [..., D_out] in x's dtype, as one 2-D matmul over the flattened leading
    axes (the same numbers as ``x @ w``; XLA's CPU backend runs the weight gradient of a 3-D ``x @ w`` about 2x
    slower than the 2-D form, see ``benchmarks/train_step.py``)."""
    y = x.reshape(-1, x.shape[-1]) @ w.astype(x.dtype)
    return y.reshape(x.shape[:-1] + (w.shape[-1],))
