"""ShapesWorld generation speed: examples per second per preset, and of batch().

Prints, for each preset, the median over repeats of examples per second of make_example (wall
clock and process CPU time), its ratio to the default preset, and the rate of batch(split, 64).
Usage: python benchmarks/shapes_speed.py [--image_size 64] [--count 400] [--repeats 5]
"""

import argparse
import time

import numpy as np

from dcam_jax.data import shapes as S


def rate(fn, count, repeats):
    walls, cpus = [], []
    fn(0)  # warm caches (lru_caches, first-call imports)
    for r in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        for i in range(count):
            fn(r * count + i)
        walls.append(count / (time.perf_counter() - w))
        cpus.append(count / (time.process_time() - c))
    return float(np.median(walls)), float(np.median(cpus))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--count", type=int, default=400)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    results = {}
    for name in S.PRESETS:
        cfg = S.preset(name, image_size=a.image_size)
        results[name] = rate(lambda i: S.make_example(S.split_seed("train", i), cfg), a.count, a.repeats)
    base = results["default"][0]
    print(f"make_example at {a.image_size} px, median of {a.repeats} x {a.count} examples")
    for name, (wall, cpu) in results.items():
        print(f"  {name:8s} {wall:8.0f} ex/s wall  {cpu:8.0f} ex/s cpu  x{wall / base:.2f} vs default")
    cfg = S.preset("default", image_size=a.image_size)
    bw, bc = rate(lambda i: S.batch("train", range(64 * i, 64 * i + 64), cfg), 5, a.repeats)
    print(f"  batch(64) default: {64 * bw:.0f} ex/s wall, {64 * bc:.0f} ex/s cpu "
          f"(x{64 * bw / base:.2f} vs make_example)")


if __name__ == "__main__":
    main()
