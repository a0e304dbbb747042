"""Probe states: the partially masked answers at which a token's gradient is taken.

  decision    the state just before the token was committed (SPEC 4.3's default)
  trajectory  K states evenly spaced from the start of generation to the decision state
  noise       K random re-maskings of the final answer, the target always masked

("clean", the final answer itself, and "final", the state before the last step, need no function.) All are host
NumPy arrays of answer ids, [..., G] int32, with the mask id where a position is masked.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np


def decision_states(tokens: np.ndarray, commit_step: np.ndarray, targets: Sequence[int], mask_id: int) -> np.ndarray:
    """The state just before each target was committed: where(commit_step < commit_step[p], tokens, MASK).

    tokens, commit_step: [G]; targets: answer positions -> [len(targets), G] int32.
    """
    tokens = np.asarray(tokens)
    cs = np.asarray(commit_step)
    s = cs[np.asarray(targets)][:, None]
    return np.where(cs[None, :] < s, tokens[None, :], mask_id).astype(np.int32)


def trajectory_states(tokens: np.ndarray, commit_step: np.ndarray, targets: Sequence[int], num_states: int,
                      mask_id: int) -> np.ndarray:
    """States along the denoising trajectory up to each target's decision: for target p with commit step c_p,
    the states at steps s_k = round(k * c_p / (K - 1)), k = 0..K-1, rounded half to even (s = 0: everything
    masked; s = c_p: the decision state), state_s = where(commit_step < s, tokens, MASK). K = 1 gives the decision
    state alone.

    tokens, commit_step: [G]; targets: answer positions -> [len(targets), K, G] int32 (position p masked in all).
    """
    tokens = np.asarray(tokens)
    cs = np.asarray(commit_step)
    steps = trajectory_steps(cs, targets, num_states)
    return np.where(cs[None, None, :] < steps[..., None], tokens[None, None, :], mask_id).astype(np.int32)


def trajectory_steps(commit_step: np.ndarray, targets: Sequence[int], num_states: int) -> np.ndarray:
    """The denoising steps of :func:`trajectory_states`: s_k = round(k * c_p / (K - 1)) (half to even), k = 0..K-1,
    for each target p with commit step c_p; K = 1 gives c_p alone. -> [len(targets), K] int64."""
    if num_states < 1:
        raise ValueError(f"num_trajectory_states={num_states} must be >= 1")
    c = np.asarray(commit_step)[np.asarray(targets)].astype(np.float64)  # [T]
    if num_states == 1:
        return c[:, None].astype(np.int64)
    # k * c / (K - 1) from integers: exact halves, so the rounding is exactly half to even
    return np.rint(np.arange(num_states)[None, :] * c[:, None] / (num_states - 1)).astype(np.int64)


def noise_states(tokens: np.ndarray, targets: Sequence[int], ratios: Sequence[float], key: jax.Array,
                 mask_id: int) -> np.ndarray:
    """Random re-maskings of the final answer: for each target and ratio t, mask each position with probability
    t, the target position always. tokens: [G] -> [len(targets), K, G] int32 (K = len(ratios))."""
    tokens = np.asarray(tokens)
    G = tokens.shape[0]
    T, K = len(targets), len(ratios)
    u = np.asarray(jax.random.uniform(key, (T, K, G)))
    masked = u < np.asarray(ratios, np.float32)[None, :, None]
    masked[np.arange(T), :, np.asarray(targets)] = True
    return np.where(masked, mask_id, tokens[None, None, :]).astype(np.int32)


def default_noise_ratios(k: int) -> tuple[float, ...]:
    """K ratios evenly spaced inside (0, 1): (i + 1) / (K + 1)."""
    if k < 1:
        raise ValueError(f"num_noise_samples={k} must be >= 1")
    return tuple((i + 1) / (k + 1) for i in range(k))
