"""Auxiliary losses of the MoE layers. Each returns an unweighted scalar; the layer applies the weight."""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from promoe.moe.plan import RoutingPlan, expert_token_sums

# exp(-1e4 - 15) is 0 in fp32, so this masks like -inf without the NaN that -inf gives in the backward
# of a row with no active column.
_MASKED_LOGIT = -1e4


def routing_contrastive_loss(prototypes_ED: torch.Tensor, centroids_GED: torch.Tensor, active_GE: torch.Tensor,
                             temperature: float) -> torch.Tensor:
    """One-directional InfoNCE of each prototype against the centroids of the tokens its expert received.

    For every group g (the batch for token choice, an image for expert choice) and every active expert i:
    -log( exp(sim(p_i, m_gi)/t) / sum_{j active} exp(sim(p_i, m_gj)/t) ), averaged over the active rows of the
    groups with at least two active experts; 0 when no group has two.
    """
    protos_ED = F.normalize(prototypes_ED.float(), dim=-1)
    centroids_GED = F.normalize(centroids_GED.float(), dim=-1)
    logits_GEE = torch.einsum("id,gjd->gij", protos_ED, centroids_GED) / temperature
    logits_GEE = logits_GEE.masked_fill(~active_GE[:, None, :], _MASKED_LOGIT)
    log_prob_GE = logits_GEE.log_softmax(dim=-1).diagonal(dim1=-2, dim2=-1)
    counted_GE = active_GE & (active_GE.sum(-1, keepdim=True) >= 2)
    total = torch.where(counted_GE, -log_prob_GE, 0.0).sum()
    return total / counted_GE.sum().clamp(min=1)


def plan_centroids(x_ND: torch.Tensor, plan: RoutingPlan, num_experts: int,
                   expert_token_sums: Callable = expert_token_sums) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of the token rows that each of the plan's first num_experts experts received (the routing contrastive
    loss's centroids, k-means' new centroids): the per-expert sums over the expert-sorted slots (`expert_token_sums`:
    the definition in `promoe.moe.plan` or its kernel; no [N, E] one-hot GEMM) over the experts' slot counts.

    With conditional routing the tokens sent to the unconditional expert (index num_experts) and their dropped slots
    count for no routed expert. Returns centroids [1, E, D] (fp32) and the experts that received a token [1, E].
    """
    sums_ED = expert_token_sums(x_ND, plan.token_index_S, plan.offsets_E1, num_experts, plan.expert_index_S,
                                plan.slot_NK).float()
    counts_E = plan.counts_E[:num_experts].to(sums_ED.dtype)
    return (sums_ED / counts_E.clamp(min=1)[:, None])[None], (counts_E > 0)[None]


def load_balance_loss(probs_NE: torch.Tensor, expert_ids_NK: torch.Tensor, weight_N: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance loss E * sum_e f_e * P_e over the tokens with weight 1.

    f_e is the fraction of the routed choices that went to expert e, P_e the mean router probability.
    Ids past the last expert (dropped slots) count for no expert.
    """
    num_experts = probs_NE.shape[-1]
    top_k = expert_ids_NK.shape[-1]
    choices_NE = choice_counts(expert_ids_NK, num_experts)
    num_weighted = weight_N.sum().clamp(min=1)
    fraction_E = (choices_NE * weight_N[:, None]).sum(0) / (num_weighted * top_k)
    mean_prob_E = (probs_NE.float() * weight_N[:, None]).sum(0) / num_weighted
    return num_experts * (fraction_E * mean_prob_E).sum()


def choice_counts(expert_ids_NK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[N, E] float: how many of token n's K choices went to expert e; ids >= num_experts count for none.

    A scatter, not F.one_hot: one_hot validates its input with a host sync on the CPU.
    """
    counts = torch.zeros(expert_ids_NK.shape[0], num_experts + 1, device=expert_ids_NK.device)
    counts.scatter_add_(1, expert_ids_NK.clamp(max=num_experts), torch.ones(expert_ids_NK.shape, device=counts.device))
    return counts[:, :num_experts]
