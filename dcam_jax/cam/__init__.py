"""Diffusion-CAM and baselines: the method configuration and its one ``resolve`` (``config``), the method
registry (``methods``), gradient CAMs at layer L (``attribution``), which positions to explain (``targets``),
raw maps and the result objects (``explain``), the four refinement modules (``refine``), TAM's post-processing
(``baselines``).

The submodules are the API (``dcam_jax.cam.refine.refine(...)``); only classes are re-exported here, so no name
here hides a submodule.
"""

from dcam_jax.cam.config import CamConfig, reference_compat
from dcam_jax.cam.explain import Explanation
from dcam_jax.cam.refine import RefineConfig, refine_preset
