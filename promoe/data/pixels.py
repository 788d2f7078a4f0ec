"""Small pixel-space data sets for the CPU demo: Fashion-MNIST (IDX files) and scikit-learn's digits.

Debian's `dataset-fashion-mnist` package installs the four IDX `.gz` files in FASHION_MNIST_DIR; any other folder
holding them works. A file that is missing, truncated or not IDX is reported with its path.
"""

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from promoe.errors import Refusal

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) of unsigned bytes as an array; a Refusal naming the file if it is bad."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as file:
                raw = file.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as error:
        raise Refusal(f"{path}: cannot read ({error})") from error
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != _UBYTE:
        raise Refusal(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise Refusal(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise Refusal(f"{path}: IDX header promises {expected - header} bytes of data for shape {shape}, "
                      f"the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()  # writable, as torch wants


def load_fashion_mnist(folder: Path = FASHION_MNIST_DIR, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of one split."""
    images_name, labels_name = FASHION_MNIST_FILES[split]
    images, labels = read_idx(Path(folder) / images_name), read_idx(Path(folder) / labels_name)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise Refusal(f"{folder}: {images_name} {images.shape} and {labels_name} {labels.shape} do not pair up")
    if labels.max(initial=0) > 9:
        raise Refusal(f"{Path(folder) / labels_name}: labels above 9 in a 10-class data set")
    return images, labels.astype(np.int64)


def load_digits_28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits (0..16), resized to 28x28 uint8 so the demo model fits both data sets."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float()[:, None] / 16.0
    images = torch.nn.functional.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
    return (images[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy(), digits.target.astype(np.int64)


class PixelDataset(torch.utils.data.Dataset):
    """uint8 images [N, H, W] -> float [1, H, W] in [-1, 1] with their labels; `batch` flips at random if asked."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, flip: bool = False, name: str = "",
                 num_classes: int = 10):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(labels)
        self.flip = flip
        self.name = name
        self.num_classes = num_classes
        self.sample_shape = (1, *self.images.shape[1:])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index][None].float() / 127.5 - 1, self.labels[index]

    def batch(self, indices: torch.Tensor, generator: torch.Generator, rows: slice = slice(None)
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [b, 1, H, W], labels [b]) of `indices[rows]`. Every random choice (here the flips) is drawn from
        `generator` for all of `indices`: a batch is a function of the step's seed, and a rank's rows do not depend
        on how the batch is split (the contract every training data set keeps)."""
        flipped = (torch.rand(len(indices), generator=generator) < 0.5)[rows]
        images = self.images[indices[rows]][:, None].float() / 127.5 - 1
        if self.flip:
            images = torch.where(flipped.view(-1, 1, 1, 1), images.flip(-1), images)
        return images, self.labels[indices[rows]]


def pixel_split(folder: Path | None = None, split: str = "train") -> tuple[np.ndarray, np.ndarray, str]:
    """(images uint8 [N, 28, 28], labels, data set name) of a Fashion-MNIST split when its files are in `folder`
    (None: Debian's), else scikit-learn's 1797 digits whatever the split."""
    folder = Path(folder) if folder is not None else FASHION_MNIST_DIR
    if all((folder / name).exists() for name in FASHION_MNIST_FILES[split]):
        return (*load_fashion_mnist(folder, split), "fashion-mnist")
    return (*load_digits_28(), "digits")


def default_pixel_dataset(folder: Path | None = None) -> PixelDataset:
    """Fashion-MNIST's training split when its files are there (flips on), else the digits (no flips: a flipped
    digit is another glyph), with a printed note."""
    images, labels, name = pixel_split(folder)
    if name == "digits":
        print(f"note: no Fashion-MNIST files in {folder or FASHION_MNIST_DIR} (apt-get install "
              "dataset-fashion-mnist); training on scikit-learn's digits instead")
    return PixelDataset(images, labels, flip=name == "fashion-mnist", name=name)
