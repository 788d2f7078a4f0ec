"""Throughput of a whole training step (forward, backward, AdamW) of a zoo model, per dispatch backend, against
`loop` dispatch and the dense DiT of equal activated size.

    python bench/train_step.py --model ProMoE-S --batch 8 --json bench/results/train_step_S.json

Medians over --reps steps after warm-up, candidates interleaved; images/s, and peak memory on CUDA (one figure
for the whole run: the candidates share the process). The time against the dense DiT is also taken round by round
(each candidate's step over the dense step of the same round, which saw the same load on a shared machine): the
median of those ratios and their spread (lowest and highest, and the middle half).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

import promoe  # noqa: E402
from promoe.diffusion import RectifiedFlow  # noqa: E402


def dense_name(model_name: str) -> str:
    return "DiT-" + model_name.split("-")[-1] if model_name.split("-")[-1] in ("S", "B", "L", "XL") else "DiT-S"


def make_candidate(name, backend, overrides, batch, device, generator, autocast_dtype=None):
    torch.manual_seed(0)
    model = promoe.build_model(name, device=device, **overrides).train()  # initialised where it runs
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    config = model.config
    x0 = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=generator).to(device)
    labels = torch.randint(0, config.num_classes, (batch,), generator=generator).to(device)

    def step():
        with promoe.dispatch_backend(model, backend), torch.autocast(device.type, dtype=autocast_dtype,
                                                               enabled=autocast_dtype is not None):
            loss, _ = RectifiedFlow().loss(model, x0, labels, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def ratio_spread(ratios: list[float]) -> dict:
    """Median, lowest, highest and quartiles of sorted per-round ratios (the quartiles by the nearest rank)."""
    def quartile(q: float) -> float:
        return ratios[min(len(ratios) - 1, int(q * len(ratios)))]

    return dict(round_ratio_median=quartile(0.5), round_ratio_min=ratios[0], round_ratio_q1=quartile(0.25),
                round_ratio_q3=quartile(0.75), round_ratio_max=ratios[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ProMoE-S")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--backend", nargs="+", default=["loop", "torch"])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: the forward under bf16 autocast (fp32 weights and optimizer), as the driver")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--overrides", nargs="*", default=[], help="config overrides key=value, e.g. input_size=16")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overrides = dict(report.parse_override(item) for item in args.overrides)
    generator = torch.Generator().manual_seed(0)
    autocast_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    candidates = {backend: make_candidate(args.model, backend, overrides, args.batch, device, generator, autocast_dtype)
                  for backend in args.backend}
    dense = dense_name(args.model)
    candidates[dense] = make_candidate(dense, "torch", overrides, args.batch, device, generator, autocast_dtype)

    times = {name: [] for name in candidates}
    for rep in range(args.warmup + args.reps):
        for name, step in candidates.items():  # interleaved
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - start)
    median = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
    round_ratios = {name: sorted(t / d for t, d in zip(v, times[dense])) for name, v in times.items()}
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    results = [dict(backend=name, mode="train step", images_per_s=args.batch / median[name],
                    speedup_vs_loop=median["loop"] / median[name] if "loop" in median else None,
                    time_vs_dense=median[name] / median[dense], **ratio_spread(round_ratios[name]))
               for name in candidates]
    run = report.run_record(dict(bench="train_step", model=args.model, batch=args.batch, dtype=args.dtype,
                                 reps=args.reps, device=str(device), overrides=overrides,
                                 peak_memory_bytes=peak), results)
    report.emit(run, args.json, title=f"{args.model} training step, batch {args.batch}, {args.dtype} (images/s)")


if __name__ == "__main__":
    main()
