"""Token permutation into expert order and the gate-weighted combine back, forward and backward.

Slots are the rows of a RoutingPlan: slot s reads token token_S[s]; the K choices of token n sit at slots
slot_NK[n]; slots at or past `end` (= offsets[-1]) are dropped. Every kernel reads `end` from device memory, so
nothing synchronises with the host.

- permute:  x_SD[s] = x_ND[token_S[s]] (0 for a dropped slot).       reads S*D, writes S*D
- combine:  y_ND[n] = base_ND[n] + sum_k gate_S[slot_NK[n, k]] * out_SD[slot_NK[n, k]], fp32 accumulation; the
            base (the shared experts' output) is optional. Gather form: every output row is written once, no
            atomics, deterministic.                                  reads N*K*D (+ N*D), writes N*D
- combine backward, one pass per slot: grad_out_SD[s] = gate_S[s] * grad_y[token_S[s]] and
  grad_gate_S[s] = <grad_y[token_S[s]], out_SD[s]>.                  reads 2*S*D, writes S*D
The backward of permute is a combine without gates, and that of a combine without gates is a permute.
Each entry point is a `torch.library` custom op (namespace `promoe`) with a fake and an autograd registration, so
that `torch.compile` traces through it.
"""

import torch
import triton
import triton.language as tl

from promoe.kernels.launch import dim_block, empty_output, row_grid, token_block


@triton.jit
def _permute_kernel(x_ptr, token_ptr, end_ptr, out_ptr, num_slots, dim, stride_x, stride_out,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    slots = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)  # int64: slots * D passes 2^31
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_range = slots < num_slots
    valid = in_range & (slots < tl.load(end_ptr))
    tokens = tl.load(token_ptr + slots, mask=valid, other=0)
    col_ok = cols < dim
    rows = tl.load(x_ptr + tokens[:, None] * stride_x + cols[None, :], mask=valid[:, None] & col_ok[None, :],
                   other=0.0)
    tl.store(out_ptr + slots[:, None] * stride_out + cols[None, :], rows, mask=in_range[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(src_ptr, slot_ptr, gate_ptr, end_ptr, base_ptr, out_ptr, num_tokens, dim, stride_src, stride_base,
                    stride_out, TOP_K: tl.constexpr, HAS_GATES: tl.constexpr, HAS_BASE: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: tokens * D passes 2^31
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_ok = tokens < num_tokens
    col_ok = cols < dim
    end = tl.load(end_ptr)
    if HAS_BASE:
        acc = tl.load(base_ptr + tokens[:, None] * stride_base + cols[None, :],
                      mask=token_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        slots = tl.load(slot_ptr + tokens * TOP_K + k, mask=token_ok, other=0)
        valid = token_ok & (slots < end)
        rows = tl.load(src_ptr + slots[:, None] * stride_src + cols[None, :], mask=valid[:, None] & col_ok[None, :],
                       other=0.0).to(tl.float32)
        if HAS_GATES:
            rows = rows * tl.load(gate_ptr + slots, mask=valid, other=0.0).to(tl.float32)[:, None]
        acc += rows
    tl.store(out_ptr + tokens[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=token_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_backward_kernel(grad_y_ptr, out_ptr, token_ptr, gate_ptr, end_ptr, grad_out_ptr, grad_gate_ptr,
                             num_slots, dim, stride_gy, stride_out, stride_gout,
                             BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    slots = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)  # int64: slots * D passes 2^31
    in_range = slots < num_slots
    valid = in_range & (slots < tl.load(end_ptr))
    tokens = tl.load(token_ptr + slots, mask=valid, other=0)
    gates = tl.load(gate_ptr + slots, mask=valid, other=0.0).to(tl.float32)
    dots = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        load_mask = valid[:, None] & (cols < dim)[None, :]
        grad_y = tl.load(grad_y_ptr + tokens[:, None] * stride_gy + cols[None, :], mask=load_mask,
                         other=0.0).to(tl.float32)
        out = tl.load(out_ptr + slots[:, None] * stride_out + cols[None, :], mask=load_mask, other=0.0).to(tl.float32)
        dots += tl.sum(grad_y * out, axis=1)
        tl.store(grad_out_ptr + slots[:, None] * stride_gout + cols[None, :],
                 (grad_y * gates[:, None]).to(grad_out_ptr.dtype.element_ty),
                 mask=in_range[:, None] & (cols < dim)[None, :])
    tl.store(grad_gate_ptr + slots, dots, mask=in_range)


@torch.library.custom_op("promoe::permute", mutates_args=())
def _permute_op(x_ND: torch.Tensor, token_S: torch.Tensor, slot_NK: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    x_ND = x_ND.contiguous()
    num_slots, dim = token_S.numel(), x_ND.shape[1]
    out = empty_output((num_slots, dim), x_ND.dtype, x_ND.device)
    block_s, block_d = token_block(num_slots), dim_block(dim)
    if num_slots:
        _permute_kernel[row_grid(num_slots, block_s, dim, block_d)](
            x_ND, token_S, end, out, num_slots, dim, x_ND.stride(0), out.stride(0), BLOCK_S=block_s, BLOCK_D=block_d)
    return out


@_permute_op.register_fake
def _(x_ND, token_S, slot_NK, end):
    return x_ND.new_empty((token_S.shape[0], x_ND.shape[1]))


def _permute_setup_context(ctx, inputs, output):
    _, token_S, slot_NK, end = inputs
    ctx.save_for_backward(token_S, slot_NK, end)


def _permute_backward(ctx, grad_SD):
    """The backward of permute is a combine without gates."""
    token_S, slot_NK, end = ctx.saved_tensors
    return _combine_op(grad_SD, None, token_S, slot_NK, end, None), None, None, None


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup_context)


@torch.library.custom_op("promoe::combine", mutates_args=())
def _combine_op(out_SD: torch.Tensor, gates_S: torch.Tensor | None, token_S: torch.Tensor, slot_NK: torch.Tensor,
                end: torch.Tensor, base_ND: torch.Tensor | None) -> torch.Tensor:
    """The gate-weighted combine added to base_ND; without gates, the plain sum of each token's slots (the backward
    of permute)."""
    out_SD = out_SD.contiguous()
    # An absent gate or base vector is never read (HAS_GATES / HAS_BASE): `end` stands in, one element, so that
    # the byte count of the launch charges nothing for it.
    gates = end if gates_S is None else gates_S.contiguous()
    base = end if base_ND is None else base_ND.contiguous()
    (num_tokens, top_k), dim = slot_NK.shape, out_SD.shape[1]
    y = empty_output((num_tokens, dim), out_SD.dtype, out_SD.device)
    block_n, block_d = token_block(num_tokens), dim_block(dim)
    if num_tokens:
        _combine_kernel[row_grid(num_tokens, block_n, dim, block_d)](
            out_SD, slot_NK, gates, end, base, y, num_tokens, dim, out_SD.stride(0), base.stride(0), y.stride(0),
            TOP_K=top_k, HAS_GATES=gates_S is not None, HAS_BASE=base_ND is not None, BLOCK_N=block_n,
            BLOCK_D=block_d)
    return y


@_combine_op.register_fake
def _(out_SD, gates_S, token_S, slot_NK, end, base_ND):
    return out_SD.new_empty((slot_NK.shape[0], out_SD.shape[1]))


def _combine_setup_context(ctx, inputs, output):
    out_SD, gates_S, token_S, slot_NK, end, base_ND = inputs
    ctx.save_for_backward(out_SD, gates_S, token_S, slot_NK, end)
    ctx.has_base = base_ND is not None


def _combine_backward(ctx, grad_y_ND):
    out_SD, gates_S, token_S, slot_NK, end = ctx.saved_tensors
    grad_base_ND = grad_y_ND if ctx.has_base else None  # the base is added as it is
    if gates_S is None:  # a plain sum: its backward is a permute
        return _permute_op(grad_y_ND, token_S, slot_NK, end), None, None, None, None, grad_base_ND
    grad_out_SD, grad_gates_S = _combine_backward_op(grad_y_ND, out_SD, gates_S, token_S, end)
    return grad_out_SD, grad_gates_S, None, None, None, grad_base_ND


_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup_context)


@torch.library.custom_op("promoe::combine_backward", mutates_args=())
def _combine_backward_op(grad_y_ND: torch.Tensor, out_SD: torch.Tensor, gates_S: torch.Tensor, token_S: torch.Tensor,
                         end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad out [S, D] in out's dtype, grad gates [S] in the gates' dtype) of the gate-weighted combine."""
    grad_y_ND, out_SD = grad_y_ND.contiguous(), out_SD.contiguous()
    num_slots, dim = out_SD.shape
    grad_out = empty_output(out_SD.shape, out_SD.dtype, out_SD.device)
    grad_gates = empty_output((num_slots,), torch.float32, out_SD.device)
    block_s, block_d = token_block(num_slots), dim_block(dim)
    if num_slots:
        _combine_backward_kernel[(triton.cdiv(num_slots, block_s),)](
            grad_y_ND, out_SD, token_S, gates_S, end, grad_out, grad_gates, num_slots, dim, grad_y_ND.stride(0),
            out_SD.stride(0), grad_out.stride(0), BLOCK_S=block_s, BLOCK_D=block_d)
    return grad_out, grad_gates.to(gates_S.dtype)


@_combine_backward_op.register_fake
def _(grad_y_ND, out_SD, gates_S, token_S, end):
    return torch.empty_like(out_SD, memory_format=torch.contiguous_format), gates_S.new_empty(gates_S.shape)


def permute(x_ND, token_S, slot_NK, end):
    """Rows of x in slot order [S, D]; rows of dropped slots are zeros. `end` is a 1-element device tensor."""
    return _permute_op(x_ND, token_S, slot_NK, end)


def combine(out_SD, gates_S, token_S, slot_NK, end, base_ND=None):
    """y [N, D] = base + sum over each token's K slots of gate * out (dropped slots contribute nothing)."""
    return _combine_op(out_SD, gates_S, token_S, slot_NK, end, base_ND)
