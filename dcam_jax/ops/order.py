"""Order statistics and percentiles without a sort (exact, by bisection on the bits of the values)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _int_type(dtype):
    if dtype == jnp.float32:
        return jnp.int32, 32
    if dtype == jnp.float64:
        return jnp.int64, 64
    raise ValueError(f"expected float32 or float64 values, got {dtype}.")


def _sortable_bits(x):
    """float -> int with the same order (flip the magnitude bits of negative floats)."""
    it, bits = _int_type(x.dtype)
    i = lax.bitcast_convert_type(x, it)
    mag = jnp.array((1 << (bits - 1)) - 1, it)
    return jnp.where(i < 0, i ^ mag, i)


def _bits_to_float(i, dtype):
    it, bits = _int_type(dtype)
    mag = jnp.array((1 << (bits - 1)) - 1, it)
    return lax.bitcast_convert_type(jnp.where(i < 0, i ^ mag, i), dtype)


def order_statistics(values, ranks):
    """Exact order statistics along the last axis: ``sort(values)[..., ranks]`` without a sort.

    values: [..., N] float32/float64, finite. ranks: [..., R] int in [0, N) (leading dims
    broadcast against values'). Returns [..., R] in values' dtype.

    Bisection on the integer image of the float bit pattern: each round counts the values at or
    below a pivot, so the cost is 32 (64 for float64) vectorised passes of ``R * N`` compares.
    """
    values = jnp.asarray(values)
    ranks = jnp.asarray(ranks)
    lead = jnp.broadcast_shapes(values.shape[:-1], ranks.shape[:-1])
    values = jnp.broadcast_to(values, lead + values.shape[-1:])
    ranks = jnp.broadcast_to(ranks, lead + ranks.shape[-1:])
    key = _sortable_bits(values)                                   # [..., N]
    it, bits = _int_type(values.dtype)
    target = ranks.astype(it) + 1                                  # [..., R]
    lo = jnp.broadcast_to(jnp.min(key, axis=-1, keepdims=True), target.shape)
    hi = jnp.broadcast_to(jnp.max(key, axis=-1, keepdims=True), target.shape)

    def body(_, carry):
        lo, hi = carry
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)                # floor((lo+hi)/2), no overflow
        count = jnp.sum(key[..., None, :] <= mid[..., :, None], axis=-1, dtype=it)
        enough = count >= target
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    lo, _ = lax.fori_loop(0, bits, body, (lo, hi))
    return _bits_to_float(lo, values.dtype)


def _percentiles(values, specs):
    """Linear-interpolation percentiles (NumPy's default) of several subsets in one bisection.

    values: [..., N]. specs: list of (q [...] percent, min_value float | None, empty_value);
    the subset is ``values >= min_value`` (all values when None). Returns a list of [...] arrays;
    a row whose subset is empty gets ``empty_value``.
    """
    n_total = values.shape[-1]
    dt = values.dtype
    ranks, meta = [], []
    for q, min_value, empty in specs:
        if min_value is None:
            n_ex = jnp.zeros(values.shape[:-1], jnp.int32)
        else:
            n_ex = jnp.sum(values < min_value, axis=-1, dtype=jnp.int32)
        n = n_total - n_ex
        q = jnp.broadcast_to(jnp.asarray(q, dt), values.shape[:-1])
        # q * (n - 1) is exact for integral q, so floor() agrees with NumPy's float64 index.
        pos = jnp.maximum(q * (n - 1).astype(dt) / 100.0, 0.0)
        lo = jnp.floor(pos)
        gamma = pos - lo
        lo = lo.astype(jnp.int32)
        hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
        ranks += [jnp.clip(n_ex + lo, 0, n_total - 1), jnp.clip(n_ex + hi, 0, n_total - 1)]
        meta.append((gamma, n, empty))
    stats = order_statistics(values, jnp.stack(ranks, axis=-1))
    out = []
    for i, (gamma, n, empty) in enumerate(meta):
        a, b = stats[..., 2 * i], stats[..., 2 * i + 1]
        diff = b - a
        # NumPy's _lerp: interpolate from the nearer end for accuracy.
        val = jnp.where(gamma >= 0.5, b - diff * (1.0 - gamma), a + diff * gamma)
        out.append(jnp.where(n > 0, val, jnp.asarray(empty, dt)))
    return out


def percentile(values, q, *, min_value: float | None = None, empty_value: float = 0.0):
    """NumPy-style percentile (linear interpolation) over the last axis, optionally of a subset.

    values: [..., N] float. q: percent in [0, 100], scalar or [...] (may be traced).
    min_value: only values ``>= min_value`` take part (all when None). A row with no such value
    returns ``empty_value``. Returns [...].
    """
    values = jnp.asarray(values)
    if values.ndim < 1 or values.shape[-1] == 0:
        raise ValueError(f"percentile: values must be [..., N] with N >= 1, got {values.shape}.")
    if not isinstance(q, jax.core.Tracer):
        qa = np.asarray(q)
        if qa.size and not ((qa >= 0) & (qa <= 100)).all():
            raise ValueError(f"percentile: q={q!r} must lie in [0, 100] (percent, not fraction).")
    if not jnp.issubdtype(values.dtype, jnp.floating):
        values = values.astype(jnp.float32)
    return _percentiles(values, [(q, min_value, empty_value)])[0]
