"""The evaluation harness end to end on a tiny random model: run -> JSONL -> crash + resume -> report, a 2-cell
sweep, the word -> object alignment, the COCO and GranDf readers on fake data, and --help of the entry points.

The tiny model may only sample ShapesWorld caption words (its sampling defaults suppress every other id), so its
(random) answers are made of colour, shape, size, relation and function words: some name objects of the image,
many are hallucinated. Every run uses ``targets=all`` and answers without a stop token, so each method explains
the same number of words per example and compiles once for the whole module.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

from dcam_jax import api
from dcam_jax import checkpoint as ckpt
from dcam_jax.data import coco, grandf, shapes
from dcam_jax.models import config as C
from dcam_jax.processing import image as pimg
from dcam_jax.processing import text as ptext
from dcam_jax.toy import tokenizer as toy_tok
from eval import report
from eval import config as eval_config
from eval import scoring
from eval import sources
from eval import store
from eval import run as R
from eval import sweep as S

ROOT = Path(__file__).resolve().parents[2]
GEN = 6  # answer tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(Model, checkpoint dir) of a tiny random dMLLM with the toy tokenizer."""
    tdir = tmp_path_factory.mktemp("tok")
    toy_tok.save_tokenizer(tdir)
    tok = ptext.load_tokenizer(tdir)
    vocab = toy_tok.vocabulary()
    # the sampler never picks anything but caption words, so answers are ShapesWorld words and never stop early
    banned = tuple(i for i, w in enumerate(vocab) if w not in shapes.WORD_CLASS)
    cfg = C.tiny_mllm(lm=C.tiny_lm(vocab_size=len(vocab), **toy_tok.special_token_ids()),
                      sampling_defaults=(("suppress_ids", banned),))
    # numpy init of every parameter (mllm.init_mllm_params dispatches one small jax op per leaf: slow on CPU)
    rng = np.random.default_rng(0)
    flat = {}
    for path, shape in ckpt.param_shapes(cfg).items():
        if path[-1] in ("attn_norm", "mlp_norm", "final_norm", "scale"):
            flat[path] = np.ones(shape, np.float32)
        elif path[-1] == "bias":
            flat[path] = np.zeros(shape, np.float32)
        else:  # the head a little larger: livelier random answers at temperature 1
            flat[path] = rng.normal(0.0, 0.06 if path[-1] == "lm_head" else 0.02, shape).astype(np.float32)
    params = jax.tree.map(jax.numpy.asarray, ckpt.unflatten(flat))
    model = api.Model(cfg, params, tok, pimg.ImageProcessor(cfg))
    cdir = ckpt.save_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", cfg, params, tokenizer_dir=tdir)
    return model, cdir


def _cfg(out, **kw):
    base = dict(checkpoint="toy", out_dir=str(out), num_examples=3, gen_length=GEN, temperature=1.0,
                targets="all", methods=("diffusion_cam", "gradcam", "uniform"), progress=False, plots=False,
                save_maps=2)
    base.update(kw)
    return eval_config.RunConfig(**base)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture
def count_calls(monkeypatch):
    """Counts calls of api.generate and api.explain_prepared (independently of the harness's own counters)."""
    calls = {"generate": 0, "explain": 0}
    gen, exp = api.generate, api.explain_prepared

    def g(*a, **k):
        calls["generate"] += 1
        return gen(*a, **k)

    def e(*a, **k):
        calls["explain"] += 1
        return exp(*a, **k)

    monkeypatch.setattr(api, "generate", g)
    monkeypatch.setattr(api, "explain_prepared", e)
    return calls


# ----------------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_run_resume_report(tiny, tmp_path, count_calls):
    model, _ = tiny
    out = tmp_path / "run"
    res = R.run(_cfg(out), model=model)
    assert count_calls == {"generate": 3, "explain": 6} == res["calls"]
    rec_file = out / "records-00000-of-00001.jsonl"
    recs = _lines(rec_file)
    examples = [r for r in recs if r["type"] == "example"]
    words = [r for r in recs if r["type"] == "word"]
    assert [e["example"] for e in examples] == [0, 1, 2]
    for e in examples:  # one line per (method, word): targets=all explains every word
        assert len(e["words"]) == GEN
        assert sum(w["example"] == e["example"] for w in words) == 3 * GEN
    # independent checks of the alignment and of the uniform map's closed-form metrics
    for w in words:
        ex = shapes.make_example(shapes.split_seed("test", w["example"]))
        attr = {"colour": ex.colours, "shape": ex.shapes, "size": ex.sizes}.get(w["word_class"])
        if attr is not None:
            hits = [j for j, v in enumerate(attr) if v == w["word"]]
            assert w["status"] == ("matched" if hits else "hallucinated")
            assert set(w["objects"]) <= set(hits) and (not hits or w["objects"])
        else:
            assert w["role"] in ("function", "other") and w.get("matched") is None
        if w["method"] == "uniform" and w["status"] == "matched":
            area = ex.masks[w["objects"]].any(0).sum() / ex.label_map.size
            assert w["matched"]["obj_iou"] == pytest.approx(area)
            assert w["matched"]["contrast"] == pytest.approx(1.0, rel=1e-6)
            assert w["matched"]["concentration"] == pytest.approx(area, rel=1e-6)
            largest = max(m.sum() for m in ex.masks) / ex.label_map.size
            assert w["max"]["obj_iou"] == pytest.approx(largest)
    # at least some words of each kind, or the checks above are vacuous
    statuses = {w["status"] for w in words}
    assert {"matched", "hallucinated"} <= statuses
    # Func-IoU of function words exists exactly when the answer has a shape noun
    for w in words:
        if w["role"] == "function":
            has_noun = any(o["example"] == w["example"] and o["word_class"] == "shape" for o in words)
            assert (w["func_iou"] is not None) == has_noun

    # a crash while writing example 2: cut its block in the middle of a line
    text = rec_file.read_bytes()
    start2 = text.index(b'{"type": "word", "example": 2')
    rec_file.write_bytes(text[:start2 + 200])
    for k in count_calls:
        count_calls[k] = 0
    res = R.run(dataclasses.replace(_cfg(out), num_examples=4, resume=True), model=model)
    # example 2 is redone (its answer comes from the cache), example 3 is new
    assert count_calls == {"generate": 1, "explain": 4}
    assert res["examples_done"] == 2 and res["examples_skipped_resume"] == 2
    recs = _lines(rec_file)
    keys = [(r["example"], r["method"], r["word_index"]) for r in recs if r["type"] == "word"]
    assert len(keys) == len(set(keys)) == 4 * 3 * GEN
    assert [r["example"] for r in recs if r["type"] == "example"] == [0, 1, 2, 3]
    # the redone example equals the first attempt (same cached answer, deterministic maps)
    redo = {(r["method"], r["word_index"]): r for r in recs if r["type"] == "word" and r["example"] == 2}
    first = {(r["method"], r["word_index"]): r for r in words if r["example"] == 2}
    for k, r in first.items():
        assert redo[k]["word"] == r["word"]
        assert redo[k]["map_mean"] == pytest.approx(r["map_mean"], abs=1e-6)

    # report: the table numbers are plain averages of the records
    summary = json.loads((out / "summary.json").read_text())
    s = summary["runs"][0]
    assert s["examples"]["evaluated"] == 4
    words = [r for r in recs if r["type"] == "word"]
    for method in ("diffusion_cam", "gradcam", "uniform"):
        for mode in ("matched", "max"):
            vals = [r[mode]["obj_iou"] for r in words if r["method"] == method and r.get(mode)]
            assert s["results"][method][mode]["n"] == len(vals)
            assert s["results"][method][mode]["obj_iou"] == pytest.approx(np.mean(vals))
        fi = [r["func_iou"] for r in words if r["method"] == method and r.get("func_iou") is not None]
        assert (s["results"][method]["func_iou"] or {}).get("n", 0) == len(fi)
    n_hall = sum(1 for r in words if r["method"] == "uniform" and r["status"] == "hallucinated")
    assert s["words"]["hallucinated"] == n_hall
    md = (out / "summary.md").read_text()
    for method in ("diffusion_cam", "gradcam", "uniform"):
        assert f"| {method} |" in md
    # maps saved for the first two examples, and the CLI-style report with plots reads them back
    assert sorted(p.name for p in (out / "maps").glob("*.npz")) == ["shapes-test-0.npz", "shapes-test-1.npz"]
    written = report.write_outputs(tmp_path / "rep", report.build_summary([out]))
    pngs = [p for p in written if p.suffix == ".png"]
    assert {p.name for p in pngs} >= {"metrics.png", "examples_diffusion_cam.png", "examples_uniform.png"}
    for p in pngs:
        with Image.open(p) as im:
            assert im.size[0] > 100 and im.size[1] > 100


@pytest.mark.slow
def test_faithfulness_records_and_report(tiny, tmp_path):
    from dcam_jax import metrics
    from dcam_jax.cam import faithfulness as fa

    model, _ = tiny
    out = tmp_path / "faith"
    R.run(_cfg(out, num_examples=2, faithfulness=True, faithfulness_steps=4, faithfulness_batch_size=3), model=model)
    recs = _lines(out / "records-00000-of-00001.jsonl")
    words = [r for r in recs if r["type"] == "word"]
    objs = [r for r in words if r["role"] == "object"]
    assert objs, "no object words: the checks below would be vacuous"
    assert all("faithfulness" not in r for r in words if r["role"] != "object")
    by_word = {}
    for r in objs:
        f = r["faithfulness"]
        assert all(np.all(np.isfinite(v)) for v in f.values())
        by_word.setdefault((r["example"], r["word_index"]), []).append((r["method"], f))
    for (ex_i, wi), fs in by_word.items():  # one scorer per word: same end points for every method
        assert len({round(f["full_score"], 5) for _, f in fs}) == 1
        assert len({round(f["baseline_score"], 5) for _, f in fs}) == 1
    # the uniform map deletes patches in raster order: recompute its curve directly
    (ex_i, wi), fs = next(iter(by_word.items()))
    example = next(r for r in recs if r["type"] == "example" and r["example"] == ex_i)
    item = sources.ShapesSource(_cfg(out)).item(ex_i)
    pre = api.prepare(model, item.image, item.prompt)
    w = next(r for r in objs if r["example"] == ex_i and r["word_index"] == wi and r["method"] == "uniform")
    tokens = np.asarray(model.tokenizer(example["answer"]).input_ids, np.int32)
    assert len(tokens) == GEN
    score = fa.word_scorer(model, pre.prompt_ids, tokens, w["positions"], image_shape=item.image.shape[:2])
    v = model.config.vision
    want = metrics.deletion_insertion_curves(score, item.image, np.ones((4, 4)), num_steps=4,
                                             patch=round(64 * v.patch_size / v.image_size),
                                             baseline=fa.baseline_image(item.image, "mean"))
    assert w["faithfulness"]["deletion_auc"] == pytest.approx(want.deletion_auc, abs=1e-4)
    assert w["faithfulness"]["insertion_auc"] == pytest.approx(want.insertion_auc, abs=1e-4)
    s = json.loads((out / "summary.json").read_text())["runs"][0]
    for m in ("diffusion_cam", "gradcam", "uniform"):
        vals = [r["faithfulness"]["deletion_auc"] for r in objs if r["method"] == m]
        assert s["results"][m]["faithfulness"]["n"] == len(vals)
        assert s["results"][m]["faithfulness"]["deletion_auc"] == pytest.approx(np.mean(vals))
    assert "Deletion AUC" in (out / "summary.md").read_text()
    paired = s["paired_faithfulness"]
    assert paired["reference"] == "diffusion_cam" and set(paired["against"]) == {"gradcam", "uniform"}
    for m in ("gradcam", "uniform"):
        key = lambda r: (r["example_id"], r["word_index"])
        ref = {key(r): r["faithfulness"] for r in objs if r["method"] == "diffusion_cam"}
        d = [ref[key(r)]["insertion_auc"] - r["faithfulness"]["insertion_auc"] for r in objs if r["method"] == m]
        assert paired["against"][m]["n"] == len(d)
        assert paired["against"][m]["insertion"] == pytest.approx(np.mean(d))
        assert paired["against"][m]["insertion_se"] == pytest.approx(np.std(d, ddof=1) / np.sqrt(len(d)))
    assert "Paired over the same words, diffusion_cam minus" in (out / "summary.md").read_text()

    # stored curves: their trapezoid areas are the AUCs, and the summary's mean curve is their mean
    for r in objs:
        f = r["faithfulness"]
        assert np.trapezoid(f["deletion"], f["fractions"]) == pytest.approx(f["deletion_auc"], abs=1e-3)
        assert f["deletion"][0] == pytest.approx(f["full_score"], abs=1e-4)
    fs = s["results"]["gradcam"]["faithfulness"]
    curves = [r["faithfulness"]["insertion"] for r in objs if r["method"] == "gradcam"]
    np.testing.assert_allclose(fs["mean_insertion_curve"], np.mean(curves, axis=0), atol=1e-6)
    written = report.write_outputs(tmp_path / "rep", report.build_summary([out]))
    png = next(p for p in written if p.name == "faithfulness.png")
    with Image.open(png) as im:
        assert im.size[0] > 300


def test_paired_faithfulness_needs_two_methods():
    rec = lambda m, i, a: {"method": m, "example_id": "e", "word_index": i,
                           "faithfulness": {"deletion_auc": -a, "insertion_auc": a}}
    words = [rec("a", 0, 1.0), rec("a", 1, 2.0), rec("b", 0, 0.5), rec("b", 1, 1.0)]
    got = report.paired_faithfulness(words, ["a", "b"])["against"]["b"]
    assert got["n"] == 2 and got["insertion"] == pytest.approx(0.75) and got["deletion"] == pytest.approx(-0.75)
    assert got["insertion_se"] == pytest.approx(0.25)
    assert report.paired_faithfulness(words, ["a"]) is None
    assert report.paired_faithfulness([w for w in words if w["method"] == "a"], ["a", "b"]) is None


@pytest.mark.slow
def test_alignment_measure_and_table(tiny):
    """eval.alignment end to end on the tiny model (the gradient-activation identity itself is checked against
    finite differences in tests/cam/test_alignment.py)."""
    from eval import alignment

    model, _ = tiny
    source = sources.ShapesSource(_cfg("unused"))
    res = alignment.measure(model, source, range(2), [0, 1], max_words=3)
    assert len(res[0]) == len(res[1]) > 0
    for L in (0, 1):
        for r in res[L]:
            assert 0.0 <= r["median_abs_cos"] <= 1.0 and 0.0 <= r["weighted_abs_cos"] <= 1.0
            assert r["example"] in (0, 1) and r["word"] in shapes.WORD_CLASS
            assert np.isfinite(r["norm_ratio"]) and r["norm_ratio"] > 0
    # above the last block nothing reads the image tokens' state: no gradient, reported as 0; every gradient ties
    # at 0, so the "top-gradient tokens" are all tokens and the norm ratio is exactly 1
    assert all(r["median_abs_cos"] == 0.0 and r["weighted_abs_cos"] == 0.0 for r in res[1])
    assert all(r["norm_ratio"] == 1.0 for r in res[1])
    lines = alignment.table(res).splitlines()
    assert lines[2].startswith(f"| 0 | {len(res[0])} |") and lines[3].startswith(f"| 1 | {len(res[1])} |")




def test_resume_guards(tiny, tmp_path):
    model, _ = tiny
    out = tmp_path / "run"
    R.run(_cfg(out, num_examples=1, methods=("uniform",)), model=model)
    with pytest.raises(ValueError, match="--resume"):
        R.run(_cfg(out, num_examples=1, methods=("uniform",)), model=model)
    with pytest.raises(ValueError, match="different settings.*layer"):
        R.run(_cfg(out, num_examples=1, methods=("uniform",), layer=1, resume=True), model=model)
    # --overwrite starts over
    res = R.run(_cfg(out, num_examples=1, methods=("uniform",), overwrite=True), model=model)
    assert res["examples_done"] == 1


def test_sweep_two_cells_shares_generations(tiny, tmp_path, count_calls):
    model, _ = tiny
    base = _cfg(tmp_path / "unused", num_examples=2, methods=("uniform",), save_maps=0)
    grid = S.parse_grid("refine=full,none;methods=diffusion_cam+uniform")
    res = S.run_sweep(base, grid, tmp_path / "sweep", model=model)
    assert len(res["cells"]) == 2
    assert count_calls == {"generate": 2, "explain": 4}  # answers generated by the first cell only
    assert [c["calls"]["generate"] for c in res["cells"]] == [2, 0]
    names = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert names == ["generations", "refine-full__methods-diffusion_cam+uniform",
                     "refine-none__methods-diffusion_cam+uniform"]
    md = (tmp_path / "sweep" / "sweep_summary.md").read_text()
    assert md.count("| diffusion_cam |") == 2 and md.count("| uniform |") == 2
    data = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())
    assert [c["assignment"]["refine"] for c in data["cells"]] == ["full", "none"]
    # both cells explained the same answers
    a, b = (_lines(Path(c["out_dir"]) / "records-00000-of-00001.jsonl") for c in res["cells"])
    assert [r["answer"] for r in a if r["type"] == "example"] == [r["answer"] for r in b if r["type"] == "example"]
    # the refinement changed the maps: the cells are not copies
    ma = [r["map_mean"] for r in a if r.get("method") == "diffusion_cam"]
    mb = [r["map_mean"] for r in b if r.get("method") == "diffusion_cam"]
    assert not np.allclose(ma, mb)


def test_coco_run_counts_skipped_images(tiny, tmp_path):
    """A COCO run (TAM and uniform maps, content words) on fake data: an image without mask is left out up front,
    one with an all-zero mask is skipped at read time; both are reported with their reason."""
    model, _ = tiny
    root = _fake_coco(tmp_path / "coco")
    out = tmp_path / "run"
    R.run(_cfg(out, dataset="coco", data_dir=str(root), split="val2014", methods=("tam", "uniform"),
               num_examples=10, targets="content"), model=model)
    recs = _lines(out / "records-00000-of-00001.jsonl")
    ex = [r for r in recs if r["type"] == "example"]
    assert [e["example_id"] for e in ex] == ["coco-000000000139", "coco-000000000285", "coco-000000000632"]
    assert ex[2]["skipped"] == "mask has no object pixels" and ex[0]["skipped"] is None
    assert ex[0]["reference"] == "A dog near a table."
    # ShapesWorld words name no COCO category: object words are scored in max mode only
    words = [r for r in recs if r["type"] == "word"]
    assert words and all(r["role"] in ("object", "function") for r in words)
    assert all(r["matched"] is None and r["max"] is not None for r in words if r["role"] == "object")
    s = json.loads((out / "summary.json").read_text())["runs"][0]
    assert s["examples"]["evaluated"] == 2
    assert s["examples"]["skipped_at_read"] == {"mask has no object pixels": 1}
    assert s["examples"]["left_out_up_front"] == {"no seg_label mask": 1}
    md = (out / "summary.md").read_text()
    assert "1 x mask has no object pixels" in md and "1 x no seg_label mask" in md


# ----------------------------------------------------------------------------------------------------------
# alignment and caption accuracy


def _words(caption: str):
    return [(w, (i,)) for i, w in enumerate(caption.split())]


def test_shapes_alignment_recovers_reference_caption():
    for i in range(20):
        ex = shapes.make_example(shapes.split_seed("test", i))
        infos = sources.shapes_word_infos(ex, _words(ex.caption))
        for info, k, cls in zip(infos, ex.word_object, ex.word_class):
            if cls in ("colour", "shape"):
                assert info.status == "matched" and info.objects == (k,)
            else:
                assert info.role in ("function", "other") and not info.objects


def test_shapes_alignment_repeated_attributes_and_hallucination():
    cfg = shapes.preset("hard")
    found = 0
    for i in range(200):
        ex = shapes.make_example(shapes.split_seed("test", i), cfg)
        if len(set(ex.colours)) == ex.num_objects:
            continue
        found += 1
        infos = sources.shapes_word_infos(ex, _words(ex.caption))
        for info, k, w in zip(infos, ex.word_object, ex.words):
            if info.word_class in ("colour", "shape", "size"):
                assert k in info.objects
                # every kept object agrees with the whole phrase of the reference caption
                phrase = (ex.sizes[k], ex.colours[k], ex.shapes[k])
                for j in info.objects:
                    assert (ex.sizes[j], ex.colours[j], ex.shapes[j]) == phrase
        if found >= 5:
            break
    assert found >= 5
    ex = shapes.make_example(shapes.split_seed("test", 0))
    absent = next(c for c in shapes.COLOUR_NAMES if c not in ex.colours)
    infos = sources.shapes_word_infos(ex, _words(f"a {absent} {ex.shapes[0]}"))
    assert [i.status for i in infos] == ["function", "hallucinated", "matched"]
    assert infos[2].objects == (0,)


def _brute_caption_eval(ex, phrases):
    best = None
    n, m = ex.num_objects, len(phrases)
    for perm in itertools.permutations(range(max(n, m)), n):
        col = shp = bound = 0
        for k, p in enumerate(perm):
            if p < m:
                c, s = phrases[p][1] == ex.colours[k], phrases[p][2] == ex.shapes[k]
                col, shp, bound = col + c, shp + s, bound + (c and s)
        key = (col + shp + 2 * bound, bound)
        if best is None or key > best[0]:
            best = (key, col, shp, bound)
    return best


def test_caption_eval_matches_brute_force():
    for i in range(12):
        ex = shapes.make_example(shapes.split_seed("test", i))
        ok = sources.shapes_caption_eval(ex, ex.caption)
        assert ok["all_correct"] and ok["exact"] and ok["bound_correct"] == ex.num_objects
        # swap colours across objects and drop the last one
        cols = list(ex.colours[1:]) + [ex.colours[0]]
        text = " and ".join(f"a {c} {s}" for c, s in zip(cols, ex.shapes))
        if ex.num_objects > 1:
            text = text.rsplit(" and ", 1)[0]
        got = sources.shapes_caption_eval(ex, text)
        _, col, shp, bound = _brute_caption_eval(ex, shapes.parse_caption(text))
        assert got["bound_correct"] == bound
        assert got["colour_correct"] + got["shape_correct"] + 2 * got["bound_correct"] == col + shp + 2 * bound
        assert got["all_correct"] == (ex.num_objects == 1)


# ----------------------------------------------------------------------------------------------------------
# crash-safe record files


def test_scan_records_drops_torn_block_and_refuses_corruption(tmp_path, caplog):
    p = tmp_path / "records-00000-of-00001.jsonl"
    block = lambda i: (json.dumps({"type": "word", "example": i}) + "\n" +
                       json.dumps({"type": "example", "example": i}) + "\n")
    good = block(0) + block(1)
    p.write_text(good + json.dumps({"type": "word", "example": 2}) + "\n" + '{"type": "wo')
    res = store.scan_records(p, repair=False)
    assert res.done == {0, 1} and res.dropped_lines == 2 and p.read_text() != good
    res = store.scan_records(p, repair=True)
    assert res.done == {0, 1} and p.read_text() == good
    assert "dropping 2 line(s)" in caplog.text and "incomplete" in caplog.text
    # report ignores the same torn tail
    p.write_text(good + '{"type": "word", "exa')
    words, examples, ignored = report.read_blocks(p)
    assert [e["example"] for e in examples] == [0, 1] and len(words) == 2 and ignored == 1
    p.write_text(block(0) + "garbage\n" + block(1))
    with pytest.raises(ValueError, match="corrupt"):
        store.scan_records(p, repair=True)


# ----------------------------------------------------------------------------------------------------------
# flags and errors


def test_flags_parse_and_replace():
    fv = flags.FlagValues()
    eval_config.define_flags(fv)
    fv(["prog", "--out_dir=x", "--methods=gradcam,uniform", "--layer=2", "--metric_mode=matched",
        "--temperature=0.5", "--nofunc_iou"])
    cfg = eval_config.config_from_flags(fv)
    assert cfg.methods == ("gradcam", "uniform") and cfg.layer == 2 and cfg.metric_mode == ("matched",)
    assert cfg.temperature == 0.5 and cfg.func_iou is False and cfg.gen_length is None
    c2 = eval_config.replace_config(cfg, {"layer": "none", "refine": "none", "method": "tam+uniform", "seed": "3",
                                "func_iou": "true", "shift": "0.33"})
    assert (c2.layer, c2.refine, c2.methods, c2.seed, c2.func_iou, c2.shift) == \
        (None, "none", ("tam", "uniform"), 3, True, 0.33)
    # --aggregation reaches the CamConfig of the gradient methods it applies to, never TAM's
    c3 = eval_config.replace_config(cfg, {"aggregation": "gxa", "method": "diffusion_cam+tam"})
    assert scoring.cam_config_for("diffusion_cam", c3).aggregation == "gxa"
    assert scoring.cam_config_for("tam", c3).aggregation is None
    assert scoring.cam_config_for("diffusion_cam", cfg).aggregation is None
    # --contrast: a name or an answer position
    c4 = eval_config.replace_config(cfg, {"contrast": "runner_up"})
    assert scoring.cam_config_for("diffusion_cam", c4).contrast == "runner_up"
    assert scoring.cam_config_for("diffusion_cam", eval_config.replace_config(cfg, {"contrast": "3"})).contrast == 3
    assert scoring.cam_config_for("diffusion_cam", cfg).contrast is None
    assert scoring.cam_config_for("diffusion_cam", eval_config.replace_config(cfg, {"hook": "post_attn_norm"})).hook == \
        "post_attn_norm"
    with pytest.raises(ValueError, match="expected an integer"):
        eval_config.replace_config(cfg, {"layer": "two"})
    with pytest.raises(ValueError, match="unknown run flag"):
        eval_config.replace_config(cfg, {"lauer": "2"})
    with pytest.raises(ValueError, match="no '='"):
        S.parse_grid("layer")


def test_bad_flags_give_clear_errors(tiny, tmp_path):
    _, cdir = tiny
    ok = eval_config.RunConfig(out_dir=str(tmp_path / "o"))
    cases = [
        (dict(methods=("diffusion_cam", "gradcan")), "unknown method.*gradcan"),
        (dict(dataset="coco"), "needs --data_dir"),
        (dict(dataset="coco", data_dir=str(tmp_path / "nope")), "does not exist"),
        (dict(checkpoint=str(tmp_path / "nope")), "no such directory"),
        (dict(metric_mode=("mean",)), "--metric_mode"),
        (dict(split="dev"), "--split"),
        (dict(refine="fancy"), "--refine"),
        (dict(out_dir=""), "--out_dir is required"),
        (dict(faithfulness_baseline="grey"), "--faithfulness_baseline"),
        (dict(faithfulness_steps=0), "--faithfulness_steps"),
        (dict(faithfulness_batch_size=0), "--faithfulness_batch_size"),
        (dict(contrast="second"), "--contrast"),
        (dict(hook="mlp"), "--hook"),
    ]
    for change, msg in cases:
        with pytest.raises(ValueError, match=msg):
            eval_config.validate(dataclasses.replace(ok, **change))
    # a directory that is not one of our checkpoints
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a dcam_jax checkpoint"):
        R.load_model(dataclasses.replace(ok, checkpoint=str(tmp_path / "hf")))
    # ... and one that is loads
    m = R.load_model(dataclasses.replace(ok, checkpoint=str(cdir)))
    assert m.config.lm.vocab_size == len(toy_tok.vocabulary())
    # a layer the model does not have fails before any work
    with pytest.raises(ValueError, match="layer"):
        R.run(dataclasses.replace(ok, checkpoint=str(cdir), layer=99, methods=("gradcam",), progress=False), model=m)


@pytest.mark.parametrize("module,expect", [("eval.run", ["--checkpoint", "--methods", "--resume", "--metric_mode"]),
                                           ("eval.sweep", ["--grid", "--layer", "--methods"]),
                                           ("eval.report", ["--run_dirs", "--out_dir"]),
                                           ("eval.alignment", ["--layers", "--checkpoint", "--out_json"]),
                                           ("eval.protocol", ["--run_dirs", "--out"]),
                                           ("eval.compare", ["--methods", "--examples", "--out"])])
def test_help(module, expect):
    p = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert p.returncode in (0, 1), p.stderr  # absl exits 1 after --help
    assert "Traceback" not in p.stderr
    for e in expect:
        assert e in p.stdout
    assert "Usage" in p.stdout or "usage" in p.stdout.lower()


# ----------------------------------------------------------------------------------------------------------
# dataset readers


def _fake_coco(root: Path) -> Path:
    (root / "image").mkdir(parents=True)
    (root / "seg_label").mkdir()
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    for i in (139, 285, 632, 724):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "image" / f"{i:012d}.jpg")
    m = np.zeros((64, 64), np.uint8)
    m[5:20, 5:30] = 18  # dog
    m[30:60, 10:50] = 67  # dining table
    Image.fromarray(m).save(root / "seg_label" / f"{139:012d}.png")
    m2 = np.zeros((64, 64), np.uint8)
    m2[:, 32:] = 1
    Image.fromarray(m2).save(root / "seg_label" / f"{285:012d}.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "seg_label" / f"{632:012d}.png")  # no objects
    caps = {"annotations": [{"image_id": 139, "caption": "A dog near a table."},
                            {"image_id": 139, "caption": "A brown dog."}]}
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(caps))
    return root


def test_coco_reader(tmp_path):
    root = _fake_coco(tmp_path / "coco")
    ds = coco.CocoCaptions(root, split="val2014")
    assert ds.ids == [139, 285, 632]
    assert ds.skipped == [("coco-000000000724", "no seg_label mask")]
    g = ds[0]
    assert g.example_id == "coco-000000000139" and g.image.shape == (64, 64, 3)
    assert [o.label for o in g.objects] == [18, 67] and [o.name for o in g.objects] == ["dog", "dining table"]
    np.testing.assert_array_equal(g.objects[0].mask, g.label_map == 18)
    assert g.captions == ("A dog near a table.", "A brown dog.")
    with pytest.raises(coco.SkipImage, match="no object pixels"):
        ds[2]
    with pytest.raises(FileNotFoundError, match="seg_label"):
        coco.CocoCaptions(root / "image")
    # word -> category
    cases = {("Dogs,", None, None): 18, ("dog", "hot", None): 58, ("hot", None, "dogs"): 58, ("men", None, None): 1,
             ("table", None, None): 67, ("sofa", None, None): 63, ("phone", "cell", None): 77,
             ("knives", None, None): 49, ("running", None, None): None, ("the", None, None): None}
    for (w, prev, nxt), cat in cases.items():
        assert coco.category_of_word(w, prev, nxt) == cat, w


def test_grounded_word_roles(tmp_path):
    root = _fake_coco(tmp_path / "coco")
    src = sources.GroundedSource(eval_config.RunConfig(dataset="coco", data_dir=str(root), split="val2014", out_dir="x"))
    item = src.item(0)
    words = _words("a dog and two hot dogs on the table .")
    infos = src.words(item, words)
    got = [(i.word, i.role, i.status, i.objects) for i in infos]
    assert got == [("a", "function", "function", ()), ("dog", "object", "matched", (0,)),
                   ("and", "function", "function", ()), ("two", "object", "unmatched", ()),
                   ("hot", "object", "absent", ()), ("dogs", "object", "absent", ()),
                   ("on", "other", "unscored", ()), ("the", "function", "function", ()),
                   ("table", "object", "matched", (1,)), (".", "other", "unscored", ())]


def _rle_uncompressed(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE written independently: run lengths of the column-major flattening, starting with 0s."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(n)
            cur, n = v, 0
        n += 1
    counts.append(n)
    return {"size": list(mask.shape), "counts": counts}


def test_grandf_reader_decodes_all_rles(tmp_path):
    mask_utils = pytest.importorskip("pycocotools.mask")
    root = tmp_path / "grandf"
    (root / "train").mkdir(parents=True)
    (root / "GranDf_HA_images" / "train").mkdir(parents=True)
    h, w = 40, 50
    a1 = np.zeros((h, w), bool)
    a1[2:10, 3:20] = True
    a2 = np.zeros((h, w), bool)
    a2[25:35, 30:45] = True  # a second piece of the same object
    b = np.zeros((h, w), bool)
    b[5:30, 15:25] = True  # overlaps a1
    enc = lambda m: {k: (v.decode() if isinstance(v, bytes) else v)
                     for k, v in mask_utils.encode(np.asfortranarray(m.astype(np.uint8))).items()}
    entries = [
        {"file_name": "sa_1.jpg", "height": h, "width": w, "caption": "Two dogs sit next to a red chair.",
         "groundings": {"Two dogs": {"token_positives": [0, 8], "rle_masks": [enc(a1), _rle_uncompressed(a2)]},
                        "a red chair": {"token_positives": [21, 32], "rle_masks": [enc(b)]}}},
        {"file_name": "sa_missing.jpg", "height": h, "width": w, "caption": "x",
         "groundings": {"x": {"token_positives": [0, 1], "rle_masks": [enc(b)]}}},
    ]
    (root / "train" / "GranDf_HA_GCG_train.json").write_text(json.dumps(entries))
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(root / "GranDf_HA_images" / "train" / "sa_1.jpg")
    ds = grandf.GranDf(root)
    assert len(ds) == 1 and ds.skipped[0][0] == "grandf-sa_missing" and "missing" in ds.skipped[0][1]
    g = ds[0]
    np.testing.assert_array_equal(g.objects[0].mask, a1 | a2)
    np.testing.assert_array_equal(g.objects[1].mask, b)
    expect = np.zeros((h, w), np.int32)
    expect[a1 | a2] = 1
    expect[b] = 2  # the authors' elementwise maximum: the later object wins overlaps
    np.testing.assert_array_equal(g.label_map, expect)
    assert g.focus == "Two dogs"
    assert grandf.default_prompt(g.focus) == "Describe what you see in this image. Focus on Two dogs."
    assert grandf.GranDf.objects_for_word(g, "dog") == [0]
    assert grandf.GranDf.objects_for_word(g, "Chair.") == [1]
    assert grandf.GranDf.objects_for_word(g, "the") == []
    first = grandf.GranDf(root, first_rle_only=True)[0]
    np.testing.assert_array_equal(first.objects[0].mask, a1)
    with pytest.raises(FileNotFoundError, match="GranDf_HA_GCG_val.json"):
        grandf.GranDf(root, split="val")
    bad = [dict(entries[0], height=h + 1)]
    (root / "train" / "GranDf_HA_GCG_train.json").write_text(json.dumps(bad))
    with pytest.raises(coco.SkipImage, match="annotation says"):
        grandf.GranDf(root)[0]


def test_report_merges_process_files(tmp_path):
    """Two processes' records files: blocks are merged, an example written twice is counted once, and the table
    is the plain average of the merged per-word metrics."""
    from dcam_jax import metrics

    rng = np.random.default_rng(0)
    mask = np.zeros((16, 16), np.int32)
    mask[2:8, 2:8] = 1
    mask[9:15, 6:14] = 2

    def block(i):
        m = rng.random((4, 4)).astype(np.float32)
        w = {"type": "word", "example": i, "method": "m", "role": "object", "word_class": "shape",
             "status": "matched", "matched": metrics.map_metrics(m, (mask == 1).astype(np.uint8), mode="matched",
                                                                 label=1),
             "max": metrics.map_metrics(m, mask, mode="max")}
        e = {"type": "example", "example": i, "skipped": None, "counts": {"matched": 1, "object_words": 1}}
        return [w, e]

    blocks = {i: block(i) for i in range(3)}
    write = lambda name, idx: (tmp_path / name).write_text(
        "".join(json.dumps(r) + "\n" for i in idx for r in blocks[i]))
    write("records-00000-of-00002.jsonl", [0, 2])
    write("records-00001-of-00002.jsonl", [1, 2])  # example 2 again, e.g. a rerun with another process count
    (tmp_path / "run_config.json").write_text(json.dumps({"methods": ["m"], "metric_mode": ["matched", "max"]}))
    run = report.load_run(tmp_path)
    assert [e["example"] for e in run["examples"]] == [0, 1, 2] and run["duplicates"] == 1
    s = report.summarize_run(run)
    for mode in ("matched", "max"):
        vals = [blocks[i][0][mode]["obj_iou"] for i in range(3)]
        assert s["results"]["m"][mode]["n"] == 3
        assert s["results"]["m"][mode]["obj_iou"] == pytest.approx(np.mean(vals))
        f3 = metrics.f3(np.mean(vals), np.mean([blocks[i][0][mode]["contrast"] for i in range(3)]),
                        np.mean([blocks[i][0][mode]["concentration"] for i in range(3)]))
        assert s["results"]["m"][mode]["f3_of_means"] == pytest.approx(f3)
    assert s["words"]["matched"] == 3
    with pytest.raises(ValueError, match="no records"):
        report.load_run(_empty(tmp_path))


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d
