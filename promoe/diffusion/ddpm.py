"""DDPM: linear betas over 1000 steps, epsilon prediction, ancestral sampling over respaced steps, with a fixed
or a learned variance.

The variance of p(x_{t-1} | x_t) is
- "fixed": the posterior variance beta-tilde_t; the model is trained by the MSE of its noise prediction only;
- "learned": improved DDPM's learned range (Nichol & Dhariwal, 2021), as DiT and the paper's DDPM runs: the
  model's second C channels v in [-1, 1] give log var = frac * log beta_t + (1 - frac) * log beta-tilde_t with
  frac = (v + 1) / 2, trained by the hybrid loss MSE(eps) + L_vlb, where L_vlb sees the predicted mean through
  a stop-gradient, so it trains the variance only;
- "auto" (the default): learned when the model outputs 2C channels (learn_sigma=True), fixed otherwise.
"""

import math
from dataclasses import dataclass, field

import torch

from promoe.diffusion.guidance import guided_prediction
from promoe.errors import Refusal

VARIANCES = ("auto", "learned", "fixed")


def normal_kl(mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor
              ) -> torch.Tensor:
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) elementwise, in nats."""
    return 0.5 * (log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2).square() * torch.exp(-log_var2) - 1)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log P(x) elementwise, for data in [-1, 1] quantised to 256 levels: the mass N(mean, e^(2 log_std)) puts on
    the bin [x - 1/255, x + 1/255] of x, the two outer bins reaching to -inf and +inf; a mass below 1e-12 counts as
    1e-12, as improved DDPM, so that one far-off value does not dominate the loss."""
    upper = (x - mean + 1 / 255) * torch.exp(-log_std)
    lower = (x - mean - 1 / 255) * torch.exp(-log_std)
    # The mass of an inner bin from the tail it lies in, so that it does not cancel to 0 far from the mean.
    mass = torch.where(lower > 0, torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
                       torch.special.ndtr(upper) - torch.special.ndtr(lower))
    log_p = torch.where(x < -0.999, torch.special.log_ndtr(upper),
                        torch.where(x > 0.999, torch.special.log_ndtr(-lower), mass.clamp(min=1e-12).log()))
    return log_p.clamp(min=math.log(1e-12))


class Chain:
    """A Markov chain of noise levels in float64: the training chain, or a respaced one over some of its steps.

    Index i is the position in this chain and timesteps[i] the training step the model is told. A respaced chain
    keeps alphas_cumprod of its steps, so q(x_t | x0) is unchanged, and recomputes its betas from them.
    """

    def __init__(self, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor):
        self.timesteps = timesteps
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        self.betas = 1 - alphas_cumprod / self.alphas_cumprod_prev
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - alphas_cumprod)  # beta-tilde
        # beta-tilde_0 = 0: its log is clipped to log beta-tilde_1, as improved DDPM (the first step of a one-step
        # chain takes beta_0).
        floor = self.posterior_variance[1:2] if len(timesteps) > 1 else self.betas[:1]
        self.posterior_log_variance = torch.cat([floor, self.posterior_variance[1:]]).log()

    def __len__(self) -> int:
        return len(self.timesteps)

    @staticmethod
    def at(values: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[index] [B] as [B, 1, ...] in the dtype and on the device of `like`."""
        return values.to(index.device)[index].view(-1, *[1] * (like.dim() - 1)).to(like.device, like.dtype)

    def predict_x0(self, x_t: torch.Tensor, index: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
        abar = self.at(self.alphas_cumprod, index, x_t)
        return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, index: torch.Tensor):
        """(mean, log variance) of q(x_{i-1} | x_i, x0), the log variance clipped at i = 0."""
        coef_x0 = self.alphas_cumprod_prev.sqrt() * self.betas / (1 - self.alphas_cumprod)
        coef_xt = (1 - self.betas).sqrt() * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        mean = self.at(coef_x0, index, x_t) * x0 + self.at(coef_xt, index, x_t) * x_t
        return mean, self.at(self.posterior_log_variance, index, x_t)

    def learned_log_variance(self, v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Improved DDPM's learned range: frac log beta + (1 - frac) log beta-tilde (clipped), frac = (v + 1) / 2."""
        frac = (v + 1) / 2
        return frac * self.at(self.betas.log(), index, v) + (1 - frac) * self.at(self.posterior_log_variance, index, v)


@dataclass
class DDPM:
    num_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    variance: str = "auto"  # auto | learned | fixed, see the module docstring
    chain: Chain = field(init=False, repr=False)

    def __post_init__(self):
        if self.variance not in VARIANCES:
            raise Refusal(f"unknown DDPM variance {self.variance!r}: choose one of {', '.join(VARIANCES)}")
        betas = torch.linspace(self.beta_start, self.beta_end, self.num_steps, dtype=torch.float64)
        self.chain = Chain(torch.arange(self.num_steps), torch.cumprod(1 - betas, dim=0))

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.chain.alphas_cumprod

    def learns_variance(self, prediction_channels: int, data_channels: int) -> bool:
        """Whether the variance comes from the model's second C channels (see `variance`)."""
        has_variance_channels = prediction_channels == 2 * data_channels
        if self.variance == "learned" and not has_variance_channels:
            raise Refusal(f"DDPM variance 'learned' needs a model with learn_sigma=True ({2 * data_channels} output "
                          f"channels); this one has {prediction_channels}")
        return self.variance == "learned" or (self.variance == "auto" and has_variance_channels)

    def respaced(self, steps: int) -> Chain:
        """The chain over `steps` evenly spaced training steps (the first and the last among them)."""
        if not 1 <= steps <= self.num_steps:
            raise Refusal(f"DDPM sampling takes 1..{self.num_steps} steps, got {steps}")
        timesteps = torch.linspace(0, self.num_steps - 1, steps, dtype=torch.float64).round().long()
        if steps == 1:
            timesteps = timesteps.new_full((1,), self.num_steps - 1)  # one step goes from pure noise to data
        return Chain(timesteps, self.alphas_cumprod[timesteps])

    def draw(self, shape: torch.Size, generator: torch.Generator | None = None):
        """(step indices t [B], noise [B, ...]) on the CPU, for a batch of the given shape."""
        steps = torch.randint(0, self.num_steps, (shape[0],), generator=generator)
        return steps, torch.randn(shape, generator=generator)

    def loss(self, model, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
             draws=None, **model_kwargs):
        """(total, {"mse": ..., ["vlb": ...,] aux ...}): the MSE of the predicted noise on the first C channels,
        the bound term when the variance is learned, and the aux losses."""
        t, eps = draws if draws is not None else self.draw(x0.shape, generator)
        t, eps = t.to(x0.device), eps.to(x0.device, x0.dtype)
        x_t = self.noise(x0, t, eps)
        prediction, aux = model(x_t, t, y, return_aux=True, **model_kwargs)
        channels = x0.shape[1]
        terms = {"mse": (prediction[:, :channels].float() - eps.float()).square().mean()}
        if self.learns_variance(prediction.shape[1], channels):
            # Scaled by T / 1000 as DiT's hybrid loss (1 for the paper's 1000 steps).
            vlb = self.vlb_bits(x0.float(), x_t.float(), t, prediction[:, :channels].float(),
                                prediction[:, channels:].float())
            terms["vlb"] = vlb.mean() * (self.num_steps / 1000)
        total = sum(terms.values()) + sum(aux.values(), torch.zeros((), device=x0.device))
        return total, {**terms, **aux}

    def vlb_bits(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, v: torch.Tensor
                 ) -> torch.Tensor:
        """[B] the bound term in bits per dimension: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, the
        decoder's negative log-likelihood of x0 for t = 0. The mean of p sees eps through a stop-gradient: this
        term trains the variance v only, the MSE trains the mean."""
        true_mean, true_log_var = self.chain.posterior(x0, x_t, t)
        mean, _ = self.chain.posterior(self.chain.predict_x0(x_t, t, eps.detach()), x_t, t)
        log_var = self.chain.learned_log_variance(v, t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var)
        decoder_nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
        first_step = (t == 0).view(-1, *[1] * (x0.dim() - 1))
        return torch.where(first_step, decoder_nll, kl).flatten(1).mean(1) / math.log(2)

    def noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        abar = self.chain.at(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps

    @torch.no_grad()
    def sample(self, model, noise: torch.Tensor, y: torch.Tensor, steps: int = 250, cfg_scale: float = 1.0,
               batched_guidance: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral sampling over `steps` respaced steps with the fixed or the learned variance; the model is told
        the training step of each."""
        chain = self.respaced(steps)
        channels = noise.shape[1]
        x = noise
        for i in reversed(range(len(chain))):
            index = torch.full((x.shape[0],), i)
            prediction = guided_prediction(model, x, chain.timesteps[index].to(x.device), y, cfg_scale, channels,
                                           batched_guidance)
            x0 = chain.predict_x0(x, index, prediction[:, :channels]).clamp(-20, 20)
            mean, log_var = chain.posterior(x0, x, index)
            if i == 0:  # the last step returns the mean
                return mean
            if self.learns_variance(prediction.shape[1], channels):
                log_var = chain.learned_log_variance(prediction[:, channels:], index)
            x = mean + (0.5 * log_var).exp() * torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
