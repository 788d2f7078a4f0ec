"""The routed experts' MLP as grouped GEMMs with its gather, biases and GELU(tanh) fused into their loads and stores.

Rows are slots sorted by expert (as in promoe.kernels.experts): the rows of expert e are offsets[e]:offsets[e + 1],
rows at or past offsets[E] are dropped. Two kernels, each with compile-time switches:

- rows GEMM, over segment tiles (`_segment_tile`: BLOCK_M rows of one expert, the dropped rows as segment E):
      out[s] = epilogue(prologue(a[src(s)]) @ w[e(s)])                       reads S*K (+ S*N) + E*K*N, writes S*N
  src(s) = index[s] with a gather index (the token of slot s: no permuted copy of x is written), else s;
  prologue gelu_tanh(a + bias_in[e]) or none; epilogue + bias_out[e], or * gelu_tanh'(h[s] + bias_out[e]) (reads h),
  or none. Dropped rows are written as zeros; w is read through its strides (a transposed weight is a view).
- weight gradient, one program per expert and output tile, over the expert's rows read from device offsets:
      grad_w[e] = prologue(a[src(s)])_e^T @ g_e,  grad_b[e] = column sums of g_e
                                                       reads (S*A + S*B) per output tile, writes E*A*B (+ E*B)
  An expert without rows gets zeros.

The expert MLP runs four rows GEMMs and two weight gradients, and nothing else between its GEMMs:
    forward   h = x[token] @ W_up;  out = gelu_tanh(h + b_up) @ W_down + b_down
    backward  grad_h = (grad_out @ W_down^T) * gelu_tanh'(h + b_up);
              grad_W_down, grad_b_down from gelu_tanh(h + b_up) and grad_out; grad_W_up, grad_b_up from x[token]
              and grad_h; grad_x_slots = grad_h @ W_up^T, summed onto the tokens by the permute's backward (combine).
It keeps for backward what the definition (`promoe.moe.dispatch.ExpertMLP`) keeps: x, h, the plan's indices, the
weights. GEMMs accumulate in fp32 and round their result to the compute dtype (fp32, or bf16 / fp16, the autocast
dtype, casting tiles as they load), then apply the epilogue in fp32, as the definition rounds each GEMM's output
before its bias / GELU step. float64 is not supported (the caller runs the definition). Each kernel's entry point is
a `torch.library` custom op (namespace `promoe`) with a fake registration, so that `torch.compile` traces through
them.
"""

import torch
import triton
import triton.language as tl

from promoe.kernels.experts import _gelu_tanh, _gelu_tanh_slope, _segment_tile
from promoe.kernels.launch import empty_output, expert_block, interpreted
from promoe.kernels.permute import combine

DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}  # compute dtypes


@triton.jit
def _dot(a, b, acc, COMPUTE: tl.constexpr, NATIVE: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b, the tiles cast to the compute dtype. Triton's interpreter computes half dots wrongly: there
    (NATIVE off) the half tiles go back to fp32, where their products are exact, as in a GPU's accumulator."""
    a, b = a.to(COMPUTE), b.to(COMPUTE)
    if not NATIVE:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _rows_gemm_kernel(a_ptr, index_ptr, w_ptr, offsets_ptr, bias_in_ptr, bias_out_ptr, h_ptr, out_ptr, num_slots,
                      num_experts, k_dim, n_dim, stride_a, stride_we, stride_wk, stride_wn, stride_bin, stride_bout,
                      stride_h, stride_out, GATHER: tl.constexpr, GELU_IN: tl.constexpr, BIAS_OUT: tl.constexpr,
                      GELU_GRAD_OUT: tl.constexpr, COMPUTE: tl.constexpr, NATIVE: tl.constexpr,
                      PRECISION: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    segment, row0, end = _segment_tile(offsets_ptr, num_experts, num_slots, tl.program_id(0), E_PAD, BLOCK_M)
    rows = row0.to(tl.int64) + tl.arange(0, BLOCK_M)  # int64: rows * K passes 2^31
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_dim
    is_expert = segment < num_experts
    live = rows < tl.where(is_expert, end, 0)
    expert = tl.minimum(segment, num_experts - 1).to(tl.int64)  # the dropped rows' tiles load no weight
    src = tl.load(index_ptr + rows, mask=live, other=0) if GATHER else rows
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.where(is_expert, k_dim, 0), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_dim
        a = tl.load(a_ptr + src[:, None] * stride_a + ks[None, :], mask=live[:, None] & k_ok[None, :], other=0.0)
        if GELU_IN:  # columns past K: gelu(0 + 0) = 0
            bias = tl.load(bias_in_ptr + expert * stride_bin + ks, mask=k_ok, other=0.0)
            a, _ = _gelu_tanh(a.to(tl.float32) + bias.to(tl.float32)[None, :])
        w = tl.load(w_ptr + expert * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(a, w, acc, COMPUTE, NATIVE, PRECISION)
    out = acc.to(COMPUTE).to(tl.float32)  # the GEMM's output in its dtype, as the definition's grouped_mm gives it
    if BIAS_OUT or GELU_GRAD_OUT:
        bias = tl.load(bias_out_ptr + expert * stride_bout + cols, mask=col_ok, other=0.0).to(tl.float32)
        if GELU_GRAD_OUT:
            z = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=live[:, None] & col_ok[None, :],
                        other=0.0).to(tl.float32) + bias[None, :]
            _, tanh = _gelu_tanh(z)
            out = out * _gelu_tanh_slope(z, tanh)
        else:
            out = out + bias[None, :]
    out = tl.where(is_expert, out, 0.0)  # the dropped rows: zeros
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(rows < end)[:, None] & col_ok[None, :])


@triton.jit
def _weight_grad_kernel(a_ptr, index_ptr, bias_in_ptr, g_ptr, offsets_ptr, out_ptr, bias_grad_ptr, a_dim, b_dim,
                        stride_a, stride_bin, stride_g, stride_oe, stride_oa, stride_bg, GATHER: tl.constexpr,
                        GELU_IN: tl.constexpr, COMPUTE: tl.constexpr, NATIVE: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    expert = tl.program_id(0).to(tl.int64)
    ca = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    cb = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    a_ok, b_ok = ca < a_dim, cb < b_dim
    start, end = tl.load(offsets_ptr + expert), tl.load(offsets_ptr + expert + 1)
    if GELU_IN:
        bias = tl.load(bias_in_ptr + expert * stride_bin + ca, mask=a_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    col_sums = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        row_ok = rows < end
        src = tl.load(index_ptr + rows, mask=row_ok, other=0) if GATHER else rows
        a = tl.load(a_ptr + src[None, :] * stride_a + ca[:, None], mask=a_ok[:, None] & row_ok[None, :], other=0.0)
        if GELU_IN:  # rows past the expert's end: 0, not gelu(b)
            a, _ = _gelu_tanh(a.to(tl.float32) + bias[:, None])
            a = tl.where(row_ok[None, :], a, 0.0)
        g = tl.load(g_ptr + rows[:, None] * stride_g + cb[None, :], mask=row_ok[:, None] & b_ok[None, :], other=0.0)
        acc = _dot(a, g, acc, COMPUTE, NATIVE, PRECISION)
        col_sums += tl.sum(g.to(tl.float32), 0)
    tl.store(out_ptr + expert * stride_oe + ca[:, None] * stride_oa + cb[None, :],
             acc.to(COMPUTE).to(out_ptr.dtype.element_ty), mask=a_ok[:, None] & b_ok[None, :])
    if tl.program_id(1) == 0:  # one program per column tile writes the bias gradient
        tl.store(bias_grad_ptr + expert * stride_bg + cb, col_sums.to(bias_grad_ptr.dtype.element_ty), mask=b_ok)


def rows_gemm_blocks(num_experts: int, compute_dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(E_PAD, BLOCK_M, BLOCK_N, BLOCK_K) of the rows GEMM: 64 x 64 tiles over 32-wide steps in half precision,
    32 x 64 in fp32 (whose exact products hold more registers on sm_80), compile without spills on sm_80 and sm_90a
    with the GELU prologue and epilogue (see promoe.kernels.report); Triton's interpreter, which pays per program
    and per step, gets larger ones."""
    if interpreted():
        return expert_block(num_experts + 1), 64, 256, 128
    return expert_block(num_experts + 1), 32 if compute_dtype == torch.float32 else 64, 64, 32


def weight_grad_blocks(compute_dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_A, BLOCK_B, BLOCK_K) of the weight gradient: 64 x 64 tiles over 32 rows a step in half precision, 16 in
    fp32 (as rows_gemm_blocks: no spills on sm_80 and sm_90a; larger tiles for the interpreter)."""
    if interpreted():
        return 128, 256, 128
    return 64, 64, 16 if compute_dtype == torch.float32 else 32


def dot_switches(compute_dtype: torch.dtype) -> dict:
    """The dot's switches: fp32 GEMMs as torch's fp32 matmul runs them (exact products unless torch allows tf32; the
    precision means nothing to half inputs), half GEMMs natively except under the interpreter (`_dot`)."""
    exact = compute_dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    return dict(COMPUTE=DTYPES[compute_dtype], NATIVE=not interpreted(), PRECISION="ieee" if exact else "tf32")


@torch.library.custom_op("promoe::expert_rows_gemm", mutates_args=())
def _rows_gemm_op(a_MK: torch.Tensor, index_S: torch.Tensor | None, w_EKN: torch.Tensor, offsets_E1: torch.Tensor,
                  gelu_bias_EK: torch.Tensor | None, bias_EN: torch.Tensor | None, gelu_grad_h_SN: torch.Tensor | None,
                  compute_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    """out [S, N] in out_dtype: row s is a[index[s] or s], through gelu_tanh(. + gelu_bias[e]) if given, times
    w[e] (any strides), then + bias[e], or * gelu_tanh'(gelu_grad_h[s] + bias[e]) if gelu_grad_h is given."""
    a_MK = a_MK.contiguous()
    num_slots = index_S.numel() if index_S is not None else a_MK.shape[0]
    num_experts, k_dim, n_dim = w_EKN.shape
    out = empty_output((num_slots, n_dim), out_dtype, a_MK.device)
    # An absent optional tensor is never read (its switch is off): the offsets stand in, charged next to nothing.
    index, gelu_bias, bias, h = (offsets_E1 if t is None else t.contiguous()
                                 for t in (index_S, gelu_bias_EK, bias_EN, gelu_grad_h_SN))
    e_pad, block_m, block_n, block_k = rows_gemm_blocks(num_experts, compute_dtype)
    if num_slots and n_dim:
        grid = (triton.cdiv(num_slots, block_m) + num_experts + 1, triton.cdiv(n_dim, block_n))
        _rows_gemm_kernel[grid](
            a_MK, index, w_EKN, offsets_E1, gelu_bias, bias, h, out, num_slots, num_experts, k_dim, n_dim,
            a_MK.stride(0), *w_EKN.stride(), gelu_bias.stride(0), bias.stride(0), h.stride(0), out.stride(0),
            GATHER=index_S is not None, GELU_IN=gelu_bias_EK is not None,
            BIAS_OUT=bias_EN is not None and gelu_grad_h_SN is None, GELU_GRAD_OUT=gelu_grad_h_SN is not None,
            **dot_switches(compute_dtype), E_PAD=e_pad, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


@_rows_gemm_op.register_fake
def _(a_MK, index_S, w_EKN, offsets_E1, gelu_bias_EK, bias_EN, gelu_grad_h_SN, compute_dtype, out_dtype):
    num_slots = index_S.shape[0] if index_S is not None else a_MK.shape[0]
    return a_MK.new_empty((num_slots, w_EKN.shape[2]), dtype=out_dtype)


@torch.library.custom_op("promoe::expert_weight_grad", mutates_args=())
def _weight_grad_op(a_SA: torch.Tensor, index_S: torch.Tensor | None, gelu_bias_EA: torch.Tensor | None,
                    grad_SB: torch.Tensor, offsets_E1: torch.Tensor, compute_dtype: torch.dtype, w_dtype: torch.dtype,
                    bias_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad w [E, A, B] in w_dtype, grad b [E, B] in bias_dtype): per expert e, its rows of a (a[index[s]] with an
    index, through gelu_tanh(. + gelu_bias[e]) if given) transposed times its rows of grad, and the column sums of
    its rows of grad (fp32 sums)."""
    a_SA, grad_SB = a_SA.contiguous(), grad_SB.contiguous()
    num_experts, (a_dim, b_dim) = offsets_E1.numel() - 1, (a_SA.shape[1], grad_SB.shape[1])
    grad_w = empty_output((num_experts, a_dim, b_dim), w_dtype, a_SA.device)
    grad_b = empty_output((num_experts, b_dim), bias_dtype, a_SA.device)
    index, gelu_bias = (offsets_E1 if t is None else t.contiguous() for t in (index_S, gelu_bias_EA))
    block_a, block_b, block_k = weight_grad_blocks(compute_dtype)
    if num_experts and b_dim:  # at least one program per column tile: it writes the bias gradient
        _weight_grad_kernel[(num_experts, max(1, triton.cdiv(a_dim, block_a)), triton.cdiv(b_dim, block_b))](
            a_SA, index, gelu_bias, grad_SB, offsets_E1, grad_w, grad_b, a_dim, b_dim, a_SA.stride(0),
            gelu_bias.stride(0), grad_SB.stride(0), grad_w.stride(0), grad_w.stride(1), grad_b.stride(0),
            GATHER=index_S is not None, GELU_IN=gelu_bias_EA is not None, **dot_switches(compute_dtype),
            BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_K=block_k)
    return grad_w, grad_b


@_weight_grad_op.register_fake
def _(a_SA, index_S, gelu_bias_EA, grad_SB, offsets_E1, compute_dtype, w_dtype, bias_dtype):
    num_experts = offsets_E1.shape[0] - 1
    return (a_SA.new_empty((num_experts, a_SA.shape[1], grad_SB.shape[1]), dtype=w_dtype),
            a_SA.new_empty((num_experts, grad_SB.shape[1]), dtype=bias_dtype))


class _ExpertMLP(torch.autograd.Function):
    """The expert MLP of every slot in four rows GEMMs and two weight gradients (the module docstring's list)."""

    @staticmethod
    def forward(ctx, rows, token_S, slot_NK, offsets_E1, w_up_EDH, b_up_EH, w_down_EHD, b_down_ED, compute_dtype):
        h_SH = _rows_gemm_op(rows, token_S, w_up_EDH, offsets_E1, None, None, None, compute_dtype, compute_dtype)
        out_dtype = torch.promote_types(compute_dtype, b_down_ED.dtype)  # the definition's h + b's dtype
        out_SD = _rows_gemm_op(h_SH, None, w_down_EHD, offsets_E1, b_up_EH, b_down_ED, None, compute_dtype, out_dtype)
        ctx.save_for_backward(rows, token_S, slot_NK, offsets_E1, h_SH, w_up_EDH, b_up_EH, w_down_EHD, b_down_ED)
        ctx.compute_dtype = compute_dtype
        return out_SD

    @staticmethod
    def backward(ctx, grad_SD):
        rows, token_S, slot_NK, offsets_E1, h_SH, w_up_EDH, b_up_EH, w_down_EHD, b_down_ED = ctx.saved_tensors
        compute = ctx.compute_dtype
        grad_h_SH = _rows_gemm_op(grad_SD, None, w_down_EHD.transpose(1, 2), offsets_E1, None, b_up_EH, h_SH, compute,
                                  h_SH.dtype)
        grad_w_down, grad_b_down = _weight_grad_op(h_SH, None, b_up_EH, grad_SD, offsets_E1, compute,
                                                   w_down_EHD.dtype, b_down_ED.dtype)
        grad_w_up, grad_b_up = _weight_grad_op(rows, token_S, None, grad_h_SH, offsets_E1, compute, w_up_EDH.dtype,
                                               b_up_EH.dtype)
        grad_rows = None
        if ctx.needs_input_grad[0]:
            grad_rows = _rows_gemm_op(grad_h_SH, None, w_up_EDH.transpose(1, 2), offsets_E1, None, None, None, compute,
                                      rows.dtype)
            if token_S is not None:  # each token sums its slots' rows (the permute's backward)
                grad_rows = combine(grad_rows, None, token_S, slot_NK, offsets_E1[-1:])
        return grad_rows, None, None, None, grad_w_up, grad_b_up, grad_w_down, grad_b_down, None


def expert_mlp(rows: torch.Tensor, token_S: torch.Tensor | None, slot_NK: torch.Tensor | None,
               offsets_E1: torch.Tensor, w_up_EDH: torch.Tensor, b_up_EH: torch.Tensor, w_down_EHD: torch.Tensor,
               b_down_ED: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """[S, D]: gelu_tanh(x_s @ w_up[e] + b_up[e]) @ w_down[e] + b_down[e] for each slot s of expert e (0 for a
    dropped slot), x_s = rows[token_S[s]] (gathered; slot_NK sums the gradient back onto the tokens), or rows[s]
    where token_S is None (rows already in slot order). The GEMMs run in compute_dtype (fp32, bf16 or fp16: the
    autocast dtype under autocast), the output is in compute_dtype promoted with b_down's, each gradient in its
    input's dtype."""
    if compute_dtype not in DTYPES:
        raise TypeError(f"the Triton expert MLP computes in {', '.join(map(str, DTYPES))}; got {compute_dtype}")
    return _ExpertMLP.apply(rows, token_S, slot_NK, offsets_E1, w_up_EDH, b_up_EH, w_down_EHD, b_down_ED,
                            compute_dtype)
