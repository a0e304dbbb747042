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

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from absl import app, flags

from dcam_jax import fileio

PSEUDO_METHODS = ("uniform", "random")
NORM_MODES = ("keep", "reset")
DEFAULT_METHODS = ("diffusion_cam", "paper", "hirescam", "gradcam", "llava_cam", "tam", "random")
OUTPUTS = ("sanity.json", "sanity.md", "sanity.png")
# how many split indices are scanned per requested two-object image before giving up (about 1 in 4 images of the
# default preset has two objects; the easy preset has none)
_SCAN_FACTOR = 50

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
    from dcam_jax.cam import explain as ex
    from dcam_jax.data import shapes

    if not cfg.out_dir:
        raise ValueError("--out_dir is required (e.g. --out_dir=runs/sanity)")
    if not cfg.methods:
        raise ValueError("--methods is empty; give a comma-separated list such as diffusion_cam,tam,random")
    known = tuple(ex.METHODS) + PSEUDO_METHODS
    bad = [m for m in cfg.methods if m not in known]
    if bad:
        raise ValueError(f"--methods: unknown method(s) {bad}; expected names from {known}")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise ValueError(f"--methods lists a method twice: {list(cfg.methods)}")
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
    if cfg.checkpoint != "toy" and not Path(cfg.checkpoint).is_dir():
        raise ValueError(f"--checkpoint={cfg.checkpoint}: no such directory; pass 'toy' (the embedded model) or a "
                         "directory written by `python -m checkpoints_convert`")
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out_dir={cfg.out_dir} exists and is a file; pass a directory")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ValueError(f"--out_dir={cfg.out_dir} exists and is not empty; pass --overwrite to replace its "
                         f"{', '.join(OUTPUTS)} (other files are left alone) or choose a new directory")
    return cfg


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """Define the flags of ``python -m eval.sanity`` on ``fv`` (tests pass a fresh ``flags.FlagValues()``)."""
    d = SanityConfig()
    f = dict(flag_values=fv)
    flags.DEFINE_string("checkpoint", d.checkpoint, "'toy' (the embedded ShapesWorld model) or a converted "
                        "checkpoint directory (python -m checkpoints_convert).", **f)
    flags.DEFINE_string("out_dir", None, "Directory for sanity.json, sanity.md and sanity.png (created). "
                        "Required.", **f)
    flags.DEFINE_string("split", d.split, "ShapesWorld split the images come from: train | validation | test. "
                        "Defaults are chosen on validation (SPEC 4.6).", **f)
    flags.DEFINE_string("shapes_preset", d.shapes_preset, "ShapesWorld preset (easy, simple, default, hard); use "
                        "the one the model was trained on. The discrimination check needs two-object images, "
                        "which 'easy' never has.", **f)
    flags.DEFINE_integer("num_examples", d.num_examples, "Images for the cascading randomisation check (the first "
                         "N of the split); 0 skips the check.", **f)
    flags.DEFINE_integer("num_discrimination", d.num_discrimination, "Two-object images for the discrimination "
                         "check (the first N of the split with exactly two objects); 0 skips the check.", **f)
    flags.DEFINE_list("methods", list(d.methods), "Comma-separated methods: diffusion_cam, paper, "
                      "reference_compat, gradcam, llava_cam, tam, layercam, gradcam_pp, hirescam (gradient "
                      "methods use their preset, CamConfig(method=...)), and the pseudo-methods random and uniform "
                      "(used as floors in the discrimination check only).", **f)
    flags.DEFINE_integer("layer", None, "Hooked LM block L for the gradient methods (default: each method's own; "
                         "never TAM's, which reads the last block). Randomisation goes down to block L + 1.", **f)
    flags.DEFINE_enum("norms", d.norms, list(NORM_MODES), "RMSNorm scales of randomised blocks and of the final "
                      "norm: keep (the trained gains) or reset (set to 1, LLaDA's initialisation). Weight matrices "
                      "are always re-drawn.", **f)
    flags.DEFINE_integer("seed", d.seed, "Seed of the random weights, of the per-example generation keys "
                         "(fold_in(key(seed), index), as eval.run) and of the random pseudo-method.", **f)
    flags.DEFINE_bool("progress", d.progress, "Show a progress bar (tqdm, on stderr).", **f)
    flags.DEFINE_bool("overwrite", d.overwrite, "Allow a non-empty --out_dir; its sanity.* files are replaced.",
                      **f)


def config_from_flags(fv: flags.FlagValues = flags.FLAGS) -> SanityConfig:
    """The SanityConfig of parsed flags (not yet validated)."""
    kw = {}
    for field in dataclasses.fields(SanityConfig):
        if field.name not in fv:
            continue
        v = fv[field.name].value
        if field.name == "methods":
            v = tuple(x.strip() for x in (v or ()) if x.strip())
        kw[field.name] = v
    if kw.get("out_dir") is None:
        kw["out_dir"] = ""
    return SanityConfig(**kw)


# ----------------------------------------------------------------------------------------------------------
# randomising the top of the network


def upper_targets(n_layers: int, layer: int, depth: int) -> list[int]:
    """Blocks randomised at ``depth`` for a method hooked at block ``layer`` of ``n_layers``.

    Depth 0: nothing; depth 1: the head only (returns []); depth k: the head and blocks N - k + 1 .. N - 1 (returned
    top first). The largest depth is ``n_layers - layer`` (down to block L + 1). Raises ValueError outside.
    """
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer={layer} is out of range: the model has blocks 0..{n_layers - 1}")
    if not 0 <= depth <= n_layers - layer:
        raise ValueError(f"depth={depth} for layer {layer} of {n_layers}: expected 0..{n_layers - layer} (the head, "
                         f"then blocks {n_layers - 1} down to {layer + 1})")
    return list(range(n_layers - 1, n_layers - depth, -1)) if depth > 1 else []


def max_depth(n_layers: int, layer: int) -> int:
    """Number of randomisation depths for a method hooked at ``layer``: the head plus the blocks above it."""
    return n_layers - layer


def depth_label(n_layers: int, depth: int) -> str:
    """'head' for depth 1, '+block 3' for the block depth ``depth`` adds (the top block first)."""
    return "head" if depth == 1 else f"+block {n_layers - depth + 1}"


def _is_norm(name: str) -> bool:
    return name.endswith("norm")


def _tensor_id(name: str) -> int:
    """The fold_in datum of a tensor's random values: crc32 of its name ('lm_head', 'layers/q/3')."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _redraw_row_impl(stacked, key, tensor_id, row):
    import jax
    import jax.numpy as jnp

    old = jax.lax.dynamic_index_in_dim(stacked, row, keepdims=False).astype(jnp.float32)
    noise = jax.random.normal(jax.random.fold_in(key, tensor_id), old.shape, jnp.float32)
    return jax.lax.dynamic_update_index_in_dim(stacked, (jnp.std(old) * noise).astype(stacked.dtype), row, 0)


_redraw_row_jit = None


def _redraw_rows(stacked, key, names: Sequence[str], rows: Sequence[int]):
    """``stacked`` [N, ...] with each row of ``rows`` replaced by normal(0, that row's std) values drawn from
    ``fold_in(key, _tensor_id(name))`` (one name per row). One compiled function per shape and dtype, whatever the
    rows (they are traced)."""
    global _redraw_row_jit
    import jax

    if _redraw_row_jit is None:
        _redraw_row_jit = jax.jit(_redraw_row_impl)
    for name, row in zip(names, rows):
        stacked = _redraw_row_jit(stacked, key, np.uint32(_tensor_id(name)), np.int32(row))
    return stacked


def randomize_upper(params: Mapping, config, layer: int, depth: int, key, *, norms: str = "keep") -> dict:
    """Parameters with the head and the top ``depth - 1`` blocks re-initialised (cascading randomisation).

    params: the model's pytree (``{"lm": {...}, ...}``) or the LM's own (``{"embed", "layers", "final_norm",
      "lm_head"}``); the stacked block tensors have the layer on axis 0 (``params["lm"]["layers"][name][i]``,
      see dcam_jax.models.llada). config: MLLMConfig or LMConfig (for ``n_layers``). layer: the hooked block L.
      depth: 0 (unchanged) .. ``n_layers - layer`` (head and every block above L), see :func:`upper_targets`.
      key: a jax PRNG key; each tensor's values come from ``fold_in(key, crc32(its name))``, so they do not depend
      on ``depth`` (depth k + 1 contains depth k's random tensors) or on ``layer``.
      norms: "keep" leaves every RMSNorm scale as trained; "reset" sets the randomised blocks' ``attn_norm`` and
      ``mlp_norm`` rows and ``final_norm`` (with the head) to 1.
    Every other randomised tensor ([D, V] head, [D, X] / [X, D] block matrices) becomes normal(0, s) with s the
    standard deviation of the trained tensor (of its own block for stacked tensors). Everything else is returned
    as the same arrays (not copied). Returns a new pytree of the same structure.
    """
    import jax.numpy as jnp

    from dcam_jax.models.config import MLLMConfig

    if norms not in NORM_MODES:
        raise ValueError(f"norms={norms!r}; expected one of {NORM_MODES}")
    lm_cfg = config.lm if isinstance(config, MLLMConfig) else config
    blocks = upper_targets(lm_cfg.n_layers, layer, depth)
    nested = "lm" in params
    lm = dict(params["lm"] if nested else params)
    if depth >= 1:
        lm["lm_head"] = _redraw_rows(lm["lm_head"][None], key, ["lm_head"], [0])[0]
        if norms == "reset":
            lm["final_norm"] = jnp.ones_like(lm["final_norm"])
    if blocks:
        layers = dict(lm["layers"])
        for name, arr in layers.items():
            if not _is_norm(name):
                layers[name] = _redraw_rows(arr, key, [f"layers/{name}/{i}" for i in blocks], blocks)
            elif norms == "reset":
                layers[name] = arr.at[jnp.asarray(blocks)].set(1)
        lm["layers"] = layers
    if not nested:
        return lm
    out = dict(params)
    out["lm"] = lm
    return out


# ----------------------------------------------------------------------------------------------------------
# measures


def rank_correlation(a, b, *, ndim: int = 2) -> np.ndarray | float:
    """Spearman rank correlation between maps, ties given their average rank (as scipy.stats.spearmanr).

    a, b: arrays of the same shape [..., *S] where the trailing ``ndim`` axes S (default 2: [H, W]) are the
    pixels of one map. Returns [...] float64 (a float for a single map): the Pearson correlation of the ranks,
    NaN where either map is constant (all ranks tied, no correlation defined).
    """
    from scipy.stats import rankdata

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"maps of different shapes {a.shape} and {b.shape}")
    if a.ndim < ndim or ndim < 1:
        raise ValueError(f"expected arrays with at least ndim={ndim} axes, got shape {a.shape}")
    lead = a.shape[:a.ndim - ndim]
    ra = rankdata(a.reshape(lead + (-1,)), axis=-1, method="average")
    rb = rankdata(b.reshape(lead + (-1,)), axis=-1, method="average")
    ra = ra - ra.mean(-1, keepdims=True)
    rb = rb - rb.mean(-1, keepdims=True)
    num = (ra * rb).sum(-1)
    den = np.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return float(r) if r.ndim == 0 else r


def points_at(map_hw, named_mask, other_mask) -> dict:
    """Does a map point at the named object rather than the other one?

    map_hw: [h, w] float map in [0, 1] (grid resolution; resized bilinearly to the masks' size as eval.run does);
    named_mask, other_mask: [H, W] bool masks of the named and the other object.
    Returns {"mass": sum inside named > sum inside other, "density": mean inside named > mean inside other,
    "pointing": every pixel attaining the maximum lies inside the named mask, "mass_named", "mass_other"}.
    Ties (e.g. an all-zero map) do not point.
    """
    from dcam_jax import metrics

    named, other = np.asarray(named_mask, bool), np.asarray(other_mask, bool)
    if named.shape != other.shape or named.ndim != 2:
        raise ValueError(f"masks must be [H, W] of one shape, got {named.shape} and {other.shape}")
    if not named.any() or not other.any():
        raise ValueError("an object mask is empty")
    big = np.asarray(metrics.resize_map(np.asarray(map_hw, np.float32), named.shape), np.float64)
    mn, mo = float(big[named].sum()), float(big[other].sum())
    dn, do = mn / named.sum(), mo / other.sum()
    return {"mass": bool(mn > mo), "density": bool(dn > do),
            "pointing": bool(metrics.pointing_game(big, named.astype(np.uint8))),
            "mass_named": mn, "mass_other": mo}


def _stats(values: Sequence[float]) -> dict:
    v = np.asarray(values, np.float64)
    ok = v[np.isfinite(v)]
    return {"mean": float(ok.mean()) if ok.size else None, "std": float(ok.std()) if ok.size else None,
            "mean_abs": float(np.abs(ok).mean()) if ok.size else None,
            "median": float(np.median(ok)) if ok.size else None, "n": int(ok.size),
            "undefined": int(v.size - ok.size)}


# ----------------------------------------------------------------------------------------------------------
# generation and explanation of one item


@dataclasses.dataclass
class Answered:
    """One image with its generated answer: the eval.run Item, api.Prepared, api.Generation and word infos."""

    item: Any
    pre: Any
    gen: Any
    infos: list


def prepare_item(model, item, *, seed: int) -> Answered:
    """Generate the answer of an eval.run Item ONCE (greedy, key fold_in(key(seed), index) as eval.run) and align
    its words with the objects (:func:`eval.run.shapes_word_infos`)."""
    import jax

    from dcam_jax import api
    from dcam_jax.cam import explain as ex
    from eval import run as R

    pre = api.prepare(model, item.image, item.prompt)
    sampling = dataclasses.replace(api.default_sampling(model.config), temperature=0.0)
    gen = api.generate(model, item.image, item.prompt, key=jax.random.fold_in(jax.random.key(seed), item.index),
                       prepared=pre, sampling=sampling)
    words = ex.group_words(gen.token_strings[:gen.num_valid]) if gen.num_valid else []
    return Answered(item, pre, gen, R.shapes_word_infos(item.shapes_example, words))


def explain_words(model, p: Answered, words: Sequence, cam, *, seed: int, params=None):
    """Maps of ``words`` (WordInfos of ``p``) with ``cam``; ``params`` replaces the model's (same config).

    Returns (refined [T, H, W], raw [T, H, W]) float32 at grid resolution, in the order of ``words``. The PRNG key
    (noise probes) depends only on (seed, example index, method), so it is the same for every parameter set.
    """
    import jax

    from dcam_jax import api
    from eval import run as R

    m = model if params is None else dataclasses.replace(model, params=params)
    g = p.gen
    unique = list(dict.fromkeys(w.word for w in words))
    key = R.method_key(jax.random.fold_in(jax.random.key(seed), p.item.index), cam.method)
    e = api.explain_prepared(m, p.pre, g.tokens, g.token_strings, g.num_valid, unique, cam,
                             commit_step=g.commit_step, num_steps=g.num_steps, key=key, text=g.text)
    by_pos = {tuple(q): j for j, q in enumerate(e.positions)}
    idx = [by_pos[tuple(w.positions)] for w in words]
    return e.maps[idx], e.raw_maps[idx]


def _object_words(p: Answered) -> list:
    return [w for w in p.infos if w.role == "object"]


# ----------------------------------------------------------------------------------------------------------
# the two checks


def cascading_randomization(model, prepared: Sequence[Answered], cams: Mapping[str, Any], *, seed: int = 0,
                            norms: str = "keep", bar=None) -> dict:
    """Cascading randomisation of every method in ``cams`` ({name: CamConfig}) on the prepared images.

    Each image's object words are explained with the original parameters, then with :func:`randomize_upper`'s
    parameters at depths 1 .. ``n_layers - L`` (L: the method's resolved layer); the same answer, trajectory and
    PRNG key every time. The random parameters of a depth are shared by all methods (they do not depend on L).
    Returns {method: {"layer": L, "words": number of maps compared, "depths": [{"depth", "label", "blocks",
    "refined": stats, "raw": stats}]}} where stats = {"mean", "std", "mean_abs", "median", "n", "undefined"} of the
    per-word rank correlations (:func:`rank_correlation`; undefined = a constant map).
    """
    import jax

    from dcam_jax.cam import explain as ex

    n_layers = model.config.lm.n_layers
    layers = {m: ex.resolve(c, model.config).layer for m, c in cams.items()}
    words = [_object_words(p) for p in prepared]
    orig: dict[str, list] = {m: [] for m in cams}
    for m, cam in cams.items():
        for p, ws in zip(prepared, words):
            orig[m].append(explain_words(model, p, ws, cam, seed=seed) if ws else None)
            if bar is not None:
                bar.update(1)
    key = jax.random.key(seed)
    corr: dict[str, dict[int, dict[str, list]]] = {m: {} for m in cams}
    for depth in range(1, max(max_depth(n_layers, L) for L in layers.values()) + 1):
        todo = [m for m in cams if depth <= max_depth(n_layers, layers[m])]
        # depth does not depend on L: build the parameters for the method with the lowest layer among those left
        params = randomize_upper(model.params, model.config, min(layers[m] for m in todo), depth, key, norms=norms)
        for m in todo:
            acc = corr[m].setdefault(depth, {"refined": [], "raw": []})
            for p, ws, o in zip(prepared, words, orig[m]):
                if ws:
                    ref, raw = explain_words(model, p, ws, cams[m], seed=seed, params=params)
                    acc["refined"].extend(np.atleast_1d(rank_correlation(o[0], ref)).tolist())
                    acc["raw"].extend(np.atleast_1d(rank_correlation(o[1], raw)).tolist())
                if bar is not None:
                    bar.update(1)
        del params
    out = {}
    for m in cams:
        L = layers[m]
        out[m] = {"layer": int(L), "words": int(sum(len(w) for w in words)),
                  "depths": [{"depth": d, "label": depth_label(n_layers, d),
                              "blocks": upper_targets(n_layers, L, d),
                              "refined": _stats(corr[m][d]["refined"]), "raw": _stats(corr[m][d]["raw"])}
                             for d in range(1, max_depth(n_layers, L) + 1)]}
    return out


def two_object_indices(split: str, preset: str, count: int, *, max_scan: Optional[int] = None) -> tuple[list, int]:
    """The first ``count`` indices of a ShapesWorld split whose example has exactly two objects.

    Scans at most ``max_scan`` indices (default 50 per requested image). Returns (indices, number scanned).
    """
    from dcam_jax.data import shapes

    cfg = shapes.preset(preset)
    limit = _SCAN_FACTOR * count if max_scan is None else max_scan
    found, i = [], 0
    while len(found) < count and i < limit:
        if shapes.make_example(shapes.split_seed(split, i), cfg).num_objects == 2:
            found.append(i)
        i += 1
    return found, i


def discrimination(model, prepared: Sequence[Answered], cams: Mapping[str, Any], *, seed: int = 0,
                   bar=None) -> dict:
    """Two-object discrimination of every method in ``cams`` ({name: CamConfig or None for a pseudo-method}).

    prepared: two-object images. An image counts when its answer names both objects correctly
    (eval.run.shapes_caption_eval ``all_correct``); its object words aligned with exactly one object are explained
    and scored with :func:`points_at` against (the named object's mask, the other object's mask), on refined and
    raw maps. Returns {"images": n, "images_correct": n, "words": n, "methods": {method: {"refined": {"mass",
    "density", "pointing"}, "raw": {...}, "n": words}}} with shares in [0, 1] (None without words).
    """
    from eval import run as R

    used, n_words = 0, 0
    hits: dict[str, dict[str, dict[str, list]]] = {
        m: {v: {k: [] for k in ("mass", "density", "pointing")} for v in ("refined", "raw")} for m in cams}
    for p in prepared:
        item = p.item
        if item.shapes_example.num_objects != 2:
            raise ValueError(f"{item.example_id} has {item.shapes_example.num_objects} objects; expected 2")
        ok = R.shapes_caption_eval(item.shapes_example, p.gen.text)["all_correct"]
        words = [w for w in _object_words(p) if w.status == "matched" and len(w.objects) == 1] if ok else []
        if words:
            used += 1
            n_words += len(words)
        for m, cam in cams.items():
            if words:
                if cam is None:
                    grid = p.pre.layout.shape(p.pre.layout.default_view)
                    ref = raw = R.pseudo_maps(m, len(words), grid, seed, item.index)
                else:
                    ref, raw = explain_words(model, p, words, cam, seed=seed)
                for w, mr, mw in zip(words, ref, raw):
                    j = w.objects[0]
                    named, other = item.object_masks[j], item.object_masks[1 - j]
                    for v, mp in (("refined", mr), ("raw", mw)):
                        r = points_at(mp, named, other)
                        for k in ("mass", "density", "pointing"):
                            hits[m][v][k].append(bool(r[k]))
            if bar is not None:
                bar.update(1)
    share = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    return {"images": len(prepared), "images_correct": used, "words": n_words,
            "methods": {m: {v: {k: share(h[v][k]) for k in h[v]} for v in h} | {"n": len(h["refined"]["mass"])}
                        for m, h in hits.items()}}


# ----------------------------------------------------------------------------------------------------------
# reporting


def _f(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def markdown(result: dict) -> str:
    """The tables of a sanity result: rank correlation per method and depth (refined and raw maps; the last
    column says whether the mean at full depth is below 0.5, SPEC 4.6's bar), then the discrimination shares."""
    lines = [f"# Sanity checks: {result['model']['name']}, ShapesWorld {result['config']['split']} "
             f"({result['config']['shapes_preset']})", ""]
    rnd = result.get("randomization")
    if rnd:
        n_layers = result["model"]["n_layers"]
        depth = max(len(r["depths"]) for r in rnd.values())
        lines += [f"## Cascading randomisation ({result['randomization_images']} images, norms "
                  f"{result['config']['norms']})", "",
                  "Mean Spearman rank correlation between the original map and the map with the head and the top "
                  "blocks re-initialised (cumulative from the top, down to block L + 1). Lower is better; SPEC 4.6 "
                  "asks for well below 0.5 at full depth.", ""]
        for kind in ("refined", "raw"):
            head = "| Method | L | words | " + " | ".join(f"{d + 1}: {depth_label(n_layers, d + 1)}"
                                                        for d in range(depth)) + " | < 0.5 at full depth |"
            lines += [f"**{kind} maps**", "", head, "|" + "---|" * (depth + 4)]
            for m, r in rnd.items():
                cells = [_f(x[kind]["mean"]) + (f" ({x[kind]['undefined']} undef.)" if x[kind]["undefined"] else "")
                         for x in r["depths"]]
                cells += ["-"] * (depth - len(cells))
                last = r["depths"][-1][kind]["mean"]
                verdict = "-" if last is None else ("yes" if last < 0.5 else "no")
                lines.append(f"| {m} | {r['layer']} | {r['words']} | " + " | ".join(cells) + f" | {verdict} |")
            lines.append("")
    dis = result.get("discrimination")
    if dis:
        lines += [f"## Two-object discrimination ({dis['images']} two-object images scanned from "
                  f"{dis['scanned']} indices, {dis['images_correct']} with a correct answer, {dis['words']} words)",
                  "", "Share (%) of object words whose map points at the named object rather than the other one: "
                  "mass = more map mass inside the named mask, density = higher mean inside it, pointing = the "
                  "maximum inside it.", "",
                  "| Method | words | mass % | density % | pointing % | raw mass % | raw density % | raw pointing % |",
                  "|" + "---|" * 8]
        for m, r in dis["methods"].items():
            a, b = r["refined"], r["raw"]
            lines.append(f"| {m} | {r['n']} | {_f(a['mass'], True)} | {_f(a['density'], True)} | "
                         f"{_f(a['pointing'], True)} | {_f(b['mass'], True)} | {_f(b['density'], True)} | "
                         f"{_f(b['pointing'], True)} |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Optional[Path]:
    """Line plot of mean rank correlation vs number of randomised layers from the top (refined and raw maps),
    one line per method, 0.3 and 0.5 reference lines. Written atomically; None without randomisation results."""
    rnd = result.get("randomization")
    if not rnd:
        return None
    from eval import report

    plt = report._plt()
    n_layers = result["model"]["n_layers"]
    depth = max(len(r["depths"]) for r in rnd.values())
    lows = [d[k]["mean"] for r in rnd.values() for d in r["depths"] for k in ("refined", "raw")
            if d[k]["mean"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0), sharey=True)
    for ax, kind in zip(axes, ("refined", "raw")):
        for m, r in rnd.items():
            xs = [d["depth"] for d in r["depths"]]
            ys = [np.nan if d[kind]["mean"] is None else d[kind]["mean"] for d in r["depths"]]
            ax.plot(xs, ys, marker="o", label=f"{m} (L={r['layer']})")
        for y in (0.3, 0.5):
            ax.axhline(y, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(1, depth + 1), [depth_label(n_layers, d) for d in range(1, depth + 1)], fontsize=8)
        ax.set_xlabel("layers randomised from the top (cumulative)")
        ax.set_title(f"{kind} maps", fontsize=10)
        ax.set_ylim(min([-0.2] + [v - 0.05 for v in lows]), 1.05)
    axes[0].set_ylabel("mean Spearman rank correlation")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Cascading randomisation: {result['model']['name']}, {result['randomization_images']} images",
                 fontsize=10)
    return fileio.save_figure(fig, path, dpi=90)


def _nan_to_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x


# ----------------------------------------------------------------------------------------------------------
# the run


def cams_for(cfg: SanityConfig, model) -> dict:
    """{method: resolved CamConfig, or None for a pseudo-method}; --layer applies to gradient methods only (as
    eval.run's cam_config_for). Raises ValueError for a layer the model does not have."""
    from dcam_jax.cam import explain as ex
    from eval import run as R

    rc = R.RunConfig(methods=cfg.methods, layer=cfg.layer)
    cams = {m: R.cam_config_for(m, rc) for m in cfg.methods}
    return {m: (None if c is None else ex.resolve(c, model.config)) for m, c in cams.items()}


def run(cfg: SanityConfig, *, model=None) -> dict:
    """Both checks (see the module docstring) and the three output files. Returns the result dict (sanity.json).

    model: an already loaded dcam_jax.api.Model (tests); None loads ``cfg.checkpoint``.
    """
    from dcam_jax import api
    from eval import run as R

    cfg = validate(cfg)
    t0 = time.time()
    if model is None:
        model = api.load_pretrained(cfg.checkpoint)
    cams = cams_for(cfg, model)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = R.ShapesSource(R.RunConfig(split=cfg.split, shapes_preset=cfg.shapes_preset))
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
    result = _nan_to_none(result)
    fileio.write_text(out / "sanity.json", json.dumps(result, indent=2, allow_nan=False) + "\n")
    fileio.write_text(out / "sanity.md", markdown(result))
    plot(result, out / "sanity.png")
    return result


def _progress(cfg: SanityConfig, total: int):
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
    from dcam_jax.cli import run_tool

    run_tool(main)
