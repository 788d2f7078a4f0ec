"""What a MoE layer keeps for backward (issue 30): the expert MLP keeps its up-projection and gathers x's rows and
makes its GELU again in backward; the outputs and every gradient stay those of plain autograd through the same ops
(bit for bit in fp32 on the torch and loop backends, within the reordered sums' tolerance on triton)."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import promoe
from promoe.moe.dispatch import make_backend
from promoe.moe.experts import FFN, ExpertBank, SharedExpert, gelu_tanh, grouped_mm
from promoe.moe.plan import token_choice_plan
from tests.helpers import randomize_, reordered_sums_tolerance

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import saved_bytes  # noqa: E402

DIM, HIDDEN, EXPERTS = 16, 24, 5

ROUTINGS = {
    "random": lambda n, k, g: torch.stack([torch.randperm(EXPERTS, generator=g)[:k] for _ in range(n)]),
    "empty_experts": lambda n, k, g: torch.stack([torch.randperm(k, generator=g) for _ in range(n)]),
    "one_expert_takes_all": lambda n, k, g: torch.full((n, k), EXPERTS - 1),
    "with_dropped_slots": lambda n, k, g: torch.where(torch.rand(n, k, generator=g) < 0.3, EXPERTS,
                                                      torch.randint(0, EXPERTS, (n, k), generator=g)),
}


def make_bank(rng, dtype=torch.float32):
    bank = ExpertBank(EXPERTS, DIM, HIDDEN)
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=rng) * 0.3)
    return bank.to(dtype)


def plain_autograd_dispatch(x_ND, plan, bank):
    """The layer's dispatch as plain autograd through aten ops (the definition before issue 30): autograd keeps the
    permuted rows, the GELU's input and output, and the gate-weighted rows."""
    valid_S1 = plan.valid_slots_S()[:, None]
    mask = lambda t: torch.where(valid_S1, t, torch.zeros((), dtype=t.dtype))  # noqa: E731
    expert_S = plan.expert_index_S.clamp(max=EXPERTS - 1)
    ends = plan.offsets_E1[1:].to(torch.int32)
    x_SD = mask(F.embedding(plan.token_index_S, x_ND))
    a_SH = F.gelu(mask(grouped_mm(x_SD, bank.w_up_EDH, ends) + F.embedding(expert_S, bank.b_up_EH)), approximate="tanh")
    out_SD = mask(mask(grouped_mm(a_SH, bank.w_down_EHD, ends) + F.embedding(expert_S, bank.b_down_ED)))
    acc = torch.promote_types(out_SD.dtype, torch.float32)
    y_ND = torch.zeros(plan.num_tokens, DIM, dtype=acc)
    return y_ND.index_add(0, plan.token_index_S, out_SD.to(acc) * plan.gates_S[:, None].to(acc)).to(out_SD.dtype)


def outputs_and_grads(dispatch, x_ND, ids_NK, gates_NK, bank, upstream):
    x, gates = x_ND.clone().requires_grad_(), gates_NK.clone().requires_grad_()
    bank.zero_grad()
    plan = token_choice_plan(ids_NK, gates, EXPERTS, has_dropped_slots=bool((ids_NK == EXPERTS).any()))
    y = dispatch(x, plan, bank)
    y.backward(upstream.to(y.dtype))
    return [y, x.grad, gates.grad, *(p.grad.clone() for p in bank.parameters())]


def random_case(routing, num_tokens, top_k, rng, dtype=torch.float32):
    bank = make_bank(rng, dtype)
    x = torch.randn(num_tokens, DIM, generator=rng).to(dtype)
    ids = ROUTINGS[routing](num_tokens, top_k, rng)
    gates = torch.rand(num_tokens, top_k, generator=rng)
    return x, ids, gates, bank, torch.randn(num_tokens, DIM, generator=rng)


@pytest.mark.parametrize("backend", ["torch", "loop"])
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("num_tokens", [1, 37])  # 37: not a multiple of any block
def test_expert_mlp_outputs_and_gradients_are_bitwise_those_of_plain_autograd(backend, routing, top_k, num_tokens,
                                                                              rng):
    x, ids, gates, bank, upstream = random_case(routing, num_tokens, top_k, rng)
    expected = outputs_and_grads(plain_autograd_dispatch, x, ids, gates, bank, upstream)
    got = outputs_and_grads(make_backend(backend).dispatch, x, ids, gates, bank, upstream)
    for name, a, b in zip(["y", "x", "gates", "w_up", "b_up", "w_down", "b_down"], got, expected, strict=True):
        assert torch.equal(a, b), (name, (a - b).abs().max())


def test_expert_mlp_on_rows_already_permuted_is_bitwise_plain_autograd(rng):
    """Expert parallelism runs the expert MLP on the rows it received (`run_experts`): the rows are kept there."""
    x, ids, gates, bank, upstream = random_case("with_dropped_slots", 29, 2, rng)
    backend = make_backend("torch")

    def permute_then_run(x_ND, plan, bank):
        out_SD = backend.run_experts(backend.permute(x_ND, plan), plan, bank)
        return backend.combine(out_SD, plan)

    expected = outputs_and_grads(plain_autograd_dispatch, x, ids, gates, bank, upstream)
    for a, b in zip(outputs_and_grads(permute_then_run, x, ids, gates, bank, upstream), expected, strict=True):
        assert torch.equal(a, b)


def test_expert_mlp_in_bfloat16_and_under_autocast_matches_plain_autograd(rng):
    x, ids, gates, bank, upstream = random_case("with_dropped_slots", 33, 2, rng, torch.bfloat16)
    expected = outputs_and_grads(plain_autograd_dispatch, x, ids, gates, bank, upstream)
    for a, b in zip(outputs_and_grads(make_backend("torch").dispatch, x, ids, gates, bank, upstream), expected):
        assert a.dtype == b.dtype and torch.equal(a, b)  # the same ops in the same dtypes
    x, ids, gates, bank, upstream = random_case("random", 33, 2, rng)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = outputs_and_grads(plain_autograd_dispatch, x, ids, gates, bank, upstream)
        got = outputs_and_grads(make_backend("torch").dispatch, x, ids, gates, bank, upstream)
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype
        # the same bf16 GEMMs; only the backward's casts of the weights are made again
        torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_triton_expert_mlp_matches_plain_autograd_within_the_reordered_sums_tolerance(routing, top_k, rng):
    x, ids, gates, bank, upstream = random_case(routing, 37, top_k, rng)
    expected = outputs_and_grads(plain_autograd_dispatch, x, ids, gates, bank, upstream)
    got = outputs_and_grads(make_backend("triton").dispatch, x, ids, gates, bank, upstream)
    for a, b in zip(got, expected, strict=True):
        # forward D + H, backward H + D (grad x) and the slots of one expert (weight and bias gradients)
        tolerance = reordered_sums_tolerance(DIM, HIDDEN, HIDDEN, DIM, 37 * top_k, magnitude=b.abs().max().item())
        torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.parametrize("autocast", [False, True])
def test_shared_expert_is_the_ffn_with_the_same_gradients(autocast, rng):
    ffn = randomize_(FFN(DIM, HIDDEN))
    shared = SharedExpert(DIM, HIDDEN)
    shared.load_state_dict(ffn.state_dict())
    x, upstream = torch.randn(29, DIM, generator=rng), torch.randn(29, DIM, generator=rng)

    def run(module):
        x_in = x.clone().requires_grad_()
        module.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = module(x_in)
        y.backward(upstream.to(y.dtype))
        return [y, x_in.grad, *(p.grad for p in module.parameters())]

    for a, b in zip(run(shared), run(ffn), strict=True):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)


def test_counting_takes_each_storage_once_and_leaves_out_the_input_and_parameters(rng):
    ffn = FFN(DIM, HIDDEN)
    x = torch.randn(7, DIM, generator=rng)
    # the dense MLP keeps its pre-activation and GELU output: 2 x [7, HIDDEN] fp32 (x and the weights left out)
    assert saved_bytes.saved_bytes(ffn, x, ffn.parameters()) == 2 * 7 * HIDDEN * 4
    # exp keeps its output; square keeps it again, mul two views of it: one storage, at its full size
    assert saved_bytes.saved_bytes(lambda t: t.exp().square(), x, []) == 7 * DIM * 4
    assert saved_bytes.saved_bytes(lambda t: (lambda a: a[:3] * a[4:])(t.exp()), x, []) == 7 * DIM * 4
    assert saved_bytes.saved_bytes(lambda t: t.exp() * t.exp(), x, []) == 2 * 7 * DIM * 4  # two storages


@pytest.mark.parametrize("model", ["ProMoE-S", "ProMoE-EC-S", "TC-DiT-S-E8"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_moe_layer_keeps_no_more_for_backward_than_the_dense_mlp(model, backend):
    dense = saved_bytes.layer_of("DiT-S", torch.float32, hidden_size=64, num_heads=4)
    layer = saved_bytes.layer_of(model, torch.float32, hidden_size=64, num_heads=4)
    # 64 tokens per image, so that the routers' per-image tensors (the RCL's [B, E, D] centroids) do not outweigh the
    # activations of a layer as narrow as D = 64 (at 16 tokens ProMoE-EC's torch layer keeps 2.08 KiB against 2.00;
    # at XL they are 0.6% of the dense MLP's)
    x = torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 1000, 5, 7])  # one null-label image
    dense_kib = saved_bytes.layer_kib_per_token(dense, x, labels, None)
    assert dense_kib == pytest.approx(2 * 4 * 64 * 4 / 1024)
    assert saved_bytes.layer_kib_per_token(layer, x, labels, backend) <= dense_kib


def test_a_promoe_model_step_is_bitwise_that_of_plain_autograd_through_the_steps(rng):
    """A whole ProMoE model (shared and unconditional experts, RCL): its loss and every gradient equal those of plain
    autograd through the same expert steps and the plain FFN."""
    model = randomize_(promoe.build_model("ProMoE-S", depth=2, hidden_size=32, num_heads=2, input_size=8,
                                          experts="E6A2S1U1", dispatch="torch")).train()
    backend = make_backend("torch")
    x, t = torch.randn(2, 4, 8, 8, generator=rng), torch.rand(2, generator=rng)
    labels = torch.tensor([3, model.config.num_classes])

    def step():
        model.zero_grad()
        out, aux = model(x, t, labels, return_aux=True, drop_labels=False)
        loss = out.square().mean() + sum(aux.values())
        loss.backward()
        return [loss, out, *(p.grad.clone() for p in model.parameters() if p.grad is not None)]

    lean = step()
    layer = next(m for m in model.modules() if hasattr(m, "router"))
    layer.backend.expert_mlp = lambda rows, plan, experts, permute: backend.expert_bias(
        backend.gemm(backend.expert_bias_gelu(backend.gemm(backend.permute(rows, plan) if permute else rows,
                                                           experts.w_up_EDH, plan), experts.b_up_EH, plan),
                     experts.w_down_EHD, plan), experts.b_down_ED, plan)
    shared = layer.shared  # the plain FFN on the same weights
    shared.forward = lambda x_ND: F.linear(gelu_tanh(shared.fc1(x_ND)), shared.fc2.weight, shared.fc2.bias)
    for a, b in zip(lean, step(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_expert_choice_plan_stores_only_the_slots_that_can_run_and_changes_no_output_or_gradient(backend, rng,
                                                                                                  monkeypatch):
    """ProMoE-EC: an image runs its E*C routed slots or its L unconditional ones; the plan keeps B * max(E*C, L)
    slots of the B*E*C + N, and the layer's output and every gradient are those of the plan with all of them."""
    layer = randomize_(saved_bytes.layer_of("ProMoE-EC-S", torch.float32, hidden_size=32, num_heads=2))
    x = torch.randn(4, 16, 32, generator=rng)
    labels = torch.tensor([3, 1000, 5, 7])  # one null-label image
    upstream = torch.randn(x.shape, generator=rng)
    plans = []
    layer.plan_hooks.append(plans.append)

    def run():
        layer.zero_grad()
        x_in = x.clone().requires_grad_()
        with promoe.dispatch_backend(layer, backend):
            y, aux = layer(x_in, labels)
        torch.autograd.backward([y, *aux.values()], [upstream, *(torch.ones_like(a) for a in aux.values())])
        return [y, x_in.grad, *(p.grad.clone() for p in layer.parameters())]

    cut = run()
    routed, capacity = layer.router.num_routed, layer.router.capacity_factor
    running = 4 * max(routed * max(1, int(16 / routed * capacity)), 16)
    assert plans[-1].token_index_S.numel() == running < 4 * 16 + 4 * routed * max(1, int(16 / routed * capacity))
    uncut = promoe.moe.routers.sort_slots
    monkeypatch.setattr(promoe.moe.routers, "sort_slots", lambda *args, max_running=None, **kw: uncut(*args, **kw))
    whole = run()
    assert plans[-1].token_index_S.numel() > running
    for a, b in zip(cut, whole, strict=True):
        assert torch.equal(a, b)
