"""The ``dcam`` command: explain what a diffusion multimodal LLM looked at.

  dcam demo     the embedded toy model on a bundled ShapesWorld image: caption, explain, write pictures
  dcam explain  the same for any image and checkpoint
  dcam info     what a checkpoint holds (config, parameter count, dtype, layout of a sample image)

Run ``dcam <command> --help`` for the flags of one command.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

_HELP = {
    "demo": "Run the embedded toy dMLLM on a bundled ShapesWorld image: generate a caption, explain every content "
            "word with Diffusion-CAM, and write per-word overlay PNGs, summary.png, explanation.json and "
            "explanation.html (an interactive viewer, open it in any browser) into --out_dir.",
    "explain": "Explain the answer of a model for an image: generate the answer (or take --answer), compute one "
               "heat map per target token or word, and write overlays, summary.png and explanation.json (and, with "
               "--html, the viewer explanation.html) into --out_dir.",
    "info": "Describe a checkpoint: its config, parameter count, dtype, and the image-token layout it would give "
            "a sample image size.",
}


class UsageError(Exception):
    """A wrong or missing flag: printed as an error, exit status 2."""


def _usage() -> str:
    lines = [__doc__.strip(), "", "Commands:"]
    lines += [f"  {k:<8} {v}" for k, v in _HELP.items()]
    return "\n".join(lines)


def _d(define, flag_values, *args, **kwargs):
    define(*args, flag_values=flag_values, **kwargs)


def _define_flags(command: str):
    from absl import flags

    F = flags.FlagValues()  # a fresh set per call, so main() can run many times in one process (tests)
    if command in ("explain", "demo", "info"):
        _d(flags.DEFINE_string, F, "checkpoint", "toy", "'toy' (the embedded model) or a directory written by "
                            "`python -m checkpoints_convert` or dcam_jax.save_checkpoint.")
        _d(flags.DEFINE_string, F, "dtype", None, "Cast parameters to this dtype when loading (e.g. float32, bfloat16). "
                            "Default: as stored.")
    if command in ("explain", "demo"):
        _d(flags.DEFINE_string, F, "out_dir", "dcam_out", "Where to write the pictures and explanation.json (created; "
                            "must not be a file). A folder that already holds files is refused unless --overwrite.")
        _d(flags.DEFINE_bool, F, "overwrite", False, "Replace the contents of an existing --out_dir (the new results "
                          "are written first and then swapped in, so a failed run leaves the old folder as it was).")
        _d(flags.DEFINE_string, F, "method", "diffusion_cam", "diffusion_cam (the default: conservative gradients, "
                            "per-token gradient x activation) | paper (the paper's formulas as written) | "
                            "reference_compat (the authors' released code) | gradcam | llava_cam | tam | layercam | "
                            "gradcam_pp | hirescam. Several, comma-separated (diffusion_cam,paper,hirescam), are "
                            "shown side by side in the HTML viewer; the first one writes the PNGs and maps.npy.")
        _d(flags.DEFINE_integer, F, "trajectory_states", 8, "HTML viewer: states along the denoising trajectory "
                            "shown by its step slider (0: no slider).")
        _d(flags.DEFINE_integer, F, "layer", None, "Hooked LM block (default: the model's cam_layer, else "
                            "n_layers // 3; TAM: the last).")
        _d(flags.DEFINE_string, F, "probe", None, "decision | trajectory | noise | clean | final (default: the "
                            "method's).")
        _d(flags.DEFINE_string, F, "grad_rule", None, "Gradient rule of the attribution pass: standard | "
                            "conservative_norm | conservative (default: the method's).")
        _d(flags.DEFINE_string, F, "aggregation", None, "gxa | gradcam | layercam | gradcam_pp | channel_relu_mean "
                            "(default: the method's).")
        _d(flags.DEFINE_string, F, "refine", None, "Refinement preset: default | full | none | akd | dacg | cba | "
                            "sicd | reference_compat (default: the method's).")
        _d(flags.DEFINE_integer, F, "seed", 0, "PRNG seed for sampling and noise probes.")
        _d(flags.DEFINE_integer, F, "gen_length", None, "Answer length in tokens (default: the model's sampling default).")
        _d(flags.DEFINE_integer, F, "steps", None, "Denoising steps (default: gen_length).")
        _d(flags.DEFINE_float, F, "temperature", 0.0, "Sampling temperature (0 = greedy).")
    if command == "explain":
        _d(flags.DEFINE_bool, F, "html", False, "Also write explanation.html, a self-contained interactive viewer "
                          "(click a token to see its map; a step slider shows how it formed). `dcam demo` always "
                          "writes it.")
        _d(flags.DEFINE_string, F, "image", None, "Path of the image to explain (PNG, JPEG, ...).")
        _d(flags.DEFINE_string, F, "prompt", None, "The question. Default: the model's default prompt.")
        _d(flags.DEFINE_string, F, "answer", None, "Explain this answer instead of generating one (then use --probe=clean "
                            "or --probe=noise: the 'decision' probe needs the generation trajectory).")
        _d(flags.DEFINE_list, F, "targets", ["content"], "What to explain: 'content' (content words), 'all' (every "
                          "answer token), answer positions (0,3,4) or words (red,circle).")
    if command == "demo":
        _d(flags.DEFINE_integer, F, "example", 0, "Which bundled ShapesWorld test example to use (0..7).")
    if command == "info":
        _d(flags.DEFINE_list, F, "image_size", ["640", "480"], "Width,height of a sample image for the layout summary.")
    return F


_TMP_PREFIX = ".dcam_tmp_"


def _check_out_dir(path: str, overwrite: bool = False) -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"--out_dir={path} exists and is a file; choose a directory")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise UsageError(f"--out_dir={path} already holds files; pass --overwrite to replace them, or choose another "
                         "--out_dir")
    return p


def clean_stale_temp(parent: Path) -> list[Path]:
    """Remove the temporary folders (``.dcam_tmp_<pid>_*``) that killed runs left in ``parent``; a folder whose
    process still runs is kept. Returns the removed paths."""
    import shutil

    from dcam_jax.checkpoint import pid_alive

    removed = []
    if not parent.is_dir():
        return removed
    for d in parent.glob(_TMP_PREFIX + "*"):
        pid = d.name[len(_TMP_PREFIX):].split("_", 1)[0]
        if d.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _targets(values):
    if len(values) == 1 and values[0] in ("content", "all"):
        return values[0]
    if all(v.strip().lstrip("-").isdigit() for v in values):
        return [int(v) for v in values]
    return [v.strip() for v in values]


def _methods(F) -> list[str]:
    methods = [m.strip() for m in F.method.split(",") if m.strip()]
    if not methods:
        raise UsageError("--method is empty; name at least one method (e.g. diffusion_cam)")
    if len(set(methods)) != len(methods):
        raise UsageError(f"--method={F.method} names a method twice")
    return methods


def _cam_config(F, method: str | None = None):
    import dcam_jax as dj

    from dcam_jax.cam import refine as rf

    if F.refine is not None:
        rf.refine_preset(F.refine)  # an unknown preset fails here, before the model loads
    return dj.CamConfig(method=method or _methods(F)[0], layer=F.layer, probe=F.probe, grad_rule=F.grad_rule,
                        aggregation=F.aggregation, refine=F.refine)


def _sampling(F, model):
    import dcam_jax as dj

    from dcam_jax.api import default_sampling

    s = default_sampling(model.config)
    over = {}
    if F.gen_length:
        over["gen_length"] = F.gen_length
    if F.steps:
        over["steps"] = F.steps
    over["temperature"] = F.temperature
    import dataclasses
    return dataclasses.replace(s, **over)


def _write_outputs(out_dir: Path, image: np.ndarray, e, *, title: str, extra: dict, html: dict | None = None
                   ) -> list[Path]:
    """Write overlays, summary.png, explanation.json, maps.npy and (with ``html``: the keyword arguments of
    viewer.write_html) explanation.html into a temporary folder beside ``out_dir``, then swap it in whole: a run
    that fails or is killed leaves ``out_dir`` as it was (and a temporary folder that the next run removes)."""
    import shutil

    from dcam_jax import viewer, viz

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for d in clean_stale_temp(out_dir.parent):
        print(f"removed {d}, left by a run that was killed", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}_", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the results get the user's usual permissions
    try:
        shown = viz.display_image(image)
        size = shown.shape[:2]
        maps = e.image_maps(size)
        written = viz.save_overlays(shown, maps, e.tokens, tmp)
        refined = not np.allclose(e.raw_maps, e.maps, atol=1e-5)  # a second row if refinement acted
        written.append(viz.summary_figure(shown, maps, e.tokens, e.text, tmp / "summary.png", title=title,
                                          raw_maps=e.image_maps(size, raw=True) if refined else None))
        data = e.to_dict()
        data.update(extra)
        (tmp / "explanation.json").write_text(json.dumps(data, indent=2))
        written.append(tmp / "explanation.json")
        np.save(tmp / "maps.npy", e.maps)
        written.append(tmp / "maps.npy")
        if html is not None:
            written.append(viewer.write_html(tmp / "explanation.html", image, title=title, run=extra.get("run"),
                                             **html))
        old = None
        if out_dir.exists():
            old = out_dir.parent / f"{_TMP_PREFIX}{os.getpid()}_old_{out_dir.name}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return [out_dir / f.name for f in written]
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _run_record(F, model, image_source, prompt, sampling, argv) -> dict:
    """What made this result: command, checkpoint (path and the SHA-256 of its metadata), image (path and
    SHA-256), prompt, seed, sampling settings and the dcam_jax version."""
    import dataclasses

    import dcam_jax as dj
    from dcam_jax.fileio import file_sha256

    meta = Path(model.path) / "dcam_checkpoint.json"
    image = {"path": str(Path(image_source).resolve())} if isinstance(image_source, (str, os.PathLike)) else {}
    if image:
        image["sha256"] = file_sha256(image_source)
    return {"command": list(argv), "dcam_jax_version": dj.__version__,
            "checkpoint": {"name": F.checkpoint, "path": str(Path(model.path).resolve()),
                           "metadata_sha256": file_sha256(meta) if meta.exists() else None},
            "image": image, "prompt": prompt if prompt is not None else model.config.default_prompt,
            "seed": F.seed, "sampling": dataclasses.asdict(sampling), "dtype": F.dtype}


def _run_explain(F, image_source, prompt, targets, answer=None, title="", extra=None, html=False):
    import jax

    import dcam_jax as dj
    from dcam_jax.processing.image import load_image

    out_dir = _check_out_dir(F.out_dir, F.overwrite)
    methods = _methods(F)
    cams = [_cam_config(F, m) for m in methods]  # bad method / rule / probe names fail before anything loads
    if F.trajectory_states < 0:
        raise UsageError(f"--trajectory_states={F.trajectory_states} must be >= 0")
    t0 = time.perf_counter()
    print(f"loading {F.checkpoint} ...", flush=True)
    model = dj.load_pretrained(F.checkpoint, dtype=F.dtype)
    pil = load_image(image_source)
    image = np.asarray(pil)
    sampling = _sampling(F, model)
    key = jax.random.key(F.seed)
    generation = None
    if answer is None:  # generate once (with explain()'s own split of the key) and explain that answer everywhere
        generation = dj.generate(model, pil, prompt, key=jax.random.split(key)[0], sampling=sampling)
    explanations = {}
    for m, cam in zip(methods, cams):
        print(f"explaining with {m} ({model.config.name}, {model.config.num_params / 1e6:.2f}M params) ...",
              flush=True)
        explanations[m] = dj.explain(model, pil, prompt, answer=answer, targets=targets, config=cam, key=key,
                                     sampling=sampling, generation=generation)
    e = explanations[methods[0]]
    parts = None
    if html or len(methods) > 1:
        trajectory = None
        if generation is not None and F.trajectory_states > 0 and explanations and cams[0].method != "tam":
            print(f"following the {F.trajectory_states} denoising states of every token ...", flush=True)
            trajectory = dj.explain_trajectory(model, pil, prompt, targets=targets, config=cams[0],
                                               num_states=F.trajectory_states, generation=generation)
        parts = {"explanations": explanations, "trajectory": trajectory, "generation": generation}
    record = {"run": _run_record(F, model, image_source, prompt, sampling, _ARGV or [])}
    files = _write_outputs(out_dir, image, e, title=title, extra={**record, **(extra or {})}, html=parts)
    print(f"answer: {e.text}")
    print(f"explained: {', '.join(t.strip() for t in e.tokens)}")
    print(f"wrote {len(files)} files to {out_dir}/ in {time.perf_counter() - t0:.1f} s:")
    for f in files:
        print(f"  {f}")
    return e, files


def cmd_demo(F):
    from dcam_jax import api

    samples = sorted(p for p in (api.ASSETS / "samples").glob("shapes_*.png") if not p.stem.endswith("_labels"))
    if not samples:
        raise UsageError(f"no bundled sample images in {api.ASSETS / 'samples'}; reinstall dcam_jax")
    if not 0 <= F.example < len(samples):
        raise UsageError(f"--example must be in 0..{len(samples) - 1}")
    path = samples[F.example]
    meta = path.with_suffix(".json")
    truth = json.loads(meta.read_text()) if meta.exists() else {}
    title = f"toy dMLLM on ShapesWorld ({path.name}); true caption: {truth.get('caption', '?')}"
    e, files = _run_explain(F, path, None, "content", title=title, extra={"image": str(path), "truth": truth},
                            html=True)
    labels = path.with_name(path.stem + "_labels.png")
    if labels.exists() and truth:
        _report_truth(e, np.asarray(Image.open(labels)), truth, Path(F.out_dir))
    return e, files


def _report_truth(e, label_map: np.ndarray, truth: dict, out_dir: Path):
    """For the demo: matched Obj-IoU of each explained word against the object it names in the true caption."""
    from dcam_jax import metrics

    obj_of_word = {}
    for w, o in zip(truth.get("words", []), truth.get("word_object", [])):
        if o is not None:
            obj_of_word.setdefault(w, o)
    maps = e.image_maps(label_map.shape)
    rows = {}
    for tok, m in zip(e.tokens, maps):
        o = obj_of_word.get(tok.strip())
        if o is None:
            continue
        r = metrics.obj_iou(m, label_map, mode="matched", label=o + 1)
        rows[tok.strip()] = round(float(r.iou), 4)
    if rows:
        print("matched Obj-IoU against the true object masks: " +
              ", ".join(f"{w} {v:.2f}" for w, v in rows.items()))
        data = json.loads((out_dir / "explanation.json").read_text())
        data["truth_obj_iou"] = rows
        tmp = out_dir / "explanation.json.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, out_dir / "explanation.json")


def cmd_explain(F):
    if not F.image:
        raise UsageError("--image is required (the path of the image to explain)")
    return _run_explain(F, F.image, F.prompt, _targets(F.targets), answer=F.answer,
                        title=f"{F.method} on {Path(F.image).name}", html=F.html)


def cmd_info(F):
    import dcam_jax as dj
    from dcam_jax.models import mllm
    from dcam_jax.processing import image as pimg

    model = dj.load_pretrained(F.checkpoint, dtype=F.dtype)
    c = model.config
    size = tuple(int(v) for v in F.image_size)
    geom = pimg.image_geometry(size, c)
    lay = mllm.image_layout(geom, 0)
    print(f"checkpoint: {model.path}")
    print(f"model: {c.name}  parameters: {c.num_params:,}  dtype: {c.lm.dtype}  attention: {c.attention}")
    print(f"LM: {c.lm.n_layers} layers, d_model {c.lm.d_model}, {c.lm.n_heads} heads ({c.lm.n_kv_heads} kv), "
          f"mlp {c.lm.mlp_hidden}, vocab {c.lm.vocab_size}, mask id {c.lm.mask_id}")
    print(f"vision: {c.vision.depth} layers, width {c.vision.width}, {c.vision.image_size}px views, "
          f"patch {c.vision.patch_size} ({c.vision.grid}x{c.vision.grid} tokens), pooled to "
          f"{c.tokens_per_view_side}x{c.tokens_per_view_side}")
    print(f"layout: {c.image_aspect_ratio}, {len(c.grid_pinpoints)} pinpoints")
    print(f"a {size[0]}x{size[1]} image -> {geom.num_views} views, {geom.num_image_tokens} image tokens: {lay}")
    print(f"tokenizer: {'yes' if model.tokenizer is not None else 'none'}; default prompt: {c.default_prompt!r}")


_ARGV: list[str] | None = None  # the command line of the running main(), for the run record


def main(argv=None):
    global _ARGV
    argv = list(sys.argv if argv is None else argv)
    _ARGV = ["dcam"] + argv[1:]
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command = argv[1]
    if command not in _HELP:
        print(f"error: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from absl import app, flags

    F = _define_flags(command)
    if any(a in ("--help", "-h", "--helpfull") for a in argv[2:]):
        print(f"usage: dcam {command} [--flag=value ...]\n\n{_HELP[command]}\n\nflags:")
        print(F.module_help(__name__))
        return 0
    try:
        rest = F(argv[1:], known_only=False)
    except flags.Error as e:
        print(f"error: {e}\nRun `dcam {command} --help` for the flags.", file=sys.stderr)
        return 2
    if len(rest) > 1:
        print(f"error: unexpected arguments {rest[1:]}", file=sys.stderr)
        return 2
    from dcam_jax.checkpoint import CheckpointError
    from dcam_jax.processing.image import ImageError

    try:
        {"demo": cmd_demo, "explain": cmd_explain, "info": cmd_info}[command](F)
    except UsageError as e:
        print(f"error: {e}\nRun `dcam {command} --help` for the flags.", file=sys.stderr)
        return 2
    except (ImageError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
