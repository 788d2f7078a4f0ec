"""pytest-benchmark entries for each step of the `triton` backend against the same step of the `torch` backend
(its definition): `pytest bench/ --benchmark-only`.

On a machine without a GPU the Triton kernels run under the interpreter: compare the `torch` entries there, and the
kernels only on CUDA.
"""

import pytest
import torch

from promoe.moe.dispatch import make_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
NUM_TOKENS, DIM, EXPERTS, TOP_K = (16384, 1152, 12, 1) if DEVICE == "cuda" else (512, 256, 12, 1)
BACKENDS = ["triton", "torch"]


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
    torch_backend = make_backend("torch")
    ids, gates = torch_backend.routing.route_prototypes(x, protos, cond, TOP_K, "identity", 1.0, True)
    plan = torch_backend.token_choice_plan(ids, gates, EXPERTS + 1, has_dropped_slots=False)
    return x, protos, cond, ids, gates, plan


@pytest.mark.parametrize("backend", BACKENDS)
def test_routing(benchmark, inputs, backend):
    x, protos, cond, *_ = inputs
    route = make_backend(backend).routing.route_prototypes
    benchmark(synchronized(lambda: route(x, protos, cond, TOP_K, "identity", 1.0, True)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan(benchmark, inputs, backend):
    *_, ids, gates, _ = inputs
    plan = make_backend(backend).token_choice_plan
    benchmark(synchronized(lambda: plan(ids, gates, EXPERTS + 1, False)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_permute_and_combine(benchmark, inputs, backend):
    x, *_, plan = inputs
    steps = make_backend(backend)
    benchmark(synchronized(lambda: steps.combine(steps.permute(x, plan), plan)))
