"""pytest-benchmark entries for the kernels and their references: `pytest bench/ --benchmark-only`.

On a machine without a GPU the Triton kernels run under the interpreter: compare the references there, and the
kernels only on CUDA.
"""

import pytest
import torch

from promoe.kernels.permute import combine, combine_reference, permute, permute_reference
from promoe.kernels.plan import token_choice_plan as kernel_plan
from promoe.kernels.routing import route_prototypes, route_prototypes_reference
from promoe.moe.plan import token_choice_plan as reference_plan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
NUM_TOKENS, DIM, EXPERTS, TOP_K = (16384, 1152, 12, 1) if DEVICE == "cuda" else (512, 256, 12, 1)


def synchronized(fn):
    def run():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out
    return run


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_TOKENS, DIM, generator=g).to(DEVICE, DTYPE)
    protos = (torch.randn(EXPERTS, DIM, generator=g) * 0.02).to(DEVICE, DTYPE)
    cond = (torch.rand(NUM_TOKENS, generator=g) > 0.1).to(DEVICE)
    ids, gates, _ = route_prototypes_reference(x, protos, cond, TOP_K)
    plan = reference_plan(ids, gates.to(DTYPE), EXPERTS + 1)
    return x, protos, cond, ids, gates, plan


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_routing(benchmark, inputs, impl):
    x, protos, cond, *_ = inputs
    fn = route_prototypes if impl == "kernel" else route_prototypes_reference
    benchmark(synchronized(lambda: fn(x, protos, cond, TOP_K)))


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_plan(benchmark, inputs, impl):
    *_, ids, gates, _ = inputs
    fn = kernel_plan if impl == "kernel" else reference_plan
    benchmark(synchronized(lambda: fn(ids, gates, EXPERTS + 1)))


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_permute_and_combine(benchmark, inputs, impl):
    x, *_, plan = inputs
    end = plan.offsets_E1[-1:]
    run_permute, run_combine = (permute, combine) if impl == "kernel" else (permute_reference, combine_reference)

    def step():
        rows = run_permute(x, plan.token_index_S, plan.slot_NK, end)
        return run_combine(rows, plan.gates_S, plan.token_index_S, plan.slot_NK, end)

    benchmark(synchronized(step))
