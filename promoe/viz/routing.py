"""Routing maps: which expert each patch of a generated image runs, per MoE layer and sampling step, and how much
each class uses each expert. The picture that tells whether experts specialise.

    python -m promoe.viz.routing --ckpt runs/demo/checkpoints/step_0000600 --class 3 --out runs/demo/routing

writes `routing_class3.png` (rows: images of class 3; columns: MoE layer x noise level; each panel the final
image with the expert of every patch over it), and `routing_usage.md` / `.json`: per MoE layer, the share of
tokens each class sends to each expert (largest gate), with the entropy of each class's usage in bits (0: the
class uses one expert; log2(E): it spreads evenly).
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from promoe.diffusion import OBJECTIVES  # noqa: E402
from promoe.moe.record import record_routing  # noqa: E402
from promoe.sampling import Decoder, generate, is_latent_model, load_model, objective_of, to_uint8  # noqa: E402


@torch.no_grad()
def sample_with_routing(model, objective, labels: torch.Tensor, steps: int, seed: int = 0):
    """(images [B, C, H, W] in the model's space, experts [steps, layers, B, T] long: the top expert of every
    token at every sampling step, -1 where no expert took the token; the MoE layers' block indices)."""
    with record_routing(model, tokens=True) as routing:
        images = generate(model, objective, labels, torch.Generator().manual_seed(seed), steps, cfg_scale=1.0)
    if not routing:
        raise ValueError("the model has no MoE layer: nothing routes")
    experts = torch.stack([torch.stack(layer.top_expert_N) for layer in routing], dim=1)  # no guidance: one pass
    return images, experts.view(steps, len(routing), len(labels), -1).cpu(), [layer.block for layer in routing]


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


def draw_maps(pictures: np.ndarray, experts: torch.Tensor, blocks: list[int], shown_steps: list[int],
              num_experts: int, patch_grid: int, title: str, out_png: Path) -> None:
    """pictures uint8 [B, H, W, C]; experts [steps, layers, B, T]. One row per image, one panel per (layer, step)."""
    columns = [(layer, step) for layer in range(len(blocks)) for step in shown_steps]
    rows = len(pictures)
    figure, axes = plt.subplots(rows, len(columns), figsize=(1.6 * len(columns), 1.6 * rows + 0.6), squeeze=False)
    colours = plt.get_cmap("tab20", max(num_experts, 2))
    height, width = pictures.shape[1:3]
    for row, picture in enumerate(pictures):
        for column, (layer, step) in enumerate(columns):
            axis = axes[row, column]
            grid = experts[step, layer, row].view(patch_grid, patch_grid).numpy()
            axis.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray")
            masked = np.ma.masked_less(grid, 0)
            axis.imshow(masked, cmap=colours, vmin=-0.5, vmax=num_experts - 0.5, alpha=0.55,
                        extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(f"block {blocks[layer]}\nstep {step}", fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours(e)) for e in range(num_experts)]
    figure.legend(handles, [f"e{e}" for e in range(num_experts)], loc="lower center", ncol=min(num_experts, 10),
                  fontsize=7, frameon=False)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    figure.savefig(out_png, dpi=130)
    plt.close(figure)


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
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        model, config = load_model(args.ckpt, args.model)
        objective = objective_of(config, args.objective)
    except (FileNotFoundError, ValueError) as error:  # a wrong path, file or option: the message says which
        raise SystemExit(f"error: {error}") from None
    if not 0 <= args.label < model.num_classes:
        raise SystemExit(f"--class {args.label} outside 0..{model.num_classes - 1}")
    decoder = Decoder(args.vae, is_latent_model(config), torch.device("cpu"))
    classes = range(model.num_classes) if model.num_classes <= 10 else [args.label]
    labels = torch.tensor([args.label] * args.images + [c for c in classes for _ in range(args.per_class)])
    images, experts, blocks = sample_with_routing(model, objective, labels, args.steps, args.seed)
    num_experts = model.blocks[blocks[0]].mlp.experts.num_experts
    shown = sorted({min(args.steps - 1, max(0, round((1 - level) * args.steps))) for level in args.show})

    args.out.mkdir(parents=True, exist_ok=True)
    pictures = to_uint8(decoder(images[: args.images]))
    patch_grid = model.config.input_size // model.patch_size
    map_png = args.out / f"routing_class{args.label}.png"
    draw_maps(pictures, experts[:, :, : args.images], blocks, shown, num_experts, patch_grid,
              f"class {args.label}: expert of each patch (largest gate), {args.steps} sampling steps", map_png)
    share = expert_usage(experts[:, :, args.images:], labels[args.images:], model.num_classes, num_experts)
    (args.out / "routing_usage.md").write_text(usage_markdown(share, blocks))
    (args.out / "routing_usage.json").write_text(json.dumps(
        {"blocks": blocks, "share": np.nan_to_num(share, nan=-1).tolist(), "steps": args.steps,
         "per_class": args.per_class, "checkpoint": str(args.ckpt)}, indent=1))
    print(f"wrote {map_png}, {args.out / 'routing_usage.md'}")


if __name__ == "__main__":
    main()
