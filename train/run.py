"""The training driver: one process (`python train/run.py --config FILE`) or several
(`torchrun --nproc_per_node=N train/run.py --config FILE`), FSDP2, EMA, atomic resumable checkpoints.

Pipeline: config -> process group -> model (seeded alike on every rank) -> fully_shard per block, then the root
-> AdamW -> resume from the latest checkpoint -> train loop -> EMA export.

Every random draw of a step (the sample order, label dropout, timesteps, noise) is made for the global batch from
a generator seeded by (seed, step), and each rank takes its slice: a resumed run, or a run on another number of
ranks, sees the same samples, labels and noise at every step.
"""

import argparse
import csv
import functools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import promoe
from promoe.data import build_dataset
from promoe.diffusion import make_objective
from promoe.moe.record import record_routing
from promoe.plots import plot_expert_load, plot_losses
from promoe.train_config import OptimSection, RunConfig, load_config


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="YAML run config")
    parser.add_argument("--max-steps", type=int, default=None, help="shortcut for train.steps=N")
    parser.add_argument("--out", default=None, help="shortcut for train.out=DIR")
    parser.add_argument("--ckpt-every", type=int, default=None, help="shortcut for train.ckpt_every=N")
    parser.add_argument("--no-resume", action="store_true", help="start afresh even if DIR holds a checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    shortcuts = {"train.steps": args.max_steps, "train.out": args.out, "train.ckpt_every": args.ckpt_every}
    args.overrides += [f"{key}={value}" for key, value in shortcuts.items() if value is not None]
    return args


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); a single process becomes a group of one so that one code path serves both."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 20000))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])  # the device comes from the local rank, never the global one
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


class EMA:
    """fp32 exponential moving average of each rank's local parameter shards. With `warmup`, update n uses the
    decay min(decay, (1 + n) / (10 + n)), so that a short run's average is not dominated by its first weights."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = False):
        self.decay, self.warmup = decay, warmup
        self.params = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        weight = 1 - self.decay_at(step)
        for name, p in model.named_parameters():
            self.params[name].lerp_(p.detach().float(), weight)


def learning_rate(optim: OptimSection, step: int) -> float:
    """The configured learning rate of a step, linear warm-up included. Set on every step, so the config is the
    truth also for a resumed run (the optimizer state would otherwise restore the saved rate)."""
    return optim.lr * min(1.0, (step + 1) / optim.warmup_steps) if optim.warmup_steps > 0 else optim.lr


class Checkpoints:
    """One folder per saved step, written atomically (a temporary folder, then a rename), `latest` updated last."""

    def __init__(self, out: Path, keep: int):
        self.root = out / "checkpoints"
        self.keep = keep

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        return self.root / pointer.read_text().strip() if pointer.exists() else None

    def save(self, step: int, state: dict, config: RunConfig, rank: int) -> Path:
        final = self.root / f"step_{step:07d}"
        tmp = self.root / f"step_{step:07d}.tmp"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        dcp.save(state, checkpoint_id=str(tmp))
        if rank == 0:
            (tmp / "config.json").write_text(config.to_json())  # sampling rebuilds the model from it
            (tmp / "meta.json").write_text(json.dumps({"step": step}))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            pointer_tmp = self.root / "latest.tmp"
            pointer_tmp.write_text(final.name)
            pointer_tmp.replace(self.root / "latest")
            for old in sorted(self.root.glob("step_???????"))[: -self.keep]:
                shutil.rmtree(old)
        dist.barrier()
        return final


def check_resumable(folder: Path, config: RunConfig) -> None:
    saved = json.loads((folder / "config.json").read_text())
    if saved["model"] != json.loads(config.to_json())["model"]:
        raise SystemExit(f"checkpoint {folder} was trained with model {saved['model']}, the config asks for "
                         f"{json.loads(config.to_json())['model']}: resume with the same model or pass --no-resume")


def global_batch_indices(num_items: int, global_batch: int, step: int, seed: int) -> torch.Tensor:
    """The dataset indices of step `step`: a fresh permutation per epoch, so the position is a function of step."""
    per_epoch = num_items // global_batch
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[position * global_batch:(position + 1) * global_batch]


def compute_dtype(config: RunConfig, device: torch.device) -> torch.dtype:
    precision = config.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def running_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """Statistics that routers update in forward (k-means centroids, DiffMoE thresholds), averaged over ranks."""
    return [buffer for module in model.modules() if hasattr(module, "running_stats")
            for buffer in module.running_stats()]


def build_sharded_model(config: RunConfig, device: torch.device) -> torch.nn.Module:
    """Seeded alike on every rank -> activation checkpointing -> fully_shard per block -> root."""
    torch.manual_seed(config.train.seed)
    model = promoe.build_model(config.model.name, **config.model.overrides).to(device)
    if config.train.activation_checkpointing:
        if running_buffers(model):
            raise SystemExit(f"train.activation_checkpointing: the router of {config.model.name} updates running "
                             "statistics in forward, which a recomputation would update twice; turn it off")
        for block in model.blocks:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    # Parameters are stored in fp32 and gathered in the compute dtype; gradients are reduced in fp32. The root keeps
    # its inputs as they are: a bf16 timestep s * 1000 would move in steps of 4 above 512, unlike the sampler's.
    dtype = compute_dtype(config, device)
    for block in model.blocks:
        fully_shard(block, mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32))
    fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32,
                                                      cast_forward_inputs=False))
    return model.train()


def load_dataset(config: RunConfig, device: torch.device):
    data, model = config.data, promoe.model_config(config.model.name, **config.model.overrides)
    dataset = build_dataset(data.kind, data.folder, image_size=data.image_size, vae=data.vae, device=device)
    if len(dataset) < config.train.global_batch:
        raise SystemExit(f"data set {dataset.name} holds {len(dataset)} items, fewer than one global batch")
    expected = (model.in_channels, model.input_size, model.input_size)
    if tuple(dataset.sample_shape) != expected:
        raise SystemExit(f"data set {dataset.name} gives samples of shape {tuple(dataset.sample_shape)}, the model "
                         f"takes {expected} (model.overrides in_channels / input_size)")
    if dataset.num_classes != model.num_classes:
        raise SystemExit(f"data set {dataset.name} has {dataset.num_classes} classes, the model "
                         f"{model.num_classes} (model.overrides.num_classes)")
    return dataset


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world_size, device = init_distributed()
    config = load_config(args.config, args.overrides)
    config.validate(world_size, str(args.config or "defaults"))
    train, out = config.train, Path(config.train.out)

    model = build_sharded_model(config, device)
    # The fused AdamW (one pass over each tensor, CPU and CUDA) is 6x faster than the default on stacked experts.
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, betas=config.optim.betas,
                                  weight_decay=config.optim.weight_decay, fused=True)
    ema = EMA(model, train.ema_decay, train.ema_warmup)
    objective = make_objective(train.objective)
    dataset = load_dataset(config, device)
    checkpoints = Checkpoints(out, train.keep_checkpoints)

    start = 0
    latest = None if args.no_resume else checkpoints.latest()
    if latest is not None:
        check_resumable(latest, config)
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state, "ema": ema.params}
        dcp.load(state, checkpoint_id=str(latest))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = json.loads((latest / "meta.json").read_text())["step"]
        if rank == 0:
            print(f"resumed from {latest} at step {start}")

    activated, total = promoe.count_params(promoe.build_model(config.model.name, device="meta",
                                                               **config.model.overrides))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"world size {world_size}, global batch {train.global_batch} ({train.global_batch // world_size} per "
              f"rank), data {dataset.name} ({len(dataset)} images), model {config.model.name} "
              f"{activated / 1e6:.2f}M activated / {total / 1e6:.2f}M total, {compute_dtype(config, device)}, dispatch "
              f"{promoe.moe.dispatch.resolve_backend(None, device)}")

    per_rank = train.global_batch // world_size
    stats = running_buffers(model)
    metrics = MetricsLog(out) if rank == 0 else None
    bar = tqdm(range(start, train.steps), initial=start, total=train.steps, disable=rank != 0, desc="train")
    last_saved = latest
    tic = time.perf_counter()
    for step in bar:
        generator = torch.Generator().manual_seed(train.seed * 1_000_003 + step)
        indices = global_batch_indices(len(dataset), train.global_batch, step, train.seed)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        # Every draw is made for the global batch; only this rank's rows are loaded and kept.
        images, labels = dataset.batch(indices, generator, rows=mine)
        dropped = (torch.rand(len(indices), generator=generator) < model.config.class_dropout_prob)[mine]
        labels = torch.where(dropped, model.config.num_classes, labels)
        timesteps, noise = objective.draw((len(indices), *images.shape[1:]), generator)
        with record_routing(model) as routing:  # closed before backward: a recomputed forward is not counted
            loss, terms = objective.loss(model, images.to(device), labels.to(device),
                                         draws=(timesteps[mine], noise[mine]), drop_labels=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config.optim, step)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        ema.update(model, step)
        average_over_ranks(stats, world_size)

        row = reduce_logged(loss, terms, routing, world_size)
        if not math.isfinite(row["loss_max"]):
            raise SystemExit(f"loss is {row['loss_max']} at step {step}; last good checkpoint: {last_saved}")
        done = step + 1
        if rank == 0 and (done % train.log_every == 0 or done == train.steps):
            elapsed = time.perf_counter() - tic
            row = {"step": done, **row, "lr": optimizer.param_groups[0]["lr"], "grad_norm": full(grad_norm).item(),
                   "elapsed_s": elapsed}
            metrics.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", steps_s=f"{(done - start) / elapsed:.2f}",
                            img_s=f"{(done - start) * train.global_batch / elapsed:.1f}")
        if done % train.ckpt_every == 0 or done == train.steps:
            model_state, optim_state = get_state_dict(model, optimizer)
            last_saved = checkpoints.save(done, {"model": model_state, "optim": optim_state, "ema": ema.params},
                                          config, rank)

    export_ema(model, ema, config, out, rank)
    if rank == 0:
        metrics.close()
        finish(out, config, dataset.name, device)
    dist.destroy_process_group()


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def average_over_ranks(buffers: list[torch.Tensor], world_size: int) -> None:
    for buffer in buffers:
        if world_size > 1:
            dist.all_reduce(buffer)
            buffer /= world_size


def reduce_logged(loss: torch.Tensor, terms: dict, routing: list, world_size: int) -> dict[str, float]:
    """The step's scalars averaged over ranks in one all-reduce: loss, each term, and per MoE layer the share of
    slots each expert computed (`load_b{block}_e{expert}`); plus `loss_max`, the worst rank's loss."""
    loads = [torch.stack(layer.loads_E).sum(0).float() for layer in routing]
    shares = [load / load.sum().clamp(min=1) for load in loads]
    logged = torch.cat([torch.stack([loss.detach().float()] + [v.detach().float() for v in terms.values()]),
                        *shares])
    dist.all_reduce(logged)
    logged /= world_size
    worst = loss.detach().float().clone()
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    values = logged.tolist()
    names = ["loss", *terms] + [f"load_b{layer.block}_e{e}" for layer, share in zip(routing, shares)
                                for e in range(len(share))]
    logged = dict(zip(names, values))
    return {"loss": logged.pop("loss"), "loss_max": worst.item(), **logged}


class MetricsLog:
    """Rows of scalars into `metrics.csv` (and TensorBoard event files in `tensorboard/` when it is installed)."""

    def __init__(self, out: Path):
        self.path = out / "metrics.csv"
        self.header_checked = False
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            self.writer = None
        else:
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def append(self, row: dict) -> None:
        if not self.header_checked and self.path.exists():  # a resumed run appends to the file of its start
            with open(self.path, newline="") as file:
                header = next(csv.reader(file), [])
            if header != list(row):
                raise SystemExit(f"{self.path} has the columns {header}, this run logs {list(row)}: the run folder "
                                 "was written by another model or version; give another --out")
        self.header_checked = True
        with open(self.path, "a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(row))
            if file.tell() == 0:
                writer.writeheader()
            writer.writerow(row)
        if self.writer is not None:
            for name, value in row.items():
                if name != "step":
                    self.writer.add_scalar(name.replace("load_", "load/"), value, row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def finish(out: Path, config: RunConfig, dataset_name: str, device: torch.device) -> None:
    """Beside the checkpoints: the loss curves, the expert-load heat map, a class grid from the EMA weights and, on
    Fashion-MNIST, the Fashion-MNIST FID."""
    plot_losses(out / "metrics.csv", out / "loss.png")
    print(f"wrote {out / 'loss.png'}")
    if plot_expert_load(out / "metrics.csv", out / "expert_load.png"):
        print(f"wrote {out / 'expert_load.png'}")
    from promoe.sampling import Decoder, is_latent_model, load_model

    if is_latent_model(config) and config.data.vae is None:
        return  # latents and nothing to decode them with
    model, _ = load_model(out / "ema.safetensors")
    model, decoder = model.to(device), Decoder(config.data.vae, is_latent_model(config), device)
    objective = make_objective(config.train.objective)
    if config.train.grid_steps > 0:
        class_grid(model, objective, decoder, config, out / "samples.png")
    if config.train.fid_samples > 0 and dataset_name != "fashion-mnist":
        print(f"note: no Fashion-MNIST FID for a run on {dataset_name}")
    elif config.train.fid_samples > 0:
        fashion_fid(model, objective, config, out / "fid.json")


def class_grid(model, objective, decoder, config: RunConfig, path: Path, per_class: int = 8) -> None:
    """One row per class (the first ten), sampled with the run's grid settings."""
    from promoe.sampling import generate, image_grid, save_png, to_uint8

    classes = min(model.num_classes, 10)
    labels = torch.arange(classes).repeat_interleave(per_class)
    steps, scale = config.train.grid_steps, config.train.grid_cfg_scale
    images = generate(model, objective, labels, torch.Generator().manual_seed(0), steps, scale)
    save_png(image_grid(to_uint8(decoder(images)), per_class), path)
    print(f"wrote {path} ({classes} classes x {per_class}, {steps} steps, guidance {scale})")


def fashion_fid(model, objective, config: RunConfig, path: Path) -> None:
    """The Fashion-MNIST FID of `fid_samples` samples (equal per class) against the test split, in the features of
    the demo classifier; skipped with a note when that classifier has not been trained."""
    from promoe.data import pixel_split
    from promoe.eval import conditional_accuracy, load_feature_net, pixel_fid
    from promoe.sampling import generate_per_class, per_class_labels

    feature_net = Path(config.train.feature_net)
    if not feature_net.exists():
        print(f"note: no Fashion-MNIST FID: train its feature net first (python -m promoe.eval.train_feature_net "
              f"--out {feature_net}, about a minute)")
        return
    count, steps, scale = config.train.fid_samples, config.train.grid_steps, config.train.grid_cfg_scale
    samples = generate_per_class(model, objective, count, steps, scale)
    labels = per_class_labels(count, model.num_classes)
    reference, _, _ = pixel_split(config.data.folder, "test")
    net = load_feature_net(feature_net)
    fid, accuracy = pixel_fid(samples, reference, net), conditional_accuracy(samples, labels, net)
    path.write_text(json.dumps({"fashion_mnist_fid": fid, "conditional_accuracy": accuracy, "samples": count,
                                "steps": steps, "cfg_scale": scale}))
    print(f"Fashion-MNIST FID ({count} samples, {steps} Euler steps, guidance {scale}; the features of a small "
          f"Fashion-MNIST classifier, NOT comparable with ImageNet FID): {fid:.2f}")
    print(f"conditional accuracy: {accuracy:.1%} of the samples are classified by that classifier as the class "
          f"they were drawn for (chance {1 / model.num_classes:.0%})")


def export_ema(model: torch.nn.Module, ema: EMA, config: RunConfig, out: Path, rank: int) -> None:
    """The EMA weights, gathered from the shards, as one safetensors file with the run's config.json beside it
    (rank 0 writes them)."""
    from safetensors.torch import save_file

    live = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(ema.params[name].to(p.dtype))
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # On one CPU rank the gathered tensors can be the parameters themselves: copy before the live weights return.
    state = {name: value.clone() for name, value in state.items()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(live[name])
    if rank == 0:
        tmp = out / "ema.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        tmp.replace(out / "ema.safetensors")
        (out / "config.json").write_text(config.to_json())


if __name__ == "__main__":
    sys.exit(main())
