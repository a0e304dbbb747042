"""Tensor-parallel placement of the parameters over a ``model`` mesh axis.

The LM's big matrices are split over one mesh axis (Megatron style), everything else is replicated:

=================================  ===================  ==========================
param (under ``lm``)               shape                split over the model axis
=================================  ===================  ==========================
``embed``                          [V, D]               V (vocabulary rows)
``lm_head``                        [D, V]               V
``layers/{q,k,v,gate,up}``         [N, D, out]          out (heads / MLP columns)
``layers/{o,down}``                [N, in, D]           in
everything else (norms, vision,    any                  replicated
projector, image_newline)
=================================  ===================  ==========================

The model functions need no change: under ``jax.jit`` XLA inserts the collectives the layout implies. Use
:func:`param_shardings` for an in-memory pytree, :func:`shard_params` to move one, or pass
:func:`lm_sharding_rules` to :func:`dcam_jax.checkpoint.load_checkpoint` to read each shard straight onto its
device.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# {path under "lm": axis of the (stacked) array that is split}
LM_SPLIT_AXIS = {
    ("embed",): 0,
    ("lm_head",): 1,
    ("layers", "q"): 2, ("layers", "k"): 2, ("layers", "v"): 2, ("layers", "gate"): 2, ("layers", "up"): 2,
    ("layers", "o"): 1, ("layers", "down"): 1,
}
_LM_TOP = ("embed", "layers", "final_norm", "lm_head")


def partition_spec(path: tuple[str, ...], shape: tuple[int, ...], axis: str = "model",
                   axis_size: int | None = None) -> P:
    """PartitionSpec for the param at ``path`` (from the model root, e.g. ("lm", "layers", "q")) of ``shape``.

    With ``axis_size`` given, raise ValueError if the split dimension is not divisible by it.
    """
    split = LM_SPLIT_AXIS.get(tuple(path[1:])) if path and path[0] == "lm" else None
    if split is None:
        return P()
    if split >= len(shape):
        raise ValueError(f"param {'/'.join(path)} has shape {tuple(shape)}; expected at least {split + 1} dims")
    if axis_size is not None and shape[split] % axis_size:
        raise ValueError(f"cannot split param {'/'.join(path)} {tuple(shape)} along dim {split} ({shape[split]}) "
                         f"over mesh axis {axis!r} of size {axis_size}; use a mesh axis size that divides it")
    spec = [None] * len(shape)
    spec[split] = axis
    return P(*spec)


def lm_sharding_rules(mesh: Mesh, axis: str = "model") -> Callable[[tuple[str, ...], Any], NamedSharding]:
    """A callable ``(path, leaf) -> NamedSharding`` implementing the table above on ``mesh``.

    ``leaf`` is anything with a ``.shape`` (array or ``jax.ShapeDtypeStruct``); ``path`` is a tuple of keys from the
    model root. Suitable for ``load_checkpoint(..., sharding=lm_sharding_rules(mesh))``.
    """
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has axes {mesh.axis_names}; no axis named {axis!r} to shard the LM over")
    size = mesh.shape[axis]

    def rule(path: tuple[str, ...], leaf) -> NamedSharding:
        return NamedSharding(mesh, partition_spec(tuple(path), tuple(leaf.shape), axis, size))

    return rule


def _key_str(k) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    return str(getattr(k, "idx", k))


def param_shardings(params, mesh: Mesh, axis: str = "model"):
    """A pytree of NamedSharding shaped like ``params`` (model params with an "lm" entry, or the LM's own params).

    params: arrays or ``jax.ShapeDtypeStruct`` leaves.
    """
    rule = lm_sharding_rules(mesh, axis)
    lm_only = isinstance(params, dict) and "lm" not in params and set(_LM_TOP) <= set(params)
    root = ("lm",) if lm_only else ()
    return jax.tree_util.tree_map_with_path(lambda kp, x: rule(root + tuple(_key_str(k) for k in kp), x), params)


def shard_params(params, mesh: Mesh, axis: str = "model"):
    """``jax.device_put`` of ``params`` with :func:`param_shardings`."""
    return jax.device_put(params, param_shardings(params, mesh, axis))
