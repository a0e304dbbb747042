"""Convert Hugging Face safetensors checkpoints of LLaDA-8B, LaViDa and LLaDA-V into dcam_jax (orbax) checkpoints.

Command line: ``python -m checkpoints_convert --hf_dir=SRC --out_dir=DST`` (see ``--help``).
Python: :func:`convert` (same options), returning a :class:`ConversionReport`.
"""

from checkpoints_convert.convert import ARCHS, ConversionError, ConversionReport, build_plan, convert, parse_overrides
from checkpoints_convert.safetensors_reader import SafetensorsCheckpoint, SafetensorsError, read_header

__all__ = ["ARCHS", "ConversionError", "ConversionReport", "SafetensorsCheckpoint", "SafetensorsError", "build_plan",
           "convert", "parse_overrides", "read_header"]
