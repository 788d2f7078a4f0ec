import torch

from promoe.moe.plan import expert_choice_plan, offsets_from_ids, sort_slots, token_choice_plan


def test_offsets_count_each_expert_and_skip_dropped_ids():
    ids = torch.tensor([2, 0, 2, 4, 0, 2])  # 4 == num_experts: dropped
    assert offsets_from_ids(ids, 4).tolist() == [0, 2, 2, 5, 5]


def test_token_choice_plan_sorts_stably_by_expert(rng):
    ids_NK = torch.randint(0, 5, (37, 3), generator=rng)
    gates_NK = torch.rand(37, 3, generator=rng)
    plan = token_choice_plan(ids_NK, gates_NK, 5)
    assert plan.expert_index_S.tolist() == sorted(ids_NK.flatten().tolist())
    for slot in range(plan.token_index_S.numel()):
        token = plan.token_index_S[slot]
        k = (ids_NK[token] == plan.expert_index_S[slot]).nonzero()[:, 0]
        assert torch.isin(plan.gates_S[slot], gates_NK[token, k])
    # Stable: within one expert the tokens keep their order.
    for expert in range(5):
        tokens = plan.token_index_S[plan.offsets_E1[expert]:plan.offsets_E1[expert + 1]]
        assert torch.all(tokens.diff() >= 0)
    assert plan.counts_E.tolist() == torch.bincount(ids_NK.flatten(), minlength=5).tolist()


def test_dropped_slots_sort_past_the_last_offset():
    ids_NK = torch.tensor([[1, 3], [0, 3], [3, 3]])  # 3 == num_experts: dropped
    plan = token_choice_plan(ids_NK, torch.ones(3, 2), 3, has_dropped_slots=True)
    assert plan.offsets_E1.tolist() == [0, 1, 2, 2]
    assert plan.valid_slots_S().tolist() == [True, True, False, False, False, False]


def test_expert_choice_plan_keeps_expert_rows_in_order():
    token_EC = torch.tensor([[3, 1], [0, 3]])
    plan = expert_choice_plan(token_EC, torch.rand(2, 2), num_tokens=4)
    assert plan.expert_index_S.tolist() == [0, 0, 1, 1]
    assert plan.offsets_E1.tolist() == [0, 2, 4]
    assert plan.token_index_S.tolist() == [3, 1, 0, 3]


def test_sort_slots_matches_a_python_sort(rng):
    tokens = torch.randint(0, 9, (30,), generator=rng)
    experts = torch.randint(0, 5, (30,), generator=rng)  # 4 == dropped for E=4
    gates = torch.rand(30, generator=rng)
    plan = sort_slots(tokens, experts, gates, num_experts=4, num_tokens=9)
    expected = sorted(zip(experts.tolist(), range(30)))
    assert plan.token_index_S.tolist() == [tokens[i].item() for _, i in expected]
    assert plan.offsets_E1[-1].item() == int((experts < 4).sum())
