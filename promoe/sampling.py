"""The sampling library: a model from any checkpoint form, samples from it, and their conversion to pictures.

`promoe.sample` is its command-line interface; the training driver's end of a run, the routing maps and the toy
experiment use these functions directly. Our checkpoint folders are read by promoe.checkpoint_format, the format's
one reader; nothing here imports training.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import promoe
from promoe.checkpoint_format import CONFIG, read_checkpoint, read_run_config
from promoe.data.vae import load_vae, vae_downsampling
from promoe.diffusion import DDPM, batches_guidance, make_objective, make_scheduler, sample_with_scheduler
from promoe.errors import Refusal, written_atomically
from promoe.hf_folder import is_pipeline_folder, load_pipeline_folder
from promoe.train_config import RunConfig
from promoe.weights import build_to_fit, read_tensors, read_weights_header


def load_model(source: str | Path, model_name: str | None = None, weights: str = "ema"):
    """(model in eval mode, its RunConfig or None where the file records only the model: an official or converted
    checkpoint) from any checkpoint form, a diffusers pipeline folder of promoe.hf included (its RunConfig says what
    its folder does: the objective, pixels or latents, its VAE). Nothing in a file runs code: see promoe.weights."""
    source = Path(source)
    if not source.exists():
        link = f" (a link to {source.readlink()}, which does not exist)" if source.is_symlink() else ""
        raise FileNotFoundError(f"checkpoint {source} does not exist{link}: check the path")
    if source.suffix == ".pth":
        if model_name is None:
            raise Refusal(f"{source} is an official checkpoint: name its model with --model, e.g. ProMoE-XL")
        return promoe.load_official_checkpoint(source, model_name, prefer=weights).eval(), None
    if model_name is not None:
        raise Refusal(f"--model {model_name}: {source} records the model it holds; --model names the model of "
                      "an official .pth checkpoint only")
    if source.suffix == ".safetensors":
        if weights != "ema":
            raise Refusal(f"{source} holds the EMA weights only; the live weights are in the checkpoint folders")
        return load_safetensors(source)
    if is_pipeline_folder(source):
        if weights != "ema":
            raise Refusal(f"{source} is a diffusers pipeline folder: it holds one set of weights, read with "
                          "--weights ema")
        return load_pipeline_folder(source)
    if not source.is_dir():
        raise Refusal(f"{source} is neither a checkpoint folder, nor a .safetensors or .pth file")
    return read_checkpoint(source, weights)


def load_safetensors(source: Path):
    """(model, RunConfig or None) from a safetensors file whose metadata holds its config (a `config.json` beside
    the file serves for exports of before that). Its tensors' shapes are compared with the model built on `meta`
    before the model is allocated or a tensor read."""
    shapes, model_config, config = read_weights_header(source)
    if model_config is None:
        config = read_run_config(source.parent / CONFIG)
        model_config = config.model_config()
    model = build_to_fit(model_config, shapes, str(source))
    model.load_state_dict(read_tensors(source))
    return model.eval(), config


def objective_of(config: RunConfig | None, override: str | None):
    """The objective a checkpoint trained with, or `override`; an official checkpoint does not say, so it must be
    named."""
    if override is None and config is None:
        raise Refusal("an official checkpoint does not record its objective: give --objective rf or ddpm")
    return make_objective(override or config.train.objective)


def is_latent_model(config: RunConfig | None) -> bool:
    """Whether the model makes VAE latents (official checkpoints do) rather than pixels."""
    return config is None or config.data.kind == "latents" or (config.data.kind == "images" and
                                                               config.data.vae is not None)


@torch.no_grad()
def generate(model, objective, labels: torch.Tensor, generator: torch.Generator, steps: int, cfg_scale: float,
             guidance: str = "auto", scheduler: str | None = None) -> torch.Tensor:
    """Samples [B, C, H, W] in the model's space (pixels in [-1, 1] or scaled latents) for `labels`, with the
    objective's own sampler or a diffusers `scheduler` (promoe.diffusion.SCHEDULERS); `guidance` one of
    GUIDANCE_MODES ("auto": two passes for a model whose routing couples samples, one batch otherwise)."""
    device = next(model.parameters()).device
    noise = initial_noise(model, len(labels), generator).to(device)
    labels = labels.to(device)
    batched = batches_guidance(model, guidance)
    if scheduler is not None:
        return sample_with_scheduler(make_scheduler(scheduler, objective, steps), model, noise, labels, cfg_scale,
                                     batched, generator)
    if isinstance(objective, DDPM):
        return objective.sample(model, noise, labels, steps, cfg_scale, batched, generator=generator)
    return objective.sample(model, noise, labels, steps, cfg_scale, batched_guidance=batched)


def initial_noise(model, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """The starting noise of `count` samples [count, C, H, W], drawn on the CPU from `generator` in one call, so
    that a batch's draws depend on the generator's seed only (not on the device): `generate` and ProMoEPipeline
    both start here."""
    size = model.config.input_size
    return torch.randn(count, model.in_channels, size, size, generator=generator)


def per_class_labels(count: int, num_classes: int) -> torch.Tensor:
    """The labels of `generate_per_class`: the classes cycled, equal numbers per class."""
    return torch.arange(count) % num_classes


def generate_per_class(model, objective, count: int, steps: int, cfg_scale: float, batch_size: int = 500,
                       guidance: str = "auto", scheduler: str | None = None) -> np.ndarray:
    """uint8 [count, H, W, C] pixels of a pixel-space model, labels cycling over the classes (equal numbers per
    class), in fixed batches whose noise is seeded by the batch index: the sample set of a metric. `guidance` and
    `scheduler` as in `generate`."""
    labels = per_class_labels(count, model.num_classes)
    return np.concatenate([to_uint8(generate(model, objective, batch, torch.Generator().manual_seed(index), steps,
                                             cfg_scale, guidance, scheduler))
                           for index, batch in enumerate(tqdm(labels.split(batch_size), desc="samples", leave=False))])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C], the evaluation layout."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, columns: int) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows * H, columns * W, C] image, row-major, blank cells black."""
    count, height, width, channels = images.shape
    rows = -(-count // columns)
    grid = np.zeros((rows * height, columns * width, channels), dtype=np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid[row * height:(row + 1) * height, column * width:(column + 1) * width] = image
    return grid


def save_png(image: np.ndarray, path: Path) -> None:
    """uint8 [H, W, C] as a PNG, written to a temporary name first so a killed run leaves no half file."""
    with written_atomically(path) as tmp:
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp, format="PNG")


class Decoder:
    """Scaled latents -> pixels in [-1, 1] with diffusers' AutoencoderKL from a local folder (divided by its
    `scaling_factor`, 0.18215 for sd-vae-ft-mse); the identity for pixel-space models."""

    def __init__(self, vae_path: str | None, latent: bool, device: torch.device):
        self.vae = None
        if latent:
            if vae_path is None:
                raise Refusal("this model makes VAE latents: give --vae PATH, a local AutoencoderKL folder (e.g. "
                              "stabilityai/sd-vae-ft-mse saved with save_pretrained); nothing is downloaded")
            self.vae = load_vae(vae_path, device)

    def image_shape(self, model) -> tuple[int, int, int]:
        """(H, W, C) of the pictures this decoder makes of `model`'s samples."""
        size = model.config.input_size
        if self.vae is None:
            return size, size, model.in_channels
        size *= vae_downsampling(self.vae)
        return size, size, self.vae.config.out_channels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return decode(self.vae, x)


@torch.no_grad()
def decode(vae, x: torch.Tensor) -> torch.Tensor:
    """Samples in the model's space -> pixels in [-1, 1]: through the VAE (None: a pixel-space model, as they are);
    the sampling CLI (`Decoder`) and ProMoEPipeline both decode here."""
    if vae is None:
        return x
    channels = vae.config.latent_channels
    return vae.decode(x[:, :channels] / vae.config.scaling_factor).sample.clamp(-1, 1)

