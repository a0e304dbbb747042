"""The conversion plan: every dcam_jax parameter with its source tensors, checked strictly before anything is written.

:func:`build_plan` maps each parameter of a config (shapes from :func:`dcam_jax.checkpoint.param_shapes`) onto its
Hugging Face tensor names (:mod:`checkpoints_convert.naming`). :func:`dropped_tensors` names the source tensors the
models never run, with the reason. :func:`check_plan` then requires that every source tensor is used exactly once
or dropped on purpose, that none is missing, and that every shape and dtype is as expected; problems are reported
together, by name.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from checkpoints_convert import naming
from checkpoints_convert.errors import ConversionError
from checkpoints_convert.safetensors_reader import FLOAT_DTYPES, SafetensorsCheckpoint
from dcam_jax import checkpoint as ckpt_lib
from dcam_jax.models.config import LMConfig, MLLMConfig

log = logging.getLogger("checkpoints_convert")


@dataclasses.dataclass(frozen=True)
class Target:
    """One dcam_jax parameter: its path, full shape, and source tensor(s) (one per layer if stacked).

    transform: naming.COPY, naming.TRANSPOSE or naming.CONV (torch layout -> ours).
    stacked: the first axis of ``shape`` is the layer axis, and ``sources`` holds one tensor per layer.
    """
    path: tuple[str, ...]
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    transform: str
    stacked: bool

    def source_shape(self) -> tuple[int, ...]:
        """The shape each source tensor must have (torch layout; one layer's slice if stacked)."""
        s = self.shape[1:] if self.stacked else self.shape
        if self.transform == naming.TRANSPOSE:
            return s[::-1]
        if self.transform == naming.CONV:  # ours [kh, kw, I, O] <- torch [O, I, kh, kw]
            return (s[3], s[2], s[0], s[1])
        return s


def build_plan(config: LMConfig | MLLMConfig, dialect: str, prefix: str) -> list[Target]:
    """Every target parameter with its source names, from the config (shapes: dcam_jax.checkpoint.param_shapes).

    dialect, prefix: the LM naming from :func:`naming.detect_lm_dialect` ("olmo" or "llama"; the text before
    ``transformer.`` for olmo). Returns one Target per parameter, in ``param_shapes`` order.
    """
    shapes = ckpt_lib.param_shapes(config)
    plan = []
    for path, shape in shapes.items():
        if path[0] == "lm":
            template, transform = naming.LM_NAMES[dialect][path[1:]]
            template = template.replace("{p}", prefix)
        elif path[0] == "vision":
            template, transform = naming.VISION_NAMES[path[1:]]
        else:
            template, transform = naming.OTHER_NAMES[path]
        stacked = "{i}" in template
        sources = tuple(template.format(i=i) for i in range(shape[0])) if stacked else (template,)
        plan.append(Target(path, shape, sources, transform, stacked))
    return plan


def dropped_tensors(names: Sequence[str], depth: int, n_found: int, keep_post_ln: bool) -> dict[str, str]:
    """The source tensors the models never run, as name -> reason.

    names: every source tensor name. depth: the vision layers the config runs; n_found: the vision layers the
    checkpoint holds (layers [depth, n_found) are dropped). keep_post_ln: the config keeps the post-layernorm.
    """
    V = naming.VISION
    out = {}
    for n in names:
        m = naming.VISION_LAYER_RE.match(n)
        if m and depth <= int(m.group(1)) < n_found:
            out[n] = f"vision layer {m.group(1)}: LLaVA's tower deletes the last SigLIP layer"
        elif n.startswith(V + "head."):
            out[n] = "SigLIP pooling head: replaced by identity in LLaVA's tower"
        elif n.startswith(V + "post_layernorm.") and not keep_post_ln:
            out[n] = "SigLIP post-layernorm: unused by the models (keep it with --keep_post_layernorm)"
    return out


def check_plan(ckpt: SafetensorsCheckpoint, plan: list[Target], dropped: dict[str, str], dialect: str,
               arch: str) -> list[str]:
    """Check that ``plan`` and ``dropped`` account for every tensor of ``ckpt`` exactly once, strictly.

    dropped: source name -> reason (:func:`dropped_tensors`). dialect, arch: named in the error message.
    Returns the sorted source names the plan consumes. Raises ConversionError listing, by name, every missing,
    unexpected, mis-shaped or non-floating-point tensor.
    """
    present = set(ckpt.names())
    expected: dict[str, Target] = {}
    for t in plan:
        for s in t.sources:
            expected[s] = t
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected) - set(dropped))
    wrong_shape = sorted(f"{s}: {list(ckpt.info(s).shape)}, expected {list(t.source_shape())}"
                         for s, t in expected.items() if s in present and ckpt.info(s).shape != t.source_shape())
    wrong_dtype = sorted(f"{s}: {ckpt.info(s).dtype}" for s in expected if s in present
                         and ckpt.info(s).dtype not in FLOAT_DTYPES)
    if missing or unexpected or wrong_shape or wrong_dtype:
        lines = [f"cannot convert {ckpt.directory} as arch={arch} ({dialect}-style names):"]
        for title, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                             ("tensors with the wrong shape", wrong_shape),
                             ("tensors that are not floating point", wrong_dtype)):
            if items:
                shown = items[:40]
                more = f" ... and {len(items) - 40} more" if len(items) > 40 else ""
                lines.append(f"  {len(items)} {title}: " + ", ".join(shown) + more)
        if unexpected and arch == "llada" and naming.has_multimodal_parts(unexpected):
            lines.append("  (the checkpoint has a vision tower / projector: use --arch=auto, lavida or llada_v)")
        if wrong_shape:
            lines.append("  (shape-free settings such as head counts come from the HF config.json or the preset; "
                         "fix them with --override, e.g. --override=vision.num_heads=16)")
        raise ConversionError("\n".join(lines))
    return sorted(expected)


def log_drops(dropped: dict[str, str]) -> None:
    """Log the dropped tensors (source name -> reason) once per reason, with a count and an example."""
    by_reason: dict[str, list[str]] = {}
    for n, r in dropped.items():
        by_reason.setdefault(r, []).append(n)
    for reason, items in sorted(by_reason.items()):
        log.info("dropping %d tensor(s): %s (e.g. %s)", len(items), reason, items[0])
