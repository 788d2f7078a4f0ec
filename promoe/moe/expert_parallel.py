"""Expert parallelism for token-choice MoE layers: the ranks of an expert-parallel group share one layer's routed
experts, each holding E / ep of them, and the tokens travel to their expert's rank and back.

One layer's dispatch on a rank, between the backend's permute and combine (both unchanged, over the whole plan):

    slots in expert order -> the per-expert counts to each rank (all_to_all_single, the only exchange before the
    tokens) -> the routed slots to their experts' ranks (all_to_all_single, variable splits) -> sorted by local
    expert -> the expert MLP on the local experts, the unconditional slots included -> back to the sending order
    -> back to their ranks (all_to_all_single) -> combined onto the shared experts' output

`ExpertParallel` is that dispatch, one object per layer, given to the layer once when the model is parallelised
(`MoELayer.spread_experts`), its steps named.

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

    @property
    def first_routed(self) -> int:
        """The row of the whole bank where this rank's routed experts start."""
        return sum(self.shares[:self.index])

    def bank_rows(self) -> torch.Tensor:
        """The rows of the whole bank [E + U] that this rank holds: its routed experts, then the unconditional."""
        first = self.first_routed
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


@dataclass(frozen=True)
class Exchange:
    """What the count exchange tells a rank about one layer's token exchange: host ints for the collectives' split
    sizes, device tensors for the local sort."""

    send: list[int]  # routed slots to each rank of the group (the slots are in expert order, so rank by rank)
    recv: list[int]  # routed slots from each rank
    num_uncond: int  # unconditional slots, which stay on this rank
    recv_RC: torch.Tensor  # [ranks, local experts]: slots that each rank sends to each local expert

    @property
    def sent(self) -> int:
        return sum(self.send)

    @property
    def received(self) -> int:
        return sum(self.recv)


class ExpertParallel:
    """A layer's dispatch when its routed experts are spread over the ranks of an expert group, chosen once, when
    the model is parallelised (`MoELayer.spread_experts`): the backend's permute and combine over the whole plan,
    and between them the expert MLP of each routed slot run on its expert's rank in four steps (`exchange_counts`,
    `send_tokens`, the local experts, `return_outputs`)."""

    def __init__(self, group: ExpertGroup):
        self.group = group

    def __call__(self, backend, x_ND: torch.Tensor, plan: RoutingPlan, experts, base_ND: torch.Tensor | None
                 ) -> torch.Tensor:
        """The backend's dispatch (`TorchBackend.dispatch`): the same y[n] = base[n] + sum over the slots of token n
        of gate * expert(x[n])."""
        x_SD = backend.permute(x_ND, plan)
        out_SD = self.run_on_expert_ranks(backend, x_SD, plan.counts_E, experts)
        return backend.combine(out_SD, plan, base_ND)

    # Under torch.compile this is the layer's one graph break: Dynamo calls it as it is and traces what comes before
    # and after. The split sizes are host ints, made and used in here only: no graph sees them, so none is
    # specialised on them or guards them, and a new split size recompiles nothing. Its tensors in and out keep the
    # shapes of the slots.
    @torch.compiler.disable
    def run_on_expert_ranks(self, backend, x_SD: torch.Tensor, counts_E: torch.Tensor, experts) -> torch.Tensor:
        """The expert MLP of every slot x_SD (in expert order, `counts_E[e]` for expert e) run on its expert's rank:
        the routed slots travel there and back, the unconditional ones stay; dropped slots give zeros."""
        exchange = self.exchange_counts(counts_E)
        x_local_SD, order_R, plan = self.send_tokens(x_SD, counts_E, exchange)
        out_local_SD = backend.run_experts(x_local_SD, plan, experts)
        return self.return_outputs(out_local_SD, order_R, exchange, x_SD.shape[0])

    def exchange_counts(self, counts_E: torch.Tensor) -> Exchange:
        """Step 1: to each rank the slot counts of its experts, from each rank those of the local experts (one
        all_to_all_single), and the split sizes read on the host: the layer's one host synchronisation."""
        group = self.group
        routed, local = group.num_routed, group.local_routed
        recv_RC = counts_E.new_empty(group.size * local)
        dist.all_to_all_single(recv_RC, counts_E[:routed], [local] * group.size, group.shares, group=group.group)
        recv_RC = recv_RC.view(group.size, local)
        send_R = torch.stack([share.sum() for share in counts_E[:routed].split(group.shares)])
        sizes = torch.cat([send_R, recv_RC.sum(1), counts_E[routed:].sum().view(1)]).tolist()
        return Exchange(send=sizes[:group.size], recv=sizes[group.size:2 * group.size], num_uncond=sizes[-1],
                        recv_RC=recv_RC)

    def send_tokens(self, x_SD: torch.Tensor, counts_E: torch.Tensor, exchange: Exchange
                    ) -> tuple[torch.Tensor, torch.Tensor, RoutingPlan]:
        """Step 2: the routed slots to their experts' ranks (all_to_all_single, variable splits). Layouts: x_SD is in
        expert order, routed slots [0, sent) then unconditional [sent, sent + num_uncond) then dropped; the received
        rows come by sending rank, then by expert, and a stable sort by expert (order_R) puts each local expert's rows
        together; the unconditional slots follow them. Returns those rows, order_R and their plan."""
        local = self.group.local_routed
        x_recv_RD = AllToAll.apply(x_SD[:exchange.sent], exchange.recv, exchange.send, self.group.group)
        expert_R = torch.arange(local, device=x_SD.device).repeat(self.group.size).repeat_interleave(
            exchange.recv_RC.flatten(), output_size=exchange.received)
        order_R = torch.sort(expert_R, stable=True).indices
        x_local_SD = torch.cat([x_recv_RD[order_R], x_SD[exchange.sent:exchange.sent + exchange.num_uncond]])
        counts_local_E = torch.cat([exchange.recv_RC.sum(0), counts_E[self.group.num_routed:]])
        return x_local_SD, order_R, local_plan(counts_local_E, exchange.received + exchange.num_uncond)

    def return_outputs(self, out_local_SD: torch.Tensor, order_R: torch.Tensor, exchange: Exchange, num_slots: int
                       ) -> torch.Tensor:
        """Step 4: the local experts' outputs back to the received order and to their ranks (all_to_all_single),
        then in the slots' layout of `send_tokens`: routed, unconditional (computed here), dropped (zeros)."""
        received = exchange.received
        out_recv_RD = torch.empty_like(out_local_SD[:received]).index_copy(0, order_R, out_local_SD[:received])
        out_sent_RD = AllToAll.apply(out_recv_RD, exchange.send, exchange.recv, self.group.group)
        dropped = out_local_SD.new_zeros((num_slots - exchange.sent - exchange.num_uncond, out_local_SD.shape[1]))
        return torch.cat([out_sent_RD, out_local_SD[received:], dropped])
