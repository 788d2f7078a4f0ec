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
    "train_step": {"backend", "mode", "images_per_s", "speedup_vs_loop", "time_vs_dense"},
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


def test_gpu_check_stops_with_a_clear_message_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check would run")
    out = tmp_path / "gpu_check"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr and "nothing was run" in done.stderr
    assert not out.exists()


def test_gpu_check_report_reads_each_sections_files(tmp_path):
    """The parts of the GPU check that need no GPU: reading the sections' outputs and writing the table."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    (tmp_path / "kernel_tests.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="7" failures="1" errors="0" skipped="2"/></testsuites>')
    (tmp_path / "moe_layer_XL_bf16.json").write_text(json.dumps(
        {"results": [{"backend": "triton", "mode": "fwd", "tokens_per_s": 1.5e6, "host_syncs": 0}]}))
    record = dict(machine=dict(gpu="Some GPU", capability="9.0"), sections={})
    for name in ("kernel_tests", "moe_layer", "sampling"):
        record["sections"][name] = dict(status="ok", seconds=1.0, results=gpu_check.section_results(name, tmp_path))
    assert record["sections"]["kernel_tests"]["results"] == dict(tests=7, failures=1, errors=0, skipped=2)
    assert record["sections"]["sampling"]["results"] is None  # the section left nothing
    table = gpu_check.markdown(record)
    assert "Some GPU (sm_90)" in table and "| triton | fwd | 1.5e+06 | 0 |" in table
    assert set(gpu_check.section_commands(tmp_path)) == set(gpu_check.SECTION_LIMITS_S)
    assert sum(gpu_check.SECTION_LIMITS_S.values()) <= 8 * 60
