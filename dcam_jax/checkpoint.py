"""Save and restore dcam_jax checkpoints: (config, params) with orbax, plus the tokenizer files.

A checkpoint is a directory::

    <path>/
      dcam_checkpoint.json   marker: format name and version, parameter dtype and count, free-form info
      config.json            dcam_jax.models.config.to_json(config) (an LMConfig or MLLMConfig)
      params/                orbax checkpoint of the parameter pytree (numpy or jax leaves, stored as given)
      tokenizer/             optional: tokenizer.json, tokenizer_config.json, ... copied from a Hugging Face dir

The parameter tree must match :func:`param_shapes` of the config exactly (``{"lm": ...}`` for an LM-only
config; ``{"lm", "vision", "projector", "image_newline"}`` for a multimodal one, plus ``vision/post_ln`` when
``config.has_post_layernorm``), so a checkpoint that loads is one the model functions can run.

Writes are atomic: everything goes into a hidden temporary directory next to ``path`` that is renamed into place
only once complete; an existing ``path`` is replaced only with ``force=True``, only if it is itself a dcam_jax
checkpoint (or an empty directory), and only after the new one is complete.

:class:`CheckpointWriter` writes the parameters in pieces (orbax partial saves), so a converter holds one tensor
at a time instead of the whole model; :func:`save_checkpoint` is the one-call form for an in-memory pytree.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from dcam_jax.models import config as config_lib
from dcam_jax.models.config import LMConfig, MLLMConfig

log = logging.getLogger(__name__)

FORMAT_NAME = "dcam_jax.checkpoint"
FORMAT_VERSION = 2  # 2: the marker lists every file with its size and SHA-256
MARKER_FILE = "dcam_checkpoint.json"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
# Files of a Hugging Face tokenizer directory that a checkpoint carries along (whichever exist).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json")

Path_ = tuple[str, ...]
Params = dict[str, Any]


class CheckpointError(ValueError):
    """A directory is not a dcam_jax checkpoint, is corrupt, or does not match its config."""


# ----------------------------------------------------------------------------------------------------------
# expected parameter layout


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
    """Nested dict -> {path tuple: leaf}. Non-dict values are leaves."""
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
    """Inverse of :func:`flatten`."""
    out: Params = {}
    for path, leaf in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return out


def _fmt(path: Path_) -> str:
    return "/".join(path)


def check_params(flat_shapes: Mapping[Path_, tuple[int, ...]], config, where: str) -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected and mis-shaped params vs :func:`param_shapes`."""
    expected = param_shapes(config)
    missing = sorted(_fmt(p) for p in expected.keys() - flat_shapes.keys())
    extra = sorted(_fmt(p) for p in flat_shapes.keys() - expected.keys())
    wrong = sorted(f"{_fmt(p)}: {tuple(flat_shapes[p])} (config implies {expected[p]})"
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


# ----------------------------------------------------------------------------------------------------------
# writing


def _orbax_v1():
    # orbax's partial-save API lives in its experimental v1 namespace; imported lazily to keep `import dcam_jax` light
    import orbax.checkpoint.experimental.v1 as ocp1
    if not hasattr(ocp1, "partial"):
        raise ImportError("dcam_jax.checkpoint needs orbax-checkpoint with the v1 partial-save API (tested with "
                          "0.12.8); upgrade orbax-checkpoint")
    return ocp1


def _orbax_context():
    ocp1 = _orbax_v1()
    ctx = ocp1.Context()
    # we never mutate an array after handing it over, so orbax need not keep a defensive host copy of it
    ctx.memory.deepcopy_host_arrays = False
    # random-looking bf16 weights barely compress, and zstd would cost minutes on an 8B model
    ctx.array.saving.use_compression = False
    return ctx


def _is_float(dtype) -> bool:
    # jnp.issubdtype knows the ml_dtypes floats (bfloat16), np.issubdtype does not
    return bool(jax.numpy.issubdtype(np.dtype(dtype), jax.numpy.floating))


def check_destination(path: str | os.PathLike, force: bool) -> None:
    """Raise unless a checkpoint may be written at ``path``: it must not exist, or (with ``force``) be an empty
    directory or a dcam_jax checkpoint. Called before any work so a long conversion fails fast."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not force:
        raise FileExistsError(f"{path} already exists; pass force=True (--force) to replace it once the new "
                              "checkpoint is complete, or choose another output directory")
    if not path.is_dir() or path.is_symlink():
        raise CheckpointError(f"refusing to replace {path}: it is not a directory")
    if any(path.iterdir()) and not (path / MARKER_FILE).is_file():
        raise CheckpointError(f"refusing to replace {path}: it is not empty and not a dcam_jax checkpoint "
                              f"(no {MARKER_FILE}); remove it yourself if you really mean to")


class CheckpointWriter:
    """Write a checkpoint piece by piece; it appears at ``path`` only when :meth:`commit` succeeds.

    Use as a context manager; an exception inside the ``with`` block (or in :meth:`commit`) removes the temporary
    directory and leaves ``path`` untouched::

        with CheckpointWriter(path, config, tokenizer_files=files) as w:
            w.add({"lm": {"embed": embed_vd}})       # any sub-tree of the final parameter tree
            ...
        # committed here

    Each :meth:`add` is written to disk before it returns, so the caller may drop its arrays right after.
    Leaves may be numpy arrays (any dtype, including ml_dtypes.bfloat16) or jax arrays, and are stored as given.
    """

    def __init__(self, path: str | os.PathLike, config: LMConfig | MLLMConfig, *, force: bool = False,
                 tokenizer_files: Sequence[str | os.PathLike] = (), info: Mapping[str, Any] | None = None):
        self.path = Path(path).absolute()
        self.config = config
        self.force = force
        self.info = dict(info or {})
        self.tokenizer_files = [Path(f) for f in tokenizer_files]
        for f in self.tokenizer_files:
            if not f.is_file():
                raise CheckpointError(f"tokenizer file {f} does not exist")
        self.expected = param_shapes(config)  # raises TypeError on a bad config type
        check_destination(self.path, force)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.removed_stale = remove_stale_partials(self.path)
        for d in self.removed_stale:
            logging.warning("removed %s, a partial checkpoint left by a killed run", d)
        # mkdir (not mkdtemp) so the finished checkpoint gets the user's umask permissions, not 0700
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.tmp.mkdir()
        self._written: dict[Path_, tuple[tuple[int, ...], str]] = {}
        self._done = False

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        if not self._done:
            self.commit()

    @property
    def written(self) -> dict[Path_, tuple[tuple[int, ...], str]]:
        """{param path: (shape, dtype name)} of everything added so far."""
        return dict(self._written)

    def add(self, subtree: Mapping[str, Any]) -> None:
        """Write a sub-tree of the parameter tree (paths from the root). Each path may be written once."""
        if self._done:
            raise CheckpointError("this CheckpointWriter is already committed or aborted")
        flat = flatten(subtree)
        if not flat:
            return
        for p, leaf in flat.items():
            if p not in self.expected:
                raise CheckpointError(f"parameter {_fmt(p)} is not part of the layout the config implies; "
                                      f"expected paths: {sorted(_fmt(q) for q in self.expected)}")
            if p in self._written:
                raise CheckpointError(f"parameter {_fmt(p)} was already written")
            shape = tuple(np.shape(leaf))
            if shape != self.expected[p]:
                raise CheckpointError(f"parameter {_fmt(p)} has shape {shape}; the config implies "
                                      f"{self.expected[p]}")
        leaves = {p: (v if isinstance(v, jax.Array) else np.ascontiguousarray(v)) for p, v in flat.items()}
        for p, v in leaves.items():
            if not _is_float(v.dtype):
                raise CheckpointError(f"parameter {_fmt(p)} has dtype {v.dtype}; parameters must be floating point")
            finite = bool(jax.numpy.isfinite(v).all()) if isinstance(v, jax.Array) else bool(
                np.isfinite(v.astype(np.float32) if v.dtype.itemsize < 4 else v).all())
            if not finite:
                raise CheckpointError(f"parameter {_fmt(p)} holds NaN or infinite values; a checkpoint must be finite "
                                      "(is the source file corrupt?)")
        with _orbax_context():
            _orbax_v1().partial.save(self.tmp / PARAMS_DIR, unflatten(leaves))
        for p, v in leaves.items():
            self._written[p] = (tuple(v.shape), np.dtype(v.dtype).name)

    def abort(self) -> None:
        """Remove the temporary directory; ``path`` is left as it was."""
        self._done = True
        shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self) -> Path:
        """Finish the checkpoint and move it to ``path``. Raises if any parameter was not written."""
        if self._done:
            raise CheckpointError("this CheckpointWriter is already committed or aborted")
        try:
            missing = sorted(_fmt(p) for p in self.expected.keys() - self._written.keys())
            if missing:
                raise CheckpointError(f"cannot commit {self.path}: parameter(s) never written: {missing}")
            with _orbax_context():
                _orbax_v1().partial.finalize(self.tmp / PARAMS_DIR)
            (self.tmp / CONFIG_FILE).write_text(config_lib.to_json(self.config))
            if self.tokenizer_files:
                (self.tmp / TOKENIZER_DIR).mkdir()
                for f in self.tokenizer_files:
                    shutil.copy2(f, self.tmp / TOKENIZER_DIR / f.name)
            dtypes = sorted({d for _, d in self._written.values()})
            manifest = file_manifest(self.tmp)
            marker = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "config_kind": "mllm" if isinstance(self.config, MLLMConfig) else "lm",
                "param_dtype": dtypes[0] if len(dtypes) == 1 else "mixed:" + ",".join(dtypes),
                "num_params": int(sum(int(np.prod(s)) for s, _ in self._written.values())),
                "created_unix": int(time.time()),
                "info": self.info,
                "files": manifest,
            }
            (self.tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True))
            _place(self.tmp, self.path, self.force)
        except BaseException:
            self.abort()
            raise
        self._done = True
        log.info("wrote checkpoint %s (%d params, dtype %s)", self.path, marker["num_params"], marker["param_dtype"])
        return self.path


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (one that is not ours to signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(path: str | os.PathLike) -> list[Path]:
    """Delete the partial checkpoints (``.NAME.tmp-<pid>-*``) that killed writes of ``path`` left beside it, when
    their process is gone. A partial of a running process is kept. Returns the removed folders."""
    path = Path(path).absolute()
    removed = []
    for d in path.parent.glob(f".{path.name}.tmp-*"):
        pid = d.name[len(f".{path.name}.tmp-"):].split("-", 1)[0]
        if not (d.is_dir() and pid.isdigit()) or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _place(tmp: Path, path: Path, force: bool) -> None:
    """Rename ``tmp`` to ``path``; an existing ``path`` (checked earlier) is swapped out, then deleted."""
    check_destination(path, force)  # again: it may have appeared while we were writing
    if not path.exists():
        os.rename(tmp, path)
        return
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except OSError:
        os.rename(old, path)
        raise
    shutil.rmtree(old)


def tokenizer_files_in(directory: str | os.PathLike) -> list[Path]:
    """The known tokenizer files (:data:`TOKENIZER_FILES`) present in ``directory``."""
    d = Path(directory)
    return [d / n for n in TOKENIZER_FILES if (d / n).is_file()]


def save_checkpoint(path: str | os.PathLike, config: LMConfig | MLLMConfig, params: Params, *,
                    tokenizer_dir: str | os.PathLike | None = None, force: bool = False,
                    info: Mapping[str, Any] | None = None) -> Path:
    """Save ``params`` (a pytree matching :func:`param_shapes` of ``config``) as a checkpoint directory ``path``.

    tokenizer_dir: a Hugging Face tokenizer directory whose known files (:data:`TOKENIZER_FILES`) are copied into
    ``path/tokenizer/``; it must hold at least one of them. force: replace an existing checkpoint at ``path``
    (only after the new one is complete). info: JSON-serialisable notes stored in the marker file.
    Leaves are stored in their own dtype. Returns the absolute path.
    """
    files: list[Path] = []
    if tokenizer_dir is not None:
        files = tokenizer_files_in(tokenizer_dir)
        if not files:
            raise CheckpointError(f"tokenizer_dir={tokenizer_dir} holds none of the tokenizer files "
                                  f"{list(TOKENIZER_FILES)}")
    flat = flatten(params)
    check_params({p: tuple(np.shape(v)) for p, v in flat.items()}, config, "save_checkpoint")
    with CheckpointWriter(path, config, force=force, tokenizer_files=files, info=info) as w:
        w.add(params)
    return w.path


# ----------------------------------------------------------------------------------------------------------
# reading


class LoadedCheckpoint(NamedTuple):
    """What :func:`load_checkpoint` returns (unpacks as ``config, params, tokenizer_dir``)."""
    config: LMConfig | MLLMConfig
    params: Params
    tokenizer_dir: Path | None


def file_manifest(root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} of every file under ``root`` except the marker, sorted."""
    import hashlib

    root = Path(root)
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if rel == MARKER_FILE:
            continue
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        out[rel] = {"size": f.stat().st_size, "sha256": h.hexdigest()}
    return out


VERIFY_MODES = ("full", "size", "none")


def verify_files(path: str | os.PathLike, verify: str = "full") -> None:
    """Check a checkpoint's files against the manifest its marker records.

    verify: "full" (sizes and SHA-256 of every file: reads the whole checkpoint once more), "size" (every file
      present with its recorded size), "none". A checkpoint of format version 1 has no manifest: a warning says
      so and nothing is checked.
    Raises :class:`CheckpointError` naming the first missing, resized or altered file.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify={verify!r}, expected one of {VERIFY_MODES}")
    path = Path(path)
    marker = read_marker(path)
    if verify == "none":
        return
    manifest = marker.get("files")
    if manifest is None:
        log.warning("%s was written without a file manifest (format version %s); its files cannot be verified. "
                    "Save it again to add one.", path, marker.get("version"))
        return
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path / MARKER_FILE}: 'files' is not a mapping; the marker is corrupt")
    import hashlib

    for rel, want in manifest.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{path}: file {rel} is missing; the checkpoint is incomplete")
        size = f.stat().st_size
        if size != want.get("size"):
            raise CheckpointError(f"{path}: file {rel} has {size} bytes, {want.get('size')} were written; the "
                                  "checkpoint is truncated or corrupt")
        if verify == "full":
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            if h.hexdigest() != want.get("sha256"):
                raise CheckpointError(f"{path}: file {rel} does not match the SHA-256 recorded when it was written; "
                                      "the checkpoint is corrupt (re-convert or re-copy it)")


def read_marker(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``dcam_checkpoint.json`` of a checkpoint directory, validated (format name and version)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    marker = path / MARKER_FILE
    if not marker.is_file():
        raise CheckpointError(
            f"{path} is not a dcam_jax checkpoint: it has no {MARKER_FILE}. Convert a Hugging Face checkpoint "
            "with `python -m checkpoints_convert --hf_dir=SRC --out_dir=DST` or save one with save_checkpoint().")
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{marker} is corrupt (not valid JSON: {e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{marker} does not describe a {FORMAT_NAME} (format field: "
                              f"{data.get('format') if isinstance(data, dict) else data!r})")
    version = data.get("version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{marker}: format version {version!r} is not supported by this dcam_jax (reads "
                              f"versions 1..{FORMAT_VERSION}); upgrade dcam_jax or re-convert the checkpoint")
    return data


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
        meta = _orbax_v1().metadata(pdir).metadata
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
        if not _is_float(target_dtype):
            raise ValueError(f"dtype={dtype!r}: parameters can only be loaded as a floating dtype")
    shardings = _resolve_shardings(sharding, stored, target_dtype)
    target = unflatten({p: jax.ShapeDtypeStruct(s, target_dtype or d, sharding=shardings[p])
                        for p, (s, d) in stored.items()})
    try:
        with _orbax_context():
            params = _orbax_v1().load(path / PARAMS_DIR, target)
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
                             f"{sorted(_fmt(p) for p in stored.keys() - flat.keys())}, unexpected "
                             f"{sorted(_fmt(p) for p in flat.keys() - stored.keys())}")
        bad = [_fmt(p) for p, s in flat.items() if not isinstance(s, jax.sharding.Sharding)]
        if bad:
            raise ValueError(f"sharding pytree leaves must be jax.sharding.Sharding; not so at {bad}")
        return flat
    if callable(sharding):
        out = {}
        for p, (s, d) in stored.items():
            sh = sharding(p, jax.ShapeDtypeStruct(s, target_dtype or d))
            if not isinstance(sh, jax.sharding.Sharding):
                raise ValueError(f"sharding callable returned {type(sh).__name__} for {_fmt(p)}; expected a "
                                 "jax.sharding.Sharding")
            out[p] = sh
        return out
    raise ValueError(f"sharding must be None, a jax.sharding.Sharding, a pytree of them or a callable; got "
                     f"{type(sharding).__name__}")
