"""Bytes each rank sends per token and MoE layer in one training step: expert parallelism's token exchange beside
FSDP2's gathering of the expert banks, for ProMoE-XL at E = 14, 32 and 64 (the paper's expert strings E{E}A1S1U1).

    python bench/expert_parallel_bytes.py --json bench/results/expert_parallel_bytes_XL.json
    torchrun --nproc_per_node=4 bench/expert_parallel_bytes.py --measure   # the counts checked on a real run

Counted from the shapes, per rank, per MoE layer, per step, on w ranks of which ep share the experts (b = 2 bytes
per bf16 activation or gathered weight, 4 per fp32 gradient; P_r, P_u the parameters of the routed and the
unconditional experts of one layer; T tokens per rank; K routed slots per conditional token; p the label dropout,
whose tokens run only the unconditional expert):

    FSDP2, the bank sharded over all w ranks (the root's default: gathered again in backward):
        all-gather forward + backward 2 (w-1)/w P_b b, reduce-scatter of the gradient (w-1)/w P_b 4, where P_b is
        the bank with its rows padded to a multiple of w (13 experts on 8 ranks are gathered as 16)
    expert parallelism:
        tokens    each travelling slot goes out and its output comes back, forward and backward; a slot travels when
                  its expert sits on another rank of the group, (ep-1)/ep of them when the routing is even:
                  4 K (1 - p) (ep-1)/ep D b per token
        counts    ep x E/ep int64 per layer and direction, forward only (the split sizes)
        bank      a rank's rows (P_r/ep + P_u) sharded by FSDP2 over their r = w/ep replicas: all-gathers forward +
                  backward 2 (r-1)/r (P_r/ep + P_u) b, the gradient's reduce-scatter (r-1)/r (P_r/ep + P_u) 4;
                  the unconditional rows of the gradient's shard all-reduced over the group: 2 (ep-1)/ep P_u/r 4
                  (in sum the bytes of all-reducing the routed share over the replicas and the unconditional rows
                  over all ranks, as the banks cut by expert alone did: an all-reduce is a reduce-scatter and an
                  all-gather, where b = 2 and the weights are gathered twice)

The paper's strings leave 12, 30 and 62 routed experts; where ep does not divide them, the first E % ep ranks hold
one expert more (the bytes above are the group's average).

The bank's bytes are per step, so per token they fall as 1/T: with many tokens per rank FSDP2's gathering costs
less per token than the exchange, with few it costs more. `break_even_tokens` is the T below which expert
parallelism sends fewer bytes. Bytes are not time: the gathers are prefetched behind the previous block's compute,
the all-to-all sits on the critical path (and costs a host synchronisation per layer); expert parallelism also
frees the memory of the gathered bank, E/ep of it held instead of all of it.

`--measure` runs three steps of a small ProMoE (8 routed experts, top 2) under torchrun with and without expert
parallelism, tallying the bytes each collective sends; the difference of the gathers and reduce-scatters between
the two runs is the bank's FSDP2 traffic, set against the formula, and the all-to-all bytes against the formula
at the run's real routing (not an even one).

`--time` (under torchrun) times the driver's own step (`train_step` of train/run.py, fp32, the model built by its
`parallelise`) of ProMoE-S on the same ranks with and without expert parallelism, and with expert parallelism and
AdamW one tensor at a time (what the optimizer did before it had a fused group per kind of tensor), interleaved
(A, B, C, A, ...): the ratio of each to the step without expert parallelism, per round, and the collectives each
step calls through torch.distributed's functions (FSDP2's, promoe's; DTensor's reductions, through functional
collectives, are not seen), by name:

    torchrun --nproc_per_node=2 bench/expert_parallel_bytes.py --time --json bench/results/expert_parallel_step_S.json
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import report  # noqa: E402

from promoe.zoo import model_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

ACTIVATION_BYTES = WEIGHT_BYTES = 2  # bf16 activations and gathered weights
GRADIENT_BYTES = 4  # FSDP2 reduces in fp32 (promoe.training.parallel.shard)
COUNT_BYTES = 8


def expert_parameters(config) -> int:
    dim, hidden = config.hidden_size, config.expert_hidden
    return 2 * dim * hidden + hidden + dim


def bank_parameters(config) -> tuple[int, int]:
    """(routed, unconditional) expert parameters of one MoE layer."""
    spec = config.expert_spec
    return spec.routed * expert_parameters(config), spec.uncond * expert_parameters(config)


def fsdp_bank_bytes(config, world: int, regathered: bool = True, weight_bytes: int = WEIGHT_BYTES) -> float:
    """Per rank and step: the bank's all-gathers (forward, and backward where the block was resharded) and its
    gradient's reduce-scatter. FSDP2 pads the bank's rows to a multiple of the world size."""
    spec = config.expert_spec
    rows = -(-(spec.routed + spec.uncond) // world) * world
    share = (world - 1) / world * rows * expert_parameters(config)
    return share * (weight_bytes * (2 if regathered else 1) + GRADIENT_BYTES)


def expert_parallel_bytes(config, world: int, degree: int, dropout: float) -> tuple[float, float]:
    """Per rank: (bytes per token of the token exchange, bytes per step of the counts and the gradient sums)."""
    routed, uncond = bank_parameters(config)
    spec = config.expert_spec
    per_token = 4 * spec.activated * (1 - dropout) * (degree - 1) / degree * config.hidden_size * ACTIVATION_BYTES
    replicas = world // degree
    per_step = (spec.routed * COUNT_BYTES
                + (replicas - 1) / replicas * (routed / degree + uncond) * (2 * WEIGHT_BYTES + GRADIENT_BYTES)
                + 2 * (degree - 1) / degree * uncond / replicas * GRADIENT_BYTES)
    return per_token, per_step


def table(world: int, tokens: int, dropout: float) -> list[dict]:
    rows = []
    for experts in (14, 32, 64):
        config = model_config("ProMoE-XL", experts=f"E{experts}A1S1U1")
        routed, uncond = bank_parameters(config)
        fsdp = fsdp_bank_bytes(config, world)
        for degree in (degree for degree in (2, 4, 8) if degree <= world):
            per_token, per_step = expert_parallel_bytes(config, world, degree, dropout)
            ep_total = per_token + per_step / tokens
            rows.append(dict(E=experts, routed=config.expert_spec.routed, ep=degree, world=world,
                             bank_MB_bf16=round((routed + uncond) * WEIGHT_BYTES / 1e6, 1),
                             fsdp_bank_B_per_token=round(fsdp / tokens),
                             ep_B_per_token=round(ep_total),
                             fsdp_over_ep=round(fsdp / tokens / ep_total, 2),
                             break_even_tokens=round((fsdp - per_step) / per_token)))
    return rows


MEASURED_MODEL = ["model.overrides.hidden_size=64", "model.overrides.num_heads=4", "model.overrides.depth=2",
                  "model.overrides.experts=E10A2S1U1", "model.overrides.rcl_weight=0", "train.global_batch=32",
                  "train.grid_steps=0", "train.fid_samples=0", "train.log_every=1"]


GATHERS = ("all_gather_into_tensor", "all_gather_single")  # FSDP2's, by torch version
SCATTERS = ("reduce_scatter_tensor", "reduce_scatter_single")


def sent_bytes(collective: str, args: tuple, kwargs: dict) -> float:
    """The bytes this rank sends in one call, as the ring algorithms behind the formula send them."""
    import torch.distributed as dist

    group = kwargs.get("group")
    size = dist.get_world_size(group)
    if collective == "all_reduce":
        tensor = kwargs.get("tensor", args[0] if args else None)
        return 2 * tensor.numel() * tensor.element_size() * (size - 1) / size
    tensor = kwargs.get("input", kwargs.get("input_tensor", args[1] if len(args) > 1 else None))
    total = tensor.numel() * tensor.element_size()
    if collective in GATHERS:
        return total * (size - 1)
    if collective in SCATTERS:
        return total * (size - 1) / size
    splits = kwargs.get("input_split_sizes", args[3] if len(args) > 3 else None)  # all_to_all_single
    own = splits[dist.get_rank(group)] if splits else tensor.shape[0] // size
    return total - own * (total // max(tensor.shape[0], 1))


def measure(dropout: float) -> None:
    """Three steps with and without expert parallelism under torchrun; each collective's bytes, training steps
    only (not the checkpoint or the export), against the formula."""
    import collections
    import functools
    import tempfile

    import torch.distributed as dist

    from promoe.train_config import load_config

    sys.path.insert(0, str(ROOT / "train"))
    import run as driver

    counting, tallies = [False], collections.Counter()

    def counted(collective, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if counting[0]:
                tallies[collective] += sent_bytes(collective, args, kwargs)
            return function(*args, **kwargs)
        return wrapper

    for collective in ("all_to_all_single", "all_reduce", *GATHERS, *SCATTERS):
        if hasattr(dist, collective):
            setattr(dist, collective, counted(collective, getattr(dist, collective)))
    step = driver.train_step

    def counted_step(*args, **kwargs):
        counting[0] = True
        try:
            return step(*args, **kwargs)
        finally:
            counting[0] = False

    driver.train_step = counted_step
    # Both runs in one process group: the driver's own set-up and tear-down are held back until both are done.
    rank, world, device = driver.init_distributed()
    driver.init_distributed = lambda: (rank, world, device)
    destroy, dist.destroy_process_group = dist.destroy_process_group, lambda: None
    steps, runs = 3, {}
    for degree in (1, world):
        tallies.clear()
        with tempfile.TemporaryDirectory() as out:
            driver.main(["--config", str(ROOT / "configs" / "demo.yaml"),
                         "--out", out, "--max-steps", str(steps), "--no-resume", *MEASURED_MODEL,
                         f"train.expert_parallel={degree}"])
        everyone = [None] * world
        dist.all_gather_object(everyone, dict(tallies))
        runs[degree] = {name: sum(tally.get(name, 0) for tally in everyone) / world for name in everyone[0]}
    destroy()
    if rank != 0:
        return
    config = load_config(ROOT / "configs" / "demo.yaml", MEASURED_MODEL).model_config()
    # ProMoE interleaves: the one MoE layer of 2 blocks is the last block, which FSDP2 does not regather.
    layers, tokens = config.depth // 2, 32 // world * (config.input_size // config.patch_size) ** 2
    plain, spread = runs[1], runs[world]
    print(f"bytes sent per rank in {steps} steps, averaged over the {world} ranks:\n  without expert parallelism "
          f"{plain}\n  with {spread}")
    gathered = sum(plain.get(name, 0) - spread.get(name, 0) for name in GATHERS + SCATTERS) / steps / layers
    formula = fsdp_bank_bytes(config, world, regathered=False, weight_bytes=4)  # fp32 weights on the CPU
    print(f"FSDP2's traffic for one bank per step (all-gathers and reduce-scatters without expert parallelism, less "
          f"those with it): measured {gathered:.0f} B, formula {formula:.0f} B")
    summed = (spread.get("all_reduce", 0) - plain.get("all_reduce", 0)) / steps / layers
    per_token, per_step = expert_parallel_bytes(config, world, world, dropout)
    ep_step = per_step - config.expert_spec.routed * COUNT_BYTES
    print(f"expert parallelism's gradient sums for one bank per step: measured {summed:.0f} B, formula {ep_step:.0f} B")
    exchanged = spread.get("all_to_all_single", 0) / steps / layers / tokens
    even = per_token * 2  # fp32 activations on the CPU
    print(f"token exchange per token and layer: measured {exchanged:.0f} B (this run's routing, counts included), "
          f"formula at an even routing {even:.0f} B")


COLLECTIVES = ("all_to_all_single", "all_reduce", "all_gather", "broadcast", *GATHERS, *SCATTERS)


def counting_collectives(tallies) -> None:
    """Every collective of torch.distributed counted by name into `tallies` while `tallies["on"]` (FSDP2 and
    promoe call them through the module, so replacing its functions sees them all)."""
    import functools

    import torch.distributed as dist

    def counted(collective, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if tallies["on"]:
                tallies[collective] += 1
            return function(*args, **kwargs)
        return wrapper

    for collective in COLLECTIVES:
        if hasattr(dist, collective):
            setattr(dist, collective, counted(collective, getattr(dist, collective)))


def training_setup(degree: int, batch: int, per_tensor_adam: bool = False, config_name: str = "promoe_s.yaml",
                   overrides: tuple[str, ...] = (), latent_size: int = 32):
    """train/run.py's train_step at expert-parallel `degree`, built as its main() builds it, as a closure over an
    in-memory batch of latents (4 x latent_size^2: 256 tokens per image at 32), with what it trains:
    (step, model, optimizer, ema, config)."""
    import itertools

    import torch
    from official_step import Latents

    from promoe.diffusion import make_objective
    from promoe.moe.layer import place_dispatch
    from promoe.train_config import load_config
    from promoe.training.ema import EMA
    from promoe.training.optimizer import make_optimizer
    from promoe.training.parallel import build_on_meta, parallelise, running_buffers

    sys.path.insert(0, str(ROOT / "train"))
    import run as driver

    config = load_config(ROOT / "configs" / config_name, [f"train.global_batch={batch}", "train.precision=fp32",
                                                          "train.seed=0", f"train.expert_parallel={degree}",
                                                          *overrides])
    device = torch.device("cpu")
    model = build_on_meta(config)
    parallelise(model, config, device)
    place_dispatch(model, device)
    optim = config.optim
    optimizer = (torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=optim.betas,
                                   weight_decay=optim.weight_decay, foreach=False, fused=False)
                 if per_tensor_adam else make_optimizer(model, optim))
    ema = EMA(model, config.train.ema_decay, config.train.ema_warmup)
    generator = torch.Generator().manual_seed(0)
    dataset = Latents(torch.randn(batch, 4, latent_size, latent_size, generator=generator),
                      torch.randint(0, 1000, (batch,), generator=generator))
    objective, stats, steps = make_objective(config.train.objective), running_buffers(model), itertools.count()

    def step():
        driver.train_step(model, optimizer, ema, objective, dataset, stats, config, next(steps), device)

    return step, model, optimizer, ema, config


def time_steps(batch: int, warmup: int, rounds: int) -> list[dict]:
    """The --time table (see the module's docstring)."""
    import collections
    import statistics
    import time

    import torch.distributed as dist

    from promoe.distributed import init_distributed

    rank, world, _ = init_distributed()
    tallies = collections.Counter(on=0)
    counting_collectives(tallies)
    names = {"no expert parallelism": (1, False), f"ep {world}": (world, False),
             f"ep {world}, AdamW per tensor (before)": (world, True)}
    steps = {name: training_setup(degree, batch, per_tensor)[0] for name, (degree, per_tensor) in names.items()}
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    collectives = {}
    for index in range(warmup + rounds):
        for name, step in steps.items():
            dist.barrier()
            tallies.clear()
            tallies["on"] = 1
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            tallies["on"] = 0
            collectives[name] = {key: count for key, count in tallies.items() if key != "on"}
        if rank == 0:
            print(f"round {index + 1 - warmup}: " + ", ".join(f"{name} {wall[name][-1]:.2f} s" for name in steps),
                  file=sys.stderr, flush=True)
    dist.destroy_process_group()
    base = "no expert parallelism"
    rows = []
    for name in steps:
        ratios = [wall[name][i] / wall[base][i] for i in range(warmup, warmup + rounds)]
        cpu_ratios = [cpu[name][i] / cpu[base][i] for i in range(warmup, warmup + rounds)]
        rows.append(dict(candidate=name, ranks=world, step_s=statistics.median(wall[name][warmup:]),
                         ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                         cpu_ratio_median=statistics.median(cpu_ratios),
                         collectives_per_step=sum(collectives[name].values()),
                         by_name=" ".join(f"{key} {count}" for key, count in sorted(collectives[name].items()))))
    return rows if rank == 0 else []


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=8, help="ranks (the paper: 8 GPUs)")
    parser.add_argument("--tokens", type=int, default=32 * 256,
                        help="tokens per rank per step (the paper: 256 images of 256 tokens on 8 GPUs)")
    parser.add_argument("--dropout", type=float, default=0.1, help="label dropout (class_dropout_prob)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--measure", action="store_true", help="check the counts on a real run (under torchrun)")
    parser.add_argument("--time", action="store_true",
                        help="time the ProMoE-S step with and without expert parallelism (under torchrun)")
    parser.add_argument("--batch", type=int, default=8, help="--time: the global batch")
    parser.add_argument("--warmup", type=int, default=1, help="--time: untimed rounds")
    parser.add_argument("--rounds", type=int, default=5, help="--time: timed rounds")
    args = parser.parse_args(argv)
    if args.measure:
        measure(args.dropout)
        return
    if args.time:
        rows = time_steps(args.batch, args.warmup, args.rounds)
        if rows:
            report.emit(report.run_record(vars(args) | {"json": None}, rows), args.json,
                        f"ProMoE-S training step on {rows[0]['ranks']} ranks, global batch {args.batch}, fp32: "
                        "with expert parallelism against without (ratio per round, wall time)")
        return
    rows = table(args.world, args.tokens, args.dropout)
    report.emit(report.run_record(vars(args) | {"json": None}, rows),
                args.json, f"ProMoE-XL: bytes sent per rank, per token and MoE layer, {args.world} ranks, "
                f"{args.tokens} tokens per rank")


if __name__ == "__main__":
    main()
