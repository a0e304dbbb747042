"""What a dcam_jax checkpoint holds: its directory layout, its parameter layout, and its one error type.

A checkpoint is a directory::

    <path>/
      dcam_checkpoint.json   marker: format name and version, parameter dtype and count, free-form info, and the
                             size and SHA-256 of every other file (:mod:`dcam_jax.checkpoint.manifest`)
      config.json            dcam_jax.models.config.to_json(config) (an LMConfig or MLLMConfig)
      params/                orbax checkpoint of the parameter pytree (numpy or jax leaves, stored as given)
      tokenizer/             optional: tokenizer.json, tokenizer_config.json, ... copied from a Hugging Face dir

The parameter tree must match :func:`param_shapes` of the config exactly (``{"lm": ...}`` for an LM-only
config; ``{"lm", "vision", "projector", "image_newline"}`` for a multimodal one, plus ``vision/post_ln`` when
``config.has_post_layernorm``), so a checkpoint that loads is one the model functions can run.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from dcam_jax.models.config import LMConfig, MLLMConfig

MARKER_FILE = "dcam_checkpoint.json"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"

Path_ = tuple[str, ...]
Params = dict[str, Any]


class CheckpointError(ValueError):
    """A directory is not a dcam_jax checkpoint, is corrupt, or does not match its config."""


def param_shapes(config: LMConfig | MLLMConfig) -> dict[Path_, tuple[int, ...]]:
    """The exact parameter layout a config implies: {param path: shape}.

    Paths are tuples such as ``("lm", "layers", "q")``; shapes follow the module docstrings of
    ``dcam_jax.models.llada`` / ``siglip`` / ``projector`` (stacked per-layer params, kernels as [in, out]).
    For an MLLMConfig with ``has_post_layernorm`` the unused ``vision/post_ln/{scale,bias}`` are included.
    """
    if isinstance(config, LMConfig):
        return _lm_shapes(config)
    if not isinstance(config, MLLMConfig):
        raise TypeError(f"config must be an LMConfig or MLLMConfig, got {type(config).__name__}")
    out = _lm_shapes(config.lm)
    v, D = config.vision, config.lm.d_model
    W, M, L, p = v.width, v.mlp_dim, v.depth, v.patch_size
    out[("vision", "patch_embed", "kernel")] = (p, p, 3, W)
    out[("vision", "patch_embed", "bias")] = (W,)
    out[("vision", "pos_embed")] = (v.num_patches, W)
    for ln in ("ln1", "ln2"):
        out[("vision", "layers", ln, "scale")] = (L, W)
        out[("vision", "layers", ln, "bias")] = (L, W)
    for name, (i, o) in {"q": (W, W), "k": (W, W), "v": (W, W), "o": (W, W), "fc1": (W, M), "fc2": (M, W)}.items():
        out[("vision", "layers", name, "kernel")] = (L, i, o)
        out[("vision", "layers", name, "bias")] = (L, o)
    if config.has_post_layernorm:
        out[("vision", "post_ln", "scale")] = (W,)
        out[("vision", "post_ln", "bias")] = (W,)
    out[("projector", "fc1", "kernel")] = (W, D)
    out[("projector", "fc1", "bias")] = (D,)
    out[("projector", "fc2", "kernel")] = (D, D)
    out[("projector", "fc2", "bias")] = (D,)
    out[("image_newline",)] = (D,)
    return out


def _lm_shapes(c: LMConfig) -> dict[Path_, tuple[int, ...]]:
    D, F, N, V = c.d_model, c.mlp_hidden, c.n_layers, c.vocab_size
    qd, kvd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    layers = {"attn_norm": (N, D), "q": (N, D, qd), "k": (N, D, kvd), "v": (N, D, kvd), "o": (N, qd, D),
              "mlp_norm": (N, D), "gate": (N, D, F), "up": (N, D, F), "down": (N, F, D)}
    out: dict[Path_, tuple[int, ...]] = {("lm", "embed"): (V, D)}
    out.update({("lm", "layers", k): s for k, s in layers.items()})
    out[("lm", "final_norm")] = (D,)
    out[("lm", "lm_head")] = (D, V)
    return out


def flatten(tree: Mapping[str, Any], prefix: Path_ = ()) -> dict[Path_, Any]:
    """Nested dict -> {path tuple: leaf}. Non-dict values are leaves; keys must be strings."""
    out: dict[Path_, Any] = {}
    for k, v in tree.items():
        if not isinstance(k, str):
            raise CheckpointError(f"parameter tree keys must be strings; got {k!r} under {'/'.join(prefix) or '/'}")
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: Mapping[Path_, Any]) -> Params:
    """{path tuple: leaf} -> nested dict; the inverse of :func:`flatten`."""
    out: Params = {}
    for path, leaf in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return out


def fmt_path(path: Path_) -> str:
    """("lm", "layers", "q") -> "lm/layers/q", as parameter paths appear in messages."""
    return "/".join(path)


def check_params(flat_shapes: Mapping[Path_, tuple[int, ...]], config, where: str) -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected and mis-shaped params vs :func:`param_shapes`.

    flat_shapes: {param path: shape} of the tree at hand. config: an LMConfig or MLLMConfig. where: what the
    message names first (a directory, or the calling function).
    """
    expected = param_shapes(config)
    missing = sorted(fmt_path(p) for p in expected.keys() - flat_shapes.keys())
    extra = sorted(fmt_path(p) for p in flat_shapes.keys() - expected.keys())
    wrong = sorted(f"{fmt_path(p)}: {tuple(flat_shapes[p])} (config implies {expected[p]})"
                   for p in expected.keys() & flat_shapes.keys() if tuple(flat_shapes[p]) != expected[p])
    if missing or extra or wrong:
        parts = [f"{where}: parameters do not match the config"]
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        if wrong:
            parts.append(f"wrong shape {wrong}")
        raise CheckpointError("; ".join(parts))


def is_float_dtype(dtype) -> bool:
    """Whether ``dtype`` (anything np.dtype accepts) is a floating dtype, ml_dtypes' bfloat16 included."""
    # jnp.issubdtype knows the ml_dtypes floats (bfloat16), np.issubdtype does not
    return bool(jax.numpy.issubdtype(np.dtype(dtype), jax.numpy.floating))
