"""eval.sanity, eval.sanity_checks, eval.sanity_report: cascading randomisation of the top of the LM, rank
correlation, two-object discrimination, the tables, the CLI.

Everything but the one end-to-end run of the CLI on the embedded toy model works on numpy-built parameters,
hand-built maps and masks, or real ShapesWorld examples with a stand-in explainer, so no model is compiled.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcam_jax.data import shapes
from dcam_jax.models import config as C
from eval import config as eval_config
from eval import sanity as S
from eval import sanity_checks as SC
from eval import sanity_report, sources

ROOT = Path(__file__).resolve().parents[2]
N_LAYERS = 4
STACKED = ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")


@pytest.fixture(scope="module")
def lm_setup():
    """(params, LMConfig): a 4-block LM whose trained-like tensors have a different std per block and tensor,
    inside a model pytree with a vision part that must never change."""
    cfg = C.tiny_lm(n_layers=N_LAYERS)
    D, F, V = cfg.d_model, cfg.mlp_hidden, cfg.vocab_size
    qd = cfg.n_heads * cfg.head_dim
    shapes_ = {"q": (D, qd), "k": (D, qd), "v": (D, qd), "o": (qd, D), "gate": (D, F), "up": (D, F),
               "down": (F, D)}
    rng = np.random.default_rng(0)
    layers = {n: np.stack([rng.normal(0.01, 0.02 * (i + 1) + 0.01 * j, s) for i in range(N_LAYERS)])
              for j, (n, s) in enumerate(shapes_.items())}
    layers["attn_norm"] = 1 + 0.1 * rng.normal(size=(N_LAYERS, D))
    layers["mlp_norm"] = 1 + 0.1 * rng.normal(size=(N_LAYERS, D))
    lm = {"embed": rng.normal(0, 0.02, (V, D)), "layers": layers, "final_norm": 1 + 0.1 * rng.normal(size=D),
          "lm_head": rng.normal(0.0, 0.3, (D, V))}
    params = {"lm": lm, "vision": {"w": rng.normal(size=(3, 5))}}
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params), cfg


def _same(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("norms", ["keep", "reset"])
def test_randomize_upper_changes_exactly_the_top(lm_setup, norms):
    params, cfg = lm_setup
    key = jax.random.key(3)
    layer = 1
    assert SC.max_depth(N_LAYERS, layer) == 3
    assert SC.randomize_upper(params, cfg, layer, 0, key, norms=norms)["lm"]["lm_head"] is params["lm"]["lm_head"]
    outs = {d: SC.randomize_upper(params, cfg, layer, d, key, norms=norms) for d in (1, 2, 3)}
    old = params["lm"]
    for d, p in outs.items():
        new = p["lm"]
        assert jax.tree.structure(p) == jax.tree.structure(params)
        assert _same(new["embed"], old["embed"]) and _same(p["vision"]["w"], params["vision"]["w"])
        assert not _same(new["lm_head"], old["lm_head"])
        np.testing.assert_allclose(np.std(new["lm_head"]), np.std(old["lm_head"]), rtol=0.05)
        assert abs(float(np.mean(new["lm_head"]))) < 0.02
        assert _same(new["final_norm"], old["final_norm"]) == (norms == "keep")
        if norms == "reset":
            assert np.all(np.asarray(new["final_norm"]) == 1)
        randomised = set(range(N_LAYERS - 1, N_LAYERS - d, -1))  # the top d - 1 blocks
        assert randomised == set(SC.upper_targets(N_LAYERS, layer, d))
        for name in STACKED:
            for i in range(N_LAYERS):
                a, b = np.asarray(old["layers"][name][i]), np.asarray(new["layers"][name][i])
                if i not in randomised or (name.endswith("norm") and norms == "keep"):
                    assert _same(a, b), (d, name, i)  # bitwise: blocks <= L and the untouched ones
                elif name.endswith("norm"):
                    assert np.all(b == 1)
                else:
                    assert not np.allclose(a, b)
                    np.testing.assert_allclose(b.std(), a.std(), rtol=0.1, err_msg=f"{name}[{i}]")
                    assert abs(b.mean()) < 4 * a.std() / np.sqrt(a.size)  # mean 0, not the trained 0.01
    # cascading: the random values of a tensor do not depend on the depth
    for name in ("q", "down"):
        assert _same(outs[2]["lm"]["layers"][name][3], outs[3]["lm"]["layers"][name][3])
    assert _same(outs[1]["lm"]["lm_head"], outs[3]["lm"]["lm_head"])
    # a different seed gives different random tensors
    other = SC.randomize_upper(params, cfg, layer, 1, jax.random.key(4), norms=norms)
    assert not _same(other["lm"]["lm_head"], outs[1]["lm"]["lm_head"])
    # the LM's own pytree works too, and the input is never modified
    lm_only = SC.randomize_upper(params["lm"], cfg, layer, 2, key, norms=norms)
    assert _same(lm_only["layers"]["q"], outs[2]["lm"]["layers"]["q"])
    with pytest.raises(ValueError, match="depth=4"):
        SC.randomize_upper(params, cfg, layer, 4, key)


def test_depths_and_labels():
    assert SC.upper_targets(4, 1, 1) == [] and SC.upper_targets(4, 1, 3) == [3, 2]
    assert SC.max_depth(4, 3) == 1  # TAM reads the last block: only the head
    assert [SC.depth_label(4, d) for d in (1, 2, 3)] == ["head", "+block 3", "+block 2"]
    with pytest.raises(ValueError, match="out of range"):
        SC.upper_targets(4, 4, 1)


def test_rank_correlation_matches_scipy_and_a_hand_case():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a = np.round(rng.random((5, 6, 7)) * 4) / 4  # many ties
    b = np.round((a + rng.random((5, 6, 7))) * 3) / 3
    r = SC.rank_correlation(a, b)
    assert r.shape == (5,)
    for i in range(5):
        np.testing.assert_allclose(r[i], spearmanr(a[i].ravel(), b[i].ravel()).statistic, rtol=1e-12)
    # by hand: ranks [1, 2.5, 2.5, 4] and [1, 3, 2, 4] -> 4.5 / sqrt(4.5 * 5)
    np.testing.assert_allclose(SC.rank_correlation([1, 2, 2, 3], [10, 30, 20, 40], ndim=1), 4.5 / np.sqrt(22.5))
    assert SC.rank_correlation(a[0], a[0]) == pytest.approx(1.0)
    assert SC.rank_correlation(a[0], -a[0]) == pytest.approx(-1.0)
    assert np.isnan(SC.rank_correlation(np.zeros((3, 3)), a[0, :3, :3]))  # a constant map has no ranking
    with pytest.raises(ValueError, match="different shapes"):
        SC.rank_correlation(a[0], a[1, :3])


def test_points_at_hand_built_maps():
    named = np.zeros((16, 16), bool)
    other = np.zeros((16, 16), bool)
    named[0:6, 0:6] = True  # around grid cell (0, 0) of a 4 x 4 map (its peak covers pixels 0..1, clamped)
    other[10:16, 8:16] = True  # larger, in the lower right
    on_named = np.zeros((4, 4), np.float32)
    on_named[0, 0] = 1.0
    on_other = np.zeros((4, 4), np.float32)
    on_other[3, 3] = 1.0
    r = SC.points_at(on_named, named, other)
    assert (r["mass"], r["density"], r["pointing"]) == (True, True, True) and r["mass_other"] == 0
    r = SC.points_at(on_other, named, other)
    assert (r["mass"], r["density"], r["pointing"]) == (False, False, False)
    r = SC.points_at(np.zeros((4, 4)), named, other)  # ties do not point
    assert (r["mass"], r["density"], r["pointing"]) == (False, False, False)
    # uniform map: more mass on the larger object, equal density, the maximum everywhere
    r = SC.points_at(np.ones((4, 4)), named, other)
    assert (r["mass"], r["density"], r["pointing"]) == (False, False, False)


def _answered(index: int, text: str | None = None):
    """An Answered for a validation example with a stand-in answer (the reference caption by default)."""
    src = sources.ShapesSource(eval_config.RunConfig(split="validation"))
    item = src.item(index)
    words = (text or item.shapes_example.caption).split()
    pairs = [(w, (k,)) for k, w in enumerate(words)]
    gen = types.SimpleNamespace(text=" ".join(words))
    pre = types.SimpleNamespace(layout=types.SimpleNamespace(shape=lambda view: (8, 8), default_view="base"))
    return SC.Answered(item, pre, gen, sources.shapes_word_infos(item.shapes_example, pairs))


def test_discrimination_counts_correct_answers_and_scores_maps(monkeypatch):
    idx, scanned = SC.two_object_indices("validation", "default", 3)
    assert len(idx) == 3 and scanned == idx[-1] + 1
    assert all(shapes.make_example(shapes.split_seed("validation", i), shapes.preset("default")).num_objects == 2
               for i in idx)
    good = [_answered(i) for i in idx[:2]]
    ex0 = good[0].item.shapes_example
    # a caption with the two colours swapped binds nothing correctly: it must not count
    swap = {ex0.colours[0]: ex0.colours[1], ex0.colours[1]: ex0.colours[0]}
    swapped = " ".join(swap.get(w, w) for w in ex0.caption.split())
    bad = _answered(idx[0], swapped)

    def fake_explain(model, p, words, cam, *, seed, params=None):
        # a "perfect" method paints the named object's mask, a "wrong" one the other object's
        masks = p.item.object_masks
        pick = [w.objects[0] if cam == "perfect" else 1 - w.objects[0] for w in words]
        maps = np.stack([masks[j].astype(np.float32) for j in pick])  # at mask resolution: no resizing
        return maps, maps

    monkeypatch.setattr(SC, "explain_words", fake_explain)  # discrimination's own module
    res = SC.discrimination(None, good + [bad], {"perfect": "perfect", "wrong": "wrong", "random": None})
    n_words = sum(len(SC._object_words(p)) for p in good)  # colour and shape words of two objects each
    assert res["images"] == 3 and res["images_correct"] == 2 and res["words"] == n_words == 8
    assert res["methods"]["perfect"]["refined"] == {"mass": 1.0, "density": 1.0, "pointing": 1.0}
    assert res["methods"]["wrong"]["raw"] == {"mass": 0.0, "density": 0.0, "pointing": 0.0}
    assert res["methods"]["random"]["n"] == 8 and 0.0 <= res["methods"]["random"]["refined"]["mass"] <= 1.0
    md = sanity_report.markdown({"model": {"name": "x", "n_layers": 4}, "config": {"split": "validation",
                                                                      "shapes_preset": "default"},
                     "discrimination": dict(res, scanned=scanned)})
    assert "| perfect | 8 | 100.0 | 100.0 | 100.0 |" in md and "| wrong | 8 | 0.0 |" in md


def test_validate_gives_clear_errors(tmp_path):
    ok = S.SanityConfig(out_dir=str(tmp_path / "o"))
    assert S.validate(ok) is ok
    cases = [(dict(methods=("diffusion_cam", "gradcan")), "unknown method.*gradcan"),
             (dict(methods=("tam", "tam")), "twice"),
             (dict(split="dev"), "--split"), (dict(shapes_preset="tiny"), "--shapes_preset"),
             (dict(norms="zero"), "--norms"), (dict(num_examples=-1), "--num_examples"),
             (dict(num_examples=0, num_discrimination=0), "nothing to do"), (dict(out_dir=""), "--out_dir"),
             (dict(checkpoint=str(tmp_path / "nope")), "no such directory"), (dict(layer=-2), "--layer")]
    for change, msg in cases:
        with pytest.raises(ValueError, match=msg):
            S.validate(dataclasses.replace(ok, **change))
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty.*--overwrite"):
        S.validate(dataclasses.replace(ok, out_dir=str(full)))
    S.validate(dataclasses.replace(ok, out_dir=str(full), overwrite=True))


def test_flags_parse():
    from absl import flags

    fv = flags.FlagValues()
    S.define_flags(fv)
    fv(["prog", "--out_dir=x", "--methods=tam,random", "--layer=2", "--norms=reset", "--num_examples=3"])
    cfg = S.config_from_flags(fv)
    assert (cfg.methods, cfg.layer, cfg.norms, cfg.num_examples, cfg.split) == \
        (("tam", "random"), 2, "reset", 3, "validation")
    for name in fv:
        assert fv[name].help, name  # every flag explains itself


def test_help_and_usage_errors(tmp_path):
    p = subprocess.run([sys.executable, "-m", "eval.sanity", "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert p.returncode in (0, 1) and "Traceback" not in p.stderr
    for e in ("--out_dir", "--methods", "--num_discrimination", "--norms", "--layer", "eval.sanity"):
        assert e in p.stdout
    p = subprocess.run([sys.executable, "-m", "eval.sanity", f"--out_dir={tmp_path / 'o'}", "--methods=gradcan"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "unknown method" in p.stderr


@pytest.mark.slow
def test_cli_end_to_end_on_the_toy(tmp_path):
    out = tmp_path / "sanity"
    p = subprocess.run([sys.executable, "-m", "eval.sanity", f"--out_dir={out}", "--num_examples=2",
                        "--num_discrimination=2", "--methods=diffusion_cam,random", "--noprogress"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(x.name for x in out.iterdir()) == ["sanity.json", "sanity.md", "sanity.png"]
    res = json.loads((out / "sanity.json").read_text())
    assert res["config"]["num_examples"] == 2 and res["model"]["n_layers"] == 4
    r = res["randomization"]["diffusion_cam"]
    # at the toy's cam_layer L: the head, then blocks 3, 2, ... down to L + 1 are randomised
    L = json.loads((ROOT / "dcam_jax" / "assets" / "toy" / "config.json").read_text())["config"]["cam_layer"]
    expected = [list(range(3, 3 - k, -1)) for k in range(4 - L)]
    assert r["layer"] == L and [d["blocks"] for d in r["depths"]] == expected
    for d in r["depths"]:
        for kind in ("refined", "raw"):
            s = d[kind]
            assert s["n"] + s["undefined"] == r["words"] > 0
            assert s["mean"] is None or -1.0 <= s["mean"] <= 1.0
    assert "random" not in res["randomization"] and res["skipped_for_randomization"] == ["random"]
    dis = res["discrimination"]
    assert dis["images"] == 2 and len(dis["indices"]) == 2 and set(dis["methods"]) == {"diffusion_cam", "random"}
    md = (out / "sanity.md").read_text()
    assert f"| diffusion_cam | {L} |" in md and "Two-object discrimination" in md and md in p.stdout
    assert (out / "sanity.png").read_bytes()[:4] == b"\x89PNG"
    assert not [x for x in out.iterdir() if x.name.startswith(".")]  # no temporary files left
