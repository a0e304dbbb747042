"""The configuration of a toy training run: :class:`TrainConfig` (every knob; its defaults are the recipe of the
shipped checkpoint) and the phase-2 curriculum helpers (:func:`parse_curriculum`, :func:`stage_at`,
:func:`preset_at`). ``dcam_jax.toy.train`` describes the phases these knobs drive.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from dcam_jax.data import shapes
from dcam_jax.toy import model as tm


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every knob of a toy training run (the defaults reproduce the shipped checkpoint).

    Attributes:
      seed: PRNG seed for parameters and masks; also offsets the ShapesWorld example indices.
      view_steps, view_batch, view_lr, view_preset, view_size: phase 1a, tower pretraining on single views:
        ShapesWorld images of ``view_size`` px (``view_preset`` with image_size = view_size) fed as one view each.
        A ``view_size`` below the model's view size (vision.image_size) trains the tower at that resolution, with a
        position table for its smaller patch grid, which is then bilinearly resized to the model's grid (the usual
        way a ViT moves to a higher resolution): at 32 px a view has 16 tokens instead of 64, so these steps cost
        a quarter, and the objects keep their size in pixels.
      tower_steps, tower_batch, tower_lr, tower_presets: phase 1b, object-level tower pretraining on whole images in
        the model's layout (every view of it); presets are cycled step by step.
      lm_steps, batch_size, lr, warmup_steps, weight_decay, min_lr_ratio: phase 2 (masked-diffusion captioning).
      curriculum: ((preset, steps, answer_length), ...) for phase 2; the last stage runs until ``lm_steps`` (its
        count ignored). answer_length 0 means ``gen_length``; a short first stage on one-object images with
        answers of exactly caption + eot (no EOS padding) teaches the fresh LM to read the image quickly (with
        28 of 32 answer tokens being padding, content words are learned many times more slowly).
      freeze_tower_steps: phase-2 steps with the tower frozen (no tower gradients at all); >= lm_steps keeps it
        frozen throughout.
      tower_lr_mult: the LR multiplier of the tower (and of a frozen projector) in phase 2 after unfreezing.
      freeze_projector: whether the projector is frozen with the tower (else it trains at the full LR).
      finetune_steps, finetune_lr, finetune_tower_lr_mult, finetune_preset: phase 3, end-to-end fine-tuning: the
        phase-2 objective with the tower (and a frozen projector) unfrozen at ``finetune_tower_lr_mult`` x
        ``finetune_lr``, a fresh optimiser and schedule, on ``finetune_preset`` images; 0 steps skips it.
      aux_weight: weight of the object-level tower loss kept as an auxiliary loss in phase 2 (0 = off).
      token_rms_weight: weight of ``tm.token_rms_penalty`` (every projected image token pulled towards RMS 1) in the
        tower phases and, wherever the tower or projector trains, in phases 2 and 3 (0 = off).
      attention: "full" or "prefix_lm" (also stored in the model config).
      num_masks: maskings of each answer per step; with "prefix_lm" they share one prompt (image) computation.
      pad_weight: loss weight of the EOS padding tokens (1 = LLaDA SFT exactly; see tm.diffusion_loss).
      gen_length: answer length G the model is trained to fill (caption + eot + EOS padding).
      grad_clip: global gradient-norm clip.
    """

    seed: int = 0
    view_steps: int = 3000
    view_batch: int = 128
    view_lr: float = 2e-3
    view_preset: str = "easy"
    view_size: int = 32
    tower_steps: int = 12000
    tower_batch: int = 32
    tower_lr: float = 1.5e-3
    tower_presets: tuple[str, ...] = ("default",)
    lm_steps: int = 2500
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    min_lr_ratio: float = 0.05
    curriculum: tuple[tuple[str, int, int], ...] = (("easy", 150, 0), ("simple", 350, 0), ("default", 0, 0))
    freeze_tower_steps: int = 2500
    tower_lr_mult: float = 0.1
    freeze_projector: bool = True
    finetune_steps: int = 1800
    finetune_lr: float = 5e-4
    finetune_tower_lr_mult: float = 0.25
    finetune_preset: str = "default"
    aux_weight: float = 0.0
    token_rms_weight: float = 0.0
    attention: str = "full"
    num_masks: int = 1
    pad_weight: float = 0.05
    gen_length: int = tm.TOY_GEN_LENGTH
    grad_clip: float = 1.0

    def __post_init__(self):
        for name in ("view_steps", "tower_steps", "lm_steps", "freeze_tower_steps", "finetune_steps",
                     "warmup_steps", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"TrainConfig.{name}={v!r} must be a non-negative int")
        for name in ("view_batch", "tower_batch", "batch_size", "gen_length", "num_masks", "view_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"TrainConfig.{name}={v!r} must be a positive int")
        presets = (self.view_preset, self.finetune_preset, *self.tower_presets, *(st[0] for st in self.curriculum))
        for p in presets:
            if p not in shapes.PRESETS:
                raise ValueError(f"unknown ShapesWorld preset {p!r} in the training schedule; expected one of "
                                 f"{tuple(shapes.PRESETS)}")
        if not self.curriculum or any(len(st) != 3 for st in self.curriculum):
            raise ValueError(f"TrainConfig.curriculum={self.curriculum!r} must be a non-empty tuple of "
                             "(preset, steps, answer_length) stages")
        for st in self.curriculum:
            if not 0 <= st[2] <= self.gen_length:
                raise ValueError(f"curriculum stage {st!r}: answer_length must be in [0, gen_length={self.gen_length}]")
        if self.attention not in ("full", "prefix_lm"):
            raise ValueError(f"TrainConfig.attention={self.attention!r}, expected 'full' or 'prefix_lm'")


def parse_curriculum(text: str) -> tuple[tuple[str, int, int], ...]:
    """'easy:50:4,simple:100,default' -> (("easy", 50, 4), ("simple", 100, 0), ("default", 0, 0)).

    Each stage is preset:steps[:answer_length]; the last stage may omit the step count (it runs to the end).
    """
    stages = []
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"curriculum {text!r} is empty; expected e.g. 'easy:50,default'")
    for k, part in enumerate(parts):
        fields = [f.strip() for f in part.split(":")]
        if len(fields) > 3 or not all(f.isdigit() for f in fields[1:]):
            raise ValueError(f"curriculum stage {part!r} must look like preset:steps[:answer_length]")
        if k < len(parts) - 1 and len(fields) < 2:
            raise ValueError(f"curriculum stage {part!r} needs a step count, e.g. 'easy:50' (only the last stage may "
                             "omit it)")
        nums = [int(f) for f in fields[1:]] + [0, 0]
        stages.append((fields[0], nums[0], nums[1]))
    return tuple(stages)


def stage_at(curriculum: Sequence[tuple[str, int, int]], step: int) -> tuple[str, int, int]:
    """The curriculum stage (preset, steps, answer_length) of phase-2 step ``step``."""
    start = 0
    for st in curriculum[:-1]:
        if step < start + st[1]:
            return tuple(st)
        start += st[1]
    return tuple(curriculum[-1])


def preset_at(curriculum: Sequence[tuple[str, int, int]], step: int) -> str:
    """The ShapesWorld preset of phase-2 step ``step`` under ``curriculum``."""
    return stage_at(curriculum, step)[0]
