"""The VAE: a local diffusers `AutoencoderKL` loaded for encoding and decoding, how many pixels one of its latents
covers, and a draw from the posterior it encodes (mean and log-variance), which cached latents and image folders
encoded on the fly both sample."""

from pathlib import Path

import torch


def load_vae(path: str | Path, device: str | torch.device = "cpu"):
    """A diffusers `AutoencoderKL` from a local folder (its own, or a pipeline folder with a `vae/` sub-folder),
    in eval mode on `device`. Nothing is downloaded: a missing folder is a FileNotFoundError that says so."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no VAE here (expected a local diffusers AutoencoderKL folder with "
                                "config.json and its weights, e.g. a download of stabilityai/sd-vae-ft-mse); "
                                "nothing is downloaded")
    from diffusers import AutoencoderKL  # imported here: diffusers takes seconds to import
    from diffusers.utils import is_accelerate_available

    vae = AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=is_accelerate_available())
    return vae.to(device).eval().requires_grad_(False)


def vae_downsampling(vae) -> int:
    """How many pixels one latent covers along a side (8 for SD's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def sample_posterior(moments: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """A draw from the diagonal Gaussians of `moments` [B, 2C, h, w] (mean, log-variance on dim 1) with the standard
    normal noise `eps` [B, C, h, w]; log-variance clamped to [-30, 20] like diffusers' DiagonalGaussianDistribution."""
    mean, logvar = moments.float().chunk(2, dim=1)
    return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps.to(mean.device)
