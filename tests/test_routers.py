"""Every router and MoE layer against a float64 reference written from the paper's equations."""

import pytest
import torch
import torch.nn.functional as F

import promoe
from promoe.moe.dispatch import TorchBackend
from promoe.zoo import build_mlp
from tests.helpers import TINY, randomize_, reordered_sums_tolerance

pytestmark = pytest.mark.order_sensitive  # two summation orders at derived tolerances (see pytest.ini)

BATCH, TOKENS, DIM = 4, 16, TINY["hidden_size"]


def layer_tolerance(expected: torch.Tensor, gradient: bool = False) -> dict:
    """fp32 against the float64 reference or another backend: the layer's sums (the router's norms and cosines or
    gate, an expert's up and down (at most 4 * DIM wide), the combine of a token's experts, the aux losses' means
    over the tokens), and for a gradient the backward's chained after them."""
    forward = (DIM, DIM, DIM, 4 * DIM, 5, BATCH * TOKENS)
    sums = (*forward, *forward) if gradient else forward
    return reordered_sums_tolerance(*sums, magnitude=expected.abs().max().item())


def make_layer(name, seed=0, **overrides):
    config = promoe.model_config(name, **{**TINY, **overrides})
    return randomize_(build_mlp(config, block_index=1), seed), config


def ffn64(x, w1, b1, w2, b2):
    return F.gelu(x @ w1 + b1, approximate="tanh") @ w2 + b2


class Reference:
    """The layer's parameters in float64 with gradients, and the paper's maths on them."""

    def __init__(self, layer):
        self.params = {k: v.detach().double().requires_grad_() for k, v in layer.named_parameters()}

    def expert(self, e, x):
        p = self.params
        return ffn64(x, p["experts.w_up_EDH"][e], p["experts.b_up_EH"][e], p["experts.w_down_EHD"][e],
                     p["experts.b_down_ED"][e])

    def shared(self, x):
        if "shared.fc1.weight" not in self.params:
            return torch.zeros_like(x)
        p = self.params
        return ffn64(x, p["shared.fc1.weight"].t(), p["shared.fc1.bias"], p["shared.fc2.weight"].t(),
                     p["shared.fc2.bias"])

    def cosine(self, x_ND, alpha=1.0):
        protos = self.params["router.scorer.prototypes"]
        return alpha * (x_ND / x_ND.norm(dim=-1, keepdim=True)) @ (protos / protos.norm(dim=-1, keepdim=True)).t()

    def rcl(self, centroid_lists, temperature=0.07):
        """Eq. (6) as the official code computes it: InfoNCE over the experts that received tokens."""
        protos = self.params["router.scorer.prototypes"]
        losses = []
        for valid, means in centroid_lists:
            if len(valid) < 2:
                continue
            sim = F.normalize(protos[valid], dim=1) @ F.normalize(torch.stack(means), dim=1).t()
            losses.append(F.cross_entropy(sim / temperature, torch.arange(len(valid)), reduction="none"))
        return torch.cat(losses).mean() if losses else torch.zeros((), dtype=torch.float64)


def labels_of(cond_B):
    """Labels whose null entries (class num_classes) are where cond_B is False."""
    return torch.where(cond_B, 3, TINY["num_classes"])


def check_layer(layer, reference, x_BLD, cond_B, reference_fn, backend):
    """Our layer in fp32 against reference_fn(x in float64) -> (out, aux): output, aux losses, every gradient."""
    layer.zero_grad()
    x = x_BLD.clone().requires_grad_()
    with promoe.dispatch_backend(layer, backend):
        out, aux = layer(x, labels_of(cond_B))
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    ((out * upstream).sum() + sum(aux.values(), torch.zeros(()))).backward()

    x64 = x_BLD.double().requires_grad_()
    out64, aux64 = reference_fn(x64)
    ((out64 * upstream.double()).sum() + sum(aux64.values(), torch.zeros((), dtype=torch.float64))).backward()

    torch.testing.assert_close(out.double(), out64.detach(), **layer_tolerance(out64))
    assert sorted(aux) == sorted(aux64)
    for name in aux:
        torch.testing.assert_close(aux[name].double(), aux64[name].detach(), **layer_tolerance(aux64[name]))
    torch.testing.assert_close(x.grad.double(), x64.grad, **layer_tolerance(x64.grad, gradient=True))
    for name, param in layer.named_parameters():
        ref_grad = reference.params[name].grad
        ref_grad = torch.zeros_like(reference.params[name]) if ref_grad is None else ref_grad
        got = torch.zeros_like(param) if param.grad is None else param.grad
        torch.testing.assert_close(got.double(), ref_grad, **layer_tolerance(ref_grad, gradient=True),
                                   msg=f"gradient of {name}")


def promoe_tc_reference(reference, x_BLD, cond_B, top_k, activation, training, rcl_weight=1.0):
    num_routed = reference.params["router.scorer.prototypes"].shape[0]
    x_ND = x_BLD.reshape(-1, DIM)
    cond_N = cond_B.repeat_interleave(TOKENS)
    scores = {"identity": lambda z: z, "sigmoid": torch.sigmoid, "softmax": lambda z: z.softmax(-1)}[activation](
        reference.cosine(x_ND))
    rows, assigned = [], [[] for _ in range(num_routed)]
    for n in range(x_ND.shape[0]):
        if cond_N[n]:
            gates, ids = scores[n].topk(top_k)
            rows.append(sum(g * reference.expert(e, x_ND[n]) for g, e in zip(gates, ids.tolist())))
            for e in ids.tolist():
                assigned[e].append(x_ND[n])
        else:
            rows.append(reference.expert(num_routed, x_ND[n]))  # the unconditional expert, gate 1
    out = torch.stack(rows) + reference.shared(x_ND)
    aux = {}
    if training:
        valid = [e for e in range(num_routed) if assigned[e]]
        aux["rcl"] = rcl_weight * reference.rcl([(valid, [torch.stack(assigned[e]).mean(0) for e in valid])])
    return out.view_as(x_BLD), aux


@pytest.mark.parametrize("backend", ["loop", "torch", "triton"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("activation", ["identity", "sigmoid", "softmax"])
@pytest.mark.parametrize("training", [True, False])
def test_promoe_token_choice_layer_matches_reference(backend, top_k, activation, training, rng):
    layer, _ = make_layer("ProMoE-S", experts=f"E6A{top_k}S1U1", activation=activation)
    layer.train(training)
    reference = Reference(layer)
    x = torch.randn(BATCH, TOKENS, DIM, generator=rng)
    cond = torch.tensor([True, False, True, True])
    check_layer(layer, reference, x, cond,
                lambda x64: promoe_tc_reference(reference, x64, cond, top_k, activation, training), backend)
    assert reference.params["router.scorer.prototypes"].grad.abs().sum() > 0  # gates and RCL reach them


def test_routing_contrastive_loss_is_zero_with_fewer_than_two_active_experts(rng):
    layer, _ = make_layer("ProMoE-S", experts="E6A1S1U1")
    with torch.no_grad():  # every token closest to prototype 2
        layer.router.scorer.prototypes.copy_(torch.randn(4, DIM, generator=rng) * 1e-3)
        layer.router.scorer.prototypes[2] = 1.0
    x = torch.rand(BATCH, TOKENS, DIM, generator=rng) + 0.5
    _, aux = layer(x, labels_of(torch.ones(BATCH, dtype=torch.bool)))
    assert aux["rcl"].item() == 0.0
    _, aux = layer(x, labels_of(torch.zeros(BATCH, dtype=torch.bool)))  # all-null batch: no routed token at all
    assert aux["rcl"].item() == 0.0


def promoe_ec_reference(reference, x_BLD, cond_B, capacity, training):
    num_routed = reference.params["router.scorer.prototypes"].shape[0]
    out = reference.shared(x_BLD.reshape(-1, DIM)).view_as(x_BLD).clone()
    rows = [torch.zeros(TOKENS, DIM, dtype=torch.float64) for _ in range(BATCH)]
    centroid_lists = []
    for b in range(BATCH):
        if not cond_B[b]:
            rows[b] = rows[b] + reference.expert(num_routed, x_BLD[b])
            continue
        scores = reference.cosine(x_BLD[b])  # [L, E]
        means = []
        for e in range(num_routed):
            gates, tokens = scores[:, e].topk(capacity)
            contribution = torch.zeros(TOKENS, DIM, dtype=torch.float64)
            contribution = contribution.index_add(0, tokens, gates[:, None] * reference.expert(e, x_BLD[b, tokens]))
            rows[b] = rows[b] + contribution
            means.append(x_BLD[b, tokens].mean(0))
        centroid_lists.append((list(range(num_routed)), means))
    out = out + torch.stack(rows)
    aux = {"rcl": reference.rcl(centroid_lists)} if training else {}
    return out, aux


@pytest.mark.parametrize("backend", ["loop", "torch", "triton"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_promoe_expert_choice_layer_matches_reference(backend, top_k, rng):
    layer, _ = make_layer("ProMoE-EC-S", experts=f"E6A{top_k}S1U1")
    layer.train()
    reference = Reference(layer)
    capacity = max(1, int(TOKENS / 4 * top_k))
    x = torch.randn(BATCH, TOKENS, DIM, generator=rng)
    cond = torch.tensor([True, False, True, True])
    check_layer(layer, reference, x, cond, lambda x64: promoe_ec_reference(reference, x64, cond, capacity, True),
                backend)


def tc_dit_reference(reference, x_BLD, top_k, lb_weight):
    x_ND = x_BLD.reshape(-1, DIM)
    probs = (x_ND @ reference.params["router.scorer.gate.weight"].t()).softmax(-1)
    num_experts = probs.shape[1]
    rows, chosen = [], torch.zeros(num_experts, dtype=torch.float64)
    for n in range(x_ND.shape[0]):
        gates, ids = probs[n].topk(top_k)
        rows.append(sum(g * reference.expert(e, x_ND[n]) for g, e in zip(gates, ids.tolist())))
        chosen[ids] += 1
    fraction = chosen / (x_ND.shape[0] * top_k)
    aux = {"load_balance": lb_weight * num_experts * (fraction * probs.mean(0)).sum()}
    return torch.stack(rows).view_as(x_BLD), aux


@pytest.mark.parametrize("backend", ["loop", "torch", "triton"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_tc_dit_layer_with_load_balance_loss_matches_reference(backend, top_k, rng):
    layer, _ = make_layer("TC-DiT-S", experts=f"E4A{top_k}S0U0")
    layer.train()
    reference = Reference(layer)
    x = torch.randn(BATCH, TOKENS, DIM, generator=rng)
    cond = torch.ones(BATCH, dtype=torch.bool)
    check_layer(layer, reference, x, cond, lambda x64: tc_dit_reference(reference, x64, top_k, 0.01), backend)


def test_ec_dit_layer_matches_reference(rng):
    layer, _ = make_layer("EC-DiT-S", experts="E4A1S0U0")
    reference = Reference(layer)
    x = torch.randn(BATCH, TOKENS, DIM, generator=rng)
    probs = (x.double() @ reference.params["router.scorer.gate.weight"].t()).softmax(-1)  # [B, L, E]
    expected = torch.zeros(BATCH, TOKENS, DIM, dtype=torch.float64)
    for b in range(BATCH):
        for e in range(4):
            gates, tokens = probs[b, :, e].topk(TOKENS // 4)
            expected[b] = expected[b].index_add(0, tokens, gates[:, None] * reference.expert(e, x[b, tokens].double()))
    for backend in ("loop", "torch"):
        with promoe.dispatch_backend(layer, backend):
            out, aux = layer(x, labels_of(torch.ones(BATCH, dtype=torch.bool)))
        torch.testing.assert_close(out.double(), expected.detach(), **layer_tolerance(expected))
        assert aux == {}


def record_plans(monkeypatch):
    plans = []
    original = TorchBackend.permute

    def recording(self, x, plan):
        plans.append(plan)
        return original(self, x, plan)

    monkeypatch.setattr(TorchBackend, "permute", recording)
    return plans


def tokens_of_uncond_expert(plan, uncond_expert):
    valid = plan.valid_slots_S()
    return plan.token_index_S[valid & (plan.expert_index_S == uncond_expert)]


@pytest.mark.parametrize("name", ["ProMoE-S", "ProMoE-EC-S"])
def test_inference_routes_only_null_label_tokens_to_the_unconditional_expert(name, monkeypatch, rng):
    model = promoe.build_model(name, **TINY, experts="E6A2S1U1").eval()
    plans = record_plans(monkeypatch)
    x, t = torch.randn(4, 4, 8, 8, generator=rng), torch.rand(4, generator=rng) * 1000
    labels = torch.tensor([1, 5, 7, 2])
    model(x, t, labels)  # no guidance: every label is a real class
    assert len(plans) == 1 and tokens_of_uncond_expert(plans[0], 4).numel() == 0
    plans.clear()
    model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, 10)]))  # with guidance
    tokens = tokens_of_uncond_expert(plans[0], 4)
    assert sorted(tokens.tolist()) == list(range(4 * TOKENS, 8 * TOKENS))


def test_label_dropout_happens_in_training_only_and_reaches_the_moe_layers(monkeypatch):
    torch.manual_seed(0)
    model = promoe.build_model("ProMoE-S", **{**TINY, "input_size": 4})
    plans = record_plans(monkeypatch)
    embedded = []
    model.y_embedder.register_forward_hook(lambda module, args, out: embedded.append(args[0]))
    labels = torch.randint(0, 10, (4000,))
    x, t = torch.randn(4000, 4, 4, 4), torch.rand(4000) * 1000
    model.train()
    model(x, t, labels)
    dropped = embedded[0] == 10
    assert 0.08 < dropped.float().mean().item() < 0.12  # p = 0.1; 4000 draws give a std of 0.005
    tokens_per_image = 4
    routed_to_uncond = tokens_of_uncond_expert(plans[0], 12)
    assert torch.equal(routed_to_uncond, dropped.nonzero()[:, 0].repeat_interleave(tokens_per_image) * tokens_per_image
                       + torch.arange(tokens_per_image).repeat(int(dropped.sum())))
    model.eval()
    embedded.clear()
    model(x, t, labels)
    assert torch.equal(embedded[0], labels)


def test_gates_are_raw_cosines_not_renormalised(monkeypatch, rng):
    layer, _ = make_layer("ProMoE-S", experts="E6A2S1U1")
    plans = record_plans(monkeypatch)
    x = torch.randn(BATCH, TOKENS, DIM, generator=rng)
    layer(x, labels_of(torch.ones(BATCH, dtype=torch.bool)))
    cos = F.normalize(x.reshape(-1, DIM), dim=-1) @ F.normalize(layer.router.scorer.prototypes.detach(), dim=-1).t()
    plan = plans[0]
    expected = cos[plan.token_index_S, plan.expert_index_S]
    # The router's norms and cosines (sums over DIM), maybe in another order than these.
    torch.testing.assert_close(plan.gates_S.detach(), expected, **reordered_sums_tolerance(DIM, DIM, magnitude=1.0))
    assert (plan.gates_S.view(-1).detach() < 1).all()  # two top cosines never sum to exactly 1 by design


@pytest.mark.parametrize("kwargs, message", [
    (dict(experts="E14X1S1U1"), "bad expert string"),
    (dict(experts="E3A1S1U2"), "routed experts"),
    (dict(experts="E6A5S1U1"), "must lie in"),
    (dict(activation="relu"), "unknown router activation"),
    (dict(router="magic"), "unknown router"),
    (dict(dispatch="cuda"), "unknown dispatch backend"),
    (dict(router="kmeans", lb_weight=0.01), "load-balance loss needs router scores"),
    (dict(router="tc", rcl_weight=1.0), "routing contrastive loss needs prototypes"),
    (dict(no_such_key=1), "unknown model config key"),
])
def test_bad_config_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        promoe.build_model("ProMoE-S", device="meta", **kwargs)


SUPERCLASSES = [0, 0, 1, 1, 2, 2, 3, 3, 0, 1]  # 10 classes -> 4 superclasses


def test_classifier_routing_sends_each_image_to_its_predicted_superclass_expert(rng):
    layer, _ = make_layer("ProMoE-S", router="classifier", superclasses=SUPERCLASSES, experts="E6A1S1U1")
    layer.train()
    reference = Reference(layer)
    x = torch.randn(BATCH, TOKENS, DIM, generator=rng)
    labels = torch.tensor([2, 10, 9, 4])

    def classifier_reference(x64):
        p = reference.params
        logits = x64.mean(1) @ p["router.classifier.weight"].t() + p["router.classifier.bias"]
        rows = []
        for b in range(BATCH):
            expert = 4 if labels[b] == 10 else int(logits[b].argmax())
            rows.append(reference.expert(expert, x64[b]))
        out = torch.stack(rows) + reference.shared(x64.reshape(-1, DIM)).view_as(x64)
        cond = labels != 10
        targets = torch.tensor(SUPERCLASSES)[labels[cond]]
        return out, {"router_cls": F.cross_entropy(logits[cond], targets)}

    layer.zero_grad()
    x32 = x.clone().requires_grad_()
    out, aux = layer(x32, labels)
    (out.sum() + aux["router_cls"]).backward()
    x64 = x.double().requires_grad_()
    out64, aux64 = classifier_reference(x64)
    (out64.sum() + aux64["router_cls"]).backward()
    torch.testing.assert_close(out.double(), out64.detach(), **layer_tolerance(out64))
    torch.testing.assert_close(aux["router_cls"].double(), aux64["router_cls"].detach(),
                               **layer_tolerance(aux64["router_cls"]))
    expected_grad = reference.params["router.classifier.weight"].grad
    torch.testing.assert_close(layer.router.classifier.weight.grad.double(), expected_grad,
                               **layer_tolerance(expected_grad, gradient=True))


@pytest.mark.parametrize("superclasses, message", [(None, "router 'classifier' needs a list mapping each class"),
                                                   ([0, 1], "each of the 10 classes"),
                                                   ([0] * 10, "superclasses need as many routed experts")])
def test_classifier_routing_rejects_a_missing_or_wrong_superclass_map(superclasses, message):
    with pytest.raises(ValueError, match=message):
        promoe.build_model("ProMoE-S", device="meta", **TINY, router="classifier", superclasses=superclasses)


def test_classifier_routing_reads_the_superclass_map_from_a_file(tmp_path):
    path = tmp_path / "superclasses.txt"
    path.write_text("\n".join(map(str, SUPERCLASSES)))
    model = promoe.build_model("ProMoE-S", **TINY, router="classifier", superclasses=str(path), experts="E6A1S1U1")
    assert model.blocks[1].mlp.router.superclass_of_label.tolist() == [*SUPERCLASSES, -100]


def test_kmeans_routing_assigns_nearest_centroid_and_moves_centroids_to_their_tokens_mean(monkeypatch, rng):
    layer, _ = make_layer("ProMoE-S", router="kmeans", experts="E6A1S1U1")
    router = layer.router
    plans = record_plans(monkeypatch)
    x = torch.randn(BATCH, TOKENS, DIM, generator=rng)
    labels = torch.tensor([1, 10, 2, 3])
    layer.train()
    layer(x, labels)
    assert router.initialized.item()
    x_ND = x.reshape(-1, DIM)
    # After the first step each centroid that received tokens is their mean; the others are sampled tokens.
    expert_of_token = torch.full((x_ND.shape[0],), -1)
    valid = plans[0].valid_slots_S()
    expert_of_token[plans[0].token_index_S[valid]] = plans[0].expert_index_S[valid]
    cond_N = (labels != 10).repeat_interleave(TOKENS)
    assert (expert_of_token[~cond_N] == 4).all()  # null-label tokens: unconditional expert
    for e in range(4):
        mine = x_ND[cond_N & (expert_of_token == e)]
        if len(mine):
            # The router's sum of its tokens over their count, against .mean's sum in another order.
            torch.testing.assert_close(router.centroids_ED[e], mine.mean(0), **reordered_sums_tolerance(
                len(mine), magnitude=mine.abs().max().item()))
        else:
            assert (torch.cdist(router.centroids_ED[e:e + 1], x_ND).min() < 1e-5)
    # Routing is by nearest centroid (before the update, so re-run in eval with frozen centroids).
    layer.eval()
    plans.clear()
    layer(x, labels)
    nearest = torch.cdist(x_ND, router.centroids_ED).argmin(1)
    plan = plans[0]
    routed = plan.expert_index_S < 4
    assert torch.equal(plan.expert_index_S[routed], nearest[plan.token_index_S[routed]])


def diffmoe_reference(reference, x_BLD, capacity_count=None, threshold=None):
    """The official DiffMoE layer: train takes the top-C tokens of the batch per expert; eval takes, per expert,
    as many top-scored tokens as the capacity predictor puts above the expert's threshold."""
    p = reference.params
    x_ND = x_BLD.reshape(-1, DIM)
    scores = (x_ND @ p["router.scorer.gate.weight"].t()).softmax(-1)  # [N, E]
    hidden = F.silu(x_ND.detach() @ p["router.capacity_predictor.0.weight"].t() + p["router.capacity_predictor.0.bias"])
    predicted = hidden @ p["router.capacity_predictor.2.weight"].t() + p["router.capacity_predictor.2.bias"]
    out = torch.zeros_like(x_ND)
    taken = torch.zeros_like(scores)
    for e in range(scores.shape[1]):
        k = capacity_count if threshold is None else int((predicted[:, e].sigmoid() > threshold[e]).sum())
        gates, tokens = scores[:, e].topk(k)
        out = out.index_add(0, tokens, gates[:, None] * reference.expert(e, x_ND[tokens]))
        taken[tokens, e] = 1
    aux = {} if threshold is not None else {
        "capacity_predictor": F.binary_cross_entropy_with_logits(predicted, taken)}
    return out.view_as(x_BLD), aux, predicted


@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_diffmoe_training_takes_the_batch_top_tokens_and_trains_its_capacity_predictor(backend, rng):
    layer, _ = make_layer("DiffMoE-S-E4")
    layer.train()
    reference = Reference(layer)
    x = torch.randn(BATCH, TOKENS, DIM, generator=rng)
    capacity = BATCH * TOKENS // 4
    check_layer(layer, reference, x, torch.ones(BATCH, dtype=torch.bool),
                lambda x64: diffmoe_reference(reference, x64, capacity)[:2], backend)
    # One training forward moved each threshold 5% of the way from 0 to its expert's C-th largest probability.
    predicted = diffmoe_reference(reference, x.double(), capacity)[2].sigmoid()
    expected = 0.05 * predicted.topk(capacity, dim=0).values[-1]
    torch.testing.assert_close(layer.router.expert_threshold_E.double(), expected.detach(), **layer_tolerance(expected))


@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_diffmoe_inference_uses_the_thresholds_of_the_capacity_predictor(backend, rng):
    layer, _ = make_layer("DiffMoE-S-E4")
    layer.eval()
    threshold = torch.tensor([0.2, 0.5, 0.8, 1.0])  # the last expert takes no token at all
    layer.router.expert_threshold_E.copy_(threshold)
    reference = Reference(layer)
    x = torch.randn(BATCH, TOKENS, DIM, generator=rng)
    with promoe.dispatch_backend(layer, backend):
        out, aux = layer(x, labels_of(torch.ones(BATCH, dtype=torch.bool)))
    expected, _, predicted = diffmoe_reference(reference, x.double(), threshold=threshold.double())
    assert aux == {}
    assert 0 < int((predicted.sigmoid() > threshold.double()).sum()) < predicted.numel()  # a real selection
    torch.testing.assert_close(out.double(), expected.detach(), **layer_tolerance(expected))


def test_diffmoe_refuses_an_unconditional_expert():
    with pytest.raises(ValueError, match="no unconditional expert"):
        promoe.build_model("DiffMoE-S-E4", device="meta", experts="E5A1S0U1")


@pytest.mark.parametrize("name, experts",
                         [("ProMoE-S", "E6A2S1U1"), ("ProMoE-S", "E6A3S1U1"), ("ProMoE-EC-S", "E6A1S1U1")])
@pytest.mark.parametrize("labels", [[10, 10, 10, 10], [1, 2, 3, 4], [10, 2, 10, 4]])
def test_all_backends_agree_on_all_null_all_real_and_mixed_batches(name, experts, labels, rng):
    layer, _ = make_layer(name, experts=experts)
    layer.train()
    x = torch.randn(BATCH, TOKENS, DIM, generator=rng)
    results = []
    for backend in ("loop", "torch", "triton"):
        layer.zero_grad()
        x_ = x.clone().requires_grad_()
        with promoe.dispatch_backend(layer, backend):
            out, aux = layer(x_, torch.tensor(labels))
        (out.square().sum() + sum(aux.values(), torch.zeros(()))).backward()
        results.append([out.detach(), x_.grad] + [p.grad if p.grad is not None else torch.zeros_like(p)
                                                  for p in layer.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.isfinite(b).all()
            torch.testing.assert_close(a, b, **layer_tolerance(b, gradient=True))
