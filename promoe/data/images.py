"""ImageNet-layout image folders: one sub-folder per class (sorted names -> labels 0, 1, ...), images inside.

Every image is read with PIL, converted to RGB (grey is replicated, an alpha channel is dropped) and centre-cropped
as ADM / DiT / ProMoE do (`center_crop_arr`), then scaled to [-1, 1]. `ImageFolderDataset` gives these pixels;
`EncodedImageFolder` encodes them with a local diffusers `AutoencoderKL` on the fly and samples the posterior
(promoe.data.vae).
"""

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from promoe.data.vae import load_vae, sample_posterior, vae_downsampling
from promoe.errors import Refusal

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # compared lower-case: ImageNet's .JPEG counts


def scan_class_folders(folder: Path, suffixes: tuple[str, ...]) -> tuple[list[str], list[str], torch.Tensor]:
    """(class names, file paths relative to `folder`, labels int64 [N]) of an ImageNet-layout tree.

    The classes are the non-hidden sub-folders of `folder` in sorted order; the files of a class are those whose
    lower-cased name ends with one of `suffixes` anywhere below its sub-folder, sorted by relative path. Files
    directly in `folder` are ignored (as torchvision's ImageFolder does); a class with no file is an error, since
    skipping it would shift every later label."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise Refusal(f"{folder}: no class sub-folders (expected the ImageNet layout: one folder per class)")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(
            os.path.relpath(os.path.join(root, file), folder)
            for root, dirs, names in os.walk(folder / name, followlinks=True)
            for file in names
            if file.lower().endswith(suffixes)
        )
        if not found:
            raise Refusal(f"{folder / name}: class folder holds no {'/'.join(suffixes)} file")
        files += found
        labels += [label] * len(found)
    return classes, files, torch.tensor(labels, dtype=torch.int64)


def center_crop_arr(image: Image.Image, image_size: int) -> Image.Image:
    """ADM's centre crop (guided-diffusion `image_datasets.center_crop_arr`): halve with BOX filtering while the
    short side is at least 2 * image_size, resize with BICUBIC so the short side is image_size, crop the centre."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    array = np.array(image)
    top, left = (array.shape[0] - image_size) // 2, (array.shape[1] - image_size) // 2
    return Image.fromarray(array[top:top + image_size, left:left + image_size])


def load_image(path: Path, image_size: int) -> torch.Tensor:
    """One image file as float [3, image_size, image_size] in [-1, 1], centre-cropped; a Refusal naming the file
    if PIL cannot read it."""
    try:
        with Image.open(path) as image:
            image = center_crop_arr(image.convert("RGB"), image_size)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise Refusal(f"{path}: cannot read image ({error})") from error
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


def load_images(paths: list[Path], image_size: int, workers: int = 8) -> torch.Tensor:
    """Images [N, 3, S, S] of `paths`, decoded on a few threads (PIL releases the GIL while decoding)."""
    if workers <= 1 or len(paths) <= 1:
        return torch.stack([load_image(path, image_size) for path in paths])
    with ThreadPoolExecutor(min(workers, len(paths))) as pool:
        return torch.stack(list(pool.map(lambda path: load_image(path, image_size), paths)))


class ImageFolderDataset:
    """An ImageNet-layout folder as centre-cropped pixels: `batch` gives float [B, 3, S, S] in [-1, 1] and int64
    labels [B], each image flipped horizontally with probability 1/2 drawn from the step's generator.

    A file PIL cannot read (truncated, corrupt) is reported once and replaced, with its label, by the next readable
    file of the folder's order: the same on every rank and every run, so a resumed run sees the same batches. A
    check of the whole folder up front would cost a full decode of every image (a header check passes a
    truncated JPEG), so files are found out when they are drawn."""

    def __init__(self, folder: str | Path, image_size: int = 256, workers: int = 8):
        self.folder = Path(folder)
        self.image_size = image_size
        self.workers = workers
        self.class_names, self.files, self.labels = scan_class_folders(self.folder, IMAGE_SUFFIXES)
        self.unreadable: set[int] = set()  # indices of the files found unreadable so far
        self.num_classes = len(self.class_names)
        self.sample_shape = (3, image_size, image_size)
        self.name = f"images {self.folder.name} {image_size}px"

    def __len__(self) -> int:
        return len(self.files)

    def batch(self, indices: torch.Tensor, generator: torch.Generator, rows: slice = slice(None)
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The images of `indices[rows]` (only those are read); the flips are drawn for all of `indices`."""
        flipped = (torch.rand(len(indices), generator=generator) < 0.5)[rows]
        wanted = indices[rows].tolist()
        with ThreadPoolExecutor(max(1, min(self.workers, len(wanted)))) as pool:
            loaded = list(pool.map(self.load_readable, wanted))
        images = torch.stack([image for image, _ in loaded])
        images = torch.where(flipped.view(-1, 1, 1, 1), images.flip(-1), images)
        return images, self.labels[[index for _, index in loaded]]

    def load_readable(self, index: int) -> tuple[torch.Tensor, int]:
        """(the image of `index`, or of the next readable file after it; the index of the file read)."""
        for offset in range(len(self.files)):
            candidate = (index + offset) % len(self.files)
            if candidate in self.unreadable:
                continue
            try:
                return load_image(self.folder / self.files[candidate], self.image_size), candidate
            except ValueError as error:
                self.unreadable.add(candidate)
                print(f"skipped an unreadable image, replaced by the next file of its folder: {error}",
                      file=sys.stderr)
        raise Refusal(f"{self.folder}: no image of the folder is readable")


class EncodedImageFolder:
    """An ImageNet-layout folder encoded on the fly: `batch` centre-crops and flips the images like
    `ImageFolderDataset`, encodes them with the VAE on `device` (no grad) and returns latents sampled from the
    posterior with the step's generator (the noise is drawn on the CPU, so every device gives the same batch),
    times the VAE's `config.scaling_factor`, as float [B, C, S/f, S/f] on the CPU."""

    def __init__(self, folder: str | Path, image_size: int, vae_path: str | Path,
                 device: str | torch.device = "cpu", workers: int = 8):
        self.images = ImageFolderDataset(folder, image_size, workers)
        self.device = torch.device(device)
        self.vae = load_vae(vae_path, self.device)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.num_classes = self.images.num_classes
        size = image_size // vae_downsampling(self.vae)
        self.sample_shape = (self.vae.config.latent_channels, size, size)
        self.name = f"encoded {self.images.name}"

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def batch(self, indices: torch.Tensor, generator: torch.Generator, rows: slice = slice(None)
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Only the images of `indices[rows]` are read and encoded; flips and noise are drawn for all of them."""
        images, labels = self.images.batch(indices, generator, rows)
        eps = torch.randn(len(indices), *self.sample_shape, generator=generator)[rows]
        moments = self.vae.encode(images.to(self.device)).latent_dist.parameters.float().cpu()
        return sample_posterior(moments, eps) * self.scaling_factor, labels
