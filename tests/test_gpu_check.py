"""bench/gpu_check.py without a GPU: its plumbing (section runner, limits, the three files, the tables, the PYTHONPATH
shim) with stand-in section commands."""

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def writes(path: Path, text: str) -> list[str]:
    """A stand-in section that leaves a file, as a real one leaves its results."""
    return python(f"open({str(path)!r}, 'w').write({text!r})")


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a killed orphan may wait to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


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


def test_sections_run_within_their_limits_and_an_overrun_is_killed_with_its_children(tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    setup = {"gpu": "Stand-in GPU", "capability": "9.0", "torch": "2.11.0", "triton": "3.6.0", "missing": []}
    junit = ('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
             '<testcase classname="tests.test_a" name="test_ok"/>'
             '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
             '</testsuite></testsuites>')
    rows = [{"backend": "triton", "mode": "fwd", "tokens_per_s": 1.5e6, "host_syncs": 0}]
    grandchild_pid = tmp_path / "grandchild.pid"
    commands = {
        "setup": writes(work / "setup.json", json.dumps({"results": setup})),
        "kernel_tests": writes(work / "kernel_tests.xml", junit),
        "moe_layer": writes(work / "moe_layer.json", json.dumps({"results": rows})),
        "host_syncs": python("import sys; print('a CUDA error, say'); sys.exit(3)"),
        "train_step": python("import subprocess, sys, time; "
                             "child = subprocess.Popen(['sleep', '60']); "
                             f"open({str(grandchild_pid)!r}, 'w').write(str(child.pid)); "
                             "print('started', flush=True); time.sleep(60)"),
    }
    limits = dict(gpu_check.SECTION_LIMITS_S, train_step=3)
    start = time.monotonic()
    record = gpu_check.run_check(commands, limits, out, work, dict(os.environ), total_s=120)
    assert time.monotonic() - start < 30  # the 60 s sleepers were cut at 3 s (+ the grace of the kill)

    statuses = {name: section["status"] for name, section in record["sections"].items()}
    assert statuses == {"setup": "ok", "kernel_tests": "ok", "moe_layer": "ok", "host_syncs": "failed (exit 3)",
                        "train_step": "killed at its limit of 3 s"}
    assert not alive(int(grandchild_pid.read_text()))  # the section's own child went with it
    assert record["machine"]["gpu"] == "Stand-in GPU"
    assert record["sections"]["kernel_tests"]["results"] == dict(tests=3, failures=1, errors=0, skipped=1,
                                                                 failed=["tests.test_a::test_bad"])
    assert record["sections"]["moe_layer"]["results"] == rows
    assert record["sections"]["host_syncs"]["results"] is None
    assert "a CUDA error, say" in record["sections"]["host_syncs"]["log_tail"]
    assert "started" in record["sections"]["train_step"]["log_tail"]

    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.OUT_FILES)
    assert json.loads((out / "gpu_check.json").read_text()) == record
    table = (out / "gpu_check.md").read_text()
    assert "Stand-in GPU (sm_90): torch 2.11.0, Triton 3.6.0" in table
    assert "| host_syncs | failed (exit 3) |" in table and "| triton | fwd | 1.5e+06 | 0 |" in table
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        names = set(tar.getnames())
        assert {f"{name}.log" for name in commands} | {"setup.json", "kernel_tests.xml", "moe_layer.json"} <= names
        assert tar.extractfile("host_syncs.log").read().strip() == b"a CUDA error, say"
    assert "[gpu_check] train_step: killed at its limit of 3 s" in capsys.readouterr().out


def test_a_section_past_the_total_budget_is_skipped_and_reported(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    commands = {"setup": python("import time; time.sleep(60)"), "sampling": python("print('never')")}
    record = gpu_check.run_check(commands, gpu_check.SECTION_LIMITS_S, out, work, dict(os.environ), total_s=2)
    assert record["sections"]["setup"]["status"] == "killed at its limit of 2 s"
    assert record["sections"]["sampling"]["status"].startswith("skipped: the 2 s of the whole check are spent")
    assert "| sampling | skipped" in (out / "gpu_check.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.OUT_FILES)


def test_the_archive_keeps_the_tail_of_a_long_log(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "ARCHIVED_FILE_BYTES", 100)
    (tmp_path / "long.log").write_bytes(b"x" * 1000 + b"the end")
    gpu_check.archive(tmp_path, tmp_path / "logs.tar.gz")
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        data = tar.extractfile("long.log").read()
    assert len(data) == 100 and data.endswith(b"the end")


def test_sections_import_this_checkouts_kernels_through_the_sitecustomize_shim(tmp_path):
    """No install needed: the shim maps promoe.kernels to kernels/ and still runs a sitecustomize it shadows."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os\nos.environ['SHADOWED_SITECUSTOMIZE'] = 'ran'\n")
    env = gpu_check.section_env(tmp_path / "shim")
    env["PYTHONPATH"] += os.pathsep + str(other)
    code = ("import os, sys; spec = sys.meta_path[0].find_spec('promoe.kernels'); "  # asked without importing torch
            "print(sys.meta_path[0].__name__, spec.origin, *spec.submodule_search_locations, "
            "os.environ.get('SHADOWED_SITECUSTOMIZE'))")
    done = subprocess.run(python(code), capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    finder, origin, folder, shadowed = done.stdout.split()
    assert finder == "PromoeKernels" and shadowed == "ran"
    assert Path(origin) == ROOT / "kernels" / "__init__.py" and Path(folder) == ROOT / "kernels"
    assert "TRITON_INTERPRET" not in env and env["PYTHONPATH"].split(os.pathsep)[1] == str(ROOT)


def test_the_real_sections_fit_the_budget_and_the_files_they_name_exist(tmp_path):
    commands = gpu_check.section_commands(tmp_path)
    assert list(commands) == list(gpu_check.SECTION_LIMITS_S) and list(commands)[0] == "setup"
    assert sum(gpu_check.SECTION_LIMITS_S.values()) <= gpu_check.TOTAL_S <= 8 * 60 - 15
    assert len(gpu_check.OUT_FILES) <= 8
    assert all((ROOT / path).is_file() for path in gpu_check.KERNEL_TESTS)
    assert all((ROOT / arg).is_file() for command in commands.values() for arg in command if arg.startswith("bench/"))
    assert set(gpu_check.IN_SCRIPT) <= set(commands)
