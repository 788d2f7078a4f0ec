"""Image sets to evaluate, read batch by batch: an `.npz` with `arr_0` uint8 [N, H, W, 3] (the guided-diffusion
evaluation layout; streamed from the zip, never loaded whole) or a folder of PNG files (sorted by name).
Grey images ([N, H, W, 1], or grey PNGs) are repeated to RGB. Anything else is an error naming the file."""

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from promoe.errors import Refusal
from promoe.limits import IMAGE_BATCH_BYTES, MAX_IMAGE_PIXELS

SAMPLES_NPZ = "samples.npz"  # what `python -m promoe.sample` writes beside its PNGs


class NpzImages:
    """`arr_0` of an `.npz` file, streamed: only one batch of images is in memory at a time."""

    def __init__(self, path, key: str = "arr_0"):
        self.path, self.key = Path(path), key
        with self._open() as file:
            shape, dtype = _npy_header(file, self.path, key)
        self.shape = check_images_shape(shape, dtype, f"{self.path} ({key})")
        self.dtype = dtype

    def __len__(self) -> int:
        return self.shape[0]

    def _open(self):
        try:
            archive = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as error:
            raise Refusal(f"{self.path}: not a readable .npz file ({error})") from error
        if f"{self.key}.npy" not in archive.namelist():
            keys = sorted(name.removesuffix(".npy") for name in archive.namelist())
            archive.close()
            raise Refusal(f"{self.path}: no {self.key!r} array (it holds {keys})")
        return _ClosingMember(archive, f"{self.key}.npy")

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 [B, H, W, 3] batches in order."""
        count, height, width, channels = self.shape
        row_bytes = height * width * channels
        with self._open() as file:
            _npy_header(file, self.path, self.key)
            for start in range(0, count, rows_within_budget(batch_size, self.shape)):
                rows = min(rows_within_budget(batch_size, self.shape), count - start)
                data = file.read(rows * row_bytes)
                if len(data) != rows * row_bytes:
                    raise Refusal(f"{self.path}: {self.key} is truncated at image {start}")
                images = np.frombuffer(bytearray(data), np.uint8)  # writable, as torch.from_numpy wants
                yield to_rgb(images.reshape(rows, height, width, channels))


class PngFolder:
    """The PNG files of a folder, sorted by name; all must have the size of the first."""

    def __init__(self, folder):
        self.path = Path(folder)
        self.files = sorted(self.path.glob("*.png"))
        if not self.files:
            raise Refusal(f"{self.path}: no .png files (and no {SAMPLES_NPZ})")
        height, width, _ = _read_png(self.files[0]).shape
        self.shape = check_images_shape((len(self.files), height, width, 3), np.dtype(np.uint8), str(self.path))

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        batch_size = rows_within_budget(batch_size, self.shape)
        for start in range(0, len(self.files), batch_size):
            images = [_read_png(path) for path in self.files[start:start + batch_size]]
            for path, image in zip(self.files[start:], images):
                if image.shape != self.shape[1:]:
                    raise Refusal(f"{path}: size {image.shape[:2]} differs from the first image's "
                                  f"{self.shape[1:3]} ({self.files[0].name})")
            yield np.stack(images)


def open_images(path) -> NpzImages | PngFolder:
    """An `.npz` file, a folder holding `samples.npz` (as the sampling CLI writes), or a folder of PNG files."""
    path = Path(path)
    if path.is_dir():
        return NpzImages(path / SAMPLES_NPZ) if (path / SAMPLES_NPZ).is_file() else PngFolder(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.suffix != ".npz":
        raise Refusal(f"{path}: expected an .npz file (arr_0 uint8 [N, H, W, 3]) or a folder of PNG files")
    return NpzImages(path)


def check_images_shape(shape: tuple, dtype: np.dtype, what: str) -> tuple[int, int, int, int]:
    if dtype != np.uint8:
        raise Refusal(f"{what}: images of dtype {dtype}; expected uint8 in 0..255")
    if len(shape) != 4 or shape[-1] not in (1, 3):
        hint = " (channels first? the layout is NHWC)" if len(shape) == 4 and shape[1] in (1, 3) else ""
        raise Refusal(f"{what}: images of shape {tuple(shape)}; expected [N, H, W, 3]{hint}")
    if shape[0] == 0:
        raise Refusal(f"{what}: no images")
    if shape[1] * shape[2] > MAX_IMAGE_PIXELS:
        side = int(MAX_IMAGE_PIXELS ** 0.5)
        raise Refusal(f"{what}: images of {shape[1]}x{shape[2]} pixels, more than {side}x{side}; the Inception "
                      "sees them at 299x299: resize them first")
    return tuple(int(n) for n in shape)


def check_enough(images: "NpzImages | PngFolder", what: str) -> None:
    """A set of one image has no covariance: refused before the Inception's pass, not after it."""
    if len(images) < 2:
        raise Refusal(f"{what}: one image; the metrics need at least 2 (their statistics hold a covariance)")


def rows_within_budget(batch_size: int, shape: tuple[int, int, int, int]) -> int:
    """`batch_size`, or fewer images where their uint8 bytes would pass IMAGE_BATCH_BYTES (at least one)."""
    return max(1, min(batch_size, IMAGE_BATCH_BYTES // (shape[1] * shape[2] * shape[3])))


def to_rgb(images_NHWC: np.ndarray) -> np.ndarray:
    return np.repeat(images_NHWC, 3, axis=-1) if images_NHWC.shape[-1] == 1 else images_NHWC


def _read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as error:
        raise Refusal(f"{path}: cannot read as an image ({error})") from error


def _npy_header(file, path: Path, key: str) -> tuple[tuple, np.dtype]:
    version = np.lib.format.read_magic(file)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(file)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(file)
    else:
        raise Refusal(f"{path}: {key} is in .npy format {version}, which this reader does not stream")
    if fortran:
        raise Refusal(f"{path}: {key} is stored in Fortran order; save it C-contiguous (np.ascontiguousarray)")
    return shape, dtype


# Deflate expands at most about 1032 times: no member of an archive can hold more than this many times its size.
_MOST_EXPANSION = 1100


def npz_array(npz, key: str, path: Path) -> np.ndarray:
    """npz[key] of an open np.load archive, once its header's shape and dtype were found to take no more bytes than
    the archive can hold: a crafted header could otherwise make numpy allocate any amount before reading."""
    info = npz.zip.getinfo(f"{key}.npy")
    try:
        with npz.zip.open(info) as member:
            shape, dtype = _npy_header(member, path, key)
    except zipfile.BadZipFile as error:
        raise Refusal(f"{path}: not a readable .npz file ({error})") from None
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if declared > info.file_size or info.file_size > _MOST_EXPANSION * path.stat().st_size:
        raise Refusal(f"{path}: '{key}' declares {declared} bytes ({shape}), more than the file holds: damaged or "
                      "not an evaluation file")
    return npz[key]


class _ClosingMember:
    """A member of a zip archive opened for reading, closing the archive with it."""

    def __init__(self, archive: zipfile.ZipFile, name: str):
        self.archive, self.file = archive, archive.open(name)

    def __enter__(self):
        return self.file

    def __exit__(self, *exc):
        self.file.close()
        self.archive.close()
