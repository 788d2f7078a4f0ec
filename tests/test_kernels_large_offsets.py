"""Row offsets past 2^31 elements: every kernel computes `row * stride` in int64 (issue 10, item 6).

At ProMoE-XL width (D = 1152) the offset of token n is n * 1152, which passes 2^31 at 1.86 M tokens. Rather than
allocate that many rows, each test hands a kernel three rows 2^30 elements apart (a strided view of a lazily
allocated buffer: only the touched pages exist), so that the third row starts at element 2^31. With int32 offsets
the kernel reads or writes 2^32 elements off (a segfault under the interpreter); with int64 offsets the rows match
the reference.
"""

import pytest
import torch
import triton

from promoe.kernels import permute as permute_kernels
from promoe.kernels import routing as routing_kernels
from promoe.kernels.launch import expert_block
from promoe.moe.routing import prototype_scores

STRIDE = 2**30
DIM = 16  # the smallest tile: one program covers every row and column below
DTYPE = torch.float16  # 2 bytes per element: 4 GiB of address space, a few pages of memory


def far_rows(values: torch.Tensor) -> torch.Tensor:
    """`values` [R, DIM] copied into rows STRIDE elements apart; row 2 starts at element 2^31."""
    num_rows = values.shape[0]
    rows = torch.empty((num_rows - 1) * STRIDE + DIM, dtype=values.dtype).as_strided((num_rows, DIM), (STRIDE, 1))
    rows.copy_(values)
    return rows


def empty_far_rows(num_rows: int) -> torch.Tensor:
    return torch.empty((num_rows - 1) * STRIDE + DIM, dtype=DTYPE).as_strided((num_rows, DIM), (STRIDE, 1))


@pytest.fixture
def values(rng):
    """Three rows of small integers in fp16 (exact in every conversion and in the fp32 sums below)."""
    return torch.randint(-8, 9, (3, DIM), generator=rng).to(DTYPE)


def test_permute_writes_slots_past_2_to_the_31(values):
    token_S, end = torch.tensor([2, 0, 1]), torch.tensor([3])
    out_SD = empty_far_rows(3)
    permute_kernels._permute_kernel[(1, 1)](values, token_S, end, out_SD, 3, DIM, values.stride(0), out_SD.stride(0),
                                            BLOCK_S=16, BLOCK_D=DIM)
    assert torch.equal(out_SD, values[token_S])


def test_combine_reads_slots_and_the_base_and_writes_tokens_past_2_to_the_31(values):
    src_SD, slot_NK, end = far_rows(values), torch.tensor([[1], [2], [0]]), torch.tensor([3])
    gates_S = torch.tensor([0.5, 2.0, -1.0])
    base_ND = far_rows(values.flip(0))
    out_ND = empty_far_rows(3)
    permute_kernels._combine_kernel[(1, 1)](src_SD, slot_NK, gates_S, end, base_ND, out_ND, 3, DIM, src_SD.stride(0),
                                            base_ND.stride(0), out_ND.stride(0), TOP_K=1, HAS_GATES=True,
                                            HAS_BASE=True, BLOCK_N=16, BLOCK_D=DIM)
    expected = (values.flip(0).float() + values.float()[slot_NK[:, 0]] * gates_S[slot_NK[:, 0], None]).to(DTYPE)
    assert torch.equal(out_ND, expected)


def test_combine_backward_reads_and_writes_slots_past_2_to_the_31(values, rng):
    out_SD = far_rows(values)
    grad_y_ND = torch.randint(-8, 9, (3, DIM), generator=rng).to(DTYPE)
    token_S, end, gates_S = torch.tensor([1, 2, 0]), torch.tensor([3]), torch.tensor([0.5, 2.0, -1.0])
    grad_out_SD, grad_gates_S = empty_far_rows(3), torch.empty(3)
    permute_kernels._combine_backward_kernel[(1,)](grad_y_ND, out_SD, token_S, gates_S, end, grad_out_SD, grad_gates_S,
                                                   3, DIM, grad_y_ND.stride(0), out_SD.stride(0),
                                                   grad_out_SD.stride(0), BLOCK_S=16, BLOCK_D=DIM)
    assert torch.equal(grad_out_SD, (grad_y_ND.float()[token_S] * gates_S[:, None]).to(DTYPE))
    assert torch.equal(grad_gates_S, (grad_y_ND.float()[token_S] * values.float()).sum(1))


@pytest.mark.parametrize("kernel", ["route", "scores"])
def test_routing_reads_tokens_past_2_to_the_31(kernel, values, rng):
    num_experts = 4
    protos = torch.randn(num_experts, DIM, generator=rng).to(DTYPE)
    x_ND = far_rows(values)
    expected_NE = prototype_scores(values.double(), protos.double())
    common = dict(NUM_EXPERTS=num_experts, E_PAD=expert_block(num_experts), ACTIVATION=0, NATIVE_DOT=False,
                  BLOCK_N=16, BLOCK_D=DIM)
    if kernel == "scores":
        scores = torch.empty(3, num_experts)
        routing_kernels._scores_kernel[(1,)](x_ND, protos, scores, 3, DIM, x_ND.stride(0), protos.stride(0), 1.0,
                                             **common)
        torch.testing.assert_close(scores.double(), expected_NE, rtol=1e-5, atol=1e-6)
        return
    ids, gates = torch.empty(3, 1, dtype=torch.long), torch.empty(3, 1)
    routing_kernels._route_kernel[(triton.cdiv(3, 16),)](
        x_ND, protos, torch.ones(3, dtype=torch.int8), ids, gates, 3, DIM, x_ND.stride(0), protos.stride(0), 1.0,
        TOP_K=1, CONDITIONAL=False, **common)
    expected_gates, expected_ids = expected_NE.max(dim=1, keepdim=True)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(gates.double(), expected_gates, rtol=1e-5, atol=1e-6)
