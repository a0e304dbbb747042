"""eval.protocol: the ablation table's numbers equal a hand computation from the records, object sizes in tokens
equal the ShapesWorld masks, and bad directories give clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dcam_jax.data import shapes
from eval import protocol as P
from eval import config as eval_config


def _word(example, method, obj, iou, hit, matched=True):
    m = {"obj_iou": iou, "pointing_game": hit} if matched else None
    return {"type": "word", "example": example, "method": method, "role": "object", "status": "matched",
            "objects": [obj], "matched": m, "max": m}


def _run_dir(path, preset, records):
    path.mkdir(parents=True)
    (path / eval_config.RUN_CONFIG).write_text(json.dumps({"dataset": "shapes", "split": "validation",
                                                 "shapes_preset": preset}))
    (path / "records-00000-of-00001.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_object_sizes_are_mask_areas_in_tokens():
    ex = shapes.make_example(shapes.split_seed("validation", 3), shapes.preset("default"))
    sizes = P.ObjectSizes(tokens_per_side=8)
    px = (ex.masks.shape[1] / 8) ** 2
    for k in range(ex.num_objects):
        assert sizes("validation", "default", 3, k) == pytest.approx(ex.masks[k].sum() / px)


def test_size_bins_cover_the_line():
    assert [P.size_bin(t) for t in (0.0, 0.5, 3.0, 3.01, 9.0, 9.5, 100.0)] == \
        ["<=3", "<=3", "<=3", "3-9", "3-9", ">9", ">9"]


def test_summary_pools_presets_and_bins_by_size(tmp_path):
    sweep = tmp_path / "sweep"
    recs_d = [_word(0, "diffusion_cam", 0, 0.5, True), _word(1, "diffusion_cam", 0, 0.1, False),
              _word(1, "diffusion_cam", 0, 0.9, True, matched=False)]  # an unmatched word is not counted
    recs_e = [_word(0, "diffusion_cam", 0, 0.3, True)]
    _run_dir(sweep / "refine-none", "default", recs_d)
    _run_dir(tmp_path / "easy" / "refine-none", "easy", recs_e)
    cells = P.find_cells([str(sweep), str(tmp_path / "easy")])
    assert [c.name for c in cells] == ["refine-none", "refine-none"]
    sizes = P.ObjectSizes(8)
    out = P.summarize(cells, sizes)
    row = out[("refine-none", "diffusion_cam")]
    assert row["preset"]["default"] == pytest.approx((2, 30.0, 50.0))
    assert row["preset"]["easy"] == pytest.approx((1, 30.0, 100.0))
    assert row["all"] == pytest.approx((3, 30.0, 100 * 2 / 3))
    # the size bins hold the same three words, each in the bin of its object's area
    expect: dict = {}
    for (preset, ex, iou, hit) in (("default", 0, 0.5, 1.0), ("default", 1, 0.1, 0.0), ("easy", 0, 0.3, 1.0)):
        expect.setdefault(P.size_bin(sizes("validation", preset, ex, 0)), []).append((iou, hit))
    for b, v in expect.items():
        assert row["size"][b] == pytest.approx((len(v), 100 * np.mean([a for a, _ in v]),
                                                100 * np.mean([h for _, h in v])))
    md = P.markdown(out)
    assert "| refine-none | diffusion_cam | 30.0 / 50.0 (2) | 30.0 / 100.0 (1) | 30.0 / 66.7 |" in md


def test_bad_directories_are_named(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        P.find_cells([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no eval.run output"):
        P.find_cells([str(tmp_path / "empty")])


def test_token_ceiling_scores_the_downsampled_true_mask():
    from dcam_jax import metrics

    n, iou, hit = P.token_ceiling("validation", "easy", 2, 8)
    ious = []
    for i in range(2):
        ex = shapes.make_example(shapes.split_seed("validation", i), shapes.preset("easy"))
        for k in range(ex.num_objects):
            o = ex.masks[k].reshape(8, ex.masks.shape[1] // 8, 8, -1).mean(axis=(1, 3))
            ious.append(metrics.map_metrics(o / o.max(), ex.masks[k].astype(np.uint8), mode="matched",
                                            label=1)["obj_iou"])
    assert n == len(ious) and iou == pytest.approx(100 * np.mean(ious))
    assert 30 < iou <= 100 and hit == pytest.approx(100.0)  # the oracle's peak is always inside its object
