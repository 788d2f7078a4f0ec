"""Plan building: a stable counting sort of the slots by expert, with no host synchronisation.

Two passes over the N*K expert ids (values 0..E, E meaning dropped):
1. `_histogram_kernel`: each program counts the ids of its BLOCK_S slots -> hist [num_blocks, E + 1].
   reads S ids, writes num_blocks * (E + 1) counts.
2. A few [num_blocks, E + 1] cumulative sums in PyTorch give every (block, expert) its first slot.
3. `_scatter_kernel`: each slot's position = its block's first slot for its expert + its rank among the block's
   earlier slots of that expert (a cumulative sum over a one-hot tile), so equal ids keep their order (stable).
   It writes the inverse permutation slot_NK and, in slot order, each slot's choice, token and expert.
   reads S ids, writes 4 S values. The gates are gathered by the choice order in PyTorch, so that their
   gradient flows.
An id outside 0..E counts as dropped in both passes (the routing kernel never writes one; this keeps a bad id from
reading another block's histogram row).
The two kernels are `torch.library` custom ops (`promoe::plan_histogram`, `promoe::plan_scatter`) with fake
registrations, so that `torch.compile` traces the plan; the glue between them is plain PyTorch.
What it computes is defined by `promoe.moe.plan.token_choice_plan` (the `torch` backend), slot for slot; being a
leaf, it returns the plan's tensors and the caller wraps them in a `RoutingPlan`.
"""

import torch
import triton
import triton.language as tl

from promoe.kernels.launch import empty_output, expert_block, plan_block


@triton.jit
def _slot_ids(ids_ptr, slots, num_slots, num_experts, BINS: tl.constexpr):
    """The ids of a block of slots; an id outside 0..num_experts counts as dropped (num_experts), so that no
    (block, id) lookup leaves the block's row; slots past the end get BINS and count nowhere."""
    in_range = slots < num_slots
    ids = tl.load(ids_ptr + slots, mask=in_range, other=BINS)
    ids = tl.where((ids >= 0) & (ids <= num_experts), ids, num_experts)
    return tl.where(in_range, ids, BINS)


@triton.jit
def _histogram_kernel(ids_ptr, hist_ptr, num_slots, num_experts, BINS: tl.constexpr, BLOCK_S: tl.constexpr):
    block = tl.program_id(0)
    slots = block * BLOCK_S + tl.arange(0, BLOCK_S)
    ids = _slot_ids(ids_ptr, slots, num_slots, num_experts, BINS)
    bins = tl.arange(0, BINS)
    hist = tl.sum((ids[:, None] == bins[None, :]).to(tl.int32), axis=0)
    tl.store(hist_ptr + block * BINS + bins, hist)


@triton.jit
def _scatter_kernel(ids_ptr, block_start_ptr, slot_ptr, order_ptr, token_ptr, expert_ptr,
                    num_slots, num_experts, TOP_K: tl.constexpr, BINS: tl.constexpr, BLOCK_S: tl.constexpr):
    block = tl.program_id(0)
    slots = block * BLOCK_S + tl.arange(0, BLOCK_S)
    in_range = slots < num_slots
    ids = _slot_ids(ids_ptr, slots, num_slots, num_experts, BINS)
    bins = tl.arange(0, BINS)
    onehot = (ids[:, None] == bins[None, :]).to(tl.int32)
    rank = tl.sum((tl.cumsum(onehot, axis=0) - 1) * onehot, axis=1)  # earlier slots of the same id in the block
    start = tl.load(block_start_ptr + block * BINS + ids, mask=in_range, other=0)
    position = start + rank
    tl.store(slot_ptr + slots, position, mask=in_range)
    tl.store(order_ptr + position, slots, mask=in_range)
    tl.store(token_ptr + position, slots // TOP_K, mask=in_range)
    tl.store(expert_ptr + position, ids, mask=in_range)


def _plan_blocks(num_slots: int, num_experts: int) -> tuple[int, int, int]:
    """(BINS, BLOCK_S, number of programs) of the plan kernels."""
    bins = expert_block(num_experts + 1)  # the experts and the dropped id
    block_s = plan_block(bins)
    return bins, block_s, triton.cdiv(num_slots, block_s)


@torch.library.custom_op("promoe::plan_histogram", mutates_args=())
def _histogram_op(ids_S: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per-program histograms of the ids [number of programs, BINS] int32."""
    bins, block_s, num_blocks = _plan_blocks(ids_S.numel(), num_experts)
    hist = empty_output((num_blocks, bins), torch.int32, ids_S.device)
    if num_blocks:
        _histogram_kernel[(num_blocks,)](ids_S, hist, ids_S.numel(), num_experts, BINS=bins, BLOCK_S=block_s)
    return hist


@_histogram_op.register_fake
def _(ids_S, num_experts):
    bins, _, num_blocks = _plan_blocks(ids_S.shape[0], num_experts)
    return ids_S.new_empty((num_blocks, bins), dtype=torch.int32)


@torch.library.custom_op("promoe::plan_scatter", mutates_args=())
def _scatter_op(ids_S: torch.Tensor, block_start: torch.Tensor, num_experts: int, top_k: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(slot [S], choice [S], token [S], expert [S]) int64: the inverse permutation, then each slot's choice, token
    and expert in slot order."""
    num_slots, device = ids_S.numel(), ids_S.device
    bins, block_s, num_blocks = _plan_blocks(num_slots, num_experts)
    slot_S, order_S, token_S, expert_S = (empty_output((num_slots,), torch.int64, device) for _ in range(4))
    if num_blocks:
        _scatter_kernel[(num_blocks,)](ids_S, block_start.contiguous(), slot_S, order_S, token_S, expert_S, num_slots,
                                       num_experts, TOP_K=top_k, BINS=bins, BLOCK_S=block_s)
    return slot_S, order_S, token_S, expert_S


@_scatter_op.register_fake
def _(ids_S, block_start, num_experts, top_k):
    return tuple(ids_S.new_empty(ids_S.shape, dtype=torch.int64) for _ in range(4))


def token_choice_plan(expert_ids_NK: torch.Tensor, gates_NK: torch.Tensor, num_experts: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel form of `promoe.moe.plan.token_choice_plan`, slot for slot: the plan's tensors (token_index_S,
    expert_index_S, gates_S, offsets_E1, slot_NK)."""
    num_tokens, top_k = expert_ids_NK.shape
    ids_S = expert_ids_NK.reshape(-1).contiguous()
    hist = _histogram_op(ids_S, num_experts).long()
    counts = hist.sum(0)  # [bins]
    expert_start = counts.cumsum(0) - counts  # first slot of each id
    block_start = expert_start[None, :] + hist.cumsum(0) - hist  # first slot of each (block, id)
    slot_S, order_S, token_S, expert_S = _scatter_op(ids_S, block_start, num_experts, top_k)
    offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.long, device=ids_S.device)
    offsets_E1[1:] = counts[:num_experts].cumsum(0)
    return token_S, expert_S, gates_NK.reshape(-1)[order_S], offsets_E1, slot_S.view(num_tokens, top_k)
