"""Training objectives and samplers: rectified flow (logit-normal t, Euler) and DDPM (linear betas, fixed or learned
variance, ancestral); diffusers' schedulers for either (`schedulers`)."""

from functools import partial

from promoe.diffusion.ddpm import DDPM
from promoe.diffusion.guidance import GUIDANCE_MODES, batches_guidance, guided_prediction
from promoe.diffusion.rectified_flow import RectifiedFlow, euler_sigmas
from promoe.diffusion.schedulers import SCHEDULERS, make_scheduler, sample_with_scheduler, schedulers_for
from promoe.errors import Refusal

# ddpm: the variance learned when the model has learn_sigma=True (as the paper's DDPM runs), fixed otherwise;
# ddpm-fixed: the fixed variance beta-tilde and the plain MSE whatever the model.
OBJECTIVES = {"rf": RectifiedFlow, "ddpm": DDPM, "ddpm-fixed": partial(DDPM, variance="fixed")}


def make_objective(name: str):
    """The objective (and its sampler) of a run config's `train.objective`."""
    if name not in OBJECTIVES:
        raise Refusal(f"unknown objective {name!r}: choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]()


__all__ = ["DDPM", "GUIDANCE_MODES", "OBJECTIVES", "SCHEDULERS", "RectifiedFlow", "batches_guidance",
           "euler_sigmas", "guided_prediction", "make_objective", "make_scheduler", "sample_with_scheduler",
           "schedulers_for"]
