"""Ahead-of-time compile of every kernel for sm_80 and sm_90a, no GPU needed, with ptxas's resource report.

    python -m promoe.kernels.report

compiles each kernel at the dtypes and block sizes that production launches use (bf16 activations, fp32 gates,
the block sizes of `promoe.kernels.launch` at ProMoE-XL's D = 1152), runs the ptxas that Triton bundles with `-v` on the
PTX, and prints registers, spill bytes and shared memory per kernel and architecture. The test suite runs the
same compile and fails on any spill or on shared memory over the architecture's limit.
"""

import argparse
import json
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from promoe.kernels.expert_mlp import (
    _rows_gemm_kernel,
    _weight_grad_kernel,
    dot_switches,
    rows_gemm_blocks,
    weight_grad_blocks,
)
from promoe.kernels.experts import (
    TOKEN_SUMS_BLOCK_N,
    _bias_act_backward_kernel,
    _bias_act_kernel,
    _gather_partials_kernel,
    _segment_sum_kernel,
    _token_sums_backward_kernel,
)
from promoe.kernels.experts import blocks as expert_blocks
from promoe.kernels.fan_out import SUM_BLOCK, _sum_kernel
from promoe.kernels.launch import (
    dim_block,
    expert_block,
    interpreted,
    plan_block,
    routing_backward_blocks,
    routing_blocks,
    token_block,
)
from promoe.kernels.permute import _combine_backward_kernel, _combine_kernel, _permute_kernel
from promoe.kernels.plan import _histogram_kernel, _scatter_kernel
from promoe.kernels.routing import _route_kernel, _scores_backward_kernel, _scores_kernel

ARCHITECTURES = {"sm_80": 80, "sm_90a": 90}
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes per block, opt-in maximum
DIM = 1152  # ProMoE-XL
BLOCK_N, BLOCK_D = token_block(4096), dim_block(DIM)


@dataclass(frozen=True)
class KernelSpec:
    label: str
    kernel: object  # a triton.jit function
    signature: dict[str, str]  # argument -> Triton type, "constexpr" for compile-time constants
    constants: dict[str, object]


@dataclass(frozen=True)
class Resources:
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int


def _route_spec(num_experts: int, top_k: int, activation: int, dtype: str = "bf16") -> KernelSpec:
    signature = {"x_ptr": f"*{dtype}", "protos_ptr": f"*{dtype}", "cond_ptr": "*i8", "ids_ptr": "*i64",
                 "gates_ptr": "*fp32", "num_tokens": "i32", "dim": "i32", "stride_x": "i32", "stride_p": "i32",
                 "alpha": "fp32"}
    block_n, block_d = routing_blocks(4096, DIM, num_experts, 4 if dtype == "fp32" else 2)
    constants = dict(NUM_EXPERTS=num_experts, E_PAD=expert_block(num_experts), TOP_K=top_k, ACTIVATION=activation,
                     CONDITIONAL=True, NATIVE_DOT=dtype != "fp32", BLOCK_N=block_n, BLOCK_D=block_d)
    label = f"route {dtype} E={num_experts} K={top_k} {['identity', 'sigmoid', 'softmax'][activation]}"
    return KernelSpec(label, _route_kernel, signature, constants)


def _combine_spec(top_k: int, has_gates: bool, has_base: bool) -> KernelSpec:
    signature = {"src_ptr": "*bf16", "slot_ptr": "*i64", "gate_ptr": "*fp32", "end_ptr": "*i64", "base_ptr": "*bf16",
                 "out_ptr": "*bf16", "num_tokens": "i32", "dim": "i32", "stride_src": "i32", "stride_base": "i32",
                 "stride_out": "i32"}
    constants = dict(TOP_K=top_k, HAS_GATES=has_gates, HAS_BASE=has_base, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    return KernelSpec(f"combine K={top_k} gates={has_gates} base={has_base}", _combine_kernel, signature, constants)


def _plan_specs(num_experts: int, top_k: int) -> list[KernelSpec]:
    bins = expert_block(num_experts + 1)
    block = dict(BINS=bins, BLOCK_S=plan_block(bins))
    return [
        KernelSpec(f"plan histogram E={num_experts}", _histogram_kernel,
                   {"ids_ptr": "*i64", "hist_ptr": "*i32", "num_slots": "i32", "num_experts": "i32"}, block),
        KernelSpec(f"plan scatter E={num_experts} K={top_k}", _scatter_kernel,
                   {"ids_ptr": "*i64", "block_start_ptr": "*i64", "slot_ptr": "*i64", "order_ptr": "*i64",
                    "token_ptr": "*i64", "expert_ptr": "*i64", "num_slots": "i32", "num_experts": "i32"},
                   dict(TOP_K=top_k, **block)),
    ]


def _scores_spec(num_experts: int) -> KernelSpec:
    signature = {"x_ptr": "*bf16", "protos_ptr": "*bf16", "scores_ptr": "*fp32", "num_tokens": "i32", "dim": "i32",
                 "stride_x": "i32", "stride_p": "i32", "alpha": "fp32"}
    block_n, block_d = routing_blocks(4096, DIM, num_experts, 2)
    constants = dict(NUM_EXPERTS=num_experts, E_PAD=expert_block(num_experts), ACTIVATION=0, NATIVE_DOT=True,
                     BLOCK_N=block_n, BLOCK_D=block_d)
    return KernelSpec(f"scores bf16 E={num_experts} identity", _scores_kernel, signature, constants)


def _scores_backward_spec(num_experts: int, activation: int, dtype: str = "bf16") -> KernelSpec:
    signature = {"x_ptr": f"*{dtype}", "protos_ptr": f"*{dtype}", "grad_ptr": "*fp32", "grad_x_ptr": f"*{dtype}",
                 "partial_p_ptr": "*fp32", "partial_c_ptr": "*fp32", "num_tokens": "i32", "dim": "i32",
                 "stride_x": "i32", "stride_p": "i32", "stride_gx": "i32", "alpha": "fp32"}
    block_n, block_d = routing_backward_blocks(4096, DIM, num_experts)
    constants = dict(NUM_EXPERTS=num_experts, E_PAD=expert_block(num_experts), ACTIVATION=activation,
                     NATIVE_DOT=dtype != "fp32", BLOCK_N=block_n, BLOCK_D=block_d)
    label = f"scores backward {dtype} E={num_experts} {['identity', 'sigmoid', 'softmax'][activation]}"
    return KernelSpec(label, _scores_backward_kernel, signature, constants)


SPECS = [
    _scores_spec(12), _scores_spec(64),
    _scores_backward_spec(12, 0), _scores_backward_spec(64, 2), _scores_backward_spec(12, 0, "fp32"),
    *_plan_specs(13, 1), *_plan_specs(64, 4),
    _route_spec(12, 1, 0), _route_spec(12, 2, 2), _route_spec(64, 4, 1), _route_spec(12, 1, 0, "fp32"),
    KernelSpec("permute", _permute_kernel,
               {"x_ptr": "*bf16", "token_ptr": "*i64", "end_ptr": "*i64", "out_ptr": "*bf16", "num_slots": "i32",
                "dim": "i32", "stride_x": "i32", "stride_out": "i32"}, dict(BLOCK_S=BLOCK_N, BLOCK_D=BLOCK_D)),
    _combine_spec(1, True, True), _combine_spec(4, True, False), _combine_spec(4, False, False),
    KernelSpec("combine backward", _combine_backward_kernel,
               {"grad_y_ptr": "*bf16", "out_ptr": "*bf16", "token_ptr": "*i64", "gate_ptr": "*fp32", "end_ptr": "*i64",
                "grad_out_ptr": "*bf16", "grad_gate_ptr": "*fp32", "num_slots": "i32", "dim": "i32", "stride_gy": "i32",
                "stride_out": "i32", "stride_gout": "i32"}, dict(BLOCK_S=BLOCK_N, BLOCK_D=BLOCK_D)),
]


def _expert_specs(num_experts: int, hidden: int) -> list[KernelSpec]:
    """The expert bias (+ GELU) kernels and the segment sums (promoe.kernels.experts) at ProMoE-XL widths."""
    e_pad, block_s, block_h = expert_blocks(num_experts, hidden)
    block = dict(E_PAD=e_pad, BLOCK_S=block_s, BLOCK_H=block_h)
    specs = []
    for gelu in (True, False):
        specs += [
            KernelSpec(f"expert bias gelu={gelu} E={num_experts}", _bias_act_kernel,
                       {"h_ptr": "*bf16", "bias_ptr": "*bf16", "offsets_ptr": "*i64", "out_ptr": "*bf16",
                        "num_slots": "i32", "num_experts": "i32", "hidden": "i32", "stride_h": "i32",
                        "stride_b": "i32", "stride_out": "i32"}, dict(GELU=gelu, FP64=False, **block)),
            KernelSpec(f"expert bias backward gelu={gelu} E={num_experts}", _bias_act_backward_kernel,
                       {"grad_ptr": "*bf16", "h_ptr": "*bf16", "bias_ptr": "*bf16", "offsets_ptr": "*i64",
                        "grad_h_ptr": "*bf16", "partial_ptr": "*fp32", "act_ptr": "*bf16", "num_slots": "i32",
                        "num_experts": "i32", "hidden": "i32", "stride_g": "i32", "stride_h": "i32", "stride_b": "i32",
                        "stride_gh": "i32", "stride_act": "i32"},
                       dict(GELU=gelu, WRITE_ACT=gelu, FP64=False, **block)),
        ]
    return specs + [
        KernelSpec(f"segment sum E={num_experts}", _segment_sum_kernel,
                   {"partial_ptr": "*fp32", "offsets_ptr": "*i64", "out_ptr": "*bf16", "num_slots": "i32",
                    "num_experts": "i32", "hidden": "i32", "stride_out": "i32"}, block),
        KernelSpec(f"token sums partials E={num_experts}", _gather_partials_kernel,
                   {"x_ptr": "*bf16", "token_ptr": "*i64", "offsets_ptr": "*i64", "partial_ptr": "*fp32",
                    "num_slots": "i32", "num_experts": "i32", "dim": "i32", "stride_x": "i32"},
                   dict(FP64=False, E_PAD=e_pad, BLOCK_S=block_s, BLOCK_H=BLOCK_D)),
    ]


SPECS += [
    *_expert_specs(13, 2 * DIM), *_expert_specs(64, 2 * DIM),
    KernelSpec("token sums backward K=2", _token_sums_backward_kernel,
               {"grad_ptr": "*fp32", "slot_ptr": "*i64", "expert_ptr": "*i64", "end_ptr": "*i64", "out_ptr": "*bf16",
                "num_tokens": "i32", "num_experts": "i32", "dim": "i32", "stride_grad": "i32", "stride_out": "i32"},
               dict(TOP_K=2, FP64=False, BLOCK_N=TOKEN_SUMS_BLOCK_N, BLOCK_D=BLOCK_D)),
    *(KernelSpec(f"sum gradients {dtype} terms=4", _sum_kernel,
                 {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "c_ptr": f"*{dtype}", "d_ptr": f"*{dtype}",
                  "out_ptr": f"*{dtype}", "numel": "i32"}, dict(TERMS=4, FP64=False, BLOCK=SUM_BLOCK))
      for dtype in ("bf16", "fp32")),
]


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _gemm_dtypes(dtype: str) -> tuple[str, str]:
    """(the GEMMs' compute dtype, the tensors' dtype) of an expert-GEMM spec; `autocast`: fp32 tensors, bf16 GEMMs."""
    return ("bf16", "fp32") if dtype == "autocast" else (dtype, dtype)


def _rows_gemm_spec(mode: str, dtype: str, num_experts: int = 13) -> KernelSpec:
    """The fused expert GEMM over segment tiles at ProMoE-XL widths, in one of its four uses (`promoe.kernels.
    expert_mlp`): `up` gathers x, `down` runs bias + GELU on the load and the bias on the store, `grad_h` multiplies
    by GELU's slope on the store, `grad_x` is the plain GEMM; the weight read transposed in the backward's two."""
    compute, tensors = _gemm_dtypes(dtype)
    k_dim, n_dim = {"up": (DIM, 2 * DIM), "down": (2 * DIM, DIM), "grad_h": (DIM, 2 * DIM),
                    "grad_x": (2 * DIM, DIM)}[mode]
    transposed = mode in ("grad_h", "grad_x")
    signature = {"a_ptr": f"*{tensors}", "index_ptr": "*i64", "w_ptr": f"*{tensors}", "offsets_ptr": "*i64",
                 "bias_in_ptr": f"*{tensors}", "bias_out_ptr": f"*{tensors}", "h_ptr": f"*{compute}",
                 "out_ptr": f"*{tensors}", "num_slots": "i32", "num_experts": "i32", "k_dim": "i32", "n_dim": "i32",
                 "stride_a": "i32", "stride_we": "i32", "stride_wk": "i32", "stride_wn": "i32", "stride_bin": "i32",
                 "stride_bout": "i32", "stride_h": "i32", "stride_out": "i32"}
    del signature["stride_wk" if transposed else "stride_wn"]
    # (the unit stride: a constant, as Triton's launcher specialises an integer argument equal to 1)
    e_pad, block_m, block_n, block_k = rows_gemm_blocks(num_experts, TORCH_DTYPES[compute])
    constants = dict(GATHER=mode == "up", GELU_IN=mode == "down", BIAS_OUT=mode == "down",
                     GELU_GRAD_OUT=mode == "grad_h", **dot_switches(TORCH_DTYPES[compute]), E_PAD=e_pad,
                     BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    constants["stride_wk" if transposed else "stride_wn"] = 1
    return KernelSpec(f"expert GEMM {mode} {dtype} E={num_experts} D={k_dim}->{n_dim}", _rows_gemm_kernel, signature,
                      constants)


def _weight_grad_spec(mode: str, dtype: str) -> KernelSpec:
    """The expert weight gradient with its bias gradient: `w_down` runs GELU on the load of h, `w_up` gathers x."""
    compute, tensors = _gemm_dtypes(dtype)
    signature = {"a_ptr": f"*{compute if mode == 'w_down' else tensors}", "index_ptr": "*i64",
                 "bias_in_ptr": f"*{tensors}", "g_ptr": f"*{tensors if mode == 'w_down' else compute}",
                 "offsets_ptr": "*i64", "out_ptr": f"*{tensors}", "bias_grad_ptr": f"*{tensors}", "a_dim": "i32",
                 "b_dim": "i32", "stride_a": "i32", "stride_bin": "i32", "stride_g": "i32", "stride_oe": "i32",
                 "stride_oa": "i32", "stride_bg": "i32"}
    block_a, block_b, block_k = weight_grad_blocks(TORCH_DTYPES[compute])
    constants = dict(GATHER=mode == "w_up", GELU_IN=mode == "w_down", **dot_switches(TORCH_DTYPES[compute]),
                     BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_K=block_k)
    return KernelSpec(f"expert weight grad {mode} {dtype}", _weight_grad_kernel, signature, constants)


SPECS += [_rows_gemm_spec(mode, dtype) for dtype in ("bf16", "autocast", "fp32")
          for mode in ("up", "down", "grad_h", "grad_x")]
SPECS += [_weight_grad_spec(mode, dtype) for dtype in ("bf16", "autocast", "fp32") for mode in ("w_down", "w_up")]


def compile_ptx(spec: KernelSpec, capability: int) -> tuple[str, int]:
    """PTX and Triton's shared-memory figure for one kernel on one architecture."""
    kernel = spec.kernel
    if not isinstance(kernel, JITFunction):  # under TRITON_INTERPRET=1 @triton.jit gives an InterpretedFunction
        kernel = JITFunction(kernel.fn)
    signature = dict(spec.signature) | {name: "constexpr" for name in spec.constants}
    # The launcher tells the compiler that pointers and integers are 16-byte aligned / divisible by 16 (as they
    # are in production); without this hint the kernel compiles differently and reports false spills.
    arg_names = kernel.arg_names
    aligned = {(arg_names.index(name),): [["tt.divisibility", 16]]
               for name, kind in spec.signature.items() if kind.startswith("*") or kind == "i32"}
    source = ASTSource(kernel, signature, constexprs=spec.constants, attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32))
    return compiled.asm["ptx"], compiled.metadata.shared


def ptxas_resources(ptx: str, capability: int, shared_bytes: int) -> Resources:
    """Run the ptxas Triton uses for this architecture with -v (Triton's cache would hide its log)."""
    arch = "sm_90a" if capability == 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        log = subprocess.run([get_ptxas(capability).path, "-v", "--gpu-name", arch, str(path), "-o", "/dev/null"],
                             capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = re.search(r"Used (\d+) registers", log)
    return Resources(int(registers.group(1)), int(spills.group(1)), int(spills.group(2)), shared_bytes)


def kernel_resources(spec: KernelSpec, capability: int) -> Resources:
    ptx, shared = compile_ptx(spec, capability)
    return ptxas_resources(ptx, capability, shared)


def _blocks(spec: KernelSpec) -> str:
    return " x ".join(str(value) for name, value in spec.constants.items() if name.startswith("BLOCK"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compile every kernel for sm_80 and sm_90a; print ptxas's report.")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of the table")
    args = parser.parse_args(argv)
    if interpreted():
        # The interpreter swaps Triton's @jit library functions (tl.sum, tl.cumsum, ...) for Python ones.
        raise SystemExit("run without TRITON_INTERPRET=1: the ahead-of-time compile needs Triton's real compiler")
    rows = [dict(kernel=spec.label, blocks=_blocks(spec), arch=arch, capability=capability,
                 **asdict(kernel_resources(spec, capability)))
            for spec in SPECS for arch, capability in ARCHITECTURES.items()]
    if args.json:
        print(json.dumps(rows))
        return
    print(f"D = {DIM}, 4 warps; blocks are rows x columns per program")
    print("| kernel | blocks | arch | registers | spill stores / loads (bytes) | shared memory (bytes) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['blocks']} | {r['arch']} | {r['registers']} | {r['spill_stores']} / "
              f"{r['spill_loads']} | {r['shared_bytes']} |")


if __name__ == "__main__":
    main()
