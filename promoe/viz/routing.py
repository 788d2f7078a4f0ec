"""Routing maps: which expert each patch of a generated image runs, per MoE layer and sampling step, and how much
each class uses each expert. The picture that tells whether experts specialise.

    python -m promoe.viz.routing --ckpt runs/demo/checkpoints/step_0000600 --class 3 --out runs/demo/routing

writes `routing_class3.png` (rows: images of class 3; per noise level, the step's input x_t and, per MoE layer,
the expert of every patch at that step in the legend's colours), and `routing_usage.md` / `.json`: per MoE layer,
the share of tokens each class sends to each expert (largest gate), with the entropy of each class's usage in bits
(0: the class uses one expert; log2(E): it spreads evenly).
"""

import argparse
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from promoe.diffusion import OBJECTIVES  # noqa: E402
from promoe.errors import Refusal, exits_with_message, write_text_atomically  # noqa: E402
from promoe.moe.layer import MoELayer  # noqa: E402
from promoe.moe.record import record_routing  # noqa: E402
from promoe.plots import save_figure  # noqa: E402
from promoe.sampling import Decoder, generate, is_latent_model, load_model, objective_of, to_uint8  # noqa: E402


@dataclass
class RoutedSamples:
    images: torch.Tensor  # [B, C, H, W] in the model's space
    inputs: torch.Tensor  # [steps, B, C, H, W]: x_t, the model's input at each sampling step
    timesteps: torch.Tensor  # [steps]: the model's timestep input at each step
    experts: torch.Tensor  # [steps, layers, B, T] long: each token's top expert, -1 where no expert took it
    blocks: list[int]  # the MoE layers' block indices
    swapped_experts: torch.Tensor | None = None  # as `experts`, the MoE layers re-run under other labels


@torch.no_grad()
def sample_with_routing(model, objective, labels: torch.Tensor, steps: int, seed: int = 0,
                        swapped_labels: torch.Tensor | None = None) -> RoutedSamples:
    """Samples `labels` without guidance (one pass per step) and records the top expert of every token at every
    step, with each step's input.

    swapped_labels: also route the same hidden states as if the label were another: at every step, each MoE block's
    MLP input is made again (`DiTBlock.mlp_input`) from the residual stream it saw, with the modulation of the
    conditioning of the swapped label (the timestep's part unchanged), and only the MoE layer runs on it. Whether a
    layer's class information comes from its tokens or from the label that every token's modulation carries."""
    moe_blocks = [block for block in model.blocks if isinstance(block.mlp, MoELayer)]
    if not moe_blocks:
        raise Refusal("the model has no MoE layer: nothing routes")
    inputs, timesteps, streams = [], [], []  # streams: per forward and MoE block, [x after attention, conditioning c]

    def keep_input(module, args):  # the model's forward(x, t, y)
        inputs.append(args[0].cpu())
        timesteps.append(args[1][0].item())

    def keep_conditioning(block, args):  # a block's forward(x, c, labels_B)
        streams.append([None, args[1]])

    def keep_residual(norm, args):  # the residual stream that its MLP input is made from
        streams[-1][0] = args[0]

    handles = [model.register_forward_pre_hook(keep_input)]
    if swapped_labels is not None:
        for block in moe_blocks:
            handles += [block.register_forward_pre_hook(keep_conditioning),
                        block.norm2.register_forward_pre_hook(keep_residual)]
    try:
        with record_routing(model, tokens=True) as routing:
            images = generate(model, objective, labels, torch.Generator().manual_seed(seed), steps, cfg_scale=1.0)
    finally:
        for handle in handles:
            handle.remove()
    experts = torch.stack([torch.stack(layer.top_expert_N) for layer in routing], dim=1)  # no guidance: one pass
    result = RoutedSamples(images, torch.stack(inputs), torch.tensor(timesteps),
                           experts.view(steps, len(routing), len(labels), -1).cpu(), [layer.block for layer in routing])
    if swapped_labels is not None:
        result.swapped_experts = route_swapped(model, moe_blocks, streams, labels, swapped_labels, steps)
    return result


@torch.no_grad()
def route_swapped(model, moe_blocks, streams, labels: torch.Tensor, swapped: torch.Tensor, steps: int):
    """[steps, layers, B, T]: the top expert of each token when its block's MLP input carries `swapped`'s
    conditioning. streams: per forward, in block order, (x after attention [B, T, D], conditioning c [B, D])."""
    device = next(model.parameters()).device
    labels, swapped = labels.to(device), swapped.to(device)
    label_shift_BD = model.y_embedder(swapped) - model.y_embedder(labels)  # c = t_embedding + y_embedding
    with record_routing(model, tokens=True) as routing:
        for index, (x_BTD, c_BD) in enumerate(streams):
            block = moe_blocks[index % len(moe_blocks)]
            block.mlp(block.mlp_input(x_BTD, block.modulation(c_BD + label_shift_BD)), swapped)
    experts = torch.stack([torch.stack(layer.top_expert_N) for layer in routing], dim=1)
    return experts.view(steps, len(routing), len(labels), -1).cpu()


def expert_usage(experts: torch.Tensor, labels: torch.Tensor, num_classes: int, num_experts: int) -> np.ndarray:
    """share [classes, layers, experts]: of the tokens of each class's images (over all steps), the fraction whose
    top expert is e. NaN rows for classes without images."""
    steps, layers, batch, tokens = experts.shape
    share = np.full((num_classes, layers, num_experts), np.nan)
    for label in labels.unique().tolist():
        chosen = experts[:, :, labels == label].permute(1, 0, 2, 3).reshape(layers, -1)  # [layers, tokens]
        counts = torch.stack([(chosen == e).sum(-1) for e in range(num_experts)], dim=-1).double()
        share[label] = (counts / chosen.shape[-1]).numpy()
    return share


def usage_entropy_bits(share: np.ndarray) -> np.ndarray:
    """Entropy in bits of each usage distribution along the last axis (0 log 0 = 0)."""
    p = share / share.sum(-1, keepdims=True)
    return -(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1)), 0)).sum(-1)


def class_expert_information_bits(share: np.ndarray) -> np.ndarray:
    """I(class; expert) in bits per layer, from share [classes, layers, experts] of classes drawn equally often
    (NaN rows, classes without images, are left out): H(expert) - H(expert | class). Unlike the per-class usage
    entropy, it is 0 when every class uses the experts alike, however unevenly, and it is largest when each class
    has experts of its own."""
    share = share[~np.isnan(share).any(axis=(1, 2))]
    return usage_entropy_bits(share.mean(axis=0)) - usage_entropy_bits(share).mean(axis=0)


def class_expert_information_max_bits(num_classes: int, num_experts: int) -> float:
    """The largest I(class; expert) with `num_classes` equally likely classes and `num_experts` choosable experts.
    The information is convex in the routing for a fixed class distribution, so its maximum is at a deterministic
    routing: each class to one expert, the classes split over the experts as evenly as possible (then H(expert |
    class) = 0 and H(expert) is largest). 10 classes: 2.72 bits over 7 experts (not log2 7 = 2.81), 2.52 over 6,
    1.97 over 4."""
    groups = min(num_classes, num_experts)
    sizes = np.array([num_classes // groups + (group < num_classes % groups) for group in range(groups)])
    return float(usage_entropy_bits(sizes / num_classes)) + 0.0  # not -0.0 for one expert


def shuffled_label_information_bits(experts: torch.Tensor, labels: torch.Tensor, num_classes: int,
                                    num_experts: int, permutations: int = 100, seed: int = 0) -> np.ndarray:
    """[permutations, layers]: I(class; expert) of the same routing with the images' labels permuted: what the
    measure reads when class and expert are independent, given how many images and correlated tokens it sees."""
    generator = torch.Generator().manual_seed(seed)
    return np.stack([class_expert_information_bits(expert_usage(
        experts, labels[torch.randperm(len(labels), generator=generator)], num_classes, num_experts))
        for _ in range(permutations)])


def usage_markdown(share: np.ndarray, blocks: list[int]) -> str:
    lines = []
    for layer, block in enumerate(blocks):
        experts = share.shape[-1]
        lines += [f"### MoE layer in block {block}", "",
                  "| class | " + " | ".join(f"e{e}" for e in range(experts)) + " | entropy (bits) |",
                  "|---" * (experts + 2) + "|"]
        for label, row in enumerate(share[:, layer]):
            if np.isnan(row).any():
                continue
            cells = " | ".join(f"{value:.2f}" for value in row)
            lines.append(f"| {label} | {cells} | {usage_entropy_bits(row):.2f} |")
        lines.append("")
    return "\n".join(lines)


@dataclass
class MapRow:
    name: str  # what the row shows, e.g. "ProMoE, class 3"
    inputs: np.ndarray  # uint8 [steps, H, W, C]: the image's x_t, the model's input at each sampling step
    experts: torch.Tensor  # [steps, layers, T]: the top expert of each token, -1 where no expert took it
    blocks: list[int]  # the MoE layers' block indices


def draw_maps(rows: list[MapRow], shown_steps: list[int], timesteps, num_experts: int, patch_grid: int, title: str,
              out_png: Path) -> None:
    """One row per MapRow; per shown step, the step's input x_t and then the expert of every patch in each MoE
    layer at that step, in opaque colours that are the legend's (grey: no expert took the patch). timesteps: the
    model's timestep input at each step."""
    layers = max(len(row.blocks) for row in rows)
    group = layers + 2  # the input, the layers, a gap
    figure, axes = plt.subplots(len(rows), group * len(shown_steps) - 1, squeeze=False,
                                figsize=(0.75 * (group * len(shown_steps) - 1), 0.8 * len(rows) + 1.1),
                                gridspec_kw={"width_ratios": (([1] * (layers + 1) + [0.25]) * len(shown_steps))[:-1]})
    palette = plt.get_cmap("tab10" if num_experts <= 10 else "tab20").colors[:num_experts]
    colours = matplotlib.colors.ListedColormap(palette)
    colours = colours.with_extremes(bad="0.85")
    for axis in axes.flat:
        axis.axis("off")
    for r, row in enumerate(rows):
        for g, step in enumerate(shown_steps):
            picture = axes[r, g * group]
            picture.imshow(row.inputs[step].squeeze(-1) if row.inputs.shape[-1] == 1 else row.inputs[step],
                           cmap="gray", vmin=0, vmax=255)
            for layer in range(len(row.blocks)):
                grid = row.experts[step, layer].view(patch_grid, patch_grid).numpy()
                axis = axes[r, g * group + 1 + layer]
                axis.imshow(np.ma.masked_less(grid, 0), cmap=colours, vmin=-0.5, vmax=num_experts - 0.5,
                            interpolation="nearest")
                if r == 0:
                    axis.set_title(f"MoE layer {layer + 1}", fontsize=6)
            if r == 0:
                picture.set_title(f"step {step}: x_t\nt = {float(timesteps[step]):.0f}", fontsize=6)
        axes[r, 0].axis("on")
        axes[r, 0].set_xticks([])
        axes[r, 0].set_yticks([])
        axes[r, 0].set_ylabel(row.name, fontsize=6, rotation=0, ha="right", va="center")
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[e]) for e in range(num_experts)]
    figure.legend(handles, [f"expert {e}" for e in range(num_experts)], loc="lower center",
                  ncol=min(num_experts, 10), fontsize=7, frameon=False)
    title = textwrap.fill(title, 40 + 12 * axes.shape[1])
    figure.suptitle(title, fontsize=8)
    height = figure.get_figheight()
    figure.tight_layout(rect=(0, 0.35 / height, 1, 1 - 0.15 * (title.count("\n") + 1) / height), pad=0.3,
                        w_pad=0.1, h_pad=0.2)
    save_figure(figure, out_png, dpi=130)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint folder, ema.safetensors or official .pth")
    parser.add_argument("--model", help="model name, for an official .pth")
    parser.add_argument("--objective", choices=tuple(OBJECTIVES), help="for an official .pth: its objective")
    parser.add_argument("--class", dest="label", type=int, required=True, help="the class whose maps are drawn")
    parser.add_argument("--images", type=int, default=4, help="images of that class in the map")
    parser.add_argument("--per-class", type=int, default=4,
                        help="images per class for the usage table (all classes when there are at most 10)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--show", type=float, nargs="+", default=[0.9, 0.5, 0.1],
                        help="noise levels shown (1 = pure noise, 0 = the final image)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae", help="local AutoencoderKL folder, for latent models")
    parser.add_argument("--out", type=Path, default=Path("routing"))
    args = parser.parse_args(argv)
    for name, least in (("images", 1), ("per_class", 0), ("steps", 1), ("seed", 0)):
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    if not all(0 <= level <= 1 for level in args.show):
        parser.error(f"--show takes noise levels in [0, 1], got {args.show}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file: give a folder")
    return args


@exits_with_message
def main(argv=None) -> None:
    args = parse_args(argv)
    model, config = load_model(args.ckpt, args.model)
    objective = objective_of(config, args.objective)
    if not 0 <= args.label < model.num_classes:
        raise SystemExit(f"error: --class {args.label} outside 0..{model.num_classes - 1}")
    decoder = Decoder(args.vae, is_latent_model(config), torch.device("cpu"))
    classes = range(model.num_classes) if model.num_classes <= 10 else [args.label]
    labels = torch.tensor([args.label] * args.images + [c for c in classes for _ in range(args.per_class)])
    sampled = sample_with_routing(model, objective, labels, args.steps, args.seed)
    num_experts = model.blocks[sampled.blocks[0]].mlp.experts.num_experts
    shown = sorted({min(args.steps - 1, max(0, round((1 - level) * args.steps))) for level in args.show})

    args.out.mkdir(parents=True, exist_ok=True)
    rows = [MapRow(f"image {image}", to_uint8(decoder(sampled.inputs[:, image])), sampled.experts[:, :, image],
                   sampled.blocks) for image in range(args.images)]
    patch_grid = model.config.input_size // model.patch_size
    map_png = args.out / f"routing_class{args.label}.png"
    draw_maps(rows, shown, sampled.timesteps, num_experts, patch_grid,
              f"class {args.label}: expert of each patch (largest gate) at each shown step, beside that step's input "
              f"x_t; {args.steps} sampling steps; MoE layers in blocks {sampled.blocks}", map_png)
    share = expert_usage(sampled.experts[:, :, args.images:], labels[args.images:], model.num_classes, num_experts)
    write_text_atomically(args.out / "routing_usage.md", usage_markdown(share, sampled.blocks))
    write_text_atomically(args.out / "routing_usage.json", json.dumps(
        {"blocks": sampled.blocks, "share": np.nan_to_num(share, nan=-1).tolist(), "steps": args.steps,
         "per_class": args.per_class, "checkpoint": str(args.ckpt)}, indent=1))
    print(f"wrote {map_png}, {args.out / 'routing_usage.md'}")


if __name__ == "__main__":
    main()
