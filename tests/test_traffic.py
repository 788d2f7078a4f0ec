"""The bench's byte accounting (bench/traffic.py) on cases whose bytes are known by hand."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import traffic  # noqa: E402

from promoe.kernels.permute import permute  # noqa: E402


def test_aten_ops_are_charged_inputs_plus_outputs_and_views_nothing(rng):
    a, b = torch.randn(10, 30, generator=rng), torch.randn(10, 30, generator=rng)
    w = torch.randn(30, 4, generator=rng)
    with traffic.TrafficCounter() as counter:
        c = a + b  # reads 2 x 300 floats, writes 300
        d = c.view(30, 10).t()  # views: nothing
        e = d @ w  # GEMM: 300 + 120 read, 40 written
        c.mul_(2.0)  # in place: reads and writes c
        counter.phase = "bwd"
        f = e.sum(0, keepdim=True).expand(10, 4) * 3  # the stride-0 operand spans 4 floats, not 40
    assert f.shape == (10, 4)
    items = {key: value for key, value in counter.items.items()}
    assert items[("fwd", "aten", "add")] == [3 * 300 * 4, 1]
    assert items[("fwd", "gemm", "mm")] == [(300 + 120 + 40) * 4, 1]
    assert items[("fwd", "aten", "mul_")] == [2 * 300 * 4, 1]
    assert items[("bwd", "aten", "sum")] == [(40 + 4) * 4, 1]
    assert items[("bwd", "aten", "mul")] == [(4 + 40) * 4, 1]
    assert not any(name in ("view", "t", "expand") for _, _, name in items)
    assert counter.total("aten") == (900 + 600 + 44 + 44) * 4 and counter.total("gemm") == 460 * 4


def test_a_triton_launch_is_charged_its_tensor_arguments_under_its_name(rng):
    x = torch.randn(50, 24, generator=rng)
    token_S = torch.randint(0, 50, (70,), generator=rng)
    slot_NK = torch.zeros(50, 1, dtype=torch.long)  # saved for backward only
    end = torch.tensor([60])
    with traffic.TrafficCounter() as counter, traffic.TritonArgumentBytes(counter):
        permute(x, token_S, slot_NK, end)
    # the kernel reads x, the token index and end, writes the [70, 24] rows; nothing else runs
    assert dict(counter.items) == {("fwd", "triton", "permute_kernel"): [(50 * 24 + 70 * 24) * 4 + 70 * 8 + 8, 1]}


def test_the_aten_ops_inside_a_promoe_custom_op_are_charged_and_the_op_itself_is_not(rng):
    from promoe.kernels.routing import route_prototypes

    x, protos = torch.randn(50, 24, generator=rng), torch.randn(5, 24, generator=rng)
    with traffic.TrafficCounter() as counter, traffic.TritonArgumentBytes(counter):
        route_prototypes(x, protos, torch.ones(50, dtype=torch.bool), 1)
    # the op casts the conditional mask to int8 for the kernel: 50 bools read, 50 bytes written
    assert counter.items[("fwd", "aten", "to")] == [50 + 50, 1]
    assert ("fwd", "triton", "route_kernel") in counter.items
    assert not any(name.startswith("promoe::") for _, _, name in counter.items)


def test_floor_formula_by_hand():
    # K = 1, D = 4, fp32: 11 rows of 16 bytes, plus the plan: 2 (8 + 4) + 4 (16 + 4) = 104 bytes, per token
    assert traffic.nongemm_floor(3, 4, 1, 4) == 3 * (11 * 16 + 104)
    # K = 2: 17 rows; plan 4 * 12 + 8 * 20; bias + GELU standalone: 5 (2 * 8 + 6) * 4 bytes
    assert traffic.nongemm_floor(1, 4, 2, 4, 8, 6) == 17 * 16 + 48 + 160 + 5 * 22 * 4


@pytest.mark.parametrize("backends", [["torch", "triton"]])
def test_traffic_script_counts_a_tiny_promoe_layer_forward_and_backward(backends, tmp_path, capsys):
    out = tmp_path / "traffic.json"
    traffic.main(["--model", "ProMoE-S", "--tokens", "32", "--overrides", "hidden_size=32", "num_heads=4",
                  "input_size=8", "--backend", *backends, "--top", "60", "--json", str(out)])
    run = json.loads(out.read_text())
    rows = {r["backend"]: r for r in run["results"]}
    assert set(rows) == set(backends)
    for row in rows.values():
        assert row["host_syncs"] == 0 and row["gemm_kb_per_token"] > 0
        assert row["nongemm_vs_floor"] > row["nongemm_vs_floor_standalone"] > 0.5  # no op escapes the count
        assert row["fwd_nongemm_kb_per_token"] + row["bwd_nongemm_kb_per_token"] == pytest.approx(
            row["nongemm_kb_per_token"])
    assert rows["torch"]["triton_kb_per_token"] == 0 and rows["triton"]["triton_kb_per_token"] > 0
    assert {item["kind"] for item in run["largest_items"]["triton"]} >= {"triton", "aten"}
    assert "Largest non-GEMM items" in out.with_suffix(".md").read_text()
