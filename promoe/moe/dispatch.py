"""Dispatch backends: how a MoE layer runs its plan, one object per layer, chosen once when the layer is built.

A backend builds a token-choice plan, permutes the tokens into expert order, runs the expert MLP and combines the
experts' outputs onto the shared experts' output; its `routing` is the routing maths that the layer hands its
router with each call (`promoe.moe.routing.RoutingOps`). `TorchBackend` is at the same time the readable definition
of each step and the reference that every Triton kernel is tested against; the others change how a step runs, never
what it computes:

- `torch`: gather rows in expert order, two `grouped_mm` GEMMs over the plan's offsets, gate-weighted sum back. No
  host synchronisation, no data-dependent shapes. The default off CUDA.
- `loop`: the paper's Algorithm 1, the expert GEMMs as a loop over experts with a boolean mask each. The benchmark
  baseline; it synchronises with the host once per expert (boolean-mask indexing).
- `triton`: the kernels of `promoe.kernels` in place of the definitions: the fused routing kernel, the
  counting-sort plan, the permute and gather-form combine, the RCL's token sums, and the expert MLP as Triton grouped
  GEMMs with the gather of x's rows, the biases and GELU fused into their loads and stores (in fp32, bf16 and fp16;
  other dtypes run grouped_mm with the expert bias (+ GELU) kernels). Where a kernel does not apply to a layer (more
  than 64 experts or K > 4 for the routing kernel; an expert-choice plan, which has no fixed K per token, for
  permute, combine, token sums and the fused GEMMs), the layer runs the definition: one table per layer
  (`triton_steps`), made with the backend, which the steps consult and `describe()` prints. The default on CUDA; on
  the CPU it needs Triton's interpreter (TRITON_INTERPRET=1 before triton is imported), which is for tests, not
  speed.
- `grouped_gemm`: the expert GEMMs of the `grouped_gemm` package (MegaBlocks' grouped GEMM, CUTLASS, CUDA, bf16
  only; `pip install ".[gpu]"`). It takes the per-expert batch sizes on the host, so it costs one host
  synchronisation per GEMM: worth it only where its GEMM beats `grouped_mm` (sm_80, where `grouped_mm` falls back to
  a per-group loop after a sync of its own). bf16 activations and weights, or bf16 autocast; other dtypes are
  refused.
"""

from dataclasses import dataclass, fields

import torch

from promoe.config import check_backend
from promoe.kernels.expert_mlp import DTYPES as KERNEL_MLP_DTYPES
from promoe.kernels.expert_mlp import expert_mlp as kernel_expert_mlp
from promoe.kernels.experts import expert_bias_act
from promoe.kernels.experts import expert_bias_backward as kernel_bias_backward
from promoe.kernels.experts import expert_bias_gelu_backward as kernel_bias_gelu_backward
from promoe.kernels.experts import expert_token_sums as kernel_token_sums
from promoe.kernels.fan_out import fan_out as kernel_fan_out
from promoe.kernels.launch import accumulation_dtype
from promoe.kernels.permute import combine as kernel_combine
from promoe.kernels.permute import permute as kernel_permute
from promoe.kernels.plan import token_choice_plan as kernel_plan
from promoe.kernels.routing import MAX_EXPERTS, MAX_TOP_K
from promoe.kernels.routing import prototype_scores as kernel_scores
from promoe.kernels.routing import route_prototypes as kernel_routing
from promoe.moe.experts import (
    ExpertBank,
    ExpertWeights,
    autocast_dtype,
    gelu_tanh,
    gelu_tanh_backward,
    grouped_mm,
    grouped_mm_backward,
)
from promoe.moe.plan import RoutingPlan, gather_rows, gather_rows_backward, token_choice_plan
from promoe.moe.routing import DEFINITIONS, RoutingOps


@dataclass(frozen=True)
class RouterSpec:
    """What a backend must know of a layer's router to choose its kernels."""

    token_choice: bool  # K slots per token (a plan with slot_NK); False for expert choice
    num_prototypes: int = 0  # routed experts scored by prototypes; 0 for other scorers
    top_k: int = 1


TOKEN_CHOICE = RouterSpec(token_choice=True)  # a plan of K slots per token: every kernel applies


def default_backend_name(device: torch.device) -> str:
    """`triton` on CUDA, `torch` elsewhere (the fastest on the CPU: 2.2x `loop` on a ProMoE-B layer; Triton runs
    there only interpreted)."""
    return "triton" if device.type == "cuda" else "torch"


def make_backend(name: str, router: RouterSpec = TOKEN_CHOICE) -> "TorchBackend":
    """The backend object for one layer (by default, one that runs token-choice plans)."""
    check_backend(name)
    return BACKEND_CLASSES[name](router)


class TorchBackend:
    """Every step of a MoE layer's dispatch in PyTorch: the definitions."""

    name = "torch"

    def __init__(self, router: RouterSpec = TOKEN_CHOICE):
        # The definitions apply to every router; `router` is what a backend with kernels chooses them by.
        self.routing: RoutingOps = DEFINITIONS  # the routing maths the layer hands its router

    def describe(self) -> str:
        return self.name

    def fan_out(self, x_ND: torch.Tensor, readers: int) -> tuple[torch.Tensor, ...]:
        """x for each of its readers in the layer; x's gradient is the sum of theirs (autograd adds them as they
        arrive, one [N, D] pass per reader after the first)."""
        return (x_ND,) * readers

    def token_choice_plan(self, expert_ids_NK, gates_NK, num_experts: int, has_dropped_slots: bool) -> RoutingPlan:
        return token_choice_plan(expert_ids_NK, gates_NK, num_experts, has_dropped_slots)

    def dispatch(self, x_ND: torch.Tensor, plan: RoutingPlan, experts: ExpertBank,
                 base_ND: torch.Tensor | None = None) -> torch.Tensor:
        """y[n] = base[n] + sum over the slots s of token n of gates[s] * expert[s](x[n]): permute -> expert MLP ->
        combine. The base (the shared experts' output) is added as the combine writes y, not by a pass of its own.
        The permute runs inside the expert MLP, whose backward gathers x's rows again rather than keeping them."""
        return self.combine(experts(x_ND, plan, self, permute=True), plan, base_ND)

    def run_experts(self, x_SD: torch.Tensor, plan: RoutingPlan, experts: ExpertBank) -> torch.Tensor:
        """The expert MLP on rows already in slot order (the rows that expert parallelism received)."""
        return experts(x_SD, plan, self, permute=False)

    def expert_mlp(self, rows: torch.Tensor, plan: RoutingPlan, experts: ExpertWeights, permute: bool
                   ) -> torch.Tensor:
        """[S, D]: (permute ->) up, bias + GELU(tanh), down, bias, for each slot's expert (`ExpertMLP`), on the
        weights that the bank's call hands over (`ExpertBank.forward`: a whole bank, or one rank's part)."""
        return ExpertMLP.apply(self, permute, plan.num_tokens, plan.has_dropped_slots, rows, plan.token_index_S,
                               plan.expert_index_S, plan.gates_S, plan.offsets_E1, plan.slot_NK, experts.w_up_EDH,
                               experts.b_up_EH, experts.w_down_EHD, experts.b_down_ED)

    # The steps of the expert MLP, each a function of tensors (autograd can differentiate them: the tests compose
    # them as the plain-autograd reference), and the backward of each, which `ExpertMLP` runs.

    def permute(self, x_ND: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """x_SD[s] = x[token of s] in slot (expert) order; zero rows for dropped slots."""
        return mask_dropped_slots(plan)(gather_rows(x_ND, plan.token_index_S))

    def permute_backward(self, grad_SD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """grad x [N, D]: each token sums the gradients of its slots (dropped slots add nothing)."""
        return gather_rows_backward(mask_dropped_slots(plan)(grad_SD), plan.token_index_S, plan.num_tokens)

    def gemm(self, x_SA: torch.Tensor, w_EAB: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """out[s] = x[s] @ w[expert of s], grouped over the plan's offsets. Rows of dropped slots are left
        uninitialised; the bias steps zero them."""
        return grouped_mm(x_SA, w_EAB, _ends(plan))

    def gemm_input_grad(self, grad_SB: torch.Tensor, w_EAB: torch.Tensor, plan: RoutingPlan, dtype: torch.dtype
                        ) -> torch.Tensor:
        """grad x [S, A] of `gemm`, run in `dtype` (the forward's: the autocast dtype where it cast). Rows past the
        last offset are left uninitialised."""
        return grouped_mm_backward(grad_SB.to(dtype), None, w_EAB.to(dtype), _ends(plan), w_grad=False)[0]

    def gemm_weight_grad(self, grad_SB: torch.Tensor, x_SA: torch.Tensor, w_EAB: torch.Tensor, plan: RoutingPlan,
                         dtype: torch.dtype) -> torch.Tensor:
        """grad w [E, A, B] of `gemm`, run in `dtype`, in w's dtype."""
        grad_w_EAB = grouped_mm_backward(grad_SB.to(dtype), x_SA.to(dtype), None, _ends(plan), x_grad=False)[1]
        return grad_w_EAB.to(w_EAB.dtype)

    def add_expert_bias(self, h_SH: torch.Tensor, b_EH: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """h[s] + b[expert of s] for every slot s; zero rows (forward and backward) for dropped slots, so that the
        GEMM's uninitialised rows never reach the bias gradient."""
        return mask_dropped_slots(plan)(h_SH + gather_rows(b_EH, _slot_experts(plan, b_EH)))

    def add_expert_bias_backward(self, grad_SH: torch.Tensor, h_dtype: torch.dtype, b_EH: torch.Tensor,
                                 plan: RoutingPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """(grad h in h_dtype, grad b) of `add_expert_bias`."""
        grad_SH = mask_dropped_slots(plan)(grad_SH)
        grad_b_EH = gather_rows_backward(grad_SH.to(b_EH.dtype), _slot_experts(plan, b_EH), b_EH.shape[0])
        return grad_SH.to(h_dtype), grad_b_EH

    def expert_bias_gelu(self, h_SH: torch.Tensor, b_EH: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """gelu_tanh(h[s] + b[expert of s]) for every slot s; zero rows for dropped slots."""
        return gelu_tanh(self.add_expert_bias(h_SH, b_EH, plan))

    def expert_bias_gelu_backward(self, grad_SH: torch.Tensor, h_SH: torch.Tensor, b_EH: torch.Tensor,
                                  plan: RoutingPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(grad h, grad b, the step's output) of `expert_bias_gelu`, from h: the GELU's input and output are made
        again (elementwise), the output for the down GEMM's weight gradient."""
        z_SH = self.add_expert_bias(h_SH, b_EH, plan)
        grad_z_SH = gelu_tanh_backward(grad_SH.to(z_SH.dtype), z_SH)
        return *self.add_expert_bias_backward(grad_z_SH, h_SH.dtype, b_EH, plan), gelu_tanh(z_SH)

    def expert_bias(self, out_SD: torch.Tensor, b_ED: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """out[s] + b[expert of s] for every slot s; zero rows for dropped slots."""
        return self.add_expert_bias(out_SD, b_ED, plan)

    def expert_bias_backward(self, grad_SD: torch.Tensor, out_dtype: torch.dtype, b_ED: torch.Tensor,
                             plan: RoutingPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """(grad out in out_dtype, grad b) of `expert_bias`."""
        return self.add_expert_bias_backward(grad_SD, out_dtype, b_ED, plan)

    def combine(self, out_SD: torch.Tensor, plan: RoutingPlan, base_ND: torch.Tensor | None = None) -> torch.Tensor:
        """y [N, D] = base + sum over each token's slots of gate * out, in out's dtype; dropped slots add nothing."""
        out_SD = mask_dropped_slots(plan)(out_SD)
        return gate_weighted_sum(out_SD, plan.gates_S, plan.token_index_S, plan.num_tokens, base_ND)


class LoopBackend(TorchBackend):
    """The expert GEMMs as the paper's Algorithm 1: one boolean mask and one matmul per expert."""

    name = "loop"

    def gemm(self, x_SA: torch.Tensor, w_EAB: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        dtype = autocast_dtype(x_SA) or torch.result_type(x_SA, w_EAB)
        out_SB = x_SA.new_zeros((x_SA.shape[0], w_EAB.shape[2]), dtype=dtype)
        for expert in range(w_EAB.shape[0]):
            mask_S = plan.expert_index_S == expert  # indexing by it syncs with the host: its size is data
            out_SB = out_SB.index_put((mask_S,), (x_SA[mask_S] @ w_EAB[expert]).to(dtype))
        return out_SB

    def gemm_input_grad(self, grad_SB, w_EAB, plan, dtype):
        grad_x_SA = grad_SB.new_zeros((grad_SB.shape[0], w_EAB.shape[1]), dtype=dtype)
        for expert in range(w_EAB.shape[0]):
            mask_S = plan.expert_index_S == expert
            grad_x_SA[mask_S] = grad_SB[mask_S].to(dtype) @ w_EAB[expert].to(dtype).t()
        return grad_x_SA

    def gemm_weight_grad(self, grad_SB, x_SA, w_EAB, plan, dtype):
        grad_w_EAB = torch.zeros_like(w_EAB)
        for expert in range(w_EAB.shape[0]):
            mask_S = plan.expert_index_S == expert
            grad_w_EAB[expert] = (x_SA[mask_S].to(dtype).t() @ grad_SB[mask_S].to(dtype)).to(w_EAB.dtype)
        return grad_w_EAB


class GroupedGemmBackend(TorchBackend):
    """The expert GEMMs of the grouped_gemm package; every other step is the definition."""

    name = "grouped_gemm"

    def gemm(self, x_SA: torch.Tensor, w_EAB: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        x_SA, w_EAB = _bf16_operands(x_SA, w_EAB)
        # The host synchronisation this backend costs: its GEMM reads the batch sizes on the CPU. Its rows must
        # be exactly the kept slots, so the dropped ones (past the last offset) are cut off and come back as zeros.
        batch_sizes_E = plan.counts_E.cpu()
        kept = int(batch_sizes_E.sum())
        out_KB = grouped_gemm_gmm()(x_SA[:kept], w_EAB, batch_sizes_E)
        return torch.cat([out_KB, out_KB.new_zeros((x_SA.shape[0] - kept, out_KB.shape[1]))])

    def expert_mlp(self, rows, plan, experts, permute):
        """Autograd through the steps: the package's GEMM brings its own backward (which keeps its inputs), so the
        permuted rows and the GELU output are kept too."""
        x_SD = self.permute(rows, plan) if permute else rows
        a_SH = self.expert_bias_gelu(self.gemm(x_SD, experts.w_up_EDH, plan), experts.b_up_EH, plan)
        return self.expert_bias(self.gemm(a_SH, experts.w_down_EHD, plan), experts.b_down_ED, plan)


@dataclass(frozen=True)
class Step:
    """How the triton backend runs one step of a layer: by its kernel or by the definition, and why."""

    kernel: bool
    why: str


def triton_steps(router: RouterSpec) -> dict[str, Step]:
    """The triton backend's choice for each step of a layer with this router: the one table that the backend's
    steps consult and `describe()` prints."""
    prototypes, top_k = router.num_prototypes, router.top_k
    if not prototypes:
        scores = Step(False, "no prototypes: the scorer is the router's own")
    elif prototypes > MAX_EXPERTS:
        scores = Step(False, f"{prototypes} prototypes > {MAX_EXPERTS}")
    else:
        scores = Step(True, f"{prototypes} prototypes <= {MAX_EXPERTS}")
    if not router.token_choice:
        routing = Step(False, "expert choice: no top-K per token")
    elif scores.kernel and top_k > MAX_TOP_K:
        routing = Step(False, f"top-{top_k} > {MAX_TOP_K}")
    else:
        routing = scores
    if router.token_choice:
        plan = Step(True, "counting sort of the K slots per token")
        slots = Step(True, "gathers through the plan's slot_NK")
        gemm = Step(True, "Triton grouped GEMMs, gather, bias and GELU fused in (fp32, bf16, fp16; else grouped_mm)")
    else:
        plan = Step(False, "expert choice: the router's choice is the plan")
        slots = Step(False, "expert-choice plan: no slot_NK to gather through")
        gemm = Step(False, "grouped_mm: the fused GEMMs' backward sums the gathered rows through slot_NK")
    return {
        "fan_out": Step(True, "sums the gradients of x's readers in one pass"),
        "route_prototypes": routing,
        "prototype_scores": scores,
        "token_choice_plan": plan,
        "permute": slots,
        "combine": slots,
        "expert_token_sums": slots,
        "expert_bias": Step(True, "per-expert segment tiles over the plan's offsets (where grouped_mm runs)"),
        "gemm": gemm,
    }


ROUTING_KERNELS = {"route_prototypes": kernel_routing, "prototype_scores": kernel_scores,
                   "expert_token_sums": kernel_token_sums}


class TritonBackend(TorchBackend):
    """The `torch` backend's steps, each replaced by its kernel where `triton_steps` says the kernel applies."""

    name = "triton"

    def __init__(self, router: RouterSpec = TOKEN_CHOICE):
        super().__init__(router)
        self.steps = triton_steps(router)
        self.routing = RoutingOps(**{op.name: ROUTING_KERNELS[op.name] if self.steps[op.name].kernel
                                     else getattr(DEFINITIONS, op.name) for op in fields(RoutingOps)})

    def describe(self) -> str:
        kernels = [name for name, step in self.steps.items() if step.kernel]
        definitions = [f"{name} ({step.why})" for name, step in self.steps.items() if not step.kernel]
        return f"triton (kernels: {', '.join(kernels)}; definitions: {'; '.join(definitions)})"

    def fan_out(self, x_ND: torch.Tensor, readers: int) -> tuple[torch.Tensor, ...]:
        return kernel_fan_out(x_ND, readers)  # the readers' gradients summed in one pass

    def token_choice_plan(self, expert_ids_NK, gates_NK, num_experts: int, has_dropped_slots: bool) -> RoutingPlan:
        token_S, expert_S, gates_S, offsets_E1, slot_NK = kernel_plan(expert_ids_NK, gates_NK, num_experts)
        return RoutingPlan(token_S, expert_S, gates_S, offsets_E1, expert_ids_NK.shape[0], has_dropped_slots, slot_NK)

    def permute(self, x_ND: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        if not self.steps["permute"].kernel:
            return super().permute(x_ND, plan)
        return kernel_permute(x_ND, plan.token_index_S, plan.slot_NK, plan.offsets_E1[-1:])  # the end stays on device

    def combine(self, out_SD: torch.Tensor, plan: RoutingPlan, base_ND: torch.Tensor | None = None) -> torch.Tensor:
        if not self.steps["combine"].kernel:
            return super().combine(out_SD, plan, base_ND)
        return kernel_combine(out_SD, plan.gates_S, plan.token_index_S, plan.slot_NK, plan.offsets_E1[-1:], base_ND)

    def permute_backward(self, grad_SD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        if not self.steps["permute"].kernel:
            return super().permute_backward(grad_SD, plan)
        return kernel_combine(grad_SD, None, plan.token_index_S, plan.slot_NK, plan.offsets_E1[-1:])

    def expert_mlp(self, rows: torch.Tensor, plan: RoutingPlan, experts: ExpertWeights, permute: bool
                   ) -> torch.Tensor:
        """The fused kernels (`promoe.kernels.expert_mlp`: the gather in the up GEMM's loads, bias and GELU in the
        GEMMs' loads and stores) where the table's "gemm" step says so and the GEMMs' dtype is one of theirs; else
        the definition's steps (grouped_mm and the bias kernels)."""
        compute_dtype = autocast_dtype(rows) or rows.dtype
        if not self.steps["gemm"].kernel or compute_dtype not in KERNEL_MLP_DTYPES:
            return super().expert_mlp(rows, plan, experts, permute)
        token_S, slot_NK = (plan.token_index_S, plan.slot_NK) if permute else (None, None)
        return kernel_expert_mlp(rows, token_S, slot_NK, plan.offsets_E1, experts.w_up_EDH, experts.b_up_EH,
                                 experts.w_down_EHD, experts.b_down_ED, compute_dtype)

    def expert_bias_gelu(self, h_SH: torch.Tensor, b_EH: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        return expert_bias_act(h_SH, b_EH, plan.offsets_E1, gelu=True)

    def expert_bias_gelu_backward(self, grad_SH, h_SH, b_EH, plan):
        return kernel_bias_gelu_backward(grad_SH, h_SH, b_EH, plan.offsets_E1)  # the output made in the same pass

    def expert_bias(self, out_SD: torch.Tensor, b_ED: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        return expert_bias_act(out_SD, b_ED, plan.offsets_E1, gelu=False)

    def expert_bias_backward(self, grad_SD, out_dtype, b_ED, plan):
        return kernel_bias_backward(grad_SD, out_dtype, b_ED, plan.offsets_E1)


BACKEND_CLASSES = {backend.name: backend for backend in (LoopBackend, TorchBackend, TritonBackend, GroupedGemmBackend)}


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
    return _GatedRowSum.apply(y_ND, out_SD, gates_S, token_S).to(out_SD.dtype)


class _GatedRowSum(torch.autograd.Function):
    """y.index_add(0, token, out * gates[:, None]) in y's dtype, keeping for backward out in its own dtype (not its
    accumulation-dtype copy), the gates and the token index: not the weighted rows, which autograd's index_add keeps
    though it reads only their shape. The backward is autograd's for the same ops, in the same order."""

    @staticmethod
    def forward(ctx, y_ND, out_SD, gates_S, token_S):
        ctx.save_for_backward(out_SD, gates_S, token_S)
        return y_ND.index_add(0, token_S, out_SD.to(y_ND.dtype) * gates_S[:, None].to(y_ND.dtype))

    @staticmethod
    def backward(ctx, grad_ND):
        out_SD, gates_S, token_S = ctx.saved_tensors
        grad_rows_SD = grad_ND.index_select(0, token_S)
        grad_out_SD = grad_rows_SD * gates_S[:, None].to(grad_ND.dtype)
        grad_gates_S = (grad_rows_SD * out_SD.to(grad_ND.dtype)).sum(1)
        return grad_ND, grad_out_SD.to(out_SD.dtype), grad_gates_S.to(gates_S.dtype), None


class ExpertMLP(torch.autograd.Function):
    """The expert MLP of every slot, the one definition of it: (permute ->) up GEMM -> bias + GELU(tanh) -> down GEMM
    -> bias, run by a backend's steps (`TorchBackend.permute`, `gemm`, `expert_bias_gelu`, `expert_bias`; a backend
    changes how a step runs, never the order).

    Its backward runs each step's backward in reverse, keeping from the forward only the up-GEMM's output h_SH beside
    what is kept anyway (the rows it read: x, the layer's input, when it permutes; the weights; the plan's indices):
    the permuted rows of x are gathered again, the GELU output (which the down GEMM's weight gradient reads) made
    again from h. Gathers and elementwise steps are run twice, no GEMM is. Autograd through the steps would keep
    the permuted rows, the GELU's input and its output: 2 H + D values per slot against H.
    """

    @staticmethod
    def forward(ctx, backend, permute, num_tokens, has_dropped_slots, rows, token_S, expert_S, gates_S, offsets_E1,
                slot_NK, w_up_EDH, b_up_EH, w_down_EHD, b_down_ED):
        plan = RoutingPlan(token_S, expert_S, gates_S, offsets_E1, num_tokens, has_dropped_slots, slot_NK)
        x_SD = backend.permute(rows, plan) if permute else rows
        h_SH = backend.gemm(x_SD, w_up_EDH, plan)
        a_SH = backend.expert_bias_gelu(h_SH, b_up_EH, plan)
        down_SD = backend.gemm(a_SH, w_down_EHD, plan)
        # The plan whole (its gates are kept by the combine anyway), so that the steps see the plan they saw.
        ctx.save_for_backward(rows, h_SH, token_S, expert_S, gates_S, offsets_E1, slot_NK, w_up_EDH, b_up_EH,
                              w_down_EHD, b_down_ED)
        ctx.backend, ctx.permute, ctx.plan_sizes = backend, permute, (num_tokens, has_dropped_slots)
        return backend.expert_bias(down_SD, b_down_ED, plan)

    @staticmethod
    def backward(ctx, grad_SD):
        rows, h_SH, token_S, expert_S, gates_S, offsets_E1, slot_NK, w_up, b_up, w_down, b_down = ctx.saved_tensors
        backend, dtype = ctx.backend, h_SH.dtype  # the GEMMs' dtype: the down GEMM's output is h's dtype too
        plan = RoutingPlan(token_S, expert_S, gates_S, offsets_E1, *ctx.plan_sizes, slot_NK)
        grad_down_SD, grad_b_down = backend.expert_bias_backward(grad_SD, dtype, b_down, plan)
        grad_a_SH = backend.gemm_input_grad(grad_down_SD, w_down, plan, dtype)
        grad_h_SH, grad_b_up, a_SH = backend.expert_bias_gelu_backward(grad_a_SH, h_SH, b_up, plan)  # a made again
        grad_w_down = backend.gemm_weight_grad(grad_down_SD, a_SH, w_down, plan, dtype)
        x_SD = backend.permute(rows, plan) if ctx.permute else rows  # gathered again
        grad_x_SD = backend.gemm_input_grad(grad_h_SH, w_up, plan, dtype).to(x_SD.dtype)
        grad_w_up = backend.gemm_weight_grad(grad_h_SH, x_SD, w_up, plan, dtype)
        grad_rows = backend.permute_backward(grad_x_SD, plan) if ctx.permute else mask_dropped_slots(plan)(grad_x_SD)
        return (None,) * 4 + (grad_rows,) + (None,) * 5 + (grad_w_up, grad_b_up, grad_w_down, grad_b_down)


def grouped_gemm_gmm():
    """The grouped_gemm package's GEMM: gmm(x [T, D], w [E, D, H], batch_sizes [E] int64 on the CPU) -> [T, H]."""
    try:
        from grouped_gemm import ops
    except ImportError as error:
        raise ImportError("the `grouped_gemm` dispatch backend needs the grouped_gemm package (CUDA, bf16): "
                          "pip install \".[gpu]\"") from error
    return ops.gmm


def _bf16_operands(x_SA: torch.Tensor, w_EAB: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x and the expert weights in bf16: as given, or cast under bf16 autocast; any other dtype is refused."""
    if autocast_dtype(x_SA) == torch.bfloat16:
        return x_SA.to(torch.bfloat16), w_EAB.to(torch.bfloat16)
    if x_SA.dtype != torch.bfloat16 or w_EAB.dtype != torch.bfloat16:
        raise TypeError(f"the `grouped_gemm` dispatch backend runs bf16 only (its GEMM kernels are bf16); got "
                        f"activations {x_SA.dtype} and expert weights {w_EAB.dtype}: cast the model to bf16, run "
                        "under bf16 autocast, or choose the `triton` or `torch` backend")
    return x_SA, w_EAB


def _ends(plan: RoutingPlan) -> torch.Tensor:
    """The end of each expert's rows, int32, as grouped_mm takes them."""
    return plan.offsets_E1[1:].to(torch.int32)


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
