"""The training data set, checked against the model, and the sample indices of each step."""

import torch

from promoe.data import build_dataset
from promoe.errors import Refusal
from promoe.train_config import RunConfig
from promoe.training.ranks import AllRanksStop


def load_dataset(config: RunConfig, device: torch.device):
    """The run's data set; a folder that is missing or unusable, or data that do not fit the model, stop the run
    with a message that names them."""
    data, model = config.data, config.model_config()
    try:
        dataset = build_dataset(data.kind, data.folder, image_size=data.image_size, vae=data.vae, device=device)
    except (OSError, Refusal) as error:
        raise AllRanksStop(f"data: {error}") from None
    if len(dataset) < config.train.global_batch:
        raise AllRanksStop(f"data set {dataset.name} holds {len(dataset)} items, fewer than one global batch")
    expected = (model.in_channels, model.input_size, model.input_size)
    if tuple(dataset.sample_shape) != expected:
        raise AllRanksStop(f"data set {dataset.name} gives samples of shape {tuple(dataset.sample_shape)}, the model "
                         f"takes {expected} (model.overrides in_channels / input_size)")
    if dataset.num_classes != model.num_classes:
        raise AllRanksStop(f"data set {dataset.name} has {dataset.num_classes} classes, the model "
                         f"{model.num_classes} (model.overrides.num_classes)")
    return dataset


def data_identity(dataset) -> dict:
    """What a resumed run must find again: the data set's name and size (recorded in every checkpoint)."""
    return {"name": dataset.name, "size": len(dataset)}


def global_batch_indices(num_items: int, global_batch: int, step: int, seed: int) -> torch.Tensor:
    """The dataset indices of step `step`: a fresh permutation per epoch, so the position is a function of step."""
    per_epoch = num_items // global_batch
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[position * global_batch:(position + 1) * global_batch]
