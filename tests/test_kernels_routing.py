"""The fused routing kernel against the routing's definition (`promoe.moe.routing`, what the `torch` backend runs),
under Triton's interpreter on the CPU."""

import pytest
import torch

from promoe.kernels.routing import prototype_scores, route_prototypes
from promoe.moe import routing

route_prototypes_reference = routing.route_prototypes  # the definition the kernel replaces, signature and all


SHAPES = [  # (tokens, dim, experts): N = 0 and 1, N not a multiple of the 16/64-token blocks, D not a power of 2
    (0, 32, 4), (1, 16, 4), (63, 40, 12), (65, 1152, 12), (130, 96, 64),
]


@pytest.mark.parametrize("num_tokens, dim, num_experts", SHAPES)
@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
@pytest.mark.parametrize("activation", ["identity", "sigmoid", "softmax"])
@pytest.mark.parametrize("conditional", [True, False])
def test_routing_kernel_matches_reference_in_float32(num_tokens, dim, num_experts, top_k, activation, conditional,
                                                     rng, poisoned_outputs):
    if top_k > num_experts:
        pytest.skip("top_k larger than the number of experts")
    x = torch.randn(num_tokens, dim, generator=rng)
    protos = torch.randn(num_experts, dim, generator=rng) * 0.02
    cond = torch.rand(num_tokens, generator=rng) > 0.25
    ids, gates = route_prototypes(x, protos, cond, top_k, activation, alpha=1.5, conditional=conditional)
    ref_ids, ref_gates = route_prototypes_reference(x.double(), protos.double(), cond, top_k, activation,
                                                    alpha=1.5, conditional=conditional)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(gates.double(), ref_gates.double(), rtol=1e-5, atol=1e-6)  # fp32 vs float64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_routing_kernel_on_half_precision_inputs_matches_reference_on_the_same_upcast_values(dtype, rng,
                                                                                              poisoned_outputs):
    x = torch.randn(77, 1152, generator=rng).to(dtype)
    protos = (torch.randn(12, 1152, generator=rng) * 0.02).to(dtype)
    cond = torch.rand(77, generator=rng) > 0.2
    ids, gates = route_prototypes(x, protos, cond, 2)
    ref_ids, ref_gates = route_prototypes_reference(x.double(), protos.double(), cond, 2)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(gates.double(), ref_gates, rtol=1e-5, atol=1e-6)


def test_ties_go_to_the_lowest_expert_index(poisoned_outputs):
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]).repeat(1, 8)  # experts 0 == 2, 1 == 3
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).repeat(1, 8)
    ids, gates = route_prototypes(x, protos, torch.ones(3, dtype=torch.bool), 4, conditional=False)
    assert ids.tolist() == [[0, 2, 1, 3], [1, 3, 0, 2], [0, 1, 2, 3]]
    assert torch.equal(ids, route_prototypes_reference(x, protos, torch.ones(3, dtype=torch.bool), 4,
                                                       conditional=False)[0])


def test_one_expert_taking_all_tokens_and_empty_experts(rng, poisoned_outputs):
    protos = torch.randn(6, 64, generator=rng) * 0.02
    x = protos[4].repeat(50, 1) + 1e-4 * torch.randn(50, 64, generator=rng)
    ids, gates = route_prototypes(x, protos, torch.ones(50, dtype=torch.bool), 1)
    assert ids.flatten().tolist() == [4] * 50
    ref_ids, ref_gates = route_prototypes_reference(x.double(), protos.double(), torch.ones(50, dtype=torch.bool), 1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(gates.double(), ref_gates, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["identity", "sigmoid", "softmax"])
@pytest.mark.parametrize("top_k", [1, 3])
def test_routing_kernel_gradients_reach_tokens_and_prototypes_like_the_reference(activation, top_k, rng):
    x = torch.randn(45, 40, generator=rng, requires_grad=True)
    protos = (torch.randn(5, 40, generator=rng) * 0.02).requires_grad_()
    cond = torch.rand(45, generator=rng) > 0.3
    upstream = torch.randn(45, top_k, generator=rng)
    _, gates = route_prototypes(x, protos, cond, top_k, activation, alpha=2.0)
    grads = torch.autograd.grad(gates, (x, protos), upstream)
    x64, p64 = x.detach().double().requires_grad_(), protos.detach().double().requires_grad_()
    _, ref_gates = route_prototypes_reference(x64, p64, cond, top_k, activation, alpha=2.0)
    ref_grads = torch.autograd.grad(ref_gates, (x64, p64), upstream.double())
    for got, expected in zip(grads, ref_grads):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_routing_kernel_rejects_unsupported_sizes(rng):
    with pytest.raises(ValueError, match="top_k in 1..4"):
        route_prototypes(torch.randn(4, 16), torch.randn(8, 16), torch.ones(4, dtype=torch.bool), 5)
    with pytest.raises(ValueError, match="up to 64 experts"):
        route_prototypes(torch.randn(4, 16), torch.randn(65, 16), torch.ones(4, dtype=torch.bool), 1)


@pytest.mark.parametrize("num_tokens, dim, num_experts", SHAPES)
@pytest.mark.parametrize("activation", ["identity", "sigmoid", "softmax"])
def test_scores_kernel_for_expert_choice_matches_reference_with_gradients(num_tokens, dim, num_experts, activation,
                                                                          rng, poisoned_outputs):
    x = torch.randn(num_tokens, dim, generator=rng, requires_grad=True)
    protos = (torch.randn(num_experts, dim, generator=rng) * 0.02).requires_grad_()
    scores = prototype_scores(x, protos, activation, alpha=0.7)
    x64, p64 = x.detach().double().requires_grad_(), protos.detach().double().requires_grad_()
    expected = routing.prototype_scores(x64, p64, activation, alpha=0.7)
    torch.testing.assert_close(scores.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    upstream = torch.randn(scores.shape, generator=rng)
    grads = torch.autograd.grad(scores, (x, protos), upstream)
    expected_grads = torch.autograd.grad(expected, (x64, p64), upstream.double())
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 3])
def test_nan_scores_rank_first_like_torch_sort_and_stay_in_the_bank(top_k, rng, poisoned_outputs):
    """A NaN token takes experts 0..K-1 with NaN gates (torch.sort ranks NaN above every number); a NaN prototype
    is every token's first choice. No id ever leaves the bank."""
    x = torch.randn(70, 48, generator=rng)
    x[[3, 64]] = float("nan")
    protos = torch.randn(12, 48, generator=rng) * 0.02
    cond = torch.rand(70, generator=rng) > 0.2
    cond[3] = True
    for p in (protos, torch.where(torch.arange(12)[:, None] == 7, float("nan"), protos)):
        ids, gates = route_prototypes(x, p, cond, top_k)
        ref_ids, ref_gates = route_prototypes_reference(x.double(), p.double(), cond, top_k)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(gates.double(), ref_gates, rtol=1e-5, atol=1e-6, equal_nan=True)
        assert ids[3].tolist() == list(range(top_k)) and gates[3].isnan().all()
        assert ((ids >= 0) & (ids <= 13)).all()


def routing_gradients(route, x, protos, cond, upstream, **settings):
    x = x.detach().requires_grad_()
    protos = protos.detach().requires_grad_()
    gates = route(x, protos, cond, upstream.shape[1], **settings)[1]
    return torch.autograd.grad(gates, (x, protos), upstream.to(gates.dtype))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the NaN token, in the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("activation", ["identity", "softmax"])
def test_routing_backward_kernel_with_a_nan_image_a_zero_token_and_uneven_experts(dtype, activation, rng):
    """The backward kernel against the vjp of the definition on the same values in float64: 70 tokens (not a
    multiple of the block), expert 4 taking most tokens and experts 1 and 3 none, a zero token (F.normalize clamps its
    norm: only the tangential term remains) and a NaN token, which must not leak into the other tokens' gradients."""
    protos = torch.randn(6, 96, generator=rng) * 0.02
    protos[[1, 3]] = -protos[4] + torch.randn(2, 96, generator=rng) * 1e-3  # opposite every token: empty experts
    x = (protos[4] * 40).repeat(70, 1) + torch.randn(70, 96, generator=rng) * 0.3
    x[5] = 0.0
    x[9] = float("nan")
    x, protos = x.to(dtype), protos.to(dtype)
    cond = torch.rand(70, generator=rng) > 0.2
    cond[[5, 9]] = True  # routed: a null-label token's gate is the constant 1
    upstream = torch.randn(70, 2, generator=rng)
    settings = dict(activation=activation, alpha=1.5)
    grad_x, grad_p = routing_gradients(route_prototypes, x, protos, cond, upstream, **settings)
    ref_x, ref_p = routing_gradients(route_prototypes_reference, x.double(), protos.double(), cond, upstream,
                                     **settings)
    assert grad_x.dtype == dtype and grad_p.dtype == dtype
    clean = torch.arange(70) != 9
    assert grad_x[9].isnan().all() and not grad_x[clean].isnan().any()
    tolerance = dict(rtol=2e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-6)  # bf16 d x
    # The zero token's gradient is scaled by 1 / 1e-12: compare it relative to its own size.
    scale = ref_x[5].abs().max()
    torch.testing.assert_close(grad_x[5].double() / scale, ref_x[5] / scale, **tolerance)
    others = clean & (torch.arange(70) != 5)
    torch.testing.assert_close(grad_x[others].double(), ref_x[others], **tolerance)
    assert grad_p.isnan().any() == ref_p.isnan().any()  # a NaN token reaches the prototypes it was scored against
    _, clean_p = routing_gradients(route_prototypes, x[others], protos, cond[others], upstream[others], **settings)
    _, clean_ref_p = routing_gradients(route_prototypes_reference, x[others].double(), protos.double(), cond[others],
                                       upstream[others], **settings)
    torch.testing.assert_close(clean_p.double(), clean_ref_p, **tolerance)
    if activation == "identity":
        assert clean_p[[1, 3]].abs().max() == 0  # nobody chose them


def test_routing_backward_op_passes_opcheck(rng):
    from promoe.kernels.routing import _scores_backward

    x = torch.randn(37, 40, generator=rng)
    protos = torch.randn(5, 40, generator=rng) * 0.02
    grad_scores = torch.randn(37, 5, generator=rng)
    for activation in ("identity", "sigmoid", "softmax"):
        torch.library.opcheck(_scores_backward, (x, protos, grad_scores, activation, 1.5))
    # A non-contiguous x: the kernel writes a contiguous d x, and the fake must say so (its strides are checked).
    x_strided = torch.randn(40, 37, generator=rng).t()
    torch.library.opcheck(_scores_backward, (x_strided, protos, grad_scores, "identity", 1.5))
