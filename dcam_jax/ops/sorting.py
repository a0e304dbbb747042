"""Batcher odd-even merge sorting networks: the comparator stages for n inputs and their gather tables."""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=None)
def batcher_stages(n: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Batcher's odd-even merge sort for n inputs, as stages of disjoint (lo, hi) comparators.

    Built for the next power of two and pruned: comparators always send the min to the lower
    index, so padding at indices >= n would stay +inf and every comparator touching it is a no-op.
    """
    p = 1
    while p < n:
        p *= 2
    stages = []
    width = 1
    while width < p:
        d = width
        while d >= 1:
            stage = []
            for j in range(d % width, p - d, 2 * d):
                for i in range(min(d, p - j - d)):
                    a, b = i + j, i + j + d
                    if a // (2 * width) == b // (2 * width) and b < n:
                        stage.append((a, b))
            if stage:
                stages.append(tuple(stage))
            d //= 2
        width *= 2
    return tuple(stages)


@functools.lru_cache(maxsize=None)
def stage_tables(n: int):
    """Per stage: partner index of every slot (itself if idle) and whether it keeps the min."""
    stages = batcher_stages(n)
    partner = np.tile(np.arange(n), (len(stages), 1))
    keeps_min = np.zeros((len(stages), n), bool)
    for s, pairs in enumerate(stages):
        for a, b in pairs:
            partner[s, a], partner[s, b] = b, a
            keeps_min[s, a] = True
    return partner, keeps_min
