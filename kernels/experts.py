"""Expert bias (+ GELU(tanh)) on the rows between the expert GEMMs, forward and backward, and the per-expert row sums.

Rows are slots sorted by expert: the rows of expert e are offsets[e]:offsets[e + 1], rows at or past offsets[E] are
dropped. The kernels work on *segment tiles*: a tile is BLOCK_S rows of one segment (an expert, or the dropped rows
as segment E), so each tile loads its expert's bias row once, and a sum over a tile is a sum within one expert.
Every kernel reads the offsets from device memory (no host synchronisation); the grid is sized for the worst case,
cdiv(S, BLOCK_S) + E + 1 tiles, and the tiles past the last one do nothing.

- bias_act forward:   a_SH[s] = act(h_SH[s] + b_EH[e(s)]), 0 for a dropped row.       reads S*H + E*H, writes S*H
- bias_act backward:  grad_h[s] = grad_a[s] * act'(h[s] + b[e(s)]), 0 for a dropped row;
                      partial_TH[t] = sum of grad_h over the rows of tile t (fp32).    reads 2*S*H, writes S*H + T*H
                      (without the activation grad_h is grad_a itself: reads S*H, writes T*H)
- segment sum:        sum_EH[e] = sum of the partials of e's tiles, in tile order: deterministic, no atomics.
                                                                                       reads T*H, writes E*H
where T = cdiv(S, BLOCK_S) + E + 1 and act is GELU(tanh) or the identity.

The per-expert token sums (the routing contrastive loss's centroids) are the same two passes over gathered rows:
- token sums forward: partial_TD[t] = sum over the rows s of tile t of x_ND[token[s]], then the segment sum.
                                                                                       reads S*D + S*i, writes T*D
- token sums backward (token-choice plan, gather form): grad_x[n] = sum over n's K slots s of an expert e < E' of
  grad_ED[e].                                                                          reads 2*N*K*i + E'*D, writes N*D
Each entry point and each backward is a `torch.library` custom op (namespace `promoe`) with a fake registration,
the entry points with an autograd one, so that `torch.compile` traces through them.
"""

import torch
import triton
import triton.language as tl

from promoe.kernels.launch import accumulation_dtype, dim_block, empty_output, expert_block

GELU_C = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
GELU_A = tl.constexpr(0.044715)
TOKEN_SUMS_BLOCK_N = 32  # tokens per program of the token sums' backward


@triton.jit
def _segment_tile(offsets_ptr, num_experts, num_slots, tile, E_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """Segment (0..E-1 an expert, E the dropped rows, > E none) of segment tile `tile`, and its first and end row."""
    seg = tl.arange(0, E_PAD)
    starts = tl.load(offsets_ptr + seg, mask=seg <= num_experts, other=num_slots)
    ends = tl.load(offsets_ptr + seg + 1, mask=seg < num_experts, other=num_slots)
    tiles = (ends - starts + BLOCK_S - 1) // BLOCK_S
    first_tile = tl.cumsum(tiles, 0) - tiles
    mine = tile >= first_tile
    segment = tl.sum(mine.to(tl.int32), 0) - 1  # segments with no tiles share a first tile: the last one holds it
    is_segment = seg == segment
    row0 = tl.sum(tl.where(is_segment, starts + (tile - first_tile) * BLOCK_S, 0), 0)
    end = tl.minimum(tl.sum(tl.where(is_segment, ends, 0), 0), row0 + BLOCK_S)
    return segment, row0, end


@triton.jit
def _gelu_tanh(z):
    u = GELU_C * (z + GELU_A * z * z * z)
    tanh = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
    return 0.5 * z * (1.0 + tanh), tanh


@triton.jit
def _gelu_tanh_slope(z, tanh):
    """gelu_tanh'(z), given the tanh that `_gelu_tanh(z)` computed."""
    return 0.5 * (1.0 + tanh) + 0.5 * z * (1.0 - tanh * tanh) * GELU_C * (1.0 + 3.0 * GELU_A * z * z)


@triton.jit
def _bias_tile(offsets_ptr, num_experts, num_slots, hidden, tile, E_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
               BLOCK_H: tl.constexpr):
    """A bias kernel's tile: its segment, rows and columns, and the masks of the rows it writes (in_tile), of the
    rows of an expert (live) and of the bias columns to read (none for the dropped rows)."""
    segment, row0, end = _segment_tile(offsets_ptr, num_experts, num_slots, tile, E_PAD, BLOCK_S)
    rows = row0.to(tl.int64) + tl.arange(0, BLOCK_S)  # int64: rows * H passes 2^31
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < hidden
    in_tile = (rows < end)[:, None] & col_ok[None, :]
    is_expert = segment < num_experts
    live = (rows < tl.where(is_expert, end, 0))[:, None] & col_ok[None, :]
    bias_ok = cols < tl.where(is_expert, hidden, 0)
    return segment, rows, cols, col_ok, in_tile, is_expert, live, bias_ok


@triton.jit
def _biased_rows(h_ptr, bias_ptr, segment, rows, cols, stride_h, stride_b, live, bias_ok, FP64: tl.constexpr):
    """h + the segment's bias row, in fp32 (float64 for float64 inputs)."""
    z = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=live, other=0.0)
    bias = tl.load(bias_ptr + segment.to(tl.int64) * stride_b + cols, mask=bias_ok, other=0.0)
    if FP64:
        return z.to(tl.float64) + bias.to(tl.float64)[None, :]
    return z.to(tl.float32) + bias.to(tl.float32)[None, :]


@triton.jit
def _bias_act_kernel(h_ptr, bias_ptr, offsets_ptr, out_ptr, num_slots, num_experts, hidden, stride_h, stride_b,
                     stride_out, GELU: tl.constexpr, FP64: tl.constexpr, E_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
                     BLOCK_H: tl.constexpr):
    segment, rows, cols, col_ok, in_tile, is_expert, live, bias_ok = _bias_tile(
        offsets_ptr, num_experts, num_slots, hidden, tl.program_id(0), E_PAD, BLOCK_S, BLOCK_H)
    z = _biased_rows(h_ptr, bias_ptr, segment, rows, cols, stride_h, stride_b, live, bias_ok, FP64)
    if GELU:
        z, _ = _gelu_tanh(z)
    z = tl.where(is_expert, z, 0.0)  # the dropped rows: zeros
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], z.to(out_ptr.dtype.element_ty), mask=in_tile)


@triton.jit
def _bias_act_backward_kernel(grad_ptr, h_ptr, bias_ptr, offsets_ptr, grad_h_ptr, partial_ptr, act_ptr, num_slots,
                              num_experts, hidden, stride_g, stride_h, stride_b, stride_gh, stride_act,
                              GELU: tl.constexpr, WRITE_ACT: tl.constexpr, FP64: tl.constexpr, E_PAD: tl.constexpr,
                              BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
    tile = tl.program_id(0)
    segment, rows, cols, col_ok, in_tile, is_expert, live, bias_ok = _bias_tile(
        offsets_ptr, num_experts, num_slots, hidden, tile, E_PAD, BLOCK_S, BLOCK_H)
    grad = tl.load(grad_ptr + rows[:, None] * stride_g + cols[None, :], mask=live, other=0.0)
    if FP64:
        grad = grad.to(tl.float64)
    else:
        grad = grad.to(tl.float32)
    if GELU:
        z = _biased_rows(h_ptr, bias_ptr, segment, rows, cols, stride_h, stride_b, live, bias_ok, FP64)
        act, tanh = _gelu_tanh(z)
        if WRITE_ACT:  # the forward's output made again (0 for a dropped row, as there), for the down GEMM's backward
            tl.store(act_ptr + rows[:, None] * stride_act + cols[None, :], act.to(act_ptr.dtype.element_ty),
                     mask=in_tile)
        grad = grad * _gelu_tanh_slope(z, tanh)
        tl.store(grad_h_ptr + rows[:, None] * stride_gh + cols[None, :], grad.to(grad_h_ptr.dtype.element_ty),
                 mask=in_tile)
    if segment <= num_experts:  # past the last tile: no partial (none is read)
        tl.store(partial_ptr + tile.to(tl.int64) * hidden + cols, tl.sum(grad, 0), mask=col_ok)


@triton.jit
def _gather_partials_kernel(x_ptr, token_ptr, offsets_ptr, partial_ptr, num_slots, num_experts, dim, stride_x,
                            FP64: tl.constexpr, E_PAD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
    """partial[t] = sum over the expert rows s of tile t of x[token[s]] (the centroid sums' first pass)."""
    tile = tl.program_id(0)
    segment, row0, end = _segment_tile(offsets_ptr, num_experts, num_slots, tile, E_PAD, BLOCK_S)
    rows = row0.to(tl.int64) + tl.arange(0, BLOCK_S)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < dim
    row_ok = rows < tl.where(segment < num_experts, end, 0)
    tokens = tl.load(token_ptr + rows, mask=row_ok, other=0)
    x = tl.load(x_ptr + tokens[:, None] * stride_x + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    if FP64:
        x = x.to(tl.float64)
    else:
        x = x.to(tl.float32)
    if segment <= num_experts:
        tl.store(partial_ptr + tile.to(tl.int64) * dim + cols, tl.sum(x, 0), mask=col_ok)


@triton.jit
def _segment_sum_kernel(partial_ptr, offsets_ptr, out_ptr, num_slots, num_experts, hidden, stride_out,
                        E_PAD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[e] = sum of the partials of expert e's tiles, in tile order (0 for an expert without rows)."""
    expert = tl.program_id(0)
    seg = tl.arange(0, E_PAD)
    starts = tl.load(offsets_ptr + seg, mask=seg <= num_experts, other=num_slots)
    ends = tl.load(offsets_ptr + seg + 1, mask=seg < num_experts, other=num_slots)
    tiles = (ends - starts + BLOCK_S - 1) // BLOCK_S
    first_tile = tl.cumsum(tiles, 0) - tiles
    first = tl.sum(tl.where(seg == expert, first_tile, 0), 0)
    count = tl.sum(tl.where(seg == expert, tiles, 0), 0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < hidden
    acc = tl.zeros((BLOCK_H,), dtype=partial_ptr.dtype.element_ty)
    rows_ptr = partial_ptr + first.to(tl.int64) * hidden + cols
    for _ in range(count):
        acc += tl.load(rows_ptr, mask=col_ok, other=0.0)
        rows_ptr += hidden
    tl.store(out_ptr + expert.to(tl.int64) * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _token_sums_backward_kernel(grad_ptr, slot_ptr, expert_ptr, end_ptr, out_ptr, num_tokens, num_experts, dim,
                                stride_grad, stride_out, TOP_K: tl.constexpr, FP64: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_x[n] = sum over token n's K slots s with expert(s) < num_experts of grad_sums[expert(s)] (fp32 or
    float64 sums)."""
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_ok = tokens < num_tokens
    col_ok = cols < dim
    end = tl.load(end_ptr)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float64 if FP64 else tl.float32)
    for k in tl.static_range(TOP_K):
        slots = tl.load(slot_ptr + tokens * TOP_K + k, mask=token_ok, other=0)
        valid = token_ok & (slots < end)
        experts = tl.load(expert_ptr + slots, mask=valid, other=num_experts)
        valid = valid & (experts < num_experts)
        acc += tl.load(grad_ptr + experts[:, None] * stride_grad + cols[None, :], mask=valid[:, None] & col_ok[None, :],
                       other=0.0).to(acc.dtype)
    tl.store(out_ptr + tokens[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=token_ok[:, None] & col_ok[None, :])


def blocks(num_experts: int, hidden: int) -> tuple[int, int, int]:
    """(E_PAD, BLOCK_S, BLOCK_H): E_PAD holds the E + 1 segments; a 32 x 128 tile keeps the GELU backward's
    registers without spills on sm_80 and sm_90a (see promoe.kernels.report)."""
    return expert_block(num_experts + 1), 32, dim_block(hidden)


def _grid(num_slots, num_experts, hidden, block_s, block_h):
    return triton.cdiv(num_slots, block_s) + num_experts + 1, triton.cdiv(hidden, block_h)


def _segment_sums(partial_TH, offsets_E1, num_slots, block_s, num_out, out_dtype):
    """[num_out, H]: the segment sums of the first num_out experts (the tile layout is that of all the experts)."""
    num_experts, hidden = offsets_E1.numel() - 1, partial_TH.shape[1]
    e_pad, _, block_h = blocks(num_experts, hidden)
    out = empty_output((num_out, hidden), out_dtype, partial_TH.device)
    if num_out and hidden:
        _segment_sum_kernel[(num_out, triton.cdiv(hidden, block_h))](
            partial_TH, offsets_E1, out, num_slots, num_experts, hidden, out.stride(0), E_PAD=e_pad, BLOCK_S=block_s,
            BLOCK_H=block_h)
    return out


@torch.library.custom_op("promoe::expert_bias_act", mutates_args=())
def _bias_act_op(h_SH: torch.Tensor, b_EH: torch.Tensor, offsets_E1: torch.Tensor, gelu: bool) -> torch.Tensor:
    h_SH, b_EH = h_SH.contiguous(), b_EH.contiguous()
    num_slots, hidden = h_SH.shape
    num_experts = b_EH.shape[0]
    out = empty_output((num_slots, hidden), torch.promote_types(h_SH.dtype, b_EH.dtype), h_SH.device)
    e_pad, block_s, block_h = blocks(num_experts, hidden)
    if num_slots and hidden:
        _bias_act_kernel[_grid(num_slots, num_experts, hidden, block_s, block_h)](
            h_SH, b_EH, offsets_E1, out, num_slots, num_experts, hidden, h_SH.stride(0), b_EH.stride(0),
            out.stride(0), GELU=gelu, FP64=accumulation_dtype(h_SH, b_EH) == torch.float64, E_PAD=e_pad,
            BLOCK_S=block_s, BLOCK_H=block_h)
    return out


@_bias_act_op.register_fake
def _(h_SH, b_EH, offsets_E1, gelu):
    return h_SH.new_empty(h_SH.shape, dtype=torch.promote_types(h_SH.dtype, b_EH.dtype))


def _bias_act_setup_context(ctx, inputs, output):
    h_SH, b_EH, offsets_E1, gelu = inputs
    ctx.save_for_backward(h_SH if gelu else None, b_EH, offsets_E1)  # without GELU the backward never reads h
    ctx.gelu, ctx.h_dtype = gelu, h_SH.dtype


def _bias_act_backward(ctx, grad_SH):
    h_SH, b_EH, offsets_E1 = ctx.saved_tensors
    if ctx.gelu:
        grad_h_SH, grad_b_EH, _ = _bias_gelu_backward_op(grad_SH, h_SH, b_EH, offsets_E1, False)
    else:
        grad_h_SH, grad_b_EH = expert_bias_backward(grad_SH, ctx.h_dtype, b_EH, offsets_E1)
    return grad_h_SH, grad_b_EH, None, None


def expert_bias_gelu_backward(grad_SH: torch.Tensor, h_SH: torch.Tensor, b_EH: torch.Tensor, offsets_E1: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad h, grad b, gelu(h + b)) of `expert_bias_act(h, b, offsets, gelu=True)`: its output, which the down
    GEMM's weight gradient reads, is made again by the backward's own pass (one more write, no more reads)."""
    return _bias_gelu_backward_op(grad_SH, h_SH, b_EH, offsets_E1, True)


def expert_bias_backward(grad_SH: torch.Tensor, h_dtype: torch.dtype, b_EH: torch.Tensor, offsets_E1: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad h in h_dtype, grad b in b's dtype) of `expert_bias_act(h, b, offsets, gelu=False)`."""
    # Without GELU the gradient of h is the incoming one, unmasked: the rows of dropped slots are the caller's to
    # mask (as the torch definition leaves them); the bias gradient never reads them.
    return grad_SH.to(h_dtype), _bias_backward_op(grad_SH, b_EH, offsets_E1)


_bias_act_op.register_autograd(_bias_act_backward, setup_context=_bias_act_setup_context)


def _bias_backward(grad_SH, h_SH, b_EH, offsets_E1, with_activation=False):
    """(grad h or None, grad b, act or None): the backward kernel, through GELU(tanh) when h is given (and writing
    the activation act(h + b) again with_activation), then the segment sums."""
    grad_SH, b_EH = grad_SH.contiguous(), b_EH.contiguous()
    gelu = h_SH is not None
    num_slots, hidden = grad_SH.shape
    num_experts = b_EH.shape[0]
    e_pad, block_s, block_h = blocks(num_experts, hidden)
    grid = _grid(num_slots, num_experts, hidden, block_s, block_h)
    compute = accumulation_dtype(grad_SH, b_EH, *([h_SH] if gelu else []))
    partial = empty_output((grid[0], hidden), compute, grad_SH.device)
    if gelu:
        h_arg = h_SH = h_SH.contiguous()
        grad_h_arg = grad_h = empty_output((num_slots, hidden), h_SH.dtype, h_SH.device)
    else:  # the kernel reads neither h nor writes grad_h: the bias stands in for both pointers
        grad_h, h_arg, grad_h_arg = None, b_EH, b_EH
    act_dtype = torch.promote_types(h_SH.dtype, b_EH.dtype) if gelu else b_EH.dtype
    act = act_arg = empty_output((num_slots, hidden) if with_activation else (0,), act_dtype, grad_SH.device)
    if not with_activation:
        act_arg = b_EH  # never written (WRITE_ACT): the bias stands in, so that the launch is charged nothing for it
    if num_slots and hidden:
        _bias_act_backward_kernel[grid](
            grad_SH, h_arg, b_EH, offsets_E1, grad_h_arg, partial, act_arg, num_slots, num_experts, hidden,
            grad_SH.stride(0), h_arg.stride(0), b_EH.stride(0), grad_h_arg.stride(0), act_arg.stride(0), GELU=gelu,
            WRITE_ACT=with_activation, FP64=compute == torch.float64, E_PAD=e_pad, BLOCK_S=block_s, BLOCK_H=block_h)
    grad_b = _segment_sums(partial, offsets_E1, num_slots, block_s, num_experts, b_EH.dtype)
    return grad_h, grad_b, act


@torch.library.custom_op("promoe::expert_bias_gelu_backward", mutates_args=())
def _bias_gelu_backward_op(grad_SH: torch.Tensor, h_SH: torch.Tensor, b_EH: torch.Tensor, offsets_E1: torch.Tensor,
                           with_activation: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad h [S, H] in h's dtype, grad b [E, H] in b's dtype, the step's output gelu(h + b) [S, H] made again
    in the same pass with_activation, else an empty tensor) of the bias + GELU(tanh) step."""
    return _bias_backward(grad_SH, h_SH, b_EH, offsets_E1, with_activation)


@_bias_gelu_backward_op.register_fake
def _(grad_SH, h_SH, b_EH, offsets_E1, with_activation):
    act_shape = h_SH.shape if with_activation else (0,)
    return (torch.empty_like(h_SH, memory_format=torch.contiguous_format),
            torch.empty_like(b_EH, memory_format=torch.contiguous_format),
            h_SH.new_empty(act_shape, dtype=torch.promote_types(h_SH.dtype, b_EH.dtype)))


@torch.library.custom_op("promoe::expert_bias_backward", mutates_args=())
def _bias_backward_op(grad_SH: torch.Tensor, b_EH: torch.Tensor, offsets_E1: torch.Tensor) -> torch.Tensor:
    """grad b [E, H] in b's dtype of the bias step without GELU (the gradient of h is the incoming one)."""
    return _bias_backward(grad_SH, None, b_EH, offsets_E1)[1]


@_bias_backward_op.register_fake
def _(grad_SH, b_EH, offsets_E1):
    return torch.empty_like(b_EH, memory_format=torch.contiguous_format)


def expert_bias_act(h_SH: torch.Tensor, b_EH: torch.Tensor, offsets_E1: torch.Tensor, gelu: bool) -> torch.Tensor:
    """act(h[s] + b[expert of s]) for slot-sorted rows, act GELU(tanh) or the identity; rows of dropped slots are 0."""
    return _bias_act_op(h_SH, b_EH, offsets_E1, gelu)


@torch.library.custom_op("promoe::expert_token_sums", mutates_args=())
def _token_sums_op(x_ND: torch.Tensor, token_S: torch.Tensor, offsets_E1: torch.Tensor, num_experts: int,
                   expert_S: torch.Tensor, slot_NK: torch.Tensor) -> torch.Tensor:
    """The forward reads neither expert_S nor slot_NK: they are inputs for the backward's gather."""
    x_ND = x_ND.contiguous()
    num_slots, dim = token_S.numel(), x_ND.shape[1]
    all_experts = offsets_E1.numel() - 1
    e_pad, block_s, block_d = blocks(all_experts, dim)
    grid = _grid(num_slots, all_experts, dim, block_s, block_d)
    compute = accumulation_dtype(x_ND)
    partial = empty_output((grid[0], dim), compute, x_ND.device)
    if num_slots and dim:
        _gather_partials_kernel[grid](x_ND, token_S, offsets_E1, partial, num_slots, all_experts, dim, x_ND.stride(0),
                                      FP64=compute == torch.float64, E_PAD=e_pad, BLOCK_S=block_s, BLOCK_H=block_d)
    return _segment_sums(partial, offsets_E1, num_slots, block_s, num_experts, compute)


@_token_sums_op.register_fake
def _(x_ND, token_S, offsets_E1, num_experts, expert_S, slot_NK):
    return x_ND.new_empty((num_experts, x_ND.shape[1]), dtype=accumulation_dtype(x_ND))


def _token_sums_setup_context(ctx, inputs, output):
    x_ND, _, offsets_E1, _, expert_S, slot_NK = inputs
    ctx.save_for_backward(expert_S, slot_NK, offsets_E1)
    ctx.x_dtype = x_ND.dtype


def _token_sums_backward(ctx, grad_ED):
    expert_S, slot_NK, offsets_E1 = ctx.saved_tensors
    grad_x_ND = _token_sums_backward_op(grad_ED, expert_S, slot_NK, offsets_E1[-1:], ctx.x_dtype)
    return grad_x_ND, None, None, None, None, None


_token_sums_op.register_autograd(_token_sums_backward, setup_context=_token_sums_setup_context)


@torch.library.custom_op("promoe::expert_token_sums_backward", mutates_args=())
def _token_sums_backward_op(grad_ED: torch.Tensor, expert_S: torch.Tensor, slot_NK: torch.Tensor, end: torch.Tensor,
                            x_dtype: torch.dtype) -> torch.Tensor:
    """grad x [N, D] in x's dtype: each token sums the gradient rows of its slots' experts e < E' (E' = grad rows)."""
    grad_ED = grad_ED.contiguous()
    (num_experts, dim), (num_tokens, top_k) = grad_ED.shape, slot_NK.shape
    out = empty_output((num_tokens, dim), x_dtype, grad_ED.device)
    block_n, block_d = TOKEN_SUMS_BLOCK_N, dim_block(dim)
    if num_tokens and dim:
        _token_sums_backward_kernel[(triton.cdiv(num_tokens, block_n), triton.cdiv(dim, block_d))](
            grad_ED, slot_NK, expert_S, end, out, num_tokens, num_experts, dim, grad_ED.stride(0), out.stride(0),
            TOP_K=top_k, FP64=accumulation_dtype(grad_ED) == torch.float64, BLOCK_N=block_n, BLOCK_D=block_d)
    return out


@_token_sums_backward_op.register_fake
def _(grad_ED, expert_S, slot_NK, end, x_dtype):
    return grad_ED.new_empty((slot_NK.shape[0], grad_ED.shape[1]), dtype=x_dtype)


def expert_token_sums(x_ND: torch.Tensor, token_S: torch.Tensor, offsets_E1: torch.Tensor, num_experts: int,
                      expert_S: torch.Tensor, slot_NK: torch.Tensor) -> torch.Tensor:
    """sum_ED[e] = sum of x[token[s]] over the slots s of expert e < num_experts (fp32, float64 for float64 x).
    Forward: one pass over the gathered rows, tile by tile, and a per-expert sum of the tiles (no one-hot, no
    atomics). Backward, in the gather form of a token-choice plan: each token sums the gradient rows of its K
    experts (expert_S and slot_NK give them)."""
    return _token_sums_op(x_ND, token_S, offsets_E1, num_experts, expert_S, slot_NK)
