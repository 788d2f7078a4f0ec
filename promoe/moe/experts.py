"""Expert feed-forward networks: the dense FFN and the bank of stacked expert weights."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class FFN(nn.Module):
    """Linear -> GELU(tanh) -> Linear; the dense DiT MLP and the shared expert (keys fc1 / fc2 as timm's Mlp)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class ExpertBank(nn.Module):
    """E experts of the same shape, stacked so that one grouped GEMM runs them all.

    Expert e computes `gelu_tanh(x @ w_up_EDH[e] + b_up_EH[e]) @ w_down_EHD[e] + b_down_ED[e]`.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w_up_EDH = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b_up_EH = nn.Parameter(torch.empty(num_experts, hidden))
        self.w_down_EHD = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b_down_ED = nn.Parameter(torch.empty(num_experts, dim))

    @property
    def num_experts(self) -> int:
        return self.w_up_EDH.shape[0]

    @property
    def params_per_expert(self) -> int:
        return sum(p[0].numel() for p in self.parameters())

    @torch.no_grad()
    def init_weights(self) -> None:
        """Each expert as an nn.Linear under DiT's init: xavier-uniform weights, zero biases."""
        dim, hidden = self.w_up_EDH.shape[1:]
        bound = math.sqrt(6.0 / (dim + hidden))
        self.w_up_EDH.uniform_(-bound, bound)
        self.w_down_EHD.uniform_(-bound, bound)
        self.b_up_EH.zero_()
        self.b_down_ED.zero_()

    def expert_forward(self, expert: int, x_TD: torch.Tensor) -> torch.Tensor:
        """One expert on its own rows: the readable form the `loop` backend uses."""
        h_TH = gelu_tanh(x_TD @ self.w_up_EDH[expert] + self.b_up_EH[expert])
        return h_TH @ self.w_down_EHD[expert] + self.b_down_ED[expert]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    `grouped_mm`'s CPU backward fails on a gradient with zero strides (e.g. straight from `.sum()`).
    """

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm(x_SA: torch.Tensor, w_EAB: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    """Rows ends_E[e-1]:ends_E[e] of x times w_EAB[e]. Output rows past ends_E[-1] are left uninitialised."""
    return _ContiguousGrad.apply(F.grouped_mm(x_SA, w_EAB, offs=ends_E))
