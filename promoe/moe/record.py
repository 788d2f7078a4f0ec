"""Watching a model route: which expert each token ran, and how many slots each expert took, per MoE layer.

A plan hook on each MoE layer reads the RoutingPlan of every forward; nothing in the model changes and nothing is
recorded outside the `record_routing` block. The training driver logs the loads; the routing maps
(`promoe.viz.routing`) draw the per-token experts.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from promoe.moe.layer import MoELayer
from promoe.moe.plan import RoutingPlan


@dataclass
class LayerRouting:
    block: int  # index of the DiT block whose MLP this layer is
    loads_E: list[torch.Tensor] = field(default_factory=list)  # per forward: slots each bank expert computed
    top_expert_N: list[torch.Tensor] = field(default_factory=list)  # per forward: expert of the largest gate, -1 none


def top_expert_per_token(plan: RoutingPlan) -> torch.Tensor:
    """[N] long: the bank expert with the largest gate among a token's computed slots; -1 for a token that no
    expert took (expert choice can leave tokens out)."""
    gates_NE = torch.zeros(plan.num_tokens, plan.num_experts + 1, device=plan.gates_S.device)
    expert_S = torch.where(plan.valid_slots_S(), plan.expert_index_S, plan.num_experts)
    # +1 keeps a zero gate (possible with raw cosine gates) apart from "not taken".
    gates_NE.index_put_((plan.token_index_S, expert_S), plan.gates_S.detach().float() + 1, accumulate=True)
    gates_NE = gates_NE[:, :-1]
    top_N = gates_NE.argmax(dim=-1)
    return torch.where(gates_NE.amax(dim=-1) > 0, top_N, -1)


@contextmanager
def record_routing(model: torch.nn.Module, tokens: bool = False):
    """Yields a list of LayerRouting, one per MoE layer, filled by every forward inside the block.

    tokens=True also keeps each token's top expert (an [N] tensor per forward; for routing maps, not training).
    """
    records, hooked = [], []
    for index, block in enumerate(model.blocks):
        if not isinstance(block.mlp, MoELayer):
            continue
        record = LayerRouting(block=index)
        records.append(record)

        def hook(plan: RoutingPlan, record=record):
            record.loads_E.append(plan.counts_E.detach())
            if tokens:
                record.top_expert_N.append(top_expert_per_token(plan))

        block.mlp.plan_hooks.append(hook)
        hooked.append((block.mlp, hook))
    try:
        yield records
    finally:
        for layer, hook in hooked:
            layer.plan_hooks.remove(hook)


def merge_records(parts: list[list[LayerRouting]]) -> list[LayerRouting]:
    """The records of several `record_routing` blocks over the same model (a step's micro-batches) as one."""
    return [LayerRouting(block=layers[0].block, loads_E=[load for layer in layers for load in layer.loads_E],
                         top_expert_N=[top for layer in layers for top in layer.top_expert_N])
            for layers in zip(*parts)]
