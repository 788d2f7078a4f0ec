"""The paper's claims at toy scale, on Fashion-MNIST 28x28 pixels on the CPU, as four experiments:

- `comparison`: Dense-DiT vs TC-DiT vs EC-DiT vs DiffMoE vs ProMoE, and the component ablation of the paper's
  Table 6 (which changes the expert layout together with the router, as the paper's table does);
- `routers`: the router swap with the expert layout held fixed (7 routed + 1 shared experts of width 2D, top-1):
  a linear softmax router, prototypes without the routing contrastive loss (RCL), prototypes with it, and the same
  with conditional routing (+ the unconditional expert);
- `long`: Dense-DiT, TC-DiT and ProMoE for 3000 steps, evaluated after one epoch and at the end, to see whether the
  orderings move with training;
- `decisive`: TC-DiT against ProMoE at equal total and activated parameters, 6 paired seeds, one epoch, with its
  endpoints fixed before the runs (validation MSE, and FID at guidance 2 from 2000 samples).
- `rcl`: the routing contrastive loss alone: ProMoE-S with and without it, all else identical, 6 paired seeds, one
  epoch, pre-registered in `docs/toy_rcl_preregistration.md` (validation MSE, and the routing's class information
  above its shuffled-label null, each at 97.5%).

    python bench/toy_paper.py --experiment decisive|rcl [--seeds 0 1 2] [--models ...] [--guidance 2] \
        [--fid-samples 2000] [--endpoints val_mse fid@2] [--no-report]

Every run uses the demo's backbone and recipe (`configs/demo.yaml`: width 128, depth 6, patch 4, rectified flow,
batch 64, AdamW 1.5e-3 with a 50-step warm-up, EMA 0.995 with warm-up); nothing is tuned per model. Each run is
evaluated on its EMA weights: validation MSE on fixed noise, the Fashion-MNIST FID and the conditional accuracy at
each guidance scale of the experiment's list, and, per MoE layer, the expert loads and I(class; expert) beside a
shuffled-label null and under swapped labels. A model pair is compared by the paired differences of its seeds, each
stated as a mean with its t-based 95% confidence interval; the verdict comes from the interval alone.

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
from scipy import stats  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from promoe.data import pixel_split  # noqa: E402
from promoe.diffusion import RectifiedFlow  # noqa: E402
from promoe.eval import load_feature_net, pixel_fid  # noqa: E402
from promoe.eval.feature_net import DEFAULT_FEATURE_NET, conditional_accuracy  # noqa: E402
from promoe.plots import read_metrics, smooth  # noqa: E402
from promoe.sampling import generate, load_model, per_class_labels, to_uint8  # noqa: E402
from promoe.viz.routing import (  # noqa: E402
    MapRow,
    class_expert_information_bits,
    class_expert_information_max_bits,
    draw_maps,
    expert_usage,
    sample_with_routing,
    shuffled_label_information_bits,
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
    pairs: tuple[tuple[str, str], ...]  # (candidate, reference): the paired differences the report states
    seeds: tuple[int, ...]
    milestones: tuple[int, ...]  # training steps at which each run is evaluated; the last is its length
    endpoints: tuple[str, ...] = ("val_mse", "fid_best", "accuracy_best")  # primary: see `endpoint_value`
    secondary: tuple[str, ...] = ()
    guidance: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)
    fid_samples: int = 500
    noise_check_seeds: tuple[int, ...] = ()  # seeds whose FID is measured again from a second noise seed
    note: str = ""  # said in the report's preamble
    routing_noise_seed: int | None = None  # the routing figures' sampling noise (None: the run's seed)
    level: float = 0.95  # of each interval (0.975 each: 95% over two primary endpoints together)
    class_blind_reference: bool = False  # report I(class; expert) of routers that never see the class, and low loads


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
# Equal total (3.06M) and activated (1.88M per token) parameters: 4 experts of width 4D, top-1, against 6 routed
# (top-1) + 1 shared + 1 unconditional of width 2D.
DECISIVE = {name: COMPARISON[name] for name in ("TC-DiT", "ProMoE")}
# The routing contrastive loss alone (issue 33): the full ProMoE-S with the zoo's RCL weight and without it.
RCL = {"RCL on": COMPARISON["ProMoE"], "RCL off": ("ProMoE-S", {**COMPARISON["ProMoE"][1], "rcl_weight": 0.0})}
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
    "decisive": Experiment(
        "ProMoE against TC-DiT at equal parameters, 6 paired seeds", "toy_decisive.md", DECISIVE,
        (("ProMoE", "TC-DiT"),), (0, 1, 2, 3, 4, 5), (EPOCH_STEPS,), endpoints=("val_mse", "fid@2"),
        secondary=("accuracy@2",), guidance=(2.0,), fid_samples=2000, noise_check_seeds=(0,),
        note="The endpoints, the guidance scale (2.0, one scale fixed in advance: no selection on the reported "
             "samples), the sample count and the 6 seeds were fixed in issue 23 before the runs started. Both models "
             "run 1.88M parameters per token of 3.06M in total: TC-DiT 4 experts of width 4D, top-1, with the "
             "load-balance loss; ProMoE 6 routed experts (top-1) + 1 shared + 1 unconditional, of width 2D. The "
             "comparison is of the two whole models, not of their routers: they differ also in the experts' width, "
             "the shared and unconditional experts, and the routing contrastive loss against the load-balance loss. "
             "Seed 0 of both models is the `long` experiment's seed-0 run after 940 steps (same models, recipe and "
             "seed), whose validation MSE and 500-sample FID were reported (`docs/toy_long.md`) before these seeds "
             "were fixed; seeds 1 to 5 were not."),
    "rcl": Experiment(
        "Does the routing contrastive loss make experts specialise? ProMoE-S with and without it, 6 paired seeds",
        "toy_rcl.md", RCL, (("RCL on", "RCL off"),), (6, 7, 8, 9, 10, 11), (EPOCH_STEPS,),
        endpoints=("val_mse", "mi_excess"), secondary=("fid@2", "accuracy@2"), guidance=(2.0,), fid_samples=2000,
        routing_noise_seed=0, level=0.975, class_blind_reference=True,
        note="Pre-registered in `docs/toy_rcl_preregistration.md` (issue 33), committed before the first run: the "
             "arms, seeds, endpoints, intervals (97.5% each, 95% over the two primary endpoints together) and "
             "verdict rule. The two arms are one model, ProMoE-S E8A1S1U1 (6 routed experts, top-1, + 1 shared + 1 "
             "unconditional, width 2D), with the zoo's RCL weight (1.0) and with 0: identical parameters."),
}
VALIDATION_TIMESTEPS = (np.arange(10) + 0.5) / 10  # stratified: the midpoints of 10 equal bins of s
ROUTING_PER_CLASS = 20  # images per class in the routing figures (conditional sampling without guidance)
NULL_PERMUTATIONS = 100
CLASS_NAMES = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
MAP_CLASSES = (0, 1, 5, 8)  # T-shirt, trouser, sandal, bag: the routing picture's rows
PATCH = 4  # the backbone's patch size: 49 tokens of 4x4 pixels
LOW_LOAD = 0.02  # an expert taking less than this share of the tokens it could take is flagged


def endpoint_value(result: dict, key: str) -> float | None:
    """A run's figure by endpoint name: `val_mse`, `fid@S` / `accuracy@S` (at guidance S), `fid_best` /
    `accuracy_best` (at the run's best guidance by FID); None where it was not measured."""
    if "@" in key:
        name, scale = key.split("@")
        return result.get(name, {}).get(f"{float(scale):g}")
    if key == "mi_excess":
        return mi_excess_bits(result)
    return result.get(key)


def mi_excess_bits(result: dict) -> float | None:
    """The mean over MoE layers of I(class; top expert) minus the mean of its shuffled-label null."""
    if "mi_bits" not in result:
        return None
    return float(np.mean(np.subtract(result["mi_bits"], result["mi_null_bits"])))


def canonical(key: str) -> str:
    """fid@2.0 -> fid@2: one name per endpoint."""
    name, at, scale = key.partition("@")
    try:
        return f"{name}@{float(scale):g}" if at else key
    except ValueError:
        return key


def lower_is_better(key: str) -> bool:
    return not key.startswith(("accuracy", "mi_"))


def digits_of(key: str) -> int:
    return 3 if key.startswith(("accuracy", "mi_")) else 2 if key.startswith("fid") else 4


def describe(key: str) -> str:
    if "@" in key:
        name, scale = key.split("@")
        return f"{'FID' if name == 'fid' else 'conditional accuracy'} at guidance {float(scale):g}"
    return {"val_mse": "validation MSE", "fid_best": "FID at each run's best guidance",
            "accuracy_best": "conditional accuracy at each run's best guidance (by FID)",
            "mi_excess": "I(class; top expert) above its shuffled-label null, mean over MoE layers, bits"}.get(key, key)


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
    parser.add_argument("--fid-samples", type=int, default=None, help="samples per FID (default: the experiment's)")
    parser.add_argument("--guidance", type=float, nargs="+", default=None,
                        help="the guidance scales of FID and accuracy (default: the experiment's)")
    parser.add_argument("--endpoints", nargs="+", default=None,
                        help="the primary endpoints, stated first in the report: val_mse, fid@S, accuracy@S (S a "
                             "guidance scale of the list), fid_best, accuracy_best (default: the experiment's)")
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
    args.fid_samples = args.fid_samples or experiment.fid_samples
    args.guidance = sorted(args.guidance or experiment.guidance)
    args.endpoints = args.endpoints or list(experiment.endpoints)
    unknown = set(args.models) - set(experiment.models)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)} for --experiment {args.experiment}; "
                     f"known: {list(experiment.models)}")
    known = ["val_mse", "fid_best", "accuracy_best", "mi_excess",
             *(f"{name}@{scale:g}" for name in ("fid", "accuracy") for scale in args.guidance)]
    args.endpoints = [canonical(key) for key in args.endpoints]
    for key in (*args.endpoints, *experiment.secondary):
        if canonical(key) not in known:
            parser.error(f"endpoint {key!r} is not one of {known} (fid@S and accuracy@S need S in --guidance)")
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


def sample_set(model, count: int, steps: int, scale: float, noise_seed: int = 0) -> np.ndarray:
    """uint8 [count, H, W, C]: the labels cycling over the classes, in batches of 500 whose noise is seeded by
    noise_seed * 10000 + the batch index (torch's CPU generator reads 32 bits of a seed); noise seed 0 is
    `promoe.sampling.generate_per_class`'s sample set."""
    batches = per_class_labels(count, model.num_classes).split(500)
    return np.concatenate([to_uint8(generate(model, RectifiedFlow(), labels,
                                             torch.Generator().manual_seed(noise_seed * 10_000 + index), steps, scale))
                           for index, labels in enumerate(batches)])


def guidance_sweep(model, images: np.ndarray, net, args, noise_check: bool) -> dict:
    """FID and conditional accuracy at each guidance scale, and the best scale by FID; with noise_check, the FID at
    each scale again from a second noise seed (how much of a difference the sampling noise alone makes)."""
    labels = per_class_labels(args.fid_samples, model.num_classes)
    fid, accuracy, fid_repeat = {}, {}, {}
    for scale in args.guidance:
        samples = sample_set(model, args.fid_samples, args.sample_steps, scale)
        fid[f"{scale:g}"] = pixel_fid(samples, images, net)
        accuracy[f"{scale:g}"] = conditional_accuracy(samples, labels, net)
        if noise_check:
            fid_repeat[f"{scale:g}"] = pixel_fid(sample_set(model, args.fid_samples, args.sample_steps, scale, 1),
                                                 images, net)
    best = min(fid, key=fid.get)
    return {"fid": fid, "accuracy": accuracy, "best_guidance": float(best), "fid_best": fid[best],
            "accuracy_best": accuracy[best], **({"fid_repeat": fid_repeat} if noise_check else {})}


def swapped_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Another class for every image, each class's images spread over the other classes and every class as often
    a swapped label as a real one (for equal numbers per class: the j-th image of class y becomes y + 1 + j mod 9)."""
    rank = (labels[None, :] == labels[:, None]).tril(-1).sum(1)  # j: how many images of its class come before it
    return (labels + 1 + rank % (num_classes - 1)) % num_classes


def routing_figures(model, seed: int, args) -> dict:
    """Per MoE layer, over conditional sampling without guidance: the expert loads, I(class; expert) with its
    maximum and a shuffled-label null (the same routing, the images' labels permuted), and the routing of the same
    hidden states with each image's label swapped for another class's in the MoE layer's input."""
    if not any(hasattr(block.mlp, "router") for block in model.blocks):
        return {}
    labels = torch.arange(10).repeat_interleave(ROUTING_PER_CLASS)
    swapped = swapped_labels(labels, 10)
    sampled = sample_with_routing(model, RectifiedFlow(), labels, args.sample_steps, seed=seed, swapped_labels=swapped)
    layer = model.blocks[sampled.blocks[0]].mlp
    # Without guidance no token is unconditional: the unconditional expert, if any, cannot be chosen.
    choosable = layer.experts.num_experts - int(getattr(layer.router, "conditional", False))
    share = expert_usage(sampled.experts, labels, 10, choosable)
    null = shuffled_label_information_bits(sampled.experts, labels, 10, choosable, NULL_PERMUTATIONS, seed)
    return {"mi_bits": class_expert_information_bits(share).tolist(),
            "mi_max_bits": class_expert_information_max_bits(10, choosable),
            "mi_null_bits": null.mean(axis=0).tolist(), "mi_null_p95_bits": np.quantile(null, 0.95, axis=0).tolist(),
            "load_share": np.nanmean(share, axis=0).tolist(),
            "mi_swap_class_bits": class_expert_information_bits(
                expert_usage(sampled.swapped_experts, labels, 10, choosable)).tolist(),
            "mi_swap_label_bits": class_expert_information_bits(
                expert_usage(sampled.swapped_experts, swapped, 10, choosable)).tolist()}


def evaluate(ema: Path, run: Path, seed: int, steps: int, held_out, net, args) -> dict:
    """The figures of one run at one milestone, cached beside it (recomputed when the settings change)."""
    experiment = EXPERIMENTS[args.experiment]
    noise_check = seed in experiment.noise_check_seeds
    routing_seed = seed if experiment.routing_noise_seed is None else experiment.routing_noise_seed
    settings = {"fid_samples": args.fid_samples, "sample_steps": args.sample_steps, "val_images": args.val_images,
                "guidance": args.guidance, "noise_check": noise_check, "routing_per_class": ROUTING_PER_CLASS,
                "batch": args.batch, "ema_mtime_ns": ema.stat().st_mtime_ns,
                **({} if experiment.routing_noise_seed is None else {"routing_noise_seed": routing_seed})}
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
              **guidance_sweep(model, images, net, args, noise_check), **routing_figures(model, routing_seed, args)}
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
    return [value for r in results if (value := endpoint_value(r, key)) is not None]


def paired(runs, name: str, base: str, key: str) -> list[float]:
    """Per seed, `name`'s figure minus `base`'s: runs of one seed share data order, noise and initial draws, so the
    difference removes most of the seed-to-seed spread."""
    by_seed = {r["seed"]: r for r in runs[base]}
    return [endpoint_value(r, key) - endpoint_value(by_seed[r["seed"]], key) for r in runs[name]
            if r["seed"] in by_seed and endpoint_value(r, key) is not None
            and endpoint_value(by_seed[r["seed"]], key) is not None]


def paired_interval(differences: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of paired differences with its t-based confidence interval (Student's t with
    n - 1 degrees of freedom, the sample standard deviation); nan bounds for fewer than 2 pairs."""
    mean = float(np.mean(differences)) if differences else float("nan")
    if len(differences) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf((1 + level) / 2, len(differences) - 1) * np.std(differences, ddof=1) / np.sqrt(len(differences))
    return mean, mean - half, mean + half


def verdict(candidate: str, reference: str, low: float, high: float, lower_better: bool) -> str:
    """From the interval alone: a model is better only when the interval excludes 0."""
    if np.isnan(low):
        return "no evidence either way (no interval from one pair)"
    if low <= 0 <= high:
        return "no evidence either way"
    candidate_lower = high < 0
    return f"**{candidate if candidate_lower == lower_better else reference} better**"


def ordering(runs, candidate: str, reference: str, key: str, level: float) -> str:
    """One row of the paired-difference table: `candidate` minus `reference` on `key`, per seed, mean, the CI at
    `level` and the verdict from the interval."""
    digits = digits_of(key)
    differences = paired(runs, candidate, reference, key)
    if not differences:
        return f"| {candidate} − {reference} | {describe(key)} | not measured | | | |"
    mean, low, high = paired_interval(differences, level)
    interval = "–" if np.isnan(low) else f"[{low:+.{digits}f}, {high:+.{digits}f}]"
    per_seed = " / ".join(f"{d:+.{digits}f}" for d in differences)
    better = "lower" if lower_is_better(key) else "higher"
    return (f"| {candidate} − {reference} | {describe(key)} ({better} is better) | {per_seed} | {mean:+.{digits}f} | "
            f"{interval} | {verdict(candidate, reference, low, high, lower_is_better(key))} |")


def orderings_table(runs, pairs, keys, level: float) -> list[str]:
    return [f"| difference | endpoint | per seed | mean | {level * 100:g}% CI (t, paired) | verdict |",
            "|---" * 6 + "|", *(ordering(runs, a, b, key, level) for a, b in pairs for key in keys)]


def mi_cell(results: list[dict]) -> str:
    """Mean over seeds of I(class; expert) in each MoE layer, in bits, with its maximum."""
    if not results or "mi_bits" not in results[0]:
        return "–"
    per_layer = np.mean([r["mi_bits"] for r in results], axis=0)
    return " / ".join(f"{bits:.2f}" for bits in per_layer) + f" (max {results[0]['mi_max_bits']:.2f})"


def summary_table(runs, base: str, guidance: list[float]) -> list[str]:
    lines = [f"| model | train MSE (last 10%) | val MSE | Δ val MSE vs {base} | best guidance | FID at best | "
             "accuracy at best | I(class; expert) per MoE layer, bits | steps/s |", "|---" * 9 + "|"]
    for name, results in runs.items():
        delta = cell(paired(runs, name, base, "val_mse"), 4, "+") if name != base else "–"
        best = ", ".join(f"{r['best_guidance']:g}" for r in results) if len(guidance) > 1 else f"{guidance[0]:g}"
        lines.append(f"| {name} | {cell(values_of(results, 'train_mse'))} | {cell(values_of(results, 'val_mse'))} | "
                     f"{delta} | {best} | {cell(values_of(results, 'fid_best'), 1)} | "
                     f"{cell(values_of(results, 'accuracy_best'), 3)} | {mi_cell(results)} | "
                     f"{cell(values_of(results, 'steps_per_s'), 2)} |")
    return lines


def per_seed_table(runs, guidance: list[float]) -> list[str]:
    header = " | ".join(f"FID / accuracy at {scale:g}" for scale in guidance)
    lines = [f"| model | seed | val MSE | {header} | I(class; expert) per layer |", "|---" * (4 + len(guidance)) + "|"]
    for name, results in runs.items():
        for r in results:
            sweep = " | ".join(f"{r['fid'][f'{s:g}']:.2f} / {r['accuracy'][f'{s:g}']:.3f}" for s in guidance)
            mi = " / ".join(f"{bits:.2f}" for bits in r["mi_bits"]) if "mi_bits" in r else "–"
            lines.append(f"| {name} | {r['seed']} | {r['val_mse']:.4f} | {sweep} | {mi} |")
    return lines


def noise_table(runs, pairs, guidance: list[float]) -> list[str]:
    """The FID of one run from two noise seeds, and of a pair's difference: the measurement's own noise, beside the
    paired differences (the models of a seed draw the same noise, so much of it cancels in their difference)."""
    rows = [(name, r, f"{s:g}") for name, results in runs.items() for r in results if "fid_repeat" in r
            for s in guidance]
    if not rows:
        return []
    lines = ["Measurement noise: the same runs' FID from a second noise seed (same models, same sample count).", "",
             "| model | seed | guidance | FID, noise seed 0 | FID, noise seed 1 | difference |", "|---" * 6 + "|"]
    for name, r, scale in rows:
        first, second = r["fid"][scale], r["fid_repeat"][scale]
        lines.append(f"| {name} | {r['seed']} | {scale} | {first:.2f} | {second:.2f} | {second - first:+.2f} |")
    for candidate, reference in pairs:
        by_seed = {r["seed"]: r for r in runs[reference] if "fid_repeat" in r}
        for r in runs[candidate]:
            if "fid_repeat" in r and r["seed"] in by_seed:
                base = by_seed[r["seed"]]
                for scale in map("{:g}".format, guidance):
                    first = r["fid"][scale] - base["fid"][scale]
                    second = r["fid_repeat"][scale] - base["fid_repeat"][scale]
                    lines.append(f"| {candidate} − {reference} | {r['seed']} | {scale} | {first:+.2f} | {second:+.2f} "
                                 f"| {second - first:+.2f} |")
    return lines + [""]


def routing_table(runs) -> list[str]:
    """Per model and MoE layer, mean over seeds: loads, I(class; expert) beside its shuffled-label null, and the
    routing of the same hidden states under a swapped label."""
    runs = {name: results for name, results in runs.items() if results and "mi_null_bits" in results[0]}
    if not runs:
        return []
    lines = ["| model | MoE layer | token share per expert, most used first | I(class; expert) | shuffled-label null: "
             "mean, 95th pct | label swapped: I(true class; expert) | label swapped: I(swapped label; expert) | max |",
             "|---" * 8 + "|"]
    for name, results in runs.items():
        for layer in range(len(results[0]["mi_bits"])):
            def per_seed(key, results=results, layer=layer):
                return [r[key][layer] for r in results]
            # Expert e of one seed is not expert e of another: each seed's shares sorted, most used first.
            loads = np.mean([sorted(r["load_share"][layer], reverse=True) for r in results], axis=0)
            lines.append(f"| {name} | {layer + 1} | {' '.join(f'{share:.2f}' for share in loads)} | "
                         f"{cell(per_seed('mi_bits'), 3)} | {np.mean(per_seed('mi_null_bits')):.3f}, "
                         f"{np.mean(per_seed('mi_null_p95_bits')):.3f} | {cell(per_seed('mi_swap_class_bits'), 3)} | "
                         f"{cell(per_seed('mi_swap_label_bits'), 3)} | {results[0]['mi_max_bits']:.2f} |")
    return lines + [""]


def patches_of(images: np.ndarray) -> np.ndarray:
    """[N, 49, 16] float: each image's 4x4 patches in the model's token order (row-major), pixels in [0, 1]."""
    n, side = len(images), images.shape[1] // PATCH
    blocks = images.reshape(n, side, PATCH, side, PATCH).transpose(0, 1, 3, 2, 4)
    return blocks.reshape(n, side * side, PATCH * PATCH).astype(np.float64) / 255


def intensity_routing(patches: np.ndarray, experts: int) -> np.ndarray:
    """Each patch to one of `experts` equal-count bins of its mean intensity (the bins' edges: its quantiles)."""
    intensity = patches.mean(-1)
    edges = np.quantile(intensity, np.linspace(0, 1, experts + 1)[1:-1])
    return np.searchsorted(edges, intensity, side="right")


def kmeans_routing(patches: np.ndarray, fit_on: np.ndarray, experts: int, seed: int = 0, rounds: int = 50):
    """Each patch to the nearest of `experts` centres fitted on the patches `fit_on` [M, 16] by Lloyd's k-means,
    started from `experts` of them drawn with `seed`. (An offline fit: the k-means router learns its centroids
    online, inside a model.)"""
    rng = np.random.default_rng(seed)
    centres = fit_on[rng.choice(len(fit_on), experts, replace=False)]
    for _ in range(rounds):
        nearest = ((fit_on[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        centres = np.stack([fit_on[nearest == e].mean(0) if (nearest == e).any() else centres[e]
                            for e in range(experts)])
    return ((patches[..., None, :] - centres) ** 2).sum(-1).argmin(-1)


def class_blind_reference(held_out, train_images: np.ndarray, experts: int, seed: int = 0) -> dict[str, tuple]:
    """Per class-blind router (pixel intensity, k-means on patches): (I(class; expert), the mean of its
    shuffled-label null), in bits, over the patches of ROUTING_PER_CLASS held-out images per class, as the models'
    routing is measured (one top expert per token, `experts` choosable)."""
    images, labels, _ = held_out
    chosen = np.concatenate([np.flatnonzero(labels == label)[:ROUTING_PER_CLASS] for label in range(10)])
    patches, image_labels = patches_of(images[chosen]), torch.from_numpy(labels[chosen]).long()
    fit_on = patches_of(train_images[np.random.default_rng(seed).choice(len(train_images), 1000, replace=False)])
    routings = {"pixel intensity": intensity_routing(patches, experts),
                "k-means on patches": kmeans_routing(patches, fit_on.reshape(-1, PATCH * PATCH), experts, seed)}
    reference = {}
    for name, routing in routings.items():
        as_sampled = torch.from_numpy(routing)[None, None]  # [steps 1, layers 1, images, tokens]
        bits = class_expert_information_bits(expert_usage(as_sampled, image_labels, 10, experts))[0]
        null = shuffled_label_information_bits(as_sampled, image_labels, 10, experts, NULL_PERMUTATIONS, seed)
        reference[name] = (float(bits), float(null.mean()))
    return reference


def class_blind_lines(runs, held_out, args) -> list[str]:
    """The class-blind reference beside the models' I(class; expert), and the experts under LOW_LOAD."""
    moe = {name: results for name, results in runs.items() if results and "mi_bits" in results[0]}
    if not moe:
        return []
    choosable = len(next(iter(moe.values()))[0]["load_share"][0])
    reference = class_blind_reference(held_out, pixel_split(args.data, "train")[0], choosable)
    lines = [f"Class-blind reference: routers that never see the class, over the 4x4 patches of {ROUTING_PER_CLASS} "
             f"held-out images per class, to {choosable} experts as the models' routing is measured. What a routing "
             "reads from the pixels alone.", "",
             "| router | I(class; expert), bits | shuffled-label null, mean | above the null |", "|---" * 4 + "|"]
    for name, (bits, null) in reference.items():
        lines.append(f"| {name} (class-blind) | {bits:.3f} | {null:.3f} | {bits - null:+.3f} |")
    for name, results in moe.items():
        for layer in range(len(results[0]["mi_bits"])):
            bits = [r["mi_bits"][layer] for r in results]
            null = [r["mi_null_bits"][layer] for r in results]
            lines.append(f"| {name}, MoE layer {layer + 1} (mean over seeds) | {np.mean(bits):.3f} | "
                         f"{np.mean(null):.3f} | {np.mean(bits) - np.mean(null):+.3f} |")
    low = [f"{name} seed {r['seed']} layer {layer + 1}: {share:.3f}" for name, results in moe.items()
           for r in results for layer, shares in enumerate(r["load_share"]) for share in shares if share < LOW_LOAD]
    lines += ["", f"Experts under {LOW_LOAD:.0%} of the tokens they could take (per seed, layer and expert): "
              + ("; ".join(low) if low else "none") + ".", ""]
    return lines


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


def plot_guidance(runs, guidance: list[float], out_png: Path) -> None:
    """FID and accuracy against the guidance scale, mean over seeds: where each model's best scale lies."""
    figure, (fid_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, results in runs.items():
        fid = np.mean([[r["fid"][f"{s:g}"] for s in guidance] for r in results], axis=0)
        accuracy = np.mean([[r["accuracy"][f"{s:g}"] for s in guidance] for r in results], axis=0)
        fid_axis.plot(guidance, fid, marker="o", label=name)
        accuracy_axis.plot(guidance, accuracy, marker="o", label=name)
    fid_axis.set_ylabel("Fashion-MNIST FID (lower is better)")
    accuracy_axis.set_ylabel("conditional accuracy (higher is better)")
    for axis in (fid_axis, accuracy_axis):
        axis.set_xlabel("guidance scale")
        axis.grid(alpha=0.3)
    accuracy_axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out_png, dpi=110)
    plt.close(figure)


def routing_map(emas: dict[str, Path], out_png: Path, steps: int, seed: int) -> None:
    """One image per class of MAP_CLASSES from each model (the same starting noise for all), every sampling step's
    experts beside that step's input; rows of one class are adjacent."""
    sampled, experts_in_bank = {}, 1
    for name, ema in emas.items():
        model, _ = load_model(ema)
        sampled[name] = sample_with_routing(model, RectifiedFlow(), torch.tensor(MAP_CLASSES), steps)
        experts_in_bank = max(experts_in_bank, model.blocks[sampled[name].blocks[0]].mlp.experts.num_experts)
    rows = [MapRow(f"{name}\n{CLASS_NAMES[label]}", to_uint8(routed.inputs[:, image]), routed.experts[:, :, image],
                   routed.blocks)
            for image, label in enumerate(MAP_CLASSES) for name, routed in sampled.items()]
    timesteps = next(iter(sampled.values())).timesteps
    draw_maps(rows, list(range(steps)), timesteps, experts_in_bank, BACKBONE["input_size"] // BACKBONE["patch_size"],
              f"Top expert of each patch per MoE layer at each of the {steps} sampling steps (guidance 1), beside that "
              f"step's input x_t; {' and '.join(emas)} (seed-{seed} runs) from the same starting noise per class. "
              "Expert numbers are each model's and each layer's own; the conditional models' unconditional expert "
              "(the last) is not chosen without guidance.", out_png)


def milestone_sections(experiment: Experiment, runs, steps: int, figure_stem: Path, args, held_out) -> list[str]:
    base = next(iter(runs))
    plot_curves(runs, figure_stem.with_name(f"{figure_stem.name}_loss.png"))
    pairs = [(a, b) for a, b in experiment.pairs if a in runs and b in runs]
    lines = [f"## After {steps} steps", "", "Primary endpoints: paired differences over seeds.", "",
             *orderings_table(runs, pairs, args.endpoints, experiment.level), ""]
    if experiment.secondary:
        lines += ["Secondary:", "", *orderings_table(runs, pairs, experiment.secondary, experiment.level), ""]
    lines += ["Per model (mean ± half the spread over seeds):", "", *summary_table(runs, base, args.guidance), "",
              "Per seed:", "", *per_seed_table(runs, args.guidance), "", *noise_table(runs, pairs, args.guidance)]
    routing = routing_table(runs)
    if routing:
        lines += ["Routing per MoE layer, mean over seeds, over conditional sampling without guidance "
                  f"({ROUTING_PER_CLASS} images per class, {args.sample_steps} steps).", "", *routing]
    if experiment.class_blind_reference:
        lines += class_blind_lines(runs, held_out, args)
    lines.append(f"![training curves]({figure_stem.name}_loss.png)")
    if len(args.guidance) > 1:
        plot_guidance(runs, args.guidance, figure_stem.with_name(f"{figure_stem.name}_guidance.png"))
        lines.append(f"![guidance sweep]({figure_stem.name}_guidance.png)")
    return lines + [""]


def write_report(experiment: Experiment, results, args, held_out, process_minutes: float) -> None:
    report = args.report
    report.parent.mkdir(parents=True, exist_ok=True)
    candidates = sorted({a for a, b in experiment.pairs if a in args.models and b in args.models})
    scales = "one fixed scale" if len(args.guidance) == 1 else "each run at its best scale by FID"
    lines = [
        f"# {experiment.title} (regenerated by `python bench/toy_paper.py --experiment {args.experiment}`)", "",
        f"**Primary endpoints** (FID from {args.fid_samples} samples): "
        f"{'; '.join(describe(key) for key in args.endpoints)}, each as the paired "
        f"difference per seed ({', '.join(f'{a} − {b}' for a, b in experiment.pairs if a in candidates)}). "
        + (f"Secondary: {'; '.join(describe(key) for key in experiment.secondary)}; per MoE layer, expert loads "
           "and I(class; expert) with a shuffled-label null and under swapped labels. " if experiment.secondary else "")
        + f"Each difference is stated as its mean over the seeds with a t-based {experiment.level * 100:g}% "
        "confidence interval (Student's t, "
        "n - 1 degrees of freedom); the verdict comes from the interval alone: a model is better when the interval "
        "excludes 0, and there is **no evidence either way** when it contains 0 (or when there is one seed). "
        + experiment.note, "",
        f"Data: {held_out[2]} 28x28 pixels, class-conditional rectified flow. Every model: the demo's backbone "
        "(width 128, depth 6, patch 4: 49 tokens) and recipe (`configs/demo.yaml`: batch "
        f"{args.batch}, AdamW 1.5e-3 after a 50-step warm-up, EMA 0.995 with warm-up), seeds "
        f"{', '.join(map(str, args.seeds))}; nothing tuned per model. Models: "
        + "; ".join(f"{name} = `{zoo}` {overrides or ''}" for name, (zoo, overrides) in experiment.models.items()
                    if name in args.models) + ".",
        "",
        f"On the EMA weights. Runs of one seed share data order, noise and initial draws, so they are paired. Val "
        f"MSE: {args.val_images} held-out test images at 10 stratified timesteps, fixed noise. FID: "
        f"{args.fid_samples} samples (equal per class, {args.sample_steps} Euler steps) against the test split, in "
        "the features of the demo's Fashion-MNIST classifier (`python -m promoe.eval.train_feature_net`): **not "
        "comparable with ImageNet FID**. Accuracy: the share of samples that classifier assigns to the class they "
        f"were drawn for. Both at guidance {', '.join(f'{s:g}' for s in args.guidance)} ({scales}). "
        "I(class; expert): the mutual information between an image's class and the top expert of its tokens, per "
        f"MoE layer, over conditional sampling without guidance ({ROUTING_PER_CLASS} images per class); 0 = the "
        "classes share the experts alike; its maximum (each class to one expert, the classes split as evenly as "
        "possible over the experts that can be chosen) is printed beside it. The shuffled-label null is the same "
        f"routing with the images' labels permuted ({NULL_PERMUTATIONS} permutations): what the measure reads with "
        "no class information, from this many correlated tokens. Label swapped: at every sampling step each MoE "
        "layer routes the same hidden states again with its input modulated (adaLN shift and scale) by another "
        "class's label, each class's images spread over the other nine; if the routing followed the tokens, "
        "I(true class) would stay and I(swapped label) fall to the null; if it followed the label's modulation, the "
        "reverse.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads, torch "
        f"{torch.__version__}; {process_minutes:.1f} min of process time over the invocations that built these "
        "figures (invocations may run side by side; runs trained elsewhere count only their evaluation). Steps/s "
        "come from the training logs and move with any other load on the machine.", "",
    ]
    for steps in args.steps:
        runs = {name: by_steps[steps] for name, by_steps in results.items() if by_steps[steps]}
        stem = report.with_name(f"{report.stem}_{steps}" if len(args.steps) > 1 else report.stem)
        lines += milestone_sections(experiment, runs, steps, stem, args, held_out)
    last = args.steps[-1]
    emas = {name: args.out / f"{slug(name)}_seed{args.seeds[0]}" / f"ema_step{last:07d}.safetensors"
            for name, by_steps in results.items() if by_steps[last] and "mi_bits" in by_steps[last][0]}
    if emas:
        routing_map(emas, report.with_name(f"{report.stem}_routing.png"), args.sample_steps, args.seeds[0])
        lines += [f"![routing map]({report.stem}_routing.png)", ""]
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
        write_report(experiment, results, args, held_out, minutes)


if __name__ == "__main__":
    main()
