"""DDPM: linear betas over 1000 steps, epsilon prediction, ancestral sampling over respaced steps."""

from dataclasses import dataclass, field

import torch

from promoe.diffusion.guidance import guided_prediction


@dataclass
class DDPM:
    num_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    alphas_cumprod: torch.Tensor = field(init=False)

    def __post_init__(self):
        betas = torch.linspace(self.beta_start, self.beta_end, self.num_steps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)

    def draw(self, shape: torch.Size, generator: torch.Generator | None = None):
        """(step indices t [B], noise [B, ...]) on the CPU, for a batch of the given shape."""
        steps = torch.randint(0, self.num_steps, (shape[0],), generator=generator)
        return steps, torch.randn(shape, generator=generator)

    def loss(self, model, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
             draws=None, **model_kwargs):
        """(total, {"mse": ..., aux ...}): MSE of the predicted noise on the first C channels plus the aux losses."""
        t, eps = draws if draws is not None else self.draw(x0.shape, generator)
        t, eps = t.to(x0.device), eps.to(x0.device, x0.dtype)
        x_t = self.noise(x0, t, eps)
        prediction, aux = model(x_t, t, y, return_aux=True, **model_kwargs)
        mse = (prediction[:, : x0.shape[1]].float() - eps.float()).square().mean()
        return mse + sum(aux.values(), torch.zeros((), device=x0.device)), {"mse": mse, **aux}

    def noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        abar = self.alphas_cumprod.to(x0.device)[t].view(-1, *[1] * (x0.dim() - 1)).to(x0.dtype)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps

    @torch.no_grad()
    def sample(self, model, noise: torch.Tensor, y: torch.Tensor, steps: int = 250, cfg_scale: float = 1.0,
               batched_guidance: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral sampling over `steps` evenly respaced timesteps, with the posterior variance beta-tilde."""
        timesteps = torch.linspace(0, self.num_steps - 1, steps).round().long().flip(0)
        abar = self.alphas_cumprod
        x = noise
        for i, t in enumerate(timesteps):
            abar_t = abar[t]
            abar_prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0, dtype=abar.dtype)
            beta = 1 - abar_t / abar_prev  # the respaced step's beta
            t_batch = torch.full((x.shape[0],), int(t), device=x.device)
            eps = guided_prediction(model, x, t_batch, y, cfg_scale, noise.shape[1], batched_guidance)
            eps = eps[:, : noise.shape[1]]
            x0 = ((x - (1 - abar_t).sqrt().float() * eps) / abar_t.sqrt().float()).clamp(-20, 20)
            mean = (abar_prev.sqrt() * beta / (1 - abar_t)).float() * x0 \
                + ((1 - beta).sqrt() * (1 - abar_prev) / (1 - abar_t)).float() * x
            if i + 1 < len(timesteps):
                variance = (beta * (1 - abar_prev) / (1 - abar_t)).float()
                x = mean + variance.sqrt() * torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
            else:
                x = mean
        return x
