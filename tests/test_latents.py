import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from promoe.data import (
    EncodedImageFolder,
    ImageFolderDataset,
    LatentDataset,
    PixelDataset,
    build_dataset,
    center_crop_arr,
    load_image,
)
from promoe.data.preprocess import main as preprocess_main
from promoe.data.preprocess import write_shard
from tests.helpers import save_tiny_vae

IMAGE_SIZE = 32  # the tiny VAE downsamples 8x: latents [4, 4, 4]
# (class, file name, width, height, mode): sizes below, at and far above the crop size, grey and RGBA
IMAGES = [
    ("n01", "a.png", 40, 30, "RGB"), ("n01", "b.jpg", 64, 64, "RGB"), ("n01", "c.png", 100, 37, "L"),
    ("n01", "d.JPEG", 33, 80, "RGB"), ("n01", "e.png", 150, 129, "RGBA"),
    ("n02", "f.png", 32, 32, "RGB"), ("n02", "g.jpeg", 70, 45, "RGB"), ("n02", "h.png", 20, 25, "RGBA"),
    ("n02", "sub/i.png", 90, 200, "RGB"), ("n02", "j.png", 48, 36, "L"),
]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for label, name, width, height, mode in IMAGES:
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        path = root / label / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode).save(
            path, format="JPEG" if name.lower().endswith(("jpg", "jpeg")) else "PNG")
    (root / "n02" / "notes.txt").write_text("not an image")
    (root / "stray.png").write_bytes(b"files outside the class folders are ignored")
    return root


def expected_files():
    return sorted(f"{label}/{name}" for label, name, *_ in IMAGES)


def preprocess_argv(image_dir, out, vae_dir, *extra, batch_size=4):
    return ["--images", str(image_dir), "--out", str(out), "--vae", str(vae_dir), "--image-size", str(IMAGE_SIZE),
            "--batch-size", str(batch_size), "--shard-size", "4", "--device", "cpu", "--workers", "2", *extra]


def read_shards(out):
    moments, labels, files = [], [], []
    for path in sorted(out.glob("shard_*.safetensors")):
        with safe_open(path, framework="pt") as file:
            moments.append(file.get_tensor("moments"))
            labels.append(file.get_tensor("labels"))
            files += json.loads(file.metadata()["files"])
    return torch.cat(moments), torch.cat(labels), files


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, image_dir, vae_dir):
    out = tmp_path_factory.mktemp("latents")
    preprocess_main(preprocess_argv(image_dir, out, vae_dir))
    return out


def test_preprocess_under_two_ranks_matches_a_direct_encode_of_the_cropped_images_and_flips(
        tmp_path, image_dir, vae_dir, monkeypatch):
    from diffusers import AutoencoderKL

    out = tmp_path / "latents"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    written = preprocess_main(preprocess_argv(image_dir, out, vae_dir, batch_size=3))  # a shard in two batches
    assert [p.name for p in written] == ["shard_00000.safetensors", "shard_00002.safetensors"]
    with pytest.raises(ValueError, match="unfinished.*shard_00001"):
        LatentDataset(out)  # rank 1 has not written its shard yet
    monkeypatch.setenv("RANK", "1")
    written = preprocess_main(preprocess_argv(image_dir, out, vae_dir, batch_size=3))
    assert [p.name for p in written] == ["shard_00001.safetensors"]

    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_images"] == 10 and meta["num_shards"] == 3 and meta["class_names"] == ["n01", "n02"]
    assert meta["image_size"] == IMAGE_SIZE and meta["scaling_factor"] == 0.18215 and meta["latent_size"] == 4
    moments, labels, files = read_shards(out)
    assert files == expected_files()
    assert labels.tolist() == [int(f.startswith("n02")) for f in files]
    assert moments.shape == (10, 2, 8, 4, 4) and moments.dtype == torch.float32

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    images = torch.stack([load_image(image_dir / f, IMAGE_SIZE) for f in files])
    with torch.no_grad():
        direct = vae.encode(images).latent_dist.parameters
        direct_flip = vae.encode(images.flip(-1)).latent_dist.parameters
    # fp32 convolutions over other batch compositions: agreement to a few ulps of values of order 1
    torch.testing.assert_close(moments[:, 0], direct, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moments[:, 1], direct_flip, rtol=1e-5, atol=1e-5)
    assert (moments[:, 0] - moments[:, 1]).abs().max() > 0.01  # the flip is encoded, not copied


def test_preprocess_skips_finished_shards_and_rewrites_a_leftover_tmp(tmp_path, image_dir, vae_dir, shard_dir):
    out = tmp_path / "latents"
    shutil.copytree(shard_dir, out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*")}
    before, _, _ = read_shards(out)
    assert preprocess_main(preprocess_argv(image_dir, out, vae_dir)) == []

    (out / "shard_00001.safetensors").unlink()
    (out / "shard_00001.safetensors.tmp").write_bytes(b"half a shard from a killed run")
    written = preprocess_main(preprocess_argv(image_dir, out, vae_dir))
    assert [p.name for p in written] == ["shard_00001.safetensors"]
    assert not (out / "shard_00001.safetensors.tmp").exists()
    for name in ("shard_00000.safetensors", "shard_00002.safetensors"):
        assert (out / name).stat().st_mtime_ns == mtimes[name]
    after, _, _ = read_shards(out)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_preprocess_refuses_a_folder_written_with_other_settings(tmp_path, image_dir, vae_dir):
    out = tmp_path / "latents"
    out.mkdir()
    (out / "meta.json").write_text(json.dumps({"format": "promoe-latents-v1", "image_size": 64}))
    with pytest.raises(SystemExit, match="image_size"):
        preprocess_main(preprocess_argv(image_dir, out, vae_dir))


def test_preprocess_with_a_missing_vae_says_nothing_is_downloaded(tmp_path, image_dir):
    with pytest.raises(SystemExit, match="no VAE here.*nothing is downloaded"):
        preprocess_main(preprocess_argv(image_dir, tmp_path / "out", tmp_path / "no-such-vae"))


def test_preprocessed_float16_shards_load_and_the_dataset_reads_meta(tmp_path, image_dir, vae_dir, shard_dir):
    out = tmp_path / "latents16"
    preprocess_main(preprocess_argv(image_dir, out, vae_dir, "--dtype", "float16"))
    half, full = LatentDataset(out), LatentDataset(shard_dir)
    assert (len(half), half.num_classes, half.sample_shape, half.scaling_factor) == (10, 2, (4, 4, 4), 0.18215)
    assert half.class_names == ["n01", "n02"] and half.labels.tolist() == [0] * 5 + [1] * 5
    indices = torch.arange(10)
    x16, y16 = half.batch(indices, torch.Generator().manual_seed(3))
    x32, y32 = full.batch(indices, torch.Generator().manual_seed(3))
    assert x16.dtype == torch.float32 and torch.equal(y16, y32)
    torch.testing.assert_close(x16, x32, rtol=2e-3, atol=2e-3)  # fp16 storage: 2^-11 relative


def synthetic_shards(folder, sizes=(6, 4), seed=0):
    """Shards of known moments: means in [-2, 2], log-variances in [-3, 1]."""
    rng = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n = sum(sizes)
    mean = torch.rand(n, 2, 4, 2, 3, generator=rng) * 4 - 2
    logvar = torch.rand(n, 2, 4, 2, 3, generator=rng) * 4 - 3
    moments, labels = torch.cat([mean, logvar], dim=2), torch.arange(n) % 3
    first = 0
    for index, size in enumerate(sizes):
        write_shard(folder / f"shard_{index:05d}.safetensors", moments[first:first + size], labels[first:first + size],
                    [f"c/{i}.png" for i in range(first, first + size)], first, 16)
        first += size
    return moments, labels


def test_latent_batch_is_the_posterior_draw_of_the_generator_with_its_flips(tmp_path):
    moments, labels = synthetic_shards(tmp_path)
    dataset = LatentDataset(tmp_path, scaling_factor=0.5)
    assert (len(dataset), dataset.sample_shape, dataset.num_classes) == (10, (4, 2, 3), 3)
    indices = torch.tensor([9, 0, 5, 6, 3, 3, 7])
    x, y = dataset.batch(indices, torch.Generator().manual_seed(11))
    again, _ = dataset.batch(indices, torch.Generator().manual_seed(11))
    other, _ = dataset.batch(indices, torch.Generator().manual_seed(12))
    assert torch.equal(x, again) and not torch.allclose(x, other)
    assert torch.equal(y, labels[indices])

    generator = torch.Generator().manual_seed(11)
    flips = (torch.rand(len(indices), generator=generator) < 0.5).long()
    chosen = moments[indices, flips]  # [B, 8, 2, 3]
    eps = torch.randn(len(indices), 4, 2, 3, generator=generator)
    expected = (chosen[:, :4] + torch.exp(0.5 * chosen[:, 4:]) * eps) * 0.5
    assert 0 < flips.sum() < len(indices)
    torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-6)


def test_latent_samples_have_the_posterior_mean_and_std_and_half_are_flipped(tmp_path):
    moments, _ = synthetic_shards(tmp_path)
    dataset = LatentDataset(tmp_path, scaling_factor=1.0)
    n = 8000
    x, _ = dataset.batch(torch.full((n,), 7), torch.Generator().manual_seed(5))
    mean, std = moments[7, :, :4], torch.exp(0.5 * moments[7, :, 4:])  # [2, 4, 2, 3] each: image, flip
    # each draw is nearest (in posterior units) to the mean of the version it came from
    distance = ((x[:, None] - mean[None]) / std[None]).pow(2).flatten(2).sum(-1)  # [n, 2]
    flipped = distance.argmin(1).bool()
    assert abs(flipped.float().mean().item() - 0.5) < 0.03  # 0.5 +- 5.4 standard errors of 1/sqrt(4n)
    for version, draws in ((0, x[~flipped]), (1, x[flipped])):
        m = len(draws)
        # sample mean within 5 standard errors std / sqrt(m); sample std within 8 % (its standard error ~ 1/sqrt(2m))
        assert ((draws.mean(0) - mean[version]).abs() < 5 * std[version] / math.sqrt(m)).all()
        assert ((draws.std(0) / std[version] - 1).abs() < 0.08).all()


def test_latent_dataset_checks_the_shards(tmp_path):
    synthetic_shards(tmp_path / "gap", sizes=(3, 3, 3))
    (tmp_path / "gap" / "shard_00001.safetensors").unlink()
    with pytest.raises(ValueError, match="shard is missing"):
        LatentDataset(tmp_path / "gap")
    with pytest.raises(FileNotFoundError, match="no such latent folder"):
        LatentDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no latent shards"):
        LatentDataset(tmp_path / "empty")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_shard_is_reported_with_its_path(tmp_path, damage):
    synthetic_shards(tmp_path)
    path = tmp_path / "shard_00001.safetensors"
    path.write_bytes(b"\x00" * 5 if damage == "garbage" else path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="cannot read latent shard") as error:
        LatentDataset(tmp_path)
    assert str(path) in str(error.value)


def official_npz_tree(root, channels, seed=0):
    """The official layout: <class>/<name>.latent.npz with `latent` and `latent_flip` [channels, 2, 2]."""
    rng = np.random.default_rng(seed)
    stored = {}
    for name in ["n02/x.latent.npz", "n01/b.latent.npz", "n01/a.latent.npz", "n02/deeper/y.latent.npz"]:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        latent, latent_flip = (rng.uniform(-2, 1, (channels, 2, 2)).astype(np.float32) for _ in range(2))
        np.savez_compressed(path, latent=latent, latent_flip=latent_flip)
        stored[name] = (latent, latent_flip)
    return [stored[name] for name in sorted(stored)]  # the data set's order: sorted by relative path


def test_official_npz_moments_are_sampled_and_labelled_by_sorted_class_folder(tmp_path):
    stored = official_npz_tree(tmp_path, channels=8)
    dataset = LatentDataset(tmp_path)
    assert dataset.layout == "npz" and dataset.class_names == ["n01", "n02"] and dataset.num_classes == 2
    assert dataset.labels.tolist() == [0, 0, 1, 1] and dataset.sample_shape == (4, 2, 2)
    indices = torch.tensor([3, 1, 0, 2, 2, 0])
    x, y = dataset.batch(indices, torch.Generator().manual_seed(4))
    assert torch.equal(y, dataset.labels[indices])

    generator = torch.Generator().manual_seed(4)
    flips = (torch.rand(len(indices), generator=generator) < 0.5).tolist()
    chosen = torch.stack([torch.from_numpy(stored[i][f]) for i, f in zip(indices.tolist(), flips)])
    eps = torch.randn(len(indices), 4, 2, 2, generator=generator)
    expected = (chosen[:, :4] + torch.exp(0.5 * chosen[:, 4:]) * eps) * 0.18215
    torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-6)


def test_official_npz_of_sampled_latents_are_only_scaled(tmp_path):
    stored = official_npz_tree(tmp_path, channels=4)
    dataset = LatentDataset(tmp_path, scaling_factor=2.0)
    assert dataset.sample_shape == (4, 2, 2)
    indices = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    x, _ = dataset.batch(indices, torch.Generator().manual_seed(0))
    flips = (torch.rand(len(indices), generator=torch.Generator().manual_seed(0)) < 0.5).tolist()
    expected = torch.stack([torch.from_numpy(stored[i][f]) * 2.0 for i, f in zip(indices.tolist(), flips)])
    assert torch.equal(x, expected)


def test_npz_of_unexpected_channels_is_reported_with_its_path(tmp_path):
    official_npz_tree(tmp_path, channels=6)
    with pytest.raises(ValueError, match="expected \\[8, h, w\\].*\\[4, h, w\\]") as error:
        LatentDataset(tmp_path)
    assert str(tmp_path / "n01" / "a.latent.npz") in str(error.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no_flip"])
def test_corrupt_npz_is_reported_with_its_path(tmp_path, damage):
    official_npz_tree(tmp_path, channels=8)
    path = tmp_path / "n02" / "x.latent.npz"
    if damage == "no_flip":
        np.savez(path, latent=np.zeros((8, 2, 2), np.float32))
    else:
        path.write_bytes(b"not a zip" if damage == "garbage" else path.read_bytes()[:60])
    dataset = LatentDataset(tmp_path)  # files are read when a batch needs them
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="cannot read") as error:
        for _ in range(20):  # until a batch reads the file (and, for no_flip, draws its flip)
            dataset.batch(torch.tensor([3]), generator)
    assert str(path) in str(error.value)


def reference_center_crop(image, size):
    """guided-diffusion's crop done step by step with PIL: k BOX halvings, one BICUBIC resize, PIL crop."""
    halvings = 0
    while min(image.size) // 2 ** halvings >= 2 * size:
        halvings += 1
    for _ in range(halvings):
        image = image.resize((image.width // 2, image.height // 2), Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size)), halvings


@pytest.mark.parametrize("width, height, size", [(300, 200, 64), (517, 129, 32), (64, 64, 64), (50, 41, 64),
                                                 (1000, 999, 64)])
def test_center_crop_matches_a_direct_pil_reference(width, height, size):
    pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    reference, halvings = reference_center_crop(image, size)
    cropped = center_crop_arr(image, size)
    assert cropped.size == (size, size)
    assert np.array_equal(np.asarray(cropped), np.asarray(reference))
    if halvings:  # the BOX halvings matter: one BICUBIC resize from full size gives other pixels
        scale = size / min(image.size)
        direct = image.resize((round(width * scale), round(height * scale)), Image.BICUBIC)
        left, top = (direct.width - size) // 2, (direct.height - size) // 2
        assert not np.array_equal(np.asarray(direct.crop((left, top, left + size, top + size))), np.asarray(cropped))


def test_load_image_converts_grey_and_rgba_to_rgb_in_unit_range(image_dir):
    grey = load_image(image_dir / "n01" / "c.png", 16)
    rgba = load_image(image_dir / "n01" / "e.png", 16)
    assert grey.shape == rgba.shape == (3, 16, 16) and grey.dtype == torch.float32
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert grey.min() >= -1 and grey.max() <= 1 and rgba.min() >= -1 and rgba.max() <= 1
    (image_dir.parent / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="cannot read image") as error:
        load_image(image_dir.parent / "bad.png", 16)
    assert "bad.png" in str(error.value)


def test_image_folder_batch_flips_from_the_generator(image_dir):
    dataset = ImageFolderDataset(image_dir, IMAGE_SIZE, workers=2)
    assert dataset.files == expected_files() and dataset.class_names == ["n01", "n02"]
    assert (len(dataset), dataset.num_classes, dataset.sample_shape) == (10, 2, (3, IMAGE_SIZE, IMAGE_SIZE))
    indices = torch.tensor([8, 0, 3, 5, 9, 1])
    x, y = dataset.batch(indices, torch.Generator().manual_seed(2))
    flips = torch.rand(len(indices), generator=torch.Generator().manual_seed(2)) < 0.5
    assert 0 < flips.sum() < len(indices)
    for row, (index, flip) in enumerate(zip(indices.tolist(), flips.tolist())):
        image = load_image(image_dir / dataset.files[index], IMAGE_SIZE)
        assert torch.equal(x[row], image.flip(-1) if flip else image)
    assert torch.equal(y, dataset.labels[indices]) and y.tolist() == [1, 0, 0, 1, 1, 0]


def test_encoded_image_folder_samples_the_posterior_with_the_generator(image_dir, vae_dir):
    dataset = EncodedImageFolder(image_dir, IMAGE_SIZE, vae_dir, "cpu", workers=2)
    assert dataset.sample_shape == (4, 4, 4) and dataset.num_classes == 2 and dataset.scaling_factor == 0.18215
    indices = torch.tensor([4, 7, 1, 2])
    x, y = dataset.batch(indices, torch.Generator().manual_seed(9))
    again, _ = dataset.batch(indices, torch.Generator().manual_seed(9))
    assert torch.equal(x, again) and x.shape == (4, 4, 4, 4) and torch.equal(y, dataset.images.labels[indices])

    generator = torch.Generator().manual_seed(9)
    images, _ = dataset.images.batch(indices, generator)
    with torch.no_grad():
        moments = dataset.vae.encode(images).latent_dist.parameters
    eps = torch.randn(4, 4, 4, 4, generator=generator)
    expected = (moments[:, :4] + torch.exp(0.5 * moments[:, 4:]) * eps) * 0.18215
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-6)


def test_build_dataset_gives_each_kind_and_clear_errors(tmp_path, image_dir, vae_dir):
    synthetic_shards(tmp_path / "latents")
    assert isinstance(build_dataset("latents", tmp_path / "latents"), LatentDataset)
    assert isinstance(build_dataset("images", image_dir, image_size=16), ImageFolderDataset)
    assert isinstance(build_dataset("images", image_dir, image_size=16, vae=vae_dir), EncodedImageFolder)
    with pytest.raises(ValueError, match="unknown data set kind 'imagenet'.*pixels, latents, images"):
        build_dataset("imagenet", image_dir)
    with pytest.raises(ValueError, match="needs a folder"):
        build_dataset("latents", None)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        build_dataset("images", tmp_path / "missing")


def test_pixel_dataset_states_its_classes_and_sample_shape():
    dataset = PixelDataset(np.zeros((3, 28, 28), np.uint8), np.zeros(3, np.int64))
    assert dataset.num_classes == 10 and dataset.sample_shape == (1, 28, 28)


@pytest.mark.slow
def test_preprocess_under_torchrun_with_two_processes(tmp_path, image_dir, vae_dir, shard_dir):
    out = tmp_path / "latents"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    subprocess.run([torchrun, "--nproc_per_node=2", "-m", "promoe.data.preprocess",
                    *preprocess_argv(image_dir, out, vae_dir)], check=True, cwd=os.getcwd(), timeout=300)
    two, labels, files = read_shards(out)
    one, labels_one, files_one = read_shards(shard_dir)
    assert files == files_one and torch.equal(labels, labels_one)
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-5)


def test_a_ranks_rows_equal_the_same_rows_of_the_whole_latent_batch(tmp_path, image_dir, vae_dir):
    synthetic_shards(tmp_path / "latents")
    encoded = EncodedImageFolder(image_dir, IMAGE_SIZE, vae_dir, "cpu", workers=2)
    for dataset in (LatentDataset(tmp_path / "latents"), encoded):
        indices = torch.tensor([4, 7, 1, 2, 0, 5])
        whole, labels = dataset.batch(indices, torch.Generator().manual_seed(3))
        part, part_labels = dataset.batch(indices, torch.Generator().manual_seed(3), rows=slice(3, 6))
        torch.testing.assert_close(part, whole[3:6], rtol=1e-5, atol=1e-6)  # the VAE sees another batch size
        assert torch.equal(part_labels, labels[3:6])
