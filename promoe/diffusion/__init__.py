"""Training objectives and samplers: rectified flow (logit-normal t, Euler) and DDPM (linear betas, ancestral)."""

from promoe.diffusion.ddpm import DDPM
from promoe.diffusion.guidance import guided_prediction
from promoe.diffusion.rectified_flow import RectifiedFlow

OBJECTIVES = {"rf": RectifiedFlow, "ddpm": DDPM}


def make_objective(name: str):
    """The objective (and its sampler) of a run config's `train.objective`."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}: choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]()


__all__ = ["DDPM", "OBJECTIVES", "RectifiedFlow", "guided_prediction", "make_objective"]
