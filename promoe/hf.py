"""promoe in diffusers' terms: every zoo model as a diffusers model (`ProMoETransformer2DModel`), the pipeline that
samples it (`ProMoEPipeline`), and pipelines built from our checkpoints (`pipeline_from_checkpoint`, which
`python -m promoe.convert --to diffusers` saves).

This module imports diffusers; nothing else in promoe imports it, so that training, the GPU check and the sampling
CLI run without diffusers. The folder layout, and reading it without diffusers, is promoe.hf_folder's.

The pipeline is a diffusers-shaped shell around the sampling code of `promoe.sample`: the same noise draw
(`initial_noise`), the same scheduler loop and guidance (`sample_with_scheduler`, `guided_prediction`), the same VAE
decoding (`decode`) and the same uint8 conversion (`to_uint8`). So for one `torch.Generator` seeded like the CLI's
batch, the same labels, steps and guidance scale, the images are the CLI's to the last uint8 level:

    python -m promoe.sample --ckpt DIR --labels 0 1 2 3 --num-images 4 --batch-size 4 --seed S ...
    pipe(class_labels=[0, 1, 2, 3], generator=torch.Generator().manual_seed(S * 1_000_003 + 0), ...)

(batch b of the CLI draws its noise from a generator seeded with S * 1_000_003 + b: with --seed 0, batch 0 is
`torch.manual_seed(0)`). The CLI's default sampler, our Euler, is FlowMatchEulerDiscreteScheduler given
`sigmas=euler_sigmas(n)[:-1]`; the pipeline's default (the scheduler's own timesteps) is `--scheduler flow-euler`.
"""

import dataclasses
import errno
import inspect
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, ConfigMixin, DiffusionPipeline, ModelMixin
from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN, apply_layerwise_casting_hook
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import is_accelerate_available, logging
from PIL import Image

from promoe.config import ModelConfig
from promoe.data.vae import check_vae_config, load_vae
from promoe.diffusion import DDPM, OBJECTIVES, SCHEDULERS, batches_guidance, sample_with_scheduler
from promoe.diffusion.schedulers import ddpm_scheduler
from promoe.errors import Refusal, current_umask
from promoe.hf_folder import (
    check_digest,
    check_pipeline_index,
    check_transformer_folder,
    inferred_objective,
    pipeline_objective,
    scheduler_changes,
    seal,
    weights_files,
)
from promoe.limits import check_sampling_steps
from promoe.moe.experts import ExpertBank
from promoe.moe.layer import place_dispatch
from promoe.sampling import decode, initial_noise, is_latent_model, load_model, objective_of, to_uint8
from promoe.zoo import build_from_config

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
logger = logging.get_logger(__name__)


class ProMoETransformer2DModel(ModelMixin, ConfigMixin):
    """Any model of the zoo (ProMoE, Dense-DiT, TC-DiT, EC-DiT, DiffMoE; rectified flow or DDPM) as a diffusers
    model. Its registered config is our resolved ModelConfig, every field; it holds our DiT as `dit` (one model
    definition), so its weights are the DiT's under "dit.".

    forward(hidden_states [B, C, H, W], timestep [B] or a number, class_labels [B]) -> `.sample` [B, C_out, H, W]:
    the timestep is the scheduler's (sigma * 1000 for rectified flow, the training step for DDPM), label
    `num_classes` is the null class of guidance.

    `objective` (promoe.diffusion.OBJECTIVES: "rf", "ddpm", "ddpm-fixed") is what the model was trained for, recorded
    in its config: ProMoEPipeline fits its scheduler to it. None (a model built without it, a folder written before
    it was recorded) takes the objective of the first scheduler a pipeline gives it.
    """

    # diffusers' conventions: the DiT's blocks are what gradient checkpointing recomputes, what a device map keeps
    # whole, what regional compilation compiles, and (under `dit`) what block-level group offloading moves. Layerwise
    # casting keeps in the compute dtype the embedders and the routers (whose choices are discrete) besides norms.
    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]
    _repeated_blocks = ["DiTBlock"]
    _skip_layerwise_casting_patterns = ["x_embedder", "t_embedder", "y_embedder", "router", "norm"]
    _group_offload_block_modules = ["dit"]

    def __init__(self, objective: str | None = None, **fields):
        super().__init__()
        config = ModelConfig(**fields)  # every field checked (diffusers passes the config.json's known keys)
        if objective is not None and objective not in OBJECTIVES:
            raise Refusal(f"objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
        self.register_to_config(**dataclasses.asdict(config), objective=objective)
        self.dit = build_from_config(config)

    @property
    def objective(self) -> str | None:
        return self.config.objective

    @classmethod
    def from_dit(cls, dit, objective: str | None = None) -> "ProMoETransformer2DModel":
        """The diffusers model holding `dit` itself, trained for `objective`: no weight is copied (the wrapper is
        built on `meta`, then given the DiT)."""
        with torch.device("meta"):
            model = cls(objective=objective, **dataclasses.asdict(dit.config))
        model.dit = dit
        return model

    def enable_gradient_checkpointing(self, gradient_checkpointing_func=None) -> None:
        if any(hasattr(module, "running_stats") for module in self.modules()):
            raise Refusal("gradient checkpointing: this model's routers update running statistics in forward "
                          "(k-means centroids, DiffMoE thresholds), which a recomputation would update twice")
        super().enable_gradient_checkpointing(gradient_checkpointing_func)

    def enable_layerwise_casting(self, storage_dtype: torch.dtype = torch.float8_e4m3fn,
                                 compute_dtype: torch.dtype | None = None, skip_modules_pattern=None,
                                 skip_modules_classes=None, non_blocking: bool = False) -> None:
        """diffusers' layerwise casting, which casts the layer kinds it knows (Linear, Conv, Embedding), and the
        expert banks too, which hold most of a MoE model's weights: each bank is stored in `storage_dtype` and cast
        to `compute_dtype` in its own module call (`ExpertBank.forward`). A bank is skipped as diffusers skips a
        layer: a pattern matches its name or one of its parents', or its class is among `skip_modules_classes`."""
        compute_dtype = compute_dtype or self.dtype  # before anything is cast, as diffusers takes it
        super().enable_layerwise_casting(storage_dtype, compute_dtype, skip_modules_pattern, skip_modules_classes,
                                         non_blocking)
        # The patterns that diffusers' own method gathers (the caller's or its defaults, then the model's).
        patterns = (*(skip_modules_pattern or DEFAULT_SKIP_MODULES_PATTERN), *(self._keep_in_fp32_modules or ()),
                    *(self._skip_layerwise_casting_patterns or ()))
        for name, bank in self.named_modules():
            parents = [".".join(name.split(".")[:end]) for end in range(1, name.count(".") + 2)]
            skipped = any(re.search(pattern, parent) for pattern in patterns for parent in parents)
            if isinstance(bank, ExpertBank) and not skipped and not isinstance(bank, skip_modules_classes or ()):
                apply_layerwise_casting_hook(bank, storage_dtype, compute_dtype, non_blocking)

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: str | None = None,
                        max_shard_size: int | str = "10GB", **kwargs):
        """diffusers' save_pretrained (any variant, shards, .bin), then each safetensors file it wrote records the
        digest of its tensors (promoe.hf_folder.seal), checked when it is read. (A pipeline's save passes the
        arguments that this signature names.)"""
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, variant=variant,
                                max_shard_size=max_shard_size, **kwargs)
        seal_weights(Path(save_directory), variant, safe_serialization)

    def forward(self, hidden_states: torch.Tensor, timestep, class_labels, return_dict: bool = True):
        batch = hidden_states.shape[0]
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        class_labels = torch.as_tensor(class_labels, device=hidden_states.device)
        sample = self.dit(hidden_states, timestep.expand(batch) if timestep.dim() == 0 else timestep, class_labels)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' from_pretrained for a local folder only, after promoe's checks of the files diffusers will read
        (the variant, the shards, the .bin, as its own rules pick them): the config read as our checkpoints' (an
        unknown field is an error), every tensor of the weights fitting the model on `meta`, their digests."""
        check_transformer_folder(Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or ""),
                                 kwargs.get("variant"), kwargs.get("use_safetensors"))
        kwargs.setdefault("low_cpu_mem_usage", is_accelerate_available())  # without accelerate diffusers warns
        return super().from_pretrained(pretrained_model_name_or_path, **{**kwargs, "local_files_only": True})


# diffusers reads the config keys a model takes from its __init__'s signature: the ModelConfig fields, listed once.
ProMoETransformer2DModel.__init__.__signature__ = inspect.Signature(
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
     inspect.Parameter("objective", inspect.Parameter.KEYWORD_ONLY, default=None)]
    + [inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default)
       for field in dataclasses.fields(ModelConfig)])


def seal_weights(folder: Path, variant: str | None, safe_serialization: bool) -> None:
    for file in weights_files(folder, variant, safe_serialization):
        if file.suffix == ".safetensors":
            seal(file)


def vae_weights(folder: Path, variant: str | None, use_safetensors: bool | None) -> list[Path]:
    """The VAE's weights files that a pipeline's from_pretrained reads: its variant's, else (as diffusers falls back
    for a component saved without the variant) its main ones."""
    try:
        return weights_files(folder, variant, use_safetensors)
    except FileNotFoundError:
        if variant is None:
            raise
        return weights_files(folder, None, use_safetensors)


def fitted_scheduler(scheduler, transformer: ProMoETransformer2DModel):
    """`scheduler` set to sample `transformer` (promoe.hf_folder.scheduler_changes): itself where it fits, else a copy
    from its config with what the model fixes set; a Refusal naming both where it cannot sample the model."""
    name, settings, config = type(scheduler).__name__, dict(scheduler.config), transformer.dit.config
    if transformer.objective is None:  # a model that does not say: the scheduler it was first given does
        transformer.register_to_config(objective=inferred_objective(name, settings, config))
    changes = scheduler_changes(transformer.objective, name, settings, config)
    if not changes:
        return scheduler
    logger.info(f"{name} set to sample this {transformer.objective!r} transformer: {changes}")
    return type(scheduler).from_config(scheduler.config, **changes)


class ProMoEPipeline(DiffusionPipeline):
    """Class-conditional sampling of a promoe model: `pipe(class_labels, guidance_scale, num_inference_steps,
    generator, output_type)`.

    Components: the transformer, a scheduler (FlowMatchEulerDiscreteScheduler for rectified-flow models;
    DDPMScheduler with the learned variance where the model has it, DDIMScheduler or DPMSolverMultistepScheduler
    for DDPM models) and, for latent models, the VAE; a pixel-space model has none.
    Guidance runs as promoe.sample runs it: one batch holding the null-label half, or two passes for a model whose
    routing couples the samples of a batch (DiffMoE); `guidance` chooses as the CLI's --guidance.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer: ProMoETransformer2DModel, scheduler, vae: AutoencoderKL | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)

    def __setattr__(self, name: str, value) -> None:
        # Every scheduler the pipeline is given (at construction, `pipe.scheduler = ...`) is fitted to the transformer's
        # objective, or refused: a scheduler of another objective samples garbage without an error.
        if name == "scheduler" and value is not None and "transformer" in self.__dict__:
            value = fitted_scheduler(value, self.transformer)
        super().__setattr__(name, value)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' from_pretrained for a local promoe pipeline folder only: a folder of any other pipeline, or a
        name that is not a local folder, is refused before diffusers imports anything it names; its scheduler's
        config must fit the transformer, and the VAE's weights their digests, before diffusers reads them."""
        folder = Path(pretrained_model_name_or_path)
        index = check_pipeline_index(folder)
        pipeline_objective(folder, index)
        if (folder / "vae").is_dir():
            check_vae_config(folder / "vae" / "config.json")
            for file in vae_weights(folder / "vae", kwargs.get("variant"), kwargs.get("use_safetensors")):
                if file.suffix == ".safetensors":
                    check_digest(file)
        kwargs.setdefault("low_cpu_mem_usage", is_accelerate_available())
        return super().from_pretrained(pretrained_model_name_or_path, **{**kwargs, "local_files_only": True})

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: str | None = None, **kwargs):
        """diffusers' save_pretrained; the VAE's safetensors files then record their digests too (the transformer's
        save records its own)."""
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, variant=variant, **kwargs)
        if self.vae is not None:
            seal_weights(Path(save_directory) / "vae", variant, safe_serialization)

    @torch.no_grad()
    def __call__(self, class_labels, guidance_scale: float = 1.0, num_inference_steps: int = 250,
                 generator: torch.Generator | None = None, output_type: str = "pil", return_dict: bool = True,
                 sigmas: list[float] | None = None, timesteps: list[float] | None = None, guidance: str = "auto"):
        """Images of `class_labels` (an int, or a list or 1-D tensor of them, each in 0..num_classes - 1).

        guidance_scale: a finite number >= 1 (1: no guidance). generator: one CPU `torch.Generator` for the batch's
        noise (promoe.sample seeds batch b with seed * 1_000_003 + b), and for the scheduler's noise if it draws any.
        sigmas / timesteps: the scheduler's own, as diffusers' pipelines take them (then num_inference_steps is
        ignored); `sigmas=euler_sigmas(n)[:-1].tolist()` runs our Euler sampler on FlowMatchEulerDiscreteScheduler.
        output_type: "pil" (the CLI's PNG pixels: round((x + 1) * 127.5)), "np" (float NHWC in [0, 1]), "pt" (float
        NCHW in [0, 1]) or "latent" (the samples in the model's space, before the VAE).
        """
        dit = self.transformer.dit
        self.scheduler = self.scheduler  # fitted again, should its config have been changed in place
        labels = check_labels(class_labels, dit.num_classes)
        check_call(guidance_scale, num_inference_steps, generator, output_type)
        device = self._execution_device
        place_dispatch(dit, device)  # as promoe.sample: each MoE layer its configured backend, else the device's
        noise = initial_noise(dit, len(labels), generator).to(device, self.transformer.dtype)
        set_timesteps(self.scheduler, num_inference_steps, sigmas, timesteps)
        samples = sample_with_scheduler(self.scheduler, dit, noise, labels.to(device), guidance_scale,
                                        batches_guidance(dit, guidance), generator, progress=self.progress_bar)
        images = samples if output_type == "latent" else decode(self.vae, samples)
        images = convert_images(images, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def check_labels(class_labels, num_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(class_labels).reshape(-1)
    if labels.numel() == 0 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise Refusal(f"class_labels must be one or more integers in 0..{num_classes - 1}, got {class_labels!r}")
    bad = labels[(labels < 0) | (labels >= num_classes)].tolist()
    if bad:
        raise Refusal(f"class_labels {bad} outside 0..{num_classes - 1}")
    return labels.long()


def check_call(guidance_scale: float, steps: int, generator, output_type: str) -> None:
    # nan or inf give black images; a scale below 1 moves samples away from their class (as promoe.sample refuses).
    if not (isinstance(guidance_scale, (int, float)) and 1 <= guidance_scale < math.inf):
        raise Refusal(f"guidance_scale {guidance_scale!r}: a guidance scale is a finite number >= 1 (1: no "
                      "guidance)")
    if not (isinstance(steps, int) and steps >= 1):
        raise Refusal(f"num_inference_steps must be an integer >= 1, got {steps!r}")
    check_sampling_steps(steps, "num_inference_steps")  # before the scheduler lays out its tables
    if generator is not None and not (isinstance(generator, torch.Generator) and generator.device.type == "cpu"):
        raise Refusal("generator: one CPU torch.Generator for the whole batch (promoe draws a batch's noise from "
                      f"one generator on the CPU, as promoe.sample does), got {generator!r}")
    if output_type not in OUTPUT_TYPES:
        raise Refusal(f"output_type {output_type!r}: choose one of {', '.join(OUTPUT_TYPES)}")


def set_timesteps(scheduler, steps: int, sigmas, timesteps) -> None:
    """The scheduler's timesteps: its own for `steps` (as promoe.sample's --scheduler sets them), or the given
    sigmas or timesteps where the scheduler takes them."""
    if sigmas is None and timesteps is None:
        scheduler.set_timesteps(steps)
        return
    if sigmas is not None and timesteps is not None:
        raise Refusal("give sigmas or timesteps, not both")
    name, values = ("sigmas", sigmas) if sigmas is not None else ("timesteps", timesteps)
    if name not in inspect.signature(scheduler.set_timesteps).parameters:
        raise Refusal(f"{type(scheduler).__name__} takes no custom {name}")
    check_sampling_steps(len(values), f"{name} of length")
    scheduler.set_timesteps(**{name: [float(v) if name == "sigmas" else int(v) for v in values]})


def convert_images(images: torch.Tensor, output_type: str):
    """Pixels in [-1, 1] (or latents, for "latent") in the requested output type."""
    if output_type == "latent":
        return images
    if output_type == "pil":
        return [Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image) for image in to_uint8(images)]
    unit = (images.float() / 2 + 0.5).clamp(0, 1)
    return unit if output_type == "pt" else unit.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)


def default_scheduler(objective, config: ModelConfig):
    """The scheduler of a new pipeline: FlowMatchEulerDiscreteScheduler as promoe.sample's flow-euler for rectified
    flow; for DDPM, DDPMScheduler as our ancestral sampler (learned variance where the objective learns it)."""
    if isinstance(objective, DDPM):
        channels = config.in_channels * (2 if config.learn_sigma else 1)
        return ddpm_scheduler(objective, objective.learns_variance(channels, config.in_channels))
    return SCHEDULERS["flow-euler"][1](objective)


def pipeline_from_checkpoint(source: str | Path, model_name: str | None = None, weights: str = "ema",
                             objective: str | None = None, vae: str | Path | None = None) -> ProMoEPipeline:
    """The pipeline of any checkpoint promoe.sample reads (our checkpoint folders, safetensors, official .pth with
    `model_name`, a pipeline folder): its model without a copy of the weights, the default scheduler of its
    objective, and the local VAE folder `vae` for a latent model (a pixel-space model has none)."""
    model, config = load_model(source, model_name, weights)
    latent = is_latent_model(config)
    if latent and vae is None:
        vae = config.data.vae if config is not None and config.data.vae else None
        if vae is None:
            raise Refusal("this model makes VAE latents: give --vae PATH, a local AutoencoderKL folder; nothing is "
                          "downloaded")
    scheduler = default_scheduler(objective_of(config, objective), model.config)
    transformer = ProMoETransformer2DModel.from_dit(model, objective or config.train.objective)
    return ProMoEPipeline(transformer, scheduler, load_vae(vae) if latent else None)


def save_pipeline(pipe: ProMoEPipeline, out: str | Path) -> None:
    """pipe.save_pretrained into a new temporary folder of a unique name beside `out` (so neither a planted link nor
    another writer's folder is written through), renamed to `out` once complete: a killed run leaves no half folder
    under the name, and of concurrent writers one renames its whole folder, the others are refused. An existing `out`
    is refused. The folder takes the mode a plain mkdir gives under the umask (mkdtemp's is 0700)."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise Refusal(f"{out} exists: give a new folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        pipe.save_pretrained(tmp)
        os.rename(tmp, out)  # fails where another writer's folder (not empty) took the name meanwhile
    except OSError as error:
        if out.exists() and error.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise Refusal(f"{out} exists (written meanwhile by another command?): give a new folder") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["ProMoEPipeline", "ProMoETransformer2DModel", "pipeline_from_checkpoint", "save_pipeline"]
