"""Samplers from diffusers for our objectives; the paper's own (Euler for rectified flow, ancestral DDPM) stay the
default.

- DDPM: `dpm-solver++` (DPMSolverMultistepScheduler, 2nd order) and `ddim` (DDIMScheduler, eta 0), on our linear
  betas with epsilon prediction; their timesteps are training step indices 0..T-1, as our model is told. A
  learned variance is not used by them: they read the first C channels.
- Rectified flow: `flow-euler` (FlowMatchEulerDiscreteScheduler) and `flow-heun` (FlowMatchHeunDiscreteScheduler,
  2 model calls per step but the last). Their conventions are ours: x_sigma = (1 - sigma) x0 + sigma eps, the
  model predicts eps - x0 and is told sigma * 1000. Their default sigmas run from 1 to 1/1000 (then 0), ours from
  1 to 0: with the same sigmas flow-euler is our Euler.
Every scheduler here is deterministic, and guidance is the one of our samplers.
"""

import torch

from promoe.diffusion.ddpm import DDPM
from promoe.diffusion.guidance import guided_prediction
from promoe.diffusion.rectified_flow import RectifiedFlow
from promoe.errors import Refusal
from promoe.limits import check_sampling_steps


def ddpm_betas(ddpm: DDPM) -> dict:
    return dict(num_train_timesteps=ddpm.num_steps, beta_start=ddpm.beta_start, beta_end=ddpm.beta_end,
                beta_schedule="linear", prediction_type="epsilon")


def _dpm_solver(ddpm: DDPM):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**ddpm_betas(ddpm), algorithm_type="dpmsolver++", solver_order=2)


def _ddim(ddpm: DDPM):
    from diffusers import DDIMScheduler

    # trailing: the first step starts at the last training step (pure noise); no clipping of x0 (latents are not
    # in [-1, 1]), as our samplers.
    return DDIMScheduler(**ddpm_betas(ddpm), timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)


def _flow_euler(flow: RectifiedFlow):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)


def _flow_heun(flow: RectifiedFlow):
    from diffusers import FlowMatchHeunDiscreteScheduler

    return FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000)


# name -> (the objective it fits, its factory)
SCHEDULERS = {
    "dpm-solver++": (DDPM, _dpm_solver),
    "ddim": (DDPM, _ddim),
    "flow-euler": (RectifiedFlow, _flow_euler),
    "flow-heun": (RectifiedFlow, _flow_heun),
}


def schedulers_for(objective) -> list[str]:
    """The names of the schedulers that fit an objective."""
    return [name for name, (kind, _) in SCHEDULERS.items() if isinstance(objective, kind)]


def make_scheduler(name: str, objective, steps: int):
    """A diffusers scheduler for `objective`, set to `steps` steps; a clear error when it does not fit."""
    check_sampling_steps(steps)
    if name not in SCHEDULERS:
        raise Refusal(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    kind, build = SCHEDULERS[name]
    if not isinstance(objective, kind):
        raise Refusal(f"scheduler {name!r} is for {kind.__name__} models, not {type(objective).__name__}: choose "
                      f"one of {', '.join(schedulers_for(objective))}")
    scheduler = build(objective)
    scheduler.set_timesteps(steps)
    return scheduler


def ddpm_scheduler(ddpm: DDPM, learned_variance: bool):
    """DDPMScheduler as our ancestral sampler: our betas, x0 clamped to [-20, 20], improved DDPM's learned range
    (the model's second C channels) or the fixed posterior variance; the sampler of ProMoEPipeline's DDPM models."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**ddpm_betas(ddpm), variance_type="learned_range" if learned_variance else "fixed_small",
                         clip_sample=True, clip_sample_range=20.0)


def reads_variance(scheduler) -> bool:
    """Whether the scheduler takes the model's variance channels too. DDPMScheduler splits them off itself;
    DPMSolverMultistepScheduler's learned variance keeps the first 3 channels whatever C is, so it gets the C
    channels of the mean alone, as every other scheduler here."""
    return type(scheduler).__name__ == "DDPMScheduler" and scheduler.config.variance_type in ("learned",
                                                                                            "learned_range")


@torch.no_grad()
def sample_with_scheduler(scheduler, model, noise: torch.Tensor, y: torch.Tensor, cfg_scale: float = 1.0,
                          batched_guidance: bool = True, generator: torch.Generator | None = None,
                          progress=iter) -> torch.Tensor:
    """Runs a diffusers scheduler (its timesteps already set) from `noise`, with our guidance on the first C
    channels; one model call (two with two-pass guidance) per entry of `scheduler.timesteps`. `progress` wraps the
    timesteps (ProMoEPipeline passes its progress bar). The sampling CLI's --scheduler and ProMoEPipeline run this."""
    # ProMoEPipeline sets the timesteps itself, from any number (Heun's hold about 2 per step); timesteps or sigmas
    # given as a list leave num_inference_steps unset on some schedulers: their count is the list's.
    steps = scheduler.num_inference_steps
    check_sampling_steps(len(scheduler.timesteps) if steps is None else steps)
    channels = noise.shape[1]
    variance = reads_variance(scheduler)
    x = noise  # these schedulers start from unit noise and feed the model x unscaled
    for t in progress(scheduler.timesteps):
        prediction = guided_prediction(model, x, t.expand(x.shape[0]).to(x.device), y, cfg_scale, channels,
                                       batched_guidance)
        x = scheduler.step(prediction if variance else prediction[:, :channels], t, x, generator=generator).prev_sample
    return x
