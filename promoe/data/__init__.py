"""Data sets: Fashion-MNIST from IDX files, scikit-learn's digits as the zero-install fallback, cached VAE latents
(our shards or the official `.latent.npz` files), ImageNet-layout image folders (as pixels or encoded on the fly),
and the VAE that encodes and decodes latents (`vae`)."""

from promoe.data.build import build_dataset
from promoe.data.images import EncodedImageFolder, ImageFolderDataset, center_crop_arr, load_image
from promoe.data.latents import LatentDataset
from promoe.data.pixels import (
    PixelDataset,
    default_pixel_dataset,
    load_digits_28,
    load_fashion_mnist,
    pixel_split,
    read_idx,
)
from promoe.data.vae import load_vae, sample_posterior

__all__ = [
    "EncodedImageFolder", "ImageFolderDataset", "LatentDataset", "PixelDataset", "build_dataset", "center_crop_arr",
    "default_pixel_dataset", "load_digits_28", "load_fashion_mnist", "load_image", "load_vae", "pixel_split",
    "read_idx", "sample_posterior",
]
