"""A self-contained HTML viewer of an explanation: every token's map, several methods side by side, and how a
token's evidence forms over the denoising steps.

:func:`write_html` writes one file that opens in any browser with no server and no network: the image, the maps
(small uint8 arrays) and the colour table are inlined as base64 in a JSON block, and a short script draws them
on canvases. The page shows

- the answer as a row of tokens coloured by the step that committed them; clicking an explained token selects
  its map, hovering previews it;
- one panel per method (opacity slider, raw / refined toggle);
- with a :class:`~dcam_jax.cam.explain.TrajectoryExplanation`, a denoising-step slider: the selected token's map
  at each probe state up to the decision, with the answer as it stood at that step;
- the run record (checkpoint, prompt, seed, configs) in a collapsible footer.

The page keeps a small scripting handle for tests and notebooks: ``window.dcamViewer.select(i)``,
``.setStep(k)`` and ``.state()``.
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from dcam_jax import fileio

# Long side, in cells, of the image-aligned maps stored in the page (bilinear upscaling happens in the browser).
MAP_CELLS = 48


def _b64_png(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _b64_jpeg(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _b64_maps(maps: np.ndarray) -> list[str]:
    """[N, h, w] in [0, 1] -> N base64 strings of row-major uint8 cells."""
    q = np.clip(np.rint(np.asarray(maps, np.float32) * 255.0), 0, 255).astype(np.uint8)
    return [base64.b64encode(m.tobytes()).decode("ascii") for m in q]


def _map_size(image_hw: tuple[int, int]) -> tuple[int, int]:
    h, w = image_hw
    f = MAP_CELLS / max(h, w)
    return max(1, round(h * f)), max(1, round(w * f))


def _jet_lut() -> list[int]:
    from dcam_jax import viz

    return viz.colorize(np.linspace(0.0, 1.0, 256, dtype=np.float32)[None, :])[0].reshape(-1).tolist()


def page_data(image: np.ndarray, explanations: Mapping[str, Any], *, trajectory=None, generation=None,
              run: Mapping[str, Any] | None = None, title: str | None = None) -> dict:
    """The JSON-ready content of the page (see :func:`write_html` for the arguments)."""
    from dcam_jax import viz

    if not explanations:
        raise ValueError("explanations is empty: pass at least one Explanation")
    shown = viz.display_image(np.asarray(image))
    size = _map_size(shown.shape[:2])
    methods = []
    first = next(iter(explanations.values()))
    for name, e in explanations.items():
        if list(e.tokens) != list(first.tokens):
            raise ValueError(f"the explanations explain different tokens ({name!r}: {e.tokens} vs {first.tokens}); "
                             "explain the same targets with every method")
        methods.append({"name": str(name), "refined": _b64_maps(e.image_maps(size)),
                        "raw": _b64_maps(e.image_maps(size, raw=True)),
                        "refinement_acted": bool(not np.allclose(e.maps, e.raw_maps, atol=1e-5))})
    tokens = [{"label": t, "positions": [int(p) for p in ps]} for t, ps in zip(first.tokens, first.positions)]
    answer_row = []
    num_steps = None
    if generation is not None:
        num_steps = int(generation.num_steps)
        target_of = {ps[0]: k for k, ps in enumerate(first.positions)}
        for k in range(int(generation.num_valid)):
            target = next((j for j, ps in enumerate(first.positions) if k in ps), None)
            answer_row.append({"text": generation.token_strings[k], "step": int(generation.commit_step[k]),
                               "target": target, "first": k in target_of})
    else:
        answer_row = [{"text": " " + t["label"], "step": None, "target": k, "first": True}
                      for k, t in enumerate(tokens)]
    traj = None
    if trajectory is not None:
        if list(trajectory.tokens) != list(first.tokens):
            raise ValueError("the trajectory explains other tokens than the explanations; use the same targets")
        tm = trajectory.image_maps(size)  # [T, K, h, w]
        traj = {"method": trajectory.config.method, "K": int(tm.shape[1]),
                "maps": [_b64_maps(row) for row in tm], "steps": trajectory.steps.tolist(),
                "commit_steps": [int(c) for c in trajectory.commit_steps], "texts": trajectory.state_texts}
        num_steps = num_steps or int(trajectory.num_steps)
    encode = _b64_png if max(shown.shape[:2]) <= 256 else _b64_jpeg
    return {"title": title or "dcam_jax explanation", "answer": first.text, "image": encode(shown),
            "width": int(shown.shape[1]), "height": int(shown.shape[0]), "map_h": size[0], "map_w": size[1],
            "tokens": tokens, "answer_row": answer_row, "num_steps": num_steps, "methods": methods,
            "trajectory": traj, "lut": _jet_lut(), "run": dict(run or {})}


def write_html(path: str | os.PathLike, image: np.ndarray, explanations, *, trajectory=None, generation=None,
               run: Mapping[str, Any] | None = None, title: str | None = None) -> Path:
    """Write the viewer page (atomically) and return its path.

    image: [H, W, 3] uint8, the explained image. explanations: one :class:`~dcam_jax.cam.explain.Explanation`
    or {method name: Explanation}, all of the same tokens (one panel each). trajectory: an optional
    :class:`~dcam_jax.cam.explain.TrajectoryExplanation` of the same tokens (the step slider). generation: the
    :class:`~dcam_jax.api.Generation` the answer came from (the token row with commit steps); without it the row
    holds the explained tokens only. run: a JSON-ready record shown in the footer. title: the page title.
    """
    if not isinstance(explanations, Mapping):
        explanations = {explanations.config.method: explanations}
    data = page_data(image, explanations, trajectory=trajectory, generation=generation, run=run, title=title)
    blob = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    html = _TEMPLATE.replace("__TITLE__", _escape(data["title"])).replace("__DATA__", blob)
    return fileio.write_text(path, html)


def _escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;"))


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 16px; color: #222; }
  h1 { font-size: 18px; margin: 0 0 8px 0; }
  #answer { font-size: 17px; line-height: 2.1; margin: 8px 0 12px 0; }
  #answer span { padding: 3px 4px; border-radius: 4px; white-space: pre; }
  #answer span.target { cursor: pointer; border: 1px solid #888; }
  #answer span.other { color: #777; }
  #answer span.selected { outline: 2px solid #000; }
  #panels { display: flex; flex-wrap: wrap; gap: 14px; }
  .panel { display: flex; flex-direction: column; align-items: center; }
  .panel .name { font-weight: 600; font-size: 13px; margin-bottom: 4px; }
  canvas { border: 1px solid #ccc; image-rendering: auto; }
  #controls { margin: 10px 0; display: flex; gap: 18px; align-items: center; flex-wrap: wrap; font-size: 13px; }
  #stepbox { margin-top: 6px; font-size: 13px; max-width: 520px; }
  #statetext { font-family: ui-monospace, monospace; font-size: 12px; color: #333; }
  details { margin-top: 18px; font-size: 12px; }
  pre { background: #f6f6f6; padding: 8px; overflow-x: auto; }
  .legend { font-size: 12px; color: #555; }
</style>
</head>
<body>
<h1 id="title"></h1>
<div class="legend">Tokens are coloured by the denoising step that committed them (early: blue, late: red).
Click an outlined token to show its map; hover to preview.</div>
<div id="answer"></div>
<div id="controls">
  <label>opacity <input id="opacity" type="range" min="0" max="100" value="55"></label>
  <label><input id="raw" type="checkbox"> raw maps (before refinement)</label>
</div>
<div id="panels"></div>
<div id="stepbox"></div>
<details><summary>run record</summary><pre id="run"></pre></details>
<script id="dcam-data" type="application/json">__DATA__</script>
<script>
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("dcam-data").textContent);
  var S = { token: 0, step: D.trajectory ? D.trajectory.K - 1 : 0, preview: null };
  var img = new Image();
  var decoded = {};
  function bytes(b64) {
    if (decoded[b64]) return decoded[b64];
    var s = atob(b64), out = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    decoded[b64] = out;
    return out;
  }
  function stepColour(step) {
    if (step === null || D.num_steps === null || D.num_steps === undefined) return "#eef";
    var t = D.num_steps > 1 ? step / (D.num_steps - 1) : 0;
    return "hsl(" + Math.round(230 - 230 * t) + ", 75%, 86%)";
  }
  function heat(b64) {
    var c = document.createElement("canvas");
    c.width = D.map_w; c.height = D.map_h;
    var ctx = c.getContext("2d"), im = ctx.createImageData(D.map_w, D.map_h), m = bytes(b64);
    for (var i = 0; i < m.length; i++) {
      var v = m[i];
      im.data[4 * i] = D.lut[3 * v]; im.data[4 * i + 1] = D.lut[3 * v + 1];
      im.data[4 * i + 2] = D.lut[3 * v + 2]; im.data[4 * i + 3] = 255;
    }
    ctx.putImageData(im, 0, 0);
    return c;
  }
  function draw(canvas, b64) {
    var ctx = canvas.getContext("2d");
    ctx.globalAlpha = 1; ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
    if (b64 === null) return;
    ctx.imageSmoothingEnabled = true;
    ctx.globalAlpha = document.getElementById("opacity").value / 100;
    ctx.drawImage(heat(b64), 0, 0, canvas.width, canvas.height);
    ctx.globalAlpha = 1;
  }
  function current() { return S.preview !== null ? S.preview : S.token; }
  var canvases = [], trajCanvas = null;
  function render() {
    var t = current(), raw = document.getElementById("raw").checked;
    D.methods.forEach(function (m, i) { draw(canvases[i], D.tokens.length ? (raw ? m.raw : m.refined)[t] : null); });
    if (D.trajectory && D.tokens.length) {
      var T = D.trajectory;
      draw(trajCanvas, T.maps[t][S.step]);
      document.getElementById("steplabel").textContent = "state " + (S.step + 1) + " of " + T.K + ": step " +
        T.steps[t][S.step] + (S.step === T.K - 1 ? " (the decision: committed at step " + T.commit_steps[t] + ")" : "");
      document.getElementById("statetext").textContent = T.texts[t][S.step];
    }
    var spans = document.querySelectorAll("#answer span.target");
    spans.forEach(function (sp) { sp.classList.toggle("selected", Number(sp.dataset.target) === S.token); });
  }
  function select(i) {
    if (i < 0 || i >= D.tokens.length) throw new Error("no explained token " + i);
    S.token = i; S.preview = null; render();
  }
  function setStep(k) {
    if (!D.trajectory) throw new Error("this page has no trajectory");
    if (k < 0 || k >= D.trajectory.K) throw new Error("no state " + k);
    S.step = k; var sl = document.getElementById("step"); if (sl) sl.value = k; render();
  }
  function build() {
    document.getElementById("title").textContent = D.title;
    var row = document.getElementById("answer");
    D.answer_row.forEach(function (tok) {
      var sp = document.createElement("span");
      sp.textContent = tok.text;
      sp.style.background = stepColour(tok.step);
      if (tok.step !== null) sp.title = "committed at step " + tok.step;
      if (tok.target !== null) {
        sp.className = "target"; sp.dataset.target = tok.target;
        sp.addEventListener("click", function () { select(tok.target); });
        sp.addEventListener("mouseenter", function () { S.preview = tok.target; render(); });
        sp.addEventListener("mouseleave", function () { S.preview = null; render(); });
      } else { sp.className = "other"; }
      row.appendChild(sp);
    });
    var panels = document.getElementById("panels");
    function panel(name) {
      var p = document.createElement("div"); p.className = "panel";
      var n = document.createElement("div"); n.className = "name"; n.textContent = name; p.appendChild(n);
      var c = document.createElement("canvas"); c.width = D.width; c.height = D.height; p.appendChild(c);
      panels.appendChild(p); return c;
    }
    D.methods.forEach(function (m) { canvases.push(panel(m.name)); });
    if (D.trajectory) {
      trajCanvas = panel(D.trajectory.method + " over the denoising steps");
      var box = document.getElementById("stepbox");
      var lab = document.createElement("label"); lab.textContent = "denoising state ";
      var sl = document.createElement("input"); sl.type = "range"; sl.id = "step"; sl.min = 0;
      sl.max = D.trajectory.K - 1; sl.value = S.step;
      sl.addEventListener("input", function () { S.step = Number(sl.value); render(); });
      lab.appendChild(sl); box.appendChild(lab);
      var sl2 = document.createElement("div"); sl2.id = "steplabel"; box.appendChild(sl2);
      var st = document.createElement("div"); st.id = "statetext"; box.appendChild(st);
    }
    document.getElementById("opacity").addEventListener("input", render);
    document.getElementById("raw").addEventListener("change", render);
    document.getElementById("run").textContent = JSON.stringify(D.run, null, 2);
  }
  window.dcamViewer = { select: select, setStep: setStep,
    state: function () { return { token: S.token, step: S.step, tokens: D.tokens.length,
                                  K: D.trajectory ? D.trajectory.K : 0 }; } };
  build();
  img.onload = function () { render(); document.body.dataset.ready = "1"; };
  img.src = D.image;
})();
</script>
</body>
</html>
"""
