"""One entry for the training driver: the data set of a kind ("pixels", "latents" or "images") and a folder."""

from pathlib import Path

import torch

from promoe.data.images import EncodedImageFolder, ImageFolderDataset
from promoe.data.latents import LatentDataset
from promoe.data.pixels import default_pixel_dataset

KINDS = ("pixels", "latents", "images")


def build_dataset(kind: str, folder: str | Path | None, *, image_size: int = 256, vae: str | Path | None = None,
                  device: str | torch.device = "cpu"):
    """The training data set (every one keeps the contract of `PixelDataset.batch`):

    - "pixels": Fashion-MNIST from the IDX files in `folder` (None: Debian's), else scikit-learn's digits;
    - "latents": cached latents in `folder` (`LatentDataset`: our shards or the official `.latent.npz` tree);
    - "images": an ImageNet-layout folder, as pixels centre-cropped to `image_size`, or with `vae` (a local
      AutoencoderKL folder) encoded on the fly on `device` (`EncodedImageFolder`).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown data set kind {kind!r}: choose one of {', '.join(KINDS)}")
    if kind == "pixels":
        return default_pixel_dataset(folder)
    if folder is None:
        raise ValueError(f"data set kind {kind!r} needs a folder")
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (data set kind {kind!r})")
    if kind == "latents":
        return LatentDataset(folder)
    if vae is None:
        return ImageFolderDataset(folder, image_size)
    return EncodedImageFolder(folder, image_size, vae, device)
