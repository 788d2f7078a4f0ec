"""The VAE: a local diffusers `AutoencoderKL` loaded for encoding and decoding, how many pixels one of its latents
covers, and a draw from the posterior it encodes (mean and log-variance), which cached latents and image folders
encoded on the fly both sample."""

from pathlib import Path

import torch

from promoe.errors import Refusal, parse_json, quoted, read_small_text
from promoe.limits import available_memory, in_mib

# What a VAE's config.json may ask of us, far above SD's VAE (4 levels of 128..512 channels, 2 layers per block,
# 4 latent channels): its widths size the weights diffusers allocates before reading a byte of them.
VAE_SIZE_LIMITS = {"block_out_channels": 4096, "layers_per_block": 16, "latent_channels": 1024, "in_channels": 64,
                   "out_channels": 64}
MAX_VAE_LEVELS = 8


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
    check_vae_config(path / "config.json")
    from diffusers import AutoencoderKL  # imported here: diffusers takes seconds to import
    from diffusers.utils import is_accelerate_available

    vae = AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=is_accelerate_available())
    return vae.to(device).eval().requires_grad_(False)


def check_vae_config(path: Path) -> None:
    """Refuse, before diffusers builds it, a VAE config whose sizes are out of bounds (`VAE_SIZE_LIMITS`) or whose
    weights would not fit the memory free: fp32 parameters estimated as 36 c^2 (layers_per_block + 1) per level of
    c channels (3x3 convolutions of the encoder's and decoder's resnets and resamplers) and 80 c^2 for the two
    middle blocks (83.6M parameters for SD's VAE, estimated 86M)."""
    try:
        values = parse_json(read_small_text(path, "a VAE's config"))
    except Refusal as error:
        raise Refusal(f"{path} is not JSON ({error})") from None
    if not isinstance(values, dict):
        raise Refusal(f"{path} holds a {type(values).__name__}, not a VAE's config")
    levels = values.get("block_out_channels", [64])
    if not (isinstance(levels, list) and 1 <= len(levels) <= MAX_VAE_LEVELS):
        raise Refusal(f"{path}: block_out_channels {quoted(levels)}: a list of 1..{MAX_VAE_LEVELS} widths")
    given = {key: [values[key]] for key in VAE_SIZE_LIMITS if key in values}
    given["block_out_channels"] = levels
    for key, numbers in given.items():
        if not all(type(number) is int and 1 <= number <= VAE_SIZE_LIMITS[key] for number in numbers):
            raise Refusal(f"{path}: {key} {quoted(values[key])}: each must be an integer in "
                          f"1..{VAE_SIZE_LIMITS[key]}")
    layers = values.get("layers_per_block", 1)
    size = 4 * (sum(36 * width**2 * (layers + 1) for width in levels) + 80 * levels[-1] ** 2)
    free = available_memory()
    if size > free:
        raise Refusal(f"{path}: a VAE of about {in_mib(size)} of weights, this machine has {in_mib(free)} free: is "
                      "its config right?")


def vae_downsampling(vae) -> int:
    """How many pixels one latent covers along a side (8 for SD's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def sample_posterior(moments: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """A draw from the diagonal Gaussians of `moments` [B, 2C, h, w] (mean, log-variance on dim 1) with the standard
    normal noise `eps` [B, C, h, w]; log-variance clamped to [-30, 20] like diffusers' DiagonalGaussianDistribution."""
    mean, logvar = moments.float().chunk(2, dim=1)
    return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps.to(mean.device)
