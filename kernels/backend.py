"""The `triton` dispatch backend: the `torch` backend's steps, each replaced by its kernel where one applies.

Each method computes what the `TorchBackend` method of the same name defines (the tests hold them equal); where a
kernel does not apply (more than 64 experts or K > 4 for the routing kernel, an expert-choice plan for permute and
combine), the definition itself runs. The expert bias (+ GELU) kernels read only the plan's offsets and serve every
plan; the per-expert token sums' backward gathers through a token-choice plan's inverse slots.
"""

import torch

from promoe.kernels.experts import expert_bias_act, expert_token_sums
from promoe.kernels.permute import combine, permute
from promoe.kernels.plan import token_choice_plan
from promoe.kernels.routing import MAX_EXPERTS, MAX_TOP_K, prototype_scores, route_prototypes
from promoe.moe.dispatch import TorchBackend
from promoe.moe.plan import RoutingPlan


class TritonBackend(TorchBackend):
    name = "triton"

    def route_prototypes(self, x_ND, prototypes_ED, cond_N, k, activation, alpha, conditional):
        if k > MAX_TOP_K or prototypes_ED.shape[0] > MAX_EXPERTS:
            return super().route_prototypes(x_ND, prototypes_ED, cond_N, k, activation, alpha, conditional)
        expert_ids_NK, gates_NK, _ = route_prototypes(x_ND, prototypes_ED, cond_N, k, activation, alpha, conditional)
        return expert_ids_NK, gates_NK

    def prototype_scores(self, x_ND, prototypes_ED, activation, alpha) -> torch.Tensor:
        if prototypes_ED.shape[0] > MAX_EXPERTS:
            return super().prototype_scores(x_ND, prototypes_ED, activation, alpha)
        return prototype_scores(x_ND, prototypes_ED, activation, alpha)

    def token_choice_plan(self, expert_ids_NK, gates_NK, num_experts: int, has_dropped_slots: bool) -> RoutingPlan:
        return token_choice_plan(expert_ids_NK, gates_NK, num_experts, has_dropped_slots)

    def permute(self, x_ND: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        if plan.slot_NK is None:
            return super().permute(x_ND, plan)
        return permute(x_ND, plan.token_index_S, plan.slot_NK, plan.offsets_E1[-1:])  # the end stays on the device

    def combine(self, out_SD: torch.Tensor, plan: RoutingPlan, base_ND: torch.Tensor | None = None) -> torch.Tensor:
        if plan.slot_NK is None:
            return super().combine(out_SD, plan, base_ND)
        return combine(out_SD, plan.gates_S, plan.token_index_S, plan.slot_NK, plan.offsets_E1[-1:], base_ND)

    def expert_bias_gelu(self, h_SH: torch.Tensor, b_EH: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        return expert_bias_act(h_SH, b_EH, plan.offsets_E1, gelu=True)

    def expert_bias(self, out_SD: torch.Tensor, b_ED: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        return expert_bias_act(out_SD, b_ED, plan.offsets_E1, gelu=False)

    def expert_token_sums(self, x_ND: torch.Tensor, plan: RoutingPlan, num_experts: int) -> torch.Tensor:
        if plan.slot_NK is None:
            return super().expert_token_sums(x_ND, plan, num_experts)
        return expert_token_sums(x_ND, plan.token_index_S, plan.offsets_E1, num_experts, plan.expert_index_S,
                                 plan.slot_NK)
