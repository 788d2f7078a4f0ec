"""Sampling CLI: images from a checkpoint, as PNG files, an evaluation `.npz` and a grid.

    python -m promoe.sample --ckpt runs/demo/checkpoints/step_0000600 --cfg-scale 1.0 1.5 --num-images 1000
    torchrun --nproc_per_node=8 -m promoe.sample --ckpt ckpt_step_500000.pth --model ProMoE-XL --vae sd-vae/ ...

--ckpt takes one of our checkpoint folders (EMA weights), an exported `ema.safetensors` (with the `config.json`
beside it), an official `ckpt_step_*.pth` (with --model), or a diffusers pipeline folder of promoe.hf (its own VAE
unless --vae names one); several checkpoints and guidance scales run in one call, each into
`OUT/<checkpoint>/cfg-<scale>/`.

Images are made in fixed batches of --batch-size; batch b holds images b*bs .. (b+1)*bs-1, its noise comes from a
generator seeded by (seed, b) and the labels of all images from one generator seeded by the seed, so the images do
not depend on how many processes share the work (process r takes the batches b = r mod world size). A batch whose
PNG files all exist is skipped, so an interrupted run continues where it stopped.
"""

import argparse
import json
import math
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from promoe.diffusion import GUIDANCE_MODES, OBJECTIVES, SCHEDULERS, RectifiedFlow, batches_guidance, make_scheduler
from promoe.distributed import init_distributed
from promoe.dit.model import compile_blocks
from promoe.errors import (
    Refusal,
    exits_with_message,
    one_line,
    parse_json,
    quoted,
    read_small_text,
    write_text_atomically,
    written_atomically,
)
from promoe.hf_folder import is_pipeline_folder
from promoe.limits import available_memory, check_sampling_steps, in_mib
from promoe.moe.layer import place_dispatch
from promoe.sampling import Decoder, generate, image_grid, is_latent_model, load_model, objective_of, save_png, to_uint8


def checkpoint_label(source: str | Path) -> str:
    """The output sub-folder of a checkpoint: a folder's name (step_0500000), else `<parent>-<stem>` (demo-ema)."""
    source = Path(source)
    return source.name if source.is_dir() else f"{source.resolve().parent.name}-{source.stem}"


def draw_labels(num: int, num_classes: int, given: list[int] | None, seed: int) -> torch.Tensor:
    """The label of every image: the given classes cycled, or drawn uniformly from a generator seeded by seed."""
    if given:
        bad = [label for label in given if not 0 <= label < num_classes]
        if bad:
            raise Refusal(f"--labels {bad} outside 0..{num_classes - 1}")
        return torch.tensor(given).repeat(-(-num // len(given)))[:num]
    return torch.randint(0, num_classes, (num,), generator=torch.Generator().manual_seed(seed))


def png_name(index: int, label: int) -> str:
    return f"{index:06d}_class{label:04d}.png"


def sample_into(folder: Path, model, objective, decoder: Decoder, labels: torch.Tensor, cfg_scale: float, args,
                rank: int, world_size: int) -> None:
    """This process's share of the batches of one (checkpoint, guidance scale), skipping finished batches."""
    folder.mkdir(parents=True, exist_ok=True)
    num_batches = -(-len(labels) // args.batch_size)
    mine = range(rank, num_batches, world_size)
    for batch in tqdm(mine, desc=f"{folder.parent.name} {folder.name}", disable=rank != 0, unit="batch"):
        indices = range(batch * args.batch_size, min(len(labels), (batch + 1) * args.batch_size))
        paths = [folder / png_name(i, int(labels[i])) for i in indices]
        if all(path.exists() for path in paths):
            continue
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + batch)
        images = generate(model, objective, labels[indices.start:indices.stop], generator, args.steps,
                          cfg_scale, args.guidance, args.scheduler)
        for image, path in zip(to_uint8(decoder(images)), paths):
            save_png(image, path)


def claim_folder(folder: Path, settings: dict, rank: int) -> None:
    """Refuses a folder that holds samples made with other settings (its images would be mixed with ours), then
    records ours in `sampling.json`, so that a rerun continues only the same job."""
    record = folder / "sampling.json"
    if record.exists():
        previous = read_settings(record)
        changed = sorted(key for key in settings.keys() | previous.keys() if settings.get(key) != previous.get(key))
        if changed:
            raise SystemExit(f"{folder} holds samples made with other settings ({', '.join(changed)}): give another "
                             "--out, or delete the folder")
    barrier()  # every rank has checked before rank 0 writes
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomically(record, json.dumps(settings, indent=2))
    barrier()


def read_settings(record: Path) -> dict:
    try:
        previous = parse_json(read_small_text(record, "the settings of a sampling job"))
    except ValueError as error:
        raise Refusal(f"{record} is unreadable ({one_line(str(error), 150)}): delete it, or give another --out"
                      ) from None
    if not isinstance(previous, dict):
        raise Refusal(f"{record} holds {quoted(previous)}, not the settings of a sampling job: delete it, or "
                      "give another --out")
    return previous


def read_sample(folder: Path, index: int, label: int) -> np.ndarray:
    """uint8 [H, W, C] of one written sample."""
    image = np.asarray(Image.open(folder / png_name(index, label)))
    return image[..., None] if image.ndim == 2 else image


def collect(folder: Path, labels: torch.Tensor, grid_columns: int) -> None:
    """The evaluation `.npz` (arr_0 uint8 NHWC images, arr_1 labels), written atomically one image at a time (the
    archive is never whole in memory), and a grid PNG."""
    first = read_sample(folder, 0, int(labels[0]))
    with written_atomically(folder / "samples.npz") as tmp:  # a full disk leaves no partial archive behind
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as archive:  # np.savez's layout: .npy files, uncompressed
            with archive.open("arr_0.npy", "w", force_zip64=True) as entry:
                header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
                          "shape": (len(labels), *first.shape)}
                np.lib.format.write_array_header_1_0(entry, header)
                for index, label in enumerate(labels.numpy()):
                    entry.write(np.ascontiguousarray(read_sample(folder, index, int(label))).tobytes())
            with archive.open("arr_1.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, labels.numpy())
    shown = min(len(labels), grid_columns * grid_columns)
    if shown:
        grid = np.stack([read_sample(folder, index, int(labels[index])) for index in range(shown)])
        save_png(image_grid(grid, grid_columns), folder / "grid.png")


def plan(folders: list[Path], num_images: int, image_shape: tuple[int, int, int]) -> None:
    """Refuse, before any work, a job that cannot finish: the PNGs still to write and the archives of `folders`
    (one per guidance scale) must fit on the disk, and the labels of all images in memory."""
    image_bytes = math.prod(image_shape)
    label_bytes = 8 * num_images  # int64, held whole by every process
    available = available_memory()
    if label_bytes > available // 2:
        raise Refusal(f"--num-images {num_images}: their labels alone take {in_mib(label_bytes)}, this machine "
                      f"has {in_mib(available)} free; sample fewer per call (another --seed and --out per part)")
    existing = next(parent for parent in (folders[0], *folders[0].parents) if parent.exists())
    block = os.statvfs(existing).f_frsize  # a file takes whole blocks of the disk
    # A PNG of noise-like samples can be as large as its pixels (plus its headers); the archive holds them raw.
    png_bytes = -(-(image_bytes + 100) // block) * block
    needed = sum((num_images - written_samples(folder)) * png_bytes + num_images * (image_bytes + 8)
                 for folder in folders)
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise Refusal(f"--num-images {num_images} of {'x'.join(map(str, image_shape))} pixels need about "
                      f"{in_mib(needed)} on the disk of {existing} (PNG files and samples.npz), {in_mib(free)} "
                      "are free: free space, give another --out, or sample fewer")


def written_samples(folder: Path) -> int:
    return sum(1 for _ in folder.glob("*_class*.png")) if folder.is_dir() else 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", nargs="+", required=True, help="checkpoint folders, ema.safetensors or .pth files, "
                        "diffusers pipeline folders")
    parser.add_argument("--model", help="model name, needed for an official .pth checkpoint")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema")
    parser.add_argument("--objective", choices=tuple(OBJECTIVES),
                        help="default: the one the checkpoint trained with (an official .pth needs it)")
    parser.add_argument("--cfg-scale", type=float, nargs="+", default=[1.0], help="guidance scales, >1 guides")
    parser.add_argument("--steps", type=int, default=250, help="steps of the sampler (Euler, respaced DDPM or the "
                        "--scheduler's)")
    parser.add_argument("--scheduler", choices=tuple(SCHEDULERS),
                        help="a diffusers scheduler instead of the paper's sampler (Euler for rf, ancestral DDPM): "
                        "dpm-solver++ or ddim for ddpm, flow-euler or flow-heun for rf")
    # Not `--num`: under torchrun, argparse would take it for an abbreviation of torchrun's --numa-binding.
    parser.add_argument("--num-images", type=int, default=64, help="images per checkpoint and guidance scale")
    parser.add_argument("--labels", type=int, nargs="*", help="classes to cycle through; default: drawn uniformly")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--guidance", choices=GUIDANCE_MODES, default="auto",
                        help="the conditional and null halves in one batch or in two passes; auto: two passes for "
                        "models whose routing couples the samples of a batch (DiffMoE), one batch for the others")
    parser.add_argument("--compile", action="store_true", help="torch.compile each DiT block: a compile time first, "
                        "then faster batches of the same images (up to the last bits, so not a setting of the folder)")
    parser.add_argument("--vae", help="local AutoencoderKL folder, for latent models")
    parser.add_argument("--out", type=Path, default=Path("samples"))
    parser.add_argument("--grid", type=int, default=8, help="the grid PNG shows grid x grid images")
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Refuses, with argparse's usage message, settings that would write images nobody should evaluate."""
    for scale in args.cfg_scale:
        # nan or inf give black images; a scale below 1 moves samples away from their class, towards the
        # unconditional model (1 is no guidance).
        if not 1 <= scale < math.inf:
            parser.error(f"--cfg-scale {scale}: a guidance scale is a finite number >= 1 (1: no guidance)")
    for name in ("steps", "num_images", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        check_sampling_steps(args.steps, "--steps")
    except Refusal as error:
        parser.error(str(error))
    if args.grid < 0:
        parser.error(f"--grid must be >= 0, got {args.grid}")
    if not 0 <= args.seed < 2**32:  # generators are seeded by seed * 1_000_003 + batch, below 2**63
        parser.error(f"--seed must lie in 0 .. 2**32 - 1, got {args.seed}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file: give a folder")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@exits_with_message
def main(argv=None) -> None:
    args = parse_args(argv)
    labels_of = {checkpoint_label(source): source for source in args.ckpt}
    if len(labels_of) < len(args.ckpt):
        raise SystemExit("two --ckpt entries would write to the same folder: sample them with different --out")
    rank, world_size, device = init_distributed(group_of_one=False)  # a group only under torchrun, for the barriers
    finished = []
    for label, source in labels_of.items():
        model, config = load_model(source, args.model, args.weights)
        model = model.to(device)
        place_dispatch(model, device)
        if args.compile:
            compile_blocks(model)
        objective = objective_of(config, args.objective)
        if args.scheduler is not None:
            make_scheduler(args.scheduler, objective, args.steps)  # refuses one that does not fit, before output
        sampler = args.scheduler or ("euler" if isinstance(objective, RectifiedFlow) else "ddpm")
        guidance = "batched" if batches_guidance(model, args.guidance) else "two-pass"
        vae = args.vae or (config.data.vae if is_pipeline_folder(source) else None)  # a pipeline's own VAE
        decoder = Decoder(vae, is_latent_model(config), device)
        folders = [args.out / label / f"cfg-{scale:g}" for scale in args.cfg_scale]
        plan(folders, args.num_images, decoder.image_shape(model))
        labels = draw_labels(args.num_images, model.num_classes, args.labels, args.seed)
        for scale, folder in zip(args.cfg_scale, folders):
            settings = {"checkpoint": str(Path(source).resolve()), "weights": args.weights, "cfg_scale": scale,
                        "objective": args.objective or config.train.objective, "steps": args.steps,
                        "sampler": sampler, "guidance": guidance,
                        "seed": args.seed, "num_images": args.num_images, "vae": vae,
                        "batch_size": args.batch_size, "labels": args.labels}
            claim_folder(folder, settings, rank)
            sample_into(folder, model, objective, decoder, labels, scale, args, rank, world_size)
            finished.append((folder, labels))
    barrier()  # every PNG is written; rank 0 gathers them while the others leave
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank == 0:
        for folder, labels in finished:
            collect(folder, labels, args.grid)
            print(f"wrote {len(labels)} images, samples.npz and grid.png to {folder}")



if __name__ == "__main__":
    main()
