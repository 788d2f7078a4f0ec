"""The paper's claims at toy scale, on Fashion-MNIST 28x28 pixels on the CPU: Dense-DiT vs TC-DiT vs EC-DiT vs DiffMoE
vs ProMoE, and the component ablation of the paper's Table 6.

    python bench/toy_paper.py [--out runs/toy_paper] [--steps 300] [--seeds 0 1] [--fid-samples 1000]

Every model has the same backbone (width 192, depth 6, patch 4: 49 tokens) and about 4.2M activated parameters per
token; the MoE models have about 6.8M in total (4 full-width experts for TC/EC/DiffMoE, 6 routed + 1 shared + 1
unconditional half-width experts for ProMoE). All train with the same recipe (rectified flow, batch 64, AdamW
3e-4, EMA 0.99, the same steps and seeds) through `train/run.py`; nothing is tuned per model.

Resumable: a finished run is skipped, an interrupted one resumes from its checkpoint, and each run's evaluation is
kept in `eval.json` beside it. The report (`docs/toy_results.md` and its PNGs) is regenerated from those files.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from promoe.data import pixel_split  # noqa: E402
from promoe.diffusion import RectifiedFlow  # noqa: E402
from promoe.eval import load_feature_net, pixel_fid  # noqa: E402
from promoe.eval.feature_net import DEFAULT_FEATURE_NET  # noqa: E402
from promoe.plots import read_metrics, smooth  # noqa: E402
from promoe.sampling import generate_per_class, load_model, to_uint8  # noqa: E402
from promoe.viz.routing import draw_maps, expert_usage, sample_with_routing, usage_entropy_bits  # noqa: E402

BACKBONE = {"input_size": 28, "patch_size": 4, "in_channels": 1, "learn_sigma": False, "num_classes": 10,
            "hidden_size": 192, "num_heads": 6, "depth": 6}
# name -> (zoo model, overrides on top of BACKBONE)
MODELS = {
    "Dense-DiT": ("DiT-S", {}),
    "TC-DiT": ("TC-DiT-S-E4", {}),  # linear softmax router, top-1, load-balance loss 0.01
    "EC-DiT": ("EC-DiT-S-E4", {}),  # per-image expert choice, capacity 1
    "DiffMoE": ("DiffMoE-S-E4", {}),  # batch-level expert choice, capacity predictor
    "+ prototypical routing": ("ProMoE-S", {"experts": "E8A1S1U0", "rcl_weight": 0.0}),
    "+ routing contrastive loss": ("ProMoE-S", {"experts": "E8A1S1U0"}),
    "ProMoE": ("ProMoE-S", {"experts": "E8A1S1U1"}),  # + conditional routing: the full model
}
COMPARISON = ["Dense-DiT", "TC-DiT", "EC-DiT", "DiffMoE", "ProMoE"]
ABLATION = ["Dense-DiT", "+ prototypical routing", "+ routing contrastive loss", "ProMoE"]
GUIDANCE = (1.0, 1.5)
VALIDATION_TIMESTEPS = (np.arange(10) + 0.5) / 10  # stratified: the midpoints of 10 equal bins of s


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "toy_paper")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "toy_results.md")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--fid-samples", type=int, default=1000)
    parser.add_argument("--fid-seeds", type=int, nargs="+", default=None,
                        help="seeds whose runs get the FID (default: all)")
    parser.add_argument("--sample-steps", type=int, default=10, help="Euler steps for the FID samples")
    parser.add_argument("--val-images", type=int, default=500)
    parser.add_argument("--data", default=None, help="Fashion-MNIST IDX folder (default: Debian's)")
    parser.add_argument("--feature-net", type=Path, default=ROOT / DEFAULT_FEATURE_NET)
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="a subset of the models (for tests)")
    return parser.parse_args(argv)


def train(name: str, seed: int, args) -> Path:
    """Trains one (model, seed) through the driver unless its run is complete; its output folder."""
    zoo, overrides = MODELS[name]
    out = args.out / f"{slug(name)}_seed{seed}"
    done = out / "checkpoints" / "latest"
    if (out / "ema.safetensors").exists() and done.exists() and done.read_text().strip() == f"step_{args.steps:07d}":
        return out
    command = [sys.executable, str(ROOT / "train" / "run.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
               "--out", str(out), "--max-steps", str(args.steps), "--ckpt-every", str(max(1, args.steps // 4)),
               f"model.name={zoo}", "model.overrides={}", f"train.seed={seed}", f"train.global_batch={args.batch}",
               "train.ema_decay=0.99", "train.log_every=5", f"train.grid_steps={args.sample_steps}",
               "train.fid_samples=0", "optim.lr=3e-4",
               *(f"model.overrides.{key}={value}" for key, value in {**BACKBONE, **overrides}.items())]
    if args.data:
        command.append(f"data.folder={args.data}")
    print(f"== training {name}, seed {seed} -> {out}", flush=True)
    subprocess.run(command, check=True, cwd=ROOT)
    return out


@torch.no_grad()
def validation_loss(model, images: np.ndarray, labels: np.ndarray, seed: int = 1234) -> list[float]:
    """The rectified-flow MSE of the EMA model on held-out images at each fixed timestep (same noise for all)."""
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.from_numpy(images).float()[:, None] / 127.5 - 1
    y = torch.from_numpy(labels)
    noise = torch.randn(x0.shape, generator=generator)
    losses = []
    for s in VALIDATION_TIMESTEPS:
        total = 0.0
        for start in range(0, len(x0), 500):
            chunk = slice(start, start + 500)
            x_s = (1 - s) * x0[chunk] + s * noise[chunk]
            prediction = model(x_s, torch.full((len(x_s),), s * 1000), y[chunk])
            total += (prediction - (noise[chunk] - x0[chunk])).square().mean(dim=(1, 2, 3)).sum().item()
        losses.append(total / len(x0))
    return losses


def fid_samples(model, path: Path, count: int, scale: float, steps: int, key: str) -> np.ndarray:
    """`count` samples (equal numbers per class), cached in `path` under the evaluation's key."""
    if path.exists():
        cached = np.load(path)
        if "key" in cached and str(cached["key"]) == key:
            return cached["arr_0"]
    samples = generate_per_class(model, RectifiedFlow(), count, steps, scale)
    np.savez(path, arr_0=samples, key=key)
    return samples


def steps_per_second(metrics: dict[str, np.ndarray]) -> float:
    """From the longest stretch of one process (elapsed_s restarts on resume)."""
    steps, elapsed = metrics["step"], metrics["elapsed_s"]
    breaks = np.flatnonzero(np.diff(elapsed) < 0) + 1
    stretches = np.split(np.arange(len(steps)), breaks)
    longest = max(stretches, key=len)
    if len(longest) < 2:
        return float("nan")
    first, last = longest[0], longest[-1]
    return float((steps[last] - steps[first]) / (elapsed[last] - elapsed[first]))


def evaluate(name: str, seed: int, run: Path, held_out, net, args) -> dict:
    """The figures of one run, cached in eval.json (recomputed when the settings change)."""
    # The key of the cached figures: the evaluation's settings and the trained model they measure.
    settings = {"fid_samples": args.fid_samples, "sample_steps": args.sample_steps, "val_images": args.val_images,
                "fid": args.fid_seeds is None or seed in args.fid_seeds, "steps": args.steps, "batch": args.batch,
                "ema_mtime_ns": (run / "ema.safetensors").stat().st_mtime_ns}
    cache = run / "eval.json"
    if cache.exists() and json.loads(cache.read_text())["settings"] == settings:
        return json.loads(cache.read_text())
    print(f"== evaluating {name}, seed {seed}", flush=True)
    model, _ = load_model(run / "ema.safetensors")
    metrics = read_metrics(run / "metrics.csv")
    tail = max(1, len(metrics["step"]) // 10)
    images, labels, _ = held_out
    val = validation_loss(model, images[: args.val_images], labels[: args.val_images])
    result = {"settings": settings, "name": name, "seed": seed,
              "train_mse": float(metrics["mse"][-tail:].mean()), "train_loss": float(metrics["loss"][-tail:].mean()),
              "val_mse": float(np.mean(val)), "val_mse_per_t": val, "steps_per_s": steps_per_second(metrics),
              "curve_steps": metrics["step"].tolist(), "curve_mse": metrics["mse"].tolist()}
    if settings["fid"]:
        for scale in GUIDANCE:
            samples = fid_samples(model, run / f"fid_samples_cfg{scale:g}.npz", args.fid_samples, scale,
                                  args.sample_steps, json.dumps(settings, sort_keys=True))
            result[f"fid_cfg{scale:g}"] = pixel_fid(samples, images, net)
    if any(hasattr(block.mlp, "router") for block in model.blocks):
        per_class = torch.arange(10).repeat_interleave(8)
        _, experts, blocks = sample_with_routing(model, RectifiedFlow(), per_class, args.sample_steps, seed=seed)
        num_experts = model.blocks[blocks[0]].mlp.experts.num_experts
        share = expert_usage(experts, per_class, 10, num_experts)
        result["usage_entropy_bits"] = float(usage_entropy_bits(share).mean())
        result["usage_entropy_max_bits"] = float(np.log2(num_experts))
    cache.write_text(json.dumps(result))
    return result


def aggregate(values: list[float]) -> tuple[float, float]:
    """(mean, half the max-min spread); nan for no values."""
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float((max(values) - min(values)) / 2)


def values_of(results: list[dict], key: str) -> list[float]:
    return [r[key] for r in results if key in r]


def paired(runs, name: str, base: str, key: str) -> list[float]:
    """Per seed, `name`'s figure minus `base`'s: runs of one seed share data order, noise and initial draws, so the
    difference removes most of the seed-to-seed spread."""
    return [a[key] - b[key] for a, b in zip(runs[name], runs[base]) if key in a and key in b]


def cell(values: list[float], digits: int = 4, sign: str = "") -> str:
    mean, spread = aggregate(values)
    if np.isnan(mean):
        return "–"
    return f"{mean:{sign}.{digits}f} ± {spread:.{digits}f}" if len(values) > 1 else f"{mean:{sign}.{digits}f}"


def table(names: list[str], runs: dict[str, list[dict]], base: str = "Dense-DiT") -> list[str]:
    lines = [f"| model | train MSE (last 10%) | val MSE | Δ val MSE vs {base} | FID cfg 1.0 | FID cfg 1.5 | "
             f"Δ FID 1.5 vs {base} | steps/s | usage entropy (bits) |", "|---" * 9 + "|"]
    for name in names:
        results = runs[name]
        entropy = cell(values_of(results, "usage_entropy_bits"), 2)
        if entropy != "–":
            entropy += f" / {results[0]['usage_entropy_max_bits']:.2f}"
        compared = base in runs and name != base
        val_delta = cell(paired(runs, name, base, "val_mse"), 4, "+") if compared else "–"
        fid_delta = cell(paired(runs, name, base, "fid_cfg1.5"), 2, "+") if compared else "–"
        lines.append(f"| {name} | {cell(values_of(results, 'train_mse'))} | {cell(values_of(results, 'val_mse'))} | "
                     f"{val_delta} | {cell(values_of(results, 'fid_cfg1'), 2)} | "
                     f"{cell(values_of(results, 'fid_cfg1.5'), 2)} | {fid_delta} | "
                     f"{cell(values_of(results, 'steps_per_s'), 2)} | {entropy} |")
    return lines


def ordering(runs, better: str, worse: str, key: str) -> str:
    """Whether `better` is below `worse` on `key`, on the mean of the per-seed differences and seed by seed."""
    differences = paired(runs, better, worse, key)
    if not differences:
        return f"- {better} below {worse} on {key}: not measured"
    verdict = "holds" if np.mean(differences) < 0 else "does NOT hold"
    below = sum(d < 0 for d in differences)
    return (f"- {better} below {worse} on {key}: **{verdict}** (difference {np.mean(differences):+.4g}; below in "
            f"{below} of {len(differences)} seeds)")


def plot_curves(runs, out_png: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, results in runs.items():
        steps = np.array(results[0]["curve_steps"])
        mse = np.mean([r["curve_mse"][: len(steps)] for r in results], axis=0)
        axis.plot(steps, smooth(mse, max(1, len(steps) // 10)), label=name)
    axis.set_xlabel("step")
    axis.set_ylabel("training MSE (mean over seeds, smoothed)")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out_png, dpi=110)
    plt.close(figure)


def plot_bars(runs, keys: list[str], ylabel: str, out_png: Path) -> None:
    names = list(runs)
    figure, axis = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        stats = [aggregate(values_of(runs[name], key)) for name in names]
        axis.bar(np.arange(len(names)) + k * width, [m for m, _ in stats], width, yerr=[s for _, s in stats],
                 label=key, capsize=3)
    axis.set_xticks(np.arange(len(names)) + width * (len(keys) - 1) / 2, names, rotation=20, ha="right", fontsize=8)
    axis.set_ylabel(ylabel)
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(out_png, dpi=110)
    plt.close(figure)


def routing_map(run: Path, out_png: Path, steps: int, label: int = 0) -> None:
    model, _ = load_model(run / "ema.safetensors")
    labels = torch.full((4,), label)
    images, experts, blocks = sample_with_routing(model, RectifiedFlow(), labels, steps)
    num_experts = model.blocks[blocks[0]].mlp.experts.num_experts
    shown = sorted({steps // 5, steps - 1})
    draw_maps(to_uint8(images), experts, blocks, shown, num_experts, BACKBONE["input_size"] // BACKBONE["patch_size"],
              f"ProMoE, class {label}: expert of each patch (sampling steps {shown} of {steps})", out_png)


def write_report(runs, args, held_out_name: str, wall_minutes: float) -> None:
    report = args.report
    report.parent.mkdir(parents=True, exist_ok=True)
    stem = report.stem
    plot_curves(runs, report.with_name(f"{stem}_loss.png"))
    plot_bars(runs, ["fid_cfg1", "fid_cfg1.5"], "Fashion-MNIST FID (lower is better)", report.with_name(
        f"{stem}_fid.png"))
    figures = [f"![training curves]({stem}_loss.png)", f"![FID]({stem}_fid.png)"]
    if "ProMoE" in runs:
        routing_map(args.out / f"promoe_seed{args.seeds[0]}", report.with_name(f"{stem}_routing.png"),
                    args.sample_steps)
        figures.append(f"![ProMoE routing map]({stem}_routing.png)")
    seeds = ", ".join(map(str, args.seeds))
    lines = [
        "# The paper's claims at toy scale (regenerated by `python bench/toy_paper.py`)", "",
        f"Data: {held_out_name} 28x28 pixels, class-conditional rectified flow. Every model: width 192, depth 6, "
        "patch 4 (49 tokens), about 4.2M activated parameters per token (6.8M total for the MoE models), trained "
        f"{args.steps} steps at batch {args.batch} with AdamW 3e-4 and EMA 0.99, seeds {seeds}; nothing tuned per "
        "model. Figures are mean ± half the spread over seeds; Δ columns are per-seed differences from Dense-DiT "
        "(runs of one seed share data order and noise, so these are paired).",
        f"Val MSE: the EMA model on {args.val_images} held-out test images at 10 stratified timesteps (fixed noise). "
        f"FID: {args.fid_samples} samples (equal per class, {args.sample_steps} Euler steps) against the "
        "test split, in the features of the demo Fashion-MNIST classifier (`python -m promoe.eval.train_feature_net`)"
        ": **not comparable with ImageNet FID**. Usage entropy: per class, the entropy of how its tokens spread over "
        "the experts (largest gate) while sampling, averaged over classes and MoE layers, against its maximum "
        "(lower = experts more specialised by class), measured over the same Euler sampling.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads, torch "
        f"{torch.__version__}; {wall_minutes:.1f} min of wall time over the invocations that built these figures. "
        "Steps/s come from the "
        "training logs and move with any other load on the machine.", "",
        "## Dense-DiT vs the MoE baselines vs ProMoE", "", *table([n for n in COMPARISON if n in runs], runs), "",
        "## Ablation (the paper's Table 6)", "", *table([n for n in ABLATION if n in runs], runs), "",
        "## Do the paper's orderings hold here?", "",
        *(ordering(runs, "ProMoE", other, key) for other in ("TC-DiT", "Dense-DiT") for key in
          ("val_mse", "fid_cfg1", "fid_cfg1.5") if "ProMoE" in runs and other in runs),
        *(ordering(runs, after, before, key) for before, after in zip(ABLATION, ABLATION[1:]) for key in
          ("val_mse", "fid_cfg1.5") if before in runs and after in runs), "",
        *figures, "",
    ]
    discussion = report.with_name(f"{stem}_discussion.md")
    if discussion.exists():  # the reading of the numbers, written by hand and kept across regenerations
        lines += ["## Discussion", "", discussion.read_text()]
    report.write_text("\n".join(lines))
    print(f"wrote {report}")


def add_wall_time(out: Path, seconds: float) -> float:
    """The minutes spent by every invocation on this output folder so far (a resumed experiment adds up)."""
    record = out / "wall_minutes.json"
    total = (json.loads(record.read_text())["total"] if record.exists() else 0.0) + seconds / 60
    record.write_text(json.dumps({"total": total}))
    return total


def main(argv=None) -> None:
    args = parse_args(argv)
    unknown = set(args.models) - set(MODELS)
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}; known: {list(MODELS)}")
    tic = time.perf_counter()
    if not args.feature_net.exists():
        subprocess.run([sys.executable, "-m", "promoe.eval.train_feature_net", "--out", str(args.feature_net)],
                       check=True, cwd=ROOT)
    held_out = pixel_split(args.data, "test")
    net = load_feature_net(args.feature_net)
    runs = {name: [evaluate(name, seed, train(name, seed, args), held_out, net, args) for seed in args.seeds]
            for name in args.models}
    write_report(runs, args, held_out[2], add_wall_time(args.out, time.perf_counter() - tic))


if __name__ == "__main__":
    main()
