"""The `loop` (paper's Algorithm 1), `torch` (grouped_mm) and `triton` (kernels, interpreted on the CPU) backends
compute the same outputs and gradients."""

import os

import pytest
import torch

import promoe
from promoe.moe.dispatch import RouterSpec, make_backend
from promoe.moe.experts import ExpertBank, grouped_mm
from promoe.moe.plan import token_choice_plan
from promoe.moe.routing import DEFINITIONS, RoutingOps, route_prototypes
from tests.helpers import reordered_sums_tolerance

pytestmark = pytest.mark.order_sensitive  # two summation orders at derived tolerances (see pytest.ini)

DIM, HIDDEN = 16, 24  # grouped_mm needs rows of a multiple of 16 bytes


def make_bank(num_experts, rng, dtype=torch.float32):
    bank = ExpertBank(num_experts, DIM, HIDDEN)
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=rng) * 0.3)
    return bank.to(dtype)


def reference_float64(x_ND, expert_ids_NK, gates_NK, bank):
    """y[n] = sum_k gates[n, k] * expert_{ids[n, k]}(x[n]) in float64, one token at a time; ids == E are skipped."""
    w_up, b_up, w_down, b_down = (p.detach().double() for p in bank.parameters())
    y = torch.zeros(x_ND.shape, dtype=torch.float64)
    for n in range(x_ND.shape[0]):
        for e, g in zip(expert_ids_NK[n].tolist(), gates_NK[n].double()):
            if e < bank.num_experts:
                h = torch.nn.functional.gelu(x_ND[n].double() @ w_up[e] + b_up[e], approximate="tanh")
                y[n] += g * (h @ w_down[e] + b_down[e])
    return y


def run_backend(backend, x_ND, expert_ids_NK, gates_NK, bank, has_dropped):
    x = x_ND.clone().requires_grad_()
    gates = gates_NK.clone().requires_grad_()
    bank.zero_grad()
    plan = token_choice_plan(expert_ids_NK, gates, bank.num_experts, has_dropped_slots=has_dropped)
    y = make_backend(backend).dispatch(x, plan, bank)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype))
    return y.detach(), x.grad, gates.grad, [p.grad.clone() for p in bank.parameters()]


ROUTINGS = {
    "random": lambda n, e, k, g: torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)]),
    "empty_experts": lambda n, e, k, g: torch.stack([torch.randperm(k, generator=g) for _ in range(n)]),
    "one_expert_takes_all": lambda n, e, k, g: torch.full((n, k), e - 1),
    "with_dropped_slots": lambda n, e, k, g: torch.where(torch.rand(n, k, generator=g) < 0.3, e,
                                                         torch.randint(0, e, (n, k), generator=g)),
}


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("num_tokens", [1, 29])
def test_all_backends_match_reference_and_each_other(routing, top_k, num_tokens, rng):
    num_experts = 5
    bank = make_bank(num_experts, rng)
    x = torch.randn(num_tokens, DIM, generator=rng)
    ids = ROUTINGS[routing](num_tokens, num_experts, top_k, rng)
    gates = torch.rand(num_tokens, top_k, generator=rng) + 0.1
    has_dropped = routing == "with_dropped_slots"
    expected = reference_float64(x, ids, gates, bank)
    # fp32 against float64: the forward's sums (up, down, the top-k combine); the gradients of two backends: those
    # and the backward's, chained, then a weight gradient's over the tokens. Each backend groups them its own way.
    forward = (DIM, HIDDEN, top_k)
    output_tolerance = reordered_sums_tolerance(*forward, magnitude=expected.abs().max().item())
    loop = run_backend("loop", x, ids, gates, bank, has_dropped)
    torch.testing.assert_close(loop[0].double(), expected, **output_tolerance)
    for backend in ("torch", "triton"):
        other = run_backend(backend, x, ids, gates, bank, has_dropped)
        torch.testing.assert_close(other[0].double(), expected, **output_tolerance)
        for a, b in zip(loop[1:3] + tuple(loop[3]), other[1:3] + tuple(other[3])):
            assert torch.isfinite(b).all()
            torch.testing.assert_close(a, b, **reordered_sums_tolerance(*forward, *forward, num_tokens,
                                                                        magnitude=a.abs().max().item()))


def test_backends_agree_in_bfloat16(rng):
    bank = make_bank(4, rng, torch.bfloat16)
    x = torch.randn(40, DIM, generator=rng).bfloat16()
    ids = torch.randint(0, 4, (40, 2), generator=rng)
    gates = torch.rand(40, 2, generator=rng).bfloat16()
    expected = reference_float64(x, ids, gates, bank)
    for backend in ("loop", "torch", "triton"):
        y = run_backend(backend, x, ids, gates, bank, False)[0]
        # bf16 keeps 8 bits of mantissa; two bf16 GEMMs with fp32 accumulation stay within a few ulps.
        torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2)


def test_grouped_mm_backward_accepts_a_gradient_with_zero_strides(rng):
    x = torch.randn(12, DIM, generator=rng, requires_grad=True)
    w = torch.randn(3, DIM, HIDDEN, generator=rng, requires_grad=True)
    ends = torch.tensor([5, 5, 12], dtype=torch.int32)
    grouped_mm(x, w, ends).sum().backward()  # .sum() hands back an expanded (zero-stride) gradient
    expected_x = torch.cat([w[0].sum(1).expand(5, -1), w[2].sum(1).expand(7, -1)])
    # A GEMM's sums over HIDDEN against .sum(1)'s: another order.
    torch.testing.assert_close(x.grad, expected_x.detach(), **reordered_sums_tolerance(
        HIDDEN, magnitude=expected_x.abs().max().item()))


@pytest.mark.parametrize("backend", ["loop", "torch", "triton"])
def test_every_backend_adds_the_base_as_it_combines(backend, rng):
    """dispatch(x, plan, bank, base) = dispatch(x, plan, bank) + base, and base's gradient is the output's."""
    bank = make_bank(4, rng)
    x = torch.randn(29, DIM, generator=rng)
    ids = torch.where(torch.rand(29, 2, generator=rng) < 0.2, 4, torch.randint(0, 4, (29, 2), generator=rng))
    plan = token_choice_plan(ids, torch.rand(29, 2, generator=rng), bank.num_experts, has_dropped_slots=True)
    base = torch.randn(29, DIM, generator=rng, requires_grad=True)
    y = make_backend(backend).dispatch(x, plan, bank, base)
    without_base = make_backend(backend).dispatch(x, plan, bank)
    # The combine adds a token's 2 slots to the base, against their sum then the base: 3 terms in another order.
    torch.testing.assert_close(y, without_base + base, **reordered_sums_tolerance(
        3, magnitude=without_base.abs().max().item() + base.abs().max().item()))
    upstream = torch.randn(y.shape, generator=rng)
    assert torch.equal(torch.autograd.grad(y, base, upstream)[0], upstream)


def grouped_mm_reference(x_SA, w_EAB, ends_E):
    """Each expert's rows times its weight in float64, one expert at a time; rows past the last end are 0."""
    out = torch.zeros(x_SA.shape[0], w_EAB.shape[2], dtype=torch.float64)
    starts = [0, *ends_E.tolist()[:-1]]
    for e, (start, end) in enumerate(zip(starts, ends_E.tolist())):
        out[start:end] = x_SA[start:end].double() @ w_EAB[e].double()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # grouped_mm's dtypes
def test_grouped_mm_op_matches_per_expert_matmuls_forward_and_backward(dtype, rng):
    """An empty expert (1), one expert with most rows, and 3 rows past the last end (a dropped slot's rows):
    their output and x-gradient rows are unspecified, and they must not reach the weight gradients."""
    ends = torch.tensor([4, 4, 17, 18], dtype=torch.int32)
    x = torch.randn(21, DIM, generator=rng).to(dtype).requires_grad_()
    w = torch.randn(4, DIM, HIDDEN, generator=rng).to(dtype).requires_grad_()
    grad = torch.randn(21, HIDDEN, generator=rng).to(dtype)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (grouped_mm_reference(x64, w64, ends) * grad.double()).sum().backward()
    y = grouped_mm(x, w, ends)
    y.backward(grad)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    kept = slice(0, 18)
    torch.testing.assert_close(y[kept].double(), grouped_mm_reference(x, w, ends)[kept], **tol)
    torch.testing.assert_close(x.grad[kept].double(), x64.grad[kept], **tol)
    torch.testing.assert_close(w.grad.double(), w64.grad, **tol)
    assert torch.equal(w.grad[1], torch.zeros_like(w.grad[1]))  # the empty expert


def test_grouped_mm_runs_in_the_autocast_dtype_and_hands_fp32_gradients_to_fp32_weights(rng):
    ends = torch.tensor([4, 4, 17], dtype=torch.int32)
    x = torch.randn(17, DIM, generator=rng, requires_grad=True)
    w = torch.randn(3, DIM, HIDDEN, generator=rng, requires_grad=True)
    grad = torch.randn(17, HIDDEN, generator=rng)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_mm(x, w, ends)
    assert y.dtype == torch.bfloat16
    y.backward(grad.bfloat16())
    assert x.grad.dtype == w.grad.dtype == torch.float32
    x16, w16 = x.detach().bfloat16().double().requires_grad_(), w.detach().bfloat16().double().requires_grad_()
    expected = grouped_mm_reference(x16, w16, ends)
    (expected * grad.bfloat16().double()).sum().backward()
    tol = dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(y.double(), expected, **tol)
    torch.testing.assert_close(x.grad.double(), x16.grad, **tol)
    torch.testing.assert_close(w.grad.double(), w16.grad, **tol)


def test_grouped_mm_ops_pass_opcheck(rng):
    ends = torch.tensor([5, 5, 12], dtype=torch.int32)
    x = torch.randn(12, DIM, generator=rng, requires_grad=True)
    w = torch.randn(3, DIM, HIDDEN, generator=rng, requires_grad=True)
    torch.library.opcheck(torch.ops.promoe.grouped_mm.default, (x, w, ends))
    grad = torch.randn(12, HIDDEN, generator=rng)
    torch.library.opcheck(torch.ops.promoe.grouped_mm_weight_grad.default, (x.detach(), grad, ends))


def test_compile_traces_the_torch_backend_in_fp32_without_a_graph_break(rng):
    """PyTorch's fake `_grouped_mm` (torch 2.13) takes bf16 only; the promoe::grouped_mm op's fake takes fp32."""
    bank = make_bank(4, rng)
    x = torch.randn(29, DIM, generator=rng)
    ids = torch.where(torch.rand(29, 2, generator=rng) < 0.2, 4, torch.randint(0, 4, (29, 2), generator=rng))
    gates = torch.rand(29, 2, generator=rng)
    backend = make_backend("torch")

    def run(x_ND):
        plan = token_choice_plan(ids, gates, bank.num_experts, has_dropped_slots=True)
        return backend.dispatch(x_ND, plan, bank)

    def step(fn):
        bank.zero_grad()
        x_in = x.clone().requires_grad_()
        y = fn(x_in)
        y.square().sum().backward()
        return [y, x_in.grad, *(p.grad.clone() for p in bank.parameters())]

    # aot_eager runs AOTAutograd's decomposition of the same maths, whose ops may sum in another order: the
    # forward's and the backward's chained, then a weight gradient's over the slots.
    forward = (DIM, HIDDEN, 2)
    for got, expected in zip(step(torch.compile(run, fullgraph=True, backend="aot_eager")), step(run), strict=True):
        torch.testing.assert_close(got, expected, **reordered_sums_tolerance(
            *forward, *forward, 2 * 29, magnitude=expected.abs().max().item()))


def test_context_manager_sets_every_layer_for_the_block_and_rejects_unknown_names(rng):
    from promoe.moe.dispatch import default_backend_name
    from promoe.moe.layer import describe_dispatch

    model = promoe.build_model("ProMoE-S", depth=4, hidden_size=32, num_heads=2, input_size=8, dispatch="torch")
    layers = [block.mlp for block in model.blocks if hasattr(block.mlp, "router")]
    assert len(layers) == 2 and describe_dispatch(model) == "torch"
    with promoe.dispatch_backend(model, "loop"):
        assert [layer.backend.name for layer in layers] == ["loop", "loop"]
    assert [layer.backend.name for layer in layers] == ["torch", "torch"]
    assert default_backend_name(torch.device("cpu")) == "torch"
    assert default_backend_name(torch.device("cuda")) == "triton"
    with pytest.raises(ValueError, match="unknown dispatch backend"):
        with promoe.dispatch_backend(model, "cuda-magic"):
            pass


def test_every_backend_named_in_the_config_exists():
    from promoe.config import ACTIVATIONS, BACKENDS
    from promoe.moe.dispatch import BACKEND_CLASSES
    from promoe.moe.routing import ACTIVATION_FUNCTIONS

    assert tuple(BACKEND_CLASSES) == BACKENDS and tuple(ACTIVATION_FUNCTIONS) == ACTIVATIONS


def loop_gmm(x_TD, w_EDH, batch_sizes_E):
    """A stand-in with grouped_gemm's gmm contract (bf16, batch sizes on the CPU), to test our side of the backend."""
    assert batch_sizes_E.device.type == "cpu" and int(batch_sizes_E.sum()) == x_TD.shape[0]
    assert x_TD.dtype == w_EDH.dtype == torch.bfloat16
    starts = [0, *torch.cumsum(batch_sizes_E, 0).tolist()]
    return torch.cat([x_TD[a:b] @ w_EDH[e] for e, (a, b) in enumerate(zip(starts, starts[1:]))])


@pytest.mark.parametrize("routing", ["random", "with_dropped_slots", "empty_experts"])
def test_grouped_gemm_backend_wiring_matches_loop_with_a_stand_in_gmm(routing, monkeypatch, rng):
    from promoe.moe import dispatch as dispatch_module

    monkeypatch.setattr(dispatch_module, "grouped_gemm_gmm", lambda: loop_gmm)
    bank = make_bank(5, rng, torch.bfloat16)
    x = torch.randn(23, DIM, generator=rng).bfloat16()
    ids = ROUTINGS[routing](23, 5, 2, rng)
    gates = torch.rand(23, 2, generator=rng)
    has_dropped = routing == "with_dropped_slots"
    for a, b in zip(run_backend("loop", x, ids, gates, bank, has_dropped),
                    run_backend("grouped_gemm", x, ids, gates, bank, has_dropped)):
        for got, expected in zip(b if isinstance(b, list) else [b], a if isinstance(a, list) else [a]):
            # the same bf16 products per expert; sums of a few bf16 terms may round apart by an ulp
            torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_grouped_gemm_backend_runs_float32_weights_under_bfloat16_autocast(monkeypatch, rng):
    from promoe.moe import dispatch as dispatch_module

    monkeypatch.setattr(dispatch_module, "grouped_gemm_gmm", lambda: loop_gmm)
    bank = make_bank(4, rng)
    x = torch.randn(30, DIM, generator=rng)
    ids = ROUTINGS["random"](30, 4, 1, rng)
    gates = torch.rand(30, 1, generator=rng)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run_backend("grouped_gemm", x, ids, gates, bank, False)[0]
        # Only the GEMMs differ from the torch backend: the bias steps and the combine are the same definition.
        assert y.dtype == run_backend("torch", x, ids, gates, bank, False)[0].dtype
    torch.testing.assert_close(y.double(), reference_float64(x, ids, gates, bank), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_gemm_backend_refuses_other_dtypes_naming_the_way_out(dtype, rng):
    bank = make_bank(2, rng, dtype)
    with pytest.raises(TypeError, match=r"bf16 only .* choose the `triton` or `torch` backend"):
        run_backend("grouped_gemm", torch.randn(4, DIM).to(dtype), torch.zeros(4, 1, dtype=torch.long),
                    torch.ones(4, 1), bank, False)


def test_grouped_gemm_backend_says_how_to_install_it_when_missing(rng):
    try:
        import grouped_gemm  # noqa: F401
        pytest.skip("grouped_gemm is installed here")
    except ImportError:
        pass
    bank = make_bank(2, rng, torch.bfloat16)
    with pytest.raises(ImportError, match=r"grouped_gemm package .* pip install \"\.\[gpu\]\""):
        run_backend("grouped_gemm", torch.randn(4, DIM).bfloat16(), torch.zeros(4, 1, dtype=torch.long),
                    torch.ones(4, 1), bank, False)


def make_promoe_layer(dim, num_routed, top_k, rng):
    """A ProMoE MoE layer (prototype router with conditional routing, unconditional and shared experts)."""
    from promoe.moe.layer import MoELayer
    from promoe.moe.routers import PrototypeRouter, PrototypeScorer

    layer = MoELayer(PrototypeRouter(PrototypeScorer(dim, num_routed), num_routed, top_k, conditional=True),
                     num_routed + 1, dim, 2 * dim, dim, top_k, null_label=10)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=rng) * 0.3)
    return layer.eval()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_a_nan_image_leaves_the_other_images_rows_untouched(backend, top_k, rng):
    """Routing, plan, experts and combine keep a NaN image's tokens in their own rows: the other images' outputs
    and input gradients equal those of the same batch with the NaN image replaced by a finite one."""
    layer = make_promoe_layer(DIM, 6, top_k, rng)
    labels = torch.tensor([3, 10, 5, 1])  # one null-label image (its tokens go to the unconditional expert)
    x = torch.randn(4, 20, DIM, generator=rng)
    broken = x.clone()
    broken[2] = float("nan")
    others = [0, 1, 3]
    with promoe.dispatch_backend(layer, backend):
        results = []
        for batch in (x, broken):
            batch = batch.clone().requires_grad_()
            y, _ = layer(batch, labels)
            y[others].sum().backward()
            results.append((y.detach(), batch.grad))
    (y, grad), (y_broken, grad_broken) = results
    assert y_broken[2].isnan().all()  # the NaN travels honestly in its own rows
    assert torch.isfinite(y_broken[others]).all() and torch.isfinite(grad_broken[others]).all()
    # The NaN image's tokens go to other experts, so the other rows meet GEMMs of other shapes, which may sum in
    # another order: the router's (norms, cosines) and the experts' (up, down, the combine of top-k, the shared and
    # the unconditional) sums, forward then backward.
    sums = (DIM, DIM, DIM, 2 * DIM, top_k + 2)
    torch.testing.assert_close(y_broken[others], y[others], **reordered_sums_tolerance(
        *sums, magnitude=y[others].abs().max().item()))
    torch.testing.assert_close(grad_broken[others], grad[others], **reordered_sums_tolerance(
        *sums, *sums, magnitude=grad[others].abs().max().item()))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gates_stay_float32_in_the_plan_of_a_bfloat16_layer(backend, rng):
    """Routing is fp32 by design; the gates reach the combine in fp32 whatever the activations' dtype."""
    layer = make_promoe_layer(DIM, 6, 2, rng).to(torch.bfloat16)
    x = torch.randn(40, DIM, generator=rng).bfloat16()
    cond = torch.rand(40, generator=rng) > 0.2
    with promoe.dispatch_backend(layer, backend):
        choice = layer.router(x, cond, torch.tensor([3, 5]), layer.backend.routing)
        plan = layer.backend.token_choice_plan(choice.expert_ids_NK, choice.gates_NK, layer.experts.num_experts,
                                               layer.router.has_dropped_slots)
    assert plan.gates_S.dtype == torch.float32
    scores = torch.nn.functional.normalize(x.float(), dim=-1) @ torch.nn.functional.normalize(
        layer.router.scorer.prototypes.float(), dim=-1).t()
    routed = plan.valid_slots_S() & (plan.expert_index_S < 6)
    expected = scores[plan.token_index_S[routed], plan.expert_index_S[routed]]
    # Not rounded to bf16: the router's norms and cosine (sums over DIM) in fp32, maybe in another order.
    torch.testing.assert_close(plan.gates_S[routed], expected, **reordered_sums_tolerance(DIM, DIM, magnitude=1.0))


@pytest.mark.parametrize("backend", ["loop", "torch", "triton"])
def test_bfloat16_combine_multiplies_by_the_float32_gates(backend, rng):
    bank = make_bank(4, rng, torch.bfloat16)
    x = torch.randn(40, DIM, generator=rng).bfloat16()
    ids = torch.randint(0, 4, (40, 1), generator=rng)
    gates = torch.rand(40, 1, generator=rng) * 0.1 + 1  # 1 + a fraction that bf16 would round to 1/128
    plan = token_choice_plan(ids, gates, 4)
    with torch.no_grad():
        y = make_backend(backend).dispatch(x, plan, bank)
        unit = make_backend(backend).dispatch(x, token_choice_plan(ids, torch.ones_like(gates), 4), bank)
    expected = (unit.float() * gates).bfloat16()  # one rounding, of the fp32 product
    # Triton's interpreter truncates on the fp32 -> bf16 store where a GPU rounds to nearest: one ulp (2^-7) there.
    interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    torch.testing.assert_close(y, expected, rtol=2**-7 if interpreted else 0, atol=0)


def test_row_gather_backward_is_bitwise_repeatable_on_a_multithreaded_cpu():
    # The dispatch gathers expert biases (and token rows) per slot; the backward of plain `table[index]` sums the
    # repeated rows with atomics across threads, which made two identical training runs drift apart.
    from promoe.moe.plan import gather_rows

    generator = torch.Generator().manual_seed(0)
    table = torch.randn(8, 384, generator=generator).requires_grad_()
    index = torch.randint(0, 8, (3136,), generator=generator)
    upstream = torch.randn(3136, 384, generator=generator)
    grads = []
    for _ in range(10):
        table.grad = None
        gather_rows(table, index).backward(upstream)
        grads.append(table.grad.clone())
    assert all(torch.equal(grad, grads[0]) for grad in grads[1:])
    expected = torch.zeros(8, 384).index_add(0, index, upstream)
    # Each row sums the upstream rows of its index, index_add in another order than gather_rows's backward.
    torch.testing.assert_close(grads[0], expected, **reordered_sums_tolerance(
        int(torch.bincount(index).max()), magnitude=expected.abs().max().item()))


TRITON_TABLES = {  # router -> (steps run by their kernel, steps run by the definition), of those named
    "promoe-top2": (RouterSpec(True, 6, 2), {"route_prototypes", "prototype_scores", "permute", "expert_token_sums",
                                             "gemm"}, set()),
    "128-prototypes": (RouterSpec(True, 128, 1), {"permute", "combine"}, {"route_prototypes", "prototype_scores"}),
    "top-8": (RouterSpec(True, 16, 8), {"prototype_scores"}, {"route_prototypes"}),
    "expert-choice": (RouterSpec(False, 6), {"prototype_scores", "expert_bias"},
                      {"route_prototypes", "token_choice_plan", "permute", "combine", "expert_token_sums", "gemm"}),
    "linear-gate": (RouterSpec(True), {"token_choice_plan", "permute"}, {"route_prototypes", "prototype_scores"}),
}


@pytest.mark.parametrize("router", TRITON_TABLES)
def test_the_triton_backend_runs_each_step_as_its_table_says_and_describe_prints_that_table(router):
    spec, kernels, definitions = TRITON_TABLES[router]
    backend = make_backend("triton", spec)
    assert {name for name in kernels | definitions if backend.steps[name].kernel} == kernels
    for name in ("route_prototypes", "prototype_scores", "expert_token_sums"):  # the router's ops follow the table
        assert (getattr(backend.routing, name) is not getattr(DEFINITIONS, name)) == backend.steps[name].kernel
    kernels_said, definitions_said = backend.describe().removeprefix("triton (kernels: ").split("; definitions: ")
    assert kernels_said.split(", ") == [name for name, step in backend.steps.items() if step.kernel]
    assert definitions_said == "; ".join(f"{name} ({step.why})" for name, step in backend.steps.items()
                                         if not step.kernel) + ")"


def test_a_layer_hands_its_router_the_routing_of_the_backend_it_runs(rng):
    """Chosen with the backend, passed in the forward that runs: the router keeps no routing functions of its own."""
    import promoe.kernels.routing

    layer = make_promoe_layer(DIM, 6, 2, rng)
    with promoe.dispatch_backend(layer, "triton"):
        assert layer.backend.routing.route_prototypes is promoe.kernels.routing.route_prototypes
    assert layer.backend.routing is DEFINITIONS and not hasattr(layer.router, "ops")
    calls = []

    def recorded(*args):
        calls.append(args[0].shape)
        return route_prototypes(*args)

    layer.backend.routing = RoutingOps(route_prototypes=recorded)
    layer(torch.randn(2, 5, DIM, generator=rng), torch.tensor([1, 10]))
    assert calls == [(10, DIM)]
