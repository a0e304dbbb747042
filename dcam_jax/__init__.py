"""dcam_jax: Diffusion-CAM in JAX/Flax, faithful visual explanations for diffusion multimodal LLMs.

The small public API::

    import dcam_jax as dj
    m = dj.load_pretrained("toy")                    # or a converted checkpoint directory
    g = dj.generate(m, image, prompt, key=jax.random.key(0))   # .text .tokens .commit_step
    e = dj.explain(m, image, prompt, targets="content", config=dj.CamConfig())
    e.maps            # [T, H, W] in [0, 1], one map per explained token / word
    e.image_maps()    # [T, image height, image width]

Lower level: ``dj.models`` (pure forward functions), ``dj.cam`` (attribution, refinement, baselines),
``dj.metrics``, ``dj.data.shapes`` (ShapesWorld), ``dj.checkpoint``.
"""

from dcam_jax import models
from dcam_jax.api import (Generation, Model, SamplingConfig, explain, explain_trajectory, generate, load_pretrained,
                          prepare)
from dcam_jax.cam.config import CamConfig, paper, reference_compat
from dcam_jax.cam.explain import Explanation, TrajectoryExplanation
from dcam_jax.checkpoint import load_checkpoint, save_checkpoint
from dcam_jax.models.config import LMConfig, MLLMConfig, VisionConfig

__version__ = "0.1.0"

__all__ = ["CamConfig", "Explanation", "Generation", "LMConfig", "MLLMConfig", "Model", "SamplingConfig",
           "TrajectoryExplanation", "VisionConfig", "explain", "explain_trajectory", "generate", "load_checkpoint", "load_pretrained", "models", "paper", "prepare",
           "reference_compat", "save_checkpoint"]
