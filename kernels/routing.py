"""Fused prototypical routing: cosine similarity to prototypes, activation, top-K, conditional routing.

One pass over the tokens. Each program reads a block of BLOCK_N token rows (N*D elements in all) and the
prototypes (E*D, re-read by every program: E*D is tiny next to N*D), and writes expert ids and gates [N, K]: the
signature of `promoe.moe.routing.route_prototypes`, the definition it replaces. The per-expert counts are left to
the plan's kernels, whose stable counting sort needs them per block of slots anyway.

The backward is one more kernel over the tokens (`_scores_backward_kernel`): it recomputes the cosines, reads the
upstream gradient of the scores [N, E] (for the routing, that of the chosen gates, scattered to their columns) and
writes d tokens, and per block of tokens the sums from which d prototypes is finished as [E, D] work. Gradients
reach the tokens and the prototypes for every activation. Every entry point is a `torch.library` custom op
(`promoe::route_prototypes`, `promoe::prototype_scores`, `promoe::prototype_scores_backward`) with fake and
autograd registrations, so that `torch.compile` traces through them.
"""


import torch
import triton
import triton.language as tl

from promoe.kernels.launch import empty_output, expert_block, interpreted, routing_backward_blocks, routing_blocks

ACTIVATION_CODES = {"identity": 0, "sigmoid": 1, "softmax": 2}
MAX_EXPERTS = 64  # the [BLOCK_N, E] score tile must fit the registers
MAX_TOP_K = 4


@triton.jit
def _cosines(x_ptr, protos_ptr, rows, row_ok, dim, stride_x, stride_p,
             NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr, NATIVE_DOT: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(cos(x_n, p_e) [BLOCK_N, E_PAD], ||x_n|| [BLOCK_N], ||p_e|| [E_PAD]) fp32 for a block of rows; the norms as
    F.normalize divides by them (at least 1e-12). Padding rows and columns hold 0."""
    experts = tl.arange(0, E_PAD)
    expert_ok = experts < NUM_EXPERTS
    dots = tl.zeros((BLOCK_N, E_PAD), dtype=tl.float32)
    x_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    p_sq = tl.zeros((E_PAD,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < dim
        x_raw = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0)
        p_raw = tl.load(protos_ptr + experts[:, None] * stride_p + cols[None, :],
                        mask=expert_ok[:, None] & col_ok[None, :], other=0.0)
        # Norms and all arithmetic in fp32 (the interpreter also computes bf16 arithmetic wrongly).
        x = x_raw.to(tl.float32)
        p = p_raw.to(tl.float32)
        if NATIVE_DOT:  # bf16/fp16 on a GPU: products of half values are exact in the fp32 accumulator
            dots = tl.dot(x_raw, tl.trans(p_raw), dots)
        else:  # fp32, and not TF32: the gates are the raw cosines
            dots = tl.dot(x, tl.trans(p), dots, input_precision="ieee")
        x_sq += tl.sum(x * x, axis=1)
        p_sq += tl.sum(p * p, axis=1)
    x_norm = tl.maximum(tl.sqrt(x_sq), 1e-12)
    p_norm = tl.maximum(tl.sqrt(p_sq), 1e-12)
    return dots / (x_norm[:, None] * p_norm[None, :]), x_norm, p_norm


@triton.jit
def _activate(z, expert_ok, ACTIVATION: tl.constexpr):
    """The router's activation of the scaled cosines z [BLOCK_N, E_PAD]; padding columns -inf."""
    if ACTIVATION == 1:
        z = tl.sigmoid(z)
    elif ACTIVATION == 2:
        z = tl.where(expert_ok[None, :], z, float("-inf"))
        z = tl.exp(z - tl.max(z, axis=1)[:, None])
        z = z / tl.sum(z, axis=1)[:, None]
    return tl.where(expert_ok[None, :], z, float("-inf"))


@triton.jit
def _prototype_scores(x_ptr, protos_ptr, rows, row_ok, dim, stride_x, stride_p, alpha,
                      NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr, ACTIVATION: tl.constexpr,
                      NATIVE_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """activation(alpha * cos(x_n, p_e)) for a block of rows: [BLOCK_N, E_PAD] fp32, padding columns -inf."""
    cos, _, _ = _cosines(x_ptr, protos_ptr, rows, row_ok, dim, stride_x, stride_p, NUM_EXPERTS, E_PAD, NATIVE_DOT,
                         BLOCK_N, BLOCK_D)
    return _activate(alpha * cos, tl.arange(0, E_PAD) < NUM_EXPERTS, ACTIVATION)


@triton.jit
def _scores_kernel(x_ptr, protos_ptr, scores_ptr, num_tokens, dim, stride_x, stride_p, alpha,
                   NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr, ACTIVATION: tl.constexpr,
                   NATIVE_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The scores alone [N, E], for the expert-choice routers (their top-C runs over tokens, not experts)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: N*D passes 2^31
    row_ok = rows < num_tokens
    scores = _prototype_scores(x_ptr, protos_ptr, rows, row_ok, dim, stride_x, stride_p, alpha, NUM_EXPERTS, E_PAD,
                               ACTIVATION, NATIVE_DOT, BLOCK_N, BLOCK_D)
    experts = tl.arange(0, E_PAD)
    tl.store(scores_ptr + rows[:, None] * NUM_EXPERTS + experts[None, :], scores,
             mask=row_ok[:, None] & (experts < NUM_EXPERTS)[None, :])


@triton.jit
def _route_kernel(x_ptr, protos_ptr, cond_ptr, ids_ptr, gates_ptr,
                  num_tokens, dim, stride_x, stride_p, alpha,
                  NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr, TOP_K: tl.constexpr,
                  ACTIVATION: tl.constexpr, CONDITIONAL: tl.constexpr, NATIVE_DOT: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    block = tl.program_id(0)
    rows = block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: the offsets rows * D pass 2^31
    row_ok = rows < num_tokens
    experts = tl.arange(0, E_PAD)
    scores = _prototype_scores(x_ptr, protos_ptr, rows, row_ok, dim, stride_x, stride_p, alpha, NUM_EXPERTS, E_PAD,
                               ACTIVATION, NATIVE_DOT, BLOCK_N, BLOCK_D)

    if CONDITIONAL:
        cond = tl.load(cond_ptr + rows, mask=row_ok, other=1) != 0
    for k in tl.static_range(TOP_K):
        # NaN ranks above every number, as in torch.sort and torch.topk: a token whose scores are NaN takes its
        # NaN columns first (gate NaN, which the combine propagates to its own row only). Among ties the lowest
        # expert index, as a stable descending sort orders them. The clamp keeps an id in the bank whatever the
        # scores hold (it never acts on scores the two rules cover).
        nan = scores != scores
        any_nan = tl.max(nan.to(tl.int32), axis=1) > 0
        numbers = tl.where(nan, float("-inf"), scores)
        best = tl.max(numbers, axis=1)
        top = tl.where(any_nan[:, None], nan, numbers == best[:, None])
        choice = tl.minimum(tl.min(tl.where(top, experts[None, :], E_PAD), axis=1), NUM_EXPERTS - 1)
        scores = tl.where(experts[None, :] == choice[:, None], float("-inf"), scores)
        gate = tl.where(any_nan, float("nan"), best)
        if CONDITIONAL:
            # Null-label token: first slot to the unconditional expert (index NUM_EXPERTS) with gate 1,
            # the others dropped (index NUM_EXPERTS + 1).
            choice = tl.where(cond, choice, NUM_EXPERTS + (0 if k == 0 else 1))
            gate = tl.where(cond, gate, 1.0 if k == 0 else 0.0)
        tl.store(ids_ptr + rows * TOP_K + k, choice, mask=row_ok)
        tl.store(gates_ptr + rows * TOP_K + k, gate, mask=row_ok)


@triton.jit
def _scores_backward_kernel(x_ptr, protos_ptr, grad_ptr, grad_x_ptr, partial_p_ptr, partial_c_ptr,
                            num_tokens, dim, stride_x, stride_p, stride_gx, alpha,
                            NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr, ACTIVATION: tl.constexpr,
                            NATIVE_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The backward of activation(alpha * cos(x_n, p_e)) for a block of rows, given d scores [N, E] fp32.

    Reads the block's token rows twice (the cosines, then the gradient tile by tile), the prototypes twice and
    d scores once; writes d x [N, D] and, per block, the sums from which the host finishes d prototypes:
    sum_n g_ne x_n / ||x_n|| [E, D] and sum_n g_ne cos_ne [E] (g = d cos). No atomics: the host adds the blocks."""
    block = tl.program_id(0)
    rows = block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_tokens
    experts = tl.arange(0, E_PAD)
    expert_ok = experts < NUM_EXPERTS
    cos, x_norm, p_norm = _cosines(x_ptr, protos_ptr, rows, row_ok, dim, stride_x, stride_p, NUM_EXPERTS, E_PAD,
                                   NATIVE_DOT, BLOCK_N, BLOCK_D)
    grad_scores = tl.load(grad_ptr + rows[:, None] * NUM_EXPERTS + experts[None, :],
                          mask=row_ok[:, None] & expert_ok[None, :], other=0.0)
    if ACTIVATION == 0:
        grad_z = grad_scores
    else:
        a = tl.where(expert_ok[None, :], _activate(alpha * cos, expert_ok, ACTIVATION), 0.0)
        if ACTIVATION == 1:
            grad_z = grad_scores * a * (1 - a)
        else:
            grad_z = a * (grad_scores - tl.sum(grad_scores * a, axis=1)[:, None])
    grad_cos = alpha * grad_z  # zero in padding rows and columns
    # d x_n = (sum_e g_ne p_e / ||p_e|| - (sum_e g_ne cos_ne) x_n / ||x_n||) / ||x_n||; where F.normalize clamps
    # the norm, the second term is absent (the clamp passes no gradient to the norm).
    weighted_cos = grad_cos * cos
    radial = tl.where(x_norm > 1e-12, tl.sum(weighted_cos, axis=1) / (x_norm * x_norm), 0.0)
    to_rows = grad_cos / p_norm[None, :]
    to_protos = grad_cos / x_norm[:, None]
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < dim
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        p = tl.load(protos_ptr + experts[:, None] * stride_p + cols[None, :],
                    mask=expert_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        grad_x = tl.dot(to_rows, p, input_precision="ieee") / x_norm[:, None] - radial[:, None] * x
        tl.store(grad_x_ptr + rows[:, None] * stride_gx + cols[None, :], grad_x,
                 mask=row_ok[:, None] & col_ok[None, :])
        partial = tl.dot(tl.trans(to_protos), x, input_precision="ieee")  # [E_PAD, BLOCK_D]
        partial_rows = (block * NUM_EXPERTS + experts).to(tl.int64)
        tl.store(partial_p_ptr + partial_rows[:, None] * dim + cols[None, :], partial,
                 mask=expert_ok[:, None] & col_ok[None, :])
    tl.store(partial_c_ptr + block * NUM_EXPERTS + experts, tl.sum(weighted_cos, axis=0), mask=expert_ok)


def native_dot(x: torch.Tensor, protos: torch.Tensor) -> bool:
    """Run the similarity product in the inputs' half precision (fp32 accumulation) on a GPU; in fp32 in the
    interpreter, whose bf16 arithmetic is wrong, and for fp32 or mixed-dtype inputs."""
    half = x.dtype in (torch.bfloat16, torch.float16) and protos.dtype == x.dtype
    return half and not interpreted()


@torch.library.custom_op("promoe::route_prototypes", mutates_args=())
def _route_prototypes_op(x_ND: torch.Tensor, prototypes_ED: torch.Tensor, cond_N: torch.Tensor, top_k: int,
                         activation: str, alpha: float, conditional: bool
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(gates, ids): the floating output first, as opcheck's gradient check sums the outputs in order."""
    num_tokens, dim = x_ND.shape
    num_experts = prototypes_ED.shape[0]
    block_n, block_d = routing_blocks(num_tokens, dim, num_experts, x_ND.element_size())
    num_blocks = triton.cdiv(num_tokens, block_n)
    x = x_ND.contiguous()
    protos = prototypes_ED.contiguous()
    ids = empty_output((num_tokens, top_k), torch.int64, x.device)
    gates = empty_output((num_tokens, top_k), torch.float32, x.device)
    if num_blocks:
        _route_kernel[(num_blocks,)](
            x, protos, cond_N.to(torch.int8).contiguous(), ids, gates, num_tokens, dim, x.stride(0),
            protos.stride(0), float(alpha), NUM_EXPERTS=num_experts, E_PAD=expert_block(num_experts),
            TOP_K=top_k, ACTIVATION=ACTIVATION_CODES[activation], CONDITIONAL=conditional,
            NATIVE_DOT=native_dot(x, protos), BLOCK_N=block_n, BLOCK_D=block_d)
    return gates, ids


@_route_prototypes_op.register_fake
def _(x_ND, prototypes_ED, cond_N, top_k, activation, alpha, conditional):
    num_tokens = x_ND.shape[0]
    return (x_ND.new_empty((num_tokens, top_k), dtype=torch.float32),
            x_ND.new_empty((num_tokens, top_k), dtype=torch.int64))


def _route_setup_context(ctx, inputs, output):
    x_ND, prototypes_ED, _, _, activation, alpha, _ = inputs
    ctx.save_for_backward(x_ND, prototypes_ED, output[1])
    ctx.settings = (activation, alpha)


def _route_backward(ctx, grad_gates_NK, grad_ids):
    """The gates are the chosen scores: their gradients scattered to their columns [N, E] (E floats per token, small
    next to D) are the scores' gradient, which the backward kernel takes through the similarities."""
    x_ND, prototypes_ED, ids_NK = ctx.saved_tensors
    activation, alpha = ctx.settings
    num_experts = prototypes_ED.shape[0]
    routed_NK = ids_NK < num_experts  # unconditional and dropped slots have constant gates
    grad_NE = torch.zeros((x_ND.shape[0], num_experts), dtype=torch.float32, device=x_ND.device)
    grad_NE = grad_NE.scatter_add(1, ids_NK.clamp(max=num_experts - 1), torch.where(routed_NK, grad_gates_NK, 0.0))
    grad_x, grad_protos = _scores_backward(x_ND, prototypes_ED, grad_NE, activation, alpha)
    return grad_x, grad_protos, None, None, None, None, None


_route_prototypes_op.register_autograd(_route_backward, setup_context=_route_setup_context)


def route_prototypes(x_ND, prototypes_ED, cond_N, top_k, activation="identity", alpha=1.0, conditional=True):
    """`promoe.moe.routing.route_prototypes` as one kernel: (expert ids [N, K], gates [N, K] fp32)."""
    if not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f"the fused routing kernel supports top_k in 1..{MAX_TOP_K}, got {top_k}")
    if prototypes_ED.shape[0] > MAX_EXPERTS:
        raise ValueError(f"the fused routing kernel supports up to {MAX_EXPERTS} experts, got {prototypes_ED.shape[0]}")
    gates_NK, ids_NK = _route_prototypes_op(x_ND, prototypes_ED, cond_N, top_k, activation, float(alpha), conditional)
    return ids_NK, gates_NK


@torch.library.custom_op("promoe::prototype_scores", mutates_args=())
def _prototype_scores_op(x_ND: torch.Tensor, prototypes_ED: torch.Tensor, activation: str, alpha: float
                         ) -> torch.Tensor:
    num_tokens, dim = x_ND.shape
    num_experts = prototypes_ED.shape[0]
    x, protos = x_ND.contiguous(), prototypes_ED.contiguous()
    block_n, block_d = routing_blocks(num_tokens, dim, num_experts, x.element_size())
    scores = empty_output((num_tokens, num_experts), torch.float32, x.device)
    if num_tokens:
        _scores_kernel[(triton.cdiv(num_tokens, block_n),)](
            x, protos, scores, num_tokens, dim, x.stride(0), protos.stride(0), float(alpha),
            NUM_EXPERTS=num_experts, E_PAD=expert_block(num_experts), ACTIVATION=ACTIVATION_CODES[activation],
            NATIVE_DOT=native_dot(x, protos), BLOCK_N=block_n, BLOCK_D=block_d)
    return scores


@_prototype_scores_op.register_fake
def _(x_ND, prototypes_ED, activation, alpha):
    return x_ND.new_empty((x_ND.shape[0], prototypes_ED.shape[0]), dtype=torch.float32)


def _scores_setup_context(ctx, inputs, output):
    x_ND, prototypes_ED, activation, alpha = inputs
    ctx.save_for_backward(x_ND, prototypes_ED)
    ctx.settings = (activation, alpha)


def _scores_backward_from_ctx(ctx, grad_scores_NE):
    x_ND, prototypes_ED = ctx.saved_tensors
    return (*_scores_backward(x_ND, prototypes_ED, grad_scores_NE, *ctx.settings), None, None)


_prototype_scores_op.register_autograd(_scores_backward_from_ctx, setup_context=_scores_setup_context)


@torch.library.custom_op("promoe::prototype_scores_backward", mutates_args=())
def _scores_backward(x_ND: torch.Tensor, prototypes_ED: torch.Tensor, grad_scores_NE: torch.Tensor, activation: str,
                     alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(d x, d prototypes) of the scores, by one kernel over the tokens and an [E, D] finish on the host."""
    num_tokens, dim = x_ND.shape
    num_experts = prototypes_ED.shape[0]
    x, protos = x_ND.contiguous(), prototypes_ED.contiguous()
    block_n, block_d = routing_backward_blocks(num_tokens, dim, num_experts)
    num_blocks = triton.cdiv(num_tokens, block_n)
    grad_x = empty_output((num_tokens, dim), x.dtype, x.device)
    weighted_tokens = empty_output((num_blocks, num_experts, dim), torch.float32, x.device)
    weighted_cos = empty_output((num_blocks, num_experts), torch.float32, x.device)
    if num_blocks:
        _scores_backward_kernel[(num_blocks,)](
            x, protos, grad_scores_NE.float().contiguous(), grad_x, weighted_tokens, weighted_cos, num_tokens, dim,
            x.stride(0), protos.stride(0), grad_x.stride(0), float(alpha), NUM_EXPERTS=num_experts,
            E_PAD=expert_block(num_experts), ACTIVATION=ACTIVATION_CODES[activation],
            NATIVE_DOT=native_dot(x, protos), BLOCK_N=block_n, BLOCK_D=block_d)
    return grad_x, _prototype_gradient(protos, weighted_tokens.sum(0), weighted_cos.sum(0))


@_scores_backward.register_fake
def _(x_ND, prototypes_ED, grad_scores_NE, activation, alpha):
    return x_ND.new_empty(x_ND.shape), prototypes_ED.new_empty(prototypes_ED.shape)  # contiguous, as the kernel's


def _prototype_gradient(prototypes_ED, weighted_tokens_ED, weighted_cos_E):
    """d p_e = (sum_n g_ne x_n / ||x_n|| - (sum_n g_ne cos_ne) p_e / ||p_e||) / ||p_e||, the second term absent where
    F.normalize clamps the norm: the prototypes' half of the normalisation's backward, [E, D] work."""
    p = prototypes_ED.float()
    norm = p.norm(dim=1)
    clamped = norm.clamp_min(1e-12)
    radial = torch.where(norm >= 1e-12, weighted_cos_E / clamped.square(), 0.0)
    return (weighted_tokens_ED / clamped[:, None] - radial[:, None] * p).to(prototypes_ED.dtype)


def prototype_scores(x_ND, prototypes_ED, activation="identity", alpha=1.0):
    """`promoe.moe.routing.prototype_scores` [N, E] fp32, by the routing kernel's similarity code."""
    if prototypes_ED.shape[0] > MAX_EXPERTS:
        raise ValueError(f"the fused routing kernel supports up to {MAX_EXPERTS} experts, got {prototypes_ED.shape[0]}")
    return _prototype_scores_op(x_ND, prototypes_ED, activation, float(alpha))
