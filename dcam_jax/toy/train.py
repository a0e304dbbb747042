r"""Train the embedded toy dMLLM on ShapesWorld from scratch and write a dcam_jax checkpoint.

    python -m dcam_jax.toy.train --out_dir=/tmp/toy_ckpt

Three phases, all on batches generated on the fly from the ShapesWorld *train* split (fully determined by
``--seed``):

1. **Tower pretraining**: the vision tower and projector learn object-level targets. Each object's pixel mask
   is averaged onto the image-token grids; the projected tokens are pooled with those weights and linear heads
   predict the object's shape, colour and centre. This puts each object's shape at that object's tokens, which
   end-to-end captioning alone does not achieve in a CPU budget. It runs in two stages: (a) ``--view_steps`` on
   single small views (``--view_size`` px ShapesWorld images with one large object; the tower's position table is
   then resized to the model's patch grid), then (b) ``--tower_steps`` on whole images in the model's layout.
2. **Masked-diffusion captioning** (``--lm_steps``): LLaDA's SFT objective on the answer (caption,
   ``<|eot_id|>``, ``<|endoftext|>`` padding to ``--gen_length``): each answer token is masked with probability
   t ~ U(eps, 1); loss = sum of cross-entropies over masked tokens / t, divided by the number of answer tokens.
   The tower is frozen for the first ``--freeze_tower_steps`` steps (by default all of them: the tower keeps the
   object-local features of phase 1, and a frozen tower costs no backward pass), then trains at
   ``--tower_lr_mult`` x the LR.
   ``--curriculum`` schedules ShapesWorld presets (e.g. one object first).
3. **End-to-end fine-tuning** (``--finetune_steps``, 0 skips it): the phase-2 objective on ``--finetune_preset``
   images with the tower and projector unfrozen at ``--finetune_tower_lr_mult`` x ``--finetune_lr``, with a fresh
   optimiser and schedule. A short phase at a low LR after the LM has learned to read the frozen tower lets the
   tower adapt its features to captioning (the model card, ``docs/toy_model.md``, has the recipe). It uses the same
   example stream and mask keys as phase 2's first steps, so it equals a second run started from the phase-2
   checkpoint (``--init_checkpoint=... --view_steps=0 --tower_steps=0 --lm_steps=N --freeze_tower_steps=0``
   ``--finetune_steps=0``, and the phase-3 LR, multiplier and preset as ``--lr``, ``--tower_lr_mult``,
   ``--curriculum``).

Optimiser: AdamW with linear warmup and cosine decay (per phase). Learning curves per answer word class
(accuracy of the argmax at masked positions: colour, shape, relation, function, eot, pad) are logged every
``--log_every`` steps and, with ``--log_jsonl``, written as JSON lines.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcam_jax.data import shapes
from dcam_jax.models import config as config_lib
from dcam_jax.models import mllm
from dcam_jax.models.config import MLLMConfig
from dcam_jax.processing import image as pimg
from dcam_jax.processing import text as ptext
from dcam_jax.toy import model as tm
from dcam_jax.toy import tokenizer as toy_tok

Params = dict[str, Any]


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
    finetune_steps: int = 600
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


def _schedule(lr: float, warmup: int, steps: int, min_ratio: float):
    warmup = min(warmup, max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, 2), lr * min_ratio)


def _example_indices(seed: int, phase: int, step: int, batch: int) -> range:
    # Phases and seeds draw disjoint example ranges of the train split, so a run is a function of its seed.
    start = ((seed * 8 + phase) << 32) + step * batch
    return range(start, start + batch)


class _Prefetcher:
    """Builds host batches on a worker thread one step ahead (ShapesWorld + preprocessing release the GIL
    rarely, but the device step does, so the two overlap)."""

    def __init__(self, make: Callable[[int], Any], steps: int):
        self._make, self._steps = make, steps
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._next = self._pool.submit(make, 0) if steps else None

    def get(self, step: int):
        batch = self._next.result()
        self._next = self._pool.submit(self._make, step + 1) if step + 1 < self._steps else None
        return batch

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


def _lr_mult_tree(params: Params, tower_mult, with_projector: bool) -> Params:
    slow = ("vision", "projector") if with_projector else ("vision",)
    return {k: jax.tree.map(lambda _: tower_mult if k in slow else 1.0, v) for k, v in params.items()}


def make_optimizer(lr: float, warmup: int, steps: int, weight_decay: float, min_ratio: float, clip: float):
    """AdamW (linear warmup, cosine decay to ``lr * min_ratio``) after global-norm clipping."""
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(_schedule(lr, warmup, steps, min_ratio), b1=0.9, b2=0.98,
                                   weight_decay=weight_decay))


def train(tcfg: TrainConfig, config: MLLMConfig, tokenizer, *, log: Callable[[dict], None] | None = None,
          progress: bool = True, log_every: int = 25, params: Params | None = None,
          init_parts: str = "all") -> tuple[Params, list[dict]]:
    """Run the training phases (each skipped at 0 steps). Returns (model params, history of logged records).

    config: the model config (``tm.toy_config()`` or a smaller one for tests); tokenizer: the toy tokenizer.
    log: called with each logged record (dict) every ``log_every`` steps; progress: show tqdm bars.
    params: start from these model params instead of a fresh initialisation.
    init_parts: with ``params``, "all" starts from all of them; "tower" takes only the vision tower and the
      projector from ``params`` and initialises everything else (LM, image_newline) exactly as a fresh run with
      this seed would, so "--view_steps=0 --tower_steps=0" on a checkpoint of the same recipe repeats its
      captioning phases (2 and 3) alone.
    """
    if init_parts not in ("all", "tower"):
        raise ValueError(f"init_parts={init_parts!r}, expected 'all' or 'tower'")
    from tqdm.auto import tqdm

    if config.attention != tcfg.attention:
        config = config.replace(attention=tcfg.attention)
    vc = config.vision
    if tcfg.view_steps and (tcfg.view_size > vc.image_size or tcfg.view_size % vc.patch_size):
        raise ValueError(f"TrainConfig.view_size={tcfg.view_size} must be a multiple of the patch size "
                         f"{vc.patch_size} and at most the model's view size {vc.image_size}")
    processor = pimg.ImageProcessor(config)
    geometry = tm.toy_geometry(config)
    ids = tm.prompt_ids(config, tokenizer)
    key = jax.random.key(tcfg.seed)
    k_init, k_heads, k_train = jax.random.split(key, 3)
    if params is None:
        params = tm.init_toy_params(k_init, config)
    elif init_parts == "tower":
        params = {**tm.init_toy_params(k_init, config), "vision": params["vision"], "projector": params["projector"]}
    history: list[dict] = []

    def emit(rec):
        history.append(rec)
        if log is not None:
            log(rec)

    def host_batch(phase, step, batch, preset_name, gen_length=tcfg.gen_length):
        b = shapes.batch("train", _example_indices(tcfg.seed, phase, step, batch), shapes.preset(preset_name))
        return tm.make_host_batch(b, config, tokenizer, processor, gen_length)

    t_start = time.time()
    heads = tm.init_object_heads(k_heads, config.lm.d_model)

    def run_tower_phase(name, steps, lr, make_batch, loss_fn, record):
        """Train vision + projector + heads on ``loss_fn(params, heads, batch) -> GridOut``."""
        nonlocal params, heads
        opt = make_optimizer(lr, tcfg.warmup_steps, steps, tcfg.weight_decay, tcfg.min_lr_ratio, tcfg.grad_clip)
        trainable = {"vision": params["vision"], "projector": params["projector"], "heads": heads}
        frozen = {k: v for k, v in params.items() if k not in ("vision", "projector")}
        state = opt.init(trainable)

        @jax.jit
        def step(trainable, state, batch):
            def f(tr):
                out = loss_fn({**frozen, "vision": tr["vision"], "projector": tr["projector"]}, tr["heads"], batch)
                return out.loss, out
            (_, out), g = jax.value_and_grad(f, has_aux=True)(trainable)
            upd, state = opt.update(g, state, trainable)
            return optax.apply_updates(trainable, upd), state, out

        pre = _Prefetcher(make_batch, steps)
        acc = []
        bar = tqdm(range(steps), desc=name, disable=not progress, dynamic_ncols=True)
        try:
            for s in bar:
                trainable, state, out = step(trainable, state, pre.get(s))
                acc.append(jax.device_get(out))
                if (s + 1) % log_every == 0 or s + 1 == steps:
                    rec = record(acc, s + 1, time.time() - t_start)
                    acc = []
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", shape=f"{rec['shape_acc']:.2f}")
                    emit(rec)
        finally:
            pre.close()
        params = {**params, "vision": trainable["vision"], "projector": trainable["projector"]}
        heads = trainable["heads"]

    # ---------------------------------------------------------------- phase 1a: single views
    if tcfg.view_steps:
        vc = config.vision
        small = tcfg.view_size != vc.image_size
        pre_config = (config.replace(vision=dataclasses.replace(vc, image_size=tcfg.view_size)) if small
                      else config)
        if small:  # train at the small grid with a position table of its own size (2-D sin-cos start)
            params = {**params, "vision": {**params["vision"], "pos_embed": jnp.asarray(
                tm.sincos_pos_embed(pre_config.vision.grid, vc.width), params["vision"]["pos_embed"].dtype)}}
        view_cfg = shapes.preset(tcfg.view_preset, image_size=tcfg.view_size)
        u = pre_config.tokens_per_view_side
        mean, std = np.asarray(vc.image_mean, np.float32), np.asarray(vc.image_std, np.float32)

        def view_batch(s):
            b = shapes.batch("train", _example_indices(tcfg.seed, 0, s, tcfg.view_batch), view_cfg)
            # the images already have the view size, so preprocessing is the normalisation alone
            pix = (b.images.astype(np.float32) / 255.0 - mean) / std
            return (pix, tm.area_weights(b.masks, u), b.shapes, b.colours,
                    (b.centres_yx / np.float32(tcfg.view_size)).astype(np.float32))

        run_tower_phase("tower pretraining (single views)", tcfg.view_steps, tcfg.view_lr, view_batch,
                        lambda p, h, b: tm.view_losses(p, h, pre_config, *b, rms_weight=tcfg.token_rms_weight),
                        lambda acc, s, t: _tower_record(acc, s, t, "views"))
        if small:
            params = {**params, "vision": {**params["vision"], "pos_embed": tm.resize_pos_embed(
                params["vision"]["pos_embed"], vc.grid)}}

    # ---------------------------------------------------------------- phase 1b: whole images, model layout
    if tcfg.tower_steps:
        def image_batch(s):
            hb = host_batch(1, s, tcfg.tower_batch, tcfg.tower_presets[s % len(tcfg.tower_presets)])
            return (hb.pixel_values, hb.obj_weights_base, hb.obj_weights_hi, hb.obj_shape, hb.obj_colour,
                    hb.obj_centre, hb.obj_relation)

        run_tower_phase("tower pretraining (images)", tcfg.tower_steps, tcfg.tower_lr, image_batch,
                        lambda p, h, b: tm.object_losses(p, h, config, geometry, *b,
                                                         rms_weight=tcfg.token_rms_weight),
                        lambda acc, s, t: _tower_record(acc, s, t, "images"))

    # ---------------------------------------------------------------- phases 2 and 3: masked-diffusion captioning
    def run_lm_phase(name, record_phase, steps, lr, curriculum, freeze_tower_steps, tower_lr_mult):
        """Masked-diffusion training of the whole model on the phase-2 example stream (steps 0..steps-1)."""
        nonlocal params, heads
        opt = make_optimizer(lr, tcfg.warmup_steps, steps, tcfg.weight_decay, tcfg.min_lr_ratio, tcfg.grad_clip)
        trainable = {"model": params, "heads": heads}
        state = opt.init(trainable)

        def make_step(freeze: bool):
            # the penalty only acts where the image tokens get gradients
            rms_weight = 0.0 if freeze and tcfg.freeze_projector else tcfg.token_rms_weight

            @jax.jit
            def lm_step(trainable, state, pix, ans, cls, wb, wh, sh, co, ce, key, tower_mult):
                def loss_fn(tr):
                    out = tm.diffusion_loss(tr["model"], config, geometry, ids, pix, ans, cls, key,
                                            attention=tcfg.attention, freeze_tower=freeze,
                                            aux=(tr["heads"], wb, wh, sh, co, ce) if tcfg.aux_weight else None,
                                            aux_weight=tcfg.aux_weight, num_masks=tcfg.num_masks,
                                            freeze_projector=tcfg.freeze_projector, pad_weight=tcfg.pad_weight,
                                            rms_weight=rms_weight)
                    return out.loss, out
                (_, out), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
                upd, state = opt.update(g, state, trainable)
                mult = {"model": _lr_mult_tree(trainable["model"], tower_mult, tcfg.freeze_projector),
                        "heads": jax.tree.map(lambda _: 1.0, trainable["heads"])}
                upd = jax.tree.map(lambda u, m: u * m, upd, mult)
                return optax.apply_updates(trainable, upd), state, out
            return lm_step

        step_fns = {}

        def lm_batch(s):
            preset_name, _, length = stage_at(curriculum, s)
            return host_batch(2, s, tcfg.batch_size, preset_name, length or tcfg.gen_length)

        pre = _Prefetcher(lm_batch, steps)
        acc = []
        bar = tqdm(range(steps), desc=name, disable=not progress, dynamic_ncols=True)
        try:
            for s in bar:
                hb = pre.get(s)
                freeze = s < freeze_tower_steps
                if freeze not in step_fns:  # compile only the variants this phase uses
                    step_fns[freeze] = make_step(freeze)
                mult = jnp.float32(0.0 if freeze else tower_lr_mult)
                trainable, state, out = step_fns[freeze](
                    trainable, state, hb.pixel_values, hb.answers, hb.token_class, hb.obj_weights_base,
                    hb.obj_weights_hi, hb.obj_shape, hb.obj_colour, hb.obj_centre, jax.random.fold_in(k_train, s),
                    mult)
                acc.append(jax.device_get(out))
                if (s + 1) % log_every == 0 or s + 1 == steps:
                    rec = _lm_record(acc, s + 1, time.time() - t_start, preset_at(curriculum, s), record_phase)
                    acc = []
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", colour=f"{rec['acc_colour']:.2f}",
                                    shape=f"{rec['acc_shape']:.2f}")
                    emit(rec)
        finally:
            pre.close()
        params, heads = trainable["model"], trainable["heads"]

    if tcfg.lm_steps:
        run_lm_phase("diffusion captioning", "lm", tcfg.lm_steps, tcfg.lr, tcfg.curriculum, tcfg.freeze_tower_steps,
                     tcfg.tower_lr_mult)
    # ---------------------------------------------------------------- phase 3: end-to-end fine-tuning
    if tcfg.finetune_steps:
        # The same example stream and mask keys as phase 2's first steps, so this phase equals a second run
        # started from the phase-2 checkpoint (--init_checkpoint with --view_steps=0 --tower_steps=0 ...).
        run_lm_phase("end-to-end fine-tuning", "finetune", tcfg.finetune_steps, tcfg.finetune_lr,
                     ((tcfg.finetune_preset, 0, 0),), 0, tcfg.finetune_tower_lr_mult)
    return params, history


def _tower_record(outs, step, elapsed, phase) -> dict:
    m = lambda f: np.mean([np.asarray(getattr(o, f)) for o in outs], axis=0)
    rec = {"phase": f"tower_{phase}", "step": step, "time_s": round(elapsed, 1), "loss": float(m("loss"))}
    for f in ("shape_acc", "colour_acc", "centre_err", "token_shape_acc", "order_acc"):
        v = np.atleast_1d(m(f))
        if v.size == 1:
            rec[f] = float(v[0])
        else:  # (base view, high-res grid)
            rec[f] = float(v.mean())
            rec[f + "_base"], rec[f + "_highres"] = float(v[0]), float(v[1])
    return rec


def _lm_record(outs, step, elapsed, preset_name, phase="lm") -> dict:
    correct = np.sum([np.asarray(o.correct) for o in outs], axis=0)
    count = np.sum([np.asarray(o.count) for o in outs], axis=0)
    rec = {"phase": phase, "step": step, "time_s": round(elapsed, 1), "preset": preset_name,
           "loss": float(np.mean([float(o.loss) for o in outs]))}
    if outs and outs[0].aux_loss is not None:
        rec["aux_loss"] = float(np.mean([float(o.aux_loss) for o in outs]))
    for k, name in enumerate(tm.TOKEN_CLASSES):
        rec[f"acc_{name}"] = float(correct[k] / count[k]) if count[k] else float("nan")
    return rec


# ----------------------------------------------------------------------------------------------------------
# command line


def _flags():
    from absl import flags

    d = TrainConfig()
    flags.DEFINE_string("out_dir", "toy_checkpoint", "Directory to write the trained checkpoint to (orbax params, "
                        "config.json, tokenizer/). Written atomically; see --force.")
    flags.DEFINE_bool("force", False, "Replace an existing checkpoint at --out_dir.")
    flags.DEFINE_integer("seed", d.seed, "Seed for initialisation, masking and the choice of training examples.")
    flags.DEFINE_integer("view_steps", d.view_steps, "Phase 1a: steps of tower pretraining on single views "
                         "(ShapesWorld images drawn at the tower's view size).")
    flags.DEFINE_integer("view_batch", d.view_batch, "Phase 1a: views per step.")
    flags.DEFINE_float("view_lr", d.view_lr, "Phase 1a: peak learning rate.")
    flags.DEFINE_string("view_preset", d.view_preset, "Phase 1a: ShapesWorld preset.")
    flags.DEFINE_integer("view_size", d.view_size, "Phase 1a: image size in px (a multiple of the patch size, at "
                         "most the model's view size; smaller views are cheaper, and the tower's position table is "
                         "resized to the model's patch grid afterwards).")
    flags.DEFINE_integer("tower_steps", d.tower_steps, "Phase 1b: steps of object-level tower pretraining on whole "
                         "images in the model's layout.")
    flags.DEFINE_integer("tower_batch", d.tower_batch, "Phase 1b: images per step.")
    flags.DEFINE_float("tower_lr", d.tower_lr, "Phase 1b: peak learning rate.")
    flags.DEFINE_list("tower_presets", list(d.tower_presets), "Phase 1b: ShapesWorld presets, cycled per step.")
    flags.DEFINE_integer("lm_steps", d.lm_steps, "Phase 2: steps of masked-diffusion caption training.")
    flags.DEFINE_integer("batch_size", d.batch_size, "Phase 2: images (answers) per step.")
    flags.DEFINE_float("lr", d.lr, "Phase 2: peak learning rate.")
    flags.DEFINE_integer("warmup_steps", d.warmup_steps, "Linear warmup steps (each phase).")
    flags.DEFINE_float("weight_decay", d.weight_decay, "AdamW weight decay.")
    flags.DEFINE_float("min_lr_ratio", d.min_lr_ratio, "Cosine decay ends at lr * min_lr_ratio.")
    flags.DEFINE_string("curriculum", ",".join(":".join(str(v) for v in st) for st in d.curriculum),
                        "Phase 2 stages 'preset:steps[:answer_length],...' (the last stage runs to the end; "
                        "answer_length 0 = --gen_length), e.g. 'easy:150:4,simple:100,default'.")
    flags.DEFINE_integer("freeze_tower_steps", d.freeze_tower_steps, "Phase 2: first steps with the tower frozen.")
    flags.DEFINE_float("tower_lr_mult", d.tower_lr_mult, "Phase 2: tower LR multiplier once unfrozen (0 = frozen).")
    flags.DEFINE_bool("freeze_projector", d.freeze_projector, "Phase 2: freeze the projector with the tower.")
    flags.DEFINE_integer("finetune_steps", d.finetune_steps, "Phase 3: steps of end-to-end fine-tuning (the "
                         "captioning objective with the tower unfrozen); 0 skips it.")
    flags.DEFINE_float("finetune_lr", d.finetune_lr, "Phase 3: peak learning rate (fresh warmup and cosine decay).")
    flags.DEFINE_float("finetune_tower_lr_mult", d.finetune_tower_lr_mult, "Phase 3: LR multiplier of the tower "
                       "(and of the projector with --freeze_projector).")
    flags.DEFINE_string("finetune_preset", d.finetune_preset, "Phase 3: ShapesWorld preset of the images.")
    flags.DEFINE_float("aux_weight", d.aux_weight, "Phase 2: weight of the object-level tower loss kept on.")
    flags.DEFINE_float("token_rms_weight", d.token_rms_weight, "Weight of a penalty pulling every projected image "
                       "token towards RMS 1 (tower phases, and phases 2-3 wherever the tower trains); 0 = off.")
    flags.DEFINE_enum("attention", d.attention, ["full", "prefix_lm"], "LM attention over [prompt | answer].")
    flags.DEFINE_integer("num_masks", d.num_masks, "Phase 2: maskings per answer per step (shared prompt with "
                         "--attention=prefix_lm).")
    flags.DEFINE_float("pad_weight", d.pad_weight, "Phase 2: loss weight of the EOS padding tokens (1 = LLaDA "
                       "SFT exactly).")
    flags.DEFINE_integer("gen_length", d.gen_length, "Answer length the model fills (caption, eot, EOS padding).")
    flags.DEFINE_multi_string("config_override", [], "Model config override KEY=VALUE (dotted, e.g. "
                              "lm.n_layers=4); repeatable.")
    flags.DEFINE_string("init_checkpoint", None, "Start from this checkpoint's parameters instead of a fresh "
                        "initialisation (e.g. more captioning with --view_steps=0 --tower_steps=0); its config must "
                        "equal the one being trained.")
    flags.DEFINE_enum("init_parts", "all", ["all", "tower"], "With --init_checkpoint: start from all its parameters, "
                      "or only from its vision tower and projector (fresh LM: repeats the captioning phase of its "
                      "recipe with --view_steps=0 --tower_steps=0).")
    flags.DEFINE_integer("log_every", 25, "Log learning curves every this many steps.")
    flags.DEFINE_string("log_jsonl", None, "Also write the learning-curve records to this JSON-lines file.")
    flags.DEFINE_integer("eval_examples", 0, "After training, caption accuracy on this many validation examples.")
    flags.DEFINE_bool("progress", True, "Show progress bars.")
    return flags.FLAGS


def main(argv):
    from absl import logging

    del argv
    F = _FLAGS
    out_dir = Path(F.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SystemExit(f"--out_dir={out_dir} is a file; pass a directory path")
    if out_dir.exists() and any(out_dir.iterdir()) and not F.force:
        raise SystemExit(f"--out_dir={out_dir} exists and is not empty; pass --force to replace it")
    tcfg = TrainConfig(seed=F.seed, view_steps=F.view_steps, view_batch=F.view_batch, view_lr=F.view_lr,
                       view_preset=F.view_preset, view_size=F.view_size, tower_steps=F.tower_steps,
                       tower_batch=F.tower_batch, tower_lr=F.tower_lr,
                       tower_presets=tuple(F.tower_presets), lm_steps=F.lm_steps, batch_size=F.batch_size, lr=F.lr,
                       warmup_steps=F.warmup_steps, weight_decay=F.weight_decay, min_lr_ratio=F.min_lr_ratio,
                       curriculum=parse_curriculum(F.curriculum), freeze_tower_steps=F.freeze_tower_steps,
                       tower_lr_mult=F.tower_lr_mult, aux_weight=F.aux_weight, attention=F.attention,
                       num_masks=F.num_masks, freeze_projector=F.freeze_projector, pad_weight=F.pad_weight,
                       gen_length=F.gen_length, finetune_steps=F.finetune_steps, finetune_lr=F.finetune_lr,
                       finetune_tower_lr_mult=F.finetune_tower_lr_mult, finetune_preset=F.finetune_preset,
                       token_rms_weight=F.token_rms_weight)
    config = tm.toy_config(attention=F.attention)
    if F.config_override:
        config = config_lib.override(config, F.config_override)
    init = None
    if F.init_checkpoint:
        from dcam_jax import checkpoint as ckpt

        init_config, init, _ = ckpt.load_checkpoint(F.init_checkpoint)
        if F.init_parts == "tower":
            # only the tower and projector are taken: those must match, the LM may differ (e.g. a deeper one)
            if (init_config.vision != config.vision
                    or init_config.lm.d_model != config.lm.d_model):
                raise SystemExit(f"--init_checkpoint={F.init_checkpoint} has a different vision tower or projector "
                                 "than the model being trained; with --init_parts=tower they must be equal (the LM "
                                 "may differ)")
        elif init_config != config.replace(attention=tcfg.attention):
            raise SystemExit(f"--init_checkpoint={F.init_checkpoint} has a different model config than the one "
                             "being trained; pass the same --attention / --config_override as when it was trained")
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = toy_tok.save_tokenizer(Path(tmp) / "tokenizer", model_max_length=config.lm.max_seq_len)
        tokenizer = ptext.load_tokenizer(tok_dir)
        logging.info("model %s: %.2fM parameters; training config %s", config.name, config.num_params / 1e6, tcfg)
        log_file = open(F.log_jsonl, "w") if F.log_jsonl else None

        def log(rec):
            logging.info("%s", " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in rec.items()))
            if log_file:
                log_file.write(json.dumps(_json_safe(rec)) + "\n")
                log_file.flush()

        t0 = time.time()
        try:
            params, history = train(tcfg, config, tokenizer, log=log, progress=F.progress, log_every=F.log_every,
                                    params=init, init_parts=F.init_parts)
        finally:
            if log_file:
                log_file.close()
        wall = time.time() - t0
        info = {"trained_by": "python -m dcam_jax.toy.train", "train_config": dataclasses.asdict(tcfg),
                "init_checkpoint": F.init_checkpoint, "init_parts": F.init_parts if F.init_checkpoint else None,
                "train_wall_time_s": round(wall, 1),
                "phase_end_time_s": {r["phase"]: r["time_s"] for r in history},
                "final": _json_safe(history[-1]) if history else None}
        if F.eval_examples:
            from dcam_jax.toy import evaluate

            report = evaluate.evaluate(params, config, tokenizer, num_examples=F.eval_examples,
                                       split="validation", gen_length=tcfg.gen_length, progress=F.progress)
            info["validation"] = report.summary()
            logging.info("validation: %s", report.summary())
        host = jax.device_get(params)
        path = ckpt_save(out_dir, config, host, tok_dir, F.force, info)
    print(f"wrote {path} ({config.num_params / 1e6:.2f}M parameters) after {wall / 60:.1f} min of training")


def _json_safe(rec: dict) -> dict:
    """A log record with NaN metrics (a word class absent from the batch) as None, so the marker is strict JSON."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in rec.items()}


def ckpt_save(out_dir, config, params, tok_dir, force, info):
    """Save with dcam_jax.checkpoint (an empty existing directory is replaced as well)."""
    from dcam_jax import checkpoint as ckpt

    out_dir = Path(out_dir)
    empty = out_dir.is_dir() and not any(out_dir.iterdir())
    return ckpt.save_checkpoint(out_dir, config, params, tokenizer_dir=tok_dir, force=force or empty, info=info)


_FLAGS = None

if __name__ == "__main__":
    from absl import app

    _FLAGS = _flags()
    from dcam_jax.cli import run_tool

    run_tool(main)
