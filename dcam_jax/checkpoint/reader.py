"""Reading dcam_jax checkpoints: the stored config, the parameter metadata, and the parameters themselves.

:func:`load_checkpoint` checks, in order, the marker, the config, the parameter layout against the config, and the
files against their manifest (:mod:`dcam_jax.checkpoint.manifest`), then has orbax read each array straight into
the buffers of the sharding asked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import jax
import numpy as np

from dcam_jax.checkpoint._orbax import orbax_context, orbax_v1
from dcam_jax.checkpoint.layout import (CONFIG_FILE, MARKER_FILE, PARAMS_DIR, TOKENIZER_DIR, CheckpointError, Params,
                                        Path_, check_params, flatten, fmt_path, is_float_dtype, unflatten)
from dcam_jax.checkpoint.manifest import read_marker, verify_files
from dcam_jax.models import config as config_lib
from dcam_jax.models.config import LMConfig, MLLMConfig


class LoadedCheckpoint(NamedTuple):
    """What :func:`load_checkpoint` returns (unpacks as ``config, params, tokenizer_dir``)."""
    config: LMConfig | MLLMConfig
    params: Params
    tokenizer_dir: Path | None


def read_config(path: str | os.PathLike) -> LMConfig | MLLMConfig:
    """The config stored in a checkpoint directory (marker checked first)."""
    path = Path(path)
    read_marker(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has a {MARKER_FILE} but no {CONFIG_FILE}; the checkpoint is incomplete")
    try:
        config = config_lib.from_json(cfg_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{cfg_file} is corrupt: not UTF-8 text ({e})") from None
    except config_lib.ConfigError as e:
        raise CheckpointError(f"{cfg_file} is corrupt: {e}") from None
    if not isinstance(config, (LMConfig, MLLMConfig)):
        raise CheckpointError(f"{cfg_file} holds a {type(config).__name__}; a checkpoint needs an LMConfig or "
                              "MLLMConfig")
    return config


def stored_param_shapes(path: str | os.PathLike) -> dict[Path_, tuple[tuple[int, ...], np.dtype]]:
    """{param path: (shape, stored dtype)} from the orbax metadata, without reading any tensor data."""
    pdir = Path(path).absolute() / PARAMS_DIR
    if not pdir.is_dir():
        raise CheckpointError(f"{path} has no {PARAMS_DIR}/ directory; the checkpoint is incomplete")
    try:
        meta = orbax_v1().metadata(pdir).metadata
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{pdir} is not a readable orbax checkpoint: {e}") from None
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"{pdir}: orbax metadata is not a parameter tree (got {type(meta).__name__})")
    return {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in flatten(meta).items()}


ShardingSpec = (jax.sharding.Sharding | Mapping[str, Any]
                | Callable[[Path_, jax.ShapeDtypeStruct], jax.sharding.Sharding] | None)


def load_checkpoint(path: str | os.PathLike, *, dtype: Any = None, sharding: ShardingSpec = None,
                    verify: str = "full") -> LoadedCheckpoint:
    """Load a checkpoint written by :func:`save_checkpoint` or ``python -m checkpoints_convert``.

    dtype: cast every parameter to this dtype while reading (e.g. "float32"); None keeps the stored dtype.
    sharding: where to place the arrays: None (the default device), one ``jax.sharding.Sharding`` for every leaf,
      a pytree of shardings shaped like the params, or a callable ``(path: tuple[str, ...], leaf:
      jax.ShapeDtypeStruct) -> Sharding`` such as :func:`dcam_jax.sharding.lm_sharding_rules`. Orbax reads each
      shard straight into its device buffers (no full host copy of a sharded array).
    verify: check the files against the manifest written with them first (:func:`verify_files`: "full" hashes
      every file, "size" checks presence and sizes, "none" skips it).
    Returns (config, params, tokenizer_dir or None); params leaves are ``jax.Array``.
    Raises :class:`CheckpointError` if ``path`` is not a dcam_jax checkpoint, is incomplete or corrupt, or its
    params do not match its config.
    """
    path = Path(path).absolute()
    config = read_config(path)
    stored = stored_param_shapes(path)
    check_params({p: s for p, (s, _) in stored.items()}, config, str(path))
    verify_files(path, verify)  # after the structural checks, whose messages say more
    target_dtype = None
    if dtype is not None:
        target_dtype = np.dtype(dtype)
        if not is_float_dtype(target_dtype):
            raise ValueError(f"dtype={dtype!r}: parameters can only be loaded as a floating dtype")
    shardings = _resolve_shardings(sharding, stored, target_dtype)
    target = unflatten({p: jax.ShapeDtypeStruct(s, target_dtype or d, sharding=shardings[p])
                        for p, (s, d) in stored.items()})
    try:
        with orbax_context():
            params = orbax_v1().load(path / PARAMS_DIR, target)
    except Exception as e:  # orbax raises bare Exceptions for truncated or altered data files
        raise CheckpointError(f"{path / PARAMS_DIR}: failed to read the parameters: {type(e).__name__}: {e}") from e
    tok = path / TOKENIZER_DIR
    return LoadedCheckpoint(config, params, tok if tok.is_dir() else None)


def _resolve_shardings(sharding: ShardingSpec, stored, target_dtype) -> dict[Path_, jax.sharding.Sharding]:
    if sharding is None:
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return {p: default for p in stored}
    if isinstance(sharding, jax.sharding.Sharding):
        return {p: sharding for p in stored}
    if isinstance(sharding, Mapping):
        flat = flatten(sharding)
        if flat.keys() != stored.keys():
            raise ValueError(f"sharding pytree does not match the parameters: missing "
                             f"{sorted(fmt_path(p) for p in stored.keys() - flat.keys())}, unexpected "
                             f"{sorted(fmt_path(p) for p in flat.keys() - stored.keys())}")
        bad = [fmt_path(p) for p, s in flat.items() if not isinstance(s, jax.sharding.Sharding)]
        if bad:
            raise ValueError(f"sharding pytree leaves must be jax.sharding.Sharding; not so at {bad}")
        return flat
    if callable(sharding):
        out = {}
        for p, (s, d) in stored.items():
            sh = sharding(p, jax.ShapeDtypeStruct(s, target_dtype or d))
            if not isinstance(sh, jax.sharding.Sharding):
                raise ValueError(f"sharding callable returned {type(sh).__name__} for {fmt_path(p)}; expected a "
                                 "jax.sharding.Sharding")
            out[p] = sh
        return out
    raise ValueError(f"sharding must be None, a jax.sharding.Sharding, a pytree of them or a callable; got "
                     f"{type(sharding).__name__}")
