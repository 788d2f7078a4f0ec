"""Data sets: Fashion-MNIST from IDX files, scikit-learn's digits as the zero-install fallback."""

from promoe.data.pixels import PixelDataset, default_pixel_dataset, load_digits_28, load_fashion_mnist, read_idx

__all__ = ["PixelDataset", "default_pixel_dataset", "load_digits_28", "load_fashion_mnist", "read_idx"]
