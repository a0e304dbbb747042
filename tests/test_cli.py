"""The `dcam` command end to end: help, explain and info on a tiny saved checkpoint, demo on the embedded model,
and bad inputs (nothing half-written)."""

import json

import numpy as np
import pytest
from PIL import Image

import dcam_jax as dj
from dcam_jax import api, cli, fileio, viz



@pytest.fixture(scope="module")
def tiny_ckpt(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    tok = tmp_path_factory.mktemp("tok_save")
    tiny_model.tokenizer.save_pretrained(tok)
    dj.save_checkpoint(d, tiny_model.config, tiny_model.params, tokenizer_dir=tok)
    return d


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(p)
    return p


def test_help(capsys):
    assert cli.main(["dcam", "--help"]) == 0
    assert "dcam explain" in capsys.readouterr().out
    for cmd in ("demo", "explain", "info"):
        assert cli.main(["dcam", cmd, "--help"]) == 0
        out = capsys.readouterr().out
        assert f"usage: dcam {cmd}" in out and "--checkpoint" in out
    assert cli.main(["dcam", "frobnicate"]) == 2


def test_explain_end_to_end(tiny_ckpt, image_path, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["dcam", "explain", f"--checkpoint={tiny_ckpt}", f"--image={image_path}",
                   "--prompt=describe the image", "--targets=all", "--refine=none", f"--out_dir={out}"])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((out / "explanation.json").read_text())
    maps = np.load(out / "maps.npy")
    assert maps.shape[0] == len(data["tokens"]) and list(maps.shape[1:]) == data["map_shape"]
    # the files agree with the API called directly with the same settings
    m = dj.load_pretrained(tiny_ckpt)
    e = dj.explain(m, str(image_path), "describe the image", targets="all", config=dj.CamConfig(refine="none"),
                   key=__import__("jax").random.key(0), sampling=api.default_sampling(m.config))
    np.testing.assert_allclose(maps, e.maps, atol=1e-6)
    assert data["answer"] == e.text and [t["token"] for t in data["tokens"]] == e.tokens
    pngs = sorted(out.glob("overlay_*.png"))
    assert len(pngs) == len(e.tokens)
    for p in pngs + [out / "summary.png"]:
        with Image.open(p) as im:
            im.load()
            assert im.size[0] > 0
    assert not list(tmp_path.glob(".dcam_tmp_*"))  # the staging directory is gone
    # The overlays show the maps aligned with the (non-square) image: the pad layout's padding cut off first.

    shown = viz.display_image(np.asarray(Image.open(image_path).convert("RGB")))
    with Image.open(pngs[0]) as im:
        got = np.asarray(im)
    np.testing.assert_array_equal(got, viz.overlay(shown, e.image_maps(shown.shape[:2])[0]))
    # The run record says what made the result.
    run = data["run"]
    assert run["command"][:2] == ["dcam", "explain"] and run["seed"] == 0
    assert run["prompt"] == "describe the image" and run["dcam_jax_version"] == dj.__version__
    assert run["checkpoint"]["path"] == str(tiny_ckpt.resolve())
    assert run["checkpoint"]["metadata_sha256"] == fileio.file_sha256(tiny_ckpt / "dcam_checkpoint.json")
    assert run["image"]["sha256"] == fileio.file_sha256(image_path)
    assert run["sampling"]["gen_length"] == api.default_sampling(m.config).gen_length
    assert data["config"]["method"] == "diffusion_cam"


def test_output_folder_is_owned_per_run(tiny_ckpt, image_path, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "overlay_99_old.png").write_bytes(b"old")
    args = ["dcam", "explain", f"--checkpoint={tiny_ckpt}", f"--image={image_path}", "--refine=none",
            f"--out_dir={out}"]
    assert cli.main(args) == 2
    assert "already holds files; pass --overwrite" in capsys.readouterr().err
    assert (out / "overlay_99_old.png").read_bytes() == b"old"  # untouched
    # A temporary folder left by a killed run (its process is gone) is removed by the next run.
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".dcam_tmp_{dead}_abc"
    stale.mkdir()
    (stale / "big.npy").write_bytes(b"0" * 100)
    assert cli.main(args + ["--overwrite"]) == 0, capsys.readouterr().err
    assert f"removed {stale}" in capsys.readouterr().out and not stale.exists()
    assert not (out / "overlay_99_old.png").exists() and (out / "explanation.json").exists()
    assert not list(tmp_path.glob(".dcam_tmp_*"))


def test_display_image_bounds_the_picture():

    small = np.zeros((64, 48, 3), np.uint8)
    assert viz.display_image(small).shape == (256, 192, 3)  # enlarged 4x, nearest
    big = np.zeros((3000, 4000, 3), np.uint8)
    assert viz.display_image(big).shape == (768, 1024, 3)
    mid = np.zeros((300, 500, 3), np.uint8)
    assert viz.display_image(mid) is mid
    with pytest.raises(ValueError, match="uint8"):
        viz.display_image(np.zeros((4, 4, 3)))


def test_pyplot_draws_without_a_display(tmp_path):
    plt = viz.pyplot()
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg"
    fig, ax = plt.subplots(1, 1, figsize=(1, 1))
    ax.plot([0, 1], [1, 0])
    path = fileio.save_figure(fig, tmp_path / "line.png", dpi=20)
    assert Image.open(path).size == (20, 20)


def test_info(tiny_ckpt, capsys):
    assert cli.main(["dcam", "info", f"--checkpoint={tiny_ckpt}", "--image_size=64,48"]) == 0
    out = capsys.readouterr().out
    assert "parameters:" in out and "image tokens" in out


def test_bad_inputs_leave_nothing_behind(tiny_ckpt, image_path, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main(["dcam", "explain", f"--checkpoint={tiny_ckpt}", f"--image={image_path}",
                     f"--out_dir={afile}"]) != 0
    assert "is a file" in capsys.readouterr().err
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "o1"
    assert cli.main(["dcam", "explain", f"--checkpoint={tiny_ckpt}", f"--image={broken}", f"--out_dir={out}"]) == 1
    assert "cannot read image" in capsys.readouterr().err and not out.exists()
    notours = tmp_path / "notours"
    notours.mkdir()
    assert cli.main(["dcam", "info", f"--checkpoint={notours}"]) == 1
    assert "not a dcam_jax checkpoint" in capsys.readouterr().err
    assert cli.main(["dcam", "explain", f"--checkpoint={tiny_ckpt}", f"--out_dir={tmp_path / 'o2'}"]) != 0
    assert "--image is required" in capsys.readouterr().err + capsys.readouterr().out


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["dcam", "demo", f"--out_dir={out}"]) == 0, capsys.readouterr().err
    data = json.loads((out / "explanation.json").read_text())
    assert data["answer"] and data["tokens"]
    assert (out / "summary.png").exists() and len(list(out.glob("overlay_*.png"))) == len(data["tokens"])
    assert "truth_obj_iou" in data


def _tool(args, cwd):
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("DCAM_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=240)


@pytest.mark.slow
def test_python_m_tools_report_bad_input_in_one_line(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # A usage error: one line and a pointer to --help, not the module's whole docstring.
    r = _tool(["eval.protocol"], root)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(("I1", "W1"))]
    assert lines == ["error: --run_dirs is required (eval.run or eval.sweep output directories)",
                     "Run `python -m eval.protocol --help` for the flags."]
    # A bad value found after loading the model: one line, exit 1, and no output folder left behind.
    out = tmp_path / "run"
    r = _tool(["eval.run", "--layer=99", f"--out_dir={out}", "--num_examples=1"], root)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "error: layer=99 is out of range" in r.stderr and not out.exists()
    # An output path under a file.
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = _tool(["eval.run", f"--out_dir={afile}/sub", "--num_examples=1"], root)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "Not a directory" in r.stderr
