"""One-shot GPU proof on a bare CUDA machine: one command, nothing to install, no network, at most 8 minutes.

    python3 bench/gpu_check.py --out "$OUT"

Nothing is installed: each section finds this checkout through PYTHONPATH, its `kernels/` folder as
`promoe.kernels` (what setup.py's package_dir does) through a `sitecustomize` written to a temporary folder, so
the machine's python needs only what the sections import (torch, triton, numpy, pytest; pytest-xdist runs the
kernel tests in parallel where present; the `setup` section lists what is missing). Sections, each in its own
process group with its own time limit, all within TOTAL_S (a failure, a hang or a CUDA error costs only its own
result; a section past its limit is killed with its children and reported so):
  setup         the machine, the packages present, where promoe and promoe.kernels import from
  kernel_tests  the kernel and dispatch tests, compiled kernels on the GPU (fp32, bf16/fp16 with the native
                `tl.dot` path), TRITON_INTERPRET unset (pytest -p tests.cuda_launch, -n auto with pytest-xdist)
  moe_layer     bench/moe_layer.py at ProMoE-XL shapes, bf16, 32 images x 256 tokens, every backend present,
                beside the same expert FLOPs as dense matmuls
  host_syncs    host syncs of one ProMoE-XL MoE layer forward+backward per backend, bf16 and fp32, counted by
                torch.cuda.set_sync_debug_mode (grouped_mm may fall back to a loop with a sync of its own)
  train_step    bench/train_step.py: a ProMoE-XL (`triton`) and a DiT-XL training step, bf16 autocast, batch 32
  sampling      images/s and peak memory of ProMoE-XL and DiT-XL: Euler, 50 steps, guidance 1.5, batch 32, bf16
It writes three files into --out, each rewritten after every section: `gpu_check.json` (machine, each section's
status, seconds, results, log tail), `gpu_check.md` (the tables) and `gpu_check_logs.tar.gz` (each section's log
and files); it prints the tables at its end, so that they arrive even if no file does. Without CUDA it stops at
once with a message.
"""

import argparse
import contextlib
import importlib.metadata
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_TESTS = ["tests/test_kernels_routing.py", "tests/test_kernels_permute.py", "tests/test_kernels_plan.py",
                "tests/test_kernels_experts.py", "tests/test_kernels_expert_mlp.py",
                "tests/test_kernels_large_offsets.py", "tests/test_dispatch.py"]
SECTION_LIMITS_S = {"setup": 30, "kernel_tests": 190, "moe_layer": 80, "host_syncs": 40, "train_step": 75,
                    "sampling": 50}
TOTAL_S = 465  # all sections together; with the parent's own seconds, under 8 minutes
OUT_FILES = ("gpu_check.json", "gpu_check.md", "gpu_check_logs.tar.gz")
ARCHIVED_FILE_BYTES = 4 << 20  # a longer log or file goes into the archive as its last 4 MiB
# module -> distribution, for the versions the setup section reports
PACKAGES = {"torch": "torch", "triton": "triton", "numpy": "numpy", "pytest": "pytest", "xdist": "pytest-xdist",
            "hypothesis": "hypothesis", "safetensors": "safetensors", "yaml": "PyYAML", "tqdm": "tqdm",
            "scipy": "scipy", "PIL": "pillow", "matplotlib": "matplotlib", "flash_attn": "flash-attn",
            "grouped_gemm": "grouped_gemm", "diffusers": "diffusers"}
# what the sections import: the kernel tests torch, triton, numpy, pytest, hypothesis; sampling (promoe.sampling) the
# rest; bench/report.py draws its chart with matplotlib after writing its JSON
NEEDED = ("torch", "triton", "numpy", "pytest", "hypothesis", "safetensors", "yaml", "tqdm", "scipy", "PIL",
          "matplotlib")

SITECUSTOMIZE = '''\
"""Written by bench/gpu_check.py: {kernels} imports as `promoe.kernels`, as setup.py's package_dir installs it,
with nothing installed. Then the sitecustomize that this one shadows, if any, runs."""
import importlib.machinery
import importlib.util
import os
import sys


class PromoeKernels:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "promoe.kernels":
            return None
        return importlib.util.spec_from_file_location(name, {init!r}, submodule_search_locations=[{kernels!r}])


sys.meta_path.insert(0, PromoeKernels)
_others = [p for p in sys.path if os.path.realpath(p or ".") != os.path.realpath({here!r})]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _others)
if _spec is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
'''


def section_env(shim: Path) -> dict[str, str]:
    """The sections' environment: this checkout first on PYTHONPATH, kernels compiled (TRITON_INTERPRET unset)."""
    shim.mkdir(parents=True, exist_ok=True)
    kernels = ROOT / "kernels"
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE.format(kernels=str(kernels), here=str(shim),
                                                                init=str(kernels / "__init__.py")))
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(shim), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def section_commands(work: Path) -> dict[str, list[str]]:
    python, script = sys.executable, str(Path(__file__).resolve())
    parallel = ["-n", "auto"] if importlib.util.find_spec("xdist") else []
    in_script = {name: [python, script, "--section", name, "--work", str(work)]
                 for name in ("setup", "host_syncs", "sampling")}
    return {
        "setup": in_script["setup"],
        "kernel_tests": [python, "-m", "pytest", "-q", "-p", "tests.cuda_launch", "-p", "no:cacheprovider", *parallel,
                         "--continue-on-collection-errors",  # a file that cannot import costs only its own tests
                         f"--junitxml={work / 'kernel_tests.xml'}", *KERNEL_TESTS],
        "moe_layer": [python, "bench/moe_layer.py", "--size", "XL", "--tokens", str(32 * 256), "--dtype", "bf16",
                      "--reps", "5", "--warmup", "2", "--json", str(work / "moe_layer.json")],
        "host_syncs": in_script["host_syncs"],
        "train_step": [python, "bench/train_step.py", "--model", "ProMoE-XL", "--batch", "32", "--dtype", "bf16",
                       "--backend", "triton", "--reps", "3", "--warmup", "1", "--json", str(work / "train_step.json")],
        "sampling": in_script["sampling"],
    }


def stop_group(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM to the section's process group (the section and every process it started), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_s)


def run_section(name: str, command: list[str], limit_s: float, work: Path, env: dict[str, str]) -> dict:
    """Run one section in its own process group, its output in work/<name>.log; past limit_s it is killed."""
    start = time.perf_counter()
    with open(work / f"{name}.log", "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=limit_s)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"killed at its limit of {limit_s:.0f} s"
        finally:
            stop_group(process)  # after an exit too, and when this script is stopped: no child outlives its section
    log_tail = (work / f"{name}.log").read_bytes()[-3000:].decode(errors="replace")
    return dict(status=status, seconds=round(time.perf_counter() - start, 1), log_tail=log_tail)


def section_results(name: str, work: Path) -> object:
    """What a section left in work: the test counts (and failed tests) of its junit file, or its JSON's results."""
    try:
        if name == "kernel_tests":
            root = ET.parse(work / "kernel_tests.xml").getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
            failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                      if case.find("failure") is not None or case.find("error") is not None]
            return dict(counts, failed=failed[:20])
        run = json.loads((work / f"{name}.json").read_text())
        results = run["results"]
        peak = run.get("config", {}).get("peak_memory_bytes")
        if peak is not None:  # train_step: one peak for the whole run (its candidates share the process)
            results = [dict(row, run_peak_gib=round(peak / 2**30, 2)) for row in results]
        return results
    except (OSError, ValueError, KeyError, AttributeError, ET.ParseError):
        return None


def cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))


def markdown(record: dict) -> str:
    machine = record.get("machine") or {}
    capability = str(machine.get("capability", "?")).replace(".", "")
    lines = [f"## GPU check on {machine.get('gpu', 'an unknown GPU')} (sm_{capability}): torch "
             f"{machine.get('torch', '?')}, Triton {machine.get('triton', '?')}, {record.get('seconds', '?')} s in all",
             "", "| section | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {s['status']} | {s['seconds']} |" for name, s in record["sections"].items()]
    for name, section in record["sections"].items():
        results = section.get("results")
        if isinstance(results, dict):
            lines += ["", f"### {name}", ""] + [f"- {key}: {cell(value)}" for key, value in results.items()]
        elif isinstance(results, list) and results and isinstance(results[0], dict):
            columns = list(dict.fromkeys(key for row in results for key in row))
            lines += ["", f"### {name}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in results]
    return "\n".join(lines) + "\n"


def archive(work: Path, path: Path) -> None:
    """Every file the sections left in work, as one .tar.gz (a file over ARCHIVED_FILE_BYTES as its tail)."""
    partial = path.with_name(path.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        for file in sorted(p for p in work.iterdir() if p.is_file()):
            data = file.read_bytes()[-ARCHIVED_FILE_BYTES:]
            info = tarfile.TarInfo(file.name)
            info.size, info.mtime = len(data), int(file.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
    partial.replace(path)


def write_outputs(record: dict, out: Path, work: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(record, indent=2))
    (out / "gpu_check.md").write_text(markdown(record))
    archive(work, out / "gpu_check_logs.tar.gz")


def run_check(commands: dict[str, list[str]], limits: dict[str, float], out: Path, work: Path,
              env: dict[str, str], total_s: float) -> dict:
    """Each section in turn within its limit and the total's remainder; the outputs rewritten after every one."""
    start = time.monotonic()
    record = dict(machine=None, seconds=0.0, sections={})
    for name, command in commands.items():
        limit = min(limits[name], total_s - (time.monotonic() - start))
        if limit < 1:
            section = dict(status=f"skipped: the {total_s:.0f} s of the whole check are spent", seconds=0.0,
                           log_tail="")
        else:
            print(f"[gpu_check] {name} (at most {limit:.0f} s)", flush=True)
            section = run_section(name, command, limit, work, env)
            print(f"[gpu_check] {name}: {section['status']} in {section['seconds']} s", flush=True)
        section["results"] = section_results(name, work)
        if name == "setup":
            record["machine"] = section["results"]
        record["sections"][name] = section
        record["seconds"] = round(time.monotonic() - start, 1)
        write_outputs(record, out, work)
    return record


# ---- the sections that run inside this script (`--section NAME`), each writing work/NAME.json ----

def setup_section(work: Path) -> None:
    import platform

    import torch
    import triton

    versions = {}
    for module, distribution in PACKAGES.items():
        try:
            versions[module] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[module] = "present" if importlib.util.find_spec(module) else None
    properties = torch.cuda.get_device_properties(0)
    results = dict(gpu=properties.name, capability=f"{properties.major}.{properties.minor}",
                   memory_gib=round(properties.total_memory / 2**30, 1), torch=torch.__version__,
                   cuda=torch.version.cuda, triton=triton.__version__, python=platform.python_version(),
                   platform=platform.platform(), cpus=os.cpu_count(),
                   missing=[module for module in NEEDED if versions[module] is None], packages=versions)
    for module in ("promoe", "promoe.kernels"):
        try:
            results[module] = str(Path(importlib.import_module(module).__file__).parent)
        except Exception as error:  # reported, not raised: the machine's facts above still come back
            results[module] = f"{type(error).__name__}: {error}"
    (work / "setup.json").write_text(json.dumps(dict(results=results), indent=2))


def host_syncs_section(work: Path) -> None:
    import warnings

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from moe_layer import available_backends, make_inputs, moe_step

    import promoe
    from promoe.zoo import build_mlp

    config, device, results = promoe.model_config("ProMoE-XL"), torch.device("cuda"), []
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        torch.manual_seed(0)
        layer = build_mlp(config, block_index=1).to(device, dtype).train()
        x, labels = make_inputs(config, 32 * 256, dtype, device, torch.Generator().manual_seed(0))
        for backend in available_backends(dtype_name):
            moe_step(layer, backend, x, labels, backward=True)  # warm-up: compiles and caches stay out of the count
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    moe_step(layer, backend, x, labels, backward=True)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            results.append(dict(dtype=dtype_name, backend=backend, host_syncs=len(syncs),
                                first_sync=f"{syncs[0].filename}:{syncs[0].lineno}" if syncs else ""))
        del layer, x
        torch.cuda.empty_cache()
    (work / "host_syncs.json").write_text(json.dumps(dict(results=results), indent=2))


def sampling_section(work: Path, steps: int = 50, batch: int = 32, cfg_scale: float = 1.5) -> None:
    import torch

    import promoe
    from promoe.diffusion import RectifiedFlow
    from promoe.sampling import generate

    results = []
    for name in ("ProMoE-XL", "DiT-XL"):
        torch.manual_seed(0)
        model = promoe.build_model(name, device="cuda").eval()
        labels = torch.arange(batch) % model.config.num_classes
        generator = torch.Generator().manual_seed(0)
        torch.cuda.reset_peak_memory_stats()
        seconds = []
        for _ in range(2):  # warm-up, then the measured run
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                images = generate(model, RectifiedFlow(), labels, generator, steps, cfg_scale)
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        results.append(dict(model=name, images_per_s=batch / seconds[-1], steps=steps, batch=batch,
                            cfg_scale=cfg_scale, peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                            finite=bool(torch.isfinite(images).all())))
        del model
        torch.cuda.empty_cache()
    (work / "sampling.json").write_text(json.dumps(dict(results=results), indent=2))


IN_SCRIPT = {"setup": setup_section, "host_syncs": host_syncs_section, "sampling": sampling_section}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for the three files: JSON, tables, archive of the logs")
    parser.add_argument("--sections", nargs="+", default=list(SECTION_LIMITS_S), choices=list(SECTION_LIMITS_S))
    parser.add_argument("--section", choices=list(IN_SCRIPT), help=argparse.SUPPRESS)  # run inside a section
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.section:
        IN_SCRIPT[args.section](args.work)
        return 0
    if args.out is None:
        parser.error("--out is required")

    import torch

    if not torch.cuda.is_available():
        print("bench/gpu_check.py needs a CUDA GPU, and torch sees none here (torch.cuda.is_available() is False): "
              "run it on a machine with one; nothing was run or written.", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so the running section is stopped too
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as temporary:
        work, env = Path(temporary) / "work", section_env(Path(temporary) / "pythonpath")
        work.mkdir()
        commands = {name: command for name, command in section_commands(work).items()
                    if name == "setup" or name in args.sections}  # setup always: it names the machine
        record = run_check(commands, SECTION_LIMITS_S, args.out, work, env, TOTAL_S)
    print(markdown(record) + f"\n(written to {args.out.resolve()}: {', '.join(OUT_FILES)})")
    return 0 if all(section["status"] == "ok" for section in record["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
