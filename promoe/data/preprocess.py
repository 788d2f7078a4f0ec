"""Encode an ImageNet-layout image folder into latent shards (the layout is described in promoe.data.latents).

    python -m promoe.data.preprocess --images DIR --out DIR --vae PATH [--image-size 256] [--batch-size 32]
        [--shard-size 1024] [--device cuda] [--dtype float32] [--workers 8]
    torchrun --nproc_per_node=8 -m promoe.data.preprocess ...     # rank r encodes shards r, r + world, ...

Each image is centre-cropped as ADM does and encoded with its horizontal flip; a shard holds the posterior moments
of both. Resumable: a shard is written to a temporary name and renamed, so a shard file that exists is complete
and is skipped, and a leftover `*.tmp` of a shard being written (older runs used that fixed name) is removed.
meta.json is written first and must agree with the arguments of a run that continues the folder. The ranks need
no process group: their shards are disjoint.
"""

import argparse
import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save
from tqdm import tqdm

from promoe.data.images import IMAGE_SUFFIXES, load_images, scan_class_folders
from promoe.data.latents import FORMAT, shard_path
from promoe.data.vae import load_vae, vae_downsampling
from promoe.errors import Refusal, written_atomically

DTYPES = {"float32": torch.float32, "float16": torch.float16}
MUST_AGREE = ("format", "image_size", "shard_size", "dtype", "num_images", "files_sha256", "class_names",
              "latent_channels", "scaling_factor")


def write_atomically(path: Path, data: bytes) -> None:
    """`data` to a temporary name, flushed to disk, then renamed over `path`: a reader sees all of it or nothing."""
    path.with_name(path.name + ".tmp").unlink(missing_ok=True)  # a killed run's, from when the name was fixed
    with written_atomically(path) as tmp, open(tmp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def write_shard(path: Path, moments: torch.Tensor, labels: torch.Tensor, files: list[str], first_index: int,
                image_size: int) -> None:
    """One shard file of the layout in promoe.data.latents, written atomically."""
    metadata = {"format": FORMAT, "first_index": str(first_index), "image_size": str(image_size),
                "files": json.dumps(files)}
    tensors = {"moments": moments.contiguous(), "labels": labels.to(torch.int64).contiguous()}
    write_atomically(path, save(tensors, metadata=metadata))


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor) -> torch.Tensor:
    """Posterior moments [B, 2, 2C, h, w] of images [B, 3, S, S] (index 1 on dim 1: the horizontal flip)."""
    both = vae.encode(torch.cat([images, images.flip(-1)])).latent_dist.parameters  # [2B, 2C, h, w]
    return torch.stack(both.float().chunk(2), dim=1).cpu()


def encode_shard(vae, paths: list[Path], image_size: int, batch_size: int, device: torch.device, workers: int,
                 bar: tqdm) -> torch.Tensor:
    """Moments [n, 2, 2C, h, w] of the images at `paths`; the next batch is decoded while this one encodes."""
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    moments = []
    with ThreadPoolExecutor(1) as prefetch:
        pending = prefetch.submit(load_images, chunks[0], image_size, workers)
        for k in range(len(chunks)):
            images = pending.result()
            if k + 1 < len(chunks):
                pending = prefetch.submit(load_images, chunks[k + 1], image_size, workers)
            moments.append(encode_moments(vae, images.to(device)))
            bar.update(len(images))
    return torch.cat(moments)


def check_or_write_meta(out: Path, meta: dict, rank: int) -> None:
    """Rank 0 writes meta.json when there is none; a meta.json that disagrees with this run is an error on every
    rank (shards of two different runs must not mix)."""
    path = out / "meta.json"
    if path.exists():
        old = json.loads(path.read_text())
        changed = [key for key in MUST_AGREE if old.get(key) != meta[key]]
        if changed:
            raise SystemExit(f"{path} was written by a run with other {', '.join(changed)}: use another --out or "
                             "delete that folder to start over")
    elif rank == 0:
        write_atomically(path, (json.dumps(meta, indent=1) + "\n").encode())


def preprocess(images: str | Path, out: str | Path, vae: str | Path, image_size: int = 256, batch_size: int = 32,
               shard_size: int = 1024, device: str | torch.device = "cpu", dtype: str = "float32", rank: int = 0,
               world_size: int = 1, workers: int = 8) -> list[Path]:
    """Encode this rank's missing shards of `images` into `out`; the paths of the shards it wrote."""
    images, out, device = Path(images), Path(out), torch.device(device)
    model = load_vae(vae, device)
    class_names, files, labels = scan_class_folders(images, IMAGE_SUFFIXES)
    num_shards = math.ceil(len(files) / shard_size)
    factor = vae_downsampling(model)
    meta = {
        "format": FORMAT, "image_size": image_size, "vae": str(Path(vae).resolve()),
        "scaling_factor": float(model.config.scaling_factor), "latent_channels": model.config.latent_channels,
        "latent_size": image_size // factor, "dtype": dtype, "num_images": len(files), "shard_size": shard_size,
        "num_shards": num_shards, "files_sha256": hashlib.sha256("\n".join(files).encode()).hexdigest(),
        "class_names": class_names,
        "layout": "shard_{i:05d}.safetensors: moments [n, 2, 2C, h, w] (dim 1: image, horizontal flip; channels: "
                  "mean, logvar), labels int64 [n]; metadata first_index, files",
    }
    out.mkdir(parents=True, exist_ok=True)
    check_or_write_meta(out, meta, rank)

    mine = [i for i in range(rank, num_shards, world_size) if not shard_path(out, i).exists()]
    todo = sum(min(shard_size, len(files) - i * shard_size) for i in mine)
    if rank == 0:
        print(f"{len(files)} images of {len(class_names)} classes in {images} -> {num_shards} shards in {out}; "
              f"{world_size} rank(s); rank 0 encodes {len(mine)} shards on {device}")
    written = []
    with tqdm(total=todo, disable=rank != 0, desc="encode", unit="img") as bar:
        for index in mine:
            first, last = index * shard_size, min((index + 1) * shard_size, len(files))
            moments = encode_shard(model, [images / f for f in files[first:last]], image_size, batch_size, device,
                                   workers, bar)
            write_shard(shard_path(out, index), moments.to(DTYPES[dtype]), labels[first:last], files[first:last],
                        first, image_size)
            written.append(shard_path(out, index))
    return written


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="ImageNet-layout folder: one sub-folder per class")
    parser.add_argument("--out", required=True, help="folder for meta.json and the shard_*.safetensors files")
    parser.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (nothing is downloaded)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="images per VAE call (each with its flip)")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard file")
    parser.add_argument("--device", default=None, help="default: this rank's GPU when there is one, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="storage type of the moments")
    parser.add_argument("--workers", type=int, default=8, help="threads decoding images")
    return parser.parse_args(argv)


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    try:
        return preprocess(args.images, args.out, args.vae, args.image_size, args.batch_size, args.shard_size,
                          device, args.dtype, rank, world_size, args.workers)
    except (FileNotFoundError, Refusal) as error:
        raise SystemExit(f"error: {error}") from error


if __name__ == "__main__":
    main()
