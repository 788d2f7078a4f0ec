"""The MoE layer: a router, a bank of routed (+ unconditional) experts, optional shared experts, and the dispatch
backend that runs them, chosen once when the layer is built (or placed on its device).

One forward, in the order of the algorithm: route (the router's choices, conditional routing included, by the
routing maths of the backend: the definitions, or on triton the kernels its table picked) -> plan
(the slots sorted by expert) -> auxiliary losses (from the choice and the plan) -> dispatch the tokens to the
experts -> combine their outputs onto the shared experts' output.
"""

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

from promoe.config import check_backend
from promoe.moe.dispatch import RouterSpec, TorchBackend, default_backend_name, make_backend
from promoe.moe.expert_parallel import ExpertGroup, ExpertParallel
from promoe.moe.experts import ExpertBank, SharedExpert
from promoe.moe.plan import RoutingPlan
from promoe.moe.routers import PrototypeScorer


class MoELayer(nn.Module):
    """y = shared(x) + sum over the token's slots of gate * expert(x), for tokens x [B, L, D].

    `activated_routed` is how many bank experts one token runs on average (top-K for token choice, the
    capacity factor for expert choice); it only serves parameter counting. `backend` names the dispatch backend
    (`promoe.moe.dispatch`); None takes the default of the device the layer is built on (see `place_dispatch`).
    """

    def __init__(self, router: nn.Module, num_bank_experts: int, dim: int, expert_hidden: int, shared_hidden: int,
                 activated_routed: int, null_label: int, backend: str | None = None):
        super().__init__()
        self.null_label = null_label
        self.router = router
        self.experts = ExpertBank(num_bank_experts, dim, expert_hidden)
        # S shared experts of width H are one FFN of width S*H: the sum of their outputs is the same function.
        self.shared = SharedExpert(dim, shared_hidden) if shared_hidden > 0 else None
        self.activated_routed = activated_routed
        self.configured_backend = backend
        self.plan_hooks: list[Callable[[RoutingPlan], None]] = []  # called with each plan (`promoe.moe.record`)
        self.expert_group: ExpertGroup | None = None  # set by expert parallelism: the bank holds this rank's rows
        self.dispatch_to_experts = dispatch_locally  # permute -> expert MLP -> combine; see `spread_experts`
        self.use_backend(backend or default_backend_name(torch.get_default_device()))

    def use_backend(self, name: str) -> None:
        """Run on backend `name` from now on: the backend decides here, once, which kernels run this layer's steps,
        the routing maths (`backend.routing`, which forward hands the router) among them."""
        self.backend: TorchBackend = make_backend(name, self.router_spec())

    def spread_experts(self, group: ExpertGroup) -> None:
        """From now on the routed experts run spread over `group`'s ranks (`ExpertParallel`), the bank cut by the
        caller to this rank's rows (`group.bank_rows()`)."""
        self.expert_group = group
        self.dispatch_to_experts = ExpertParallel(group)

    def router_spec(self) -> RouterSpec:
        scorer = getattr(self.router, "scorer", None)
        prototypes = scorer.prototypes.shape[0] if isinstance(scorer, PrototypeScorer) else 0
        return RouterSpec(self.router.token_choice, prototypes, getattr(self.router, "top_k", 1))

    @property
    def num_bank_experts(self) -> int:
        """The experts of the whole bank, routed and unconditional, of which this rank may hold only some."""
        return self.experts.num_experts if self.expert_group is None else self.expert_group.bank_size

    def inactive_param_count(self) -> int:
        """Parameters of the bank experts that a token does not run (counted in total, not in activated)."""
        return (self.experts.num_experts - self.activated_routed) * self.experts.params_per_expert

    def forward(self, x_BLD: torch.Tensor, labels_B: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """labels_B: the labels after dropout; the tokens of null-label samples are the unconditional ones."""
        _, tokens_per_image, dim = x_BLD.shape
        x_ND = x_BLD.reshape(-1, dim)
        cond_N = (labels_B != self.null_label).repeat_interleave(tokens_per_image)
        # Four ops read x; each takes its own view, so that the backend can sum their gradients in one pass.
        x_route_ND, x_losses_ND, x_shared_ND, x_dispatch_ND = self.backend.fan_out(x_ND, 4)
        choice = self.router(x_route_ND, cond_N, labels_B, self.backend.routing)
        if self.router.token_choice:  # each token chose K experts: sort its slots by expert
            plan = self.backend.token_choice_plan(choice.expert_ids_NK, choice.gates_NK, self.num_bank_experts,
                                                  self.router.has_dropped_slots)
        else:  # each expert chose its tokens: the choice is the plan
            plan = choice.plan
        for hook in self.plan_hooks:
            hook(plan)
        # The losses read the choice, the plan and x. Taken before the dispatch, as they always were: autograd sums
        # x's gradients in the reverse order of x's uses, and this order keeps every loss bit-identical.
        aux = self.router.aux_losses(x_losses_ND, choice, plan, self.backend.routing) if self.training else {}
        shared_ND = None if self.shared is None else self.shared(x_shared_ND)
        # permute into expert order -> the expert MLP -> combine, gate-weighted, onto the shared experts' output
        y_ND = self.dispatch_to_experts(self.backend, x_dispatch_ND, plan, self.experts, shared_ND)
        return y_ND.view_as(x_BLD), aux


def dispatch_locally(backend: TorchBackend, x_ND: torch.Tensor, plan: RoutingPlan, experts: ExpertBank,
                     base_ND: torch.Tensor | None) -> torch.Tensor:
    """A layer's dispatch with its whole bank on this rank: the backend's."""
    return backend.dispatch(x_ND, plan, experts, base_ND)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [module for module in model.modules() if isinstance(module, MoELayer)]


def place_dispatch(model: nn.Module, device: torch.device) -> None:
    """Once the model is on `device`: every MoE layer runs its configured backend, else the device's default."""
    for layer in moe_layers(model):
        layer.use_backend(layer.configured_backend or default_backend_name(device))


def describe_dispatch(model: nn.Module) -> str:
    """The dispatch backends of the MoE layers, with the steps that fall back to the definitions ("none" for a
    dense model)."""
    descriptions = list(dict.fromkeys(layer.backend.describe() for layer in moe_layers(model)))
    return " | ".join(descriptions) or "none"


@contextlib.contextmanager
def dispatch_backend(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Run every MoE layer of `model` on backend `name` inside the block, whatever its config says."""
    check_backend(name)
    layers = moe_layers(model)
    previous = [layer.backend.name for layer in layers]
    for layer in layers:
        layer.use_backend(name)
    try:
        yield model
    finally:
        for layer, backend in zip(layers, previous):
            layer.use_backend(backend)
