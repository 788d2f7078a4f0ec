"""Rectified flow: x_s = (1 - s) x0 + s eps, the model predicts the velocity eps - x0 at timestep s * 1000."""

from dataclasses import dataclass

import torch

from promoe.diffusion.guidance import guided_prediction
from promoe.limits import check_sampling_steps


def shift_sigmas(s: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift: s' = shift * s / (1 + (shift - 1) * s); shift 1 is the identity."""
    return shift * s / (1 + (shift - 1) * s)


def euler_sigmas(steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
    """The steps + 1 sigmas of our Euler sampler, 1 (noise) to 0 (data) in equal steps, then shifted.
    FlowMatchEulerDiscreteScheduler given `euler_sigmas(n)[:-1]` runs the same steps to the last bit (tested)."""
    return shift_sigmas(torch.linspace(1, 0, steps + 1, device=device), shift)


@dataclass
class RectifiedFlow:
    mean: float = 0.0  # logit-normal training timesteps: s = sigmoid(N(mean, std)), then shifted
    std: float = 1.0
    shift: float = 1.0

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        logits = torch.randn(batch, generator=generator) * self.std + self.mean
        return shift_sigmas(torch.sigmoid(logits), self.shift)

    def draw(self, shape: torch.Size, generator: torch.Generator | None = None):
        """(timesteps s [B], noise [B, ...]) on the CPU, for a batch of the given shape."""
        return self.sample_timesteps(shape[0], generator), torch.randn(shape, generator=generator)

    def loss(self, model, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
             draws=None, **model_kwargs):
        """(total, {"mse": ..., aux losses ...}): the MSE on the first C channels plus every aux loss.

        draws: (s, noise) from `draw`, to give each sample the same draw however the batch is split over ranks.
        """
        s, eps = draws if draws is not None else self.draw(x0.shape, generator)
        s, eps = s.to(x0.device), eps.to(x0.device, x0.dtype)
        s_ = s.view(-1, *[1] * (x0.dim() - 1)).to(x0.dtype)
        x_s = (1 - s_) * x0 + s_ * eps
        prediction, aux = model(x_s, s * 1000, y, return_aux=True, **model_kwargs)
        mse = (prediction[:, : x0.shape[1]].float() - (eps - x0).float()).square().mean()
        return mse + sum(aux.values(), torch.zeros((), device=x0.device)), {"mse": mse, **aux}

    @torch.no_grad()
    def sample(self, model, noise: torch.Tensor, y: torch.Tensor, steps: int = 250, cfg_scale: float = 1.0,
               sample_shift: float = 1.0, batched_guidance: bool = True) -> torch.Tensor:
        """Euler from s = 1 (noise) to s = 0 (data) over `steps` equal steps of the (shifted) sigmas."""
        check_sampling_steps(steps)
        sigmas = euler_sigmas(steps, sample_shift, noise.device)
        x = noise
        for step in range(steps):  # indexed, not iterated: iterating a tensor unbinds all of it at once
            s, s_next = sigmas[step], sigmas[step + 1]
            t = torch.full((x.shape[0],), float(s) * 1000, device=x.device)
            velocity = guided_prediction(model, x, t, y, cfg_scale, noise.shape[1], batched_guidance)
            x = x + (s_next - s) * velocity[:, : noise.shape[1]]
        return x
