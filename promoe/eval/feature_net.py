"""The demo's stand-in for Inception: a small CNN classifier of 28x28 grey images trained on Fashion-MNIST, and
the "Fashion-MNIST FID" computed with its penultimate features.

The Fashion-MNIST FID is the Fréchet distance between Gaussians fitted to the 128 features this net feeds its
classifier layer (after ReLU, as Inception's pool_3 feeds its logits). It ranks models trained on the same data
and says how far samples are from the data, but it is NOT comparable with an ImageNet FID (other network, other
feature dimension, other images), nor across feature nets trained with other seeds or settings.

Train it once (a minute or two on 2 CPU cores): `python -m promoe.eval.train_feature_net`; it writes
DEFAULT_FEATURE_NET (weights and a JSON config in the safetensors metadata).
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from promoe.errors import Refusal
from promoe.eval.metrics import GaussianStats

DEFAULT_FEATURE_NET = Path("runs/feature_net/fashion_feature_net.safetensors")


class FeatureNet(nn.Module):
    """[N, 1, 28, 28] in [-1, 1] -> logits [N, num_classes]; `features` gives the [N, hidden] penultimate layer."""

    def __init__(self, channels: tuple[int, int] = (16, 32), hidden: int = 128, num_classes: int = 10):
        super().__init__()
        self.config = dict(channels=list(channels), hidden=hidden, num_classes=num_classes)
        self.conv1 = nn.Conv2d(1, channels[0], 3, padding=1)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 3, padding=1)
        self.fc = nn.Linear(channels[1] * 7 * 7, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)   # (N, C1, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)   # (N, C2, 7, 7)
        return F.relu(self.fc(x.flatten(1)))         # (N, hidden)

    def forward(self, x):
        return self.head(self.features(x))


def grey_images(images) -> torch.Tensor:
    """uint8 [N, 28, 28], [N, 28, 28, 1] or [N, 1, 28, 28] (numpy or torch) -> float [N, 1, 28, 28] in [-1, 1],
    the scaling of `promoe.data.PixelDataset`."""
    images = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    if images.dtype != torch.uint8:
        raise ValueError(f"images of dtype {images.dtype}; expected uint8 (from [-1, 1] floats: "
                         "((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    elif images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or tuple(images.shape[1:]) != (28, 28):
        raise ValueError(f"images of shape {tuple(images.shape)}; expected [N, 28, 28], [N, 28, 28, 1] or "
                         "[N, 1, 28, 28]")
    return images[:, None].float() / 127.5 - 1


@torch.inference_mode()
def pixel_features(images, net: FeatureNet, batch_size: int = 1000) -> np.ndarray:
    """float32 [N, hidden] penultimate features of uint8 grey 28x28 images (shapes as `grey_images`)."""
    device = next(net.parameters()).device
    x = grey_images(images)
    return torch.cat([net.features(batch.to(device)).float().cpu() for batch in x.split(batch_size)]).numpy()


def pixel_fid(samples_u8, reference_u8, net: FeatureNet, batch_size: int = 1000) -> float:
    """Fashion-MNIST FID: Fréchet distance of the feature net's penultimate features of two uint8 image sets
    ([N, 28, 28], [N, 28, 28, 1] or [N, 1, 28, 28]). Not comparable with an ImageNet (Inception) FID."""
    stats = [GaussianStats(net.config["hidden"]) for _ in range(2)]
    for stat, images in zip(stats, (samples_u8, reference_u8)):
        for start in range(0, len(images), batch_size):
            stat.update(pixel_features(images[start:start + batch_size], net, batch_size))
    return stats[0].frechet_distance(stats[1])


@torch.inference_mode()
def conditional_accuracy(samples_u8, labels: torch.Tensor, net: FeatureNet, batch_size: int = 1000) -> float:
    """The share of samples that the feature net classifies as the class they were conditioned on (chance: one in
    the number of classes): whether a class-conditional model draws the class it is asked for."""
    device = next(net.parameters()).device
    x = grey_images(samples_u8)
    predicted = torch.cat([net(batch.to(device)).argmax(1).cpu() for batch in x.split(batch_size)])
    return (predicted == labels.cpu()).float().mean().item()


def save_feature_net(net: FeatureNet, path, **info) -> None:
    """Weights as safetensors; the config (and `info`, e.g. the test accuracy) as JSON in its metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in net.state_dict().items()}
    save_file(tensors, path, metadata={"config": json.dumps(net.config), "info": json.dumps(info)})


def load_feature_net(path=DEFAULT_FEATURE_NET, device="cpu") -> FeatureNet:
    """The trained feature net in eval mode; `net.info` holds what training recorded (test accuracy, ...)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no feature net at {path}: train one with `python -m promoe.eval.train_feature_net "
                                f"--out {path}` (about a minute on the CPU)")
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
    if "config" not in metadata:
        raise Refusal(f"{path}: no feature-net config in its metadata; was it written by save_feature_net?")
    net = FeatureNet(**json.loads(metadata["config"]))
    net.load_state_dict(load_file(path))
    net.info = json.loads(metadata.get("info", "{}"))
    return net.to(device).eval().requires_grad_(False)
