"""promoe: ProMoE (ICLR 2026) and its baselines as Mixture-of-Experts Diffusion Transformers."""

from promoe.config import ExpertSpec, ModelConfig
from promoe.convert import load_official_checkpoint
from promoe.moe.layer import dispatch_backend
from promoe.zoo import PAPER_MODELS, build_model, count_params, model_config

__all__ = ["ExpertSpec", "ModelConfig", "PAPER_MODELS", "build_model", "count_params", "dispatch_backend",
           "load_official_checkpoint", "model_config"]
