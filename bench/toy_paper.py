"""The paper's claims at toy scale, on Fashion-MNIST 28x28 pixels on the CPU, as three experiments:

- `comparison`: Dense-DiT vs TC-DiT vs EC-DiT vs DiffMoE vs ProMoE, and the component ablation of the paper's
  Table 6 (which changes the expert layout together with the router, as the paper's table does);
- `routers`: the router swap with the expert layout held fixed (7 routed + 1 shared experts of width 2D, top-1):
  a linear softmax router, prototypes without the routing contrastive loss (RCL), prototypes with it, and the same
  with conditional routing (+ the unconditional expert);
- `long`: Dense-DiT, TC-DiT and ProMoE for 3000 steps, evaluated after one epoch and at the end, to see whether the
  orderings move with training.

    python bench/toy_paper.py --experiment routers [--seeds 0 1 2] [--models ...] [--no-report]

Every run uses the demo's backbone and recipe (`configs/demo.yaml`: width 128, depth 6, patch 4, rectified flow,
batch 64, AdamW 1.5e-3 with a 50-step warm-up, EMA 0.995 with warm-up); nothing is tuned per model. Each run is
evaluated on its EMA weights: validation MSE on fixed noise, the Fashion-MNIST FID and the conditional accuracy at
every guidance scale of a sweep (a model is reported at its best scale), and I(class; expert) per MoE layer.

Resumable: a finished run is skipped, an interrupted one resumes from its checkpoint, and each evaluation is kept in
a JSON file beside its run. The report of an experiment is regenerated from those files. Two invocations with
disjoint `--models` and `--no-report` can share a machine (one thread each: `OMP_NUM_THREADS=1`); a last one
without `--no-report` writes the report from the cached figures.
"""

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
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
from promoe.eval.feature_net import DEFAULT_FEATURE_NET, conditional_accuracy  # noqa: E402
from promoe.plots import read_metrics, smooth  # noqa: E402
from promoe.sampling import generate_per_class, load_model, per_class_labels, to_uint8  # noqa: E402
from promoe.viz.routing import (  # noqa: E402
    class_expert_information_bits,
    draw_maps,
    expert_usage,
    sample_with_routing,
    usage_entropy_bits,
)

# The demo's model without its expert string: each experiment names its own.
BACKBONE = {"input_size": 28, "patch_size": 4, "in_channels": 1, "learn_sigma": False, "num_classes": 10,
            "hidden_size": 128, "num_heads": 4, "depth": 6}
EPOCH_STEPS = 940  # one pass over Fashion-MNIST's 60000 training images at batch 64


@dataclass(frozen=True)
class Experiment:
    title: str
    report: str  # file name under docs/
    models: dict[str, tuple[str, dict]]  # name -> (zoo model, overrides on top of BACKBONE)
    pairs: tuple[tuple[str, str], ...]  # (candidate, reference): the orderings the report states
    seeds: tuple[int, ...]
    milestones: tuple[int, ...]  # training steps at which each run is evaluated; the last is its length


def every_pair(names: list[str]) -> tuple[tuple[str, str], ...]:
    return tuple((later, earlier) for earlier, later in itertools.combinations(names, 2))


COMPARISON = {
    "Dense-DiT": ("DiT-S", {}),
    "TC-DiT": ("TC-DiT-S-E4", {}),  # linear softmax router, top-1, load-balance loss 0.01
    "EC-DiT": ("EC-DiT-S-E4", {}),  # per-image expert choice, capacity 1
    "DiffMoE": ("DiffMoE-S-E4", {}),  # batch-level expert choice, capacity predictor
    "+ prototypical routing": ("ProMoE-S", {"experts": "E8A1S1U0", "rcl_weight": 0.0}),
    "+ routing contrastive loss": ("ProMoE-S", {"experts": "E8A1S1U0"}),
    "ProMoE": ("ProMoE-S", {"experts": "E8A1S1U1"}),  # + conditional routing: the full model
}
ABLATION = ["Dense-DiT", "+ prototypical routing", "+ routing contrastive loss", "ProMoE"]
# The router swap: 7 routed + 1 shared experts of width 2D, top-1, in every row; only the router changes.
ROUTERS = {
    "linear softmax": ("TC-DiT-S", {"experts": "E8A1S1U0", "expert_hidden_ratio": 2.0}),  # + load balance 0.01
    "prototypes": ("ProMoE-S", {"experts": "E8A1S1U0", "rcl_weight": 0.0}),
    "prototypes + RCL": ("ProMoE-S", {"experts": "E8A1S1U0"}),
    "prototypes + RCL + conditional": ("ProMoE-S", {"experts": "E9A1S1U1"}),  # + the unconditional expert
}
LONG = {name: COMPARISON[name] for name in ("Dense-DiT", "TC-DiT", "ProMoE")}
EXPERIMENTS = {
    "comparison": Experiment(
        "Dense-DiT vs the MoE baselines vs ProMoE, and the ablation of the paper's Table 6", "toy_results.md",
        COMPARISON,
        tuple(("ProMoE", other) for other in COMPARISON if other != "ProMoE") + tuple(zip(ABLATION[1:], ABLATION)),
        (0, 1, 2), (EPOCH_STEPS,)),
    "routers": Experiment("The router swap, expert layout held fixed", "toy_routers.md", ROUTERS,
                          every_pair(list(ROUTERS)), (0, 1, 2), (EPOCH_STEPS,)),
    "long": Experiment("Dense-DiT, TC-DiT and ProMoE over 3000 steps", "toy_long.md", LONG, every_pair(list(LONG)),
                       (0,), (EPOCH_STEPS, 3000)),
}
GUIDANCE = (1.0, 1.5, 2.0, 3.0)
VALIDATION_TIMESTEPS = (np.arange(10) + 0.5) / 10  # stratified: the midpoints of 10 equal bins of s
# (key, lower is better, digits) of the figures that the orderings compare
METRICS = (("val_mse", True, 4), ("fid_best", True, 2), ("accuracy_best", False, 3))


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", choices=list(EXPERIMENTS), default="comparison")
    parser.add_argument("--out", type=Path, default=None, help="runs folder (default: runs/toy_<experiment>)")
    parser.add_argument("--report", type=Path, default=None, help="default: docs/<the experiment's report>")
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="the milestones: evaluate at each, train to the last (default: the experiment's)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the experiment's")
    parser.add_argument("--fid-samples", type=int, default=500)
    parser.add_argument("--sample-steps", type=int, default=5,
                        help="Euler steps of the evaluation's samples (on the demo, 5 are on par with 25)")
    parser.add_argument("--val-images", type=int, default=500)
    parser.add_argument("--data", default=None, help="Fashion-MNIST IDX folder (default: Debian's)")
    parser.add_argument("--feature-net", type=Path, default=ROOT / DEFAULT_FEATURE_NET)
    parser.add_argument("--models", nargs="+", default=None, help="a subset of the experiment's models")
    parser.add_argument("--no-report", action="store_true", help="train and evaluate only")
    args = parser.parse_args(argv)
    experiment = EXPERIMENTS[args.experiment]
    args.out = args.out or ROOT / "runs" / f"toy_{args.experiment}"
    args.report = args.report or ROOT / "docs" / experiment.report
    args.steps = sorted(args.steps or experiment.milestones)
    args.seeds = args.seeds if args.seeds is not None else list(experiment.seeds)
    args.models = args.models or list(experiment.models)
    unknown = set(args.models) - set(experiment.models)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)} for --experiment {args.experiment}; "
                     f"known: {list(experiment.models)}")
    return args


def finished_at(run: Path) -> int | None:
    latest = run / "checkpoints" / "latest"
    return int(latest.read_text().strip().removeprefix("step_")) if latest.exists() else None


def train(run: Path, model: tuple[str, dict], seed: int, steps: int, args) -> Path:
    """Trains one run to `steps` (resuming it if it stopped earlier); the EMA weights of that step."""
    ema = run / f"ema_step{steps:07d}.safetensors"
    if ema.exists():
        return ema
    zoo, overrides = model
    if finished_at(run) != steps:
        command = [sys.executable, str(ROOT / "train" / "run.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
                   "--out", str(run), "--max-steps", str(steps), "--ckpt-every", "200", f"model.name={zoo}",
                   "model.overrides={}", f"train.seed={seed}", f"train.global_batch={args.batch}",
                   "train.log_every=5", "train.grid_steps=5", "train.fid_samples=0",
                   *(f"model.overrides.{key}={value}" for key, value in {**BACKBONE, **overrides}.items())]
        if args.data:
            command.append(f"data.folder={args.data}")
        print(f"== training {run.name} to step {steps}", flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
    shutil.copyfile(run / "ema.safetensors", ema)  # the export is overwritten when the run goes on
    return ema


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


def steps_per_second(metrics: dict[str, np.ndarray]) -> float:
    """From the longest stretch of one process (elapsed_s restarts on resume)."""
    steps, elapsed = metrics["step"], metrics["elapsed_s"]
    breaks = np.flatnonzero(np.diff(elapsed) < 0) + 1
    longest = max(np.split(np.arange(len(steps)), breaks), key=len)
    if len(longest) < 2:
        return float("nan")
    first, last = longest[0], longest[-1]
    return float((steps[last] - steps[first]) / (elapsed[last] - elapsed[first]))


def guidance_sweep(model, images: np.ndarray, net, args) -> dict:
    """FID and conditional accuracy at each guidance scale, and the best scale by FID."""
    labels = per_class_labels(args.fid_samples, model.num_classes)
    fid, accuracy = {}, {}
    for scale in GUIDANCE:
        samples = generate_per_class(model, RectifiedFlow(), args.fid_samples, args.sample_steps, scale)
        fid[f"{scale:g}"] = pixel_fid(samples, images, net)
        accuracy[f"{scale:g}"] = conditional_accuracy(samples, labels, net)
    best = min(fid, key=fid.get)
    return {"fid": fid, "accuracy": accuracy, "best_guidance": float(best), "fid_best": fid[best],
            "accuracy_best": accuracy[best]}


def routing_figures(model, seed: int, args) -> dict:
    """I(class; expert) per MoE layer and the per-class usage entropy, over conditional sampling (guidance 1)."""
    if not any(hasattr(block.mlp, "router") for block in model.blocks):
        return {}
    per_class = torch.arange(10).repeat_interleave(8)
    _, experts, blocks = sample_with_routing(model, RectifiedFlow(), per_class, args.sample_steps, seed=seed)
    layer = model.blocks[blocks[0]].mlp
    share = expert_usage(experts, per_class, 10, layer.experts.num_experts)
    # Without guidance no token is unconditional: the unconditional expert, if any, cannot be chosen.
    choosable = layer.experts.num_experts - int(getattr(layer.router, "conditional", False))
    return {"mi_bits": class_expert_information_bits(share).tolist(), "mi_max_bits": float(np.log2(min(10, choosable))),
            "usage_entropy_bits": float(usage_entropy_bits(share).mean()),
            "usage_entropy_max_bits": float(np.log2(choosable))}


def evaluate(ema: Path, run: Path, seed: int, steps: int, held_out, net, args) -> dict:
    """The figures of one run at one milestone, cached beside it (recomputed when the settings change)."""
    settings = {"fid_samples": args.fid_samples, "sample_steps": args.sample_steps, "val_images": args.val_images,
                "guidance": GUIDANCE, "batch": args.batch, "ema_mtime_ns": ema.stat().st_mtime_ns}
    cache = run / f"eval_step{steps:07d}.json"
    if cache.exists() and json.loads(cache.read_text())["settings"] == json.loads(json.dumps(settings)):
        return json.loads(cache.read_text())
    print(f"== evaluating {run.name} at step {steps}", flush=True)
    model, _ = load_model(ema)
    metrics = read_metrics(run / "metrics.csv")
    upto = metrics["step"] <= steps
    curve_steps, curve_mse = metrics["step"][upto], metrics["mse"][upto]
    images, labels, _ = held_out
    val = validation_loss(model, images[: args.val_images], labels[: args.val_images])
    result = {"settings": settings, "seed": seed, "steps": steps,
              "train_mse": float(curve_mse[-max(1, len(curve_mse) // 10):].mean()),
              "val_mse": float(np.mean(val)), "val_mse_per_t": val, "steps_per_s": steps_per_second(metrics),
              "curve_steps": curve_steps.tolist(), "curve_mse": curve_mse.tolist(),
              **guidance_sweep(model, images, net, args), **routing_figures(model, seed, args)}
    cache.write_text(json.dumps(result))
    return result


def aggregate(values: list[float]) -> tuple[float, float]:
    """(mean, half the max-min spread); nan for no values."""
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float((max(values) - min(values)) / 2)


def cell(values: list[float], digits: int = 4, sign: str = "") -> str:
    mean, spread = aggregate(values)
    if np.isnan(mean):
        return "–"
    return f"{mean:{sign}.{digits}f} ± {spread:.{digits}f}" if len(values) > 1 else f"{mean:{sign}.{digits}f}"


def values_of(results: list[dict], key: str) -> list[float]:
    return [r[key] for r in results if key in r]


def paired(runs, name: str, base: str, key: str) -> list[float]:
    """Per seed, `name`'s figure minus `base`'s: runs of one seed share data order, noise and initial draws, so the
    difference removes most of the seed-to-seed spread."""
    by_seed = {r["seed"]: r for r in runs[base]}
    return [r[key] - by_seed[r["seed"]][key] for r in runs[name] if r["seed"] in by_seed and key in r]


def mi_cell(results: list[dict]) -> str:
    """Mean over seeds of I(class; expert) in each MoE layer, in bits, with its maximum."""
    if not results or "mi_bits" not in results[0]:
        return "–"
    per_layer = np.mean([r["mi_bits"] for r in results], axis=0)
    return " / ".join(f"{bits:.2f}" for bits in per_layer) + f" (max {results[0]['mi_max_bits']:.2f})"


def summary_table(runs, base: str) -> list[str]:
    lines = [f"| model | train MSE (last 10%) | val MSE | Δ val MSE vs {base} | best guidance | FID at best | "
             "accuracy at best | I(class; expert) per MoE layer, bits | steps/s |", "|---" * 9 + "|"]
    for name, results in runs.items():
        delta = cell(paired(runs, name, base, "val_mse"), 4, "+") if name != base else "–"
        best = ", ".join(f"{r['best_guidance']:g}" for r in results)
        lines.append(f"| {name} | {cell(values_of(results, 'train_mse'))} | {cell(values_of(results, 'val_mse'))} | "
                     f"{delta} | {best} | {cell(values_of(results, 'fid_best'), 1)} | "
                     f"{cell(values_of(results, 'accuracy_best'), 3)} | {mi_cell(results)} | "
                     f"{cell(values_of(results, 'steps_per_s'), 2)} |")
    return lines


def per_seed_table(runs) -> list[str]:
    header = " | ".join(f"FID / accuracy at {scale:g}" for scale in GUIDANCE)
    lines = [f"| model | seed | val MSE | {header} | I(class; expert) per layer |", "|---" * (4 + len(GUIDANCE)) + "|"]
    for name, results in runs.items():
        for r in results:
            sweep = " | ".join(f"{r['fid'][f'{s:g}']:.1f} / {r['accuracy'][f'{s:g}']:.3f}" for s in GUIDANCE)
            mi = " / ".join(f"{bits:.2f}" for bits in r["mi_bits"]) if "mi_bits" in r else "–"
            lines.append(f"| {name} | {r['seed']} | {r['val_mse']:.4f} | {sweep} | {mi} |")
    return lines


def ordering(runs, candidate: str, reference: str, key: str, lower_is_better: bool, digits: int) -> str:
    """Whether `candidate` beats `reference` on `key`: said to hold only when every seed agrees."""
    differences = paired(runs, candidate, reference, key)
    if not differences:
        return f"- {candidate} vs {reference} on {key}: not measured"
    wins = sum((d < 0) == lower_is_better and d != 0 for d in differences)
    if len(differences) == 1:  # a single run cannot separate a difference from the seed's noise
        verdict = f"**{'holds' if wins else 'does not hold'}** in its one seed (no evidence either way)"
    else:
        verdict = ("**holds** in every seed" if wins == len(differences) else
                   "**does not hold** in any seed" if wins == 0 else "**mixed**")
    return (f"- {candidate} better than {reference} on {key}: {verdict} ({wins} of {len(differences)} seeds; "
            f"mean difference {np.mean(differences):+.{digits}f})")


def plot_curves(runs, out_png: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, results in runs.items():
        steps = np.array(results[0]["curve_steps"])
        mse = np.mean([r["curve_mse"][: len(steps)] for r in results], axis=0)
        axis.plot(steps, smooth(mse, max(1, len(steps) // 20)), label=name)
    axis.set_xlabel("step")
    axis.set_ylabel("training MSE (mean over seeds, smoothed)")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out_png, dpi=110)
    plt.close(figure)


def plot_guidance(runs, out_png: Path) -> None:
    """FID and accuracy against the guidance scale, mean over seeds: where each model's best scale lies."""
    figure, (fid_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, results in runs.items():
        fid = np.mean([[r["fid"][f"{s:g}"] for s in GUIDANCE] for r in results], axis=0)
        accuracy = np.mean([[r["accuracy"][f"{s:g}"] for s in GUIDANCE] for r in results], axis=0)
        fid_axis.plot(GUIDANCE, fid, marker="o", label=name)
        accuracy_axis.plot(GUIDANCE, accuracy, marker="o", label=name)
    fid_axis.set_ylabel("Fashion-MNIST FID (lower is better)")
    accuracy_axis.set_ylabel("conditional accuracy (higher is better)")
    for axis in (fid_axis, accuracy_axis):
        axis.set_xlabel("guidance scale")
        axis.grid(alpha=0.3)
    accuracy_axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out_png, dpi=110)
    plt.close(figure)


def routing_map(ema: Path, out_png: Path, steps: int, label: int = 0) -> None:
    model, _ = load_model(ema)
    images, experts, blocks = sample_with_routing(model, RectifiedFlow(), torch.full((4,), label), steps)
    num_experts = model.blocks[blocks[0]].mlp.experts.num_experts
    shown = sorted({steps // 5, steps - 1})
    draw_maps(to_uint8(images), experts, blocks, shown, num_experts, BACKBONE["input_size"] // BACKBONE["patch_size"],
              f"ProMoE, class {label}: expert of each patch (sampling steps {shown} of {steps})", out_png)


def milestone_sections(experiment: Experiment, runs, steps: int, figure_stem: Path) -> list[str]:
    base = next(iter(runs))
    plot_curves(runs, figure_stem.with_name(f"{figure_stem.name}_loss.png"))
    plot_guidance(runs, figure_stem.with_name(f"{figure_stem.name}_guidance.png"))
    pairs = [(a, b) for a, b in experiment.pairs if a in runs and b in runs]
    return [f"## After {steps} steps", "", *summary_table(runs, base), "", "Per seed:", "", *per_seed_table(runs), "",
            "Orderings (a claim holds only when every seed agrees):", "",
            *(ordering(runs, a, b, key, lower, digits) for a, b in pairs for key, lower, digits in METRICS), "",
            f"![training curves]({figure_stem.name}_loss.png)", f"![guidance sweep]({figure_stem.name}_guidance.png)",
            ""]


def write_report(experiment: Experiment, results, args, held_out_name: str, process_minutes: float) -> None:
    report = args.report
    report.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# {experiment.title} (regenerated by `python bench/toy_paper.py --experiment {args.experiment}`)", "",
        f"Data: {held_out_name} 28x28 pixels, class-conditional rectified flow. Every model: the demo's backbone "
        "(width 128, depth 6, patch 4: 49 tokens) and recipe (`configs/demo.yaml`: batch "
        f"{args.batch}, AdamW 1.5e-3 after a 50-step warm-up, EMA 0.995 with warm-up), seeds "
        f"{', '.join(map(str, args.seeds))}; nothing tuned per model. Models: "
        + "; ".join(f"{name} = `{zoo}` {overrides or ''}" for name, (zoo, overrides) in experiment.models.items()
                    if name in args.models) + ".",
        "",
        f"Figures are mean ± half the spread over seeds, on the EMA weights. Δ: per-seed differences (runs of one "
        f"seed share data order, noise and initial draws, so they are paired). Val MSE: {args.val_images} held-out "
        f"test images at 10 stratified timesteps, fixed noise. FID: {args.fid_samples} samples (equal per class, "
        f"{args.sample_steps} Euler steps) against the test split, in the features of the demo's Fashion-MNIST "
        "classifier (`python -m promoe.eval.train_feature_net`): **not comparable with ImageNet FID**. Accuracy: the "
        "share of samples that classifier assigns to the class they were drawn for. Both at each guidance scale of "
        f"{list(GUIDANCE)}; a model is compared at its own best scale by FID. I(class; expert): the mutual "
        "information between an image's class and the top expert of its tokens, per MoE layer, over conditional "
        "sampling without guidance (8 images per class); 0 = the classes share the experts alike, the maximum = "
        "each class has its own experts.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads, torch "
        f"{torch.__version__}; {process_minutes:.1f} min of process time over the invocations that built these "
        "figures (invocations may run side by side). Steps/s come from the training logs and move with any other "
        "load on the machine.", "",
    ]
    for steps in args.steps:
        runs = {name: by_steps[steps] for name, by_steps in results.items() if by_steps[steps]}
        stem = report.with_name(f"{report.stem}_{steps}" if len(args.steps) > 1 else report.stem)
        lines += milestone_sections(experiment, runs, steps, stem)
    promoe = results.get("ProMoE", {}).get(args.steps[-1])
    if promoe:
        routing_map(args.out / f"promoe_seed{promoe[0]['seed']}" / f"ema_step{args.steps[-1]:07d}.safetensors",
                    report.with_name(f"{report.stem}_routing.png"), args.sample_steps)
        lines += [f"![ProMoE routing map]({report.stem}_routing.png)", ""]
    discussion = report.with_name(f"{report.stem}_discussion.md")
    if discussion.exists():  # the reading of the numbers, written by hand and kept across regenerations
        lines += ["## Discussion", "", discussion.read_text()]
    report.write_text("\n".join(lines))
    print(f"wrote {report}")


def add_process_time(out: Path, seconds: float) -> float:
    """The minutes spent by every invocation on this output folder so far (a resumed experiment adds up)."""
    out.mkdir(parents=True, exist_ok=True)
    record = out / "process_minutes.json"
    total = (json.loads(record.read_text())["total"] if record.exists() else 0.0) + seconds / 60
    record.write_text(json.dumps({"total": total}))
    return total


def main(argv=None) -> None:
    args = parse_args(argv)
    experiment = EXPERIMENTS[args.experiment]
    tic = time.perf_counter()
    if not args.feature_net.exists():
        subprocess.run([sys.executable, "-m", "promoe.eval.train_feature_net", "--out", str(args.feature_net)],
                       check=True, cwd=ROOT)
    held_out = pixel_split(args.data, "test")
    net = load_feature_net(args.feature_net)
    results = {name: {steps: [] for steps in args.steps} for name in args.models}
    # Seeds outermost: after the first pass every model has a seed to be paired on.
    for seed, name in itertools.product(args.seeds, args.models):
        run = args.out / f"{slug(name)}_seed{seed}"
        for steps in args.steps:
            ema = train(run, experiment.models[name], seed, steps, args)
            results[name][steps].append(evaluate(ema, run, seed, steps, held_out, net, args))
    minutes = add_process_time(args.out, time.perf_counter() - tic)
    if not args.no_report:
        write_report(experiment, results, args, held_out[2], minutes)


if __name__ == "__main__":
    main()
