"""Input checks shared by the refinement modules (host side)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _check_kernel_size(k, what="kernel_size") -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise ValueError(f"{what}={k!r}: expected a static Python int (odd, >= 1); a kernel size "
                         "cannot be a traced value, use akd_multi for per-map sizes.")
    if k < 1 or k % 2 == 0:
        raise ValueError(f"{what}={k}: expected an odd int >= 1 (the window is centred).")
    return int(k)


def _as_maps(maps, name: str) -> jax.Array:
    x = jnp.asarray(maps)
    if x.ndim < 2:
        raise ValueError(f"{name}: expected maps [..., H, W] with at least 2 dims, got shape "
                         f"{tuple(x.shape)}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
            x = x.astype(jnp.float32)
        else:
            raise ValueError(f"{name}: expected real float maps, got dtype {x.dtype}.")
    elif x.dtype in (jnp.bfloat16, jnp.float16):
        x = x.astype(jnp.float32)
    return x


def check_finite(maps, name: str = "raw_maps") -> None:
    """Raise ValueError naming the first map that holds NaN or inf.

    maps: [..., H, W] (NumPy or concrete JAX array; not usable inside jit).
    """
    if isinstance(maps, jax.core.Tracer):
        raise ValueError(f"check_finite({name}): got a traced array; finiteness is checked on the "
                         "host before jit. Call it outside jit (refine() does).")
    x = _as_maps(maps, name)
    ok = np.asarray(jnp.all(jnp.isfinite(x), axis=(-2, -1)))
    if not ok.all():
        bad = np.argwhere(~ok)
        first = tuple(int(i) for i in bad[0])
        idx = first[0] if len(first) == 1 else first
        raise ValueError(
            f"{name}: map {idx} (of batch shape {tuple(x.shape[:-2])}) contains NaN or inf; "
            f"{len(bad)} map(s) in total are not finite. Maps must be finite: check the step "
            "that produced them (raw Grad-CAM maps are finite for a finite model).")
