"""Routers: each turns the tokens of one MoE layer into a RoutingPlan and its auxiliary losses.

Scorers give token-expert affinities; routers decide who goes where:
- TokenChoiceRouter: every token takes its top-K experts (ProMoE, TC-DiT, k-means and classifier routing).
- ExpertChoiceRouter: every expert takes its top-C tokens of each image (ProMoE-EC, EC-DiT).
Step 1 of ProMoE's two-step router, conditional routing, is shared by both: with `conditional=True` the tokens
of null-label samples go to the unconditional expert (index num_routed in the bank) with gate 1.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from promoe.moe.losses import load_balance_loss, routing_contrastive_loss, token_centroids
from promoe.moe.plan import RoutingPlan, expert_choice_plan, sort_slots, token_choice_plan

ACTIVATIONS = {
    "identity": lambda z: z,
    "sigmoid": torch.sigmoid,
    "softmax": lambda z: z.softmax(dim=-1),
}


def check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown router activation {name!r}; choose one of {sorted(ACTIVATIONS)}")


class PrototypeScorer(nn.Module):
    """ProMoE's prototypical routing scores: activation(alpha * cos(x, p_e)) against learnable prototypes."""

    scores_are_probs = False

    def __init__(self, dim: int, num_experts: int, alpha: float = 1.0, activation: str = "identity"):
        super().__init__()
        check_activation(activation)
        self.prototypes = nn.Parameter(torch.empty(num_experts, dim))
        self.alpha = alpha
        self.activation = activation
        if activation == "softmax":
            self.scores_are_probs = True

    def init_weights(self) -> None:
        nn.init.normal_(self.prototypes, std=0.02)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: the gates are the raw cosines, and bf16 would quantise them to 3 digits.
        cos_NE = F.normalize(x_ND.float(), dim=-1) @ F.normalize(self.prototypes.float(), dim=-1).t()
        return ACTIVATIONS[self.activation](self.alpha * cos_NE)


class LinearScorer(nn.Module):
    """The classic MoE gate (DiT-MoE, EC-DiT): softmax over experts of a bias-free linear map."""

    scores_are_probs = True

    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.gate(x_ND).float().softmax(dim=-1)


def null_tokens_to_uncond_expert(expert_ids_NK, gates_NK, cond_N, uncond_expert: int):
    """Conditional routing: a null-label token's first slot goes to the unconditional expert with gate 1,
    its other K-1 slots are dropped (id uncond_expert + 1, one past the bank)."""
    first_K = torch.arange(expert_ids_NK.shape[1], device=expert_ids_NK.device) == 0
    null_ids_K = torch.where(first_K, uncond_expert, uncond_expert + 1)
    expert_ids_NK = torch.where(cond_N[:, None], expert_ids_NK, null_ids_K)
    gates_NK = torch.where(cond_N[:, None], gates_NK, first_K.to(gates_NK.dtype))
    return expert_ids_NK, gates_NK


class TokenChoiceRouter(nn.Module):
    """Every (routed) token takes the top-K experts of its scores; gates are the raw scores, not renormalised."""

    def __init__(self, scorer: nn.Module, num_routed: int, top_k: int, conditional: bool,
                 rcl_weight: float = 0.0, rcl_temperature: float = 0.07, lb_weight: float = 0.0):
        super().__init__()
        if not 1 <= top_k <= num_routed:
            raise ValueError(f"top_k={top_k} must lie in 1..{num_routed} (the number of routed experts)")
        if rcl_weight > 0 and not isinstance(scorer, PrototypeScorer):
            raise ValueError("the routing contrastive loss needs prototypes (a PrototypeScorer)")
        self.scorer = scorer
        self.num_routed = num_routed
        self.top_k = top_k
        self.conditional = conditional
        self.rcl_weight = rcl_weight
        self.rcl_temperature = rcl_temperature
        self.lb_weight = lb_weight

    def choose(self, x_ND: torch.Tensor, num_samples: int):
        """Expert ids [N, K], gates [N, K] and the scores [N, E] they came from."""
        scores_NE = self.scorer(x_ND)
        gates_NK, expert_ids_NK = scores_NE.topk(self.top_k, dim=-1)
        return expert_ids_NK, gates_NK, scores_NE

    def forward(self, x_ND: torch.Tensor, cond_N: torch.Tensor, num_samples: int):
        expert_ids_NK, gates_NK, scores_NE = self.choose(x_ND, num_samples)
        num_bank = self.num_routed + int(self.conditional)
        if self.conditional:
            expert_ids_NK, gates_NK = null_tokens_to_uncond_expert(expert_ids_NK, gates_NK, cond_N, self.num_routed)
        plan = token_choice_plan(expert_ids_NK, gates_NK.to(x_ND.dtype), num_bank,
                                 has_dropped_slots=self.conditional and self.top_k > 1)
        return plan, self.aux_losses(x_ND, cond_N, expert_ids_NK, scores_NE)

    def routed_weight(self, cond_N: torch.Tensor) -> torch.Tensor:
        """1 for the tokens routed among the routed experts, 0 for those sent to the unconditional expert."""
        return cond_N.float() if self.conditional else torch.ones_like(cond_N, dtype=torch.float32)

    def aux_losses(self, x_ND, cond_N, expert_ids_NK, scores_NE) -> dict[str, torch.Tensor]:
        aux = {}
        if not self.training:
            return aux
        weight_N = self.routed_weight(cond_N)
        if self.rcl_weight > 0:
            centroids, active = token_centroids(x_ND, expert_ids_NK, weight_N, self.num_routed)
            rcl = routing_contrastive_loss(self.scorer.prototypes, centroids, active, self.rcl_temperature)
            aux["rcl"] = self.rcl_weight * rcl
        if self.lb_weight > 0:
            probs_NE = scores_NE if self.scorer.scores_are_probs else scores_NE.softmax(dim=-1)
            aux["load_balance"] = self.lb_weight * load_balance_loss(probs_NE, expert_ids_NK, weight_N)
        return aux


def per_image_capacity(tokens_per_image: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens each expert takes from one image: max(1, int(S / E * capacity_factor)), at most S."""
    return max(1, min(tokens_per_image, int(tokens_per_image / num_experts * capacity_factor)))


class ExpertChoiceRouter(nn.Module):
    """Every routed expert takes the top-C tokens of each image; gates are the raw scores.

    With `conditional`, the images with a null label skip the routed experts and all their tokens go to the
    unconditional expert with gate 1.
    """

    def __init__(self, scorer: nn.Module, num_routed: int, capacity_factor: float, conditional: bool,
                 rcl_weight: float = 0.0, rcl_temperature: float = 0.07):
        super().__init__()
        if rcl_weight > 0 and not isinstance(scorer, PrototypeScorer):
            raise ValueError("the routing contrastive loss needs prototypes (a PrototypeScorer)")
        self.scorer = scorer
        self.num_routed = num_routed
        self.capacity_factor = capacity_factor
        self.conditional = conditional
        self.rcl_weight = rcl_weight
        self.rcl_temperature = rcl_temperature

    def forward(self, x_ND: torch.Tensor, cond_N: torch.Tensor, num_samples: int):
        num_tokens = x_ND.shape[0]
        tokens_per_image = num_tokens // num_samples
        capacity = per_image_capacity(tokens_per_image, self.num_routed, self.capacity_factor)
        scores_BEL = self.scorer(x_ND).view(num_samples, tokens_per_image, -1).transpose(1, 2)
        gates_BEC, position_BEC = scores_BEL.topk(capacity, dim=-1)
        first_token_B = torch.arange(num_samples, device=x_ND.device) * tokens_per_image
        token_BEC = position_BEC + first_token_B[:, None, None]
        plan = self.plan(token_BEC, gates_BEC.to(x_ND.dtype), cond_N, num_tokens)
        return plan, self.aux_losses(x_ND, cond_N.view(num_samples, -1)[:, 0], token_BEC)

    def plan(self, token_BEC, gates_BEC, cond_N, num_tokens) -> RoutingPlan:
        if not self.conditional:
            return expert_choice_plan(token_BEC.transpose(0, 1).flatten(1), gates_BEC.transpose(0, 1).flatten(1),
                                      num_tokens)
        num_samples, num_routed, capacity = token_BEC.shape
        cond_B = cond_N.view(num_samples, -1)[:, 0]
        routed_expert_BEC = torch.arange(num_routed, device=cond_N.device)[None, :, None].expand_as(token_BEC)
        dropped = num_routed + 1
        routed_expert_BEC = torch.where(cond_B[:, None, None], routed_expert_BEC, dropped)
        uncond_expert_N = torch.where(cond_N, dropped, num_routed)
        return sort_slots(
            token_index_S=torch.cat([token_BEC.reshape(-1), torch.arange(num_tokens, device=cond_N.device)]),
            expert_index_S=torch.cat([routed_expert_BEC.reshape(-1), uncond_expert_N]),
            gates_S=torch.cat([gates_BEC.reshape(-1), torch.ones(num_tokens, dtype=gates_BEC.dtype,
                                                                 device=gates_BEC.device)]),
            num_experts=num_routed + 1,
            num_tokens=num_tokens,
        )

    def aux_losses(self, x_ND, cond_B, token_BEC) -> dict[str, torch.Tensor]:
        if not self.training or self.rcl_weight <= 0:
            return {}
        centroids_BED = x_ND[token_BEC].float().mean(dim=2)
        routed_B = cond_B if self.conditional else torch.ones_like(cond_B)
        active_BE = routed_B[:, None].expand(-1, self.num_routed)
        rcl = routing_contrastive_loss(self.scorer.prototypes, centroids_BED, active_BE, self.rcl_temperature)
        return {"rcl": self.rcl_weight * rcl}
