"""The counting-sort plan kernels build exactly the plan of the PyTorch reference (a stable sort by expert)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promoe.kernels.plan import token_choice_plan as kernel_plan
from promoe.moe.plan import token_choice_plan as reference_plan

FIELDS = ("token_index_S", "expert_index_S", "gates_S", "offsets_E1", "slot_NK")  # the kernel's outputs, in order


def assert_same_plan(ids, gates, num_experts):
    got, expected = kernel_plan(ids, gates, num_experts), reference_plan(ids, gates, num_experts, True)
    for field, tensor in zip(FIELDS, got, strict=True):
        assert torch.equal(tensor, getattr(expected, field)), field


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(num_tokens=st.integers(0, 700), num_experts=st.integers(1, 64), top_k=st.integers(1, 4),
       drop_rate=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 2**31 - 1))
def test_plan_kernel_equals_the_stable_sort_reference(num_tokens, num_experts, top_k, drop_rate, seed,
                                                     poisoned_outputs):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_experts, (num_tokens, top_k), generator=g)
    ids = torch.where(torch.rand(num_tokens, top_k, generator=g) < drop_rate, num_experts, ids)
    assert_same_plan(ids, torch.rand(num_tokens, top_k, generator=g), num_experts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_plan_kernel_with_one_expert_taking_all_and_empty_experts(dtype, poisoned_outputs):
    ids = torch.full((300, 2), 3)
    assert_same_plan(ids, torch.rand(300, 2).to(dtype), 12)


def test_plan_kernel_counts_ids_outside_the_bank_as_dropped(rng, poisoned_outputs):
    """An id past E (or negative) must not read another block's histogram row: it is a dropped slot."""
    ids = torch.randint(0, 5, (600, 2), generator=rng)
    bad = torch.rand(600, 2, generator=rng) < 0.1
    gates = torch.rand(600, 2, generator=rng)
    for bad_id in (16, 17, 1000, -1):
        got = kernel_plan(torch.where(bad, bad_id, ids), gates, 5)
        expected = reference_plan(torch.where(bad, 5, ids), gates, 5, True)
        for field, tensor in zip(FIELDS, got, strict=True):
            assert torch.equal(tensor, getattr(expected, field)), (bad_id, field)
