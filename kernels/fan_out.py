"""One tensor read by several ops, its gradient summed in one pass.

A MoE layer's input x is read by four ops (the routing, the RCL's token sums, the shared expert, the permute).
Autograd adds their four gradients as they arrive: three [N, D] adds, each reading two tensors and writing one
(9 N*D elements). `fan_out(x, copies)` hands each reader its own view of x; its backward sums the gradients that
arrived in one kernel, `_sum_kernel`: it reads each gradient once and writes the sum once (5 N*D elements for four),
in fp32 (float64 for float64 gradients) whatever the storage dtype.
The sum is a `torch.library` custom op (`promoe::sum_gradients`) with a fake registration, so that `torch.compile`
traces through the backward. Its definition is the plain sum of the gradients, which autograd computes without it.
"""

import torch
import triton
import triton.language as tl

from promoe.kernels.launch import empty_output

MAX_TERMS = 4
SUM_BLOCK = 1024  # elements per program


@triton.jit
def _sum_kernel(a_ptr, b_ptr, c_ptr, d_ptr, out_ptr, numel, TERMS: tl.constexpr, FP64: tl.constexpr,
                BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: N * D passes 2^31
    in_range = offsets < numel
    acc_dtype = tl.float64 if FP64 else tl.float32
    total = tl.load(a_ptr + offsets, mask=in_range, other=0.0).to(acc_dtype)
    if TERMS > 1:
        total += tl.load(b_ptr + offsets, mask=in_range, other=0.0).to(acc_dtype)
    if TERMS > 2:
        total += tl.load(c_ptr + offsets, mask=in_range, other=0.0).to(acc_dtype)
    if TERMS > 3:
        total += tl.load(d_ptr + offsets, mask=in_range, other=0.0).to(acc_dtype)
    tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=in_range)


@torch.library.custom_op("promoe::sum_gradients", mutates_args=())
def _sum_op(grads: list[torch.Tensor]) -> torch.Tensor:
    """The elementwise sum of 1 to 4 tensors of one shape and dtype."""
    grads = [g.contiguous() for g in grads]
    first = grads[0]
    out = empty_output(first.shape, first.dtype, first.device)
    if first.numel():
        padded = grads + [first] * (MAX_TERMS - len(grads))  # unread: TERMS says how many are real
        _sum_kernel[(triton.cdiv(first.numel(), SUM_BLOCK),)](
            *padded, out, first.numel(), TERMS=len(grads), FP64=first.dtype == torch.float64, BLOCK=SUM_BLOCK)
    return out


@_sum_op.register_fake
def _(grads):
    return torch.empty_like(grads[0], memory_format=torch.contiguous_format)


def sum_gradients(grads: list[torch.Tensor]) -> torch.Tensor:
    if not 1 <= len(grads) <= MAX_TERMS:
        raise ValueError(f"sum_gradients adds 1 to {MAX_TERMS} tensors, got {len(grads)}")
    if any(g.shape != grads[0].shape or g.dtype != grads[0].dtype for g in grads):
        raise ValueError(f"sum_gradients needs tensors of one shape and dtype, got "
                         f"{[(tuple(g.shape), g.dtype) for g in grads]}")
    return grads[0] if len(grads) == 1 else _sum_op(grads)


class _FanOut(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, copies: int):
        return tuple(x.view_as(x) for _ in range(copies))

    @staticmethod
    def backward(ctx, *grads):
        arrived = [g for g in grads if g is not None]
        return (sum_gradients(arrived) if arrived else None), None


def fan_out(x: torch.Tensor, copies: int) -> tuple[torch.Tensor, ...]:
    """`copies` views of x, one per reader; x's gradient is the sum of theirs, in one kernel. At most 4 copies."""
    if not 1 <= copies <= MAX_TERMS:
        raise ValueError(f"fan_out makes 1 to {MAX_TERMS} copies, got {copies}")
    return _FanOut.apply(x, copies)
