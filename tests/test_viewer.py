"""The HTML viewer: self-contained, the data it carries, its size, and (in headless Chromium, offline) that it
loads without console errors, shows every token, and that clicking a token and moving the step slider change
what is drawn."""

import base64
import json
import re
import shutil
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import dcam_jax as dj
from dcam_jax import api, cli, viewer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def run(tiny_model):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)  # non-square: the pad layout's box is cut off
    m = tiny_model
    g = dj.generate(m, image, "describe the image", key=jax.random.key(1))
    es = {name: dj.explain(m, image, "describe the image", targets="all", generation=g,
                           config=dj.CamConfig(method=name, layer=1, refine="none"))
          for name in ("diffusion_cam", "hirescam")}
    tr = dj.explain_trajectory(m, image, "describe the image", targets="all", generation=g, num_states=4,
                               config=dj.CamConfig(layer=1))
    return types.SimpleNamespace(image=image, g=g, es=es, tr=tr)


def _page_json(html: str) -> dict:
    blob = re.search(r'<script id="dcam-data" type="application/json">(.*?)</script>', html, re.S).group(1)
    return json.loads(blob.replace("<\\/", "</"))


def test_trajectory_ends_at_the_decision_state(run):
    tr, e = run.tr, run.es["diffusion_cam"]
    assert tr.maps.shape[:2] == (len(e.tokens), 4) and tr.steps.shape == (len(e.tokens), 4)
    # the last state is the decision state: its map is the explanation's raw map
    np.testing.assert_allclose(tr.maps[:, -1], e.raw_maps, atol=1e-6)
    assert (tr.steps[:, 0] == 0).all() and (tr.steps[:, -1] == tr.commit_steps).all()
    assert (np.diff(tr.steps, axis=1) >= 0).all()
    # at the decision state the explained token is still masked, every earlier-committed one is visible
    k = 0
    p = tr.positions[k][0]
    visible = [i for i in range(run.g.num_valid) if run.g.commit_step[i] < tr.steps[k, -1]]
    assert tr.state_texts[k][-1].count("[MASK]") == run.g.num_valid - len(visible)
    assert p not in visible


def test_tam_has_no_trajectory(tiny_model, run):
    with pytest.raises(ValueError, match="gradient-free"):
        dj.explain_trajectory(tiny_model, run.image, "describe the image", config=dj.CamConfig(method="tam"),
                              generation=run.g)
    with pytest.raises(ValueError, match="num_states"):
        dj.explain_trajectory(tiny_model, run.image, "describe the image", num_states=0, generation=run.g)


def test_page_is_self_contained_and_carries_the_maps(run, tmp_path):
    path = viewer.write_html(tmp_path / "v.html", run.image, run.es, trajectory=run.tr, generation=run.g,
                             run={"seed": 1, "note": "</script><b>x</b>"}, title="t <&>")
    html = path.read_text()
    # nothing fetched from anywhere: no external scripts, styles, fonts or images
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:|//)', html)
    assert "@import" not in html and "url(http" not in html
    assert "<title>t &lt;&amp;&gt;</title>" in html
    data = _page_json(html)
    assert data["run"]["note"] == "</script><b>x</b>"  # escaped in the page, intact in the data
    e = run.es["diffusion_cam"]
    assert [t["label"] for t in data["tokens"]] == e.tokens
    assert [m["name"] for m in data["methods"]] == ["diffusion_cam", "hirescam"]
    h, w = data["map_h"], data["map_w"]
    assert max(h, w) == viewer.MAP_CELLS and abs(w / h - 64 / 48) < 0.05
    # the stored cells are the image-aligned maps, quantised to 8 bits
    cells = np.frombuffer(base64.b64decode(data["methods"][0]["refined"][1]), np.uint8).reshape(h, w)
    np.testing.assert_allclose(cells / 255.0, e.image_maps((h, w))[1], atol=0.5 / 255 + 1e-6)
    traj = np.frombuffer(base64.b64decode(data["trajectory"]["maps"][0][2]), np.uint8).reshape(h, w)
    np.testing.assert_allclose(traj / 255.0, run.tr.image_maps((h, w))[0, 2], atol=0.5 / 255 + 1e-6)
    assert len(data["answer_row"]) == run.g.num_valid
    assert [r["step"] for r in data["answer_row"]] == [int(c) for c in run.g.commit_step[:run.g.num_valid]]
    # Explanation.to_html writes the same page for one method
    one = e.to_html(tmp_path / "one.html", run.image)
    assert [m["name"] for m in _page_json(one.read_text())["methods"]] == ["diffusion_cam"]


def test_page_refuses_mismatched_explanations(run, tiny_model, tmp_path):
    other = dj.explain(tiny_model, run.image, "describe the image", targets=[0], generation=run.g)
    with pytest.raises(ValueError, match="different tokens"):
        viewer.write_html(tmp_path / "v.html", run.image, {"a": run.es["diffusion_cam"], "b": other})
    with pytest.raises(ValueError, match="empty"):
        viewer.write_html(tmp_path / "v.html", run.image, {})
    assert not (tmp_path / "v.html").exists()


def test_page_size_of_a_long_answer_on_a_large_image(tmp_path):
    # 64 tokens, 8 states, two methods, a 640 x 480 photo-like image: under the 10 MB the viewer promises
    T, K = 64, 8
    rng = np.random.default_rng(0)
    image = (rng.random((480, 640, 3)) * 255).astype(np.uint8)

    def fake_explanation(name):
        maps = rng.random((T, 27, 27)).astype(np.float32)
        return types.SimpleNamespace(
            tokens=[f"w{i}" for i in range(T)], positions=[(i,) for i in range(T)], text="x", maps=maps,
            raw_maps=maps, config=types.SimpleNamespace(method=name),
            image_maps=lambda size, raw=False: rng.random((T,) + tuple(size)).astype(np.float32))

    es = {"a": fake_explanation("a"), "b": fake_explanation("b")}
    tr = types.SimpleNamespace(tokens=es["a"].tokens, steps=np.zeros((T, K), int), commit_steps=np.zeros(T, int),
                               state_texts=[["x " * 64] * K] * T, num_steps=64,
                               config=types.SimpleNamespace(method="a"),
                               image_maps=lambda size: rng.random((T, K) + tuple(size)).astype(np.float32))
    path = viewer.write_html(tmp_path / "big.html", image, es, trajectory=tr)
    assert path.stat().st_size < 10e6, path.stat().st_size


# ---------------------------------------------------------------------------------------------------------
# in a real browser


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    sync = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield b
        b.close()


def _open(browser, path):
    ctx = browser.new_context(offline=True)  # the page must work with no network at all
    page = ctx.new_page()
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(Path(path).resolve().as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=15000)
    return ctx, page, errors


def test_viewer_in_headless_chromium(browser, run, tmp_path):
    path = viewer.write_html(tmp_path / "v.html", run.image, run.es, trajectory=run.tr, generation=run.g)
    ctx, page, errors = _open(browser, path)
    try:
        e = run.es["diffusion_cam"]
        state = page.evaluate("window.dcamViewer.state()")
        assert state == {"token": 0, "step": 3, "tokens": len(e.tokens), "K": 4}
        targets = page.locator("#answer span.target")
        assert targets.count() == sum(len(ps) for ps in e.positions)
        row = page.locator("#answer").inner_text()
        for t in e.tokens:
            assert t.strip() in row
        assert page.locator("canvas").count() == 3  # two methods and the trajectory panel
        first = page.locator("canvas").first
        before = first.screenshot()
        other = next(i for i, m in enumerate(e.maps) if not np.allclose(m, e.maps[0], atol=0.02))
        page.locator(f"#answer span.target[data-target='{other}']").first.click()
        assert page.evaluate("window.dcamViewer.state()")["token"] == other
        assert first.screenshot() != before  # clicking a token changes the map shown
        traj = page.locator("canvas").nth(2)
        at_decision = traj.screenshot()
        page.locator("#step").fill("0")
        assert page.evaluate("window.dcamViewer.state()")["step"] == 0
        assert traj.screenshot() != at_decision  # the step slider changes it too
        assert "[MASK]" in page.locator("#statetext").inner_text()
        page.locator("#opacity").fill("0")
        assert first.screenshot() != before
        assert errors == []
    finally:
        ctx.close()


def test_demo_writes_a_viewer_that_loads(browser, tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["dcam", "demo", f"--out_dir={out}", "--trajectory_states=3"]) == 0, capsys.readouterr().err
    path = out / "explanation.html"
    assert path.stat().st_size < 2e6
    ctx, page, errors = _open(browser, path)
    try:
        data = json.loads((out / "explanation.json").read_text())
        assert page.evaluate("window.dcamViewer.state()")["tokens"] == len(data["tokens"])
        page.screenshot(path=str(tmp_path / "demo.png"))
        assert errors == []
        assert "checkpoint" in page.locator("#run").text_content()  # the footer holds the run record
    finally:
        ctx.close()
