"""Save and restore dcam_jax checkpoints: (config, params) with orbax, plus the tokenizer files.

One name space over small modules, each one concept:

- :mod:`.layout`: the directory layout, the parameter layout a config implies (:func:`param_shapes`),
  :func:`flatten` / :func:`unflatten`, and :class:`CheckpointError`.
- :mod:`.manifest`: the marker file and its manifest of every file's size and SHA-256 (:func:`verify_files`).
- :mod:`.atomic`: where a checkpoint may be written, the hidden partial directory beside it, stale-partial
  cleanup (with :func:`pid_alive`) and the final rename.
- :mod:`.writer`: :class:`CheckpointWriter` (piece by piece, for converters) and :func:`save_checkpoint`.
- :mod:`.reader`: :func:`read_config`, :func:`stored_param_shapes` and :func:`load_checkpoint`.

Writes are atomic: everything goes into a hidden temporary directory next to ``path`` that is renamed into place
only once complete; an existing ``path`` is replaced only with ``force=True``, only if it is itself a dcam_jax
checkpoint (or an empty directory), and only after the new one is complete.
"""

from dcam_jax.checkpoint.atomic import check_destination, pid_alive, remove_stale_partials
from dcam_jax.checkpoint.layout import (CONFIG_FILE, MARKER_FILE, PARAMS_DIR, TOKENIZER_DIR, CheckpointError, Params,
                                        Path_, check_params, flatten, param_shapes, unflatten)
from dcam_jax.checkpoint.manifest import (FORMAT_NAME, FORMAT_VERSION, VERIFY_MODES, file_manifest, read_marker,
                                          verify_files)
from dcam_jax.checkpoint.reader import LoadedCheckpoint, ShardingSpec, load_checkpoint, read_config, stored_param_shapes
from dcam_jax.checkpoint.writer import TOKENIZER_FILES, CheckpointWriter, save_checkpoint, tokenizer_files_in

__all__ = ["CONFIG_FILE", "FORMAT_NAME", "FORMAT_VERSION", "MARKER_FILE", "PARAMS_DIR", "TOKENIZER_DIR",
           "TOKENIZER_FILES", "VERIFY_MODES", "CheckpointError", "CheckpointWriter", "LoadedCheckpoint", "Params",
           "Path_", "ShardingSpec", "check_destination", "check_params", "file_manifest", "flatten",
           "load_checkpoint", "param_shapes", "pid_alive", "read_config", "read_marker", "remove_stale_partials",
           "save_checkpoint", "stored_param_shapes", "tokenizer_files_in", "unflatten", "verify_files"]
