"""Memory traffic of one MoE layer, forward and backward: every byte every op reads or writes, against its floor.

    python bench/traffic.py                      # ProMoE at XL width, 512 tokens, fp32, backends torch and triton
    python bench/traffic.py --json bench/results/traffic_XL_fp32.json

The last column, `saved_kib_per_token`, is the activation memory of the same forward: the bytes kept for the
backward (bench/saved_bytes.py, KiB = 1024 bytes).

Every aten op that reaches the dispatcher (views excluded) is charged the bytes of its tensor inputs and outputs,
and every Triton launch the bytes of its tensor arguments. A tensor is charged the memory it spans (a broadcast
dimension, stride 0, counts once; a 0-dim tensor nothing). Ops are split into GEMMs (mm, addmm, bmm, grouped_mm,
..., and the Triton GEMM kernels of `GEMM_KERNELS`, the reads of their fused prologues and epilogues included) and
the rest (the table reports both and their total, so that nothing moves between them unseen); the rest is set
against the non-GEMM floor of the layer (`nongemm_floor`), derived from the shapes below. On a machine without a
GPU `triton` runs under Triton's interpreter: its counts are real (the interpreter's own tensor handling inside a
launch is not counted).

The non-GEMM floor, per token (b bytes per activation element, K slots per token, D width, H expert width,
i = 8 bytes per index, g = 4 bytes per gate), is what must cross memory once outside the GEMMs when bias and GELU
run in the GEMMs' epilogues and the shared expert's output and the gradient sums accumulate there too:

    forward   routing reads x                                  D b
              permute reads x, writes the K permuted rows      (1 + K) D b
              combine reads the K expert outputs, writes y     (K + 1) D b
    backward  combine: reads grad y, the K expert outputs (gate gradient), writes their K gradients
                                                               (1 + 2K) D b
              permute: reads the K row gradients, x (routing and RCL gradients folded in), writes grad x
                                                               (K + 2) D b
    plan      routing writes ids + gates, the plan reads them, writes token index, inverse slot and gate per slot,
              the permute / combine read it once, forward and backward
                                                               2 K (i + g) + 4 K (2 i + g)
    floor = (6K + 5) D b + 2K(i + g) + 4K(2i + g)      = 11 D b + 104 bytes for K = 1

With bias + GELU(tanh) as standalone passes (as the torch backend runs them, grouped_mm having no epilogue, and
every backend the shared expert's; the triton backend's expert GEMMs fuse them), add per slot and for the shared
expert of width H_s: forward reads the up-projection, writes the activation (2 H b),
backward reads the activation gradient and the pre-activation, writes the pre-activation gradient (3 H b):
    floor_standalone = floor + 5 (K H + H_s) b.
"""

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run for the counts

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402  (bench/report.py: JSON, table and chart shared by the bench scripts)
from saved_bytes import SavedTensorBytes  # noqa: E402  (bench/saved_bytes.py: bytes kept for backward)

import promoe  # noqa: E402
from promoe.counters import _VIEWS, OpCounter, TritonLaunchCounter  # noqa: E402
from promoe.zoo import build_mlp  # noqa: E402

GEMMS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm", "aten::mv", "aten::addmv",
         "aten::dot"}
# promoe's Triton GEMMs (promoe.kernels.expert_mlp), charged as GEMMs with the reads of their fused gather, bias and
# GELU prologues / epilogues: what the floor below assumes runs inside the GEMMs.
GEMM_KERNELS = {"rows_gemm_kernel", "weight_grad_kernel"}
INDEX_BYTES, GATE_BYTES = 8, 4


def spanned_bytes(tensor: torch.Tensor) -> int:
    """Bytes of memory a tensor spans: its elements, a broadcast (stride-0) dimension counted once. A 0-dim tensor
    (a Python number wrapped by the dispatcher, a scalar loss) counts nothing."""
    if tensor.dim() == 0:
        return 0
    elements = 1
    for size, stride in zip(tensor.shape, tensor.stride()):
        if stride != 0:
            elements *= size
    return elements * tensor.element_size() if tensor.numel() else 0


def tensor_bytes(values) -> int:
    leaves = torch.utils._pytree.tree_leaves(values)
    return sum(spanned_bytes(leaf) for leaf in leaves if isinstance(leaf, torch.Tensor))


class TrafficCounter(OpCounter):
    """OpCounter (host syncs, launches) that also charges every non-view aten op its input + output bytes.

    `items[(phase, kind, name)]` = [bytes, calls], kind "gemm", "aten" or "triton"; `phase` is set by the caller.
    """

    def __init__(self):
        super().__init__()
        self.phase = "fwd"
        self.items: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])

    def add(self, kind: str, name: str, nbytes: int) -> None:
        item = self.items[(self.phase, kind, name)]
        item[0] += nbytes
        item[1] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("promoe::") and not self.paused:
            return self.inside_custom_op(func, args, kwargs)
        if self.paused or name in _VIEWS:
            return super().__torch_dispatch__(func, types, args, kwargs)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.add("gemm" if name in GEMMS else "aten", name.removeprefix("aten::"),
                 tensor_bytes((args, kwargs)) + tensor_bytes(out))
        return out

    def inside_custom_op(self, func, args, kwargs):
        """promoe's custom ops (promoe::permute, ...) are charged for what runs inside them: their Triton launches
        (below) and the aten ops of their Python implementation, which the dispatcher would hide from this mode."""
        device = next((leaf.device for leaf in torch.utils._pytree.tree_leaves(args)
                       if isinstance(leaf, torch.Tensor)), torch.device("cpu"))
        key = torch._C.DispatchKey.CUDA if device.type == "cuda" else torch._C.DispatchKey.CPU
        with self:
            return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)

    def total(self, kind: str, phase: str | None = None) -> int:
        return sum(b for (p, k, _), (b, _) in self.items.items() if k == kind and phase in (None, p))


class TritonArgumentBytes(TritonLaunchCounter):
    """Charges each Triton launch the bytes of its tensor arguments, under the kernel's name, to a TrafficCounter."""

    def __init__(self, traffic: TrafficCounter):
        super().__init__(traffic)
        self.traffic = traffic
        self.kernel = "?"

    def record(self, args) -> None:
        super().record(args)
        self.traffic.add("gemm" if self.kernel in GEMM_KERNELS else "triton", self.kernel, tensor_bytes(list(args)))

    def __enter__(self):
        super().__enter__()
        for cls, _ in self._patched:  # name the kernel before the counting launch wrapper records its arguments
            counting_run = cls.run

            def run(kernel, *args, _counting_run=counting_run, **kwargs):
                self.kernel = getattr(kernel, "fn", kernel).__name__.lstrip("_")
                return _counting_run(kernel, *args, **kwargs)

            cls.run = run
        return self


def count_layer(layer, backend: str, x_BLD: torch.Tensor, labels_B: torch.Tensor,
                grad_BLD: torch.Tensor) -> TrafficCounter:
    """Traffic of one forward and one backward of the layer alone (the upstream gradient is given, not computed)."""
    x = x_BLD.detach().requires_grad_()
    with TrafficCounter() as traffic, TritonArgumentBytes(traffic), promoe.dispatch_backend(layer, backend):
        with SavedTensorBytes(left_out=[x, *layer.parameters()]) as saved:  # beside the traffic, what backward keeps
            out, aux = layer(x, labels_B)
        traffic.saved_bytes = saved.total_bytes
        traffic.phase = "bwd"
        losses = list(aux.values())
        torch.autograd.backward([out, *losses], [grad_BLD, *(torch.ones_like(loss) for loss in losses)])
    return traffic


def nongemm_floor(num_tokens: int, dim: int, top_k: int, itemsize: int, expert_hidden: int = 0,
                  shared_hidden: int = 0) -> int:
    """The module docstring's floor in bytes; with expert_hidden / shared_hidden, floor_standalone."""
    rows = (6 * top_k + 5) * dim * itemsize
    plan = 2 * top_k * (INDEX_BYTES + GATE_BYTES) + 4 * top_k * (2 * INDEX_BYTES + GATE_BYTES)
    bias_gelu = 5 * (top_k * expert_hidden + shared_hidden) * itemsize
    return num_tokens * (rows + plan + bias_gelu)


def summarise(traffic: TrafficCounter, num_tokens: int, floor: int, floor_standalone: int) -> dict:
    nongemm = traffic.total("aten") + traffic.total("triton")
    per_token = lambda b: b / num_tokens / 1000  # noqa: E731  (KB per token)
    return dict(gemm_kb_per_token=per_token(traffic.total("gemm")), nongemm_kb_per_token=per_token(nongemm),
                total_kb_per_token=per_token(traffic.total("gemm") + nongemm),
                triton_kb_per_token=per_token(traffic.total("triton")),
                fwd_nongemm_kb_per_token=per_token(traffic.total("aten", "fwd") + traffic.total("triton", "fwd")),
                bwd_nongemm_kb_per_token=per_token(traffic.total("aten", "bwd") + traffic.total("triton", "bwd")),
                floor_kb_per_token=per_token(floor), nongemm_vs_floor=nongemm / floor,
                floor_standalone_kb_per_token=per_token(floor_standalone),
                nongemm_vs_floor_standalone=nongemm / floor_standalone, host_syncs=traffic.host_syncs,
                saved_kib_per_token=traffic.saved_bytes / num_tokens / 1024)


def largest_items(traffic: TrafficCounter, num_tokens: int, count: int) -> list[dict]:
    rows = [dict(phase=phase, kind=kind, op=name, calls=calls, kb_per_token=nbytes / num_tokens / 1000)
            for (phase, kind, name), (nbytes, calls) in traffic.items.items() if kind != "gemm"]
    return sorted(rows, key=lambda r: -r["kb_per_token"])[:count]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ProMoE-XL")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--backend", nargs="+", default=["torch", "triton"])
    parser.add_argument("--top", type=int, default=12, help="rows of the largest-items table per backend")
    parser.add_argument("--overrides", nargs="*", default=[], help="config overrides key=value, e.g. hidden_size=64")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON here (a .md table beside)")
    args = parser.parse_args(argv)

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    overrides = dict(report.parse_override(item) for item in args.overrides)
    config = promoe.model_config(args.model, **overrides)
    torch.manual_seed(0)
    layer = build_mlp(config, block_index=1)
    with torch.no_grad():  # initialize_weights belongs to whole models: a lone layer's storage is uninitialised
        for param in layer.parameters():
            param.normal_(std=0.02)
    layer = layer.to(dtype).train()
    g = torch.Generator().manual_seed(0)
    tokens_per_image = min(args.tokens, (config.input_size // config.patch_size) ** 2)
    num_images = max(1, args.tokens // tokens_per_image)
    x = torch.randn(num_images, tokens_per_image, config.hidden_size, generator=g).to(dtype)
    labels = torch.randint(0, config.num_classes, (num_images,), generator=g)
    labels[0] = config.num_classes  # one null-label image: the unconditional expert runs too
    grad = torch.randn(x.shape, generator=g).to(dtype)
    num_tokens, dim = num_images * tokens_per_image, config.hidden_size
    top_k = config.expert_spec.activated
    itemsize = x.element_size()
    floor = nongemm_floor(num_tokens, dim, top_k, itemsize)
    floor_standalone = nongemm_floor(num_tokens, dim, top_k, itemsize, layer.experts.w_up_EDH.shape[2],
                                     layer.shared.fc1.out_features if layer.shared is not None else 0)

    results, items = [], {}
    for backend in args.backend:
        layer.zero_grad(set_to_none=True)
        traffic = count_layer(layer, backend, x, labels, grad)
        results.append(dict(backend=backend, **summarise(traffic, num_tokens, floor, floor_standalone)))
        items[backend] = largest_items(traffic, num_tokens, args.top)
    run = report.run_record(dict(bench="traffic", model=args.model, tokens=num_tokens, dtype=args.dtype,
                                 top_k=top_k, dim=dim, overrides=overrides), results)
    run["largest_items"] = items
    title = f"{args.model} MoE layer traffic, {num_tokens} tokens, {args.dtype}, forward + backward (KB per token)"
    table = report.markdown_table(run, title)
    for backend, rows in items.items():
        table += (f"\nLargest non-GEMM items, `{backend}`:\n\n"
                  "| phase | kind | op | calls | KB/token |\n|---|---|---|---|---|\n")
        table += "".join(f"| {r['phase']} | {r['kind']} | {r['op']} | {r['calls']} | {r['kb_per_token']:.1f} |\n"
                         for r in rows)
    print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(run, indent=2))
        args.json.with_suffix(".md").write_text(table)
        print(f"wrote {args.json} and its .md")


if __name__ == "__main__":
    main()
