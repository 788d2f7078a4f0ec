"""Objectives and samplers against hand-written references."""

import math

import mpmath
import pytest
import torch

import promoe
from promoe.diffusion import DDPM, RectifiedFlow, batches_guidance, guided_prediction, make_objective
from promoe.diffusion.ddpm import discretized_gaussian_log_likelihood, normal_kl
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
    with promoe.dispatch_backend(model, "loop"):
        batched = guided_prediction(model, x, t, y, 1.5, channels=4, batched=True)
        two_passes = guided_prediction(model, x, t, y, 1.5, channels=4, batched=False)
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
    tolerance = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(batched, two_passes, **tolerance)
    torch.testing.assert_close(batched[:, :4], uncond[:, :4] + 1.5 * (cond[:, :4] - uncond[:, :4]), **tolerance)
    torch.testing.assert_close(batched[:, 4:], cond[:, 4:], **tolerance)
    with promoe.dispatch_backend(model, "loop"):  # no guidance at scale 1
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


# --- DDPM with the learned variance (improved DDPM's learned range and hybrid loss) ---

def reference_kl(m1: float, lv1: float, m2: float, lv2: float) -> float:
    """KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2 / s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2."""
    s1, s2 = math.exp(lv1 / 2), math.exp(lv2 / 2)
    return math.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5


def reference_discretized_log_likelihood(x: float, mean: float, log_std: float) -> float:
    """log of the Gaussian mass over x's bin of width 2/255 (outer bins open), at 400 digits with mpmath, floored at
    log 1e-12."""
    mpmath.mp.dps = 400
    std = mpmath.e ** mpmath.mpf(log_std)
    cdf = lambda z: mpmath.ncdf(mpmath.mpf(z), mu=mpmath.mpf(mean), sigma=std)  # noqa: E731
    upper = cdf(x + 1 / 255) if x < 0.999 else mpmath.mpf(1)
    lower = cdf(x - 1 / 255) if x > -0.999 else mpmath.mpf(0)
    return max(float(mpmath.log(upper - lower)), math.log(1e-12))


def test_normal_kl_matches_its_formula_on_hand_made_cases():
    cases = [(0.0, 0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0), (0.3, -2.0, -0.1, -1.0), (-2.0, 1.5, 0.5, -3.0),
             (0.0, -7.0, 0.0, -6.9)]
    got = normal_kl(*torch.tensor(cases, dtype=torch.float64).unbind(1))
    expected = torch.tensor([reference_kl(*case) for case in cases], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    assert got[0] == 0


def test_discretized_gaussian_log_likelihood_matches_its_formula_on_hand_made_cases():
    # (x, mean, log std): inner bins near the mean, in either tail (a mass of 1e-10) and past the floor, the two
    # outer bins, a tiny std.
    cases = [(0.0, 0.0, 0.0), (0.2, -0.1, -2.0), (1 - 2 / 255, 0.9, -3.0), (0.6, 0.286, -3.0), (-0.6, -0.286, -3.0),
             (0.5, -0.5, -3.0), (-1.0, -0.8, -1.0), (1.0, 0.2, -0.5), (0.0, 0.001, -8.0), (-1.0, 1.0, 0.5)]
    got = discretized_gaussian_log_likelihood(*torch.tensor(cases, dtype=torch.float64).unbind(1))
    expected = torch.tensor([reference_discretized_log_likelihood(*case) for case in cases], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-12)  # torch.special.ndtr: ~1e-9 in the tails


def reference_vlb_bits(x0, x_t, t: int, eps, v) -> float:
    """The bound term of one sample, element by element from the formulas, in float64 Python numbers."""
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    abar = []
    for beta in betas:
        abar.append((abar[-1] if abar else 1.0) * (1 - beta))
    abar_prev = abar[t - 1] if t > 0 else 1.0
    beta_tilde = [betas[i] * (1 - (abar[i - 1] if i else 1.0)) / (1 - abar[i]) for i in range(2)]

    def posterior_mean(start, noisy):
        return (math.sqrt(abar_prev) * betas[t] * start
                + math.sqrt(1 - betas[t]) * (1 - abar_prev) * noisy) / (1 - abar[t])

    log_beta_tilde = math.log(betas[t] * (1 - abar_prev) / (1 - abar[t])) if t > 0 else math.log(beta_tilde[1])
    total = 0.0
    for a, b, e, w in zip(x0, x_t, eps, v):
        x0_hat = (b - math.sqrt(1 - abar[t]) * e) / math.sqrt(abar[t])
        mean = posterior_mean(x0_hat, b)
        frac = (w + 1) / 2
        log_var = frac * math.log(betas[t]) + (1 - frac) * log_beta_tilde
        if t == 0:
            total -= reference_discretized_log_likelihood(a, mean, log_var / 2)
        else:
            total += reference_kl(posterior_mean(a, b), log_beta_tilde, mean, log_var)
    return total / len(x0) / math.log(2)


@pytest.mark.parametrize("t", [0, 1, 7, 500, 999])
def test_vlb_term_matches_a_float64_reference_of_its_formulas(t):
    x0 = [-1.0, -0.2, 0.6, 1.0]  # the outer bins and inner ones
    eps = [0.3, -1.1, 0.05, 2.0]
    v = [-1.0, -0.3, 0.4, 1.0]
    ddpm = DDPM()
    abar = ddpm.alphas_cumprod[t].item()
    noise = [0.5, -0.7, 1.2, -0.1]
    x_t = [math.sqrt(abar) * a + math.sqrt(1 - abar) * n for a, n in zip(x0, noise)]

    def tensor(values):
        return torch.tensor(values, dtype=torch.float64).view(1, 1, 2, 2)

    got = ddpm.vlb_bits(tensor(x0), tensor(x_t), torch.tensor([t]), tensor(eps), tensor(v))
    torch.testing.assert_close(got, torch.tensor([reference_vlb_bits(x0, x_t, t, eps, v)], dtype=torch.float64),
                               rtol=1e-9, atol=1e-12)


def test_hybrid_loss_trains_the_mean_by_mse_and_the_variance_by_the_bound_only(rng):
    ddpm = DDPM()
    x0 = torch.rand(4, 2, 4, 4, generator=rng) * 2 - 1
    prediction = torch.randn(4, 4, 4, 4, generator=rng).requires_grad_()
    model = Recorder(prediction)
    draws = (torch.tensor([0, 3, 400, 999]), torch.randn(x0.shape, generator=rng))
    total, terms = ddpm.loss(model, x0, torch.arange(4), draws=draws)
    assert set(terms) == {"mse", "vlb", "rcl"}
    torch.testing.assert_close(total, terms["mse"] + terms["vlb"] + 0.25)
    vlb_grad, = torch.autograd.grad(terms["vlb"], prediction, retain_graph=True)
    mse_grad, = torch.autograd.grad(terms["mse"], prediction)
    assert torch.equal(vlb_grad[:, :2], torch.zeros_like(vlb_grad[:, :2]))  # stop-gradient on the mean
    assert vlb_grad[:, 2:].abs().min() > 0
    assert torch.equal(mse_grad[:, 2:], torch.zeros_like(mse_grad[:, 2:]))


def test_variance_setting_follows_the_model_or_is_forced(rng):
    x0 = torch.randn(2, 2, 4, 4, generator=rng)
    with_sigma, without_sigma = Recorder(torch.randn(2, 4, 4, 4, generator=rng)), Recorder(torch.zeros(2, 2, 4, 4))
    assert "vlb" in DDPM().loss(with_sigma, x0, torch.arange(2), rng)[1]  # auto: learned with 2C channels
    assert "vlb" not in DDPM().loss(without_sigma, x0, torch.arange(2), rng)[1]  # auto: fixed with C channels
    assert "vlb" not in make_objective("ddpm-fixed").loss(with_sigma, x0, torch.arange(2), rng)[1]
    with pytest.raises(ValueError, match="learn_sigma=True"):
        DDPM(variance="learned").loss(without_sigma, x0, torch.arange(2), rng)
    with pytest.raises(ValueError, match="auto, learned, fixed"):
        DDPM(variance="small")


def test_respaced_chain_keeps_the_noise_levels_and_recomputes_the_betas():
    ddpm = DDPM()
    chain = ddpm.respaced(250)
    assert chain.timesteps[0] == 0 and chain.timesteps[-1] == 999 and len(chain) == 250
    torch.testing.assert_close(torch.cumprod(1 - chain.betas, 0), ddpm.alphas_cumprod[chain.timesteps], rtol=1e-12,
                               atol=0)
    full = ddpm.respaced(1000)
    torch.testing.assert_close(full.betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), rtol=1e-9, atol=0)
    assert ddpm.respaced(1).timesteps.tolist() == [999]
    with pytest.raises(ValueError, match="1..1000 steps"):
        ddpm.respaced(0)


class WithVariance(torch.nn.Module):
    """A model's prediction with variance channels v appended."""

    def __init__(self, model, v: float):
        super().__init__()
        self.model, self.v, self.num_classes = model, v, model.num_classes

    def forward(self, x, t, y):
        out = self.model(x, t, y)
        return torch.cat([out, torch.full_like(out, self.v)], dim=1)


def test_learned_variance_sampling_spans_beta_tilde_to_beta_and_lands_on_the_data(rng):
    ddpm = DDPM()
    x0 = torch.randn(1, 4, 8, 8, generator=rng)
    noise = torch.randn(2, 4, 8, 8, generator=rng)
    oracle = PointMassOracle(x0, "ddpm", ddpm)

    def sample(model):
        return ddpm.sample(model, noise, torch.arange(2), steps=25, generator=torch.Generator().manual_seed(0))

    # v = -1 is the fixed variance beta-tilde (the same draws, the same result); v = +1 (beta) takes another path
    torch.testing.assert_close(sample(WithVariance(oracle, -1.0)), sample(oracle))
    for v in (-1.0, 0.3, 1.0):  # the exact noise lands on the data whatever the variance
        torch.testing.assert_close(sample(WithVariance(oracle, v)), x0.expand(2, -1, -1, -1), rtol=1e-4, atol=1e-4)


def old_ddpm_sample(ddpm, model, noise, y, steps, generator):
    """The fixed-variance sampler as it was before the learned variance, kept as the reference (in the dtype of
    the noise: the old one rounded its coefficients to fp32)."""
    timesteps = torch.linspace(0, ddpm.num_steps - 1, steps).round().long().flip(0)
    abar = ddpm.alphas_cumprod
    x = noise
    for i, t in enumerate(timesteps):
        abar_t = abar[t]
        abar_prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0, dtype=abar.dtype)
        beta = 1 - abar_t / abar_prev
        eps = model(x, torch.full((x.shape[0],), int(t)), y)[:, : noise.shape[1]]
        x0 = ((x - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()).clamp(-20, 20)
        mean = (abar_prev.sqrt() * beta / (1 - abar_t)) * x0 + ((1 - beta).sqrt() * (1 - abar_prev) / (1 - abar_t)) * x
        if i + 1 < len(timesteps):
            variance = beta * (1 - abar_prev) / (1 - abar_t)
            x = mean + variance.sqrt() * torch.randn(x.shape, generator=generator).to(x.dtype)
        else:
            x = mean
    return x


@pytest.mark.parametrize("name, learn_sigma", [("ddpm", False), ("ddpm-fixed", True)])
def test_fixed_variance_sampling_is_unchanged(name, learn_sigma, rng):
    # float64 (loop backend): the random tiny model's x0 predictions hit the clamp, where rounding in another
    # order grows over the steps.
    model = tiny_model("ProMoE-S", learn_sigma=learn_sigma).eval().double()
    noise, y = torch.randn(3, 4, 8, 8, generator=rng).double(), torch.tensor([1, 2, 3])
    with promoe.dispatch_backend(model, "loop"):
        got = make_objective(name).sample(model, noise, y, steps=20, generator=torch.Generator().manual_seed(5))
        expected = old_ddpm_sample(DDPM(), model, noise, y, 20, torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_respaced_sampling_with_the_learned_variance_runs_on_a_tiny_model(rng):
    model = tiny_model("ProMoE-S", learn_sigma=True).eval()
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(int(args[1][0])))
    noise = torch.randn(2, 4, 8, 8, generator=rng)
    out = DDPM().sample(model, noise, torch.tensor([0, 1]), steps=50, cfg_scale=1.5,
                        generator=torch.Generator().manual_seed(0))
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert len(calls) == 50 and calls[0] == 999 and calls[-1] == 0  # told the original timestep index


# --- guidance in one batch or two passes ---

GUIDED_MODELS = [("DiT-S", {}), ("ProMoE-S", {}), ("TC-DiT-L-E8", {}), ("EC-DiT-L-E8", {}), ("ProMoE-EC-L", {}),
                 ("DiffMoE-B-E8", {})]


@pytest.mark.parametrize("name, overrides", GUIDED_MODELS)
def test_batched_guidance_equals_two_passes_unless_routing_couples_samples(name, overrides, rng):
    # float64 with the loop backend, where equal functions agree to rounding and coupled ones differ far above it.
    model = tiny_model(name, **overrides).eval().double()
    for module in model.modules():
        if hasattr(module, "expert_threshold_E"):  # DiffMoE: thresholds that keep some tokens, not all
            module.expert_threshold_E.fill_(0.5)
    x, t = torch.randn(3, 4, 8, 8, generator=rng).double(), torch.rand(3, generator=rng) * 1000
    y = torch.tensor([1, 2, 3])
    with promoe.dispatch_backend(model, "loop"):
        batched = guided_prediction(model, x, t, y, 2.0, channels=4, batched=True)
        two_passes = guided_prediction(model, x, t, y, 2.0, channels=4, batched=False)
    assert model.routing_couples_samples == (name == "DiffMoE-B-E8")
    assert batches_guidance(model, "auto") == (not model.routing_couples_samples)
    if model.routing_couples_samples:  # the null half takes expert capacity from the conditional half
        assert (batched - two_passes).abs().max() > 1e-5
    else:
        torch.testing.assert_close(batched, two_passes, rtol=1e-10, atol=1e-10)


def test_generate_guides_coupled_models_in_two_passes_by_default(rng):
    from promoe.sampling import generate

    model = tiny_model("DiffMoE-B-E8", learn_sigma=False).eval()
    sizes = []
    model.register_forward_hook(lambda module, args, output: sizes.append(args[0].shape[0]))
    generate(model, RectifiedFlow(), torch.tensor([1, 2]), torch.Generator().manual_seed(0), 2, 1.5)
    assert sizes == [2, 2, 2, 2]
    sizes.clear()
    generate(model, RectifiedFlow(), torch.tensor([1, 2]), torch.Generator().manual_seed(0), 2, 1.5, "batched")
    assert sizes == [4, 4]
    with pytest.raises(ValueError, match="auto, batched, two-pass"):
        batches_guidance(model, "twice")
