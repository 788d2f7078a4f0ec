"""Training objectives and samplers: rectified flow (logit-normal t, Euler) and DDPM (linear betas, ancestral)."""

from promoe.diffusion.ddpm import DDPM
from promoe.diffusion.guidance import guided_prediction
from promoe.diffusion.rectified_flow import RectifiedFlow

__all__ = ["DDPM", "RectifiedFlow", "guided_prediction"]
