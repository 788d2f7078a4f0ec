"""Throughput of one MoE layer of the paper's configs, per dispatch backend, against naive loop dispatch and the
dense-FLOP equivalent, with the counters that predict GPU speed.

    python bench/moe_layer.py --size B --tokens 2048 --dtype fp32 --json bench/results/moe_layer_B.json

Timings are medians over --reps runs after warm-up, the candidates interleaved within each repetition so that
machine noise hits all alike; ratios come from the same run. The `triton` backend is timed only on CUDA (on the
CPU it runs under Triton's interpreter, which is for correctness); its counters are measured everywhere.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run the kernels for the counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402  (bench/report.py: JSON, table and chart shared by the bench scripts)

import promoe  # noqa: E402
from promoe.counters import OpCounter, TritonLaunchCounter  # noqa: E402
from promoe.moe.dispatch import grouped_gemm_gmm  # noqa: E402
from promoe.moe.experts import gelu_tanh  # noqa: E402
from promoe.zoo import build_mlp  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(config, num_tokens, dtype, device, generator):
    tokens_per_image = min(num_tokens, (config.input_size // config.patch_size) ** 2)
    num_images = max(1, num_tokens // tokens_per_image)
    x = torch.randn(num_images, tokens_per_image, config.hidden_size, generator=generator).to(device, dtype)
    labels = torch.randint(0, config.num_classes, (num_images,), generator=generator)
    labels = torch.where(torch.rand(num_images, generator=generator) < 0.1, config.num_classes, labels)  # dropout
    return x.requires_grad_(), labels.to(device)


def moe_step(layer, backend, x, labels, backward):
    with promoe.dispatch_backend(layer, backend):
        out, aux = layer(x, labels)
        if backward:
            (out.float().square().mean() + sum(aux.values(), torch.zeros((), device=x.device))).backward()


def dense_step(layer, x, top_k, backward):
    """The same expert FLOPs as plain matmuls: N*K rows through one expert's weights, plus the shared expert."""
    bank = layer.experts
    x_ND = x.reshape(-1, x.shape[-1])
    rows = x_ND.repeat(top_k, 1)
    out = gelu_tanh(rows @ bank.w_up_EDH[0] + bank.b_up_EH[0]) @ bank.w_down_EHD[0] + bank.b_down_ED[0]
    out = out.view(top_k, *x_ND.shape).sum(0)
    if layer.shared is not None:
        out = out + layer.shared(x_ND)
    if backward:
        out.float().square().mean().backward()


def time_once(fn, device):
    """Seconds of one call: CUDA events on a GPU, the wall clock elsewhere."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def available_backends(dtype: str = "bf16") -> list[str]:
    backends = ["loop", "torch", "triton"]
    try:
        grouped_gemm_gmm()
        if dtype == "bf16":  # the grouped_gemm backend runs bf16 only
            backends.append("grouped_gemm")
    except ImportError:
        pass
    return backends


def counters(layer, backend, x, labels, backward):
    """Host syncs and launches; the layer's bytes are counted by bench/traffic.py (every op, not only kernels)."""
    with OpCounter(x.device) as ops, TritonLaunchCounter(ops) as triton_launches:
        moe_step(layer, backend, x, labels, backward)
    return dict(host_syncs=ops.host_syncs, launches=ops.launches + triton_launches.launches)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["S", "B", "L", "XL"], default="B")
    parser.add_argument("--model", default="ProMoE", help="model family of the zoo, e.g. ProMoE or TC-DiT")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--backend", nargs="+", default=None,
                        help="default: every backend available here (grouped_gemm when installed and bf16)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--overrides", nargs="*", default=[], help="config overrides key=value, e.g. hidden_size=64")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON here (a .md table and .png beside)")
    args = parser.parse_args(argv)
    args.backend = args.backend or available_backends(args.dtype)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    overrides = dict(report.parse_override(item) for item in args.overrides)
    name = f"{args.model}-{args.size}" + ("-E8" if args.model in ("TC-DiT", "EC-DiT", "DiffMoE") else "")
    config = promoe.model_config(name, **overrides)
    torch.manual_seed(0)
    layer = build_mlp(config, block_index=1).to(device, dtype).train()
    x, labels = make_inputs(config, args.tokens, dtype, device, torch.Generator().manual_seed(0))
    num_tokens = x.shape[0] * x.shape[1]
    timed = [b for b in args.backend if b != "triton" or device.type == "cuda"]
    candidates = {b: (lambda bw, b=b: moe_step(layer, b, x, labels, bw)) for b in timed}
    candidates["dense"] = lambda bw: dense_step(layer, x, config.expert_spec.activated, bw)

    times = {(c, mode): [] for c in candidates for mode in ("fwd", "fwd+bwd")}
    for rep in range(args.warmup + args.reps):
        for candidate, step in candidates.items():  # interleaved: every candidate once per repetition
            for mode, backward in (("fwd", False), ("fwd+bwd", True)):
                layer.zero_grad(set_to_none=True)
                x.grad = None
                elapsed = time_once(lambda step=step, backward=backward: step(backward), device)
                if rep >= args.warmup:
                    times[(candidate, mode)].append(elapsed)
    median = {key: sorted(v)[len(v) // 2] for key, v in times.items()}

    results = []
    for backend in args.backend:
        for mode in ("fwd", "fwd+bwd"):
            counts = counters(layer, backend, x, labels, backward=mode == "fwd+bwd")
            seconds = median.get((backend, mode))
            loop_seconds = median.get(("loop", mode))
            results.append(dict(
                backend=backend, mode=mode,
                tokens_per_s=num_tokens / seconds if seconds else None,
                speedup_vs_loop=loop_seconds / seconds if seconds and loop_seconds else None,
                time_vs_dense=seconds / median[("dense", mode)] if seconds else None, **counts))
    for mode in ("fwd", "fwd+bwd"):
        results.append(dict(backend="dense", mode=mode, tokens_per_s=num_tokens / median[("dense", mode)],
                            speedup_vs_loop=None, time_vs_dense=1.0, host_syncs=None, launches=None))
    run = report.run_record(dict(bench="moe_layer", model=name, tokens=num_tokens, dtype=args.dtype, reps=args.reps,
                                 device=str(device), overrides=overrides), results)
    report.emit(run, args.json, title=f"{name} MoE layer, {num_tokens} tokens, {args.dtype}")


if __name__ == "__main__":
    main()
