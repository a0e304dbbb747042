"""Peak memory of `dcam explain` on large images: every picture is drawn at a bounded display size, so the peak
must not grow with the input image.

For each image size, writes a random photo-like PNG into a temporary folder, runs
``python -m dcam_jax.cli explain --checkpoint=toy --image=IMG --html`` in a fresh subprocess and reads that
process's own peak RSS (``ru_maxrss`` of the child). A run on a 64 x 64 image gives the baseline (the runtime,
the model, the compiled functions). Printed per size: the image's decoded size in MB, the peak RSS, and the
peak over the baseline.

Usage:
  python benchmarks/explain_memory.py [--sizes=64x64,2000x1500,4000x3000] [--repeats=1]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from absl import app, flags
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

flags.DEFINE_list("sizes", ["64x64", "2000x1500", "4000x3000"], "Image sizes WIDTHxHEIGHT; the first is the "
                  "baseline.")
flags.DEFINE_integer("repeats", 1, "Runs per size (the median peak is printed).")
FLAGS = flags.FLAGS

_CHILD = """
import resource, sys
from dcam_jax import cli
rc = cli.main(["dcam", "explain", "--checkpoint=toy", "--image=" + sys.argv[1], "--out_dir=" + sys.argv[2],
               "--html", "--trajectory_states=4"])
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(rc)
"""


def _image(path: Path, w: int, h: int) -> None:
    rng = np.random.default_rng(0)
    # smooth colour fields plus noise: decodes to w * h * 3 bytes, like a photo
    small = rng.integers(0, 256, (max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR), np.int16)
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path)


def _peak_mb(image: Path, out: Path) -> float:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _CHILD, str(image), str(out)], capture_output=True, text=True,
                       cwd=REPO, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"dcam explain failed on {image}:\n{r.stderr[-3000:]}")
    kb = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("PEAK_KB")]
    return kb[-1] / 1024.0


def main(argv):
    del argv
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in FLAGS.sizes]
    print(f"dcam explain --checkpoint=toy --html, peak RSS of the process, median of {FLAGS.repeats} run(s)")
    print(f"{'image':>12} {'decoded MB':>11} {'peak MB':>9} {'over baseline MB':>17}")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for w, h in sizes:
            img = Path(tmp) / f"img_{w}x{h}.png"
            _image(img, w, h)
            peaks = [_peak_mb(img, Path(tmp) / f"out_{w}x{h}_{k}") for k in range(FLAGS.repeats)]
            peak = statistics.median(peaks)
            base = peak if base is None else base
            print(f"{w:>5}x{h:<6} {w * h * 3 / 2**20:>11.1f} {peak:>9.0f} {peak - base:>17.0f}")


if __name__ == "__main__":
    app.run(main)
