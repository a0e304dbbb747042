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

# This module is the command line and train(), which runs the phases in order (the docstring above is the text of
# --help). TrainConfig and the curriculum helpers live in dcam_jax.toy.train_config, the phases and their shared
# optimiser, example stream and step loop in dcam_jax.toy.train_phases; TrainConfig, the curriculum helpers and
# make_optimizer are importable from here as well.

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from dcam_jax.data import shapes
from dcam_jax.models import config as config_lib
from dcam_jax.models.config import MLLMConfig
from dcam_jax.processing import image as pimg
from dcam_jax.processing import text as ptext
from dcam_jax.toy import model as tm
from dcam_jax.toy import tokenizer as toy_tok
from dcam_jax.toy import tower_heads as th
from dcam_jax.toy import train_phases as phases
from dcam_jax.toy.train_config import TrainConfig, parse_curriculum, preset_at, stage_at  # noqa: F401  (re-exported)
from dcam_jax.toy.train_phases import Params, make_optimizer  # noqa: F401  (re-exported)


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

    run = phases.Run(tcfg=tcfg, config=config, tokenizer=tokenizer, processor=processor, geometry=geometry, ids=ids,
                     mask_key=k_train, emit=emit, progress=progress, log_every=log_every, t_start=time.time())
    heads = th.init_object_heads(k_heads, config.lm.d_model)
    for steps, phase in ((tcfg.view_steps, phases.train_tower_on_views),
                         (tcfg.tower_steps, phases.train_tower_on_images),
                         (tcfg.lm_steps, phases.train_captioning),
                         (tcfg.finetune_steps, phases.finetune_end_to_end)):
        if steps:  # a phase of 0 steps is skipped
            params, heads = phase(run, params, heads)
    return params, history


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
    init = _init_params(F, config.replace(attention=tcfg.attention)) if F.init_checkpoint else None
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
                "shapes_generator": shapes.GENERATOR_VERSION,
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


def _init_params(F, config: MLLMConfig) -> Params:
    """The parameters of ``--init_checkpoint``, checked against the model ``config`` being trained (with
    ``--init_parts=tower`` only its vision tower and projector)."""
    from dcam_jax import checkpoint as ckpt

    init_config, init, _ = ckpt.load_checkpoint(F.init_checkpoint)
    if F.init_parts == "tower":
        # only the tower and projector are taken: those must match, the LM may differ (e.g. a deeper one)
        if (init_config.vision != config.vision
                or init_config.lm.d_model != config.lm.d_model):
            raise SystemExit(f"--init_checkpoint={F.init_checkpoint} has a different vision tower or projector "
                             "than the model being trained; with --init_parts=tower they must be equal (the LM "
                             "may differ)")
    elif init_config != config:
        raise SystemExit(f"--init_checkpoint={F.init_checkpoint} has a different model config than the one "
                         "being trained; pass the same --attention / --config_override as when it was trained")
    return init


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
    _FLAGS = _flags()
    from dcam_jax.tool import run_tool

    run_tool(main)
