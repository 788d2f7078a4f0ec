"""The `triton` backend's permute and combine kernels against the `torch` backend's definitions of the same steps,
under Triton's interpreter on the CPU."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from promoe.moe.dispatch import TorchBackend, TritonBackend
from promoe.moe.plan import token_choice_plan

DEFINITION, KERNELS = TorchBackend(), TritonBackend()

ROUTINGS = {
    "random": lambda n, e, k, g: torch.randint(0, e, (n, k), generator=g),
    "empty_experts": lambda n, e, k, g: torch.randint(0, 2, (n, k), generator=g),
    "one_expert_takes_all": lambda n, e, k, g: torch.full((n, k), e - 1),
    "dropped_slots": lambda n, e, k, g: torch.randint(0, e + 1, (n, k), generator=g),  # id e = dropped
}
DTYPES = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=1e-5),
          torch.float16: dict(rtol=1e-3, atol=1e-5)}


def make_plan(routing, num_tokens, num_experts, top_k, rng):
    ids = ROUTINGS[routing](num_tokens, num_experts, top_k, rng)
    gates = torch.rand(num_tokens, top_k, generator=rng) + 0.1
    return token_choice_plan(ids, gates, num_experts, has_dropped_slots=True)


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("num_tokens, dim", [(0, 16), (1, 16), (67, 40), (130, 1152)])
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_and_combine_match_references_forward_and_backward(routing, num_tokens, dim, top_k, dtype, rng,
                                                                   poisoned_outputs):
    plan = make_plan(routing, num_tokens, 5, top_k, rng)
    x = torch.randn(num_tokens, dim, generator=rng).to(dtype).requires_grad_()
    out = torch.randn(num_tokens * top_k, dim, generator=rng).to(dtype).requires_grad_()
    gates = plan.gates_S.clone().requires_grad_()
    gated = dataclasses.replace(plan, gates_S=gates)

    x64 = x.detach().double().requires_grad_()
    permuted, ref_permuted = KERNELS.permute(x, plan), DEFINITION.permute(x64, plan)
    assert torch.equal(permuted.double(), ref_permuted)  # a copy: exact in every dtype
    upstream = torch.randn(permuted.shape, generator=rng).to(dtype)
    # The kernel sums a token's K gradient rows in fp32 and rounds once: compare with float64.
    torch.testing.assert_close(torch.autograd.grad(permuted, x, upstream)[0].double(),
                               torch.autograd.grad(ref_permuted, x64, upstream.double())[0], **DTYPES[dtype])

    combined = KERNELS.combine(out, gated)
    ref_combined = DEFINITION.combine(out.double(), dataclasses.replace(plan, gates_S=gates.double()))
    torch.testing.assert_close(combined.double(), ref_combined, **DTYPES[dtype])
    upstream = torch.randn(combined.shape, generator=rng).to(dtype)
    grad_out, grad_gates = torch.autograd.grad(combined, (out, gates), upstream)
    ref_grad_out, ref_grad_gates = torch.autograd.grad(ref_combined, (out, gates), upstream.double())
    assert not grad_out.isnan().any() and not grad_gates.isnan().any()
    torch.testing.assert_close(grad_out.double(), ref_grad_out.double(), **DTYPES[dtype])
    # A gate's gradient is a dot product over D: rounding errors of fp32 accumulation grow like sqrt(D).
    tolerance = DTYPES[dtype] | dict(atol=DTYPES[dtype]["atol"] * dim**0.5)
    torch.testing.assert_close(grad_gates.double(), ref_grad_gates.double(), **tolerance)


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_adds_a_base_in_its_accumulation(routing, top_k, dtype, rng):
    """The shared experts' output enters the combine's fp32 accumulation, y = base + sum of gate * out, rounded
    once; the base's gradient is y's, passed on as it is."""
    plan = make_plan(routing, 67, 5, top_k, rng)
    out = torch.randn(67 * top_k, 40, generator=rng).to(dtype).requires_grad_()
    base = torch.randn(67, 40, generator=rng).to(dtype).requires_grad_()
    combined = KERNELS.combine(out, plan, base)
    ref_combined = DEFINITION.combine(out.double(), dataclasses.replace(plan, gates_S=plan.gates_S.double()),
                                      base.double())
    torch.testing.assert_close(combined.double(), ref_combined, **DTYPES[dtype])
    upstream = torch.randn(combined.shape, generator=rng).to(dtype)
    grad_out, grad_base = torch.autograd.grad(combined, (out, base), upstream)
    ref_grad_out, ref_grad_base = torch.autograd.grad(ref_combined, (out, base), upstream.double())
    assert torch.equal(grad_base, upstream) and torch.equal(ref_grad_base, upstream)
    torch.testing.assert_close(grad_out.double(), ref_grad_out.double(), **DTYPES[dtype])


def test_combine_gradient_check_in_float64_on_the_definition(rng):
    plan = make_plan("dropped_slots", 9, 3, 2, rng)
    out = torch.randn(18, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    gates = plan.gates_S.double().requires_grad_()
    base = torch.randn(9, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda o, g: DEFINITION.combine(o, dataclasses.replace(plan, gates_S=g)),
                                    (out, gates))
    assert torch.autograd.gradcheck(lambda o, g, b: DEFINITION.combine(o, dataclasses.replace(plan, gates_S=g), b),
                                    (out, gates, base))


@settings(max_examples=60, deadline=None)
@given(num_tokens=st.integers(0, 40), num_experts=st.integers(1, 9), top_k=st.integers(1, 4),
       drop=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_plan_properties(num_tokens, num_experts, top_k, drop, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_experts + int(drop), (num_tokens, top_k), generator=g)
    plan = token_choice_plan(ids, torch.rand(num_tokens, top_k, generator=g), num_experts, has_dropped_slots=drop)
    kept = int((ids < num_experts).sum())
    assert plan.counts_E.sum().item() == kept == plan.offsets_E1[-1].item()
    assert torch.equal(plan.counts_E, torch.bincount(ids[ids < num_experts], minlength=num_experts))
    # slot_NK is a permutation of the slots, and the inverse of the sort: choice (n, k) sits at slot_NK[n, k].
    assert sorted(plan.slot_NK.flatten().tolist()) == list(range(num_tokens * top_k))
    assert torch.equal(plan.token_index_S[plan.slot_NK], torch.arange(num_tokens)[:, None].expand(-1, top_k))
    assert torch.equal(plan.expert_index_S[plan.slot_NK], ids)
