"""Running statistics that routers update in forward (DiffMoE's thresholds, k-means centroids) leave out the
tokens of a broken image (NaN or inf), and such tokens never take another image's expert slot."""

import pytest
import torch

from promoe.moe.routers import DiffMoERouter, KMeansRouter

IMAGES, TOKENS, DIM, EXPERTS = 4, 16, 8, 4


def batch(seed: int, broken: tuple[int, ...] = (0,)) -> torch.Tensor:
    """Tokens [IMAGES * TOKENS, DIM]; every token of the `broken` images is NaN (one inf among them)."""
    x_BTD = torch.randn(IMAGES, TOKENS, DIM, generator=torch.Generator().manual_seed(seed))
    for image in broken:
        x_BTD[image] = float("nan")
        x_BTD[image, 0, 0] = float("inf")
    return x_BTD.reshape(-1, DIM)


def route(router, x_ND: torch.Tensor):
    num_tokens = x_ND.shape[0]
    cond_N = torch.ones(num_tokens, dtype=torch.bool)
    return router(x_ND, cond_N, torch.zeros(num_tokens // TOKENS, dtype=torch.long))


def kept_slots(plan) -> set[tuple[int, int]]:
    """(expert, token) of the slots an expert computes."""
    valid = plan.valid_slots_S()
    return set(zip(plan.expert_index_S[valid].tolist(), plan.token_index_S[valid].tolist()))


def diffmoe_router(seed: int = 0) -> DiffMoERouter:
    torch.manual_seed(seed)
    return DiffMoERouter(DIM, EXPERTS, capacity=1.0)


def test_diffmoe_training_takes_the_best_finite_tokens_and_keeps_its_thresholds_finite():
    router = diffmoe_router().train()
    x_ND = batch(1)
    plan = route(router, x_ND).plan
    finite = torch.arange(TOKENS, IMAGES * TOKENS)
    capacity = IMAGES * TOKENS // EXPERTS  # 16 of the 48 finite tokens per expert
    with torch.no_grad():
        scores_EF = router.scorer(x_ND[finite]).t()
        probability_EF = router.capacity_predictor(x_ND[finite]).float().sigmoid().t()
    expected = {(e, int(finite[f])) for e in range(EXPERTS) for f in scores_EF[e].topk(capacity).indices}
    assert kept_slots(plan) == expected
    kth_E = probability_EF.topk(capacity, dim=-1).values[:, -1]
    torch.testing.assert_close(router.expert_threshold_E, 0.05 * kth_E, rtol=0, atol=1e-7)  # from zero, decay 0.95


def test_diffmoe_thresholds_stay_when_fewer_finite_tokens_than_the_capacity_remain():
    router = diffmoe_router().train()
    route(router, batch(1, broken=()))
    before = router.expert_threshold_E.clone()
    route(router, batch(2, broken=(0, 1, 2, 3)))  # every image broken
    assert torch.equal(router.expert_threshold_E, before)


def test_diffmoe_inference_routes_the_other_images_as_if_the_broken_one_were_absent():
    router = diffmoe_router().eval()
    router.expert_threshold_E.fill_(0.5)
    x_ND = batch(3)
    with torch.no_grad():
        plan = route(router, x_ND).plan
        alone = route(router, x_ND[TOKENS:]).plan
    assert kept_slots(plan) == {(e, t + TOKENS) for e, t in kept_slots(alone)}


def test_kmeans_centroids_ignore_broken_tokens_when_seeded_and_when_updated():
    torch.manual_seed(0)
    router = KMeansRouter(DIM, EXPERTS, top_k=1, conditional=False).train()
    route(router, batch(4, broken=(0, 1, 2)))  # most seeds would be NaN tokens
    assert router.centroids_ED.isfinite().all()
    twin = KMeansRouter(DIM, EXPERTS, top_k=1, conditional=False).train()
    twin.load_state_dict(router.state_dict())
    x_ND = batch(5)
    route(router, x_ND)
    route(twin, x_ND[TOKENS:])  # the same step without the broken image
    torch.testing.assert_close(router.centroids_ED, twin.centroids_ED, rtol=1e-6, atol=1e-6)
    assert router.centroids_ED.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_kmeans_routes_with_its_buffers_in_another_dtype(dtype):
    """A router cast with its model (`.double()` for a float64 check, `.bfloat16()` for sampling) measures the
    distances in its buffers' dtype promoted to fp32 at least, and each token goes to its nearest centroid."""
    torch.manual_seed(0)
    router = KMeansRouter(DIM, EXPERTS, top_k=1, conditional=False).to(dtype).train()
    x_ND = batch(6, broken=()).to(dtype)
    route(router, x_ND)  # seeds the centroids and moves them
    assert router.centroids_ED.dtype == dtype and router.centroids_ED.isfinite().all()
    choice = route(router.eval(), x_ND)
    compute = torch.promote_types(dtype, torch.float32)
    nearest_N = torch.cdist(x_ND.to(compute), router.centroids_ED.to(compute)).argmin(dim=1)
    assert torch.equal(choice.expert_ids_NK[:, 0], nearest_N)


def test_kmeans_draws_its_seed_tokens_in_its_first_training_step_only():
    """Later steps leave the random stream alone, and a router resumed from a seeded one keeps its centroids (it
    draws once, and the draw is thrown away on the device)."""
    torch.manual_seed(0)
    router = KMeansRouter(DIM, EXPERTS, top_k=1, conditional=False).train()
    route(router, batch(7, broken=()))
    resumed = KMeansRouter(DIM, EXPERTS, top_k=1, conditional=False).train()
    resumed.load_state_dict(router.state_dict())
    x_ND = batch(8, broken=())
    state = torch.get_rng_state()
    route(router, x_ND)
    assert torch.equal(torch.get_rng_state(), state)
    route(resumed, x_ND)
    assert not torch.equal(torch.get_rng_state(), state)
    assert torch.equal(resumed.centroids_ED, router.centroids_ED)
