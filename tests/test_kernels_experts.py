"""The `triton` backend's expert bias (+ GELU) and per-expert token-sum kernels against the `torch` backend's
definitions of the same steps, under Triton's interpreter on the CPU."""

import pytest
import torch

import promoe.kernels.experts
from promoe.moe.dispatch import RouterSpec, TorchBackend, TritonBackend
from promoe.moe.losses import choice_counts, plan_centroids
from promoe.moe.plan import expert_choice_plan, expert_token_sums, token_choice_plan
from promoe.moe.routing import null_tokens_to_uncond_expert
from tests.helpers import KERNEL_ROUTINGS, distinct_ids, reordered_sums_tolerance

pytestmark = pytest.mark.order_sensitive  # two summation orders at derived tolerances (see pytest.ini)

DEFINITION, KERNELS = TorchBackend(), TritonBackend()
NUM_EXPERTS, HIDDEN = 5, 40  # 40 columns: a partial column block

ROUTINGS = KERNEL_ROUTINGS

# Each kernel computes in fp32 (float64 for float64 inputs) and rounds its output once: the tolerances of its
# elementwise results (bias, GELU); a sum over an expert's rows takes summed_tolerance in fp32.
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
              torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def summed_tolerance(dtype, rows: int, expected: torch.Tensor) -> dict:
    """fp32 sums over up to `rows` rows per expert, in the kernel's blocks against the definition's order."""
    if dtype != torch.float32:
        return TOLERANCES[dtype]
    return reordered_sums_tolerance(rows, magnitude=expected.abs().max().item())


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Kernel outputs start as NaN: an element a kernel forgets to write shows."""
    monkeypatch.setattr(promoe.kernels.experts, "empty_output",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


def make_plan(routing, num_tokens, top_k, rng):
    ids = ROUTINGS[routing](num_tokens, NUM_EXPERTS, top_k, rng)
    return token_choice_plan(ids, torch.rand(ids.shape, generator=rng), NUM_EXPERTS, has_dropped_slots=True)


def bias_step(backend, gelu):
    return backend.expert_bias_gelu if gelu else backend.expert_bias


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("dtype", TOLERANCES)
@pytest.mark.parametrize("gelu", [True, False], ids=["bias_gelu", "bias"])
def test_expert_bias_matches_definition_forward_and_backward(routing, dtype, gelu, rng):
    plan = make_plan(routing, 37, 2, rng)  # 74 slots: not a multiple of the 32-row tile
    h = torch.randn(74, HIDDEN, generator=rng).to(dtype).requires_grad_()
    b = torch.randn(NUM_EXPERTS, HIDDEN, generator=rng).to(dtype).requires_grad_()
    # The combine hands back zero gradient rows for dropped slots (the kernel passes the bias step's through).
    upstream = torch.randn(h.shape, generator=rng).to(dtype) * plan.valid_slots_S()[:, None]
    out = bias_step(KERNELS, gelu)(h, b, plan)
    grads = torch.autograd.grad(out, (h, b), upstream)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert not out.isnan().any() and not any(g.isnan().any() for g in grads)
    assert (out[~plan.valid_slots_S()] == 0).all() and (grads[0][~plan.valid_slots_S()] == 0).all()
    # fp32 also against the fp32 definition; bf16 not: the definition's bias gradient sums in bf16, the kernel in fp32.
    for reference in [torch.float32, torch.float64] if dtype == torch.float32 else [torch.float64]:
        h_ref, b_ref = (t.detach().to(reference).requires_grad_() for t in (h, b))
        expected = bias_step(DEFINITION, gelu)(h_ref, b_ref, plan)
        torch.testing.assert_close(out.to(reference), expected, **TOLERANCES[dtype])
        grad_h, grad_b = torch.autograd.grad(expected, (h_ref, b_ref), upstream.to(reference))
        torch.testing.assert_close(grads[0].to(reference), grad_h, **TOLERANCES[dtype])
        torch.testing.assert_close(grads[1].to(reference), grad_b, **summed_tolerance(dtype, h.shape[0], grad_b))


def test_expert_bias_gelu_on_an_expert_choice_plan_and_no_slots(rng):
    plan = expert_choice_plan(torch.randint(0, 20, (NUM_EXPERTS, 7), generator=rng),
                              torch.rand(NUM_EXPERTS, 7, generator=rng), 20)
    h = torch.randn(35, HIDDEN, generator=rng, requires_grad=True)
    b = torch.randn(NUM_EXPERTS, HIDDEN, generator=rng, requires_grad=True)
    out, expected = KERNELS.expert_bias_gelu(h, b, plan), DEFINITION.expert_bias_gelu(h, b, plan)
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])
    expected_grad = torch.autograd.grad(expected.sum(), b)[0]
    torch.testing.assert_close(torch.autograd.grad(out.sum(), b)[0], expected_grad,
                               **summed_tolerance(torch.float32, h.shape[0], expected_grad))
    empty = token_choice_plan(torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1), NUM_EXPERTS)
    h0 = torch.zeros(0, HIDDEN, requires_grad=True)
    out = KERNELS.expert_bias_gelu(h0, b, empty)
    assert out.shape == (0, HIDDEN)
    assert (torch.autograd.grad(out.sum(), b)[0] == 0).all()  # experts without rows: zero bias gradient


def test_bias_gradient_is_bitwise_repeatable(rng):
    plan = make_plan("random", 300, 2, rng)
    h = torch.randn(600, HIDDEN, generator=rng, requires_grad=True)
    b = torch.randn(NUM_EXPERTS, HIDDEN, generator=rng, requires_grad=True)
    upstream = torch.randn(h.shape, generator=rng)
    first, second = (torch.autograd.grad(KERNELS.expert_bias_gelu(h, b, plan), b, upstream)[0] for _ in range(2))
    assert torch.equal(first, second)


def test_bias_gelu_runs_float32_biases_on_bfloat16_rows_as_the_definition(rng):
    """Under autocast the up-projection is bf16 and the bias fp32: the sum is fp32, as in the definition."""
    plan = make_plan("dropped_slots", 37, 2, rng)
    h = torch.randn(74, HIDDEN, generator=rng).bfloat16().requires_grad_()
    b = torch.randn(NUM_EXPERTS, HIDDEN, generator=rng, requires_grad=True)
    out, expected = KERNELS.expert_bias_gelu(h, b, plan), DEFINITION.expert_bias_gelu(h, b, plan)
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])
    upstream = torch.randn(out.shape, generator=rng)
    for got, want in zip(torch.autograd.grad(out, (h, b), upstream), torch.autograd.grad(expected, (h, b), upstream)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("dtype", TOLERANCES)
def test_expert_token_sums_match_definition_forward_and_backward(routing, dtype, rng):
    plan = make_plan(routing, 37, 2, rng)
    x = torch.randn(37, HIDDEN, generator=rng).to(dtype).requires_grad_()
    routed = NUM_EXPERTS - 1  # the last expert left out, as the unconditional expert is from the centroids
    slots = plan.token_index_S, plan.offsets_E1, routed, plan.expert_index_S, plan.slot_NK
    sums = promoe.kernels.experts.expert_token_sums(x, *slots)
    assert sums.shape == (routed, HIDDEN) and sums.dtype == torch.promote_types(dtype, torch.float32)
    upstream = torch.randn(sums.shape, generator=rng).to(sums.dtype)
    grad = torch.autograd.grad(sums, x, upstream)[0]
    assert grad.dtype == dtype
    x64 = x.detach().double().requires_grad_()
    expected = expert_token_sums(x64, *slots)
    sums_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # bf16 rows are summed in fp32
    torch.testing.assert_close(sums.double(), expected, **summed_tolerance(sums_dtype, 37, expected))
    torch.testing.assert_close(grad.double(), torch.autograd.grad(expected, x64, upstream.double())[0],
                               **TOLERANCES[dtype])


def test_an_expert_choice_layer_runs_the_definitions_of_the_token_sums_permute_and_combine(rng):
    """Its plans have no slot_NK, which the kernels gather through: decided once, when the backend is made."""
    backend = TritonBackend(RouterSpec(token_choice=False, num_prototypes=NUM_EXPERTS))
    assert backend.routing.expert_token_sums is expert_token_sums
    plan = expert_choice_plan(torch.randint(0, 20, (NUM_EXPERTS, 7), generator=rng),
                              torch.rand(NUM_EXPERTS, 7, generator=rng), 20)
    x = torch.randn(20, HIDDEN, generator=rng)
    torch.testing.assert_close(backend.combine(backend.permute(x, plan), plan),
                               DEFINITION.combine(DEFINITION.permute(x, plan), plan))
    assert not any(backend.steps[step].kernel for step in ("permute", "combine", "expert_token_sums"))
    assert "permute (expert-choice plan: no slot_NK to gather through)" in backend.describe()


def one_hot_centroids(x_ND, expert_ids_NK, weight_N, num_experts):
    """The reference: the mean of the tokens of weight 1 that chose each expert, by a one-hot GEMM; and the mask of
    the experts that received one."""
    assign_NE = choice_counts(expert_ids_NK, num_experts).clamp(max=1) * weight_N[:, None]
    counts_E = assign_NE.sum(0)
    return ((assign_NE.t() @ x_ND.float()) / counts_E.clamp(min=1)[:, None])[None], (counts_E > 0)[None]


@pytest.mark.parametrize("top_k", [1, 2])
def test_plan_centroids_equal_the_one_hot_centroids_of_conditional_routing(top_k, rng):
    """The routing contrastive loss's centroids from the plan (both backends) are those of a one-hot GEMM."""
    num_routed, num_tokens = NUM_EXPERTS - 1, 37
    cond = torch.rand(num_tokens, generator=rng) < 0.7
    ids, gates = null_tokens_to_uncond_expert(distinct_ids(num_tokens, num_routed, top_k, rng),
                                              torch.rand(num_tokens, top_k, generator=rng), cond, num_routed)
    plan = token_choice_plan(ids, gates, NUM_EXPERTS, has_dropped_slots=top_k > 1)
    x = torch.randn(num_tokens, HIDDEN, generator=rng, requires_grad=True)
    expected, expected_active = one_hot_centroids(x, ids, cond.float(), num_routed)
    upstream = torch.randn(expected.shape, generator=rng)
    expected_grad = torch.autograd.grad(expected, x, upstream)[0]
    for backend in (DEFINITION, KERNELS):
        centroids, active = plan_centroids(x, plan, num_routed, backend.routing.expert_token_sums)
        assert torch.equal(active, expected_active)
        # Sums over an expert's tokens (then a division by their count), in the backend's order or one-hot GEMM's.
        torch.testing.assert_close(centroids, expected, **summed_tolerance(torch.float32, num_tokens, expected))
        torch.testing.assert_close(torch.autograd.grad(centroids, x, upstream)[0], expected_grad,
                                   **summed_tolerance(torch.float32, num_tokens, expected_grad))


def test_bias_gelu_backward_makes_the_forward_output_again_in_its_own_pass(rng):
    """The expert MLP's backward takes the GELU output from the bias + GELU backward kernel (issue 30): it equals the
    forward kernel's output, zero rows for dropped slots included, and the gradients are those without it."""
    from promoe.kernels.experts import expert_bias_act, expert_bias_gelu_backward

    plan = token_choice_plan(torch.where(torch.rand(45, 2, generator=rng) < 0.3, 4,
                                         torch.randint(0, 4, (45, 2), generator=rng)),
                             torch.rand(45, 2, generator=rng), 4, has_dropped_slots=True)
    h = torch.randn(90, 40, generator=rng)  # 90 rows: not a multiple of the 32-row tile; 40 columns of 128
    b = torch.randn(4, 40, generator=rng)
    grad = torch.randn(90, 40, generator=rng)
    grad_h, grad_b, act = expert_bias_gelu_backward(grad, h, b, plan.offsets_E1)
    assert torch.equal(act, expert_bias_act(h, b, plan.offsets_E1, gelu=True))
    expected_h, expected_b = torch.autograd.grad(expert_bias_act(h.requires_grad_(), b.requires_grad_(),
                                                                 plan.offsets_E1, gelu=True), (h, b), grad)
    assert torch.equal(grad_h, expected_h) and torch.equal(grad_b, expected_b)
