"""One entry for the training driver: the data set of a kind ("pixels", "latents" or "images") and a folder."""

from pathlib import Path

import torch

from promoe.data.images import EncodedImageFolder, ImageFolderDataset
from promoe.data.latents import LatentDataset
from promoe.data.pixels import FASHION_MNIST_FILES, default_pixel_dataset
from promoe.errors import Refusal

KINDS = ("pixels", "latents", "images")


def build_dataset(kind: str, folder: str | Path | None, *, image_size: int = 256, vae: str | Path | None = None,
                  device: str | torch.device = "cpu"):
    """The training data set (every one keeps the contract of `PixelDataset.batch`):

    - "pixels": Fashion-MNIST from the IDX files in `folder`; with `folder` None, Debian's files, else
      scikit-learn's digits (a folder the user names must hold the files: no fallback then);
    - "latents": cached latents in `folder` (`LatentDataset`: our shards or the official `.latent.npz` tree);
    - "images": an ImageNet-layout folder, as pixels centre-cropped to `image_size`, or with `vae` (a local
      AutoencoderKL folder) encoded on the fly on `device` (`EncodedImageFolder`).
    """
    if kind not in KINDS:
        raise Refusal(f"unknown data set kind {kind!r}: choose one of {', '.join(KINDS)}")
    if kind == "pixels":
        if folder is not None:
            check_fashion_mnist_folder(Path(folder))
        return default_pixel_dataset(folder)
    if folder is None:
        raise Refusal(f"data set kind {kind!r} needs a folder")
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (data set kind {kind!r})")
    if kind == "latents":
        return LatentDataset(folder)
    if vae is None:
        return ImageFolderDataset(folder, image_size)
    return EncodedImageFolder(folder, image_size, vae, device)


def check_fashion_mnist_folder(folder: Path) -> None:
    """A Fashion-MNIST folder that the user named must exist and hold the training split's IDX files."""
    if not folder.is_dir():
        raise FileNotFoundError(f"data.folder {folder}: no such folder (the digits fallback is only for the "
                                "default, data.folder unset)")
    missing = [name for name in FASHION_MNIST_FILES["train"] if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"data.folder {folder} lacks the Fashion-MNIST files {', '.join(missing)} (the "
                                "digits fallback is only for the default, data.folder unset)")
