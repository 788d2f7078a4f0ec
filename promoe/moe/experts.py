"""Expert feed-forward networks: the dense FFN and the bank of stacked expert weights."""

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from promoe.moe.plan import RoutingPlan


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_tanh_backward(grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The gradient of gelu_tanh at z: what autograd computes for it (aten's gelu_backward), bit for bit."""
    return torch.ops.aten.gelu_backward(grad, z, approximate="tanh")


class FFN(nn.Module):
    """Linear -> GELU(tanh) -> Linear; the dense DiT MLP (keys fc1 / fc2 as timm's Mlp), as DiT writes it: autograd
    keeps both the pre-activation and the GELU output."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class SharedExpert(nn.Module):
    """The same FFN (the same keys) run on every token of a MoE layer, keeping for backward only its pre-activation
    besides x and the weights: the GELU output, which fc2's weight gradient reads, is recomputed from it (fc2 is a
    `GeluLinear`). Each linear runs in its own module call, so that what hooks a module call (diffusers' group
    offloading, layerwise casting) sees its weights."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = GeluLinear(hidden, dim)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x_ND))  # fc1 keeps x, as nn.Linear does


class GeluLinear(nn.Linear):
    """linear(gelu_tanh(z)) for z [N, H], keeping z (not the GELU output, made again in backward)."""

    def forward(self, z_NH: torch.Tensor) -> torch.Tensor:
        return _GeluLinear.apply(z_NH, self.weight, self.bias)


class _GeluLinear(torch.autograd.Function):
    """F.linear(gelu_tanh(z), w, b) for z [N, H], its backward the one autograd runs for GELU and nn.Linear (addmm),
    in the same order, less the GELU output that it keeps: recomputed from z (elementwise; no GEMM runs twice). Under
    autocast it runs in the autocast dtype, as autocast runs nn.Linear, and the gradients go back in the dtypes of
    the inputs."""

    @staticmethod
    def forward(ctx, z_NH, w_DH, b_D):
        inputs = (z_NH, w_DH, b_D)
        # Without autocast the weights compute in z's dtype: storage in another is cast here, as the bank does.
        autocast = autocast_dtype(z_NH)
        z_NH, w_DH, b_D = (t.to(autocast or z_NH.dtype) for t in inputs)
        with torch.autocast(z_NH.device.type, enabled=False) if autocast is not None else contextlib.nullcontext():
            y_ND = F.linear(gelu_tanh(z_NH), w_DH, b_D)
        # The originals are kept (the weight is kept anyway); the casts are made again in backward.
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.dtypes = [t.dtype for t in inputs]
        ctx.compute_dtype = z_NH.dtype
        return y_ND

    @staticmethod
    def backward(ctx, grad_ND):
        z_NH, w_DH = (t.to(ctx.compute_dtype) for t in ctx.saved_tensors)
        grad_ND = grad_ND.to(ctx.compute_dtype)
        a_NH = gelu_tanh(z_NH)  # recomputed, not kept
        # addmm's backward: mat1 <- grad @ mat2.t(); a transposed weight's gradient as grad.t() @ mat1 (its layout)
        grads = (gelu_tanh_backward(grad_ND.mm(w_DH), z_NH), grad_ND.t().mm(a_NH), grad_ND.sum(0))
        return tuple(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes))


@dataclass
class ExpertWeights:
    """The four stacked tensors of a bank as one expert MLP reads them (`TorchBackend.expert_mlp`)."""

    w_up_EDH: torch.Tensor
    b_up_EH: torch.Tensor
    w_down_EHD: torch.Tensor
    b_down_ED: torch.Tensor


class ExpertBank(nn.Module):
    """E experts of the same shape, stacked so that one grouped GEMM runs them all.

    Expert e computes `gelu_tanh(x @ w_up_EDH[e] + b_up_EH[e]) @ w_down_EHD[e] + b_down_ED[e]`; the dispatch backends
    run it on the slots of every expert at once (`TorchBackend.expert_mlp`, the one definition), through this
    module's call.
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

    def forward(self, rows: torch.Tensor, plan: "RoutingPlan", backend, permute: bool) -> torch.Tensor:
        """[S, D]: the expert MLP of every slot of `plan`, run by `backend` (a dispatch backend of
        `promoe.moe.dispatch`, which imports this module: not named here, so the two do not import each other) on
        this bank's weights (rows: x [N, D] when `permute`, else x's rows already in slot order).

        The weights are read here, inside the bank's own module call, so that what hooks a module call sees them
        where they are used: diffusers' group offloading brings them in before and takes them out after, layerwise
        casting casts them, a forward hook sees them. Without autocast they compute in the rows' dtype, storage in
        another is cast here (as the shared expert does); under autocast the GEMMs cast, as every matmul does
        there."""
        weights = (self.w_up_EDH, self.b_up_EH, self.w_down_EHD, self.b_down_ED)
        if autocast_dtype(rows) is None:
            weights = tuple(w.to(rows.dtype) for w in weights)  # no copy where the dtype is the rows' already
        return backend.expert_mlp(rows, plan, ExpertWeights(*weights), permute)

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
    return (*grouped_mm_backward(grad_SB, x_SA, w_EAB, ends_E, *ctx.needs_input_grad[:2]), None)


def grouped_mm_backward(grad_SB: torch.Tensor, x_SA: torch.Tensor, w_EAB: torch.Tensor, ends_E: torch.Tensor,
                        x_grad: bool = True, w_grad: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad x [S, A], grad w [E, A, B]) of `grouped_mm(x, w, ends)`, each None where not asked for; x, w and grad
    in one dtype. Rows of grad x past ends[-1] are left uninitialised."""
    # The CPU kernel fails on a gradient with zero strides: straight from .sum(), or of no rows at all (a rank of
    # expert parallelism that runs no slot), which .contiguous() leaves as they are.
    grad_SB = grad_SB.contiguous() if grad_SB.numel() else grad_SB.new_zeros(grad_SB.shape)
    grad_x = _grouped_mm_op(grad_SB, w_EAB.transpose(1, 2), ends_E) if x_grad else None
    grad_w = _grouped_mm_weight_grad_op(x_SA, grad_SB, ends_E) if w_grad else None
    return grad_x, grad_w


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
