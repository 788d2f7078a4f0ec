"""The setup of a real expert-parallel run measured whole, on tiny runs of ProMoE-S or ProMoE-XL widths (the paper's
hidden size, expert width and experts; depth 2, one MoE layer; latents of 8 x 8, 16 tokens per image) on the ranks
of one torchrun, gloo on the CPU. One row per setting: without expert parallelism, then ep = 2 and 4 where they
divide the ranks.

    MALLOC_MMAP_THRESHOLD_=65536 torchrun --nproc_per_node=2 bench/expert_parallel_table.py --size S \\
        --json bench/results/expert_parallel_table_S_2.json

Columns:
- `graphs`, `break_places`, `recompiled`: what Dynamo compiled of the model with train.compile and activation
  checkpointing (the driver's `parallelise`, the tests' "aot_eager" backend: the same graphs and breaks as
  Inductor, minutes faster), over 3 steps from a reset: its graphs, the distinct reasons it broke a graph for,
  and the graphs step 3 added (0: nothing recompiles after the warm-up).
- `syncs_per_forward`, `forwards_per_layer`: host synchronisations inside one MoE layer's forward, seen by
  `promoe.counters.OpCounter` (which counts every read a GPU would wait for), and how often a step runs each
  MoE layer's forward: twice with activation checkpointing, whose recomputation makes the exchange's read again
  (the counter sees reads in backward too). A step's syncs per
  layer are their product.
- `collectives`: the torch.distributed calls of one step, by name (FSDP2's and promoe's; see
  expert_parallel_bytes.py's `counting_collectives`).
- `step_ratio`: the eager step's wall time over the step without expert parallelism's, median (min-max) of the
  rounds, the settings interleaved round by round.
- `bank_state_MB`: the bank state this rank holds between steps (weights, both AdamW moments, the EMA), largest
  over the ranks; `whole_bank_state_MB`: the same for whole banks.
- `save_peak_MB`, `load_peak_MB`: the growth of the resident memory of a rank while it writes and while it reads
  a checkpoint (`Checkpoints.save` / `.load`), largest over the ranks: the kernel's high-water mark of the process
  (VmHWM, reset through /proc/self/clear_refs before each) less its resident size just before. It counts every
  byte the save or load touches, banks or not. glibc must return freed blocks to the system for it to mean
  anything: the command line above sends every allocation of 64 KiB or more to mmap.
"""

import argparse
import collections
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import report  # noqa: E402
from expert_parallel_bytes import counting_collectives, training_setup  # noqa: E402

CONFIGS = {"S": "promoe_s.yaml", "XL": "promoe_xl.yaml"}
TINY = ("model.overrides.depth=2", "model.overrides.input_size=8", "train.activation_checkpointing=true")
LATENT_SIZE = 8
COMPILED_STEPS = 3


def resident_bytes(field: str) -> int:
    """VmRSS or VmHWM of this process, in bytes."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def peak_growth(function) -> int:
    """The bytes by which this process's resident memory rose at most while `function()` ran."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current VmRSS
    before = resident_bytes("VmRSS")
    function()
    return resident_bytes("VmHWM") - before


def bank_state_bytes(model, optimizer, ema) -> tuple[int, int]:
    """(bytes of the bank state this rank holds, bytes of the same state for whole banks). The banks are DTensors:
    FSDP2's shards of the whole bank, or with expert parallelism of this rank's rows (sharded over its replicas)."""
    from promoe.training.expert_parallel import expert_banks
    from promoe.training.ranks import local_part

    banks = expert_banks(model)
    held = whole = 0
    for name, param in model.named_parameters():
        if ".experts." not in name:
            continue
        tensors = [param, ema.params[name], *(value for value in optimizer.state[param].values()
                                              if value.dim() > 0)]
        held += sum(local_part(tensor).numel() * tensor.element_size() for tensor in tensors)
        mine = sum(tensor.numel() * tensor.element_size() for tensor in tensors)  # DTensors: their global shape
        whole += mine * banks[name][1].bank_size // param.shape[0] if name in banks else mine
    return held, whole


def largest(value: float) -> float:
    """The largest of every rank's `value`."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([float(value)])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def checkpoint_peaks(model, optimizer, ema, config) -> tuple[int, int]:
    """(peak growth while saving, while loading) a checkpoint of the trained state, on this rank."""
    import torch.distributed as dist

    from promoe.training.checkpoints import Checkpoints

    folder = [tempfile.mkdtemp(prefix="ep_table_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(folder)
    checkpoints = Checkpoints(Path(folder[0]), keep=1)
    saved = []
    save = peak_growth(lambda: saved.append(checkpoints.save(1, model, optimizer, ema, config, {"name": "bench"})))
    load = peak_growth(lambda: checkpoints.load(saved[0], model, optimizer, ema))
    dist.barrier()
    if dist.get_rank() == 0:
        import shutil

        shutil.rmtree(folder[0])
    return save, load


def compile_counts(degree: int, batch: int, config_name: str) -> dict:
    """Dynamo's graphs and breaks for the compiled model over COMPILED_STEPS steps from a reset."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import promoe.training.parallel as parallel

    torch._dynamo.reset()
    counters.clear()
    backend, parallel.COMPILE_BACKEND = parallel.COMPILE_BACKEND, "aot_eager"
    try:
        step = training_setup(degree, batch, config_name=config_name,
                              overrides=(*TINY, "train.compile=true"), latent_size=LATENT_SIZE)[0]
        graphs = []
        for _ in range(COMPILED_STEPS):
            step()
            graphs.append(counters["stats"]["unique_graphs"])
    finally:
        parallel.COMPILE_BACKEND = backend
    return dict(graphs=graphs[-1], break_places=len(counters["graph_break"]),
                recompiled=graphs[-1] - graphs[-2])


def host_syncs_in_moe_layers(step, model) -> tuple[int, int]:
    """(host synchronisations that `OpCounter` sees inside the MoE layers' forwards in one training step, the MoE
    layers' forward calls). The backward's exchange reuses the forward's split sizes (tests/test_no_host_sync.py).
    Activation checkpointing calls each forward again in backward (its forward hooks fire again): the
    recomputation's `.tolist()` counts as a sync of a forward of its own."""
    from promoe.counters import OpCounter
    from promoe.moe.layer import moe_layers

    counter = OpCounter()
    counter.paused = True  # counting only inside the layers
    forwards = []

    def inside(*_):
        forwards.append(1)
        counter.paused = False

    def outside(*_):
        counter.paused = True

    hooks = [hook for layer in moe_layers(model)
             for hook in (layer.register_forward_pre_hook(inside), layer.register_forward_hook(outside))]
    try:
        with counter:
            step()
    finally:
        for hook in hooks:
            hook.remove()
    return counter.host_syncs, len(forwards)


def checkpoint_row(size: str, world: int, degree: int, model, optimizer, ema, config) -> dict:
    """The bank state a rank holds and its peaks while saving and loading, largest over the ranks."""
    held, whole = bank_state_bytes(model, optimizer, ema)
    save, load = checkpoint_peaks(model, optimizer, ema, config)
    return dict(size=size, ranks=world, ep=degree if degree > 1 else "no",
                bank_state_MB=round(largest(held) / 1e6, 1), whole_bank_state_MB=round(whole / 1e6, 1),
                save_peak_MB=round(largest(save) / 1e6, 1), load_peak_MB=round(largest(load) / 1e6, 1))


def measure(size: str, rounds: int, checkpoints_only: bool) -> list[dict]:
    import torch.distributed as dist

    from promoe.distributed import init_distributed
    from promoe.moe.layer import moe_layers

    rank, world, _ = init_distributed()
    batch = 4 * world
    config_name = CONFIGS[size]
    degrees = [degree for degree in (1, 2, 4) if degree <= world and world % degree == 0]

    def setup(degree: int):
        return training_setup(degree, batch, config_name=config_name, overrides=TINY, latent_size=LATENT_SIZE)

    if checkpoints_only:  # one setting at a time: the XL widths on 4 ranks fill this machine's memory otherwise
        rows = []
        for degree in degrees:
            step, model, optimizer, ema, config = setup(degree)
            step()  # AdamW's moments exist from the first step
            rows.append(checkpoint_row(size, world, degree, model, optimizer, ema, config))
            del step, model, optimizer, ema
        dist.destroy_process_group()
        return rows if rank == 0 else []
    setups = {degree: setup(degree) for degree in degrees}
    tallies = collections.Counter(on=0)
    counting_collectives(tallies)
    wall, collectives = {degree: [] for degree in degrees}, {}
    for _ in range(rounds + 1):  # the first round warms up, untimed
        for degree, (step, *_) in setups.items():
            dist.barrier()
            tallies.clear()
            tallies["on"] = 1
            start = time.perf_counter()
            step()
            wall[degree].append(time.perf_counter() - start)
            tallies["on"] = 0
            collectives[degree] = {key: count for key, count in tallies.items() if key != "on"}
    rows = []
    for degree, (step, model, optimizer, ema, config) in setups.items():
        layers = len(moe_layers(model))
        syncs, forwards = host_syncs_in_moe_layers(step, model)
        checkpoint = checkpoint_row(size, world, degree, model, optimizer, ema, config)
        ratios = [mine / plain for mine, plain in zip(wall[degree][1:], wall[1][1:])]
        rows.append(dict(size=size, ranks=world, ep=checkpoint.pop("ep"),
                         syncs_per_forward=syncs / forwards, forwards_per_layer=forwards / layers,
                         collectives=sum(collectives[degree].values()),
                         by_name=" ".join(f"{key} {count}" for key, count in sorted(collectives[degree].items())),
                         step_s=statistics.median(wall[degree][1:]),
                         step_ratio=f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
                         **{key: value for key, value in checkpoint.items() if key not in ("size", "ranks")}))
    setups.clear()  # the compiled models are built one at a time, the eager ones freed
    del step, model, optimizer, ema
    for row, degree in zip(rows, degrees):
        row.update(compile_counts(degree, batch, config_name))
    dist.destroy_process_group()
    return rows if rank == 0 else []


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(CONFIGS), default="S", help="the widths of ProMoE-S or ProMoE-XL")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of the eager steps")
    parser.add_argument("--checkpoints-only", action="store_true",
                        help="only the bank state and the checkpoint peaks (to measure another commit's checkpoints)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        raise SystemExit("set MALLOC_MMAP_THRESHOLD_=65536 (see the docstring): without it, the peaks measure glibc's "
                         "free lists, not the checkpoint")
    rows = measure(args.size, args.rounds, args.checkpoints_only)
    if rows:
        report.emit(report.run_record(vars(args) | {"json": None}, rows),
                    args.json, f"ProMoE-{args.size} widths, depth 2, on {rows[0]['ranks']} ranks (gloo, CPU, fp32): "
                    "compile, syncs, collectives, step time and checkpoint memory per expert-parallel setting")


if __name__ == "__main__":
    main()
