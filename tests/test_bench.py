"""Smoke test of the bench scripts: one tiny iteration each, and the JSON they write has the documented schema."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--overrides", "input_size=8", "hidden_size=64", "num_heads=4", "depth=2", "--reps", "1", "--warmup", "0"]
RECORD_KEYS = {
    "moe_layer": {"backend", "mode", "tokens_per_s", "speedup_vs_loop", "time_vs_dense", "host_syncs", "launches"},
    "train_step": {"backend", "mode", "images_per_s", "speedup_vs_loop", "time_vs_dense", "round_ratio_median",
                   "round_ratio_min", "round_ratio_q1", "round_ratio_q3", "round_ratio_max"},
}


@pytest.mark.parametrize("script, extra", [("moe_layer", ["--size", "S", "--tokens", "32"]),
                                           ("train_step", ["--model", "ProMoE-S", "--batch", "2"])])
def test_bench_script_writes_json_table_and_chart(script, extra, tmp_path):
    out = tmp_path / f"{script}.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / f"{script}.py"), *extra, *TINY, "--json", str(out)],
                   check=True, capture_output=True, cwd=ROOT)
    run = json.loads(out.read_text())
    assert {"machine", "config", "results"} <= set(run)
    assert {"torch", "triton", "threads"} <= set(run["machine"])
    assert run["results"] and all(set(record) == RECORD_KEYS[script] for record in run["results"])
    assert {r["backend"] for r in run["results"]} >= {"loop", "torch"}
    assert out.with_suffix(".md").read_text().startswith("###")
    assert out.with_suffix(".png").stat().st_size > 1000
    if script == "moe_layer":
        by_backend = {(r["backend"], r["mode"]): r for r in run["results"]}
        assert by_backend[("torch", "fwd+bwd")]["host_syncs"] == 0
        assert by_backend[("triton", "fwd+bwd")]["host_syncs"] == 0
        assert by_backend[("loop", "fwd+bwd")]["host_syncs"] > 0


def test_expert_parallel_bytes_break_even_where_the_table_says(tmp_path):
    """At `break_even_tokens` tokens per rank, FSDP2's bank bytes per token equal expert parallelism's; the JSON and
    the table are written."""
    sys.path.insert(0, str(ROOT / "bench"))
    import expert_parallel_bytes as bench

    from promoe.zoo import model_config

    rows = bench.table(world=8, tokens=8192, dropout=0.1)
    assert {(row["E"], row["ep"]) for row in rows} == {(e, ep) for e in (14, 32, 64) for ep in (2, 4, 8)}
    for row in rows:
        config = model_config("ProMoE-XL", experts=f"E{row['E']}A1S1U1")
        tokens = row["break_even_tokens"]
        per_token, per_step = bench.expert_parallel_bytes(config, 8, row["ep"], 0.1)
        fsdp = bench.fsdp_bank_bytes(config, 8)
        assert fsdp / tokens == pytest.approx(per_token + per_step / tokens, rel=1e-4)
    out = tmp_path / "bytes.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "expert_parallel_bytes.py"), "--json", str(out)],
                   check=True, capture_output=True, cwd=ROOT)
    assert json.loads(out.read_text())["results"] == rows
