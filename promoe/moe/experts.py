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

    Expert e computes `gelu_tanh(x @ w_up_EDH[e] + b_up_EH[e]) @ w_down_EHD[e] + b_down_ED[e]`; the dispatch backends
    run it on the slots of every expert at once (`TorchBackend.run_experts`, the one definition).
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


@torch.library.custom_op("promoe::grouped_mm", mutates_args=())
def _grouped_mm_op(x_SA: torch.Tensor, w_EAB: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(x_SA, w_EAB, offs=ends_E)


@_grouped_mm_op.register_fake
def _(x_SA, w_EAB, ends_E):
    # PyTorch's own fake of `_grouped_mm` (torch 2.13) takes bf16 only, although the CPU kernel runs every float
    # dtype: this one lets torch.compile trace the expert GEMMs in fp32 too.
    return x_SA.new_empty((x_SA.shape[0], w_EAB.shape[2]))


@torch.library.custom_op("promoe::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad_op(x_SA: torch.Tensor, grad_SB: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    """[E, A, B]: expert e's rows of x, transposed, times the same rows of grad."""
    return F.grouped_mm(x_SA.t(), grad_SB, offs=ends_E)


@_grouped_mm_weight_grad_op.register_fake
def _(x_SA, grad_SB, ends_E):
    return x_SA.new_empty((ends_E.shape[0], x_SA.shape[1], grad_SB.shape[1]))


def _grouped_mm_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad_SB):
    x_SA, w_EAB, ends_E = ctx.saved_tensors
    # The CPU kernel fails on a gradient with zero strides: straight from .sum(), or of no rows at all (a rank of
    # expert parallelism that runs no slot), which .contiguous() leaves as they are.
    grad_SB = grad_SB.contiguous() if grad_SB.numel() else grad_SB.new_zeros(grad_SB.shape)
    grad_x = _grouped_mm_op(grad_SB, w_EAB.transpose(1, 2), ends_E) if ctx.needs_input_grad[0] else None
    grad_w = _grouped_mm_weight_grad_op(x_SA, grad_SB, ends_E) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup_context)


# Asked once, at import: Dynamo cannot trace torch.amp.is_autocast_available on torch 2.11 (a graph break in every
# MoE layer under torch.compile), and a set lookup it traces.
AUTOCAST_DEVICES = frozenset(device for device in ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia")
                             if torch.amp.is_autocast_available(device))


def autocast_dtype(tensor: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on `tensor`'s device, or None where it is off (or absent, as on `meta`)."""
    device = tensor.device.type
    if device in AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def grouped_mm(x_SA: torch.Tensor, w_EAB: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    """Rows ends_E[e-1]:ends_E[e] of x times w_EAB[e]. Output rows past ends_E[-1] are left uninitialised (so are
    those of x's gradient). Under autocast it runs in the autocast dtype, as every matmul does there: autocast does
    not see inside a custom op, and the casts here are what autograd records, so the backward runs in that dtype
    too and hands fp32 gradients to fp32 weights."""
    dtype = autocast_dtype(x_SA)
    if dtype is not None:
        x_SA, w_EAB = x_SA.to(dtype), w_EAB.to(dtype)
    return _grouped_mm_op(x_SA, w_EAB, ends_E)
