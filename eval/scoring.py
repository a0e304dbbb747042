"""Per-example work of a run: explain every word with every method and score the maps."""

from __future__ import annotations

import dataclasses
import time
import zlib
from typing import Any, Optional, Sequence

import numpy as np

from eval.config import PSEUDO_METHODS, RunConfig
from eval.sources import Item, WordInfo
from eval.store import CachedGeneration, GenerationCache


# ----------------------------------------------------------------------------------------------------------
# per-example work


def cam_config_for(method: str, cfg: RunConfig):
    """The CamConfig of a gradient method or TAM under the run's overrides (None for pseudo-methods)."""
    from dcam_jax.cam import config as cam_config
    from dcam_jax.cam import targets as cam_targets
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
    return cam_config.CamConfig(**kw)


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
    from dcam_jax.cam import targets as cam_targets
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
    words = cam_targets.group_words(gen.token_strings[:gen.num_valid]) if gen.num_valid else []
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
