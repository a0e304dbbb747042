"""Maps per second of the jitted refinement chain against per-map NumPy loops, in one run.

    python benchmarks/refine.py                      # batch of 256 maps of 22x28
    python benchmarks/refine.py --repeats 9 --numpy_maps 32

What is timed (medians of --repeats runs, compile time excluded and reported separately):
- ``refine`` (the public host wrapper: finiteness check, adaptive kernel sizes, one jitted call)
  on a batch of maps, for the ``full`` preset (adaptive AKD kernel with --num_steps and
  --image_long_side) and for ``reference_compat`` (k = 3);
- ``akd`` alone (jit) at k = 3 and k = 9.
The baseline is the authors' style: one map at a time in NumPy, the rank Gaussian filter as a
pixel loop with a sort per window (TAM's and the authors' code), the other modules vectorised
per map. A second baseline vectorises each map's windows (sliding_window_view + np.sort), a
fairer NumPy than the authors run; both appear, for the chain and for AKD alone. The NumPy
loops run on --numpy_maps maps (they are slow) and are reported per map. The max |difference|
column checks that both sides compute the same thing on those maps.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from dcam_jax.cam import refine as R


# --------------------------------------------------------------------------------------------
# NumPy per-map implementation of SPEC 4.4 (the authors' style)
# --------------------------------------------------------------------------------------------

def np_rgf_loop(img: np.ndarray, k: int) -> np.ndarray:
    """Rank Gaussian filter, pixel by pixel (as TAM's and the authors' code)."""
    p = k // 2
    padded = np.pad(img, p, mode="reflect")
    ranks = np.arange(k * k) - (k * k) // 2
    out = np.zeros_like(img)
    h, w = img.shape
    for i in range(h):
        for j in range(w):
            v = np.sort(padded[i:i + k, j:j + k].ravel())
            mu = v.mean()
            if mu > 0:
                cov = v.std() / mu
                if cov > 0:
                    g = np.exp(-ranks ** 2 / (2 * cov * cov))
                    out[i, j] = (v * g).sum() / g.sum()
                else:
                    out[i, j] = v[(k * k) // 2]
    return out


def np_rgf_vectorised(img: np.ndarray, k: int) -> np.ndarray:
    """Same filter, one map at a time but vectorised over its pixels."""
    p = k // 2
    win = np.lib.stride_tricks.sliding_window_view(np.pad(img, p, mode="reflect"), (k, k))
    v = np.sort(win.reshape(img.shape + (k * k,)), axis=-1)
    mu = v.mean(-1)
    cov = v.std(-1) / np.where(mu > 0, mu, 1.0)
    safe = np.where(cov > 0, cov, 1.0)
    ranks = np.arange(k * k) - (k * k) // 2
    g = np.exp(-ranks ** 2 / (2 * safe[..., None] ** 2))
    out = np.where(cov > 0, (v * g).sum(-1) / g.sum(-1), v[..., (k * k) // 2])
    return np.where(mu > 0, out, 0.0).astype(img.dtype)


def np_adaptive_k(std: float, steps: int, long_side: int) -> int:
    k = int(3 * min(steps / 16, 2) * min(5 * std, 2) * min(long_side / 512, 1.5))
    k += k % 2 == 0
    return max(3, min(k, 11))


def np_blur3(img: np.ndarray, sigma: float) -> np.ndarray:
    g = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * sigma ** 2))
    g /= g.sum()
    p = np.pad(img, 1, mode="reflect")
    rows = g[0] * p[:, :-2] + g[1] * p[:, 1:-1] + g[2] * p[:, 2:]
    return g[0] * rows[:-2] + g[1] * rows[1:-1] + g[2] * rows[2:]


def np_refine_one(raw: np.ndarray, cfg: R.RefineConfig, ids: np.ndarray, steps: int,
                  long_side: int, rgf=np_rgf_loop) -> np.ndarray:
    x = raw
    if cfg.akd:
        k = cfg.akd_kernel_size or np_adaptive_k(float(raw.std()), steps, long_side)
        x = rgf(x, k)
    if cfg.dacg and cfg.dacg_blur == "spatial":
        mu, sd = x.mean(), x.std()
        alpha = 90 if sd > 0.22 else 75 if mu > 0.35 else 80 if mu < 0.25 else 85
        nz = x[x >= 1e-6]
        zeta = np.percentile(nz, alpha) if nz.size else 1e-6
        x = np.where(x <= zeta, np_blur3(x, cfg.dacg_sigma), x)
    if cfg.cba:
        nz = x[x >= 1e-6]
        delta = (0.15 * np.percentile(nz, 50) + 0.15 * np.percentile(x, 60) + 0.2 * nz.mean()
                 + 0.015 * x.max()) if nz.size else 1e-6
        x = np.where(x < delta, x * np.clip(x / max(delta, 1e-8), 0.5, 1.0), x)
    x = np.clip(x, 0, raw.max())
    lo, hi = x.min(), x.max()
    x = (x - lo) / (hi - lo + cfg.normalize_eps) if hi > lo else np.zeros_like(x)
    if cfg.sicd:
        _, counts = np.unique(ids, return_counts=True)
        r = (counts > 1).sum() / len(ids)
        interf = 0.05 * r + 0.02 * (x > x.mean() + 2 * x.std())
        ii = (interf * interf).sum()
        if ii > 0:
            alpha = min((x * interf).sum() / ii, 0.5)
            out = np.maximum(x - alpha * interf, 0)
            if out.max() - out.min() >= 0.9 * (x.max() - x.min()):
                x = out
    return x


# --------------------------------------------------------------------------------------------
# Inputs and timing
# --------------------------------------------------------------------------------------------

def cam_like_maps(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """[n, h, w] float32: 1-3 Gaussian blobs plus speckle, ReLU'd and min-max normalised."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, h, w), np.float32)
    for i in range(n):
        m = np.zeros((h, w), np.float32)
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.random() * h, rng.random() * w
            s = (0.08 + 0.2 * rng.random()) * max(h, w)
            m += rng.random() * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        m += 0.3 * rng.random((h, w)) * (rng.random((h, w)) < 0.15)     # speckle artefacts
        m = np.maximum(m - np.quantile(m, 0.3), 0)
        out[i] = (m - m.min()) / (m.max() - m.min())
    return out


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def time_jax(fn, repeats: int) -> tuple[float, float, np.ndarray]:
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t
    run = median_time(fn, repeats)
    return run, max(first - run, 0.0), np.asarray(out)


def time_numpy(fn, maps: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    out = np.stack([fn(m) for m in maps])
    per_map = median_time(lambda: [fn(m) for m in maps], repeats) / len(maps)
    return per_map, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--height", type=int, default=22)
    ap.add_argument("--width", type=int, default=28)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--numpy_maps", type=int, default=16,
                    help="maps for the (slow) NumPy loops; reported per map")
    ap.add_argument("--numpy_repeats", type=int, default=3)
    ap.add_argument("--num_steps", type=int, default=32)
    ap.add_argument("--image_long_side", type=int, default=640)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    maps = cam_like_maps(args.batch, args.height, args.width, args.seed)
    sub = maps[:args.numpy_maps]
    ids = np.array([5, 9, 5, 17, 3, 9, 21, 2, 2, 2])         # answer ids, 2 = EOS padding
    valid = ids != 2
    x = jnp.asarray(maps)
    steps, side = args.num_steps, args.image_long_side

    print(f"# refine benchmark: jax {jax.__version__} on {jax.devices()[0].platform} "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cpus)")
    ks = [np_adaptive_k(float(m.astype(np.float64).std()), steps, side) for m in maps]
    hist = {k: ks.count(k) for k in sorted(set(ks))}
    print(f"# batch {args.batch} maps of {args.height}x{args.width}; medians of {args.repeats} "
          f"(jax) / {args.numpy_repeats} (numpy, on {len(sub)} maps); adaptive k with "
          f"S={steps}, R={side}: {hist}")
    header = (f"{'case':44s} {'jax maps/s':>11s} {'compile s':>10s} {'numpy maps/s':>13s} "
              f"{'ratio':>8s} {'max|diff|':>10s}")
    print(header)
    print("-" * len(header))

    def row(name, jax_s, compile_s, np_s, diff):
        n = args.batch
        print(f"{name:44s} {n / jax_s:11.0f} {compile_s:10.2f} {1 / np_s:13.1f} "
              f"{np_s * n / jax_s:7.0f}x {diff:10.1e}")

    for preset in ("full", "reference_compat"):
        cfg = R.refine_preset(preset)
        fn = lambda cfg=cfg: R.refine(x, cfg, token_ids=ids, valid=valid, num_steps=steps,
                                      image_long_side=side)
        jax_s, comp, out = time_jax(fn, args.repeats)
        np_ids = ids if not cfg.sicd_ignore_invalid else ids[valid]
        for label, rgf in (("pixel loop", np_rgf_loop), ("vectorised numpy", np_rgf_vectorised)):
            np_fn = lambda m, cfg=cfg, rgf=rgf: np_refine_one(m, cfg, np_ids, steps, side, rgf)
            np_s, np_out = time_numpy(np_fn, sub, args.numpy_repeats)
            diff = float(np.abs(out[:len(sub)] - np_out).max())
            row(f"refine {preset} vs {label}", jax_s, comp, np_s, diff)
            comp = 0.0

    for k in (3, 9):
        akd_k = jax.jit(lambda m, k=k: R.akd(m, k))
        jax_s, comp, out = time_jax(lambda: akd_k(x), args.repeats)
        np_s, np_out = time_numpy(lambda m: np_rgf_loop(m, k), sub, args.numpy_repeats)
        row(f"akd k={k} vs pixel loop", jax_s, comp, np_s,
            float(np.abs(out[:len(sub)] - np_out).max()))
        np_s, np_out = time_numpy(lambda m: np_rgf_vectorised(m, k), sub, args.numpy_repeats)
        row(f"akd k={k} vs vectorised numpy", jax_s, 0.0, np_s,
            float(np.abs(out[:len(sub)] - np_out).max()))


if __name__ == "__main__":
    main()
