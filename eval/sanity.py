r"""Sanity checks of the explanation methods (SPEC 4.6, after Adebayo et al., "Sanity Checks for Saliency Maps",
NeurIPS 2018): cascading randomisation of the model above the hooked layer, and two-object discrimination.

Usage (the embedded toy model on the ShapesWorld validation split)::

    python -m eval.sanity --out_dir=runs/sanity_toy
    python -m eval.sanity --out_dir=runs/sanity_small --num_examples=20 --num_discrimination=40 \
        --methods=diffusion_cam,paper,hirescam

What it measures
----------------

1. **Cascading randomisation.** Each of the first ``--num_examples`` validation images gets ONE answer, generated
   greedily with the original model; its trajectory (``commit_step``) is kept. Its object words (colour and shape
   words, :func:`eval.run.shapes_word_infos`) are explained with the original parameters, then the SAME answer and
   trajectory are explained again with parameters in which, cumulatively from the top of the language model,

   ========  =====================================================
   depth 1   the head ``lm["lm_head"]``
   depth 2   the head and the last block (index N - 1)
   depth k   the head and blocks N - k + 1 .. N - 1
   ========  =====================================================

   are re-initialised, down to block L + 1, where L is the method's hooked block
   (``explain.resolve(CamConfig(method=m), model.config).layer``; ``--layer`` overrides it for gradient methods).
   A method hooked at L therefore has N - L depths; TAM (L = N - 1) has only the head.
   Every randomised weight tensor (the head matrix; every matrix of a block: q, k, v, o, gate, up, down) is
   replaced by a fixed-seed normal with mean 0 and the trained tensor's own standard deviation (per block for the
   stacked block tensors), so activation scales stay realistic. The RMSNorm scales (the blocks' ``attn_norm`` and
   ``mlp_norm``, and ``final_norm`` with the head) are **kept** by default: they are per-channel gains near 1 in a
   trained model, and a zero-mean normal in their place would flip signs channel-wise, which no trained model
   does; ``--norms=reset`` sets them to 1 (LLaDA's initialisation) instead. The randomised values of a tensor
   depend only on ``--seed`` and the tensor's name, so depth k + 1 contains depth k's random tensors unchanged.
   The activation at L is the same for every depth (the blocks up to L are untouched); only what the map reads
   from above L changes. Per depth the table gives the mean Spearman rank correlation (ties share their average
   rank) between the original and the randomised map of each word, on the grid-resolution maps the method returns
   (refined) and on its raw maps (min-max normalised, before refinement). A map that is constant (all ranks tied)
   has no rank correlation: it is left out of the mean and counted as ``undefined``. SPEC 4.6: a faithful method
   falls well below 0.5 once the blocks above L are random. Pseudo-methods (``uniform``, ``random``) do not
   depend on the parameters and are skipped here.

2. **Two-object discrimination.** The first ``--num_discrimination`` validation images that hold exactly two
   objects (the split is scanned in order; the images themselves are not changed). Only images whose answer names
   both objects with the right colour and shape bound together count (:func:`eval.run.shapes_caption_eval`,
   ``all_correct``); in them, every object word aligned with exactly one object is explained, its map is resized
   bilinearly to the mask (OpenCV semantics, :func:`dcam_jax.metrics.resize_map`, as eval.run scores maps) and
   the word *points at the named object* when

   - ``mass``: the map's sum inside the named object's mask is greater than inside the other object's mask;
   - ``density``: the same with the mean inside each mask (not biased towards the larger object);
   - ``pointing``: the pointing game on the named mask (every pixel attaining the map's maximum lies inside it,
     :func:`dcam_jax.metrics.pointing_game`).

   The table gives the share of words for which each holds, on refined and raw maps. ``random`` (i.i.d. uniform
   noise on the token grid, seeded as in eval.run) is the floor: its mass share is about the share of words that
   name the larger object.

Outputs in ``--out_dir`` (created; an existing non-empty directory needs ``--overwrite``), each written to a
temporary file and renamed: ``sanity.json`` (every number and the run configuration), ``sanity.md`` (the tables,
also printed) and ``sanity.png`` (mean rank correlation against the number of randomised layers from the top, one
line per method, with the 0.3 and 0.5 reference lines).
"""

# The entry point: SanityConfig (one field per flag), its flags, the run that writes the outputs, and main. The
# computations live in eval/sanity_checks.py and the outputs in eval/sanity_report.py; their public names are
# re-exported here.

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Optional

from absl import app, flags

from eval import sanity_report
from eval.config import check_checkpoint_and_out_dir, check_methods, dataclass_from_flags
from eval.sanity_checks import (NORM_MODES, Answered, cascading_randomization, discrimination, max_depth,
                                 prepare_item, two_object_indices)
from eval.sanity_report import OUTPUTS

DEFAULT_METHODS = ("diffusion_cam", "paper", "hirescam", "gradcam", "llava_cam", "tam", "random")


# ----------------------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass(frozen=True)
class SanityConfig:
    """Everything a sanity run depends on (one field per flag of ``python -m eval.sanity``; see ``--help``)."""

    checkpoint: str = "toy"
    out_dir: str = ""
    split: str = "validation"
    shapes_preset: str = "default"
    num_examples: int = 50
    num_discrimination: int = 100
    methods: tuple[str, ...] = DEFAULT_METHODS
    layer: Optional[int] = None
    norms: str = "keep"
    seed: int = 0
    progress: bool = True
    overwrite: bool = False

    def to_json_dict(self) -> dict:
        """The fields as a JSON-ready dict (tuples as lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def validate(cfg: SanityConfig) -> SanityConfig:
    """Check a SanityConfig before anything is loaded; raise ValueError naming the bad flag and what to do."""
    from dcam_jax.data import shapes

    if not cfg.out_dir:
        raise ValueError("--out_dir is required (e.g. --out_dir=runs/sanity)")
    check_methods(cfg.methods, "diffusion_cam,tam,random")
    if cfg.split not in shapes.SPLITS:
        raise ValueError(f"--split={cfg.split!r}; expected one of {shapes.SPLITS} (SPEC 4.6 uses validation)")
    if cfg.shapes_preset not in shapes.PRESETS:
        raise ValueError(f"--shapes_preset={cfg.shapes_preset!r}; expected one of {tuple(shapes.PRESETS)}")
    if cfg.norms not in NORM_MODES:
        raise ValueError(f"--norms={cfg.norms!r}; expected one of {NORM_MODES}")
    for name in ("num_examples", "num_discrimination", "seed"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name}={getattr(cfg, name)} must be >= 0")
    if cfg.num_examples == 0 and cfg.num_discrimination == 0:
        raise ValueError("--num_examples=0 and --num_discrimination=0: nothing to do; set at least one above 0")
    if cfg.layer is not None and cfg.layer < 0:
        raise ValueError(f"--layer={cfg.layer} must be >= 0")
    check_checkpoint_and_out_dir(cfg.checkpoint, cfg.out_dir)
    out = Path(cfg.out_dir)
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ValueError(f"--out_dir={cfg.out_dir} exists and is not empty; pass --overwrite to replace its "
                         f"{', '.join(OUTPUTS)} (other files are left alone) or choose a new directory")
    return cfg


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """Define the flags of ``python -m eval.sanity`` on ``fv`` (tests pass a fresh ``flags.FlagValues()``)."""
    d = SanityConfig()
    f = dict(flag_values=fv)
    shared = _run_flags()
    flags.DEFINE_string("checkpoint", d.checkpoint, shared["checkpoint"].help, **f)
    flags.DEFINE_string("out_dir", None, "Directory for sanity.json, sanity.md and sanity.png (created). "
                        "Required.", **f)
    flags.DEFINE_string("split", d.split, "ShapesWorld split the images come from: train | validation | test. "
                        "Defaults are chosen on validation (SPEC 4.6).", **f)
    flags.DEFINE_string("shapes_preset", d.shapes_preset, shared["shapes_preset"].help + " The discrimination "
                        "check needs two-object images, which 'easy' never has.", **f)
    flags.DEFINE_integer("num_examples", d.num_examples, "Images for the cascading randomisation check (the first "
                         "N of the split); 0 skips the check.", **f)
    flags.DEFINE_integer("num_discrimination", d.num_discrimination, "Two-object images for the discrimination "
                         "check (the first N of the split with exactly two objects); 0 skips the check.", **f)
    flags.DEFINE_list("methods", list(d.methods), "Comma-separated methods: diffusion_cam, paper, "
                      "reference_compat, gradcam, llava_cam, tam, layercam, gradcam_pp, hirescam (gradient "
                      "methods use their preset, CamConfig(method=...)), and the pseudo-methods random and uniform "
                      "(used as floors in the discrimination check only).", **f)
    flags.DEFINE_integer("layer", d.layer, "Hooked LM block L for the gradient methods (default: each method's own; "
                         "never TAM's, which reads the last block). Randomisation goes down to block L + 1.", **f)
    flags.DEFINE_enum("norms", d.norms, list(NORM_MODES), "RMSNorm scales of randomised blocks and of the final "
                      "norm: keep (the trained gains) or reset (set to 1, LLaDA's initialisation). Weight matrices "
                      "are always re-drawn.", **f)
    flags.DEFINE_integer("seed", d.seed, "Seed of the random weights, of the per-example generation keys "
                         "(fold_in(key(seed), index), as eval.run) and of the random pseudo-method.", **f)
    flags.DEFINE_bool("progress", d.progress, "Show a progress bar (tqdm, on stderr).", **f)
    flags.DEFINE_bool("overwrite", d.overwrite, "Allow a non-empty --out_dir; its sanity.* files are replaced.",
                      **f)


def _run_flags() -> flags.FlagValues:
    """eval.run's flags on a fresh FlagValues: the source of the help of the flags both tools share."""
    from eval import config

    fv = flags.FlagValues()
    config.define_flags(fv)
    return fv


def config_from_flags(fv: flags.FlagValues = flags.FLAGS) -> SanityConfig:
    """The SanityConfig of parsed flags (not yet validated)."""
    return dataclass_from_flags(SanityConfig, fv, ("methods",))


# ----------------------------------------------------------------------------------------------------------
# the run


def cams_for(cfg: SanityConfig, model) -> dict:
    """{method: resolved CamConfig, or None for a pseudo-method}; --layer applies to gradient methods only (as
    eval.run's cam_config_for). Raises ValueError for a layer the model does not have."""
    from dcam_jax.cam.config import resolve
    from eval.config import RunConfig
    from eval.scoring import cam_config_for

    rc = RunConfig(methods=cfg.methods, layer=cfg.layer)
    cams = {m: cam_config_for(m, rc) for m in cfg.methods}
    return {m: (None if c is None else resolve(c, model.config)) for m, c in cams.items()}


def run(cfg: SanityConfig, *, model=None) -> dict:
    """Both checks (see the module docstring) and the three output files. Returns the result dict (sanity.json).

    model: an already loaded dcam_jax.api.Model (tests); None loads ``cfg.checkpoint``.
    """
    from dcam_jax import api
    from eval.config import RunConfig
    from eval.sources import ShapesSource

    cfg = validate(cfg)
    t0 = time.time()
    if model is None:
        model = api.load_pretrained(cfg.checkpoint)
    cams = cams_for(cfg, model)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = ShapesSource(RunConfig(split=cfg.split, shapes_preset=cfg.shapes_preset))
    grad = {m: c for m, c in cams.items() if c is not None}
    disc_idx, scanned = (two_object_indices(cfg.split, cfg.shapes_preset, cfg.num_discrimination)
                         if cfg.num_discrimination else ([], 0))
    n_layers = model.config.lm.n_layers
    n_rand = sum(1 + max_depth(n_layers, c.layer) for c in grad.values()) * cfg.num_examples
    n_gen = cfg.num_examples if grad else 0
    bar = _progress(cfg, n_gen + n_rand + len(disc_idx) * (1 + len(cams)))
    cache: dict[int, Answered] = {}

    def prep(i: int) -> Answered:
        if i not in cache:
            cache[i] = prepare_item(model, source.item(i), seed=cfg.seed)
        if bar is not None:
            bar.set_postfix_str(cache[i].gen.text[:60], refresh=False)
        return cache[i]

    result: dict[str, Any] = {
        "config": cfg.to_json_dict(),
        "model": {"name": model.config.name, "n_layers": n_layers, "num_params": int(model.config.num_params),
                  "checkpoint": "toy" if cfg.checkpoint == "toy" else str(Path(cfg.checkpoint).resolve())},
        "cam_configs": {m: (None if c is None else {"layer": c.layer, "probe": c.probe, "grad_rule": c.grad_rule,
                                                    "aggregation": c.aggregation, "hook": c.hook,
                                                    "refine": c.refine if isinstance(c.refine, (str, type(None)))
                                                    else str(c.refine)})
                        for m, c in cams.items()},
        "randomization_images": 0, "randomization": None, "discrimination": None,
        "skipped_for_randomization": [m for m, c in cams.items() if c is None]}
    try:
        if cfg.num_examples and grad:
            items = []
            for i in range(cfg.num_examples):
                items.append(prep(i))
                if bar is not None:
                    bar.update(1)
            result["randomization_images"] = len(items)
            result["randomization"] = cascading_randomization(model, items, grad, seed=cfg.seed, norms=cfg.norms,
                                                              bar=bar)
        if disc_idx:
            items = []
            for i in disc_idx:
                items.append(prep(i))
                if bar is not None:
                    bar.update(1)
            result["discrimination"] = dict(discrimination(model, items, cams, seed=cfg.seed, bar=bar),
                                            scanned=scanned, indices=disc_idx)
        elif cfg.num_discrimination:
            result["discrimination"] = {"images": 0, "images_correct": 0, "words": 0, "scanned": scanned,
                                        "indices": [], "methods": {}}
    finally:
        if bar is not None:
            bar.close()
    result["seconds"] = round(time.time() - t0, 1)
    return sanity_report.write(result, out)


def _progress(cfg: SanityConfig, total: int):
    """A tqdm bar of ``total`` maps on stderr, or None with ``--noprogress``."""
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"sanity {Path(cfg.out_dir).name}", unit="map", dynamic_ncols=True,
                file=sys.stderr)


def main(argv):
    """Entry point of ``python -m eval.sanity`` (absl): flags -> SanityConfig -> :func:`run`, then the tables."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag (see --help)")
    try:
        cfg = validate(config_from_flags(flags.FLAGS))
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    from dcam_jax import api

    try:
        model = api.load_pretrained(cfg.checkpoint)
    except (FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
        raise app.UsageError(f"--checkpoint={cfg.checkpoint}: {e}") from None
    try:
        cams_for(cfg, model)
    except ValueError as e:
        raise app.UsageError(f"--layer={cfg.layer}: {e}") from None
    result = run(cfg, model=model)
    print((Path(cfg.out_dir) / "sanity.md").read_text())
    written = [str(Path(cfg.out_dir) / n) for n in OUTPUTS if (Path(cfg.out_dir) / n).exists()]
    print(f"wrote {', '.join(written)} in {result['seconds']} s")


if __name__ == "__main__":
    define_flags()
    from dcam_jax.tool import run_tool

    run_tool(main)
