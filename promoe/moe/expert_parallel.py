"""Expert parallelism for token-choice MoE layers: the ranks of an expert-parallel group share one layer's routed
experts, each holding E / ep of them, and the tokens travel to their expert's rank and back.

One layer's dispatch on a rank, between the backend's permute and combine (both unchanged, over the whole plan):

    slots in expert order -> the per-expert counts to each rank (all_to_all_single, the only exchange before the
    tokens) -> the routed slots to their experts' ranks (all_to_all_single, variable splits) -> sorted by local
    expert -> the expert MLP on the local experts, the unconditional slots included -> back to the sending order
    -> back to their ranks (all_to_all_single) -> combined onto the shared experts' output

The unconditional experts (the bank's rows E .. E+U-1) stay on every rank: null-label tokens never travel. A rank's
bank therefore holds its routed experts, then the unconditional ones: `ExpertGroup.bank_rows`. The split sizes must
be known on the host, so a layer synchronises with the host once per forward, as every all-to-all MoE does
(MegaBlocks, torchtitan); the backward's exchange reuses them and does not (tests/test_no_host_sync.py).
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from promoe.moe.plan import RoutingPlan


@dataclass(frozen=True)
class ExpertGroup:
    """This rank's place among the ranks that share a layer's routed experts. The routed experts are dealt in
    contiguous shares, the first E % ep ranks one more than the others (as torch.chunk would not: it can leave
    ranks without any)."""

    group: dist.ProcessGroup  # the expert-parallel group: ranks that exchange tokens
    # the 1-D device mesh of the ranks that hold the same experts, over which FSDP2 shards the bank (None: unsharded)
    replicas: DeviceMesh | None
    size: int  # ranks in the group (ep)
    index: int  # this rank's index in the group
    num_routed: int  # E, the layer's routed experts
    num_uncond: int  # U, the unconditional experts, on every rank

    @property
    def bank_size(self) -> int:
        return self.num_routed + self.num_uncond

    @property
    def shares(self) -> list[int]:
        """How many routed experts each rank of the group holds."""
        base, extra = divmod(self.num_routed, self.size)
        return [base + (rank < extra) for rank in range(self.size)]

    @property
    def local_routed(self) -> int:
        return self.shares[self.index]

    def bank_rows(self) -> torch.Tensor:
        """The rows of the whole bank [E + U] that this rank holds: its routed experts, then the unconditional."""
        first = sum(self.shares[:self.index])
        return torch.cat([torch.arange(first, first + self.local_routed),
                          torch.arange(self.num_routed, self.bank_size)])


class AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; its gradient travels the same way back."""

    @staticmethod
    def forward(ctx, x_RD: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out_RD = x_RD.new_empty((sum(out_splits), *x_RD.shape[1:]))
        dist.all_to_all_single(out_RD, x_RD.contiguous(), out_splits, in_splits, group=group)
        return out_RD

    @staticmethod
    def backward(ctx, grad_RD: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return AllToAll.apply(grad_RD, in_splits, out_splits, ctx.group), None, None, None


def local_plan(counts_E: torch.Tensor, num_rows: int) -> RoutingPlan:
    """The plan of `num_rows` rows already in expert order, `counts_E[e]` of them for local expert e, each row its
    own token."""
    device = counts_E.device
    offsets_E1 = torch.zeros(counts_E.numel() + 1, dtype=torch.long, device=device)
    offsets_E1[1:] = counts_E.cumsum(0)
    expert_S = torch.arange(counts_E.numel(), device=device).repeat_interleave(counts_E, output_size=num_rows)
    return RoutingPlan(token_index_S=torch.arange(num_rows, device=device), expert_index_S=expert_S,
                       gates_S=torch.ones(num_rows, device=device), offsets_E1=offsets_E1, num_tokens=num_rows,
                       has_dropped_slots=False)


def dispatch_expert_parallel(backend, x_ND: torch.Tensor, plan: RoutingPlan, experts, base_ND: torch.Tensor | None,
                             group: ExpertGroup) -> torch.Tensor:
    """The backend's dispatch (`TorchBackend.dispatch`) with the routed experts spread over the group's ranks: the
    same y[n] = base[n] + sum over the slots of token n of gate * expert(x[n])."""
    x_SD = backend.permute(x_ND, plan)
    out_SD = run_on_expert_ranks(backend, x_SD, plan.counts_E, experts, group)
    return backend.combine(out_SD, plan, base_ND)


# Under torch.compile this is the layer's one graph break: Dynamo calls it as it is and traces what comes before and
# after. The split sizes are host ints, made and used in here only: no graph sees them, so none is specialised on
# them or guards them, and a new split size recompiles nothing. Its tensors in and out keep the shapes of the slots.
@torch.compiler.disable
def run_on_expert_ranks(backend, x_SD: torch.Tensor, counts_E: torch.Tensor, experts, group: ExpertGroup
                        ) -> torch.Tensor:
    """The expert MLP of every slot x_SD (in expert order, `counts_E[e]` for expert e) run on its expert's rank:
    the routed slots travel there and back, the unconditional ones stay; dropped slots give zeros."""
    routed, local = group.num_routed, group.local_routed
    # To rank r the slot counts of its experts; from rank r those of each local expert.
    recv_RC = counts_E.new_empty(group.size * local)
    dist.all_to_all_single(recv_RC, counts_E[:routed], [local] * group.size, group.shares, group=group.group)
    recv_RC = recv_RC.view(group.size, local)
    send_R = torch.stack([share.sum() for share in counts_E[:routed].split(group.shares)])
    # The layer's one host synchronisation: the split sizes, and how many unconditional slots stay here.
    sizes = torch.cat([send_R, recv_RC.sum(1), counts_E[routed:].sum().view(1)]).tolist()
    send, recv, num_uncond = sizes[:group.size], sizes[group.size:2 * group.size], sizes[-1]
    sent, received = sum(send), sum(recv)
    x_recv_RD = AllToAll.apply(x_SD[:sent], recv, send, group.group)
    # Received rows come by sending rank, then by expert: a stable sort by expert puts each expert's rows together.
    expert_R = torch.arange(local, device=x_SD.device).repeat(group.size).repeat_interleave(
        recv_RC.flatten(), output_size=received)
    order_R = torch.sort(expert_R, stable=True).indices
    x_local_SD = torch.cat([x_recv_RD[order_R], x_SD[sent:sent + num_uncond]])  # the unconditional slots stay
    counts_local_E = torch.cat([recv_RC.sum(0), counts_E[routed:]])
    out_local_SD = backend.run_experts(x_local_SD, local_plan(counts_local_E, received + num_uncond), experts)
    out_recv_RD = torch.empty_like(out_local_SD[:received]).index_copy(0, order_R, out_local_SD[:received])
    out_sent_RD = AllToAll.apply(out_recv_RD, send, recv, group.group)
    dropped = out_local_SD.new_zeros((x_SD.shape[0] - sent - num_uncond, out_local_SD.shape[1]))
    return torch.cat([out_sent_RD, out_local_SD[received:], dropped])
