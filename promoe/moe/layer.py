"""The MoE layer: a router, a bank of routed (+ unconditional) experts, and optional shared experts."""

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from promoe.moe.dispatch import backend_named, check_backend, default_backend_name
from promoe.moe.experts import FFN, ExpertBank


class MoELayer(nn.Module):
    """y = shared(x) + sum over the token's slots of gate * expert(x), for tokens x [B, L, D].

    `activated_routed` is how many bank experts one token runs on average (top-K for token choice, the
    capacity factor for expert choice); it only serves parameter counting. `backend` names the dispatch backend
    (`promoe.moe.dispatch`); None takes the device's default.
    """

    def __init__(self, router: nn.Module, num_bank_experts: int, dim: int, expert_hidden: int, shared_hidden: int,
                 activated_routed: int, null_label: int, backend: str | None = None):
        super().__init__()
        self.null_label = null_label
        self.router = router
        self.experts = ExpertBank(num_bank_experts, dim, expert_hidden)
        # S shared experts of width H are one FFN of width S*H: the sum of their outputs is the same function.
        self.shared = FFN(dim, shared_hidden) if shared_hidden > 0 else None
        self.activated_routed = activated_routed
        self.backend = backend

    @property
    def backend(self) -> str | None:
        """The dispatch backend's name; None takes the device's default."""
        return self._backend_name

    @backend.setter
    def backend(self, name: str | None) -> None:
        # The object is resolved here, once, so that forward (and torch.compile's trace of it) holds the backend
        # instead of looking its name up.
        if name is not None:
            check_backend(name)
        self._backend_name = name
        self._backend_object = None if name is None else backend_named(name)

    def inactive_param_count(self) -> int:
        """Parameters of the bank experts that a token does not run (counted in total, not in activated)."""
        return (self.experts.num_experts - self.activated_routed) * self.experts.params_per_expert

    def forward(self, x_BLD: torch.Tensor, labels_B: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """labels_B: the labels after dropout; the tokens of null-label samples are the unconditional ones."""
        num_samples, tokens_per_image, dim = x_BLD.shape
        x_ND = x_BLD.reshape(-1, dim)
        cond_N = (labels_B != self.null_label).repeat_interleave(tokens_per_image)
        backend = self._backend_object
        if backend is None:
            backend = backend_named(default_backend_name(x_BLD.device))
        plan, aux = self.router(x_ND, cond_N, num_samples, labels_B, backend)
        shared_ND = None if self.shared is None else self.shared(x_ND)
        return backend.dispatch(x_ND, plan, self.experts, shared_ND).view_as(x_BLD), aux


def dispatch_name(model: nn.Module, device: torch.device) -> str:
    """The dispatch backend that the MoE layers of `model` run on ("none" for a dense model)."""
    layers = [module for module in model.modules() if isinstance(module, MoELayer)]
    return (layers[0].backend or default_backend_name(device)) if layers else "none"


@contextlib.contextmanager
def dispatch_backend(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Run every MoE layer of `model` on backend `name` inside the block, whatever its config says."""
    check_backend(name)
    layers = [module for module in model.modules() if isinstance(module, MoELayer)]
    configured = [layer.backend for layer in layers]
    for layer in layers:
        layer.backend = name
    try:
        yield model
    finally:
        for layer, backend in zip(layers, configured):
            layer.backend = backend
