"""diffusers schedulers on our objectives: conventions checked with exact predictions, equality with our Euler,
and every scheduler on a tiny model."""

import pytest
import torch

from promoe.diffusion import DDPM, SCHEDULERS, RectifiedFlow, make_scheduler, sample_with_scheduler
from promoe.sampling import generate
from tests.helpers import tiny_model
from tests.test_diffusion import PointMassOracle

OBJECTIVE_OF = {"dpm-solver++": DDPM, "ddim": DDPM, "flow-euler": RectifiedFlow, "flow-heun": RectifiedFlow}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_with_the_exact_prediction_lands_on_the_data(name, rng):
    # The exact noise (DDPM) or velocity (rectified flow) for data that is always x0: a scheduler that tells the
    # model another timestep or reads its output in another convention misses x0.
    objective = OBJECTIVE_OF[name]()
    x0 = torch.randn(1, 4, 8, 8, generator=rng)
    noise = torch.randn(2, 4, 8, 8, generator=rng)
    oracle = PointMassOracle(x0, "ddpm" if isinstance(objective, DDPM) else "rf", objective)
    out = sample_with_scheduler(make_scheduler(name, objective, 10), oracle, noise, torch.arange(2))
    torch.testing.assert_close(out, x0.expand(2, -1, -1, -1), rtol=1e-3, atol=1e-3)


def test_flow_euler_with_our_sigmas_is_our_euler_sampler(rng):
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = tiny_model("ProMoE-S", learn_sigma=False).eval()
    noise, y = torch.randn(3, 4, 8, 8, generator=rng), torch.tensor([1, 2, 3])
    for shift in (1.0, 3.0):
        ours = RectifiedFlow().sample(model, noise, y, steps=6, cfg_scale=1.5, sample_shift=shift)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        scheduler.set_timesteps(sigmas=torch.linspace(1, 0, 7)[:-1].tolist())  # it shifts them and appends 0
        theirs = sample_with_scheduler(scheduler, model, noise, y, cfg_scale=1.5)
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_samples_finite_images_from_a_tiny_model(name):
    objective = OBJECTIVE_OF[name]()
    model = tiny_model("ProMoE-S", learn_sigma=isinstance(objective, DDPM)).eval()  # DDPM: with variance channels
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    out = generate(model, objective, torch.tensor([0, 5, 9]), torch.Generator().manual_seed(0), 4, 1.5,
                   scheduler=name)
    assert out.shape == (3, 4, 8, 8) and torch.isfinite(out).all()
    assert calls == [6] * (7 if name == "flow-heun" else 4)  # Heun: 2 calls a step but the last; guidance batched


def test_a_scheduler_for_another_objective_is_refused_naming_those_that_fit():
    with pytest.raises(ValueError, match="for DDPM models, not RectifiedFlow: choose one of flow-euler, flow-heun"):
        make_scheduler("dpm-solver++", RectifiedFlow(), 10)
    with pytest.raises(ValueError, match="choose one of dpm-solver\\+\\+, ddim"):
        make_scheduler("flow-heun", DDPM(), 10)
    with pytest.raises(ValueError, match="unknown scheduler 'euler'"):
        make_scheduler("euler", DDPM(), 10)
