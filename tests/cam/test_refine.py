"""dcam_jax.cam.refine against straightforward NumPy loop versions of SPEC 4.4 / 4.5.

The references below are written from the SPEC text, pixel by pixel and token by token, in
float64; they share no code with the module under test.
"""

import dataclasses
import functools
import inspect
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcam_jax.cam import refine as R
from dcam_jax.ops import sorting

SHAPES = [(7, 9), (14, 18), (22, 28)]
ATOL = 2e-5


# ------------------------------------------------------------------------------------------
# NumPy loop references (float64)
# ------------------------------------------------------------------------------------------

def np_reflect(i, n):
    """reflect-101 index (NumPy 'reflect', OpenCV BORDER_REFLECT_101) for any integer i."""
    if n == 1:
        return 0
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * (n - 1) - i
    return i


def np_rgf(img, k):
    img = np.asarray(img, np.float64)
    h, w = img.shape
    p = k // 2
    ranks = np.arange(k * k) - (k * k) // 2
    out = np.zeros_like(img)
    for y in range(h):
        for x in range(w):
            win = [img[np_reflect(y + dy, h), np_reflect(x + dx, w)]
                   for dy in range(-p, p + 1) for dx in range(-p, p + 1)]
            v = np.sort(np.array(win))
            mu = v.mean()
            if mu <= 0:
                continue
            cov = v.std() / mu
            if cov == 0:
                out[y, x] = v[(k * k) // 2]
                continue
            g = np.exp(-ranks.astype(np.float64) ** 2 / (2 * cov ** 2))
            out[y, x] = (v * g).sum() / g.sum()
    return out


def np_adaptive_k(std, steps, long_side):
    k = int(3 * min(steps / 16, 2) * min(5 * std, 2) * min(long_side / 512, 1.5))
    if k % 2 == 0:
        k += 1
    return max(3, min(k, 11))


def np_blur3(img, sigma):
    img = np.asarray(img, np.float64)
    h, w = img.shape
    g = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * sigma ** 2))
    g /= g.sum()
    out = np.zeros_like(img)
    for y in range(h):
        for x in range(w):
            out[y, x] = sum(g[a] * g[b] * img[np_reflect(y + a - 1, h), np_reflect(x + b - 1, w)]
                            for a in range(3) for b in range(3))
    return out


def np_dacg_branch(img):
    mu, sd = img.mean(), img.std()
    if sd > 0.22:
        return 90.0
    if mu > 0.35:
        return 75.0
    if mu < 0.25:
        return 80.0
    return 85.0


def np_dacg(img, sigma=0.3, eps=1e-6, alpha=None):
    img = np.asarray(img, np.float64)
    alpha = np_dacg_branch(img) if alpha is None else alpha
    nz = img[img >= eps]
    zeta = np.percentile(nz, alpha) if nz.size else eps
    blurred = np_blur3(img, sigma)
    out = img.copy()
    for y, x in itertools.product(range(img.shape[0]), range(img.shape[1])):
        if img[y, x] <= zeta:
            out[y, x] = blurred[y, x]
    return out


def np_cba(img, eps=1e-6):
    img = np.asarray(img, np.float64)
    nz = img[img >= eps]
    if nz.size:
        delta = (0.15 * np.percentile(nz, 50) + 0.15 * np.percentile(img, 60)
                 + 0.2 * nz.mean() + 0.015 * img.max())
    else:
        delta = eps
    out = img.copy()
    for y, x in itertools.product(range(img.shape[0]), range(img.shape[1])):
        v = img[y, x]
        if v < delta:
            out[y, x] = v * min(max(v / max(delta, 1e-8), 0.5), 1.0)
    return out


def np_clip_norm(e, raw, eps=0.0):
    e = np.clip(np.asarray(e, np.float64), 0.0, np.max(raw))
    lo, hi = e.min(), e.max()
    if hi <= lo:
        return np.zeros_like(e)
    return (e - lo) / (hi - lo + eps)


def np_repeat_ratio(ids, valid=None, ignore=()):
    ids = [int(t) for t in ids]
    valid = [True] * len(ids) if valid is None else [bool(v) for v in valid]
    real = [t for t, v in zip(ids, valid) if v and t not in ignore]
    if not real:
        return 0.0
    counts = {}
    for t in real:
        counts[t] = counts.get(t, 0) + 1
    return sum(1 for c in counts.values() if c > 1) / len(real)


def np_debias(m, interf, alpha_cap, guard):
    ii = float((interf * interf).sum())
    if ii == 0:
        return m.copy()
    alpha = float((m * interf).sum()) / ii
    if alpha_cap is not None:
        alpha = min(alpha, alpha_cap)
    out = np.maximum(m - alpha * interf, 0.0)
    if guard is not None and (out.max() - out.min()) < (1 - guard) * (m.max() - m.min()):
        return m.copy()
    return out


def np_sicd(m, ids, valid=None, ignore=(), alpha_cap=0.5, guard=0.1):
    m = np.asarray(m, np.float64)
    r = np_repeat_ratio(ids, valid, ignore)
    interf = np.full(m.shape, 0.05 * r)
    thresh = m.mean() + 2 * m.std()
    for y, x in itertools.product(range(m.shape[0]), range(m.shape[1])):
        if m[y, x] > thresh:
            interf[y, x] += 0.02
    return np_debias(m, interf, alpha_cap, guard)


def np_eci(maps, ids, weights=None, valid=None, alpha_cap=None, guard=None):
    maps = np.asarray(maps, np.float64)
    t_count = maps.shape[0]
    valid = np.ones(t_count, bool) if valid is None else np.asarray(valid)
    out = np.empty_like(maps)
    for j in range(t_count):
        ctx = [i for i in range(j) if ids[i] != ids[j] and valid[i] and valid[j]]
        w = np.array([max(weights[j][i], 0.0) if weights is not None else 1.0 for i in ctx])
        interf = np.zeros(maps.shape[1:])
        if ctx:
            w = w / (w.sum() + 1e-8)
            for wi, i in zip(w, ctx):
                interf += wi * maps[i]
        out[j] = np_debias(maps[j], interf, alpha_cap, guard)
    return out


def np_refine(raw, cfg, ids=None, valid=None, steps=None, long_side=None):
    """raw: [T, H, W] for one answer (ids aligned with the maps for multi_token)."""
    raw = np.asarray(raw, np.float64)
    x = raw.copy()
    if cfg.akd:
        for t in range(x.shape[0]):
            k = cfg.akd_kernel_size or np_adaptive_k(raw[t].std(), steps, long_side)
            x[t] = np_rgf(x[t], k)
    if cfg.dacg and cfg.dacg_blur == "spatial":
        x = np.stack([np_dacg(m) for m in x])
    if cfg.cba:
        x = np.stack([np_cba(m) for m in x])
    if cfg.normalize:
        x = np.stack([np_clip_norm(m, r, cfg.normalize_eps) for m, r in zip(x, raw)])
    if cfg.sicd:
        if not cfg.sicd_ignore_invalid:
            valid = None
        if cfg.sicd_variant == "single":
            x = np.stack([np_sicd(m, ids, valid) for m in x])
        else:
            x = np_eci(x, ids, None, valid, alpha_cap=0.5, guard=0.1)
    if cfg.baseline_threshold is not None:
        x = np.where(x < cfg.baseline_threshold, 0.0, x)
    return x


# ------------------------------------------------------------------------------------------
# Map families
# ------------------------------------------------------------------------------------------

def map_cases(shape, seed=0):
    """[C, H, W] float32: random with zeros, smooth blob, constant, all-zero, one hot pixel,
    near-eps values, a CAM-like map, a low-contrast map."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    sparse = rng.random(shape) ** 2
    sparse[rng.random(shape) < 0.3] = 0.0
    blob = np.exp(-((yy - h / 3) ** 2 + (xx - w / 2) ** 2) / (0.1 * h * w))
    blob = blob + 0.05 * rng.random(shape)
    hot = np.zeros(shape)
    hot[h // 2, w // 3] = 1.0
    tiny = rng.random(shape) * 3e-6                   # straddles the 1e-6 "non-zero" floor
    cam = np.clip(blob - 0.3, 0, None) + 0.2 * rng.random(shape) * (rng.random(shape) < 0.2)
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    flat = 0.5 + 0.05 * rng.random(shape)
    cases = [sparse, blob, np.full(shape, 0.7), np.zeros(shape), hot, tiny, cam, flat]
    return np.stack(cases).astype(np.float32)


def assert_close(got, want, atol=ATOL, rtol=1e-5):
    got = np.asarray(got)
    assert np.isfinite(got).all(), "NaN or inf in the output"
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)


# Module-level jitted entry points: each compiles once per input shape for the whole file.
_akd_jit = jax.jit(R.akd, static_argnums=1)
_dacg_jit = jax.jit(R.dacg, static_argnums=1)
_cba_jit = jax.jit(R.cba)
_sicd_jit = jax.jit(R.sicd, static_argnames=("ignore_ids", "alpha_cap", "range_guard"))
_eci_jit = jax.jit(R.eci, static_argnames=("ignore_ids", "alpha_cap", "range_guard"))
_repeat_ratio_jit = jax.jit(R.repeat_ratio, static_argnames=("ignore_ids",))


# ------------------------------------------------------------------------------------------
# Sorting network and order statistics
# ------------------------------------------------------------------------------------------

def _apply_network(v, n):
    v = v.copy()
    for stage in sorting.batcher_stages(n):
        for a, b in stage:
            lo, hi = np.minimum(v[:, a], v[:, b]), np.maximum(v[:, a], v[:, b])
            v[:, a], v[:, b] = lo, hi
    return v


@pytest.mark.parametrize("n", [1, 2, 9, 13, 16])
def test_batcher_network_sorts_every_zero_one_input(n):
    # 0-1 principle: a comparator network sorts everything iff it sorts all 0/1 vectors.
    v = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1).astype(np.int8)
    np.testing.assert_array_equal(_apply_network(v, n), np.sort(v, axis=1))


@pytest.mark.parametrize("n", [25, 49, 81, 121])
def test_batcher_network_sorts_random_inputs_with_ties(n):
    rng = np.random.default_rng(n)
    v = np.concatenate([rng.integers(0, 4, (300, n)), rng.integers(0, 1000, (300, n))])
    np.testing.assert_array_equal(_apply_network(v, n), np.sort(v, axis=1))
    assert len(sorting.batcher_stages(n)) <= 28


def test_order_statistics_equal_sort():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(6, 50)) * 10.0 ** rng.integers(-8, 8, (6, 50))).astype(np.float32)
    x[0, :25] = 0.0
    x[1, ::2] = -0.0
    x[2] = 3.0
    x[3, :10] = np.float32(1e-38)                     # subnormal-adjacent magnitudes
    ranks = rng.integers(0, 50, (6, 7))
    want = np.take_along_axis(np.sort(x, axis=1), ranks, axis=1)
    got = np.asarray(R.order_statistics(x, ranks))
    np.testing.assert_array_equal(got, want)


def test_percentile_matches_numpy():
    rng = np.random.default_rng(2)
    x = (rng.random((5, 41)) ** 3).astype(np.float32)
    x[:, :12] = 0.0
    x[1, 12:] = 0.25                                    # ties
    x[2] = 0.0                                          # empty subset
    x[3, 12:] = np.linspace(1e-7, 1e-5, 29)             # straddles the floor
    pct_nz = jax.jit(lambda v, q: R.percentile(v, q, min_value=1e-6, empty_value=-1.0))
    pct_all = jax.jit(lambda v, q: R.percentile(v, q))
    for q in [0.0, 13.5, 50.0, 60.0, 75.0, 85.0, 90.0, 100.0]:
        got = np.asarray(pct_nz(x, q))
        want = [np.percentile(r[r >= 1e-6].astype(np.float64), q) if (r >= 1e-6).any() else -1.0
                for r in x]
        assert_close(got, want, atol=1e-7)
        assert_close(pct_all(x, q), np.percentile(x.astype(np.float64), q, axis=1), atol=1e-7)
    # per-row q, traced under jit
    qs = np.array([10.0, 50.0, 77.0, 90.0, 100.0], np.float32)
    got = pct_all(x, qs)
    assert_close(got, [np.percentile(r.astype(np.float64), q) for r, q in zip(x, qs)], atol=1e-7)


# ------------------------------------------------------------------------------------------
# AKD
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 5, 7, 9, 11])
def test_akd_equals_numpy_loop_all_kernel_sizes(k):
    maps = map_cases((7, 9), seed=k)
    mixed = np.random.default_rng(k).normal(size=(7, 9)).astype(np.float32)  # mean <= 0 windows
    maps = np.concatenate([maps, mixed[None]])
    got = _akd_jit(maps, k)
    assert_close(got, np.stack([np_rgf(m, k) for m in maps]))
    if k <= 3:
        assert_close(R.akd(maps, k), got, atol=1e-6)                     # eager == jit


@pytest.mark.parametrize("shape,k", [((14, 18), 3), ((22, 28), 3), ((14, 18), 5),
                                     ((22, 28), 9)])
def test_akd_equals_numpy_loop_shapes(shape, k):
    maps = map_cases(shape, seed=sum(shape) + k)[[0, 1, 2, 3, 4, 6]]
    assert_close(_akd_jit(maps, k), np.stack([np_rgf(m, k) for m in maps]))


def test_akd_chunked_batch_and_leading_dims():
    # more maps than one chunk (and not a multiple of it) with two leading dims
    maps = np.concatenate([map_cases((7, 9), seed=s) for s in range(3)])[:21]
    batch = maps[:20].reshape(4, 5, 7, 9)
    got = np.asarray(_akd_jit(batch, 5)).reshape(20, 7, 9)
    assert_close(got, np.stack([np_rgf(m, 5) for m in maps[:20]]))
    got21 = _akd_jit(maps, 5)
    assert_close(got21[20], np_rgf(maps[20], 5))


def test_akd_edge_cases_exact():
    maps = np.stack([np.full((7, 9), 0.3), np.zeros((7, 9)), -np.ones((7, 9))]).astype(np.float32)
    got = np.asarray(_akd_jit(maps, 3))
    np.testing.assert_array_equal(got[0], maps[0])      # CoV = 0: the median, no NaN
    np.testing.assert_array_equal(got[1:], 0.0)         # mean <= 0: zero


def test_akd_jvp_equals_finite_difference():
    # differentiable through the custom batching rule (k = 3 only: XLA takes seconds to compile
    # the JVP of the staged network used for k >= 5); random maps have no ties to hit
    k = 3
    rng = np.random.default_rng(k)
    m = (0.2 + rng.random((2, 7, 9))).astype(np.float32)
    v = rng.normal(size=(2, 7, 9)).astype(np.float32)
    f = lambda x: R.akd(x, k)
    _, tangent = jax.jvp(jax.jit(f), (m,), (v,))
    # central difference of the float64 loop reference; a tiny step crosses no rank ties
    eps = 1e-6
    m64, v64 = m.astype(np.float64), v.astype(np.float64)
    fd = np.stack([(np_rgf(a + eps * d, k) - np_rgf(a - eps * d, k)) / (2 * eps)
                   for a, d in zip(m64, v64)])
    np.testing.assert_allclose(np.asarray(tangent), fd, atol=1e-3)
    # reverse mode: <grad of <f, v>, v> equals the directional derivative <jvp, v>
    grad = jax.jit(jax.grad(lambda x: jnp.sum(f(x) * v)))(m)
    np.testing.assert_allclose(float(jnp.vdot(grad, v)), float(jnp.vdot(tangent, v)), rtol=1e-4)


def test_akd_multi_selects_per_map():
    maps = map_cases((7, 9), seed=3)[:4]
    ks = np.array([3, 5, 5, 7])
    got = jax.jit(lambda m, k: R.akd_multi(m, k, (3, 5, 7)))(maps, ks)
    assert_close(got, np.stack([np_rgf(m, int(k)) for m, k in zip(maps, ks)]))


def test_adaptive_kernel_size_formula():
    rng = np.random.default_rng(4)
    stds = rng.random(200) * 0.5
    steps = rng.integers(1, 80, 200)
    sides = rng.integers(16, 2048, 200)
    got = np.asarray(R.adaptive_kernel_size(stds.astype(np.float32), steps, sides))
    want = [np_adaptive_k(s, st, si) for s, st, si in zip(stds.astype(np.float32), steps, sides)]
    np.testing.assert_array_equal(got, want)
    # SPEC 4.4: 32 steps, a 640 px image, a spread-out map -> k = 9
    assert int(R.adaptive_kernel_size(0.25, 32, 640)) == 9


def test_authors_kernel_inputs_always_give_three():
    # the authors feed S = 2 and R = grid height: k = 3 for every std and height
    stds = np.linspace(0.0, 1.0, 101)
    for h in [14, 22, 27, 64, 336, 1024]:
        assert set(np.asarray(R.adaptive_kernel_size(stds, 2, h)).tolist()) == {3}
    assert R.refine_preset("reference_compat").akd_kernel_size == 3


# ------------------------------------------------------------------------------------------
# DACG
# ------------------------------------------------------------------------------------------

def test_gaussian_blur_equals_opencv_and_loop():
    cv2 = pytest.importorskip("cv2")
    blur = jax.jit(R.gaussian_blur_3x3, static_argnums=1)
    for shape in SHAPES + [(1, 5), (2, 2)]:
        m = np.random.default_rng(sum(shape)).random(shape).astype(np.float32)
        for sigma in (0.3, 2.0):
            want = cv2.GaussianBlur(m, (3, 3), sigmaX=sigma, sigmaY=sigma,
                                    borderType=cv2.BORDER_REFLECT_101)
            got = blur(m, sigma)
            assert_close(got, want, atol=1e-6)
            assert_close(got, np_blur3(m, sigma), atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_dacg_equals_numpy_loop(shape):
    maps = map_cases(shape, seed=10 + shape[0])
    rng = np.random.default_rng(shape[1])
    extra = [0.25 + 0.1 * rng.random(shape), 0.15 * rng.random(shape)]    # default, low mean
    maps = np.concatenate([maps, np.stack(extra).astype(np.float32)])
    # the test set must exercise all four percentile branches
    assert {np_dacg_branch(m.astype(np.float64)) for m in maps} == {75.0, 80.0, 85.0, 90.0}
    got = _dacg_jit(maps, 0.3)
    assert_close(got, np.stack([np_dacg(m) for m in maps]))
    if shape == SHAPES[0]:
        assert_close(_dacg_jit(maps, 0.8), np.stack([np_dacg(m, 0.8) for m in maps]))
        assert_close(R.dacg(maps), got, atol=1e-6)                       # eager == jit


def test_dacg_reference_noop_is_identity():
    maps = map_cases((7, 9))
    np.testing.assert_array_equal(np.asarray(R.dacg(maps, blur="reference_noop")), maps)


# ------------------------------------------------------------------------------------------
# CBA and normalise
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_cba_equals_numpy_loop(shape):
    maps = map_cases(shape, seed=20 + shape[0])
    got = _cba_jit(maps)
    assert_close(got, np.stack([np_cba(m) for m in maps]))
    if shape == SHAPES[0]:
        assert_close(R.cba(maps), got, atol=1e-6)                        # eager == jit
    np.testing.assert_array_equal(np.asarray(got)[3], 0.0)     # all-zero map stays zero


def test_clip_and_normalize():
    rng = np.random.default_rng(5)
    raw = rng.random((4, 7, 9)).astype(np.float32)
    raw[1] *= 0.5
    e = (rng.random((4, 7, 9)) * 1.4 - 0.2).astype(np.float32)   # outside [0, max raw]
    e[2] = 0.3                                                    # constant -> zeros
    got = np.asarray(R.clip_and_normalize(e, raw))
    assert_close(got, np.stack([np_clip_norm(a, b) for a, b in zip(e, raw)]))
    np.testing.assert_array_equal(got[2], 0.0)
    assert got.min() == 0.0 and got.max() == 1.0
    assert_close(R.clip_and_normalize(e, raw, eps=1e-8),
                 np.stack([np_clip_norm(a, b, 1e-8) for a, b in zip(e, raw)]))


# ------------------------------------------------------------------------------------------
# SICD and ECI
# ------------------------------------------------------------------------------------------

def test_repeat_ratio_equals_loop():
    rng = np.random.default_rng(6)
    ids = rng.integers(0, 6, (8, 12))
    valid = rng.random((8, 12)) < 0.8
    got = np.asarray(_repeat_ratio_jit(ids, valid, ignore_ids=(2,)))
    assert_close(got, [np_repeat_ratio(i, v, (2,)) for i, v in zip(ids, valid)], atol=1e-7)
    special = np.array([[5, 5, 5, 0, 0, 0], [1, 2, 1, 0, 0, 0], [1, 2, 1, 0, 0, 0]])
    got = np.asarray(_repeat_ratio_jit(special, np.array([[False] * 6, [True] * 6, [True] * 6])))
    # no valid token -> 0; the authors count EOS padding as a repeated token: 2 / 6
    assert_close(got, [0.0, 2 / 6, 2 / 6], atol=1e-7)
    got = np.asarray(_repeat_ratio_jit(special, None, ignore_ids=(0,)))
    assert_close(got, [1 / 3, 1 / 3, 1 / 3], atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES)
def test_sicd_equals_numpy_loop(shape):
    maps = map_cases(shape, seed=30 + shape[0])
    ids = np.array([3, 7, 3, 9, 7, 7, 1, 0, 0])
    valid = ids != 0
    got = _sicd_jit(maps, ids, valid=valid)
    assert_close(got, np.stack([np_sicd(m, ids, valid) for m in maps]))
    if shape == SHAPES[0]:
        assert_close(R.sicd(maps, ids, valid=valid), got, atol=1e-6)     # eager == jit
    got = _sicd_jit(maps, ids, ignore_ids=(0,), alpha_cap=None, range_guard=None)
    assert_close(got, np.stack([np_sicd(m, ids, valid, (), None, None) for m in maps]))


def test_sicd_range_guard_keeps_map():
    m = (0.5 + 0.001 * np.random.default_rng(7).random((7, 9))).astype(np.float32)
    m[3, 4] = 0.52                                     # outlier loses half the small range
    ids = np.array([1, 1, 2])
    assert np.array_equal(np.asarray(_sicd_jit(m, ids)), m)
    assert_close(_sicd_jit(m, ids), np_sicd(m, ids))
    unguarded = np.asarray(_sicd_jit(m, ids, range_guard=None))
    assert not np.array_equal(unguarded, m)


def _brute_force_alpha(m, interf):
    # coarse grid, then golden-section refinement of sum (M - a I)^2; no closed form used
    grid = np.linspace(-5, 50, 5501)
    loss = [((m - a * interf) ** 2).sum() for a in grid]
    a0 = grid[int(np.argmin(loss))]
    lo, hi = a0 - 0.01, a0 + 0.01
    phi = (np.sqrt(5) - 1) / 2
    f = lambda a: ((m - a * interf) ** 2).sum()
    for _ in range(80):
        c, d = hi - phi * (hi - lo), lo + phi * (hi - lo)
        if f(c) < f(d):
            hi = d
        else:
            lo = c
    return (lo + hi) / 2


def test_sicd_closed_form_alpha_equals_brute_force():
    rng = np.random.default_rng(8)
    for trial in range(4):
        m = (rng.random((5, 6)) ** 2).astype(np.float32)
        m[trial, trial] = 1.0
        ids = rng.integers(0, 3, 6)
        r = np_repeat_ratio(ids)
        mm = m.astype(np.float64)
        interf = 0.05 * r + 0.02 * (mm > mm.mean() + 2 * mm.std())
        alpha = _brute_force_alpha(mm, interf)
        got = np.asarray(_sicd_jit(m, ids, alpha_cap=None, range_guard=None))
        assert_close(got, np.maximum(mm - alpha * interf, 0.0), atol=1e-5)
    # capped: alpha* far above 0.5 on a bright map, so exactly 0.5 is used
    m = np.full((4, 4), 0.8, np.float32)
    got = np.asarray(_sicd_jit(m, np.array([4, 4, 5, 6]), range_guard=None))
    assert_close(got, 0.8 - 0.5 * 0.05 * 0.25, atol=1e-6)


def test_eci_equals_numpy_loop():
    rng = np.random.default_rng(9)
    maps = (rng.random((6, 7, 9)) ** 2).astype(np.float32)
    ids = np.array([4, 8, 4, 2, 8, 0])
    weights = rng.normal(size=(6, 6)).astype(np.float32)
    valid = ids != 0
    got = _eci_jit(maps, ids, weights, valid=valid)
    assert_close(got, np_eci(maps, ids, weights, valid))
    assert_close(R.eci(maps, ids, weights, valid=valid), got, atol=1e-6)    # eager == jit
    assert_close(_eci_jit(maps, ids), np_eci(maps, ids))
    assert_close(_eci_jit(maps, ids, alpha_cap=0.5, range_guard=0.1),
                 np_eci(maps, ids, alpha_cap=0.5, guard=0.1))
    # token 0 has no context: unchanged; batched over a leading axis
    np.testing.assert_array_equal(np.asarray(got)[0], maps[0])
    both = _eci_jit(np.stack([maps, maps[::-1]]), np.stack([ids, ids[::-1]]))
    assert_close(both[1], np_eci(maps[::-1], ids[::-1]))


# ------------------------------------------------------------------------------------------
# The chain, presets, transformations, errors
# ------------------------------------------------------------------------------------------

IDS = np.array([11, 12, 11, 13, 2, 2])      # 2 = EOS padding
VALID = IDS != 2


def _answer_maps(shape=(7, 9), seed=40):
    cases = map_cases(shape, seed)
    return cases[[0, 1, 4, 6, 7, 2]]          # [T=6, H, W]: sparse, blob, hot, cam, flat, const


@pytest.mark.parametrize("preset", ["full", "none", "akd", "dacg", "cba", "sicd",
                                    "reference_compat", "reference_baseline"])
def test_refine_presets_equal_numpy_chain(preset):
    cfg = R.refine_preset(preset)
    raw = _answer_maps()
    # S = 16, R = 640 -> k = clamp_odd(int(18.75 * std)): 3 or 5 here, both paths exercised
    got = R.refine(raw, cfg, token_ids=IDS, valid=VALID, num_steps=16, image_long_side=640)
    want = np_refine(raw, cfg, IDS, VALID, 16, 640)
    assert_close(got, want)
    got = np.asarray(got)
    assert got.min() >= 0.0 and got.max() <= 1.0
    if preset == "full":
        ks = {np_adaptive_k(m.astype(np.float64).std(), 16, 640) for m in raw}
        assert ks == {3, 5}


def test_refine_multi_token_variant():
    cfg = dataclasses.replace(R.refine_preset("full"), akd_kernel_size=3,
                              sicd_variant="multi_token")
    raw = _answer_maps()
    got = R.refine(raw, cfg, token_ids=IDS, valid=VALID)
    assert_close(got, np_refine(raw, cfg, IDS, VALID))


def test_reference_compat_quirks():
    cfg = R.refine_preset("reference_compat")
    assert cfg.akd and cfg.akd_kernel_size == 3 and cfg.dacg_blur == "reference_noop"
    assert cfg.sicd and not cfg.sicd_ignore_invalid
    raw = _answer_maps()
    # DACG is an exact identity (test_dacg_reference_noop_is_identity; the chain is compared with
    # a NumPy chain without DACG in test_refine_presets_equal_numpy_chain).
    # SICD always on, counting the EOS padding (valid is ignored), so it needs token ids
    with_valid = R.refine(raw, cfg, token_ids=IDS, valid=VALID)
    np.testing.assert_array_equal(np.asarray(with_valid),
                                  np.asarray(R.refine(raw, cfg, token_ids=IDS)))
    with pytest.raises(ValueError, match="token_ids"):
        R.refine(raw, cfg)


def test_refine_vmap_equals_numpy_loop_and_adaptive_in_graph():
    cfg = dataclasses.replace(R.refine_preset("full"), akd_kernel_size=3)
    raw = np.stack([_answer_maps(seed=s) for s in (41, 42, 43)])         # [B=3, T, H, W]
    f = functools.partial(R.refine_arrays, config=cfg, token_ids=IDS, valid=VALID)
    batched = jax.jit(jax.vmap(f))(raw)
    assert_close(batched, np.stack([np_refine(r, cfg, IDS, VALID) for r in raw]))
    # adaptive kernel evaluated in-graph (every candidate, then select) == host-side grouping;
    # AKD-only with the clamp range cut to 3..5 to keep compile time down
    cfg_a = dataclasses.replace(R.refine_preset("akd"), akd_max_kernel=5)
    in_graph = jax.jit(lambda r: R.refine_arrays(r, cfg_a, num_steps=16,
                                                 image_long_side=640))(raw[0])
    host = R.refine(raw[0], cfg_a, num_steps=16, image_long_side=640)
    assert_close(in_graph, host, atol=1e-6)


@pytest.mark.parametrize("name", ["akd3", "akd5", "eci"])
def test_modules_vmap_equal_numpy_loop(name):
    # the chain's vmap test covers DACG, CBA and SICD; these are the custom batching rule
    # (unrolled and staged AKD) and the [..., T, H, W] ECI
    fn, ref = {"akd3": (lambda m: R.akd(m, 3), lambda m: np.stack([np_rgf(t, 3) for t in m])),
               "akd5": (lambda m: R.akd(m, 5), lambda m: np.stack([np_rgf(t, 5) for t in m])),
               "eci": (lambda m: R.eci(m, IDS, valid=VALID),
                       lambda m: np_eci(m, IDS, None, VALID))}[name]
    maps = np.stack([_answer_maps(seed=s) for s in (50, 51, 52)])          # [3, T, H, W]
    assert_close(jax.jit(jax.vmap(fn))(maps), np.stack([ref(m) for m in maps]))


def test_refine_raises_on_nonfinite_naming_the_map():
    raw = _answer_maps()
    raw[2, 3, 3] = np.nan
    with pytest.raises(ValueError, match=r"map 2 "):
        R.refine(raw, R.refine_preset("none"))
    raw4 = np.stack([_answer_maps(), _answer_maps()])
    raw4[1, 4, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"map \(1, 4\)"):
        R.refine(raw4, R.refine_preset("none"))
    with pytest.raises(ValueError, match="traced"):
        jax.jit(R.check_finite)(raw4)


def test_bad_inputs_raise_clear_errors():
    raw = _answer_maps()
    with pytest.raises(ValueError, match="odd"):
        R.akd(raw, 4)
    with pytest.raises(ValueError, match="static Python int"):
        jax.jit(lambda m, k: R.akd(m, k))(raw, 3)
    with pytest.raises(ValueError, match="unknown preset"):
        R.refine_preset("everything")
    with pytest.raises(ValueError, match="dacg_blur"):
        dataclasses.replace(R.refine_preset("full"), dacg_blur="column")
    with pytest.raises(ValueError, match="num_steps"):
        R.refine(raw, R.refine_preset("akd"))
    with pytest.raises(ValueError, match="at least 2 dims"):
        R.refine(np.zeros(5, np.float32), R.refine_preset("none"))
    with pytest.raises(ValueError, match="one token id per map"):
        R.refine(raw, dataclasses.replace(R.refine_preset("sicd"), sicd_variant="multi_token"),
                 token_ids=IDS[:4])
    with pytest.raises(ValueError, match="broadcast"):
        R.refine(np.stack([raw, raw]), R.refine_preset("sicd"), token_ids=np.stack([IDS] * 2))
    with pytest.raises(ValueError, match="q="):
        R.percentile(raw.reshape(6, -1), 0.5 * 300)


def test_refine_groups_maps_by_kernel_size():
    # 24 maps with sizes 3 and 5: each group of 12 is padded to 16 and filtered once
    cfg = R.refine_preset("akd")
    raw = np.concatenate([_answer_maps(seed=s) for s in (60, 61, 62, 63)])
    ks = [np_adaptive_k(m.astype(np.float64).std(), 16, 640) for m in raw]
    assert sorted(set(ks)) == [3, 5] and 16 < len(raw) and min(ks.count(3), ks.count(5)) < 16
    got = R.refine(raw, cfg, num_steps=16, image_long_side=640)
    assert_close(got, np_refine(raw, cfg, steps=16, long_side=640))


def test_preset_overrides():
    c = R.refine_preset("full:akd_kernel_size=3")
    assert c.akd_kernel_size == 3 and c.dacg and c.sicd
    c = R.refine_preset("akd:akd_kernel_size=5:dacg=true")
    assert (c.akd, c.dacg, c.cba, c.akd_kernel_size) == (True, True, False, 5)
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        R.refine_preset("full:nope=1")


# ------------------------------------------------------------------------------------------
# One source of constants, and every branch of the DACG and AKD rules through RefineConfig
# ------------------------------------------------------------------------------------------

# each module's keyword constants and the RefineConfig field that refine_arrays passes to it
_KWARG_FIELDS = {
    R.dacg: {"sigma": "dacg_sigma", "delta_sigma": "dacg_delta_sigma", "delta_mu": "dacg_delta_mu",
             "delta_mu_prime": "dacg_delta_mu_prime", "alpha_high_var": "dacg_alpha_high_var",
             "alpha_high_mean": "dacg_alpha_high_mean", "alpha_low_mean": "dacg_alpha_low_mean",
             "alpha_default": "dacg_alpha_default", "nonzero_eps": "dacg_nonzero_eps",
             "blur": "dacg_blur"},
    R.adaptive_kernel_size: {"base": "akd_base", "step_div": "akd_step_div",
                             "step_cap": "akd_step_cap", "std_mult": "akd_std_mult",
                             "std_cap": "akd_std_cap", "size_div": "akd_size_div",
                             "size_cap": "akd_size_cap", "min_kernel": "akd_min_kernel",
                             "max_kernel": "akd_max_kernel"},
    R.cba: {"w_nonzero_pct": "cba_w_nonzero_pct", "q_nonzero": "cba_q_nonzero",
            "w_all_pct": "cba_w_all_pct", "q_all": "cba_q_all",
            "w_nonzero_mean": "cba_w_nonzero_mean", "w_max": "cba_w_max", "floor": "cba_floor",
            "nonzero_eps": "cba_nonzero_eps", "min_delta": "cba_min_delta"},
    R.clip_and_normalize: {"eps": "normalize_eps"},
    R.sicd: {"repeat_weight": "sicd_repeat_weight", "outlier_weight": "sicd_outlier_weight",
             "outlier_std": "sicd_outlier_std", "alpha_cap": "sicd_alpha_cap",
             "range_guard": "sicd_range_guard"},
    R.gaussian_blur_3x3: {"sigma": "dacg_sigma"},
}


def test_config_defaults_equal_the_modules_keyword_defaults():
    # RefineConfig's defaults and the modules' keyword defaults are two copies of the SPEC 4.4
    # constants; refine() reads the config, direct calls read the keywords: they must agree
    cfg = R.RefineConfig()
    for fn, fields in _KWARG_FIELDS.items():
        sig = inspect.signature(fn).parameters
        consts = {n for n, p in sig.items()
                  if p.default is not p.empty and n not in ("valid", "ignore_ids")}
        assert consts == set(fields), (fn.__name__, consts ^ set(fields))
        for kw, field in fields.items():
            assert getattr(cfg, field) == sig[kw].default, (fn.__name__, kw, field)
    # every DACG and AKD constant of the config is one of them (besides the switches)
    covered = {f for fields in _KWARG_FIELDS.values() for f in fields.values()}
    names = {f.name for f in dataclasses.fields(R.RefineConfig)}
    assert {n for n in names if n.startswith(("dacg_", "akd_"))} - covered == {
        "akd_kernel_size", "akd_region_level"}


def _map_with_stats(mu, sd, shape=(12, 12), seed=0):
    """A random map whose population mean and std are exactly mu and sd (float64)."""
    z = np.random.default_rng(seed).random(shape)
    z = (z - z.mean()) / z.std()
    return mu + sd * z


# (mean, std, SPEC percentile): each threshold approached from both sides (0.02 away from it)
DACG_BRANCH_CASES = [
    (0.50, 0.24, 90.0),   # sigma > delta_sigma = 0.22: high variance
    (0.50, 0.20, 75.0),   # sigma just below: the mean decides, mu > delta_mu = 0.35
    (0.15, 0.24, 90.0),   # high variance wins over a low mean
    (0.37, 0.10, 75.0),   # mu just above delta_mu
    (0.33, 0.10, 85.0),   # mu just below delta_mu, above delta_mu' = 0.25: default
    (0.27, 0.10, 85.0),   # mu just above delta_mu'
    (0.23, 0.10, 80.0),   # mu just below delta_mu': low mean
    (0.10, 0.05, 80.0),   # low mean, low variance
]


def test_dacg_every_branch_through_the_config_and_the_keywords():
    maps = np.stack([_map_with_stats(mu, sd, seed=i)
                     for i, (mu, sd, _) in enumerate(DACG_BRANCH_CASES)]).astype(np.float32)
    branches = [np_dacg_branch(m.astype(np.float64)) for m in maps]
    assert branches == [a for *_, a in DACG_BRANCH_CASES]
    want = np.stack([np_dacg(m) for m in maps])
    # every map's output depends on its percentile: a wrong branch changes it
    for m, w, (*_, alpha) in zip(maps, want, DACG_BRANCH_CASES):
        for other in {75.0, 80.0, 85.0, 90.0} - {alpha}:
            assert np.abs(np_dacg(m, alpha=other) - w).max() > 10 * ATOL, (alpha, other)
    # the chain reads RefineConfig's constants...
    cfg = dataclasses.replace(R.refine_preset("dacg"), normalize=False)
    assert_close(R.refine(maps, cfg), want)
    assert_close(R.refine(maps, R.refine_preset("dacg")), np_refine(maps, R.refine_preset("dacg")))
    # ...and a direct call its keyword defaults
    assert_close(_dacg_jit(maps, 0.3), want)


# (map std, S, R, k, the branch): k = clamp_odd(int(3 * min(S/16, 2) * min(5 std, 2)
# * min(R/512, 1.5)), 3, 11), each product away from an integer (float32 std)
AKD_BRANCH_CASES = [
    (0.35, 16, 512, 5, "plain: 5.25 -> 5"),
    (0.30, 16, 512, 5, "even: 4.5 -> 4 -> 5"),
    (0.26, 64, 512, 7, "step cap 2: 7.8 -> 7 (uncapped 15.6 -> 11)"),
    (0.50, 24, 512, 9, "std cap 2: 9 (uncapped 11.25 -> 11)"),
    (0.30, 16, 1024, 7, "size cap 1.5: 6.75 -> 7 (uncapped 9)"),
    (0.50, 32, 1024, 11, "upper clamp: 18 -> 19 -> 11"),
    (0.05, 16, 512, 3, "lower clamp: 0.75 -> 1 -> 3"),
    (0.00, 16, 512, 3, "constant map: 0 -> 1 -> 3"),
]


def test_akd_kernel_rule_every_branch_through_the_config_and_the_keywords():
    maps = np.stack([_map_with_stats(0.5, sd, seed=i)
                     for i, (sd, *_) in enumerate(AKD_BRANCH_CASES)]).astype(np.float32)
    steps = np.array([c[1] for c in AKD_BRANCH_CASES])
    sides = np.array([c[2] for c in AKD_BRANCH_CASES])
    want = [c[3] for c in AKD_BRANCH_CASES]
    assert [np_adaptive_k(m.astype(np.float64).std(), s, r)
            for m, s, r in zip(maps, steps, sides)] == want
    # refine() sizes each map with kernel_sizes_for(config); direct calls use the keywords
    got = R.kernel_sizes_for(maps, R.RefineConfig(), steps, sides)
    np.testing.assert_array_equal(np.asarray(got), want)
    got = R.adaptive_kernel_size(jnp.std(jnp.asarray(maps), axis=(-2, -1)), steps, sides)
    np.testing.assert_array_equal(np.asarray(got), want)
    # the host path filters at that size (the step-cap map: k = 7; 11 without the cap)
    m = maps[2]
    got = R.refine(m, R.refine_preset("akd"), num_steps=int(steps[2]),
                   image_long_side=int(sides[2]))
    assert_close(got, np_clip_norm(np_rgf(m, 7), m))
    for k in (5, 9, 11):
        assert np.abs(np_clip_norm(np_rgf(m, k), m) - np.asarray(got)).max() > 10 * ATOL, k
