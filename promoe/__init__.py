"""promoe: ProMoE (ICLR 2026) and its baselines as Mixture-of-Experts Diffusion Transformers."""

from promoe.config import ExpertSpec, ModelConfig
from promoe.moe.layer import dispatch_backend
from promoe.zoo import PAPER_MODELS, build_model, count_params, model_config


def __getattr__(name: str):
    """`load_official_checkpoint`, imported from promoe.convert on first use: importing it here would make
    `python -m promoe.convert` find its own module already loaded (runpy's RuntimeWarning)."""
    if name == "load_official_checkpoint":
        from promoe.convert import load_official_checkpoint

        return load_official_checkpoint
    raise AttributeError(f"module 'promoe' has no attribute {name!r}")


__all__ = ["ExpertSpec", "ModelConfig", "PAPER_MODELS", "build_model", "count_params", "dispatch_backend",
           "load_official_checkpoint", "model_config"]
