"""Activation memory of one MoE layer: the bytes autograd keeps from the forward for the backward, per token.

    python bench/saved_bytes.py                  # every router at XL width, 1024 tokens, fp32, torch/triton/loop
    python bench/saved_bytes.py --json bench/results/saved_bytes_XL_fp32.json
    python bench/saved_bytes.py --models --json bench/results/saved_bytes_models.json   # whole training steps

How it is counted (`SavedTensorBytes`): every tensor that autograd saves for the backward passes through
`torch.autograd.graph.saved_tensors_hooks`' pack hook (aten ops and custom autograd functions alike, the Triton
kernels' custom ops included); each storage is counted once, at its full size, however many tensors view it or
however often it is saved. The layer's parameters and its input x are left out: they are kept whatever the layer
does (x by the block before it). The count is of one forward in training mode (auxiliary losses included) and holds
while the graph lives; nothing is freed before the backward, so this is the layer's share of a training step's peak.
The reference is the dense DiT MLP of the same model (Linear 4D -> GELU(tanh) -> Linear, plain autograd): it keeps
its pre-activation and its GELU output, 2 x 4D values per token (36 KiB at D = 1152 in fp32). KiB = 1024 bytes.
On a machine without a GPU `triton` runs under Triton's interpreter: what its custom ops save is what they save on
a GPU.

With --models, the same count over a whole model's training forward (the rectified-flow loss, auxiliary losses
included) of the demo (configs/demo.yaml) and of ProMoE-S, each against its dense DiT of the same widths: the
activation part of one training step's peak (the parameters, their gradients and AdamW's two moments come on top,
4 x the parameters' bytes; the model's input latents are left out). MiB = 2^20 bytes.
"""

import argparse
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run for the counts

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402  (bench/report.py: JSON, table and chart shared by the bench scripts)

import promoe  # noqa: E402
from promoe.diffusion import RectifiedFlow  # noqa: E402
from promoe.zoo import build_mlp  # noqa: E402

ROUTER_MODELS = {"ProMoE": "ProMoE-{size}", "ProMoE-EC": "ProMoE-EC-{size}", "TC-DiT": "TC-DiT-{size}-E8",
                 "EC-DiT": "EC-DiT-{size}-E8", "DiffMoE": "DiffMoE-{size}-E8"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KIB = 1024


def storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    return str(tensor.device), tensor.untyped_storage().data_ptr()


class SavedTensorBytes:
    """Within the block, the distinct storages autograd saves for backward, less those of `left_out` tensors.

        with SavedTensorBytes(left_out=[x, *layer.parameters()]) as saved:
            y = layer(x)
        saved.total_bytes

    The pack hook keeps the tensor itself (as autograd would), so a counted storage cannot be freed and its address
    reused by another while the count runs."""

    def __init__(self, left_out: Iterable[torch.Tensor] = ()):
        self.left_out = {storage_key(t) for t in left_out}
        self.storages: dict[tuple[str, int], int] = {}
        self.tensors: list[tuple[tuple[int, ...], torch.dtype]] = []  # every saved tensor's shape, for reading
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = storage_key(tensor)
        if key not in self.left_out and key not in self.storages:
            self.storages[key] = tensor.untyped_storage().nbytes()
            self.tensors.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    @property
    def total_bytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def saved_bytes(run: Callable[[torch.Tensor], object], x: torch.Tensor, params: Iterable[torch.Tensor]) -> int:
    """Bytes saved for backward by `run(x)` (one forward with a live graph), x and `params` left out."""
    x = x.detach().requires_grad_()
    with SavedTensorBytes(left_out=[x, *params]) as saved:
        outputs = run(x)
    del outputs  # the graph, and what it saved, goes here
    return saved.total_bytes


def layer_kib_per_token(layer: torch.nn.Module, x_BLD: torch.Tensor, labels_B: torch.Tensor, backend: str | None
                        ) -> float:
    """KiB per token saved for backward by one training forward of `layer` (a MoE layer on `backend`, or a dense MLP
    when backend is None)."""
    num_tokens = x_BLD.shape[0] * x_BLD.shape[1]
    if backend is None:
        nbytes = saved_bytes(layer, x_BLD, layer.parameters())
    else:
        with promoe.dispatch_backend(layer, backend):
            nbytes = saved_bytes(lambda x: layer(x, labels_B), x_BLD, layer.parameters())
    return nbytes / num_tokens / KIB


# The whole models of --models: (name, config overrides, batch), the demo's as configs/demo.yaml trains it.
DEMO_OVERRIDES = dict(input_size=28, patch_size=4, in_channels=1, learn_sigma=False, num_classes=10, hidden_size=128,
                      num_heads=4, depth=6)
MODEL_STEPS = {"demo": ("ProMoE-S", dict(DEMO_OVERRIDES, experts="E8A1S1U1"), 64),
               "demo's DiT": ("DiT-S", DEMO_OVERRIDES, 64),
               "ProMoE-S": ("ProMoE-S", {}, 8),
               "DiT-S": ("DiT-S", {}, 8)}
DENSE_OF = {"demo": "demo's DiT", "ProMoE-S": "DiT-S"}


def model_step_mib(name: str, overrides: dict, batch: int, backend: str) -> float:
    """MiB saved for backward by one training forward of a whole model (parameters and input latents left out)."""
    torch.manual_seed(0)
    model = promoe.build_model(name, **overrides).train()
    config = model.config
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=g)
    labels = torch.randint(0, config.num_classes, (batch,), generator=g)
    with promoe.dispatch_backend(model, backend):
        nbytes = saved_bytes(lambda x: RectifiedFlow().loss(model, x, labels, g), x0,
                             model.parameters())
    return nbytes / 2**20


def model_steps(backends: list[str]) -> list[dict]:
    results = []
    for label, (name, overrides, batch) in MODEL_STEPS.items():
        for backend in backends if label in DENSE_OF else ["torch"]:
            mib = model_step_mib(name, overrides, batch, backend)
            results.append(dict(model=label, backend=backend if label in DENSE_OF else "", batch=batch,
                                saved_mib=mib, saved_mib_per_image=mib / batch))
    dense_mib = {row["model"]: row["saved_mib"] for row in results if row["model"] not in DENSE_OF}
    for row in results:
        row["vs_dense"] = row["saved_mib"] / dense_mib[DENSE_OF.get(row["model"], row["model"])]
    return results


def layer_of(model: str, dtype: torch.dtype, **overrides) -> torch.nn.Module:
    config = promoe.model_config(model, **overrides)
    torch.manual_seed(0)
    layer = build_mlp(config, block_index=1)
    with torch.no_grad():  # initialize_weights belongs to whole models: a lone layer's storage is uninitialised
        for param in layer.parameters():
            param.normal_(std=0.02)
    return layer.to(dtype).train()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["S", "B", "L", "XL"], default="XL")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--routers", nargs="+", choices=ROUTER_MODELS, default=list(ROUTER_MODELS))
    parser.add_argument("--backend", nargs="+", default=["torch", "triton", "loop"])
    parser.add_argument("--overrides", nargs="*", default=[],
                        help="config overrides key=value, e.g. input_size=8 (16 tokens per image: fewer tokens, the "
                             "same widths, for Triton's slow interpreter)")
    parser.add_argument("--models", action="store_true",
                        help="whole training steps: the demo and ProMoE-S against their dense DiTs")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON here (a .md table beside)")
    args = parser.parse_args(argv)
    if args.models:
        run = report.run_record(dict(bench="saved_bytes_models", dtype="fp32"), model_steps(args.backend))
        report.emit(run, args.json, "Bytes saved for backward by one training step's forward, whole model, fp32 "
                    "(MiB; saved-tensor hooks, each storage once, parameters and input latents left out)")
        return

    dtype = DTYPES[args.dtype]
    overrides = dict(report.parse_override(item) for item in args.overrides)
    dense = layer_of(f"DiT-{args.size}", dtype, **overrides)
    config = promoe.model_config(f"DiT-{args.size}", **overrides)
    tokens_per_image = min(args.tokens, (config.input_size // config.patch_size) ** 2)
    num_images = max(1, args.tokens // tokens_per_image)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(num_images, tokens_per_image, config.hidden_size, generator=g).to(dtype)
    labels = torch.randint(0, config.num_classes, (num_images,), generator=g)
    labels[0] = config.num_classes  # one null-label image: the unconditional expert runs too
    dense_kib = layer_kib_per_token(dense, x, labels, None)

    results = [dict(router="dense DiT MLP", backend="", saved_kib_per_token=dense_kib, vs_dense=1.0)]
    for router in args.routers:
        layer = layer_of(ROUTER_MODELS[router].format(size=args.size), dtype, **overrides)
        for backend in args.backend:
            kib = layer_kib_per_token(layer, x, labels, backend)
            results.append(dict(router=router, backend=backend, saved_kib_per_token=kib, vs_dense=kib / dense_kib))
    run = report.run_record(dict(bench="saved_bytes", size=args.size, tokens=x.shape[0] * x.shape[1],
                                 dtype=args.dtype, overrides=overrides), results)
    title = (f"Bytes saved for backward by one {args.size} MoE layer, {x.shape[0] * x.shape[1]} tokens, {args.dtype} "
             "(KiB per token; saved-tensor hooks, each storage once, parameters and the layer's input left out)")
    report.emit(run, args.json, title)


if __name__ == "__main__":
    main()
