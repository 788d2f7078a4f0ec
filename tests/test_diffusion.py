"""Objectives and samplers against hand-written references."""

import pytest
import torch

import promoe
from promoe.diffusion import DDPM, RectifiedFlow, guided_prediction
from tests.helpers import tiny_model


class Recorder(torch.nn.Module):
    """Records what the objective feeds the model; predicts a fixed tensor."""

    num_classes = 10

    def __init__(self, prediction):
        super().__init__()
        self.prediction = prediction

    def forward(self, x, t, y, return_aux=False):
        self.seen = (x, t, y)
        return (self.prediction, {"rcl": torch.tensor(0.25)}) if return_aux else self.prediction


class PointMassOracle(torch.nn.Module):
    """The exact prediction for data that is always x0 (velocity for RF, noise for DDPM)."""

    num_classes = 10

    def __init__(self, x0, kind, ddpm=None):
        super().__init__()
        self.x0, self.kind, self.ddpm = x0, kind, ddpm

    def forward(self, x, t, y):
        if self.kind == "rf":
            s = (t / 1000).view(-1, 1, 1, 1)
            return (x - self.x0) / s  # eps - x0, with eps = (x - (1 - s) x0) / s
        abar = self.ddpm.alphas_cumprod[t.long()].view(-1, 1, 1, 1).float()
        return (x - abar.sqrt() * self.x0) / (1 - abar).sqrt()


def test_rectified_flow_noising_target_and_loss(rng):
    flow = RectifiedFlow()
    x0 = torch.randn(5, 4, 8, 8, generator=rng)
    prediction = torch.randn(5, 8, 8, 8, generator=rng)
    model = Recorder(prediction)
    total, terms = flow.loss(model, x0, torch.arange(5), torch.Generator().manual_seed(7))
    replay = torch.Generator().manual_seed(7)
    s = flow.sample_timesteps(5, replay)
    eps = torch.randn(x0.shape, generator=replay)
    x_s, t, _ = model.seen
    torch.testing.assert_close(t, s * 1000)
    torch.testing.assert_close(x_s, (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps)
    expected_mse = (prediction[:, :4] - (eps - x0)).square().mean()  # only the first C channels are trained
    torch.testing.assert_close(terms["mse"], expected_mse)
    torch.testing.assert_close(total, expected_mse + 0.25)


def test_logit_normal_timesteps_have_the_configured_mean_and_spread():
    s = RectifiedFlow(mean=0.0, std=1.0).sample_timesteps(200_000, torch.Generator().manual_seed(0))
    logits = torch.log(s / (1 - s))
    assert abs(logits.mean().item()) < 0.01 and abs(logits.std().item() - 1) < 0.01  # 200k draws: std err 0.002
    shifted = RectifiedFlow(shift=3.0).sample_timesteps(200_000, torch.Generator().manual_seed(0))
    assert shifted.mean() > s.mean() + 0.1 and 0 < shifted.min() and shifted.max() < 1


@pytest.mark.parametrize("sample_shift", [1.0, 3.0])
def test_euler_sampler_with_the_exact_velocity_lands_on_the_data(sample_shift, rng):
    x0 = torch.randn(1, 4, 8, 8, generator=rng)
    noise = torch.randn(3, 4, 8, 8, generator=rng)
    out = RectifiedFlow().sample(PointMassOracle(x0, "rf"), noise, torch.arange(3), steps=7, sample_shift=sample_shift)
    torch.testing.assert_close(out, x0.expand(3, -1, -1, -1), rtol=1e-4, atol=1e-4)


def test_ddpm_noising_target_and_loss(rng):
    ddpm = DDPM()
    x0 = torch.randn(4, 4, 8, 8, generator=rng)
    prediction = torch.randn(4, 8, 8, 8, generator=rng)
    model = Recorder(prediction)
    _, terms = ddpm.loss(model, x0, torch.arange(4), torch.Generator().manual_seed(3))
    replay = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (4,), generator=replay)
    eps = torch.randn(x0.shape, generator=replay)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1).float()
    torch.testing.assert_close(model.seen[0], abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    assert torch.equal(model.seen[1], t)
    torch.testing.assert_close(terms["mse"], (prediction[:, :4] - eps).square().mean())


def test_ddpm_ancestral_sampler_with_the_exact_noise_lands_on_the_data(rng):
    ddpm = DDPM()
    x0 = torch.randn(1, 4, 8, 8, generator=rng)
    noise = torch.randn(2, 4, 8, 8, generator=rng)
    out = ddpm.sample(
        PointMassOracle(x0, "ddpm", ddpm), noise, torch.arange(2), steps=25, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(out, x0.expand(2, -1, -1, -1), rtol=1e-4, atol=1e-4)


def test_guidance_in_one_batch_equals_two_passes_and_the_formula(rng):
    # float64 (with the loop backend: grouped_mm has no float64), where the two forms agree to rounding.
    model = tiny_model("ProMoE-S", experts="E6A2S1U1").eval().double()
    x, t, y = (
        torch.randn(3, 4, 8, 8, generator=rng).double(),
        torch.rand(3, generator=rng) * 1000,
        torch.tensor([1, 2, 3]),
    )
    with promoe.dispatch_backend("loop"):
        batched = guided_prediction(model, x, t, y, 1.5, channels=4, batched=True)
        two_passes = guided_prediction(model, x, t, y, 1.5, channels=4, batched=False)
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
    tolerance = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(batched, two_passes, **tolerance)
    torch.testing.assert_close(batched[:, :4], uncond[:, :4] + 1.5 * (cond[:, :4] - uncond[:, :4]), **tolerance)
    torch.testing.assert_close(batched[:, 4:], cond[:, 4:], **tolerance)
    with promoe.dispatch_backend("loop"):  # no guidance at scale 1
        assert torch.equal(guided_prediction(model, x, t, y, 1.0, channels=4), model(x, t, y))


def test_guidance_scale_one_runs_one_pass_and_batched_guidance_one_double_batch(rng):
    model = tiny_model("ProMoE-S").eval()
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    x, t, y = torch.randn(3, 4, 8, 8, generator=rng), torch.rand(3, generator=rng) * 1000, torch.tensor([1, 2, 3])
    guided_prediction(model, x, t, y, 1.0, channels=4)
    assert calls == [3]
    calls.clear()
    guided_prediction(model, x, t, y, 1.5, channels=4, batched=True)
    assert calls == [6]
    calls.clear()
    guided_prediction(model, x, t, y, 1.5, channels=4, batched=False)
    assert calls == [3, 3]
