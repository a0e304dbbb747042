"""Diffusion-CAM and baselines: gradient CAMs at layer L (``attribution``), probe states, targets and the result
object (``explain``), the four refinement modules (``refine``), TAM's post-processing (``baselines``).

The submodules are the API (``dcam_jax.cam.refine.refine(...)``); only classes are re-exported here, so no name
here hides a submodule.
"""

from dcam_jax.cam.explain import CamConfig, Explanation, reference_compat
from dcam_jax.cam.refine import RefineConfig, refine_preset
