"""Data sets: Fashion-MNIST from IDX files, scikit-learn's digits as the zero-install fallback, cached VAE latents
(our shards or the official `.latent.npz` files), ImageNet-layout image folders (as pixels or encoded on the fly)."""

from promoe.data.build import build_dataset
from promoe.data.images import EncodedImageFolder, ImageFolderDataset, center_crop_arr, load_image, load_vae
from promoe.data.latents import LatentDataset, sample_posterior
from promoe.data.pixels import (
    PixelDataset,
    default_pixel_dataset,
    load_digits_28,
    load_fashion_mnist,
    pixel_split,
    read_idx,
)

__all__ = [
    "EncodedImageFolder", "ImageFolderDataset", "LatentDataset", "PixelDataset", "build_dataset", "center_crop_arr",
    "default_pixel_dataset", "load_digits_28", "load_fashion_mnist", "load_image", "load_vae", "pixel_split",
    "read_idx", "sample_posterior",
]
