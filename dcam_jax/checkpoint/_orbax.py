"""The orbax API the checkpoint writer and reader share: its v1 namespace and one save/load context."""

from __future__ import annotations


def orbax_v1():
    """The ``orbax.checkpoint.experimental.v1`` module; raises ImportError when it lacks the partial-save API."""
    # orbax's partial-save API lives in its experimental v1 namespace; imported lazily to keep `import dcam_jax` light
    import orbax.checkpoint.experimental.v1 as ocp1
    if not hasattr(ocp1, "partial"):
        raise ImportError("dcam_jax.checkpoint needs orbax-checkpoint with the v1 partial-save API (tested with "
                          "0.12.8); upgrade orbax-checkpoint")
    return ocp1


def orbax_context():
    """An ``ocp1.Context`` for our saves and loads: no defensive host copies, no compression."""
    ocp1 = orbax_v1()
    ctx = ocp1.Context()
    # we never mutate an array after handing it over, so orbax need not keep a defensive host copy of it
    ctx.memory.deepcopy_host_arrays = False
    # random-looking bf16 weights barely compress, and zstd would cost minutes on an 8B model
    ctx.array.saving.use_compression = False
    return ctx
