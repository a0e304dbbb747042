"""Diffusion-CAM and baselines: the method configuration and its one ``resolve`` (``config``), the method
registry (``methods``), gradient CAMs at layer L (``attribution``), which positions to explain (``targets``),
raw maps and the result objects (``explain``), the four refinement modules (``refine``), TAM's post-processing
(``baselines``).

The submodules are the API (``dcam_jax.cam.refine.refine(...)``); only classes are re-exported here, so no name
here hides a submodule. The package imports ``methods`` so that the built-in methods are registered whichever
``dcam_jax.cam`` module is imported first.
"""

from dcam_jax.cam.config import CamConfig, reference_compat
from dcam_jax.cam.explain import Explanation
from dcam_jax.cam.refine import RefineConfig, refine_preset

# Registers the built-in methods in config.REGISTRY, so any import of a dcam_jax.cam module finds them.
from dcam_jax.cam import methods  # noqa: E402,F401  (after config and explain, which it imports)
