"""Pure-functional ports of the dMLLM backbones (LLaDA LM, SigLIP tower, projector, multimodal assembly)."""

from dcam_jax.models.config import (ConfigError, LMConfig, MLLMConfig, VisionConfig, get_preset, lavida,
                                    llada_8b, llada_v)
from dcam_jax.models.llada import (PrefixCache, answer_logits_cached, build_prefix_cache, lm_hidden, lm_logits,
                                   run_blocks)
from dcam_jax.models.siglip import vision_features
