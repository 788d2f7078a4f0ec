import gzip
import struct

import numpy as np
import pytest
import torch

from promoe.data import PixelDataset, default_pixel_dataset, load_digits_28, load_fashion_mnist, read_idx


def write_idx(path, array, gz=True):
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    with gzip.open(path, "wb") if gz else open(path, "wb") as file:
        file.write(raw)


@pytest.fixture
def fashion_folder(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (12, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, (12,), dtype=np.uint8))
    return tmp_path


def test_idx_round_trip(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, (3, 5, 7), dtype=np.uint8)
    for gz in (True, False):
        path = tmp_path / ("a.idx.gz" if gz else "a.idx")
        write_idx(path, array, gz)
        assert np.array_equal(read_idx(path), array)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\x00\x0d\x01", "bad magic"),
        (b"\x00\x00\x08\x03\x00", "truncated"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", "promises 5 bytes"),
    ],
)
def test_corrupt_idx_files_are_reported_with_their_path(tmp_path, content, message):
    path = tmp_path / "bad.idx"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        read_idx(path)
    assert str(path) in str(error.value)


def test_truncated_gzip_is_reported_with_its_path(fashion_folder):
    path = fashion_folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="cannot read") as error:
        load_fashion_mnist(fashion_folder)
    assert str(path) in str(error.value)


def test_fashion_mnist_dataset_gives_scaled_images_and_labels(fashion_folder):
    dataset = default_pixel_dataset(fashion_folder)
    image, label = dataset[3]
    raw, labels = load_fashion_mnist(fashion_folder)
    assert dataset.name == "fashion-mnist" and len(dataset) == 12 and image.shape == (1, 28, 28)
    assert label == labels[3]
    assert torch.equal(image, torch.from_numpy(raw[3]).float()[None] / 127.5 - 1)


def test_digits_fallback_when_fashion_mnist_is_absent(tmp_path, capsys):
    dataset = default_pixel_dataset(tmp_path)
    assert dataset.name == "digits" and len(dataset) == 1797 and "digits instead" in capsys.readouterr().out
    image, label = dataset[0]
    assert image.shape == (1, 28, 28) and -1 <= image.min() and image.max() <= 1 and 0 <= label <= 9
    images, labels = load_digits_28()
    assert images.dtype == np.uint8 and images.shape == (1797, 28, 28) and images.max() > 200


def test_batch_flips_are_random_per_item_and_fixed_by_the_generator():
    images = np.arange(28 * 28, dtype=np.uint8).reshape(1, 28, 28).repeat(40, 0)
    dataset = PixelDataset(images, np.zeros(40, dtype=np.int64), flip=True)
    batch, _ = dataset.batch(torch.arange(40), torch.Generator().manual_seed(0))
    flipped = batch[:, 0, 0, 0] > batch[:, 0, 0, -1]
    assert 5 < int(flipped.sum()) < 35
    again, _ = dataset.batch(torch.arange(40), torch.Generator().manual_seed(0))
    assert torch.equal(batch, again)
    unflipped = torch.from_numpy(images).float()[:, None] / 127.5 - 1
    assert torch.equal(batch[~flipped], unflipped[~flipped])
    assert torch.equal(batch[flipped], unflipped[flipped].flip(-1))


def test_a_ranks_rows_equal_the_same_rows_of_the_whole_batch():
    images = np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    dataset = PixelDataset(images, np.arange(20) % 10, flip=True)
    indices = torch.randperm(20, generator=torch.Generator().manual_seed(1))[:12]
    whole, labels = dataset.batch(indices, torch.Generator().manual_seed(2))
    part, part_labels = dataset.batch(indices, torch.Generator().manual_seed(2), rows=slice(4, 8))
    assert torch.equal(part, whole[4:8]) and torch.equal(part_labels, labels[4:8])
