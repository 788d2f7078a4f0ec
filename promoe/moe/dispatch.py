"""Dispatch backends: one object per way of running a MoE layer, chosen once per layer and forward.

A backend routes (the prototypes' fused routing, the scores of expert choice), builds the plan of a token-choice
router, permutes the tokens into expert order, runs the experts and combines their outputs. `TorchBackend` is at
the same time the readable definition of each of these steps and the reference that every Triton kernel is tested
against; the other backends change how a step runs, never what it computes:

- `torch`: gather rows in expert order, two `torch.nn.functional.grouped_mm` calls over the plan's offsets,
  gate-weighted sum back. No host synchronisation, no data-dependent shapes. The default off CUDA.
- `loop`: the paper's Algorithm 1, a boolean mask per expert. The benchmark baseline; it synchronises with the
  host once per expert (boolean-mask indexing).
- `triton` (`promoe.kernels.backend`): the fused routing kernel, the counting-sort plan, the permute and
  gather-form combine kernels and the expert bias (+ GELU) kernels around the same expert GEMMs (an expert-choice
  plan has no fixed K per token and keeps the `torch` permute and combine). The default on CUDA; on the CPU it
  needs Triton's interpreter (TRITON_INTERPRET=1), which is for tests, not speed.
- `grouped_gemm`: the expert GEMMs of the `grouped_gemm` package (MegaBlocks' grouped GEMM, CUTLASS, CUDA,
  bf16 only; `pip install ".[gpu]"`). It takes the per-expert batch sizes on the host, so it costs one host
  synchronisation per layer: worth it only where its GEMM beats `grouped_mm` (sm_80, where `grouped_mm` falls back
  to a per-group loop after a sync of its own). bf16 activations and weights, or bf16 autocast; other dtypes are
  refused.
"""

import functools

import torch
import torch.nn.functional as F

from promoe.moe import routing
from promoe.moe.experts import ExpertBank, autocast_dtype, gelu_tanh, grouped_mm
from promoe.moe.plan import RoutingPlan, token_choice_plan

BACKENDS = ("loop", "torch", "triton", "grouped_gemm")


def check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown dispatch backend {name!r}; choose one of {BACKENDS}")


def default_backend_name(device: torch.device) -> str:
    """`triton` on CUDA, `torch` elsewhere (the fastest on the CPU: 2.2x `loop` on a ProMoE-B layer; Triton runs
    there only interpreted)."""
    return "triton" if device.type == "cuda" else "torch"


@functools.cache
def backend_named(name: str) -> "TorchBackend":
    """The backend object of a name (backends hold no state: one of each serves every layer)."""
    check_backend(name)
    if name == "triton":
        from promoe.kernels.backend import TritonBackend  # the kernels build on promoe.moe, not the reverse

        return TritonBackend()
    return {"loop": LoopBackend, "torch": TorchBackend, "grouped_gemm": GroupedGemmBackend}[name]()


class TorchBackend:
    """Every step of a MoE layer in PyTorch: the definitions."""

    name = "torch"

    def route_prototypes(self, x_ND, prototypes_ED, cond_N, k, activation, alpha, conditional):
        """ProMoE's two-step routing: (expert ids [N, K], gates [N, K])."""
        return routing.route_prototypes(x_ND, prototypes_ED, cond_N, k, activation, alpha, conditional)

    def prototype_scores(self, x_ND, prototypes_ED, activation, alpha) -> torch.Tensor:
        return routing.prototype_scores(x_ND, prototypes_ED, activation, alpha)

    def token_choice_plan(self, expert_ids_NK, gates_NK, num_experts: int, has_dropped_slots: bool) -> RoutingPlan:
        return token_choice_plan(expert_ids_NK, gates_NK, num_experts, has_dropped_slots)

    def dispatch(self, x_ND: torch.Tensor, plan: RoutingPlan, experts: ExpertBank,
                 base_ND: torch.Tensor | None = None) -> torch.Tensor:
        """y[n] = base[n] + sum over the slots s of token n of gates[s] * expert[s](x[n]). The base (the shared
        experts' output) is added as the combine writes y, not by a pass of its own."""
        return self.combine(self.run_experts(self.permute(x_ND, plan), plan, experts), plan, base_ND)

    def permute(self, x_ND: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """x_SD[s] = x[token of slot s] in slot (expert) order; zero rows for dropped slots."""
        return mask_dropped_slots(plan)(gather_rows(x_ND, plan.token_index_S))

    def combine(self, out_SD: torch.Tensor, plan: RoutingPlan, base_ND: torch.Tensor | None = None) -> torch.Tensor:
        """y [N, D] = base + sum over each token's slots of gate * out, in out's dtype; dropped slots add nothing."""
        out_SD = mask_dropped_slots(plan)(out_SD)
        return gate_weighted_sum(out_SD, plan.gates_S, plan.token_index_S, plan.num_tokens, base_ND)

    def run_experts(self, x_SD: torch.Tensor, plan: RoutingPlan, experts: ExpertBank) -> torch.Tensor:
        """Each slot's row through its expert: up, bias + GELU(tanh), down, bias, the GEMMs grouped over the plan's
        offsets. grouped_mm leaves the rows of dropped slots uninitialised; the bias steps zero them."""
        ends_E = plan.offsets_E1[1:].to(torch.int32)
        h_SH = self.expert_bias_gelu(grouped_mm(x_SD, experts.w_up_EDH, ends_E), experts.b_up_EH, plan)
        return self.expert_bias(grouped_mm(h_SH, experts.w_down_EHD, ends_E), experts.b_down_ED, plan)

    def expert_bias_gelu(self, h_SH: torch.Tensor, b_EH: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """gelu_tanh(h[s] + b[expert of s]) for every slot s; zero rows (forward and backward) for dropped slots, so
        that grouped_mm's uninitialised rows never reach the bias gradient."""
        return gelu_tanh(mask_dropped_slots(plan)(h_SH + gather_rows(b_EH, _slot_experts(plan, b_EH))))

    def expert_bias(self, out_SD: torch.Tensor, b_ED: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """out[s] + b[expert of s] for every slot s; zero rows for dropped slots."""
        return mask_dropped_slots(plan)(out_SD + gather_rows(b_ED, _slot_experts(plan, b_ED)))

    def expert_token_sums(self, x_ND: torch.Tensor, plan: RoutingPlan, num_experts: int) -> torch.Tensor:
        """sum_ED[e] = sum of x[token of s] over the slots s of expert e < num_experts, in fp32 at least (float64
        for float64 x). A scatter by expert id over the slots; ids past num_experts (dropped, or experts left out)
        land in a discarded row."""
        x_SD = gather_rows(x_ND.to(accumulation_dtype(x_ND)), plan.token_index_S)
        sums_ED = x_SD.new_zeros((plan.num_experts + 1, x_ND.shape[1]))
        return sums_ED.index_add(0, plan.expert_index_S, x_SD)[:num_experts]


class LoopBackend(TorchBackend):
    name = "loop"

    def dispatch(self, x_ND: torch.Tensor, plan: RoutingPlan, experts: ExpertBank,
                 base_ND: torch.Tensor | None = None) -> torch.Tensor:
        acc = accumulation_dtype(x_ND)
        y_ND = x_ND.new_zeros(x_ND.shape, dtype=acc) if base_ND is None else base_ND.to(acc)
        for expert in range(experts.num_experts):
            mask_S = plan.expert_index_S == expert
            tokens = plan.token_index_S[mask_S]
            out = experts.expert_forward(expert, x_ND[tokens]).to(acc) * plan.gates_S[mask_S, None].to(acc)
            y_ND = y_ND.index_add(0, tokens, out)
        return y_ND.to(x_ND.dtype)


class GroupedGemmBackend(TorchBackend):
    name = "grouped_gemm"

    def dispatch(self, x_ND: torch.Tensor, plan: RoutingPlan, experts: ExpertBank,
                 base_ND: torch.Tensor | None = None) -> torch.Tensor:
        x_bf16_ND, w_up_EDH, b_up_EH, w_down_EHD, b_down_ED = _bf16_operands(x_ND, experts)
        gmm = grouped_gemm_gmm()
        # The host synchronisation this backend costs: its GEMM reads the batch sizes on the CPU. Knowing them,
        # the dropped slots (past the last offset) can simply be cut off.
        batch_sizes_E = plan.counts_E.cpu()
        kept = int(batch_sizes_E.sum())
        token_S, expert_S, gates_S = plan.token_index_S[:kept], plan.expert_index_S[:kept], plan.gates_S[:kept]
        h_SH = gelu_tanh(gmm(gather_rows(x_bf16_ND, token_S), w_up_EDH, batch_sizes_E)
                         + gather_rows(b_up_EH, expert_S))
        out_SD = gmm(h_SH, w_down_EHD, batch_sizes_E) + gather_rows(b_down_ED, expert_S)
        return gate_weighted_sum(out_SD, gates_S, token_S, plan.num_tokens, base_ND)


def accumulation_dtype(x_ND: torch.Tensor) -> torch.dtype:
    """The combine multiplies by the (fp32) gates and sums in fp32, or float64 for float64 activations."""
    return torch.promote_types(x_ND.dtype, torch.float32)


def gather_rows(table_RC: torch.Tensor, index_S: torch.Tensor) -> torch.Tensor:
    """table[index], rows of a 2-D tensor. As `F.embedding`, whose backward sums the gradients of repeated rows in
    a fixed order: the backward of `table[index]` adds them with atomics on a multi-threaded CPU, so two identical
    runs drifted apart (by 1e-4 in loss within 250 steps) through the expert biases' gradients."""
    return F.embedding(index_S, table_RC)


def gate_weighted_sum(out_SD: torch.Tensor, gates_S: torch.Tensor, token_S: torch.Tensor, num_tokens: int,
                      base_ND: torch.Tensor | None = None) -> torch.Tensor:
    """y[n] = base[n] + sum over the slots s of token n of gates[s] * out[s], [num_tokens, D] in out's dtype. Gates
    stay fp32 (the routing's precision) into the combine; the K copies of a token accumulate in fp32 (at least) onto
    the base, so bf16 sums do not depend on the slot order."""
    acc = accumulation_dtype(out_SD)
    if base_ND is None:
        y_ND = out_SD.new_zeros((num_tokens, out_SD.shape[1]), dtype=acc)
    else:
        y_ND = base_ND.to(acc)
    return y_ND.index_add(0, token_S, out_SD.to(acc) * gates_S[:, None].to(acc)).to(out_SD.dtype)


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
    if autocast_dtype(x_ND) == torch.bfloat16:
        return [t.to(torch.bfloat16) for t in tensors]
    if any(t.dtype != torch.bfloat16 for t in tensors):
        raise TypeError(f"the `grouped_gemm` dispatch backend runs bf16 only (its GEMM kernels are bf16); got "
                        f"activations {x_ND.dtype} and expert weights {experts.w_up_EDH.dtype}: cast the model to "
                        "bf16, run under bf16 autocast, or choose the `triton` or `torch` backend")
    return tensors


def _slot_experts(plan: RoutingPlan, table_EC: torch.Tensor) -> torch.Tensor:
    """The expert of each slot as a row of a per-expert table; dropped slots borrow the last row (masked later)."""
    return plan.expert_index_S.clamp(max=table_EC.shape[0] - 1)


def mask_dropped_slots(plan: RoutingPlan):
    """Zero the rows of dropped slots, forward and backward.

    grouped_mm leaves rows past the last offset uninitialised (NaN seen), in its output and in its input
    gradient; every tensor that crosses a grouped_mm is masked so that garbage never reaches a sum.
    """
    if not plan.has_dropped_slots:
        return lambda t: t
    valid_S1 = plan.valid_slots_S()[:, None]
    return lambda t: torch.where(valid_S1, t, torch.zeros((), dtype=t.dtype, device=t.device))
