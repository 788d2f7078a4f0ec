"""The `triton` backend's expert MLP (promoe.kernels.expert_mlp: grouped GEMMs with the gather, biases and GELU fused)
against the `torch` backend's `ExpertMLP`, the definition, under Triton's interpreter on the CPU: the output and the
gradients of x and of the four weights."""

import os

import pytest
import torch

import promoe.kernels.expert_mlp
from promoe.moe.dispatch import LoopBackend, TorchBackend, TritonBackend
from promoe.moe.experts import ExpertBank
from promoe.moe.plan import token_choice_plan
from tests.helpers import KERNEL_ROUTINGS, reordered_sums_tolerance

pytestmark = pytest.mark.order_sensitive  # two summation orders at derived tolerances (see pytest.ini)

DEFINITION, KERNELS = TorchBackend(), TritonBackend()
NUM_EXPERTS, DIM, HIDDEN = 5, 24, 40  # 40 and 24 columns: partial column blocks


ROUTINGS = KERNEL_ROUTINGS


@pytest.fixture(autouse=True)
def poisoned_gemm_outputs(monkeypatch, poisoned_outputs):
    """Kernel outputs (the GEMMs' and the combine's) start as NaN: an element a kernel forgets to write shows."""
    monkeypatch.setattr(promoe.kernels.expert_mlp, "empty_output",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


def make_case(routing, num_tokens, top_k, rng, dtype=torch.float32):
    ids = ROUTINGS[routing](num_tokens, NUM_EXPERTS, top_k, rng)
    plan = token_choice_plan(ids, torch.rand(ids.shape, generator=rng), NUM_EXPERTS, has_dropped_slots=True)
    bank = ExpertBank(NUM_EXPERTS, DIM, HIDDEN)
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=rng) * 0.3)
    x = torch.randn(num_tokens, DIM, generator=rng)
    # The combine hands the expert MLP zero gradient rows for dropped slots.
    upstream = torch.randn(num_tokens * top_k, DIM, generator=rng) * plan.valid_slots_S()[:, None]
    return plan, bank.to(dtype), x.to(dtype), upstream


def run(backend, bank, x, plan, upstream, permute=True):
    """[out, grad x, grad w_up, grad b_up, grad w_down, grad b_down] of the bank's expert MLP on x."""
    x = x.detach().requires_grad_()
    bank.zero_grad()
    out = bank(x, plan, backend, permute=permute)
    out.backward(upstream.to(out.dtype))
    return [out.detach(), x.grad, *(p.grad.clone() for p in bank.parameters())]


def tolerances(plan, top_k, expected):
    """The forward's sums (D, then H) for the output; for the gradients those and the backward's (H, then D) and a
    weight gradient's over one expert's slots, each magnitude the largest of what is compared."""
    slots = int(plan.counts_E.max()) if plan.counts_E.numel() else 0
    lengths = [(DIM, HIDDEN)] + [(DIM, HIDDEN, HIDDEN, DIM, max(slots, top_k))] * 5
    return [reordered_sums_tolerance(*n, magnitude=e.abs().max().item()) for n, e in zip(lengths, expected)]


def assert_matches(got, expected, tolerance_list):
    for name, a, b, tolerance in zip(["out", "x", "w_up", "b_up", "w_down", "b_down"], got, expected, tolerance_list):
        assert a.dtype == b.dtype, name
        assert not a.isnan().any(), name
        torch.testing.assert_close(a.double(), b.double(), **tolerance, msg=lambda m, name=name: f"{name}: {m}")


def reference(bank, x, plan, upstream, permute=True, reference_dtype=torch.float64):
    """The definition's ExpertMLP on a copy of the bank in reference_dtype: its steps as the torch backend runs them,
    float64 with the loop backend's GEMMs (grouped_mm has no float64)."""
    bank_ref = ExpertBank(NUM_EXPERTS, DIM, HIDDEN)
    bank_ref.load_state_dict(bank.state_dict())
    backend = LoopBackend() if reference_dtype == torch.float64 else DEFINITION
    return run(backend, bank_ref.to(reference_dtype), x.to(reference_dtype), plan, upstream, permute)


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_expert_mlp_kernels_match_the_definition_forward_and_backward(routing, top_k, rng):
    plan, bank, x, upstream = make_case(routing, 37, top_k, rng)  # 37 or 74 slots: not a multiple of a row tile
    got = run(KERNELS, bank, x, plan, upstream)
    assert (got[0][~plan.valid_slots_S()] == 0).all()  # dropped slots: zero rows
    for reference_dtype in (torch.float64, torch.float32):
        expected = reference(bank, x, plan, upstream, reference_dtype=reference_dtype)
        assert_matches(got, [e.float() for e in expected], tolerances(plan, top_k, expected))


def test_expert_mlp_kernels_on_rows_already_in_slot_order(rng):
    """Expert parallelism's call (permute=False): no gather; the gradient stays per slot, zero for dropped slots."""
    plan, bank, x, upstream = make_case("dropped_slots", 37, 2, rng)
    x_SD = x[plan.token_index_S] * plan.valid_slots_S()[:, None]
    got = run(KERNELS, bank, x_SD, plan, upstream, permute=False)
    expected = reference(bank, x_SD, plan, upstream, permute=False)
    assert (got[1][~plan.valid_slots_S()] == 0).all()
    assert_matches(got, [e.float() for e in expected], tolerances(plan, 2, expected))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_expert_mlp_kernels_in_half_precision_match_the_definition(dtype, rng):
    """Both round each GEMM's output to the half dtype; where an fp32 sum lands on the other side of a rounding, an
    intermediate differs by one half ulp, and each term of a later sum by that much: the reordered sums' bound with
    the half dtype's eps."""
    plan, bank, x, upstream = make_case("dropped_slots", 37, 2, rng, dtype)
    got = run(KERNELS, bank, x, plan, upstream)
    expected = reference(bank, x, plan, upstream, reference_dtype=dtype)
    assert all(g.dtype == dtype for g in got)
    slots = int(plan.counts_E.max())
    lengths = [(DIM, HIDDEN)] + [(DIM, HIDDEN, HIDDEN, DIM, slots)] * 5
    assert_matches(got, expected, [reordered_sums_tolerance(*n, magnitude=e.abs().max().item(), dtype=dtype)
                                   for n, e in zip(lengths, expected)])


def test_expert_mlp_kernels_under_bfloat16_autocast_with_float32_weights(rng):
    """The GEMMs in bf16 (tiles cast as they load), the output in fp32 (bf16 + the fp32 bias), the gradients in
    their inputs' dtype (fp32), as the definition under autocast."""
    plan, bank, x, upstream = make_case("random", 37, 2, rng)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(KERNELS, bank, x, plan, upstream)
        expected = reference(bank, x, plan, upstream, reference_dtype=torch.float32)
    slots = int(plan.counts_E.max())
    lengths = [(DIM, HIDDEN)] + [(DIM, HIDDEN, HIDDEN, DIM, slots)] * 5
    assert all(g.dtype == torch.float32 for g in got)
    assert_matches(got, expected, [reordered_sums_tolerance(*n, magnitude=e.abs().max().item(), dtype=torch.bfloat16)
                                   for n, e in zip(lengths, expected)])


def test_expert_mlp_kernels_with_no_slots_give_zero_weight_gradients(rng):
    plan, bank, _, _ = make_case("one_expert_takes_all", 0, 1, rng)
    got = run(KERNELS, bank, torch.zeros(0, DIM), plan, torch.zeros(0, DIM))
    assert got[0].shape == (0, DIM) and got[1].shape == (0, DIM)
    assert all((g == 0).all() for g in got[2:])


def test_expert_mlp_ops_pass_opcheck(rng):
    plan, bank, x, upstream = make_case("dropped_slots", 9, 2, rng)
    ops = promoe.kernels.expert_mlp
    h = torch.randn(18, HIDDEN, generator=rng)
    offsets = plan.offsets_E1
    torch.library.opcheck(ops._rows_gemm_op, (x, plan.token_index_S, bank.w_up_EDH.detach(), offsets, None, None,
                                              None, torch.float32, torch.float32))
    torch.library.opcheck(ops._rows_gemm_op, (upstream, None, bank.w_down_EHD.detach().transpose(1, 2), offsets,
                                              None, bank.b_up_EH.detach(), h, torch.float32, torch.float32))
    torch.library.opcheck(ops._weight_grad_op, (h, None, bank.b_up_EH.detach(), upstream, offsets, torch.float32,
                                                torch.float32, torch.float32))


def test_fp32_gemms_use_tf32_only_where_torch_allows_it_for_its_matmuls():
    switches = promoe.kernels.expert_mlp.dot_switches
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert switches(torch.float32)["PRECISION"] == "ieee"
        torch.set_float32_matmul_precision("high")
        assert switches(torch.float32)["PRECISION"] == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    assert switches(torch.bfloat16)["NATIVE"] is not interpreted  # the interpreter's half dots are wrong
