"""Baselines that need more than a gradient CAM preset (the presets themselves live in cam.methods).

- TAM (Li et al., ICCV 2025): gradient-free class-logit maps (:func:`dcam_jax.cam.explain.tam_raw_maps`), then
  estimated causal inference over the answer's earlier tokens and the rank Gaussian filter with k = 3.
- Grad-CAM (the authors' baseline), LLaVA-CAM, LayerCAM, Grad-CAM++ and HiResCAM are gradient CAMs: see
  ``cam.methods`` (the registry) and ``cam.attribution.aggregate``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dcam_jax.cam import refine as rf
from dcam_jax.cam.attribution import normalize_maps


@jax.jit
def tam_postprocess(raw_maps: jax.Array, token_ids: jax.Array, weights: jax.Array) -> jax.Array:
    """TAM's post-processing of its raw maps, for all explained tokens of one answer at once.

    raw_maps: [T, H, W] raw class-logit maps (ReLU'd, not normalised), in answer order;
    token_ids: [T] their token ids (earlier copies of the same token are excluded from the context);
    weights: [T, T] context scores, ``weights[j, i]`` = activation of token j's class at token i's position.
    Returns [T, H, W] in [0, 1]: ECI (least-squares removal of the score-weighted earlier maps), min-max
    normalisation, rank Gaussian filter (k = 3).
    """
    x = rf.eci(raw_maps, token_ids, weights)
    return jnp.clip(rf.akd(normalize_maps(x), 3), 0.0, 1.0)
