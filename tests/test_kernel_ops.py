"""The kernels as `torch.library` custom ops: each passes `opcheck`, and torch.compile traces a ProMoE block through
them, forward and backward, without a graph break (issue 10, item 4).

`opcheck` runs each op eagerly, checks its schema (no mutation, no aliasing), runs its fake implementation against
the real one (shapes, dtypes, strides), checks its autograd registration, and traces it with AOTAutograd (dynamic
shapes) comparing outputs and gradients with eager. The kernels run under Triton's interpreter, which is slow (about
2 s per launch here), so the inputs are small; every util runs, test_aot_dispatch_dynamic included.
"""

import pytest
import torch

import promoe
import promoe.moe.dispatch  # noqa: F401  (imports the kernels, which register the promoe:: ops)
from promoe.moe.plan import token_choice_plan
from tests.helpers import randomize_, reordered_sums_tolerance

DIM, EXPERTS = 16, 6
HIDDEN = 24  # the bias kernels' columns: a partial column block
ops = torch.ops.promoe


def routing_inputs(rng, num_tokens=20):
    x = torch.randn(num_tokens, DIM, generator=rng, requires_grad=True)
    protos = torch.randn(EXPERTS, DIM, generator=rng, requires_grad=True)
    cond = torch.rand(num_tokens, generator=rng) > 0.3  # about a third of the tokens are unconditional
    return x, protos, cond


def plan_tensors(rng, dropped: bool, num_tokens=20, top_k=2):
    """The (torch-built) plan of random routing; with `dropped`, a third of the slots carry the dropped id."""
    ids = torch.randint(0, EXPERTS, (num_tokens, top_k), generator=rng)
    if dropped:
        ids[torch.rand(num_tokens, top_k, generator=rng) < 0.3] = EXPERTS
    return token_choice_plan(ids, torch.rand(num_tokens, top_k, generator=rng), EXPERTS, has_dropped_slots=dropped)


def bias_plan(rng, num_tokens=19):
    """A plan with dropped slots and an empty expert (expert 1), whose 38 slots are not a multiple of the bias
    kernels' 32-row tile."""
    ids = torch.randint(0, EXPERTS + 1, (num_tokens, 2), generator=rng)  # the id EXPERTS marks a dropped slot
    ids[ids == 1], ids[0, 1] = 0, EXPERTS
    return token_choice_plan(ids, torch.rand(num_tokens, 2, generator=rng), EXPERTS, has_dropped_slots=True)


@pytest.mark.parametrize("top_k, activation, conditional", [(2, "sigmoid", True), (1, "identity", False)],
                         ids=["conditional_top2_with_dropped_slots", "unconditional_top1"])
def test_route_prototypes_op_passes_opcheck(top_k, activation, conditional, rng):
    x, protos, cond = routing_inputs(rng)
    torch.library.opcheck(ops.route_prototypes.default, (x, protos, cond, top_k, activation, 2.0, conditional))


def test_prototype_scores_op_passes_opcheck(rng):
    x, protos, _ = routing_inputs(rng)
    torch.library.opcheck(ops.prototype_scores.default, (x, protos, "softmax", 3.0))


@pytest.mark.parametrize("dropped", [False, True], ids=["all_slots", "with_dropped_slots"])
def test_plan_ops_pass_opcheck(dropped, rng):
    ids_S = torch.randint(0, EXPERTS + int(dropped), (40,), generator=rng)  # the id EXPERTS marks a dropped slot
    torch.library.opcheck(ops.plan_histogram.default, (ids_S, EXPERTS))
    hist = ops.plan_histogram(ids_S, EXPERTS).long()
    counts = hist.sum(0)
    block_start = (counts.cumsum(0) - counts)[None, :] + hist.cumsum(0) - hist  # as the glue in kernels/plan.py
    torch.library.opcheck(ops.plan_scatter.default, (ids_S, block_start, EXPERTS, 2))


@pytest.mark.parametrize("dropped", [False, True], ids=["all_slots", "with_dropped_slots"])
def test_permute_and_combine_ops_pass_opcheck(dropped, rng):
    plan = plan_tensors(rng, dropped)
    end = plan.offsets_E1[-1:]
    num_slots = plan.token_index_S.numel()
    x = torch.randn(plan.num_tokens, DIM, generator=rng, requires_grad=True)
    out = torch.randn(num_slots, DIM, generator=rng, requires_grad=True)
    gates = plan.gates_S.clone().requires_grad_()
    torch.library.opcheck(ops.permute.default, (x, plan.token_index_S, plan.slot_NK, end))
    base = torch.randn(plan.num_tokens, DIM, generator=rng, requires_grad=True)  # the shared experts' output
    torch.library.opcheck(ops.combine.default, (out, gates, plan.token_index_S, plan.slot_NK, end, None))
    torch.library.opcheck(ops.combine.default, (out, gates, plan.token_index_S, plan.slot_NK, end, base))
    torch.library.opcheck(ops.combine.default, (out, None, plan.token_index_S, plan.slot_NK, end, None))  # permute's
    grad_y = torch.randn(plan.num_tokens, DIM, generator=rng)
    torch.library.opcheck(ops.combine_backward.default,
                          (grad_y, out.detach(), gates.detach(), plan.token_index_S, end))


@pytest.mark.parametrize("gelu", [True, False], ids=["bias_gelu", "bias"])
def test_expert_bias_ops_pass_opcheck(gelu, rng):
    plan = bias_plan(rng)
    num_slots = plan.token_index_S.numel()
    h = torch.randn(num_slots, HIDDEN, generator=rng, requires_grad=True)
    b = torch.randn(EXPERTS, HIDDEN, generator=rng, requires_grad=True)
    torch.library.opcheck(ops.expert_bias_act.default, (h, b, plan.offsets_E1, gelu))
    grad = torch.randn(num_slots, HIDDEN, generator=rng)
    if gelu:
        for with_activation in (True, False):  # the backward of the expert MLP makes its output again, or not
            torch.library.opcheck(ops.expert_bias_gelu_backward.default,
                                  (grad, h.detach(), b.detach(), plan.offsets_E1, with_activation))
    else:
        torch.library.opcheck(ops.expert_bias_backward.default, (grad, b.detach(), plan.offsets_E1))


def test_expert_token_sums_ops_pass_opcheck(rng):
    plan = bias_plan(rng)
    x = torch.randn(plan.num_tokens, HIDDEN, generator=rng, requires_grad=True)
    routed = EXPERTS - 1  # the last expert left out, as the unconditional expert is from the centroids
    torch.library.opcheck(ops.expert_token_sums.default,
                          (x, plan.token_index_S, plan.offsets_E1, routed, plan.expert_index_S, plan.slot_NK))
    grad = torch.randn(routed, HIDDEN, generator=rng)
    torch.library.opcheck(ops.expert_token_sums_backward.default,
                          (grad, plan.expert_index_S, plan.slot_NK, plan.offsets_E1[-1:], x.dtype))


@pytest.mark.order_sensitive
def test_compile_traces_a_promoe_block_forward_and_backward_without_a_graph_break(rng):
    """One ProMoE DiT block (attention, conditional top-2 routing with dropped slots and an unconditional expert, the
    routing contrastive loss) on the triton backend, compiled whole (fullgraph: any graph break raises), matches
    eager in fp32 (the expert GEMMs trace through the promoe::grouped_mm op, whose fake takes fp32)."""
    model = promoe.build_model("ProMoE-S", depth=2, hidden_size=32, num_heads=2, input_size=8, experts="E6A2S1U1",
                               dispatch="triton")
    block = next(block for block in randomize_(model).blocks if block.is_moe).train()
    x = torch.randn(2, 16, 32, generator=rng)
    c = torch.randn(2, 32, generator=rng)
    labels = torch.tensor([3, model.config.num_classes])  # the second image's tokens go to the unconditional expert

    def step(run):
        block.zero_grad(set_to_none=True)
        x_in = x.clone().requires_grad_()
        y, aux = run(x_in, c, labels)
        loss = y.square().mean() + sum(aux.values())
        loss.backward()
        return [y, loss, x_in.grad, *(p.grad for p in block.parameters())]

    eager = step(block)
    compiled = step(torch.compile(block, fullgraph=True, backend="aot_eager"))
    # aot_eager runs AOTAutograd's decomposition of the block, whose ops may sum in another order: the block's sums
    # (adaLN, q/k/v, scores over the head dim, attention over 16 tokens, projection, the router's norms and cosines,
    # expert up and down, the combine, the loss's and the RCL's means), forward then backward, then a weight
    # gradient's over the 32 tokens.
    forward = (32, 32, 16, 16, 32, 32, 32, 32, 64, 4, x.numel(), 32)
    for got, expected in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, expected, **reordered_sums_tolerance(
            *forward, *forward, 32, magnitude=expected.abs().max().item()))
