"""Routers: each decides which experts run the tokens of one MoE layer, and computes its auxiliary losses.

Scorers give token-expert affinities; routers decide who goes where:
- token choice (`TokenChoiceRouter` and its kinds): every token takes its top-K experts (ProMoE's `PrototypeRouter`,
  TC-DiT, k-means and classifier routing); the result is a `TokenChoice`, from which the layer builds the plan;
- expert choice (`ExpertChoiceRouter`, `DiffMoERouter`): every expert takes its tokens (ProMoE-EC, EC-DiT, DiffMoE);
  the choice is itself the plan (`ExpertChoice`).
Step 1 of ProMoE's two-step router, conditional routing, is shared by both: with `conditional=True` the tokens
of null-label samples go to the unconditional expert (index num_routed in the bank) with gate 1.
The maths of the routing is in `promoe.moe.routing`; a router runs it through the `ops` (`RoutingOps`) its layer
passes with each call: the backend's, the definitions or kernels of the same signatures. A router knows no backend.
A router's losses read what its choice recorded, and the plan, x and `ops` where they need them.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from promoe.config import check_activation
from promoe.errors import Refusal
from promoe.moe.losses import load_balance_loss, plan_centroids, routing_contrastive_loss
from promoe.moe.plan import RoutingPlan, expert_choice_plan, sort_slots, token_choice_plan
from promoe.moe.routing import DEFINITIONS, RoutingOps, null_tokens_to_uncond_expert, top_k


@dataclass
class TokenChoice:
    """Each token's K experts and gates (after conditional routing), and what the router's losses read of it."""

    expert_ids_NK: torch.Tensor
    gates_NK: torch.Tensor
    scores: torch.Tensor | None  # what the experts were chosen by ([N, E]; the classifier's [B, E] logits); or None
    cond_N: torch.Tensor  # bool: the tokens of images with a label (the others are the unconditional ones)
    labels_B: torch.Tensor  # the labels routed by


@dataclass
class ExpertChoice:
    """The experts' picks as a plan, and what the router's losses read of them."""

    plan: RoutingPlan
    token_BEC: torch.Tensor | None = None  # per image, each expert's C tokens (per-image expert choice)
    cond_N: torch.Tensor | None = None  # as TokenChoice's (per-image expert choice)
    predictor_loss: torch.Tensor | None = None  # DiffMoE's capacity predictor BCE (training only)


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

    def forward(self, x_ND: torch.Tensor, score: Callable = DEFINITIONS.prototype_scores):
        """score: a routing function of (x, prototypes, activation, alpha), the scores [N, E] (`prototype_scores`, the
        definition or a kernel) or what a router makes of them (`route_prototypes` with its other arguments bound).
        The prototypes are read inside this module's call, so that what hooks it (diffusers' group offloading)
        sees them."""
        return score(x_ND, self.prototypes, self.activation, self.alpha)


class LinearScorer(nn.Module):
    """The classic MoE gate (DiT-MoE, EC-DiT, DiffMoE): softmax over experts of a bias-free linear map.

    init_std: N(0, init_std) weights as the EC-DiT and DiffMoE code; None keeps nn.Linear's own init, as DiT-MoE.
    """

    scores_are_probs = True

    def __init__(self, dim: int, num_experts: int, init_std: float | None = None):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.init_std = init_std

    def init_weights(self) -> None:
        if self.init_std is None:
            self.gate.reset_parameters()
        else:
            nn.init.normal_(self.gate.weight, std=self.init_std)

    def forward(self, x_ND: torch.Tensor, score: Callable | None = None) -> torch.Tensor:
        """score: a scorer's signature; no routing function computes a linear gate."""
        return self.gate(x_ND).float().softmax(dim=-1)


class ScoredRouter(nn.Module):
    """What token and expert choice share: a scorer of `num_routed` experts, conditional routing (step 1) and
    ProMoE's routing contrastive loss, which needs prototypes."""

    def __init__(self, scorer: nn.Module | None, num_routed: int, conditional: bool, rcl_weight: float,
                 rcl_temperature: float):
        super().__init__()
        if rcl_weight > 0 and not isinstance(scorer, PrototypeScorer):
            raise Refusal("the routing contrastive loss needs prototypes (a PrototypeScorer)")
        self.scorer = scorer
        self.num_routed = num_routed
        self.conditional = conditional
        self.rcl_weight = rcl_weight
        self.rcl_temperature = rcl_temperature

    def contrastive_loss(self, centroids_GED: torch.Tensor, active_GE: torch.Tensor) -> torch.Tensor:
        """The weighted RCL of the prototypes against the centroids of the tokens that their experts received."""
        rcl = routing_contrastive_loss(self.scorer.prototypes, centroids_GED, active_GE, self.rcl_temperature)
        return self.rcl_weight * rcl


class TokenChoiceRouter(ScoredRouter):
    """Every (routed) token takes the top-K experts of its scores; gates are the raw scores, not renormalised."""

    couples_samples = False  # in eval mode a token's experts depend on its own image alone
    token_choice = True

    def __init__(self, scorer: nn.Module | None, num_routed: int, top_k: int, conditional: bool,
                 rcl_weight: float = 0.0, rcl_temperature: float = 0.07, lb_weight: float = 0.0):
        super().__init__(scorer, num_routed, conditional, rcl_weight, rcl_temperature)
        if not 1 <= top_k <= num_routed:
            raise Refusal(f"top_k={top_k} must lie in 1..{num_routed} (the number of routed experts)")
        if lb_weight > 0 and scorer is None:
            raise Refusal("the load-balance loss needs router scores; this router has none")
        self.top_k = top_k
        self.lb_weight = lb_weight

    @property
    def has_dropped_slots(self) -> bool:
        """A null-label token runs only the unconditional expert: its other K-1 slots are dropped."""
        return self.conditional and self.top_k > 1

    def forward(self, x_ND: torch.Tensor, cond_N: torch.Tensor, labels_B: torch.Tensor,
                ops: RoutingOps = DEFINITIONS) -> TokenChoice:
        """Each token's top-K experts by its scores, gates the scores (`choose`); then, when conditional, the
        null-label tokens to the unconditional expert: expert ids [N, K] and gates [N, K]."""
        expert_ids_NK, gates_NK, scores = self.choose(x_ND, cond_N, labels_B.shape[0], ops)
        if self.conditional:
            expert_ids_NK, gates_NK = null_tokens_to_uncond_expert(expert_ids_NK, gates_NK, cond_N, self.num_routed)
        return TokenChoice(expert_ids_NK, gates_NK, scores, cond_N, labels_B)

    def choose(self, x_ND: torch.Tensor, cond_N: torch.Tensor, num_samples: int, ops: RoutingOps):
        """Expert ids [N, K], gates [N, K] and the scores they came from, before conditional routing."""
        scores_NE = self.scorer(x_ND, ops.prototype_scores)
        expert_ids_NK, gates_NK = top_k(scores_NE, self.top_k)
        return expert_ids_NK, gates_NK, scores_NE

    def routed_weight(self, cond_N: torch.Tensor) -> torch.Tensor:
        """1 for the tokens routed among the routed experts, 0 for those sent to the unconditional expert."""
        return cond_N.float() if self.conditional else torch.ones_like(cond_N, dtype=torch.float32)

    def aux_losses(self, x_ND: torch.Tensor, choice: TokenChoice, plan: RoutingPlan, ops: RoutingOps
                   ) -> dict[str, torch.Tensor]:
        aux = {}
        if self.rcl_weight > 0:  # the centroids from the plan's expert-sorted slots
            aux["rcl"] = self.contrastive_loss(*plan_centroids(x_ND, plan, self.num_routed, ops.expert_token_sums))
        if self.lb_weight > 0:
            probs_NE = choice.scores if self.scorer.scores_are_probs else choice.scores.softmax(dim=-1)
            balance = load_balance_loss(probs_NE, choice.expert_ids_NK, self.routed_weight(choice.cond_N))
            aux["load_balance"] = self.lb_weight * balance
        return aux


class PrototypeRouter(TokenChoiceRouter):
    """ProMoE's two-step router (the paper's Sec. 3) over a PrototypeScorer: `route_prototypes`, one function (one
    fused kernel on triton) from the tokens to their experts and gates. Where a load-balance loss reads the scores
    (training with lb_weight > 0) it routes as `TokenChoiceRouter`, by the scores that the loss then reads."""

    def __init__(self, scorer: PrototypeScorer, *args, **kwargs):
        if not isinstance(scorer, PrototypeScorer):
            raise Refusal(f"ProMoE's router scores by prototypes (a PrototypeScorer), not {type(scorer).__name__}")
        super().__init__(scorer, *args, **kwargs)

    def forward(self, x_ND: torch.Tensor, cond_N: torch.Tensor, labels_B: torch.Tensor,
                ops: RoutingOps = DEFINITIONS) -> TokenChoice:
        if self.training and self.lb_weight > 0:
            return super().forward(x_ND, cond_N, labels_B, ops)

        def route(x_ND, prototypes_ED, activation, alpha):
            return ops.route_prototypes(x_ND, prototypes_ED, cond_N, self.top_k, activation, alpha, self.conditional)

        expert_ids_NK, gates_NK = self.scorer(x_ND, route)
        return TokenChoice(expert_ids_NK, gates_NK, None, cond_N, labels_B)


def per_image_capacity(tokens_per_image: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens each expert takes from one image: max(1, int(S / E * capacity_factor)), at most S."""
    return max(1, min(tokens_per_image, int(tokens_per_image / num_experts * capacity_factor)))


class ExpertChoiceRouter(ScoredRouter):
    """Every routed expert takes the top-C tokens of each image; gates are the raw scores.

    With `conditional`, the images with a null label skip the routed experts and all their tokens go to the
    unconditional expert with gate 1.
    """

    couples_samples = False  # the top-C runs over the tokens of one image
    token_choice = False

    def __init__(self, scorer: nn.Module, num_routed: int, capacity_factor: float, conditional: bool,
                 rcl_weight: float = 0.0, rcl_temperature: float = 0.07):
        super().__init__(scorer, num_routed, conditional, rcl_weight, rcl_temperature)
        self.capacity_factor = capacity_factor

    def forward(self, x_ND: torch.Tensor, cond_N: torch.Tensor, labels_B: torch.Tensor,
                ops: RoutingOps = DEFINITIONS) -> ExpertChoice:
        """Each routed expert's top-C tokens of every image by its scores, gates the scores; then, when
        conditional, the null-label images' tokens to the unconditional expert."""
        num_tokens, num_samples = x_ND.shape[0], labels_B.shape[0]
        tokens_per_image = num_tokens // num_samples
        capacity = per_image_capacity(tokens_per_image, self.num_routed, self.capacity_factor)
        scores_BEL = self.scorer(x_ND, ops.prototype_scores).view(num_samples, tokens_per_image, -1).transpose(1, 2)
        gates_BEC, position_BEC = scores_BEL.topk(capacity, dim=-1)
        first_token_B = torch.arange(num_samples, device=x_ND.device) * tokens_per_image
        token_BEC = position_BEC + first_token_B[:, None, None]
        return ExpertChoice(self.plan(token_BEC, gates_BEC, cond_N, num_tokens), token_BEC, cond_N)

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
            # An image runs either its E*C routed slots or its L unconditional ones, never both: of the B*E*C + N
            # slots, at most B * max(E*C, L) run (about half), and only those are stored.
            max_running=num_samples * max(num_routed * capacity, num_tokens // num_samples),
        )

    def aux_losses(self, x_ND: torch.Tensor, choice: ExpertChoice, plan: RoutingPlan, ops: RoutingOps
                   ) -> dict[str, torch.Tensor]:
        if self.rcl_weight <= 0:
            return {}
        # Per image, each expert's C tokens: a plan of B * E experts, whose centroids are the RCL's groups.
        num_samples, num_routed, capacity = choice.token_BEC.shape
        token_GC = choice.token_BEC.reshape(num_samples * num_routed, capacity)
        image_plan = expert_choice_plan(token_GC, torch.ones(token_GC.shape, device=x_ND.device), x_ND.shape[0])
        centroids_1GD, _ = plan_centroids(x_ND, image_plan, num_samples * num_routed, ops.expert_token_sums)
        cond_B = choice.cond_N.view(num_samples, -1)[:, 0]
        routed_B = cond_B if self.conditional else torch.ones_like(cond_B)
        active_BE = routed_B[:, None].expand(-1, num_routed)
        return {"rcl": self.contrastive_loss(centroids_1GD.view(num_samples, num_routed, -1), active_BE)}


class ClassifierRouter(TokenChoiceRouter):
    """Classification-based routing (the paper's Sec. 4.2): a linear classifier on the mean-pooled tokens of
    each image picks one expert per superclass for all its tokens (gate 1), trained by cross-entropy against
    the superclass of the image's label."""

    def __init__(self, dim: int, superclass_of_class: list[int], top_k: int, conditional: bool, loss_weight: float,
                 **losses):
        num_superclasses = max(superclass_of_class) + 1
        super().__init__(None, num_superclasses, top_k, conditional, **losses)
        self.classifier = nn.Linear(dim, num_superclasses)
        self.loss_weight = loss_weight
        # The null class (index num_classes) has no superclass; -100 is cross_entropy's ignore index.
        self.register_buffer("superclass_of_label", torch.tensor([*superclass_of_class, -100]), persistent=False)

    def choose(self, x_ND: torch.Tensor, cond_N: torch.Tensor, num_samples: int, ops: RoutingOps):
        logits_BE = self.classifier(x_ND.view(num_samples, -1, x_ND.shape[-1]).mean(dim=1)).float()
        expert_ids_BK, _ = top_k(logits_BE, self.top_k)
        tokens_per_image = x_ND.shape[0] // num_samples
        expert_ids_NK = expert_ids_BK.repeat_interleave(tokens_per_image, dim=0)
        return expert_ids_NK, torch.ones(expert_ids_NK.shape, device=x_ND.device), logits_BE

    def aux_losses(self, x_ND: torch.Tensor, choice: TokenChoice, plan: RoutingPlan, ops: RoutingOps
                   ) -> dict[str, torch.Tensor]:
        loss = F.cross_entropy(choice.scores, self.superclass_of_label[choice.labels_B], ignore_index=-100)
        # An all-null batch has no target: cross_entropy gives NaN there, the loss is 0.
        return {"router_cls": self.loss_weight * torch.nan_to_num(loss, nan=0.0)}


class KMeansRouter(TokenChoiceRouter):
    """K-means routing (the paper's Sec. 4.2): each token goes to its nearest centroid's expert (gate 1).

    Centroids start as randomly sampled tokens of the first training batch (drawn in this process's first training
    step only; a resumed router keeps its centroids); after each training step's assignment each centroid becomes
    the mean of its routed tokens (an EMA of it when decay > 0). An expert that received no token keeps its centroid.
    """

    def __init__(self, dim: int, num_routed: int, top_k: int, conditional: bool, decay: float = 0.0, **losses):
        super().__init__(None, num_routed, top_k, conditional, **losses)
        self.decay = decay
        self.register_buffer("centroids_ED", torch.zeros(num_routed, dim))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # On the host, so that checking it costs no synchronisation: whether this process drew its seed tokens.
        self.seeds_drawn = False

    def choose(self, x_ND: torch.Tensor, cond_N: torch.Tensor, num_samples: int, ops: RoutingOps):
        # Distances and means in fp32 at least, float64 for a float64 router, whatever dtype the model was cast to.
        compute = torch.promote_types(self.centroids_ED.dtype, torch.float32)
        x32_ND = x_ND.detach().to(compute)
        # The tokens of a broken image (NaN or inf) neither seed nor move a centroid: one bad image would otherwise
        # make its centroid NaN for the rest of training.
        finite_N = torch.isfinite(x32_ND).all(dim=-1)
        finite_x_ND = torch.where(finite_N[:, None], x32_ND, 0.0)
        if self.training and not self.seeds_drawn:
            self.seed_centroids(x32_ND, finite_x_ND, finite_N)
        distances_NE = torch.cdist(x32_ND, self.centroids_ED.to(compute))
        expert_ids_NK, _ = top_k(-distances_NE, self.top_k)
        if self.training:
            self.update_centroids(finite_x_ND, expert_ids_NK, self.routed_weight(cond_N) * finite_N)
        return expert_ids_NK, torch.ones(expert_ids_NK.shape, device=x_ND.device), distances_NE

    def running_stats(self) -> list[torch.Tensor]:
        """Buffers the training driver averages over ranks once per step."""
        return [self.centroids_ED]

    def seed_centroids(self, x_ND: torch.Tensor, finite_x_ND: torch.Tensor, finite_N: torch.Tensor) -> None:
        """Uninitialised centroids become randomly sampled tokens (a broken one: the mean of the finite tokens). The
        choice between old and sampled stays on the device, so no host sync: a resumed router draws once and keeps
        its centroids."""
        sampled = x_ND[torch.randint(0, x_ND.shape[0], (self.num_routed,), device=x_ND.device)]
        finite_mean_D = finite_x_ND.sum(0) / finite_N.sum().clamp(min=1)
        sampled = torch.where(sampled.isfinite().all(dim=-1, keepdim=True), sampled, finite_mean_D)
        self.centroids_ED.copy_(torch.where(self.initialized, self.centroids_ED, sampled))
        self.initialized.fill_(True)
        self.seeds_drawn = True

    @torch.no_grad()
    def update_centroids(self, x_ND, expert_ids_NK, weight_N) -> None:
        """Each centroid that received a token of weight 1 moves to (an EMA of) their mean."""
        routed_ids_NK = torch.where(weight_N[:, None] > 0, expert_ids_NK, self.num_routed)  # weight 0: no expert
        plan = token_choice_plan(routed_ids_NK, torch.ones(routed_ids_NK.shape, device=x_ND.device), self.num_routed,
                                 has_dropped_slots=True)
        centroids, received = plan_centroids(x_ND, plan, self.num_routed)
        updated = self.decay * self.centroids_ED + (1 - self.decay) * centroids[0]
        self.centroids_ED.copy_(torch.where(received[0, :, None], updated, self.centroids_ED))


class DiffMoERouter(nn.Module):
    """DiffMoE (Shi et al., 2025): batch-level expert choice over the global token pool.

    Training: every expert takes the top-C tokens of the whole batch by its softmax gate score,
    C = int(N / E * capacity). A capacity predictor (an MLP on the detached tokens) learns, by binary
    cross-entropy, which tokens each expert took (its weight `predictor_loss_weight`: 1.0 in DiffMoE's release,
    0.01 in the ProMoE code behind the paper's DiffMoE numbers; see ModelConfig.capacity_predictor_loss_weight);
    each expert's threshold is an EMA (decay 0.95) of the C-th largest predicted probability. Inference: expert e
    takes as many tokens as the predictor puts above its threshold, the ones with its highest gate scores, so
    compute adapts to the input.

    The thresholds are updated on each rank in forward; the driver averages `running_stats()` over ranks once
    per step (the official code all-reduces inside forward).
    """

    couples_samples = True  # the tokens above the threshold compete over the whole batch, in training and inference
    token_choice = False

    def __init__(self, dim: int, num_experts: int, capacity: float, threshold_decay: float = 0.95,
                 predictor_loss_weight: float = 1.0):
        super().__init__()
        self.scorer = LinearScorer(dim, num_experts, init_std=0.006)
        self.capacity_predictor = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, num_experts))
        self.num_routed = num_experts
        self.capacity = capacity
        self.threshold_decay = threshold_decay
        self.predictor_loss_weight = predictor_loss_weight
        self.register_buffer("expert_threshold_E", torch.zeros(num_experts))

    def running_stats(self) -> list[torch.Tensor]:
        """Buffers the training driver averages over ranks once per step."""
        return [self.expert_threshold_E]

    def forward(self, x_ND: torch.Tensor, cond_N: torch.Tensor, labels_B: torch.Tensor,
                ops: RoutingOps = DEFINITIONS) -> ExpertChoice:
        num_tokens = x_ND.shape[0]
        scores_EN = self.scorer(x_ND).t()
        # The tokens of a broken image (NaN or inf) rank last for every expert and stay out of the thresholds: they
        # never take another image's slot, and one bad image does not poison the statistic for the rest of training.
        finite_N = torch.isfinite(x_ND).all(dim=-1)
        ranked_EN = scores_EN.masked_fill(~finite_N, float("-inf"))
        predicted_NE = self.capacity_predictor(x_ND.detach()).float()
        if not self.training:
            return ExpertChoice(self.threshold_plan(scores_EN, ranked_EN, predicted_NE.sigmoid()))
        capacity = max(1, min(num_tokens, int(num_tokens / self.num_routed * self.capacity)))
        token_EC = ranked_EN.topk(capacity, dim=-1).indices
        gates_EC = scores_EN.gather(1, token_EC)
        taken_EN = torch.zeros_like(scores_EN).scatter_(1, token_EC, 1.0)
        with torch.no_grad():
            self.update_thresholds(predicted_NE.sigmoid().masked_fill(~finite_N[:, None], float("-inf")), capacity)
        bce = F.binary_cross_entropy_with_logits(predicted_NE, taken_EN.t())
        return ExpertChoice(expert_choice_plan(token_EC, gates_EC, num_tokens), predictor_loss=bce)

    def aux_losses(self, x_ND: torch.Tensor, choice: ExpertChoice, plan: RoutingPlan, ops: RoutingOps
                   ) -> dict[str, torch.Tensor]:
        return {"capacity_predictor": self.predictor_loss_weight * choice.predictor_loss}

    def update_thresholds(self, probability_NE: torch.Tensor, capacity: int) -> None:
        """EMA of each expert's C-th largest predicted probability (-inf marks a token left out); where fewer tokens
        than C count, there is no C-th and the threshold stays."""
        kth_probability_E = probability_NE.t().topk(capacity, dim=-1).values[:, -1].to(self.expert_threshold_E.dtype)
        updated_E = self.expert_threshold_E.lerp(kth_probability_E, 1 - self.threshold_decay)
        self.expert_threshold_E.copy_(torch.where(kth_probability_E.isfinite(), updated_E, self.expert_threshold_E))

    def threshold_plan(self, scores_EN: torch.Tensor, ranked_EN: torch.Tensor, probability_NE: torch.Tensor
                       ) -> RoutingPlan:
        """One slot per (expert, token); expert e keeps its count_e best-ranked tokens, the rest are dropped. A
        non-finite probability is never above the threshold, so broken tokens add nothing to count_e."""
        num_experts, num_tokens = scores_EN.shape
        count_E = (probability_NE > self.expert_threshold_E).sum(0)
        order_EN = ranked_EN.argsort(dim=1, descending=True)
        rank_EN = torch.empty_like(order_EN).scatter_(
            1, order_EN, torch.arange(num_tokens, device=scores_EN.device).expand(num_experts, -1))
        expert_EN = torch.arange(num_experts, device=scores_EN.device)[:, None].expand(-1, num_tokens)
        expert_EN = torch.where(rank_EN < count_E[:, None], expert_EN, num_experts)
        token_EN = torch.arange(num_tokens, device=scores_EN.device).expand(num_experts, -1)
        return sort_slots(token_EN.reshape(-1), expert_EN.reshape(-1), scores_EN.reshape(-1), num_experts, num_tokens)
