"""The training driver: one process (`python train/run.py --config FILE`) or several
(`torchrun --nproc_per_node=N train/run.py --config FILE`), FSDP2, EMA, verified resumable checkpoints.

Pipeline: config -> the run folder (locked) -> data -> model built on `meta` -> parallelised (activation
checkpointing, torch.compile per block, fully_shard per block, then the root, where it does work: on several ranks
or in bf16) -> materialised and initialised alike on every rank -> restored from the newest intact checkpoint ->
trained -> EMA export, plots, sample grid, Fashion-MNIST FID.

Every random draw of a step (the sample order, label dropout, timesteps, noise) is made for the global batch from
a generator seeded by (seed, step), and each rank takes its slice: a resumed run, or a run on another number of
ranks, sees the same samples, labels and noise at every step. SIGTERM or Ctrl-C ends the run after the current
step with a checkpoint; running the same command again resumes it.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from promoe.diffusion import make_objective
from promoe.distributed import init_distributed
from promoe.errors import Refusal, error_message, said_in_one_line
from promoe.moe.layer import describe_dispatch, place_dispatch
from promoe.moe.record import merge_records, record_routing
from promoe.train_config import RunConfig, load_config
from promoe.training.batches import data_identity, global_batch_indices, load_dataset
from promoe.training.checkpoints import Checkpoints, export_ema
from promoe.training.ema import EMA
from promoe.training.end_of_run import finish
from promoe.training.expert_parallel import clip_gradients, sum_bank_gradients_in_backward, sync_expert_gradients
from promoe.training.folder import lock_folder, move_aside, previous_run, remove_leftovers
from promoe.training.metrics import MetricsLog, reduce_logged
from promoe.training.optimizer import apply_config, make_optimizer
from promoe.training.parallel import (
    build_on_meta,
    compile_counts,
    compute_dtype,
    parallelise,
    running_buffers,
    set_gradient_sync,
)
from promoe.training.ranks import AllRanksStop, average_over_ranks, full, said_once, stop_if_any
from promoe.training.resume import check_resumable
from promoe.training.stop import StopRequest
from promoe.zoo import check_memory, count_params


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="YAML run config")
    parser.add_argument("--max-steps", type=int, default=None, help="shortcut for train.steps=N")
    parser.add_argument("--out", default=None, help="shortcut for train.out=DIR")
    parser.add_argument("--ckpt-every", type=int, default=None, help="shortcut for train.ckpt_every=N")
    fresh = parser.add_mutually_exclusive_group()
    fresh.add_argument("--no-resume", action="store_true",
                       help="start afresh; refused when DIR holds another run (its checkpoints or EMA export)")
    fresh.add_argument("--restart", action="store_true",
                       help="start afresh, first moving the run that DIR holds into DIR/old-<time>/")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    shortcuts = {"train.steps": args.max_steps, "train.out": args.out, "train.ckpt_every": args.ckpt_every}
    args.overrides += [f"{key}={value}" for key, value in shortcuts.items() if value is not None]
    return args



def main(argv=None) -> int:
    args = parse_args(argv)
    with said_in_one_line():  # a PROMOE_COLLECTIVE_TIMEOUT that is no number of seconds
        rank, world_size, device = init_distributed()
    try:
        with said_once(), said_in_one_line():
            config = configure(args, world_size)
            out = Path(config.train.out)
            lock = claim_folder(out, args)  # noqa: F841 (held open: the lock lasts as long as the run)
            dataset = load_dataset(config, device)
            model = build_on_meta(config)
            activated, total = count_params(model)
            parallelise(model, config, device)
            place_dispatch(model, device)
            optimizer = make_optimizer(model, config.optim)
            ema = EMA(model, config.train.ema_decay, config.train.ema_warmup)
            checkpoints = Checkpoints(out, config.train.keep_checkpoints)
            start, resumed = restore(checkpoints, model, optimizer, ema, config, dataset, fresh=args.no_resume
                                     or args.restart)
            if rank == 0:
                print(f"world size {world_size}, global batch {config.train.global_batch} "
                      f"({config.train.global_batch // world_size} per rank), data {dataset.name} ({len(dataset)} "
                      f"images), model {config.model.name} {activated / 1e6:.2f}M activated / {total / 1e6:.2f}M "
                      f"total, {compute_dtype(config, device)}, dispatch {describe_dispatch(model)}"
                      f"{', torch.compile per block' if config.train.compile else ''}{parallelism(config)}")
            stopped = train(model, optimizer, ema, dataset, checkpoints, config, start, resumed, device)
            if stopped is not None:
                return stopped
            export_ema(model, ema, config, out, rank)
            if rank == 0:
                finish(out, config, dataset.name, device)
            # The ranks tear down together: once, in CI, a rank that left while rank 0 was still finishing
            # aborted in gloo's teardown ("terminate called without an active exception").
            dist.barrier()
            return 0
    finally:
        dist.destroy_process_group()


def parallelism(config: RunConfig) -> str:
    """What the first line says of micro-batches and expert parallelism, where they are used."""
    train = config.train
    said = [f"micro-batch {train.micro_batch}"] if train.micro_batch else []
    said += [f"expert parallel {train.expert_parallel}"] if train.expert_parallel > 1 else []
    return "".join(f", {part}" for part in said)


def configure(args, world_size: int) -> RunConfig:
    """The run's config from the YAML file and the overrides, checked; an error is a message, not a traceback."""
    try:
        config = load_config(args.config, args.overrides)
        config.validate(world_size, str(args.config or "defaults"))
        check_memory(config.model_config(), "model")
    except (Refusal, OSError) as error:
        raise AllRanksStop(f"config: {error_message(error)}") from None
    return config


def claim_folder(out: Path, args):
    """Lock the run folder, remove what killed writes left, and for a fresh start make sure no other run is in
    the way (`--restart` moves it aside, `--no-resume` refuses). Returns the open lock file."""
    lock = lock_folder(out)
    refusal = None
    if dist.get_rank() == 0:
        remove_leftovers(out)
        held = previous_run(out)
        if held and args.restart:
            print(f"moved the previous run ({', '.join(held)}) aside to {move_aside(out)}")
        elif held and args.no_resume:
            refusal = (f"{out} holds another run ({', '.join(held)}), which a fresh start would destroy: resume it "
                       f"(leave out --no-resume), give another --out, or pass --restart to move it aside to "
                       f"{out}/old-<time>/")
    stop_if_any(refusal)
    return lock


def restore(checkpoints: Checkpoints, model, optimizer, ema: EMA, config: RunConfig, dataset, fresh: bool
            ) -> tuple[int, Path | None]:
    """(the step to start at, the checkpoint resumed from): the newest intact checkpoint, unless `fresh`."""
    if fresh:
        return 0, None
    folder = checkpoints.newest_intact()
    if folder is None:
        held = previous_run(checkpoints.root.parent) if dist.get_rank() == 0 else []
        stop_if_any(f"{checkpoints.root.parent} holds a run ({', '.join(held)}) but no intact checkpoint to resume "
                    "from: pass --restart to move it aside and start afresh" if held else None)
        return 0, None
    changes = check_resumable(folder, config, data_identity(dataset))
    start = checkpoints.load(folder, model, optimizer, ema)["step"]
    if dist.get_rank() == 0:
        print(f"resumed from {folder} at step {start}")
        for change in changes:
            print(f"  changed since the checkpoint, applied from here on: {change}")
    return start, folder


def train(model, optimizer, ema: EMA, dataset, checkpoints: Checkpoints, config: RunConfig, start: int,
          last_saved: Path | None, device: torch.device) -> int | None:
    """Steps `start` .. train.steps, a checkpoint every ckpt_every steps and at the end. A non-finite loss or
    gradient norm stops the run before anything is saved; a signal stops it after the checkpoint of its step
    (the exit status is returned)."""
    rank, train_config = dist.get_rank(), config.train
    objective = make_objective(train_config.objective)
    stats, data = running_buffers(model), data_identity(dataset)
    metrics = MetricsLog(checkpoints.root.parent, start) if rank == 0 else None
    stop = StopRequest()
    bar = tqdm(range(start, train_config.steps), initial=start, total=train_config.steps, disable=rank != 0,
               desc="train")
    tic = time.perf_counter()
    try:
        for step in bar:
            row, grad_norm = train_step(model, optimizer, ema, objective, dataset, stats, config, step, device)
            done = step + 1  # steps completed: the number in metrics.csv and in checkpoint names
            if train_config.compile and done == start + 1 and rank == 0:  # its forward, recomputation and backward
                bar.write(f"torch.compile, step {done}: {compile_counts()}")
            if not (math.isfinite(row["loss"]) and math.isfinite(row["loss_max"]) and math.isfinite(grad_norm)):
                raise AllRanksStop(divergence_message(row, grad_norm, done, last_saved))
            if done % train_config.log_every == 0 or done == train_config.steps:
                elapsed = time.perf_counter() - tic
                failure = None if rank != 0 else append_metrics(metrics, {
                    "step": done, **row, "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                    "elapsed_s": elapsed})
                stop_if_any(failure)  # every rank stops together, checkpoints intact
                bar.set_postfix(loss=f"{row['loss']:.4f}", steps_s=f"{(done - start) / elapsed:.2f}",
                                img_s=f"{(done - start) * train_config.global_batch / elapsed:.1f}")
            stopping = stop.agreed()
            if done % train_config.ckpt_every == 0 or done == train_config.steps or stopping:
                last_saved = checkpoints.save(done, model, optimizer, ema, config, data)
            if stopping:
                if rank == 0:
                    print(f"\nstopped by a signal after step {done}: saved {last_saved}; run the same command to "
                          "resume", file=sys.stderr)
                return stop.exit_status()
    finally:
        stop.restore()
        if metrics is not None:
            metrics.close()
    return None


def train_step(model, optimizer, ema: EMA, objective, dataset, stats: list[torch.Tensor], config: RunConfig,
               step: int, device: torch.device) -> tuple[dict[str, float], float]:
    """One optimizer step on this rank's slice of the global batch of `step`, in micro-batches whose gradients add
    up before the one reduction over ranks, the routers' running statistics averaged over ranks: (the logged
    scalars averaged over ranks, the gradient norm before clipping)."""
    rank, world_size, train_config = dist.get_rank(), dist.get_world_size(), config.train
    per_rank = train_config.global_batch // world_size
    generator = torch.Generator().manual_seed(train_config.seed * 1_000_003 + step)
    indices = global_batch_indices(len(dataset), train_config.global_batch, step, train_config.seed)
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    # Every draw is made for the global batch; only this rank's rows are loaded and kept.
    images, labels = dataset.batch(indices, generator, rows=mine)
    dropped = (torch.rand(len(indices), generator=generator) < model.config.class_dropout_prob)[mine]
    labels = torch.where(dropped, model.config.num_classes, labels)
    timesteps, noise = objective.draw((len(indices), *images.shape[1:]), generator)
    optimizer.zero_grad(set_to_none=True)
    loss, terms, routing = accumulate_gradients(model, objective, (images, labels, timesteps[mine], noise[mine]),
                                                train_config.micro_batch or per_rank, device)
    sync_expert_gradients(model)
    apply_config(optimizer, config.optim, step)
    grad_norm = clip_gradients(model, config.optim.grad_clip)
    optimizer.step()
    ema.update(model, step)
    average_over_ranks(stats, world_size)
    return reduce_logged(loss, terms, routing, world_size), full(grad_norm).item()


def accumulate_gradients(model, objective, batch: tuple[torch.Tensor, ...], micro: int, device: torch.device
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list]:
    """Forward and backward of this rank's batch (images, labels, timesteps, noise) in micro-batches of `micro`,
    their gradients added up and reduced over ranks once, in the last backward: (the mean loss, the mean of each
    term, the routing records of every micro-batch).

    A step is the mean of its micro-batches' losses, each micro-batch a forward of its own, as each rank's batch
    is: the terms computed from a batch's tokens (the RCL's centroids, the load-balance loss's expert fractions,
    expert choice's capacity, running statistics) are those of the micro-batch, as the official code takes them
    over each GPU's batch. The diffusion loss and its gradient are the one-shot step's; with those terms on, the
    step is not: 4 micro-batches of 8 train like 4 ranks of 8, not like one batch of 32."""
    parts = [slice(start, start + micro) for start in range(0, len(batch[0]), micro)]
    losses, terms, routing = [], [], []
    for index, part in enumerate(parts):
        set_gradient_sync(model, index == len(parts) - 1)
        sum_bank_gradients_in_backward(model, index == len(parts) - 1)
        images, labels, timesteps, noise = (tensor[part] for tensor in batch)
        with record_routing(model) as part_routing:  # closed before backward: a recomputed forward is not counted
            loss, part_terms = objective.loss(model, images.to(device), labels.to(device), draws=(timesteps, noise),
                                              drop_labels=False)
        # The step's loss is the mean of the micro-batches' (equal sizes: for the MSE, the whole batch's mean).
        (loss / len(parts)).backward()
        losses.append(loss.detach())
        terms.append({name: value.detach() for name, value in part_terms.items()})
        routing.append(part_routing)
    mean_terms = {name: torch.stack([part[name] for part in terms]).mean() for name in terms[0]}
    return torch.stack(losses).mean(), mean_terms, merge_records(routing)


def append_metrics(metrics: MetricsLog, row: dict) -> str | None:
    """Append the row to metrics.csv (rank 0); a failed write (a full disk) is the message that stops every rank."""
    try:
        metrics.append(row)
    except (OSError, Refusal) as error:  # a full disk; the file of a resumed run unreadable
        return f"error: writing metrics.csv at step {row['step']}: {error_message(error)}"
    return None


def divergence_message(row: dict, grad_norm: float, step: int, last_saved: Path | None) -> str:
    """What diverged at `step` and the checkpoint to go back to: the newest one saved before, since the run checks
    every step and so never saves after a non-finite value."""
    before = (f"the newest checkpoint saved before it is {last_saved}" if last_saved is not None else
              "no checkpoint was saved before it")
    return (f"training diverged at step {step} (loss {row['loss']}, worst rank's loss {row['loss_max']}, gradient "
            f"norm {grad_norm}); stopped without saving: {before}. Resume from it with a lower optim.lr, a longer "
            "optim.warmup_steps or a smaller optim.grad_clip (the config's settings apply on resume)")


if __name__ == "__main__":
    sys.exit(main())
