"""The computations of ``python -m eval.sanity`` (the protocol is described in eval/sanity.py's docstring).

- randomising the top of the LM: :func:`randomize_upper` re-draws the head and the blocks above the hooked layer,
  depth by depth (:func:`upper_targets`, :func:`max_depth`, :func:`depth_label`);
- the measures: :func:`rank_correlation` (Spearman, ties averaged) and :func:`points_at` (mass, density, pointing);
- one answer per image (:func:`prepare_item`, :class:`Answered`) and its word maps (:func:`explain_words`);
- the two checks over many images: :func:`cascading_randomization` and :func:`discrimination` (with
  :func:`two_object_indices`, the two-object images of a split).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Mapping, Optional, Sequence

import numpy as np

NORM_MODES = ("keep", "reset")
# how many split indices are scanned per requested two-object image before giving up (about 1 in 4 images of the
# default preset has two objects; the easy preset has none)
_SCAN_FACTOR = 50

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
    from dcam_jax.cam.targets import group_words
    from eval import sources

    pre = api.prepare(model, item.image, item.prompt)
    sampling = dataclasses.replace(api.default_sampling(model.config), temperature=0.0)
    gen = api.generate(model, item.image, item.prompt, key=jax.random.fold_in(jax.random.key(seed), item.index),
                       prepared=pre, sampling=sampling)
    words = group_words(gen.token_strings[:gen.num_valid]) if gen.num_valid else []
    return Answered(item, pre, gen, sources.shapes_word_infos(item.shapes_example, words))


def explain_words(model, p: Answered, words: Sequence, cam, *, seed: int, params=None):
    """Maps of ``words`` (WordInfos of ``p``) with ``cam``; ``params`` replaces the model's (same config).

    Returns (refined [T, H, W], raw [T, H, W]) float32 at grid resolution, in the order of ``words``. The PRNG key
    (noise probes) depends only on (seed, example index, method), so it is the same for every parameter set.
    """
    import jax

    from dcam_jax import api
    from eval import scoring

    m = model if params is None else dataclasses.replace(model, params=params)
    g = p.gen
    unique = list(dict.fromkeys(w.word for w in words))
    key = scoring.method_key(jax.random.fold_in(jax.random.key(seed), p.item.index), cam.method)
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

    from dcam_jax.cam.config import resolve

    n_layers = model.config.lm.n_layers
    layers = {m: resolve(c, model.config).layer for m, c in cams.items()}
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
    from eval import scoring, sources

    used, n_words = 0, 0
    hits: dict[str, dict[str, dict[str, list]]] = {
        m: {v: {k: [] for k in ("mass", "density", "pointing")} for v in ("refined", "raw")} for m in cams}
    for p in prepared:
        item = p.item
        if item.shapes_example.num_objects != 2:
            raise ValueError(f"{item.example_id} has {item.shapes_example.num_objects} objects; expected 2")
        ok = sources.shapes_caption_eval(item.shapes_example, p.gen.text)["all_correct"]
        words = [w for w in _object_words(p) if w.status == "matched" and len(w.objects) == 1] if ok else []
        if words:
            used += 1
            n_words += len(words)
        for m, cam in cams.items():
            if words:
                if cam is None:
                    grid = p.pre.layout.shape(p.pre.layout.default_view)
                    ref = raw = scoring.pseudo_maps(m, len(words), grid, seed, item.index)
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
