"""What `train.compile` and `python -m promoe.sample --compile` cost or save on this machine: the driver's training
step (`train_step` of train/run.py on the model its `parallelise` builds: on one fp32 process, the plain model)
eager and with each block compiled (both with activation checkpointing under --activation-checkpointing); then
sampling throughput (Euler, guidance 1.5) eager and compiled.

    python bench/compile_step.py --model ProMoE-S --batch 8 --rounds 5 --json bench/results/compile_step_S.json

The first step (or sampling batch) of each candidate, which compiles, is timed on its own; then the candidates
alternate (A, B, A, B, ...) for --rounds rounds after one warm-up round. Ratios are of per-round times against the
eager candidate of the same round, so that a change of the machine's load between rounds cancels.
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "train"))
sys.path.insert(0, str(ROOT / "bench"))
import report  # noqa: E402
from official_step import driver_step, time_interleaved  # noqa: E402

from promoe.diffusion import RectifiedFlow  # noqa: E402
from promoe.distributed import init_distributed  # noqa: E402
from promoe.dit.model import compile_blocks  # noqa: E402
from promoe.sampling import generate  # noqa: E402
from promoe.train_config import load_config  # noqa: E402
from promoe.training.parallel import build_on_meta, parallelise  # noqa: E402
from promoe.zoo import build_from_config  # noqa: E402

DEVICE = torch.device("cpu")


def train_candidate(overrides: list[str], x0, labels, compiled: bool):
    """train/run.py's step on the model `parallelise` builds, each block compiled or not (train.compile)."""
    config = load_config(None, [*overrides, f"train.global_batch={len(x0)}", "train.precision=fp32",
                                f"train.compile={compiled}"])
    model = build_on_meta(config)
    parallelise(model, config, DEVICE)
    return driver_step(model, config, x0, labels, DEVICE), config


def sample_candidate(model, labels, steps: int, outputs: dict, name: str):
    """One batch of Euler samples at guidance 1.5 from `model`, its images kept in `outputs[name]`."""
    def step():
        outputs[name] = generate(model, RectifiedFlow(), labels, torch.Generator().manual_seed(0), steps, 1.5)

    return (step,)


def first_calls(candidates: dict) -> dict[str, float]:
    """Wall seconds of each candidate's first call: the compile, for a compiled one."""
    seconds = {}
    for name, (step, *_) in candidates.items():
        start = time.perf_counter()
        step()
        seconds[name] = time.perf_counter() - start
        print(f"{name}: first call {seconds[name]:.1f} s", file=sys.stderr, flush=True)
    return seconds


def ratios(times: dict[str, list[float]], baseline: str) -> dict[str, dict]:
    """Per-round time of each candidate over the baseline's of the same round: median, min, max."""
    out = {}
    for name, values in times.items():
        per_round = [value / base for value, base in zip(values, times[baseline])]
        out[name] = dict(median=statistics.median(per_round), min=min(per_round), max=max(per_round))
    return out


def rows(wall, cpu, first, baseline: str, unit: str, images: int) -> list[dict]:
    wall_ratio, cpu_ratio = ratios(wall, baseline), ratios(cpu, baseline)
    return [dict(backend=name, mode=unit, first_call_s=first[name], wall_s_median=statistics.median(wall[name]),
                 images_per_s=images / statistics.median(wall[name]),
                 wall_vs_eager=wall_ratio[name]["median"], wall_vs_eager_min=wall_ratio[name]["min"],
                 wall_vs_eager_max=wall_ratio[name]["max"], cpu_s_median=statistics.median(cpu[name]),
                 cpu_vs_eager=cpu_ratio[name]["median"], cpu_vs_eager_min=cpu_ratio[name]["min"],
                 cpu_vs_eager_max=cpu_ratio[name]["max"])
            for name in wall]


def bench_train(args, overrides, x0, labels) -> list[dict]:
    recompute = [f"train.activation_checkpointing={args.activation_checkpointing}"]
    candidates = {name: train_candidate([*overrides, *recompute], x0, labels, compiled)
                  for name, compiled in (("eager", False), ("compiled", True))}
    first = first_calls(candidates)
    wall, cpu = time_interleaved(candidates, 1, args.rounds)
    return rows(wall, cpu, first, "eager", "train step", len(x0))


def bench_sample(args, overrides, x0, labels) -> list[dict]:
    config = load_config(None, overrides)
    torch.manual_seed(0)
    eager = build_from_config(config.model_config()).eval()
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    outputs = {}
    candidates = {name: sample_candidate(model, labels, args.sample_steps, outputs, name)
                  for name, model in (("eager", eager), ("compiled", compiled))}
    first = first_calls(candidates)
    wall, cpu = time_interleaved(candidates, 1, args.rounds)
    difference = (outputs["compiled"] - outputs["eager"]).abs().max().item()
    print(f"sampling: largest difference compiled - eager {difference:.2e}", file=sys.stderr)
    results = rows(wall, cpu, first, "eager", f"sampling, {args.sample_steps} steps", len(labels))
    for row in results:
        row["max_abs_difference_vs_eager"] = difference
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ProMoE-S")
    parser.add_argument("--overrides", nargs="*", default=[], help="ModelConfig overrides key=value, e.g. depth=4")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--activation-checkpointing", action="store_true", help="train.activation_checkpointing")
    parser.add_argument("--skip", choices=("train", "sample"), default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    init_distributed()  # the driver's step all-reduces its logged scalars: a group of one process
    overrides = [f"model.name={args.model}", *(f"model.overrides.{item}" for item in args.overrides)]
    model_config = load_config(None, overrides).model_config()
    size, channels = model_config.input_size, model_config.in_channels
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch, channels, size, size, generator=generator)
    labels = torch.randint(0, model_config.num_classes, (args.batch,), generator=generator)
    results = []
    if args.skip != "train":
        results += bench_train(args, overrides, x0, labels)
    if args.skip != "sample":
        results += bench_sample(args, overrides, x0, labels)
    run = report.run_record(dict(bench="compile_step", model=args.model, overrides=args.overrides, batch=args.batch,
                                 rounds=args.rounds, dtype="fp32", threads=torch.get_num_threads(),
                                 activation_checkpointing=args.activation_checkpointing), results)
    shape = f" ({' '.join(args.overrides)})" if args.overrides else ""
    report.emit(run, args.json,
                f"{args.model}{shape}: train.compile and --compile, batch {args.batch}, fp32 (ratios to eager)")


if __name__ == "__main__":
    main()
