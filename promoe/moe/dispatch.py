"""Dispatch: run the experts of a RoutingPlan and combine their outputs, one function, several backends.

- `loop`: the paper's Algorithm 1, a boolean mask per expert. The readable spec and the benchmark
  baseline; it synchronises with the host once per expert (boolean-mask indexing).
- `torch`: gather rows in expert order, two `torch.nn.functional.grouped_mm` calls over the plan's
  offsets, gate-weighted scatter back. No host synchronisation, no data-dependent shapes.
- `triton`: the same expert GEMMs between the Triton permute and gather-form combine kernels of
  `promoe.kernels.permute` (token-choice plans; an expert-choice plan has no fixed K per token and takes the
  `torch` path). The routers add their kernels on this backend (see `promoe.moe.routers`). On the CPU it
  needs Triton's interpreter (TRITON_INTERPRET=1), which is for tests, not speed.
- `grouped_gemm`: the expert GEMMs of the `grouped_gemm` package (MegaBlocks' grouped GEMM, CUTLASS, CUDA,
  bf16 only; `pip install ".[gpu]"`). It takes the per-expert batch sizes on the host, so it costs one host
  synchronisation per layer: worth it only where its GEMM beats `grouped_mm` (sm_80, where `grouped_mm` falls back
  to a per-group loop after a sync of its own). bf16 activations and weights, or bf16 autocast; other dtypes are
  refused.
"""

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from promoe.moe.experts import ExpertBank, gelu_tanh, grouped_mm
from promoe.moe.plan import RoutingPlan

BACKENDS = ("loop", "torch", "triton", "grouped_gemm")
_backend_override: list[str] = []


@contextlib.contextmanager
def dispatch_backend(name: str) -> Iterator[None]:
    """Use backend `name` for every MoE layer run inside the block, whatever the config says."""
    check_backend(name)
    _backend_override.append(name)
    try:
        yield
    finally:
        _backend_override.pop()


def check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown dispatch backend {name!r}; choose one of {BACKENDS}")


def resolve_backend(configured: str | None, device: torch.device | None = None) -> str:
    """The context manager wins over the config, which wins over the device's default: `triton` on CUDA,
    `torch` elsewhere (the fastest on the CPU: 2.2x `loop` on a ProMoE-B layer; Triton runs there only
    interpreted)."""
    if _backend_override:
        return _backend_override[-1]
    if configured:
        return configured
    return "triton" if device is not None and device.type == "cuda" else "torch"


def dispatch(x_ND: torch.Tensor, plan: RoutingPlan, experts: ExpertBank, backend: str | None = None) -> torch.Tensor:
    """y[n] = sum over the slots s of token n of gates[s] * expert[s](x[n])."""
    name = resolve_backend(backend, x_ND.device)
    check_backend(name)
    run = {"loop": _loop_dispatch, "torch": _torch_dispatch, "triton": _triton_dispatch,
           "grouped_gemm": _grouped_gemm_dispatch}[name]
    return run(x_ND, plan, experts)


def accumulation_dtype(x_ND: torch.Tensor) -> torch.dtype:
    """The combine multiplies by the (fp32) gates and sums in fp32, or float64 for float64 activations."""
    return torch.promote_types(x_ND.dtype, torch.float32)


def gather_rows(table_RC: torch.Tensor, index_S: torch.Tensor) -> torch.Tensor:
    """table[index], rows of a 2-D tensor. As `F.embedding`, whose backward sums the gradients of repeated rows in
    a fixed order: the backward of `table[index]` adds them with atomics on a multi-threaded CPU, so two identical
    runs drifted apart (by 1e-4 in loss within 250 steps) through the expert biases' gradients."""
    return F.embedding(index_S, table_RC)


def _loop_dispatch(x_ND: torch.Tensor, plan: RoutingPlan, experts: ExpertBank) -> torch.Tensor:
    acc = accumulation_dtype(x_ND)
    y_ND = x_ND.new_zeros(x_ND.shape, dtype=acc)
    for expert in range(experts.num_experts):
        mask_S = plan.expert_index_S == expert
        tokens = plan.token_index_S[mask_S]
        out = experts.expert_forward(expert, x_ND[tokens]).to(acc) * plan.gates_S[mask_S, None].to(acc)
        y_ND = y_ND.index_add(0, tokens, out)
    return y_ND.to(x_ND.dtype)


def _torch_dispatch(x_ND: torch.Tensor, plan: RoutingPlan, experts: ExpertBank) -> torch.Tensor:
    keep = _dropped_slot_masker(plan)
    out_SD = _run_experts(keep(gather_rows(x_ND, plan.token_index_S)), plan, experts)
    return gate_weighted_sum(keep(out_SD), plan.gates_S, plan.token_index_S, x_ND)


def gate_weighted_sum(out_SD: torch.Tensor, gates_S: torch.Tensor, token_S: torch.Tensor, x_ND: torch.Tensor
                      ) -> torch.Tensor:
    """y[n] = sum over the slots s of token n of gates[s] * out[s], in x's shape and dtype. Gates stay fp32 (the
    routing's precision) into the combine; the K copies of a token accumulate in fp32 (at least), so bf16 sums do
    not depend on the slot order."""
    acc = accumulation_dtype(x_ND)
    y_ND = x_ND.new_zeros(x_ND.shape, dtype=acc)
    return y_ND.index_add(0, token_S, out_SD.to(acc) * gates_S[:, None].to(acc)).to(x_ND.dtype)


def _triton_dispatch(x_ND: torch.Tensor, plan: RoutingPlan, experts: ExpertBank) -> torch.Tensor:
    if plan.slot_NK is None:
        return _torch_dispatch(x_ND, plan, experts)
    from promoe.kernels.permute import combine, permute

    end = plan.offsets_E1[-1:]  # stays on the device: the kernels read it there
    x_SD = permute(x_ND, plan.token_index_S, plan.slot_NK, end)  # dropped rows are zeros
    out_SD = _run_experts(x_SD, plan, experts)
    return combine(out_SD, plan.gates_S, plan.token_index_S, plan.slot_NK, end)  # never reads dropped rows


def grouped_gemm_gmm():
    """The grouped_gemm package's GEMM: gmm(x [T, D], w [E, D, H], batch_sizes [E] int64 on the CPU) -> [T, H]."""
    try:
        from grouped_gemm import ops
    except ImportError as error:
        raise ImportError("the `grouped_gemm` dispatch backend needs the grouped_gemm package (CUDA, bf16): "
                          "pip install \".[gpu]\"") from error
    return ops.gmm


def _bf16_operands(x_ND: torch.Tensor, experts: ExpertBank) -> list[torch.Tensor]:
    """x and the bank's tensors in bf16: as given, or cast under bf16 autocast; any other dtype is refused."""
    tensors = [x_ND, experts.w_up_EDH, experts.b_up_EH, experts.w_down_EHD, experts.b_down_ED]
    device = x_ND.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16:
        return [t.to(torch.bfloat16) for t in tensors]
    if any(t.dtype != torch.bfloat16 for t in tensors):
        raise TypeError(f"the `grouped_gemm` dispatch backend runs bf16 only (its GEMM kernels are bf16); got "
                        f"activations {x_ND.dtype} and expert weights {experts.w_up_EDH.dtype}: cast the model to "
                        "bf16, run under bf16 autocast, or choose the `triton` or `torch` backend")
    return tensors


def _grouped_gemm_dispatch(x_ND: torch.Tensor, plan: RoutingPlan, experts: ExpertBank) -> torch.Tensor:
    x_bf16_ND, w_up_EDH, b_up_EH, w_down_EHD, b_down_ED = _bf16_operands(x_ND, experts)
    gmm = grouped_gemm_gmm()
    # The host synchronisation this backend costs: its GEMM reads the batch sizes on the CPU. Knowing them,
    # the dropped slots (past the last offset) can simply be cut off.
    batch_sizes_E = plan.counts_E.cpu()
    kept = int(batch_sizes_E.sum())
    token_S, expert_S, gates_S = plan.token_index_S[:kept], plan.expert_index_S[:kept], plan.gates_S[:kept]
    h_SH = gelu_tanh(gmm(gather_rows(x_bf16_ND, token_S), w_up_EDH, batch_sizes_E) + gather_rows(b_up_EH, expert_S))
    out_SD = gmm(h_SH, w_down_EHD, batch_sizes_E) + gather_rows(b_down_ED, expert_S)
    return gate_weighted_sum(out_SD, gates_S, token_S, x_ND)


def _run_experts(x_SD: torch.Tensor, plan: RoutingPlan, experts: ExpertBank) -> torch.Tensor:
    """Each slot's row through its expert: up, GELU(tanh), down, as two grouped GEMMs over the plan's offsets."""
    ends_E = plan.offsets_E1[1:].to(torch.int32)
    # Dropped slots borrow the last expert's biases; the hidden rows of dropped slots are zeroed (forward and
    # backward) so that grouped_mm's uninitialised rows never reach the bias gradients.
    expert_S = plan.expert_index_S.clamp(max=experts.num_experts - 1)
    h_SH = grouped_mm(x_SD, experts.w_up_EDH, ends_E) + gather_rows(experts.b_up_EH, expert_S)
    h_SH = _dropped_slot_masker(plan)(h_SH)
    return grouped_mm(gelu_tanh(h_SH), experts.w_down_EHD, ends_E) + gather_rows(experts.b_down_ED, expert_S)


def _dropped_slot_masker(plan: RoutingPlan):
    """Zero the rows of dropped slots, forward and backward.

    grouped_mm leaves rows past the last offset uninitialised (NaN seen), in its output and in its input
    gradient; every tensor that crosses a grouped_mm is masked so that garbage never reaches a sum.
    """
    if not plan.has_dropped_slots:
        return lambda t: t
    valid_S1 = plan.valid_slots_S()[:, None]
    return lambda t: torch.where(valid_S1, t, torch.zeros((), dtype=t.dtype, device=t.device))
