"""eval.run's configuration: RunConfig (one field per flag), its validation, and the absl flags that fill it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

from absl import flags



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


def check_methods(methods: Sequence[str], example: str) -> None:
    """Raise ValueError for an empty, unknown or repeated ``--methods`` entry (``example``: a list to suggest)."""
    from dcam_jax.cam import config as cam_config

    if not methods:
        raise ValueError(f"--methods is empty; give a comma-separated list such as {example}")
    known = tuple(cam_config.METHODS) + PSEUDO_METHODS
    bad = [m for m in methods if m not in known]
    if bad:
        raise ValueError(f"--methods: unknown method(s) {bad}; expected names from {known}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods lists a method twice: {list(methods)}")


def check_checkpoint_and_out_dir(checkpoint: str, out_dir: str) -> None:
    """Raise ValueError unless ``checkpoint`` is 'toy' or a directory and ``out_dir`` is not an existing file."""
    if checkpoint != "toy" and not Path(checkpoint).is_dir():
        raise ValueError(f"--checkpoint={checkpoint}: no such directory; pass 'toy' (the embedded model) or a "
                         "directory written by `python -m checkpoints_convert`")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out_dir={out_dir} exists and is a file; pass a directory")


def validate(cfg: RunConfig) -> RunConfig:
    """Check a RunConfig before anything is loaded; raise ValueError naming the bad flag and what to do.

    One check per field, in the order of the fields: long, but each line stands alone."""
    from dcam_jax.cam import config as cam_config

    if not cfg.out_dir:
        raise ValueError("--out_dir is required (e.g. --out_dir=runs/my_run)")
    if cfg.dataset not in DATASETS:
        raise ValueError(f"--dataset={cfg.dataset!r} is unknown; expected one of {DATASETS}")
    check_methods(cfg.methods, "diffusion_cam,gradcam,uniform")
    bad = [m for m in cfg.overrides_apply_to if m not in cfg.methods]
    if bad:
        raise ValueError(f"--overrides_apply_to names {bad}, which are not in --methods={','.join(cfg.methods)}")
    modes = [m for m in cfg.metric_mode if m not in METRIC_MODES]
    if modes or not cfg.metric_mode:
        raise ValueError(f"--metric_mode={','.join(cfg.metric_mode)!r}; expected a non-empty list from "
                         f"{METRIC_MODES}")
    if cfg.targets not in ("content", "all"):
        raise ValueError(f"--targets={cfg.targets!r}; expected 'content' or 'all'")
    if cfg.probe is not None and cfg.probe not in cam_config.PROBES:
        raise ValueError(f"--probe={cfg.probe!r}; expected one of {cam_config.PROBES}")
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
    check_checkpoint_and_out_dir(cfg.checkpoint, cfg.out_dir)
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pick one")
    return cfg


# ----------------------------------------------------------------------------------------------------------
# flags


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """Define the flags of ``python -m eval.run`` on ``fv`` (tests pass a fresh ``flags.FlagValues()``).

    One flag per RunConfig field, defaults read from ``RunConfig()``: a table rather than logic, kept in one
    function so that the flags read in the order of ``--help``."""
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


def dataclass_from_flags(cls, fv: flags.FlagValues, list_fields: Sequence[str] = ()):
    """An instance of the config dataclass ``cls`` from the parsed flags named like its fields (not yet
    validated): ``list_fields`` become tuples, a missing ``--out_dir`` becomes ""."""
    kw = {}
    for field in dataclasses.fields(cls):
        if field.name not in fv:
            continue
        v = fv[field.name].value
        kw[field.name] = _csv(v) if field.name in list_fields else v
    if kw.get("out_dir") is None:
        kw["out_dir"] = ""
    return cls(**kw)


def config_from_flags(fv: flags.FlagValues = flags.FLAGS) -> RunConfig:
    """The RunConfig of parsed flags (not yet validated)."""
    return dataclass_from_flags(RunConfig, fv, ("methods", "metric_mode", "overrides_apply_to"))


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
