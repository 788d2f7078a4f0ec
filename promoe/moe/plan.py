"""The RoutingPlan: the one object that passes from a router to the dispatch backends.

A plan lists *slots*. A slot is one (token, expert, gate) assignment; slots are sorted by expert, so
the slots of expert e are `offsets_E1[e]:offsets_E1[e + 1]`. Slots at or past `offsets_E1[-1]` are
dropped (no expert computes them). The number of slots is fixed by the shapes of the batch, never by
the data, so building and consuming a plan needs no host synchronisation:

- token choice (ProMoE, TC-DiT): N*K slots, token n owns slots n*K .. n*K+K-1 before sorting;
- expert choice (EC-DiT, ProMoE-EC, DiffMoE): E*C slots, already in expert order;
- a slot that must not run (the K-1 spare slots of an unconditional token, a DiffMoE token below an
  expert's threshold) carries the expert id E, which sorts it past the last offset.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from promoe.kernels.launch import accumulation_dtype


@dataclass
class RoutingPlan:
    token_index_S: torch.Tensor  # [S] long: the token row each slot reads and writes back to
    expert_index_S: torch.Tensor  # [S] long: expert of each slot, non-decreasing; E for a dropped slot
    gates_S: torch.Tensor  # [S]: the weight of the slot's expert output in the combine
    offsets_E1: torch.Tensor  # [E+1] long: exclusive prefix sum of the per-expert slot counts
    num_tokens: int
    has_dropped_slots: bool  # static: whether some slots may lie past offsets_E1[-1]
    # Token choice only: slot_NK[n, k] is the slot of token n's k-th choice (the inverse permutation), which
    # lets the combine gather each token's K rows instead of scattering with atomics.
    slot_NK: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.offsets_E1.numel() - 1

    @property
    def counts_E(self) -> torch.Tensor:
        return self.offsets_E1.diff()

    def valid_slots_S(self) -> torch.Tensor:
        """Mask of the slots that an expert computes (all of them when none can be dropped)."""
        slot_S = torch.arange(self.token_index_S.numel(), device=self.offsets_E1.device)
        return slot_S < self.offsets_E1[-1]


def offsets_from_ids(expert_index_S: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Exclusive prefix sum of the per-expert counts; ids equal to num_experts (dropped) are not counted.

    A scatter_add into a fixed-size histogram keeps the output shape independent of the data
    (`torch.bincount` would size its output by the largest id, a host sync on CUDA).
    """
    counts_E1 = torch.zeros(num_experts + 1, dtype=torch.long, device=expert_index_S.device)
    counts_E1.scatter_add_(0, expert_index_S, torch.ones_like(expert_index_S))
    offsets_E1 = torch.zeros_like(counts_E1)
    offsets_E1[1:] = counts_E1[:-1].cumsum(0)
    return offsets_E1


def token_choice_plan(expert_ids_NK: torch.Tensor, gates_NK: torch.Tensor, num_experts: int,
                      has_dropped_slots: bool = False) -> RoutingPlan:
    """Plan for routers where every token picks K experts (ids == num_experts mark dropped slots)."""
    num_tokens, top_k = expert_ids_NK.shape
    slot_token_S = torch.arange(num_tokens * top_k, device=expert_ids_NK.device) // top_k
    plan, order_S = _sort(slot_token_S, expert_ids_NK.reshape(-1), gates_NK.reshape(-1), num_experts, num_tokens,
                          has_dropped_slots)
    plan.slot_NK = torch.empty_like(order_S).scatter_(0, order_S, torch.arange(order_S.numel(), device=order_S.device))
    plan.slot_NK = plan.slot_NK.view(num_tokens, top_k)
    return plan


def expert_choice_plan(token_index_EC: torch.Tensor, gates_EC: torch.Tensor, num_tokens: int) -> RoutingPlan:
    """Plan for routers where every expert picks C tokens (row e of the inputs belongs to expert e)."""
    num_experts, capacity = token_index_EC.shape
    device = token_index_EC.device
    expert_index_S = torch.arange(num_experts, device=device).repeat_interleave(capacity)
    return RoutingPlan(
        token_index_S=token_index_EC.reshape(-1),
        expert_index_S=expert_index_S,
        gates_S=gates_EC.reshape(-1),
        offsets_E1=torch.arange(num_experts + 1, device=device) * capacity,
        num_tokens=num_tokens,
        has_dropped_slots=False,
    )


def sort_slots(token_index_S: torch.Tensor, expert_index_S: torch.Tensor, gates_S: torch.Tensor,
               num_experts: int, num_tokens: int, has_dropped_slots: bool = True,
               max_running: int | None = None) -> RoutingPlan:
    """Plan from unsorted slots of any origin (ids == num_experts mark dropped slots). `max_running`, a bound that the
    shapes give on the slots that run, cuts the plan to that many slots: the dropped ones past it are never stored
    (nor kept for backward)."""
    plan = _sort(token_index_S, expert_index_S, gates_S, num_experts, num_tokens, has_dropped_slots)[0]
    if max_running is not None and max_running < plan.token_index_S.numel():
        plan.token_index_S, plan.expert_index_S, plan.gates_S = (
            t[:max_running] for t in (plan.token_index_S, plan.expert_index_S, plan.gates_S))
    return plan


def _sort(token_index_S, expert_index_S, gates_S, num_experts, num_tokens, has_dropped_slots):
    # A stable sort keeps the tokens of one expert in slot order, so every backend sees the same rows.
    sorted_ids_S, order_S = torch.sort(expert_index_S, stable=True)
    plan = RoutingPlan(
        token_index_S=token_index_S[order_S],
        expert_index_S=sorted_ids_S,
        gates_S=gates_S[order_S],
        offsets_E1=offsets_from_ids(expert_index_S, num_experts),
        num_tokens=num_tokens,
        has_dropped_slots=has_dropped_slots,
    )
    return plan, order_S


def gather_rows(table_RC: torch.Tensor, index_S: torch.Tensor) -> torch.Tensor:
    """table[index], rows of a 2-D tensor. As `F.embedding`, whose backward sums the gradients of repeated rows in
    a fixed order: the backward of `table[index]` adds them with atomics on a multi-threaded CPU, so two identical
    runs drifted apart (by 1e-4 in loss within 250 steps) through the expert biases' gradients."""
    return F.embedding(index_S, table_RC)


def gather_rows_backward(grad_SC: torch.Tensor, index_S: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The gradient of `gather_rows(table, index)` for a table of num_rows rows: row r sums the gradient rows of the
    slots that read r, as F.embedding's backward sums them (the same sums in the same order)."""
    return torch.ops.aten.embedding_dense_backward(grad_SC, index_S, num_rows, -1, False)


class _AddRows(torch.autograd.Function):
    """base.index_add(0, index, rows), keeping only the index for backward (autograd's index_add keeps the rows too,
    although its backward reads only their shape): the rows' gradient is the gathered one, the base's passes."""

    @staticmethod
    def forward(ctx, base_RC, index_S, rows_SC):
        ctx.save_for_backward(index_S)
        return base_RC.index_add(0, index_S, rows_SC)

    @staticmethod
    def backward(ctx, grad_RC):
        (index_S,) = ctx.saved_tensors
        return grad_RC, None, grad_RC.index_select(0, index_S)


def add_rows(base_RC: torch.Tensor, index_S: torch.Tensor, rows_SC: torch.Tensor) -> torch.Tensor:
    """base with rows[s] added to row index[s] (`index_add` on dim 0), its backward the same as index_add's."""
    return _AddRows.apply(base_RC, index_S, rows_SC)


def expert_token_sums(x_ND: torch.Tensor, token_S: torch.Tensor, offsets_E1: torch.Tensor, num_experts: int,
                      expert_S: torch.Tensor, slot_NK: torch.Tensor | None = None) -> torch.Tensor:
    """sum_ED[e] = sum of x[token_S[s]] over the slots s of expert e < num_experts (a plan's slots), in fp32 at least
    (float64 for float64 x). A scatter by expert id over the slots; ids past num_experts (dropped, or experts left
    out) land in a discarded row. The signature of its kernel, whose backward gathers through slot_NK."""
    x_SD = gather_rows(x_ND.to(accumulation_dtype(x_ND)), token_S)
    sums_ED = x_SD.new_zeros((offsets_E1.numel(), x_ND.shape[1]))
    return add_rows(sums_ED, expert_S, x_SD)[:num_experts]
