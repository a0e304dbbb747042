"""Convert a Hugging Face checkpoint (safetensors) of LLaDA-8B, LaViDa or LLaDA-V into a dcam_jax checkpoint.

Usage:
  python -m checkpoints_convert --hf_dir=SRC --out_dir=DST [--arch=auto|lavida|llada_v|llada]
      [--dtype=bfloat16|float32] [--override=KEY=VALUE ...] [--keep_post_layernorm] [--force]

SRC is a downloaded Hugging Face model directory: model.safetensors, or shards plus model.safetensors.index.json,
usually with config.json and the tokenizer files. DST becomes a directory with config.json, dcam_checkpoint.json,
params/ (orbax) and tokenizer/, loadable with dcam_jax.checkpoint.load_checkpoint(DST).

Examples:
  python -m checkpoints_convert --hf_dir=/data/hf/LaViDa-llada --out_dir=/data/ckpt/lavida
  python -m checkpoints_convert --hf_dir=/data/hf/LLaDA-V --out_dir=/data/ckpt/llada_v --dtype=float32
  python -m checkpoints_convert --hf_dir=/data/hf/LLaDA-8B-Instruct --out_dir=/data/ckpt/llada_8b --arch=llada
  python -m checkpoints_convert ... --override=vision.num_heads=16 --override=lm.rope_theta=500000

How the config is chosen: every value comes from --override, else the HF config.json, else the tensor shapes,
else the architecture's preset, and each choice is logged with its source. The vision tower's settings are not
stored in LLaVA-style checkpoints; width, depth, patch and image size come from the shapes, the head count and
LayerNorm epsilon from the preset (override them if your tower differs).

Strictness: every tensor in SRC must be used exactly once. The only tensors dropped are the ones the models never
run (the last SigLIP layer when SRC still holds it, the pooling head, the post-layernorm unless
--keep_post_layernorm); each drop is logged. Missing, unexpected, mis-shaped or truncated tensors stop the
conversion with a list of their names, and nothing is written to DST. The output is built in a hidden temporary
directory next to DST and renamed into place only when complete; an existing DST is refused unless --force
(and, with --force, replaced only after the new checkpoint is complete). Peak memory is about one (stacked)
parameter tensor, not the whole model.
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging

from checkpoints_convert.convert import ARCHS, DTYPES, ConversionError, convert
from checkpoints_convert.safetensors_reader import SafetensorsError
from dcam_jax.checkpoint import CheckpointError
from dcam_jax.models.config import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "Hugging Face model directory holding model.safetensors (or shards plus "
                    "model.safetensors.index.json), and usually config.json and tokenizer files.")
flags.DEFINE_string("out_dir", None, "Where to write the dcam_jax checkpoint (a new directory).")
flags.DEFINE_enum("arch", "auto", ARCHS, "Model family. auto: from the tensor names (OLMo-style names + vision "
                  "tower -> lavida, LLaMA-style + vision -> llada_v, no vision tower -> llada, LM only).")
flags.DEFINE_enum("dtype", "bfloat16", sorted(DTYPES), "Stored parameter dtype (also the config's compute dtype).")
flags.DEFINE_multi_string("override", [], "Config assignment KEY=VALUE with dotted keys, repeatable, e.g. "
                          "--override=vision.num_heads=16 --override=lm.max_seq_len=8192. Values are JSON "
                          "(numbers, true/false, lists) or plain strings.")
flags.DEFINE_bool("keep_post_layernorm", False, "Keep the SigLIP post-layernorm (unused by the models) as "
                  "vision/post_ln instead of dropping it.")
flags.DEFINE_bool("force", False, "Replace an existing dcam_jax checkpoint at --out_dir (only after the new one "
                  "is complete).")
flags.DEFINE_bool("progress", True, "Show a progress bar over source tensors.")
flags.mark_flags_as_required(["hf_dir", "out_dir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected positional arguments {argv[1:]}; all options are --flags")
    if not FLAGS["verbosity"].present:
        # orbax logs every step of every write through absl at INFO; keep ours, silence theirs unless asked (-v 0)
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("checkpoints_convert").setLevel(logging.INFO)
    logging.getLogger("dcam_jax").setLevel(logging.INFO)
    try:
        convert(FLAGS.hf_dir, FLAGS.out_dir, arch=FLAGS.arch, dtype=FLAGS.dtype, overrides=FLAGS.override,
                force=FLAGS.force, keep_post_layernorm=FLAGS.keep_post_layernorm, progress=FLAGS.progress)
    except (ConversionError, SafetensorsError, CheckpointError, ConfigError, FileExistsError) as e:
        print(f"checkpoints_convert: error: {e}", file=sys.stderr)
        return 1
    return 0


def run():
    from dcam_jax.tool import run_tool

    run_tool(main)


if __name__ == "__main__":
    run()
