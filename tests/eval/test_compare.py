"""eval.compare end to end on the embedded toy model, and viz.method_grid's checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcam_jax import viz

ROOT = Path(__file__).resolve().parents[2]


def test_method_grid_checks_its_inputs(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="all must be equal"):
        viz.method_grid([img], ["w"], {"a": [np.zeros((2, 2))] * 2}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="nothing to draw"):
        viz.method_grid([], [], {}, tmp_path / "x.png")


def test_method_grid_draws_one_row_per_word(tmp_path):
    img = np.full((16, 16, 3), 40, np.uint8)
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    m = np.zeros((4, 4), np.float32)
    m[1, 1] = 1.0
    p1 = viz.method_grid([img], ["red"], {"a": [m], "b": [m]}, tmp_path / "one.png", masks=[mask])
    p2 = viz.method_grid([img, img], ["red", "blue"], {"a": [m, m], "b": [m, m]}, tmp_path / "two.png")
    h1, h2 = Image.open(p1).size[1], Image.open(p2).size[1]
    assert h2 > 1.5 * h1  # a second row adds about a row's height


@pytest.mark.slow
def test_compare_cli_on_the_toy_model(tmp_path):
    out = tmp_path / "cmp.png"
    p = subprocess.run([sys.executable, "-m", "eval.compare", "--examples=2", "--methods=diffusion_cam,hirescam",
                        f"--out={out}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "1 rows x 2 methods" in p.stdout
    w, h = Image.open(out).size
    assert w > 300 and h > 150


def test_compare_cli_rejects_an_unknown_method(tmp_path):
    p = subprocess.run([sys.executable, "-m", "eval.compare", "--methods=nope", f"--out={tmp_path / 'x.png'}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode != 0 and "method='nope'" in p.stderr and "Traceback" not in p.stderr
