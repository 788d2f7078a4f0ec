"""The whole ProMoE-S training step as our driver runs it, against the official ProMoE code's step as its own
train.py runs it and against our DiT-S: one process, fp32, the same batch (latents 4x32x32 -> 256 tokens).

    python bench/official_step.py --official /tmp/official --batch 8 --repeats 7 \
        --json bench/results/official_step_S.json [--profile 2]

--official is a checkout of https://github.com/ali-vilab/ProMoE (nothing of it is copied here: its model is
imported from that path). Its own train.py cannot be imported (torchvision, colorlog, NCCL), so its step is
restated below from it, line for line in effect:
  labels dropped inside the model (p = 0.1, its LabelEmbedder); u ~ sigmoid(N(0, 1)), sigma = u (shift 1),
  t = 1000 sigma; x_t = (1 - sigma) z + sigma noise on [B, 4, 1, 32, 32]; forward through DDP; MSE of the first 4
  output channels against noise - z, per sample then averaged; the routing contrastive loss enters through its
  AddAuxiliaryLoss (gradient 1 in backward); loss.item() for its TensorBoard; backward; clip_grad_norm_(0.5);
  AdamW(lr 1e-4, betas (0.9, 0.999), weight decay 0, fused=True) step; zero_grad; EMA 0.9999 over the
  parameters, buffers copied.
Ours is `train_step` of train/run.py itself (built by its `parallelise`: on one fp32 process, without FSDP2; dispatch
`torch`, fused AdamW, clip 0.5, EMA 0.9999, the logged scalars reduced), on an in-memory data set of the batch's
latents. Both run on a gloo group of one process, as each train.py would on one device (the official one in DDP).
With --compile, our two models also run with train.compile (each block compiled). With --diagnostics
(default) the official model also runs without DDP and ours with FSDP2 (which the driver applies only on several
ranks or in bf16), to tell the wrappers' cost from the models'.

The candidates run interleaved (A, B, C, A, B, C, ...) after --warmup steps each; medians, min and max per step.
"""

import argparse
import copy
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "train"))
sys.path.insert(0, str(ROOT / "bench"))
import report  # noqa: E402
import run as driver  # noqa: E402  (train/run.py)

from promoe.diffusion import make_objective  # noqa: E402
from promoe.distributed import init_distributed  # noqa: E402
from promoe.moe.layer import describe_dispatch, place_dispatch  # noqa: E402
from promoe.train_config import load_config  # noqa: E402
from promoe.training.ema import EMA  # noqa: E402
from promoe.training.optimizer import make_optimizer  # noqa: E402
from promoe.training.parallel import (  # noqa: E402
    build_on_meta,
    materialise_and_initialise,
    parallelise,
    running_buffers,
    shard,
)
from promoe.zoo import count_params  # noqa: E402

OFFICIAL_MODEL = Path("models/models_ProMoE_TC.py")
# configs/004_ProMoE_S.yaml over config.py's DiT_S_config, as its train.py merges them (model "ProMoE_TC_S").
OFFICIAL_S = dict(input_size=32, num_classes=1000, patch_size=2, depth=12, hidden_size=384, num_heads=6,
                  mlp_ratio=4, use_swiglu=False, qk_norm=False)
OFFICIAL_MOE_S = dict(num_routed_experts=12, moe_intermediate_size=768, shared_expert_intermediate_size=768,
                      load_balance_loss_coef=0, norm_topk_prob=False, seq_aux=False, use_shared_expert=True,
                      interleave=True, init_MoeMLP=False, top_k=1, router_weight_mode="identity",
                      routing_contrastive_lam=1, use_top_k_for_routing_contrastive=True,
                      routing_contrastive_temperature=0.07)


class AttrDict(dict):
    """The official config is an EasyDict: its model reads MoE_config both as keywords and as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class PatchEmbed(nn.Module):
    """Stands in for timm's PatchEmbed, which the official model imports (timm needs torchvision, which does not
    import beside torch 2.13 CPU): a stride-p convolution, flattened to tokens (N, T, D); the same maths."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, bias=True):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, bias=bias)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def import_official(path: Path):
    """The official DiT class of ProMoE (token choice), imported from a checkout at `path`."""
    if not (path / OFFICIAL_MODEL).is_file():
        raise SystemExit(f"{path} holds no {OFFICIAL_MODEL}: pass --official a checkout of "
                         "https://github.com/ali-vilab/ProMoE (e.g. git archive of its repository)")
    timm = types.ModuleType("timm")
    timm.models = types.ModuleType("timm.models")
    timm.models.vision_transformer = types.ModuleType("timm.models.vision_transformer")
    timm.models.vision_transformer.PatchEmbed = PatchEmbed
    sys.modules.update({"timm": timm, "timm.models": timm.models,
                        "timm.models.vision_transformer": timm.models.vision_transformer})
    sys.path.insert(0, str(path))
    from models.models_ProMoE_TC import DiT  # noqa: PLC0415

    return DiT


def official_counts(model) -> tuple[int, int]:
    """(activated, total) as the paper's Table 2: a token runs its top-1 routed expert and the shared one; the other
    11 routed experts and the unconditional one are inactive. pos_embed is a (frozen) parameter there."""
    total = sum(p.numel() for p in model.parameters())
    inactive = sum(sum(p.numel() for e in block.mlp.experts[1:] for p in e.parameters())
                   for block in model.blocks if block.use_moe)
    return total - inactive, total


def official_candidate(DiT, x0, labels, ddp: bool):
    """One step of the official train.py on the batch (x0 [B, 4, 32, 32], labels [B]), restated (module docstring)."""
    torch.manual_seed(0)
    model = DiT(**OFFICIAL_S, MoE_config=AttrDict(OFFICIAL_MOE_S))
    model_ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0, fused=True)
    counts = official_counts(model)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    wrapped.train()
    z = x0.unsqueeze(2)  # [B, 4, 1, 32, 32], as its latents arrive

    def step():
        sigma = torch.sigmoid(torch.normal(0.0, 1.0, size=(len(labels),)))  # logit_normal, shift 1
        t, s = sigma * 1000, sigma.view(-1, 1, 1, 1, 1)
        noise = torch.randn_like(z)
        output = wrapped((1.0 - s) * z + s * noise, t, context=labels, use_gradient_checkpointing=False)
        prediction = output.chunk(2, dim=1)[0].unsqueeze(2)  # learn_sigma: the first 4 channels
        per_sample = torch.stack([e.mean() for e in (prediction - (noise - z)) ** 2])
        loss = sum(per_sample) / len(per_sample)
        loss.item()  # its TensorBoard scalar
        loss.backward()
        clip_grad = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # noqa: F841
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            ema = dict(model_ema.named_parameters())
            for name, p in model.named_parameters():
                ema[name].mul_(0.9999).add_(p.data, alpha=1 - 0.9999)
            ema_buffers = dict(model_ema.named_buffers())
            for name, b in model.named_buffers():
                ema_buffers[name].copy_(b)

    return step, counts


class Latents:
    """The batch's latents in memory, with the `batch` contract of promoe's data sets (no posterior noise: the
    official side is fed the same fixed latents)."""

    name = "fixed latents"

    def __init__(self, x0, labels):
        self.x0, self.labels = x0, labels

    def __len__(self):
        return len(self.x0)

    def batch(self, indices, generator, rows=slice(None)):
        return self.x0[indices[rows]], self.labels[indices[rows]]


def our_candidate(name: str, x0, labels, compiled: bool = False, forced_fsdp: bool = False):
    """train/run.py's train_step on model `name`, built as its main() builds it (`parallelise`; each block compiled
    with `compiled`, as train.compile does). With `forced_fsdp`, fully_shard is applied although one fp32 process
    does not need it (what the driver did before): the wrapper's cost."""
    config = load_config(ROOT / "configs" / ("promoe_s.yaml" if name == "ProMoE-S" else "dit_s.yaml"),
                         [f"train.global_batch={len(x0)}", "train.precision=fp32", "train.seed=0",
                          f"train.compile={compiled}"])
    device = torch.device("cpu")
    model = build_on_meta(config)
    if forced_fsdp:
        shard(model, torch.float32, reshard=False)
        materialise_and_initialise(model, config, device)
    else:
        parallelise(model, config, device)
    place_dispatch(model, device)
    counts = count_params(build_on_meta(config))
    return driver_step(model, config, x0, labels, device), counts, describe_dispatch(model)


def driver_step(model, config, x0, labels, device):
    """train/run.py's train_step on `model` with its optimizer and EMA, over the in-memory batch, as a closure."""
    model.train()
    optimizer = make_optimizer(model, config.optim)
    ema = EMA(model, config.train.ema_decay, config.train.ema_warmup)
    objective, stats, dataset = make_objective(config.train.objective), running_buffers(model), Latents(x0, labels)
    steps = iter(range(10**9))

    def step():
        driver.train_step(model, optimizer, ema, objective, dataset, stats, config, next(steps), device)

    return step


def time_interleaved(candidates: dict, warmup: int, repeats: int) -> tuple[dict, dict]:
    """(wall seconds, process CPU seconds) of each step of each candidate after warm-up. On a loaded machine the
    CPU time is the steadier one: it leaves out the time the process waits for a core."""
    wall, cpu = {name: [] for name in candidates}, {name: [] for name in candidates}
    for rep in range(warmup + repeats):
        for name, (step, *_) in candidates.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            if rep >= warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        if rep >= warmup:
            print(f"round {rep + 1 - warmup}/{repeats}: " + ", ".join(
                f"{n} {wall[n][-1]:.2f} s ({cpu[n][-1]:.2f} s CPU)" for n in candidates), file=sys.stderr, flush=True)
    return wall, cpu


def profile(step, steps: int) -> dict[str, float]:
    """Self CPU milliseconds per step of each aten op (and each profiled region) over `steps` steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return {e.key: e.self_cpu_time_total / 1000 / steps for e in prof.key_averages()}


def profile_table(profiles: dict[str, dict[str, float]], first: str, second: str, top: int) -> str:
    """Top ops by self CPU time of each, and the largest differences second - first."""
    a, b = profiles[first], profiles[second]
    lines = [f"#### Top {top} ops by self CPU time (ms per step)", ""]
    for name, p in ((first, a), (second, b)):
        lines += [f"{name}: total {sum(p.values()):.0f} ms per step", "", "| op | ms | share |", "|---|---|---|"]
        total = sum(p.values())
        ranked = sorted(p.items(), key=lambda kv: -kv[1])[:top]
        lines += [f"| {op} | {ms:.1f} | {ms / total:.1%} |" for op, ms in ranked]
        lines.append("")
    diff = {op: b.get(op, 0.0) - a.get(op, 0.0) for op in set(a) | set(b)}
    lines += [f"#### Largest differences, {second} minus {first} (ms per step)", "",
              f"| op | {first} | {second} | difference |", "|---|---|---|---|"]
    for op, d in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:top]:
        lines.append(f"| {op} | {a.get(op, 0.0):.1f} | {b.get(op, 0.0):.1f} | {d:+.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, default=None, help="checkout of github.com/ali-vilab/ProMoE")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-diagnostics", dest="diagnostics", action="store_false",
                        help="leave out the official model without DDP and ours with FSDP2")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="then profile STEPS steps of the official ProMoE-S, our ProMoE-S and our DiT-S step "
                             "(torch.profiler): ours against each of the others")
    parser.add_argument("--compile", action="store_true",
                        help="also our ProMoE-S and DiT-S with train.compile (their first step, the compile, is a "
                             "warm-up step)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.official is None:
        raise SystemExit("--official PATH is needed: a checkout of https://github.com/ali-vilab/ProMoE, e.g.\n"
                         "  mkdir -p /tmp/official && git --git-dir=PATH/TO/ProMoE.git archive HEAD | "
                         "tar -x -C /tmp/official")
    DiT = import_official(args.official.resolve())
    init_distributed()  # gloo, one process: DDP and FSDP2 both need a group

    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch, 4, 32, 32, generator=generator)
    labels = torch.randint(0, 1000, (args.batch,), generator=generator)

    candidates = {"official ProMoE-S": (*official_candidate(DiT, x0, labels, ddp=True), "official loop")}
    candidates["ours ProMoE-S"] = our_candidate("ProMoE-S", x0, labels)
    candidates["ours DiT-S"] = our_candidate("DiT-S", x0, labels)
    if args.compile:
        candidates["ours ProMoE-S, compiled"] = our_candidate("ProMoE-S", x0, labels, compiled=True)
        candidates["ours DiT-S, compiled"] = our_candidate("DiT-S", x0, labels, compiled=True)
    if args.diagnostics:
        candidates["official ProMoE-S, no DDP"] = (*official_candidate(DiT, x0, labels, ddp=False), "official loop")
        candidates["ours ProMoE-S, FSDP2"] = our_candidate("ProMoE-S", x0, labels, forced_fsdp=True)
    for name, (_, (activated, total), dispatch) in candidates.items():
        print(f"{name}: {activated / 1e6:.2f}M activated / {total / 1e6:.2f}M total parameters, dispatch {dispatch}",
              file=sys.stderr)

    wall, cpu = time_interleaved(candidates, args.warmup, args.repeats)
    median = {name: statistics.median(v) for name, v in wall.items()}
    median_cpu = {name: statistics.median(v) for name, v in cpu.items()}
    official, dense = "official ProMoE-S", "ours DiT-S"
    results = [dict(backend=name, mode="train step", activated_M=candidates[name][1][0] / 1e6,
                    total_M=candidates[name][1][1] / 1e6, s_per_step=median[name], min_s=min(wall[name]),
                    max_s=max(wall[name]), vs_official=median[name] / median[official],
                    vs_our_dit_s=median[name] / median[dense], cpu_s_per_step=median_cpu[name],
                    cpu_vs_official=median_cpu[name] / median_cpu[official],
                    cpu_vs_our_dit_s=median_cpu[name] / median_cpu[dense], images_per_s=args.batch / median[name])
               for name in candidates]
    config = dict(bench="official_step", batch=args.batch, tokens_per_image=256, dtype="fp32", repeats=args.repeats,
                  warmup=args.warmup, official=str(args.official), wall_s=wall, cpu_s=cpu,
                  load_average=os.getloadavg())
    run = report.run_record(config, results)
    title = f"ProMoE-S training step against the official code, batch {args.batch}, fp32 (s per step)"
    report.emit(run, args.json, title)

    if args.profile:
        names = ["official ProMoE-S", "ours ProMoE-S", "ours DiT-S"]
        profiles = {name: profile(candidates[name][0], args.profile) for name in names}
        table = (profile_table(profiles, "official ProMoE-S", "ours ProMoE-S", top=20) + "\n"
                 + profile_table(profiles, "ours DiT-S", "ours ProMoE-S", top=20))
        print(table)
        if args.json is not None:
            args.json.with_name(args.json.stem + "_profile.md").write_text(table)
            args.json.with_name(args.json.stem + "_profile.json").write_text(json.dumps(profiles, indent=1))


if __name__ == "__main__":
    main()
