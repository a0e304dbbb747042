"""Diffusion-CAM and baselines: gradient CAMs at layer L (attribution), probe states and targets (explain),
the four refinement modules (refine), TAM's post-processing (baselines)."""

from dcam_jax.cam.explain import METHODS, CamConfig, Explanation, reference_compat, resolve
from dcam_jax.cam.refine import (RefineConfig, akd, cba, dacg, eci, refine, refine_arrays, refine_preset, sicd)
