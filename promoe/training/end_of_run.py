"""What a training run leaves beside its checkpoints when it ends (rank 0): the loss curves, the expert-load heat
map, a class grid from the EMA weights and, on Fashion-MNIST, the Fashion-MNIST FID and conditional accuracy (with
the feature net that `train.feature_net` names, else the one promoe.eval.train_feature_net writes by default)."""

import json
from pathlib import Path

import torch

from promoe.data import pixel_split
from promoe.diffusion import make_objective
from promoe.errors import write_text_atomically
from promoe.eval import DEFAULT_FEATURE_NET, conditional_accuracy, load_feature_net, pixel_fid
from promoe.plots import plot_expert_load, plot_losses
from promoe.sampling import (
    Decoder,
    generate,
    generate_per_class,
    image_grid,
    is_latent_model,
    load_model,
    per_class_labels,
    save_png,
    to_uint8,
)
from promoe.train_config import RunConfig


def finish(out: Path, config: RunConfig, dataset_name: str, device: torch.device) -> None:
    """The plots of `out/metrics.csv`, then the grid and the FID of `out/ema.safetensors` (as the config asks)."""
    plot_losses(out / "metrics.csv", out / "loss.png")
    print(f"wrote {out / 'loss.png'}")
    if plot_expert_load(out / "metrics.csv", out / "expert_load.png"):
        print(f"wrote {out / 'expert_load.png'}")
    if is_latent_model(config) and config.data.vae is None:
        return  # latents and nothing to decode them with
    model, _ = load_model(out / "ema.safetensors")
    model, decoder = model.to(device), Decoder(config.data.vae, is_latent_model(config), device)
    objective = make_objective(config.train.objective)
    if config.train.grid_steps > 0:
        class_grid(model, objective, decoder, config, out / "samples.png")
    if config.train.fid_samples > 0 and dataset_name != "fashion-mnist":
        print(f"note: no Fashion-MNIST FID for a run on {dataset_name}")
    elif config.train.fid_samples > 0:
        fashion_fid(model, objective, config, out / "fid.json")


def class_grid(model, objective, decoder, config: RunConfig, path: Path, per_class: int = 8) -> None:
    """One row per class (the first ten), sampled with the run's grid settings."""
    classes = min(model.num_classes, 10)
    labels = torch.arange(classes).repeat_interleave(per_class)
    steps, scale = config.train.grid_steps, config.train.grid_cfg_scale
    images = generate(model, objective, labels, torch.Generator().manual_seed(0), steps, scale)
    save_png(image_grid(to_uint8(decoder(images)), per_class), path)
    print(f"wrote {path} ({classes} classes x {per_class}, {steps} steps, guidance {scale})")


def fashion_fid(model, objective, config: RunConfig, path: Path) -> None:
    """The Fashion-MNIST FID of `fid_samples` samples (equal per class) against the test split, in the features of
    the demo classifier, and the share of samples it classifies as their class; skipped with a note when that
    classifier has not been trained."""
    feature_net = Path(config.train.feature_net or DEFAULT_FEATURE_NET)
    if not feature_net.exists():
        print(f"note: no Fashion-MNIST FID: train its feature net first (python -m promoe.eval.train_feature_net "
              f"--out {feature_net}, about a minute)")
        return
    count, steps, scale = config.train.fid_samples, config.train.grid_steps, config.train.grid_cfg_scale
    samples = generate_per_class(model, objective, count, steps, scale)
    labels = per_class_labels(count, model.num_classes)
    reference, _, _ = pixel_split(config.data.folder, "test")
    net = load_feature_net(feature_net)
    fid, accuracy = pixel_fid(samples, reference, net), conditional_accuracy(samples, labels, net)
    write_text_atomically(path, json.dumps({"fashion_mnist_fid": fid, "conditional_accuracy": accuracy,
                                            "samples": count, "steps": steps, "cfg_scale": scale}))
    print(f"Fashion-MNIST FID ({count} samples, {steps} Euler steps, guidance {scale}; the features of a small "
          f"Fashion-MNIST classifier, NOT comparable with ImageNet FID): {fid:.2f}")
    print(f"conditional accuracy: {accuracy:.1%} of the samples are classified by that classifier as the class "
          f"they were drawn for (chance {1 / model.num_classes:.0%})")
