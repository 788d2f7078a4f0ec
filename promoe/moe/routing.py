"""The routing maths, defined once: what the routers compute and what the routing kernels are tested against.

ProMoE routes in two steps (the paper's Sec. 3):
1. conditional routing: the tokens of null-label images go to the unconditional expert, the others to the routed
   experts (`null_tokens_to_uncond_expert`);
2. prototypical routing: a routed token's scores are activation(alpha * cos(x, p_e)) against learnable prototypes
   (`prototype_scores`), and it takes its top-K experts with the raw scores as gates (`top_k`).
`route_prototypes` is the two composed, the function that the `triton` backend runs as one fused kernel.

A router runs its maths through the `RoutingOps` its layer passes with each call: the backend's
(`TorchBackend.routing`), chosen with the backend, once; `DEFINITIONS` (the functions below) where a router runs
alone. The router never learns which.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from promoe.moe.plan import expert_token_sums

ACTIVATION_FUNCTIONS = {
    "identity": lambda z: z,
    "sigmoid": torch.sigmoid,
    "softmax": lambda z: z.softmax(dim=-1),
}


def prototype_scores(x_ND: torch.Tensor, prototypes_ED: torch.Tensor, activation: str = "identity",
                     alpha: float = 1.0) -> torch.Tensor:
    """activation(alpha * cos(x_n, p_e)) [N, E]. In fp32 at least (float64 stays float64): the gates are the raw
    cosines, and bf16 would quantise them to 3 digits."""
    dtype = torch.promote_types(x_ND.dtype, torch.float32)
    cos_NE = F.normalize(x_ND.to(dtype), dim=-1) @ F.normalize(prototypes_ED.to(dtype), dim=-1).t()
    return ACTIVATION_FUNCTIONS[activation](alpha * cos_NE)


def top_k(scores_NE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids [N, K], gates [N, K]): each token's K highest scores, not renormalised. Ties go to the lowest
    expert index and NaN ranks above every number (a stable descending sort; `torch.topk` leaves the order of ties
    unspecified), so that every backend picks the same experts."""
    gates_NE, ids_NE = scores_NE.sort(dim=-1, descending=True, stable=True)
    return ids_NE[:, :k], gates_NE[:, :k]


def null_tokens_to_uncond_expert(expert_ids_NK: torch.Tensor, gates_NK: torch.Tensor, cond_N: torch.Tensor,
                                 uncond_expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional routing: a null-label token's first slot goes to the unconditional expert with gate 1, its other
    K-1 slots are dropped (id uncond_expert + 1, one past the bank)."""
    first_K = torch.arange(expert_ids_NK.shape[1], device=expert_ids_NK.device) == 0
    null_ids_K = torch.where(first_K, uncond_expert, uncond_expert + 1)
    expert_ids_NK = torch.where(cond_N[:, None], expert_ids_NK, null_ids_K)
    gates_NK = torch.where(cond_N[:, None], gates_NK, first_K.to(gates_NK.dtype))
    return expert_ids_NK, gates_NK


def route_prototypes(x_ND: torch.Tensor, prototypes_ED: torch.Tensor, cond_N: torch.Tensor, k: int,
                     activation: str = "identity", alpha: float = 1.0, conditional: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """ProMoE's two-step routing: (expert ids [N, K], gates [N, K]); with `conditional`, the unconditional expert is
    the bank's index E (after the E routed experts)."""
    expert_ids_NK, gates_NK = top_k(prototype_scores(x_ND, prototypes_ED, activation, alpha), k)
    if conditional:
        expert_ids_NK, gates_NK = null_tokens_to_uncond_expert(expert_ids_NK, gates_NK, cond_N, prototypes_ED.shape[0])
    return expert_ids_NK, gates_NK


@dataclass(frozen=True)
class RoutingOps:
    """The tensor functions a router runs; a backend may swap in kernels of the same signatures."""

    route_prototypes: Callable = route_prototypes
    prototype_scores: Callable = prototype_scores
    expert_token_sums: Callable = expert_token_sums  # the RCL's per-expert sums of a plan's token rows [E, D]


DEFINITIONS = RoutingOps()
