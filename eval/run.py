r"""One evaluation run: generate answers, explain their words with several CAM methods, score the maps.

Usage (the embedded toy model on 500 ShapesWorld test images)::

    python -m eval.run --checkpoint=toy --dataset=shapes --split=test --num_examples=500 \
        --methods=diffusion_cam,gradcam,llava_cam,tam,uniform --out_dir=runs/toy_shapes

The same vocabulary drawn by a different renderer (PIL ImageDraw; dcam_jax/data/pil_shapes.py), a held-out check::

    python -m eval.run --checkpoint=toy --dataset=pil_shapes --pil_background=dark --pil_size=128 --split=test \
        --num_examples=200 --methods=diffusion_cam,hirescam,uniform --out_dir=runs/toy_pil_dark

The authors' COCO protocol on a converted LaViDa checkpoint::

    python -m eval.run --checkpoint=ckpt/lavida --dataset=coco --data_dir=data/coco14 --split=val2014 \
        --prompt="Describe this image in one sentence." --gen_length=64 --steps=32 --schedule=shift \
        --methods=diffusion_cam,gradcam,llava_cam,tam --out_dir=runs/lavida_coco

What happens for each example (image):

1. The answer is generated ONCE (greedy by default, seeded per example) and shared by every method, so the
   methods explain the same words. Generations are cached in ``--generation_cache_dir`` (default
   ``OUT_DIR/generations``), which is what lets ``eval.sweep`` reuse them across cells.
2. The answer is split into words and each word gets a role:
   - *object* words are scored with Obj-IoU and friends. ShapesWorld: colour, shape and size words; the object a
     word names is found by matching it to the ground-truth objects that have that attribute (the other words
     of its phrase break ties). A word naming an attribute no object has is *hallucinated*: counted, explained,
     never scored. COCO: content words, mapped to a category with a built-in synonym table; GranDf: content
     words, matched to the grounded phrases that contain them.
   - *function* words (articles, conjunctions, pronouns...) get TAM's Func-IoU.
   - other words (relations, punctuation) are explained only with ``--targets=all`` and never scored.
3. Every method explains the words; the maps (grid resolution, [0, 1]) are resized to the mask (OpenCV
   bilinear) and scored in the ``matched`` mode (the named object's mask, TAM's protocol) and the ``max`` mode
   (best IoU over all objects, the Diffusion-CAM authors' code). ``uniform`` (a constant map) and ``random``
   (i.i.d. uniform noise on the token grid) are reference pseudo-methods.

Outputs in ``--out_dir``: ``run_config.json``; ``records-PPPPP-of-NNNNN.jsonl`` (one line per (example,
method, word), then one ``"type": "example"`` line that closes the example's block); ``maps/*.npz`` for the
first ``--save_maps`` examples; at the end ``summary.json``, ``summary.md`` and ``plots/`` (see eval.report).

Crash safety and resuming: each example's lines are appended as one block and fsynced. ``--resume`` skips the
examples whose block is complete in any records file of the directory; a block cut short by a crash is dropped
(with a warning) and redone. Multi-host: example i is handled by process ``i % process_count``; each process
writes its own records file and ``eval.report`` merges them. ``--mesh_model=N`` shards the model over N local
devices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from absl import app, flags, logging

from dcam_jax import fileio

PSEUDO_METHODS = ("uniform", "random")
DATASETS = ("shapes", "coco", "grandf", "pil_shapes")
METRIC_MODES = ("matched", "max")
RECORDS_GLOB = "records-*.jsonl"
RUN_CONFIG = "run_config.json"
# Fields that may differ when a run is resumed (they do not change what a finished example contains).
_RESUMABLE_FIELDS = ("out_dir", "num_examples", "resume", "overwrite", "progress", "save_maps",
                     "generation_cache_dir", "jax_distributed", "mesh_model", "cam_batch_size", "write_report", "plots")

# ----------------------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one run depends on (one field per flag of ``python -m eval.run``; see ``--help``)."""

    checkpoint: str = "toy"
    out_dir: str = ""
    dataset: str = "shapes"
    data_dir: Optional[str] = None
    split: str = "test"
    shapes_preset: str = "default"
    pil_background: str = "dark"
    pil_size: str = "128"
    start_index: int = 0
    num_examples: int = 500
    methods: tuple[str, ...] = ("diffusion_cam", "gradcam", "uniform")
    layer: Optional[int] = None
    probe: Optional[str] = None
    refine: Optional[str] = None
    score: Optional[str] = None
    attention: Optional[str] = None
    aggregation: Optional[str] = None
    grad_rule: Optional[str] = None
    contrast: Optional[str] = None
    hook: Optional[str] = None
    num_noise_samples: Optional[int] = None
    num_trajectory_states: Optional[int] = None
    overrides_apply_to: tuple[str, ...] = ()
    targets: str = "content"
    func_iou: bool = True
    metric_mode: tuple[str, ...] = METRIC_MODES
    prompt: Optional[str] = None
    gen_length: Optional[int] = None
    block_length: Optional[int] = None
    steps: Optional[int] = None
    temperature: Optional[float] = None
    remasking: Optional[str] = None
    schedule: Optional[str] = None
    shift: Optional[float] = None
    seed: int = 0
    dtype: Optional[str] = None
    mesh_model: int = 1
    jax_distributed: bool = False
    cam_batch_size: int = 8
    generation_cache_dir: Optional[str] = None
    save_maps: int = 16
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    write_report: bool = True
    plots: bool = True
    grandf_first_rle_only: bool = False
    coco_ids_file: Optional[str] = None
    faithfulness: bool = False
    faithfulness_steps: int = 16
    faithfulness_baseline: str = "mean"
    faithfulness_batch_size: Optional[int] = None

    def to_json_dict(self) -> dict:
        """The fields as a JSON-ready dict (tuples as lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def _csv(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    return tuple(v.strip() for v in value if v.strip())


def validate(cfg: RunConfig) -> RunConfig:
    """Check a RunConfig before anything is loaded; raise ValueError naming the bad flag and what to do."""
    from dcam_jax.cam import explain as ex

    if not cfg.out_dir:
        raise ValueError("--out_dir is required (e.g. --out_dir=runs/my_run)")
    if cfg.dataset not in DATASETS:
        raise ValueError(f"--dataset={cfg.dataset!r} is unknown; expected one of {DATASETS}")
    if not cfg.methods:
        raise ValueError("--methods is empty; give a comma-separated list such as diffusion_cam,gradcam,uniform")
    known = tuple(ex.METHODS) + PSEUDO_METHODS
    bad = [m for m in cfg.methods if m not in known]
    if bad:
        raise ValueError(f"--methods: unknown method(s) {bad}; expected names from {known}")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise ValueError(f"--methods lists a method twice: {list(cfg.methods)}")
    bad = [m for m in cfg.overrides_apply_to if m not in cfg.methods]
    if bad:
        raise ValueError(f"--overrides_apply_to names {bad}, which are not in --methods={','.join(cfg.methods)}")
    modes = [m for m in cfg.metric_mode if m not in METRIC_MODES]
    if modes or not cfg.metric_mode:
        raise ValueError(f"--metric_mode={','.join(cfg.metric_mode)!r}; expected a non-empty list from "
                         f"{METRIC_MODES}")
    if cfg.targets not in ("content", "all"):
        raise ValueError(f"--targets={cfg.targets!r}; expected 'content' or 'all'")
    if cfg.probe is not None and cfg.probe not in ex.PROBES:
        raise ValueError(f"--probe={cfg.probe!r}; expected one of {ex.PROBES}")
    if cfg.refine is not None:
        from dcam_jax.cam import refine as rf
        try:
            rf.refine_preset(cfg.refine)
        except ValueError as err:
            raise ValueError(f"--refine={cfg.refine!r}: {err}") from None
    from dcam_jax.cam import attribution as attr
    if cfg.grad_rule is not None and cfg.grad_rule not in attr.GRAD_RULES:
        raise ValueError(f"--grad_rule={cfg.grad_rule!r}; expected one of {attr.GRAD_RULES}")
    if cfg.aggregation is not None and cfg.aggregation not in attr.AGGREGATIONS:
        raise ValueError(f"--aggregation={cfg.aggregation!r}; expected one of {attr.AGGREGATIONS}")
    if cfg.hook is not None and cfg.hook not in ("residual", "post_attn_norm"):
        raise ValueError(f"--hook={cfg.hook!r}; expected residual or post_attn_norm")
    if cfg.contrast is not None and cfg.contrast not in ("none", "runner_up") and not cfg.contrast.isdigit():
        raise ValueError(f"--contrast={cfg.contrast!r}; expected none, runner_up or an answer position (an int)")
    if cfg.attention is not None and cfg.attention not in ("full", "prefix_lm"):
        raise ValueError(f"--attention={cfg.attention!r}; expected 'full' or 'prefix_lm'")
    if cfg.faithfulness_baseline not in ("mean", "black"):
        raise ValueError(f"--faithfulness_baseline={cfg.faithfulness_baseline!r}; expected 'mean' or 'black'")
    for name in ("num_examples", "gen_length", "block_length", "steps", "mesh_model", "cam_batch_size",
                 "faithfulness_steps", "faithfulness_batch_size", "num_noise_samples", "num_trajectory_states"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name}={v} must be >= 1")
    for name in ("start_index", "seed", "save_maps"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name}={getattr(cfg, name)} must be >= 0")
    if cfg.temperature is not None and cfg.temperature < 0:
        raise ValueError(f"--temperature={cfg.temperature} must be >= 0")
    if cfg.schedule is not None and cfg.schedule not in ("uniform", "shift"):
        raise ValueError(f"--schedule={cfg.schedule!r}; expected 'uniform' or 'shift'")
    if cfg.remasking is not None and cfg.remasking not in ("low_confidence", "random", "margin", "entropy"):
        raise ValueError(f"--remasking={cfg.remasking!r}; expected low_confidence, random, margin or entropy")
    if cfg.dataset in ("coco", "grandf") and not cfg.data_dir:
        raise ValueError(f"--dataset={cfg.dataset} needs --data_dir=DIR (see --help for the expected layout)")
    if cfg.data_dir and not Path(cfg.data_dir).is_dir():
        raise ValueError(f"--data_dir={cfg.data_dir} does not exist or is not a directory")
    if cfg.dataset == "shapes":
        from dcam_jax.data import shapes
        if cfg.split not in shapes.SPLITS:
            raise ValueError(f"--split={cfg.split!r} for ShapesWorld; expected one of {shapes.SPLITS}")
        if cfg.shapes_preset not in shapes.PRESETS:
            raise ValueError(f"--shapes_preset={cfg.shapes_preset!r}; expected one of {tuple(shapes.PRESETS)}")
    if cfg.dataset == "pil_shapes":
        from dcam_jax.data import pil_shapes, shapes
        if cfg.split not in shapes.SPLITS:
            raise ValueError(f"--split={cfg.split!r} for pil_shapes; expected one of {shapes.SPLITS}")
        if cfg.pil_background not in pil_shapes.BACKGROUND_KINDS:
            raise ValueError(f"--pil_background={cfg.pil_background!r}; expected one of {pil_shapes.BACKGROUND_KINDS}")
        try:
            w, h = pil_shapes.parse_size(cfg.pil_size)
            pil_shapes.PilShapesConfig(width=w, height=h, background=cfg.pil_background)
        except ValueError as err:
            raise ValueError(f"--pil_size={cfg.pil_size!r}: {err}") from None
    if cfg.checkpoint != "toy" and not Path(cfg.checkpoint).is_dir():
        raise ValueError(f"--checkpoint={cfg.checkpoint}: no such directory; pass 'toy' (the embedded model) or a "
                         "directory written by `python -m checkpoints_convert`")
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out_dir={cfg.out_dir} exists and is a file; pass a directory")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pick one")
    return cfg


# ----------------------------------------------------------------------------------------------------------
# flags


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """Define the flags of ``python -m eval.run`` on ``fv`` (tests pass a fresh ``flags.FlagValues()``)."""
    d = RunConfig()
    f = dict(flag_values=fv)
    flags.DEFINE_string("checkpoint", d.checkpoint, "'toy' (the embedded ShapesWorld model) or a converted "
                        "checkpoint directory (python -m checkpoints_convert).", **f)
    flags.DEFINE_string("out_dir", None, "Directory for records, summary and plots (created). Required.", **f)
    flags.DEFINE_enum("dataset", d.dataset, DATASETS, "shapes: procedural ShapesWorld (exact masks, no files "
                      "needed); coco: TAM-format COCO Caption (DATA_DIR/image/{id:012d}.jpg + "
                      "DATA_DIR/seg_label/{id:012d}.png); grandf: GranDf HA GCG annotations with RLE masks; "
                      "pil_shapes: ShapesWorld's vocabulary drawn by a different renderer (PIL ImageDraw, exact "
                      "masks; dcam_jax/data/pil_shapes.py), a held-out check.", **f)
    flags.DEFINE_string("data_dir", None, "Data directory for coco / grandf (see dcam_jax/data/coco.py and "
                        "grandf.py for the layouts).", **f)
    flags.DEFINE_string("split", d.split, "shapes: train | validation | test; coco: annotation split name for the "
                        "optional captions/instances files (e.g. val2014); grandf: train | val | test.", **f)
    flags.DEFINE_string("shapes_preset", d.shapes_preset, "ShapesWorld preset (easy, simple, default, hard); use "
                        "the one the model was trained on.", **f)
    flags.DEFINE_enum("pil_background", d.pil_background, ["dark", "light", "white"], "pil_shapes: background "
                      "kind (dark: dark desaturated solid colours; light: light tinted greys; white).", **f)
    flags.DEFINE_string("pil_size", d.pil_size, "pil_shapes: image size in pixels, 'N' (square) or 'WIDTH,HEIGHT' "
                        "(e.g. 160,128).", **f)
    flags.DEFINE_integer("start_index", d.start_index, "First example index of the dataset to evaluate.", **f)
    flags.DEFINE_integer("num_examples", d.num_examples, "Number of examples (images) to evaluate.", **f)
    flags.DEFINE_list("methods", list(d.methods), "Comma-separated methods: diffusion_cam (the default: "
                      "conservative gradients, per-token gradient x activation), paper (the paper's formulas as "
                      "written), reference_compat (the authors' released code), gradcam (the authors' Grad-CAM "
                      "baseline), llava_cam, tam, layercam, gradcam_pp, hirescam, and the pseudo-methods uniform "
                      "(constant map) and random (uniform noise).", **f)
    flags.DEFINE_integer("layer", None, "Hooked LM block L for gradient methods (default: the method's, "
                         "the model's cam_layer, else n_layers // 3).", **f)
    flags.DEFINE_string("probe", None, "Probe state for gradient methods: decision | trajectory | noise | clean | "
                        "final (default: the method's).", **f)
    flags.DEFINE_string("refine", None, "Refinement preset for gradient methods: default | full | none | akd | "
                        "dacg | cba | sicd | reference_compat | reference_baseline, optionally with field overrides "
                        "NAME:FIELD=VALUE:... (e.g. full:akd_region_level=0.5) (default: the method's).", **f)
    flags.DEFINE_string("score", None, "Score for gradient methods: logprob | logit | max_logit | vocab_sum | "
                        "sum_logits (default: the method's).", **f)
    flags.DEFINE_string("attention", None, "full | prefix_lm for gradient methods (default: the model's).", **f)
    flags.DEFINE_string("aggregation", None, "How gradients and activations make the raw map, for gradient "
                        "methods: gxa (per-token sum of gradient x activation; Diffusion-CAM's default) | gradcam "
                        "(channel weights = mean gradient over the image grid; the paper's formula) | layercam | "
                        "gradcam_pp | channel_relu_mean (the authors' code) (default: the method's).", **f)
    flags.DEFINE_string("grad_rule", None, "Gradient rule of the attribution pass for gradient methods: standard | "
                        "conservative_norm (RMSNorm scales held constant) | conservative (and attention "
                        "probabilities held constant; Diffusion-CAM's default) (default: the method's).", **f)
    flags.DEFINE_string("contrast", None, "Contrastive score for gradient methods: none | runner_up (minus the "
                        "score of the runner-up token at the same position) | an answer position whose token's "
                        "score is subtracted (default: the method's, none).", **f)
    flags.DEFINE_string("hook", None, "Hooked activation for gradient methods: residual (the output of block L, "
                        "the SPEC's A) | post_attn_norm (the MLP input of block L after its RMSNorm, LLaVA-CAM's) "
                        "(default: the method's).", **f)
    flags.DEFINE_integer("num_noise_samples", None, "Probe states per token for --probe=noise.", **f)
    flags.DEFINE_integer("num_trajectory_states", None, "Probe states per token for --probe=trajectory (evenly "
                         "spaced from the start of generation to the decision state).", **f)
    flags.DEFINE_list("overrides_apply_to", [], "Methods that --layer/--probe/--refine/--score/--attention/"
                      "--aggregation/--grad_rule/--contrast/--hook/--num_noise_samples/--num_trajectory_states "
                      "apply to (default: every gradient method "
                      "in --methods; never tam, uniform, random).", **f)
    flags.DEFINE_enum("targets", d.targets, ["content", "all"], "content: explain object words (and function "
                      "words for Func-IoU); all: also every other word (recorded, not scored).", **f)
    flags.DEFINE_bool("func_iou", d.func_iou, "Explain function words and report TAM's Func-IoU.", **f)
    flags.DEFINE_list("metric_mode", list(d.metric_mode), "Obj-IoU modes: matched (the named object, TAM) and/or "
                      "max (best over all objects, the Diffusion-CAM authors).", **f)
    flags.DEFINE_string("prompt", None, "Prompt (default: the model's default prompt). '{focus}' is replaced by "
                        "the example's first grounded phrase (GranDf; the authors' GranDf prompt is 'Describe "
                        "what you see in this image. Focus on {focus}.').", **f)
    flags.DEFINE_integer("gen_length", None, "Answer tokens generated (default: the model's sampling default; "
                         "authors: 64).", **f)
    flags.DEFINE_integer("block_length", None, "Semi-autoregressive block length (default: the model's; one "
                         "block).", **f)
    flags.DEFINE_integer("steps", None, "Denoising steps (default: the model's, else gen_length; authors: 32).", **f)
    flags.DEFINE_float("temperature", None, "Sampling temperature (default: the model's, 0 = greedy).", **f)
    flags.DEFINE_string("remasking", None, "low_confidence | random | margin | entropy (default: the model's).",
                        **f)
    flags.DEFINE_string("schedule", None, "uniform | shift (LaViDa; the authors' protocol) (default: the "
                        "model's).", **f)
    flags.DEFINE_float("shift", None, "Shift of the 'shift' schedule (default: the model's).", **f)
    flags.DEFINE_integer("seed", d.seed, "Seed; example i uses fold_in(key(seed), i) for sampling and noise.", **f)
    flags.DEFINE_string("dtype", None, "Cast the checkpoint to this dtype (e.g. float32); default: stored.", **f)
    flags.DEFINE_integer("mesh_model", d.mesh_model, "Shard the model over this many local devices ('model' "
                         "mesh axis); 1 = no sharding.", **f)
    flags.DEFINE_bool("jax_distributed", d.jax_distributed, "Call jax.distributed.initialize() first (multi-host "
                      "runs; example i goes to process i % process_count).", **f)
    flags.DEFINE_integer("cam_batch_size", d.cam_batch_size, "Probe states per vmapped chunk (memory bound).", **f)
    flags.DEFINE_string("generation_cache_dir", None, "Where generated answers are cached (default: "
                        "OUT_DIR/generations).", **f)
    flags.DEFINE_integer("save_maps", d.save_maps, "Save image, mask and maps of the first N examples "
                         "(maps/*.npz) for eval.report's overlay figures.", **f)
    flags.DEFINE_bool("resume", d.resume, "Continue a run in OUT_DIR: skip examples already complete.", **f)
    flags.DEFINE_bool("overwrite", d.overwrite, "Delete this tool's files in OUT_DIR and start over.", **f)
    flags.DEFINE_bool("progress", d.progress, "Show a progress bar.", **f)
    flags.DEFINE_bool("write_report", d.write_report, "Write summary.json and summary.md at the end.", **f)
    flags.DEFINE_bool("plots", d.plots, "With --write_report, also write plots/*.png.", **f)
    flags.DEFINE_bool("grandf_first_rle_only", d.grandf_first_rle_only, "Reproduce the authors' GranDf quirk of "
                      "decoding only the first RLE of each object.", **f)
    flags.DEFINE_bool("faithfulness", d.faithfulness, "Also measure deletion / insertion curves of every object "
                      "word's map: image patches are removed (or revealed) in the order of the map and the model's "
                      "log-probability of the word (masked, the rest of the answer given) is tracked. Costs "
                      "2 x (steps + 1) forward passes per word and method.", **f)
    flags.DEFINE_integer("faithfulness_steps", d.faithfulness_steps, "Steps of the deletion / insertion curves "
                         "(patches are one token's image area; at most the number of patches).", **f)
    flags.DEFINE_enum("faithfulness_baseline", d.faithfulness_baseline, ["mean", "black"], "Fill of removed "
                      "patches: the image's mean colour or black.", **f)
    flags.DEFINE_integer("faithfulness_batch_size", None, "Perturbed images per forward pass (memory bound; "
                         "default: all 2 x (steps + 1) of a map at once, fine for the toy, too many for 8B models).",
                         **f)
    flags.DEFINE_string("coco_ids_file", None, "Text file with one COCO image id per line to evaluate (in that "
                        "order) instead of every image in DATA_DIR/image.", **f)


def config_from_flags(fv: flags.FlagValues = flags.FLAGS) -> RunConfig:
    """The RunConfig of parsed flags (not yet validated)."""
    kw = {}
    for field in dataclasses.fields(RunConfig):
        if field.name not in fv:
            continue
        v = fv[field.name].value
        if field.name in ("methods", "metric_mode", "overrides_apply_to"):
            v = _csv(v)
        kw[field.name] = v
    if kw.get("out_dir") is None:
        kw["out_dir"] = ""
    return RunConfig(**kw)


def replace_config(cfg: RunConfig, assignments: dict[str, str]) -> RunConfig:
    """``cfg`` with fields set from strings (``{"layer": "3", "refine": "none"}``), typed like the fields.

    Used by eval.sweep for grid cells. ``"none"`` / ``"None"`` sets an optional field to None.
    """
    changes = {}
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    for key, text in assignments.items():
        name = "methods" if key == "method" else key
        if name not in fields:
            raise ValueError(f"unknown run flag {key!r}; expected one of {sorted(fields)}")
        ftype = str(fields[name].type)  # a string: this module uses postponed annotations
        if name in ("methods", "metric_mode", "overrides_apply_to"):
            changes[name] = _csv(text.replace("+", ","))
        elif text in ("None", "none") and ftype.startswith("Optional") and name != "refine":
            changes[name] = None
        elif "bool" in ftype:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"{key}={text!r}: expected true or false")
            changes[name] = text.lower() in ("true", "1")
        elif "int" in ftype:
            try:
                changes[name] = int(text)
            except ValueError:
                raise ValueError(f"{key}={text!r}: expected an integer") from None
        elif "float" in ftype:
            try:
                changes[name] = float(text)
            except ValueError:
                raise ValueError(f"{key}={text!r}: expected a number") from None
        else:
            changes[name] = text
    return dataclasses.replace(cfg, **changes)


# ----------------------------------------------------------------------------------------------------------
# datasets: one item type and word roles for all of them


@dataclasses.dataclass(frozen=True, eq=False)
class Item:
    """One image to evaluate.

    Attributes:
      index: dataset index. example_id: stable string id. image: [H, W, 3] uint8.
      label_map: [H, W] int class ids, 0 = background (``max`` mode). object_masks: [K, H, W] bool per object
      (``matched`` mode). object_labels: [K] class id of each object in label_map. object_names: K names.
      prompt: the prompt to use (None: the model's default). meta: JSON-ready facts for the example record.
      shapes_example: the ShapesWorld Example (None for other datasets).
    """

    index: int
    example_id: str
    image: np.ndarray
    label_map: np.ndarray
    object_masks: np.ndarray
    object_labels: tuple[int, ...]
    object_names: tuple[str, ...]
    prompt: Optional[str]
    meta: dict
    shapes_example: Any = None


@dataclasses.dataclass(frozen=True)
class WordInfo:
    """One word of a generated answer and how it is scored.

    Attributes:
      index: word index in the answer. word: the word. positions: its answer token positions.
      role: "object" (Obj-IoU), "function" (Func-IoU) or "other" (not scored).
      word_class: dataset-specific class (ShapesWorld: colour/shape/size/relation/function; COCO: category name
        or "content"; ...).
      status: "matched" (names known objects), "hallucinated" (ShapesWorld: no object has this attribute),
        "unmatched" (no object found: scored in max mode only), "absent" (COCO: a category missing from the
        mask), "function" or "unscored".
      objects: indices of the objects the word names (into Item.object_masks).
      noun: counts as a noun for Func-IoU's threshold.
    """

    index: int
    word: str
    positions: tuple[int, ...]
    role: str
    word_class: str
    status: str
    objects: tuple[int, ...] = ()
    noun: bool = False


# TAM's function words (scored by Func-IoU) are POS tags CC, DT, EX, MD, POS, PRP, PRP$, UH, WDT, WP, WP$, WRB;
# without a tagger we list the closed-class words of those tags. (What explain leaves out by default is another
# list: dcam_jax.cam.explain.STOP_WORDS.)
TAM_FUNCTION_WORDS = frozenset(
    "and or but nor yet so either neither both a an the this that these those some any each every no another all "
    "there can could may might must shall should will would 's i me you he him she her it we us they them myself "
    "yourself himself herself itself ourselves themselves my your his its our their mine yours hers ours theirs "
    "oh uh um wow which what who whom whose where when why how whatever whichever".split())


class ShapesSource:
    """ShapesWorld as an evaluation source: ``split`` examples from ``start``; exact word -> object alignment."""

    name = "shapes"

    def __init__(self, cfg: RunConfig):
        from dcam_jax.data import shapes

        self.shapes = shapes
        self.split = cfg.split
        self.config = shapes.preset(cfg.shapes_preset)
        self.prompt = cfg.prompt
        self.skipped: list[tuple[str, str]] = []
        self.size = shapes.SPLIT_SIZE

    def __len__(self):
        return self.size

    def item(self, index: int) -> Item:
        """Example ``index`` of the split (object k has label k + 1, in caption order)."""
        s = self.shapes
        ex = s.make_example(s.split_seed(self.split, index), self.config)
        labels = tuple(range(1, ex.num_objects + 1))
        return Item(index=index, example_id=f"shapes-{self.split}-{index}", image=ex.image,
                    label_map=ex.label_map.astype(np.int32), object_masks=ex.masks, object_labels=labels,
                    object_names=tuple(f"{c} {sh}" for c, sh in zip(ex.colours, ex.shapes)), prompt=self.prompt,
                    meta={"reference": ex.caption, "seed": ex.seed, "num_objects": ex.num_objects},
                    shapes_example=ex)

    def words(self, item: Item, words: Sequence[tuple[str, tuple[int, ...]]]) -> list[WordInfo]:
        """Roles of the answer's words (see :func:`shapes_word_infos`)."""
        return shapes_word_infos(item.shapes_example, words)

    def caption_eval(self, item: Item, text: str) -> dict:
        """Caption accuracy of the answer (see :func:`shapes_caption_eval`)."""
        return shapes_caption_eval(item.shapes_example, text)


class PilShapesSource(ShapesSource):
    """PIL-drawn shapes (dcam_jax.data.pil_shapes) in ShapesWorld's vocabulary: ``split`` seeds as ShapesWorld's,
    background ``--pil_background``, size ``--pil_size``; word roles and caption accuracy as for ShapesWorld."""

    name = "pil_shapes"

    def __init__(self, cfg: RunConfig):
        from dcam_jax.data import pil_shapes, shapes

        self.shapes = shapes
        self.pil = pil_shapes
        self.split = cfg.split
        w, h = pil_shapes.parse_size(cfg.pil_size)
        self.config = pil_shapes.PilShapesConfig(width=w, height=h, background=cfg.pil_background)
        self.prompt = cfg.prompt
        self.skipped: list[tuple[str, str]] = []
        self.size = shapes.SPLIT_SIZE

    def item(self, index: int) -> Item:
        """Example ``index`` of the split (object k has label k + 1, in caption order)."""
        ex = self.pil.make_example(self.shapes.split_seed(self.split, index), self.config)
        c = self.config
        labels = tuple(range(1, ex.num_objects + 1))
        return Item(index=index, example_id=f"pil_shapes-{c.background}-{c.width}x{c.height}-{self.split}-{index}",
                    image=ex.image, label_map=ex.label_map.astype(np.int32), object_masks=ex.masks,
                    object_labels=labels,
                    object_names=tuple(f"{col} {sh}" for col, sh in zip(ex.colours, ex.shapes)), prompt=self.prompt,
                    meta={"reference": ex.caption, "seed": ex.seed, "num_objects": ex.num_objects,
                          "background": c.background, "background_rgb": list(self.pil.background_rgb(ex))},
                    shapes_example=ex)


def _phrases(classes: Sequence[Optional[str]]) -> list[int]:
    """Phrase id of each word (-1 for words outside object phrases), grouping like shapes.parse_caption."""
    slot = {"size": 0, "colour": 1, "shape": 2}
    out, pid, filled = [], -1, None
    for c in classes:
        if c in slot:
            if filled is None or slot[c] in filled:
                pid += 1
                filled = set()
            filled.add(slot[c])
            out.append(pid)
            if c == "shape":
                filled = None
        else:
            filled = None
            out.append(-1)
    return out


def shapes_word_infos(example, words: Sequence[tuple[str, tuple[int, ...]]]) -> list[WordInfo]:
    """Align the words of a generated caption with the objects of a ShapesWorld example.

    A colour / shape / size word names the objects that have that attribute. When several objects have it (only
    in presets with repeated attributes), the other attribute words of the same phrase ("red circle") pick the
    objects that agree with most of them; a remaining tie keeps all tied objects (their masks are united in
    matched mode). A word whose attribute no object has is "hallucinated".

    words: [(word, positions)] from dcam_jax.cam.explain.group_words. Returns one WordInfo per word.
    """
    from dcam_jax.data import shapes

    lower = [w.lower() for w, _ in words]
    classes = [shapes.WORD_CLASS.get(w) for w in lower]
    phrase = _phrases(classes)
    attrs = {"colour": example.colours, "shape": example.shapes, "size": example.sizes}
    out = []
    for k, ((w, pos), lw, cls) in enumerate(zip(words, lower, classes)):
        if cls in attrs:
            cands = [j for j, v in enumerate(attrs[cls]) if v == lw]
            if not cands:
                out.append(WordInfo(k, w, pos, "object", cls, "hallucinated", (), cls == "shape"))
                continue
            mates = [(classes[q], lower[q]) for q in range(len(words))
                     if q != k and phrase[q] == phrase[k] and phrase[k] >= 0]
            agree = [sum(attrs[c][j] == v for c, v in mates) for j in cands]
            best = max(agree)
            objs = tuple(j for j, a in zip(cands, agree) if a == best)
            out.append(WordInfo(k, w, pos, "object", cls, "matched", objs, cls == "shape"))
        elif cls == "function":
            out.append(WordInfo(k, w, pos, "function", cls, "function"))
        else:
            out.append(WordInfo(k, w, pos, "other", cls or "other", "unscored"))
    return out


def shapes_caption_eval(example, text: str) -> dict:
    """Caption accuracy of a generated caption against a ShapesWorld example.

    Phrases of the caption (shapes.parse_caption) are assigned one-to-one to the objects so that the number of
    agreeing attributes is largest (:func:`dcam_jax.data.shapes.match_phrases`). Per object: colour right, shape
    right, both (bound).
    Returns counts: objects, phrases, colour_correct, shape_correct, bound_correct, all_correct (as many phrases
    as objects and every object bound correctly), exact (the caption equals the reference).
    """
    from dcam_jax.data import shapes

    phrases = shapes.parse_caption(text)
    n, m = example.num_objects, len(phrases)
    pairs = [(i, j) for i, j in enumerate(shapes.match_phrases(example.colours, example.shapes, phrases)) if j >= 0]
    colour_ok = sum(phrases[j][1] == example.colours[i] for i, j in pairs)
    shape_ok = sum(phrases[j][2] == example.shapes[i] for i, j in pairs)
    bound = sum(phrases[j][1] == example.colours[i] and phrases[j][2] == example.shapes[i] for i, j in pairs)
    return {"objects": n, "phrases": m, "colour_correct": colour_ok, "shape_correct": shape_ok,
            "bound_correct": bound, "all_correct": bool(m == n and bound == n),
            "exact": " ".join(text.lower().split()) == example.caption}


class GroundedSource:
    """COCO or GranDf (dcam_jax.data.coco / grandf) as an evaluation source."""

    def __init__(self, cfg: RunConfig):
        self.name = cfg.dataset
        self.prompt = cfg.prompt
        if cfg.dataset == "coco":
            from dcam_jax.data import coco

            ids = None
            if cfg.coco_ids_file:
                p = Path(cfg.coco_ids_file)
                if not p.is_file():
                    raise ValueError(f"--coco_ids_file={p} does not exist")
                try:
                    ids = [int(line) for line in p.read_text().split() if line.strip()]
                except ValueError:
                    raise ValueError(f"--coco_ids_file={p} must hold one integer image id per line") from None
            self.reader = coco.CocoCaptions(cfg.data_dir, split=cfg.split, ids=ids)
        else:
            from dcam_jax.data import grandf

            self.reader = grandf.GranDf(cfg.data_dir, split=cfg.split, first_rle_only=cfg.grandf_first_rle_only)
        self.skipped = list(self.reader.skipped)

    def __len__(self):
        return len(self.reader)

    def item(self, index: int) -> Item:
        """Raises dcam_jax.data.coco.SkipImage for an image that cannot be evaluated."""
        g = self.reader[index]
        prompt = self.prompt
        if prompt is not None and "{focus}" in prompt:
            if not g.focus:
                raise ValueError(f"--prompt uses {{focus}} but {g.example_id} has no grounded phrase")
            prompt = prompt.replace("{focus}", g.focus)
        masks = np.stack([o.mask for o in g.objects]) if g.objects else np.zeros((0,) + g.label_map.shape, bool)
        return Item(index=index, example_id=g.example_id, image=g.image, label_map=g.label_map.astype(np.int32),
                    object_masks=masks, object_labels=tuple(o.label for o in g.objects),
                    object_names=tuple(o.name for o in g.objects), prompt=prompt,
                    meta={"reference": g.captions[0] if g.captions else None, "source": g.source,
                          "num_objects": len(g.objects)})

    def words(self, item: Item, words: Sequence[tuple[str, tuple[int, ...]]]) -> list[WordInfo]:
        """Roles of the answer's words: function words (TAM's closed classes), content words as object words
        (COCO: matched through the category synonym table, "absent" when the category is not in the mask,
        "unmatched" when the word names no category; GranDf: matched to the phrases containing the word), the
        rest unscored."""
        from dcam_jax.cam import explain as ex
        from dcam_jax.data import coco

        strs = [w for w, _ in words]
        out = []
        for k, (w, pos) in enumerate(words):
            lw = coco.normalize_word(w)
            if not lw:
                out.append(WordInfo(k, w, pos, "other", "punctuation", "unscored"))
            elif lw in TAM_FUNCTION_WORDS or w.lower() in TAM_FUNCTION_WORDS:
                out.append(WordInfo(k, w, pos, "function", "function", "function"))
            elif not ex.is_content_word(w):
                out.append(WordInfo(k, w, pos, "other", "other", "unscored"))
            elif self.name == "coco":
                cat, objs = self.reader.objects_for_word(_as_grounded(item), strs, k)
                objs = tuple(j for j in objs if item.object_masks[j].any())
                if cat is None:
                    out.append(WordInfo(k, w, pos, "object", "content", "unmatched", (), True))
                else:
                    status = "matched" if objs else "absent"
                    out.append(WordInfo(k, w, pos, "object", coco.COCO_CATEGORIES.get(cat, str(cat)), status,
                                        objs, True))
            else:
                objs = tuple(j for j in self.reader.objects_for_word(_as_grounded(item), w)
                             if item.object_masks[j].any())
                out.append(WordInfo(k, w, pos, "object", "content", "matched" if objs else "unmatched", objs, True))
        return out

    def caption_eval(self, item: Item, text: str) -> None:
        """No caption accuracy for real photos (there is no closed vocabulary to check against)."""
        return None


def _as_grounded(item: Item):
    from dcam_jax.data.coco import GroundedExample, GroundedObject

    objs = tuple(GroundedObject(l, n, m) for l, n, m in zip(item.object_labels, item.object_names,
                                                             item.object_masks))
    return GroundedExample(item.example_id, item.image, item.label_map, objs)


def open_source(cfg: RunConfig):
    """The evaluation source of ``cfg.dataset`` (ShapesSource, PilShapesSource or GroundedSource)."""
    if cfg.dataset == "shapes":
        return ShapesSource(cfg)
    if cfg.dataset == "pil_shapes":
        return PilShapesSource(cfg)
    return GroundedSource(cfg)


# ----------------------------------------------------------------------------------------------------------
# generation cache


@dataclasses.dataclass(frozen=True)
class CachedGeneration:
    """The parts of a dcam_jax.api.Generation that explanations need (tokens [G], commit_step [G], ...)."""

    text: str
    tokens: np.ndarray
    token_strings: list[str]
    num_valid: int
    commit_step: np.ndarray
    num_steps: int

    def to_json(self) -> dict:
        """JSON-ready dict (lists of ints)."""
        return {"text": self.text, "tokens": [int(t) for t in self.tokens], "token_strings": list(self.token_strings),
                "num_valid": int(self.num_valid), "commit_step": [int(c) for c in self.commit_step],
                "num_steps": int(self.num_steps)}

    @classmethod
    def from_json(cls, d: dict) -> "CachedGeneration":
        """Inverse of :meth:`to_json`."""
        return cls(d["text"], np.asarray(d["tokens"], np.int32), list(d["token_strings"]), int(d["num_valid"]),
                   np.asarray(d["commit_step"], np.int32), int(d["num_steps"]))


def sampling_config(cfg: RunConfig, model):
    """The model's default SamplingConfig with the sampling flags the user set."""
    from dcam_jax import api

    base = api.default_sampling(model.config)
    changes = {k: getattr(cfg, k) for k in ("gen_length", "block_length", "steps", "temperature", "remasking",
                                            "schedule", "shift") if getattr(cfg, k) is not None}
    return dataclasses.replace(base, **changes)


def generation_key(cfg: RunConfig, checkpoint_id: str, sampling) -> tuple[str, dict]:
    """(hash, description) of everything that decides a generated answer (sampling: the SamplingConfig)."""
    samp = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(sampling).items()}
    desc = {"checkpoint": checkpoint_id, "dtype": cfg.dtype, "dataset": cfg.dataset, "split": cfg.split,
            "data_dir": str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None,
            "shapes_preset": cfg.shapes_preset if cfg.dataset == "shapes" else None, "prompt": cfg.prompt,
            "sampling": samp, "seed": cfg.seed}
    if cfg.dataset == "pil_shapes":  # only here, so that the other datasets' keys (and caches) stay as they were
        from dcam_jax.data import pil_shapes

        w, h = pil_shapes.parse_size(cfg.pil_size)  # "128" and "128,128" are the same images
        desc["pil_background"], desc["pil_size"] = cfg.pil_background, f"{w}x{h}"
    h = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]
    return h, desc


class GenerationCache:
    """Generated answers by example id, backed by an append-only JSONL file per generation setting.

    directory: where ``{hash}.json`` (the settings) and ``{hash}.pNNNNN.jsonl`` (answers written by process N)
    live. Every process reads all processes' files; a torn last line (a crash while writing) is ignored.
    """

    def __init__(self, directory: Path, key: str, desc: dict, process_index: int = 0):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = key
        info = self.directory / f"{key}.json"
        if not info.exists():
            fileio.write_text(info, json.dumps(desc, indent=2, sort_keys=True) + "\n")
        self.path = self.directory / f"{key}.p{process_index:05d}.jsonl"
        self.entries: dict[str, CachedGeneration] = {}
        for p in sorted(self.directory.glob(f"{key}.p*.jsonl")):
            for line in p.read_text().splitlines():
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn line; the example is simply generated again
                self.entries[d["example_id"]] = CachedGeneration.from_json(d["generation"])

    def get(self, example_id: str) -> Optional[CachedGeneration]:
        """The cached answer of ``example_id`` or None."""
        return self.entries.get(example_id)

    def put(self, example_id: str, gen: CachedGeneration) -> None:
        """Cache an answer (appended to this process's file and fsynced)."""
        self.entries[example_id] = gen
        _append_block(self.path, json.dumps({"example_id": example_id, "generation": gen.to_json()}) + "\n")


# ----------------------------------------------------------------------------------------------------------
# crash-safe record files


def _append_block(path: Path, text: str) -> None:
    """Append ``text`` with one write, then flush and fsync, so a block is on disk before the next begins."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def records_path(out_dir: Path, process_index: int, process_count: int) -> Path:
    """``OUT_DIR/records-PPPPP-of-NNNNN.jsonl``: the records file process P of N appends to."""
    return Path(out_dir) / f"records-{process_index:05d}-of-{process_count:05d}.jsonl"


@dataclasses.dataclass
class ScanResult:
    """What a records file holds: completed example indices, the byte length of its complete blocks, and the
    number of lines of an incomplete last block."""

    done: set
    good_bytes: int
    dropped_lines: int


def scan_records(path: Path, *, repair: bool) -> ScanResult:
    """Read a records file block by block (word lines closed by an "example" line).

    A torn or unclosed last block (a crash while writing) is reported in ``dropped_lines``; with ``repair`` the
    file is truncated to its complete blocks and a warning says so. A malformed line *followed by* complete
    blocks is corruption, not a crash, and raises ValueError.
    """
    done, good, pending = set(), 0, 0
    if not path.exists():
        return ScanResult(done, 0, 0)
    data = path.read_bytes()
    offset, bad_at = 0, None
    for raw in data.splitlines(keepends=True):
        end = offset + len(raw)
        try:
            if not raw.endswith(b"\n"):
                raise ValueError("no newline")
            rec = json.loads(raw)
        except ValueError:
            bad_at = bad_at if bad_at is not None else offset
            pending += 1
            offset = end
            continue
        if bad_at is not None:
            raise ValueError(f"{path} is corrupt: a malformed line at byte {bad_at} is followed by valid records; "
                             "this is not a torn write from a crash. Move the file away and rerun with --resume.")
        pending += 1
        if rec.get("type") == "example":
            done.add(int(rec["example"]))
            good, pending = end, 0
        offset = end
    if pending:
        msg = (f"{path}: dropping {pending} line(s) after byte {good}: the last example block is incomplete (the "
               "previous run stopped while writing it); that example will be redone")
        if repair:
            logging.warning(msg)
            with open(path, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
        else:
            logging.info(msg.replace("dropping", "ignoring"))
    return ScanResult(done, good, pending)


# ----------------------------------------------------------------------------------------------------------
# per-example work


def cam_config_for(method: str, cfg: RunConfig):
    """The CamConfig of a gradient method or TAM under the run's overrides (None for pseudo-methods)."""
    from dcam_jax.cam import explain as ex
    from dcam_jax.cam import methods

    if method in PSEUDO_METHODS:
        return None
    kw: dict[str, Any] = {"method": method, "batch_size": cfg.cam_batch_size}
    # the gradient knobs apply to methods whose maps come from probe states (not to TAM)
    applies = methods.get(method).has_states and (not cfg.overrides_apply_to or method in cfg.overrides_apply_to)
    if applies:
        for name in ("layer", "probe", "refine", "score", "attention", "aggregation", "grad_rule", "hook"):
            if getattr(cfg, name) is not None:
                kw[name] = getattr(cfg, name)
        if cfg.contrast is not None:
            kw["contrast"] = int(cfg.contrast) if cfg.contrast.isdigit() else cfg.contrast
        if cfg.num_noise_samples is not None:
            kw["num_noise_samples"] = cfg.num_noise_samples
        if cfg.num_trajectory_states is not None:
            kw["num_trajectory_states"] = cfg.num_trajectory_states
    return ex.CamConfig(**kw)


def method_key(key, method: str):
    """The PRNG key of ``method`` for one example: ``key`` folded with a hash of the method's name."""
    import jax

    return jax.random.fold_in(key, zlib.crc32(method.encode()) & 0x7FFFFFFF)


def _map_stats(m: np.ndarray) -> dict:
    peak = np.unravel_index(int(np.argmax(m)), m.shape)
    return {"map_mean": float(m.mean()), "map_max": float(m.max()), "peak": [int(peak[0]), int(peak[1])]}


def score_word(map_hw: np.ndarray, item: Item, info: WordInfo, modes: Sequence[str]) -> dict:
    """Metrics of one object word's map (at grid resolution, [0, 1]) in the requested modes.

    matched: against the union mask of the objects the word names (absent when it names none); max: against the
    label map (absent for hallucinated words). Returns {"matched": dict | None, "max": dict | None,
    "otsu_threshold": int at mask resolution}.
    """
    from dcam_jax import metrics

    out: dict[str, Any] = {}
    if "matched" in modes:
        if info.status == "matched" and info.objects:
            union = np.any(item.object_masks[list(info.objects)], axis=0).astype(np.uint8)
            rec = metrics.map_metrics(map_hw, union, mode="matched", label=1)
            rec["label"] = [int(item.object_labels[j]) for j in info.objects]
            out["matched"] = rec
        else:
            out["matched"] = None
    if "max" in modes:
        out["max"] = (metrics.map_metrics(map_hw, item.label_map, mode="max")
                      if info.status != "hallucinated" else None)
    big = metrics.resize_map(map_hw, item.label_map.shape)
    out["otsu_threshold"] = int(metrics.otsu_threshold(metrics.to_uint8(big)))
    return out


def pseudo_maps(method: str, n: int, grid_hw: tuple[int, int], seed: int, index: int) -> np.ndarray:
    """Maps of a pseudo-method: "uniform" (all ones) or "random" (uniform noise, deterministic in seed and
    example index). -> [n, *grid_hw] float32."""
    if method == "uniform":
        return np.ones((n,) + tuple(grid_hw), np.float32)
    rng = np.random.default_rng([seed, index, 7])
    return rng.random((n,) + tuple(grid_hw), dtype=np.float32)


@dataclasses.dataclass
class Context:
    """What one run shares across examples: the model, CamConfigs, caches and counters."""

    cfg: RunConfig
    model: Any
    source: Any
    cams: dict
    cache: GenerationCache
    sampling: Any
    key: Any
    process_index: int
    calls: dict = dataclasses.field(default_factory=lambda: {"generate": 0, "explain": 0})


def process_example(ctx: Context, index: int) -> tuple[list[dict], dict, Optional[dict]]:
    """Generate (or reuse) the answer of example ``index``, explain its words with every method and score them.

    Returns (word records, the example record, saved maps or None).
    """
    import jax

    from dcam_jax import api
    from dcam_jax.cam import explain as ex
    from dcam_jax.data.coco import SkipImage

    cfg = ctx.cfg
    t0 = time.time()
    try:
        item = ctx.source.item(index)
    except SkipImage as e:
        return [], {"type": "example", "example": index, "example_id": e.example_id, "skipped": e.reason,
                    "process": ctx.process_index}, None
    model = ctx.model
    pre = api.prepare(model, item.image, item.prompt)
    key = jax.random.fold_in(ctx.key, index)
    gen = ctx.cache.get(item.example_id)
    if gen is None:
        g = api.generate(model, item.image, item.prompt, key=key, prepared=pre, sampling=ctx.sampling)
        ctx.calls["generate"] += 1
        gen = CachedGeneration(g.text, np.asarray(g.tokens), list(g.token_strings), int(g.num_valid),
                               np.asarray(g.commit_step), int(g.num_steps))
        ctx.cache.put(item.example_id, gen)
    words = ex.group_words(gen.token_strings[:gen.num_valid]) if gen.num_valid else []
    infos = ctx.source.words(item, words)
    explain = [w for w in infos if w.role == "object" or (w.role == "function" and cfg.func_iou)
               or cfg.targets == "all"]
    example = {"type": "example", "example": index, "example_id": item.example_id, "process": ctx.process_index,
               "answer": gen.text, "num_answer_tokens": gen.num_valid, "skipped": None, **item.meta,
               "words": [w.word for w in infos],
               "counts": _counts(infos), "hallucinated": [w.word for w in infos if w.status == "hallucinated"],
               "caption_eval": ctx.source.caption_eval(item, gen.text)}
    records: list[dict] = []
    saved = {"image": item.image, "label_map": item.label_map, "answer": gen.text, "maps": {}} \
        if index - cfg.start_index < cfg.save_maps else None
    if explain:
        view_hw = pre.layout.shape(pre.layout.default_view)
        unique = list(dict.fromkeys(w.word for w in explain))
        all_maps: dict[str, np.ndarray] = {}
        for method in cfg.methods:
            cam = ctx.cams[method]
            if cam is None:
                maps = pseudo_maps(method, len(explain), view_hw, cfg.seed, index)
                scores = [None] * len(explain)
            else:
                e = api.explain_prepared(model, pre, gen.tokens, gen.token_strings, gen.num_valid, unique, cam,
                                         commit_step=gen.commit_step, num_steps=gen.num_steps,
                                         key=method_key(key, method), text=gen.text)
                ctx.calls["explain"] += 1
                by_pos = {tuple(p): j for j, p in enumerate(e.positions)}
                missing = [w.word for w in explain if tuple(w.positions) not in by_pos]
                if missing:
                    raise RuntimeError(f"{method}: explain() returned no map for the words {missing} of "
                                       f"{gen.text!r} (its targets were {e.positions}); this is a bug")
                maps = np.stack([e.maps[by_pos[tuple(w.positions)]] for w in explain])
                scores = [float(e.scores[by_pos[tuple(w.positions)]]) for w in explain]
            records.extend(_score_method(method, maps, scores, item, explain, cfg))
            all_maps[method] = maps
            if saved is not None:
                saved["maps"][method] = maps.astype(np.float16)
        if cfg.faithfulness:
            _add_faithfulness(model, item, pre, gen, explain, all_maps, records, cfg)
        if saved is not None:
            saved["words"] = [w.word for w in explain]
            saved["roles"] = [w.role for w in explain]
            saved["status"] = [w.status for w in explain]
    example["seconds"] = round(time.time() - t0, 3)
    return records, example, saved


def _add_faithfulness(model, item: Item, pre, gen: CachedGeneration, explain: Sequence[WordInfo],
                      all_maps: dict, records: list[dict], cfg: RunConfig) -> None:
    """Deletion / insertion AUCs of every object word's map (all methods scored on the same perturbations' scorer).

    Adds to each object word record ``faithfulness``: {deletion_auc, insertion_auc, full_score, baseline_score,
    fractions, deletion, insertion} (log-probabilities of the word, its positions masked, and the two curves over
    the fraction of the image perturbed; see dcam_jax.cam.faithfulness).
    """
    from dcam_jax.cam import faithfulness as fa

    by_key = {(r["method"], r["word_index"]): r for r in records}
    methods = list(all_maps)
    for j, w in enumerate(explain):
        if w.role != "object":
            continue
        curves = fa.word_faithfulness(model, item.image, pre.prompt_ids, gen.tokens, w.positions,
                                      np.stack([all_maps[m][j] for m in methods]), num_steps=cfg.faithfulness_steps,
                                      baseline=cfg.faithfulness_baseline,
                                      batch_size=cfg.faithfulness_batch_size)
        for m, c in zip(methods, curves):
            by_key[(m, w.index)]["faithfulness"] = {
                "deletion_auc": float(c.deletion_auc), "insertion_auc": float(c.insertion_auc),
                "full_score": float(c.deletion[0]), "baseline_score": float(c.insertion[0]),
                "fractions": [round(float(v), 5) for v in c.fractions],
                "deletion": [round(float(v), 5) for v in c.deletion],
                "insertion": [round(float(v), 5) for v in c.insertion]}


def _counts(infos: Sequence[WordInfo]) -> dict:
    c: dict[str, int] = {}
    for w in infos:
        key = w.status if w.role == "object" else w.role
        c[key] = c.get(key, 0) + 1
    c["object_words"] = sum(w.role == "object" for w in infos)
    return c


def _score_method(method: str, maps: np.ndarray, scores: Sequence[Optional[float]], item: Item,
                  explain: Sequence[WordInfo], cfg: RunConfig) -> list[dict]:
    from dcam_jax import metrics

    recs, thresholds = [], []
    for w, m, s in zip(explain, maps, scores):
        rec = {"type": "word", "example": item.index, "example_id": item.example_id, "method": method,
               "word": w.word, "word_index": w.index, "positions": list(w.positions), "role": w.role,
               "word_class": w.word_class, "status": w.status, "objects": list(w.objects),
               "score": s, **_map_stats(m)}
        if w.role == "object":
            rec.update(score_word(m, item, w, cfg.metric_mode))
            if w.noun:
                thresholds.append(rec["otsu_threshold"])
        recs.append(rec)
    # TAM's Func-IoU: the share of a function word's map (token resolution) below the mean noun threshold
    for rec, w, m in zip(recs, explain, maps):
        if w.role == "function":
            rec["func_iou"] = float(metrics.func_iou(m[None], thresholds)[0]) if thresholds else None
    return recs


# ----------------------------------------------------------------------------------------------------------
# the run


def init_distributed(cfg: RunConfig) -> None:
    """jax.distributed.initialize() once, for --jax_distributed (before any other JAX call of the process)."""
    import jax

    if cfg.jax_distributed and not jax.distributed.is_initialized():
        jax.distributed.initialize()  # coordinator and process ids come from the cluster environment


def load_model(cfg: RunConfig):
    """load_pretrained(cfg.checkpoint) with the optional dtype cast and model-axis mesh."""
    import jax

    from dcam_jax import api

    mesh = None
    if cfg.mesh_model > 1:
        devs = jax.local_devices()
        if cfg.mesh_model > len(devs):
            raise ValueError(f"--mesh_model={cfg.mesh_model} but this host has only {len(devs)} devices")
        mesh = jax.sharding.Mesh(np.asarray(devs[:cfg.mesh_model]), ("model",))
    return api.load_pretrained(cfg.checkpoint, dtype=cfg.dtype, mesh=mesh)


def checkpoint_id(cfg: RunConfig) -> str:
    """'toy' or the checkpoint's absolute path (part of the generation cache key)."""
    return "toy" if cfg.checkpoint == "toy" else str(Path(cfg.checkpoint).resolve())


def _prepare_out_dir(cfg: RunConfig, process_index: int) -> Path:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob(RECORDS_GLOB))
    conf = out / RUN_CONFIG
    if cfg.overwrite:
        if process_index == 0:
            for p in existing + [conf, out / "summary.json", out / "summary.md"]:
                if p.exists():
                    p.unlink()
            for sub in ("maps", "plots"):
                for p in (out / sub).glob("*") if (out / sub).is_dir() else []:
                    p.unlink()
        return out
    if existing and not cfg.resume:
        raise ValueError(f"--out_dir={out} already holds results ({existing[0].name}, ...); pass --resume to "
                         "continue that run or --overwrite to start over")
    if cfg.resume and conf.exists():
        old = json.loads(conf.read_text())
        new = cfg.to_json_dict()
        diff = [k for k in new if k not in _RESUMABLE_FIELDS and k in old and old[k] != new[k]]
        if diff:
            raise ValueError(f"--resume: the run in {out} used different settings for {diff} (was "
                             f"{[old[k] for k in diff]}, now {[new[k] for k in diff]}); resume with the same flags "
                             "or use a new --out_dir")
    return out


def run(cfg: RunConfig, *, model=None, source=None, generation_caches: Optional[dict] = None,
        on_example: Optional[Callable[[dict], None]] = None) -> dict:
    """Run one evaluation (see the module docstring). Returns a dict with the summary (process 0, when
    ``cfg.write_report``), counts and the call counters.

    model: an already loaded dcam_jax.api.Model (eval.sweep and tests pass one); None loads ``cfg.checkpoint``.
    source: an already opened :func:`open_source` of ``cfg`` (None opens it).
    generation_caches: {key: GenerationCache} shared between runs of one process (eval.sweep).
    on_example: called with each example record after its block is on disk.
    """
    import jax

    cfg = validate(cfg)
    init_distributed(cfg)
    pidx, pcount = jax.process_index(), jax.process_count()
    if source is None:
        source = open_source(cfg)
    if model is None:
        model = load_model(cfg)
    from dcam_jax.cam import explain as ex

    cams = {m: cam_config_for(m, cfg) for m in cfg.methods}
    for m, cam in cams.items():
        if cam is not None:
            ex.resolve(cam, model.config)  # bad layers etc. fail here, before any work or folder
    out = _prepare_out_dir(cfg, pidx)
    sampling = sampling_config(cfg, model)
    gkey, gdesc = generation_key(cfg, checkpoint_id(cfg), sampling)
    if pidx == 0:
        info = cfg.to_json_dict()
        info["effective_sampling"] = gdesc["sampling"]
        info["model"] = {"name": model.config.name, "num_params": int(model.config.num_params),
                         "checkpoint_id": checkpoint_id(cfg)}
        info["dataset_skipped"] = [{"example_id": e, "reason": r} for e, r in source.skipped]
        info["process_count"] = pcount
        fileio.write_text(out / RUN_CONFIG, json.dumps(info, indent=2) + "\n")
    if source.skipped:
        logging.warning("%s: %d images left out up front (see run_config.json dataset_skipped), e.g. %s",
                        cfg.dataset, len(source.skipped), source.skipped[0])
    caches = generation_caches if generation_caches is not None else {}
    cache_dir = Path(cfg.generation_cache_dir) if cfg.generation_cache_dir else out / "generations"
    ckey = f"{cache_dir.resolve()}/{gkey}"
    if ckey not in caches:
        caches[ckey] = GenerationCache(cache_dir, gkey, gdesc, pidx)
    own = records_path(out, pidx, pcount)
    done: set = set()
    for p in sorted(out.glob(RECORDS_GLOB)):
        done |= scan_records(p, repair=(p == own)).done
    last = min(cfg.start_index + cfg.num_examples, len(source))
    if cfg.start_index >= len(source):
        raise ValueError(f"--start_index={cfg.start_index} is past the end of the dataset ({len(source)} examples)")
    mine = [i for i in range(cfg.start_index, last) if i % pcount == pidx]
    todo = [i for i in mine if i not in done]
    ctx = Context(cfg, model, source, cams, caches[ckey], sampling, jax.random.key(cfg.seed), pidx)
    if (out / "maps").exists() or cfg.save_maps:
        (out / "maps").mkdir(exist_ok=True)
    bar = _progress(cfg, total=len(mine), initial=len(mine) - len(todo))
    n_words = 0
    try:
        for i in todo:
            records, example, saved = process_example(ctx, i)
            block = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
            block += json.dumps(example, allow_nan=False) + "\n"
            _append_block(own, block)
            if saved is not None:
                _save_maps(out / "maps" / f"{example['example_id']}.npz", saved)
            n_words += len(records)
            if on_example is not None:
                on_example(example)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(example.get("answer") or f"skipped: {example.get('skipped')}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    if pcount > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dcam_eval_run_done")
    result = {"out_dir": str(out), "examples_done": len(todo), "examples_skipped_resume": len(mine) - len(todo),
              "records_written": n_words, "calls": dict(ctx.calls)}
    if pidx == 0 and cfg.write_report:
        from eval import report

        summary = report.build_summary([out])
        report.write_outputs(out, summary, plots=cfg.plots)
        result["summary"] = summary
    return result


def _save_maps(path: Path, saved: dict) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    arrays = {"image": saved["image"], "label_map": saved["label_map"],
              "answer": np.asarray(saved["answer"]),
              "words": np.asarray(saved.get("words", []), dtype=str),
              "roles": np.asarray(saved.get("roles", []), dtype=str),
              "status": np.asarray(saved.get("status", []), dtype=str)}
    for m, maps in saved["maps"].items():
        arrays[f"maps__{m}"] = maps
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def _progress(cfg: RunConfig, total: int, initial: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"eval {Path(cfg.out_dir).name}", unit="img",
                dynamic_ncols=True, file=sys.stderr)


def main(argv):
    """Entry point of ``python -m eval.run`` (absl): flags -> RunConfig -> :func:`run`, then print the tables."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag (see --help)")
    try:
        cfg = validate(config_from_flags(flags.FLAGS))
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    init_distributed(cfg)
    try:
        source = open_source(cfg)
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(f"--dataset={cfg.dataset} --data_dir={cfg.data_dir}: {e}") from None
    try:
        model = load_model(cfg)
    except (FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
        raise app.UsageError(f"--checkpoint={cfg.checkpoint}: {e}") from None
    result = run(cfg, model=model, source=source)
    summary = result.get("summary")
    print(f"wrote {result['records_written']} word records for {result['examples_done']} examples to "
          f"{result['out_dir']} ({result['examples_skipped_resume']} already done)")
    if summary is not None:
        print((Path(result["out_dir"]) / "summary.md").read_text())


if __name__ == "__main__":
    define_flags()
    from dcam_jax.cli import run_tool

    run_tool(main)
