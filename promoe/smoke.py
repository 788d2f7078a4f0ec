"""A forward/backward smoke run of a small ProMoE on the CPU: the README's first command until the training
driver lands. It checks what a newcomer needs to trust the install: the model builds, its parameter counts,
a few rectified-flow steps lower the loss, and the loop and torch dispatch backends agree.

    python -m promoe.smoke [--steps 30]
"""

import argparse

import torch
from tqdm import tqdm

import promoe
from promoe.diffusion import RectifiedFlow

SMALL = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=128, num_heads=4, depth=4, num_classes=10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = promoe.build_model("ProMoE-S", **SMALL)
    activated, total = promoe.count_params(model)
    print(f"ProMoE-S geometry shrunk to {SMALL}: {activated / 1e6:.2f}M activated / {total / 1e6:.2f}M total")
    xl_activated, xl_total = promoe.count_params(promoe.build_model("ProMoE-XL", device="meta"))
    print(f"at paper size, ProMoE-XL: {xl_activated / 1e6:.2f}M activated / {xl_total / 1e6:.2f}M total")

    # A fixed toy batch: 10 classes, each a different smooth pattern, so the loss can go down in a few steps.
    labels = torch.arange(args.batch) % 10
    grid = torch.linspace(0, 3.14, 16)
    x0 = torch.sin(grid[None, None, :, None] * (labels[:, None, None, None] + 1) + grid[None, None, None, :])
    x0 = x0.expand(-1, 4, -1, -1).contiguous()

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    flow = RectifiedFlow()
    first = None
    for _ in (bar := tqdm(range(args.steps), desc="smoke steps")):
        loss, terms = flow.loss(model, x0, labels, generator)
        mse = terms["mse"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = mse.item() if first is None else first
        bar.set_postfix({k: f"{v.item():.4f}" for k, v in terms.items()})
    print(f"mse {first:.4f} -> {mse.item():.4f} over {args.steps} steps")

    outputs = {}
    for backend in ("loop", "torch"):
        with promoe.dispatch_backend(backend):
            outputs[backend] = model.eval()(x0, torch.full((args.batch,), 500.0), labels)
    difference = (outputs["loop"] - outputs["torch"]).abs().max().item()
    print(f"loop vs torch dispatch: max |difference| {difference:.2e}")
    if not mse.item() < first or difference > 1e-4:
        raise SystemExit("smoke run FAILED: the loss did not go down or the backends disagree")
    print("smoke run OK")


if __name__ == "__main__":
    main()
