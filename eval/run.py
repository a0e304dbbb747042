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

import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from absl import app, flags, logging

from dcam_jax import fileio
from eval.config import (
    RECORDS_GLOB, RUN_CONFIG, RunConfig, config_from_flags, define_flags, validate, _RESUMABLE_FIELDS)
from eval.sources import open_source
from eval.store import GenerationCache, generation_key, records_path, sampling_config, scan_records, _append_block
from eval.scoring import Context, cam_config_for, process_example


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
    ``cfg.write_report``), counts and the call counters. The whole loop in one function, as the module docstring
    tells it; the per-example work is ``eval.scoring.process_example``.

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
    from dcam_jax.cam.config import resolve

    # Resolved once per method: bad layers etc. fail here, before any work or folder.
    cams = {m: None if c is None else resolve(c, model.config)
            for m, c in ((m, cam_config_for(m, cfg)) for m in cfg.methods)}
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
    from eval import config as run_config

    flags.adopt_module_key_flags(run_config)  # the flags are defined in eval.config; --help lists them here
    from dcam_jax.tool import run_tool

    run_tool(main)
