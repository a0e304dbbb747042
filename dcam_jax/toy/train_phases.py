"""The training phases of the toy dMLLM and the optimiser, example stream and step loop they share.

Each phase is a function of the run's fixed inputs (:class:`Run`) and the current (model params, object heads)
that returns the trained pair: :func:`train_tower_on_views` (phase 1a), :func:`train_tower_on_images` (1b),
:func:`train_captioning` (2) and :func:`finetune_end_to_end` (3). ``dcam_jax.toy.train.train`` runs them in this
order; the module docstring of ``dcam_jax.toy.train`` describes the recipe.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcam_jax.data import shapes
from dcam_jax.models.config import MLLMConfig
from dcam_jax.processing import image as pimg
from dcam_jax.toy import model as tm
from dcam_jax.toy import tower_heads as th
from dcam_jax.toy.train_config import TrainConfig, preset_at, stage_at

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Run:
    """The fixed inputs every phase of one training run reads.

    Attributes:
      tcfg: the training config.
      config: the model config, with ``tcfg.attention``.
      tokenizer, processor: the toy tokenizer and ``pimg.ImageProcessor(config)``.
      geometry, ids: ``tm.toy_geometry(config)`` and ``tm.prompt_ids(config, tokenizer)``.
      mask_key: PRNG key of the masked-diffusion phases; step s of phase 2 or 3 masks with ``fold_in(mask_key, s)``.
      emit: called with each logged record.
      progress: show tqdm bars.
      log_every: a record every this many steps, and one at the last step of each phase.
      t_start: ``time.time()`` at the start of the run; records carry the seconds since.
    """

    tcfg: TrainConfig
    config: MLLMConfig
    tokenizer: Any
    processor: pimg.ImageProcessor
    geometry: pimg.ImageGeometry
    ids: np.ndarray
    mask_key: jax.Array
    emit: Callable[[dict], None]
    progress: bool
    log_every: int
    t_start: float


# ----------------------------------------------------------------------------------------------------------
# optimiser, examples, step loop


def _schedule(lr: float, warmup: int, steps: int, min_ratio: float):
    warmup = min(warmup, max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, 2), lr * min_ratio)


def make_optimizer(lr: float, warmup: int, steps: int, weight_decay: float, min_ratio: float, clip: float):
    """AdamW (linear warmup, cosine decay to ``lr * min_ratio``) after global-norm clipping."""
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(_schedule(lr, warmup, steps, min_ratio), b1=0.9, b2=0.98,
                                   weight_decay=weight_decay))


def _phase_optimizer(run: Run, lr: float, steps: int):
    """A fresh optimiser for a phase of ``steps`` steps at peak ``lr`` (warmup, decay and clip of the run)."""
    t = run.tcfg
    return make_optimizer(lr, t.warmup_steps, steps, t.weight_decay, t.min_lr_ratio, t.grad_clip)


def _example_indices(seed: int, phase: int, step: int, batch: int) -> range:
    # Phases and seeds draw disjoint example ranges of the train split, so a run is a function of its seed.
    start = ((seed * 8 + phase) << 32) + step * batch
    return range(start, start + batch)


def _host_batch(run: Run, phase: int, step: int, batch: int, preset_name: str, gen_length: int) -> tm.HostBatch:
    """Step ``step``'s host batch of example stream ``phase`` (1: whole-image tower, 2: captioning)."""
    b = shapes.batch("train", _example_indices(run.tcfg.seed, phase, step, batch), shapes.preset(preset_name))
    return tm.make_host_batch(b, run.config, run.tokenizer, run.processor, gen_length)


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


def _step_loop(run: Run, desc: str, steps: int, make_batch: Callable[[int], Any], step: Callable, carry,
               record: Callable[[list, int, float], dict], postfix: dict[str, str]):
    """``carry, out = step(carry, s, make_batch(s))`` for s in [0, steps), the batches built one step ahead.

    Every ``run.log_every`` steps and at the last one, ``record(outs, s, seconds since run.t_start)`` of the
    outputs since the previous record is emitted and shown on the progress bar (its loss and the record keys
    ``postfix`` names). Returns the final carry.
    """
    from tqdm.auto import tqdm

    pre = _Prefetcher(make_batch, steps)
    acc = []
    bar = tqdm(range(steps), desc=desc, disable=not run.progress, dynamic_ncols=True)
    try:
        for s in bar:
            carry, out = step(carry, s, pre.get(s))
            acc.append(jax.device_get(out))
            if (s + 1) % run.log_every == 0 or s + 1 == steps:
                rec = record(acc, s, time.time() - run.t_start)
                acc = []
                bar.set_postfix(loss=f"{rec['loss']:.3f}", **{k: f"{rec[f]:.2f}" for k, f in postfix.items()})
                run.emit(rec)
    finally:
        pre.close()
    return carry


# ----------------------------------------------------------------------------------------------------------
# phase 1: object-level tower pretraining


def _tower_phase(run: Run, params: Params, heads: Params, desc: str, steps: int, lr: float,
                 make_batch: Callable[[int], Any], loss_fn: Callable, record_phase: str) -> tuple[Params, Params]:
    """Train vision + projector + heads on ``loss_fn(params, heads, batch) -> GridOut``, the rest frozen."""
    opt = _phase_optimizer(run, lr, steps)
    trainable = {"vision": params["vision"], "projector": params["projector"], "heads": heads}
    frozen = {k: v for k, v in params.items() if k not in ("vision", "projector")}

    @jax.jit
    def step(trainable, state, batch):
        def f(tr):
            out = loss_fn({**frozen, "vision": tr["vision"], "projector": tr["projector"]}, tr["heads"], batch)
            return out.loss, out
        (_, out), g = jax.value_and_grad(f, has_aux=True)(trainable)
        upd, state = opt.update(g, state, trainable)
        return optax.apply_updates(trainable, upd), state, out

    def loop_step(carry, s, batch):
        trainable, state, out = step(*carry, batch)
        return (trainable, state), out

    trainable, _ = _step_loop(run, desc, steps, make_batch, loop_step, (trainable, opt.init(trainable)),
                              lambda outs, s, t: _tower_record(outs, s + 1, t, record_phase), {"shape": "shape_acc"})
    return {**params, "vision": trainable["vision"], "projector": trainable["projector"]}, trainable["heads"]


def train_tower_on_views(run: Run, params: Params, heads: Params) -> tuple[Params, Params]:
    """Phase 1a: object-level tower pretraining on single ``view_size`` px views (``tcfg.view_steps`` steps).

    Below the model's view size, the tower trains with a 2-D sin-cos position table of the small patch grid,
    which is bilinearly resized to the model's grid at the end. Returns the new (params, heads).
    """
    tcfg, vc = run.tcfg, run.config.vision
    small = tcfg.view_size != vc.image_size
    pre_config = (run.config.replace(vision=dataclasses.replace(vc, image_size=tcfg.view_size)) if small
                  else run.config)
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

    params, heads = _tower_phase(
        run, params, heads, "tower pretraining (single views)", tcfg.view_steps, tcfg.view_lr, view_batch,
        lambda p, h, b: th.view_losses(p, h, pre_config, *b, rms_weight=tcfg.token_rms_weight), "views")
    if small:
        params = {**params, "vision": {**params["vision"], "pos_embed": tm.resize_pos_embed(
            params["vision"]["pos_embed"], vc.grid)}}
    return params, heads


def train_tower_on_images(run: Run, params: Params, heads: Params) -> tuple[Params, Params]:
    """Phase 1b: object-level tower pretraining on whole images in the model's layout (``tcfg.tower_steps`` steps,
    cycling ``tcfg.tower_presets`` step by step). Returns the new (params, heads)."""
    tcfg = run.tcfg

    def image_batch(s):
        hb = _host_batch(run, 1, s, tcfg.tower_batch, tcfg.tower_presets[s % len(tcfg.tower_presets)],
                         tcfg.gen_length)
        return (hb.pixel_values, hb.obj_weights_base, hb.obj_weights_hi, hb.obj_shape, hb.obj_colour,
                hb.obj_centre, hb.obj_relation)

    return _tower_phase(
        run, params, heads, "tower pretraining (images)", tcfg.tower_steps, tcfg.tower_lr, image_batch,
        lambda p, h, b: th.object_losses(p, h, run.config, run.geometry, *b, rms_weight=tcfg.token_rms_weight),
        "images")


# ----------------------------------------------------------------------------------------------------------
# phases 2 and 3: masked-diffusion captioning


def _lm_step_fn(run: Run, opt, freeze: bool) -> Callable:
    """The jitted masked-diffusion step with the tower frozen (``freeze``) or training at LR x ``tower_mult``."""
    tcfg = run.tcfg
    # the penalty only acts where the image tokens get gradients
    rms_weight = 0.0 if freeze and tcfg.freeze_projector else tcfg.token_rms_weight

    @jax.jit
    def lm_step(trainable, state, pix, ans, cls, wb, wh, sh, co, ce, key, tower_mult):
        def loss_fn(tr):
            out = tm.diffusion_loss(tr["model"], run.config, run.geometry, run.ids, pix, ans, cls, key,
                                    attention=tcfg.attention, freeze_tower=freeze,
                                    aux_loss_fn=(lambda blocks: th.object_loss_on_blocks(
                                        blocks, tr["heads"], run.geometry, wb, wh, sh, co, ce).loss)
                                    if tcfg.aux_weight else None,
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


def _lr_mult_tree(params: Params, tower_mult, with_projector: bool) -> Params:
    slow = ("vision", "projector") if with_projector else ("vision",)
    return {k: jax.tree.map(lambda _: tower_mult if k in slow else 1.0, v) for k, v in params.items()}


def _masked_diffusion_phase(run: Run, params: Params, heads: Params, desc: str, record_phase: str, steps: int,
                            lr: float, curriculum: Sequence[tuple[str, int, int]], freeze_tower_steps: int,
                            tower_lr_mult: float) -> tuple[Params, Params]:
    """Masked-diffusion training of the whole model on the phase-2 example stream (steps 0..steps-1) with a fresh
    optimiser; the tower is frozen for the first ``freeze_tower_steps`` steps, then trains at LR x
    ``tower_lr_mult``. Returns the new (params, heads)."""
    tcfg = run.tcfg
    opt = _phase_optimizer(run, lr, steps)
    trainable = {"model": params, "heads": heads}
    step_fns = {}

    def lm_batch(s):
        preset_name, _, length = stage_at(curriculum, s)
        return _host_batch(run, 2, s, tcfg.batch_size, preset_name, length or tcfg.gen_length)

    def loop_step(carry, s, hb):
        freeze = s < freeze_tower_steps
        if freeze not in step_fns:  # compile only the variants this phase uses
            step_fns[freeze] = _lm_step_fn(run, opt, freeze)
        mult = jnp.float32(0.0 if freeze else tower_lr_mult)
        trainable, state, out = step_fns[freeze](
            *carry, hb.pixel_values, hb.answers, hb.token_class, hb.obj_weights_base, hb.obj_weights_hi,
            hb.obj_shape, hb.obj_colour, hb.obj_centre, jax.random.fold_in(run.mask_key, s), mult)
        return (trainable, state), out

    def record(outs, s, elapsed):
        return _lm_record(outs, s + 1, elapsed, preset_at(curriculum, s), record_phase)

    trainable, _ = _step_loop(run, desc, steps, lm_batch, loop_step, (trainable, opt.init(trainable)), record,
                              {"colour": "acc_colour", "shape": "acc_shape"})
    return trainable["model"], trainable["heads"]


def train_captioning(run: Run, params: Params, heads: Params) -> tuple[Params, Params]:
    """Phase 2: masked-diffusion captioning (``tcfg.lm_steps`` steps at ``tcfg.lr``) under ``tcfg.curriculum``,
    the tower frozen for ``tcfg.freeze_tower_steps`` steps and then at ``tcfg.tower_lr_mult`` x the LR."""
    t = run.tcfg
    return _masked_diffusion_phase(run, params, heads, "diffusion captioning", "lm", t.lm_steps, t.lr, t.curriculum,
                                   t.freeze_tower_steps, t.tower_lr_mult)


def finetune_end_to_end(run: Run, params: Params, heads: Params) -> tuple[Params, Params]:
    """Phase 3: the phase-2 objective on ``tcfg.finetune_preset`` images (``tcfg.finetune_steps`` steps at
    ``tcfg.finetune_lr``), the tower unfrozen at ``tcfg.finetune_tower_lr_mult`` x the LR.

    The same example stream and mask keys as phase 2's first steps, so this phase equals a second run started
    from the phase-2 checkpoint (--init_checkpoint with --view_steps=0 --tower_steps=0 ...).
    """
    t = run.tcfg
    return _masked_diffusion_phase(run, params, heads, "end-to-end fine-tuning", "finetune", t.finetune_steps,
                                   t.finetune_lr, ((t.finetune_preset, 0, 0),), 0, t.finetune_tower_lr_mult)


# ----------------------------------------------------------------------------------------------------------
# log records


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
