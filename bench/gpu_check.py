"""One-shot GPU proof: kernel tests, MoE-layer bench, training step and sampling on one CUDA GPU, in about 8 minutes.

    python bench/gpu_check.py --out bench/results/gpu_check_H200

Sections, each in its own process with its own time limit, so that a failure or a hang (a CUDA error poisons the
process that meets it) costs only its own result:
  kernel_tests  the kernel and dispatch tests, compiled kernels on the GPU (fp32, bf16/fp16 with the native
                `tl.dot` path), TRITON_INTERPRET unset (pytest -p tests.cuda_launch)
  moe_layer     bench/moe_layer.py at ProMoE-XL shapes, bf16, 32 images x 256 tokens, every backend present
  train_step    bench/train_step.py: a ProMoE-XL (`triton`) and a DiT-XL training step, bf16 autocast, batch 32
  sampling      images/s of ProMoE-XL and DiT-XL: Euler, 50 steps, guidance 1.5, batch 32, bf16 autocast
It writes `gpu_check.json` (machine, each section's status, seconds, results, log tail) and `gpu_check.md` (the
tables) into --out, beside each section's own files. Without CUDA it stops at once with a message.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_TESTS = ["tests/test_kernels_routing.py", "tests/test_kernels_permute.py", "tests/test_kernels_plan.py",
                "tests/test_kernels_large_offsets.py", "tests/test_dispatch.py"]
SECTION_LIMITS_S = {"kernel_tests": 230, "moe_layer": 90, "train_step": 90, "sampling": 60}  # 470 s in all


def section_commands(out: Path) -> dict[str, list[str]]:
    python = sys.executable
    return {
        "kernel_tests": [python, "-m", "pytest", "-q", "-p", "tests.cuda_launch", "-p", "no:cacheprovider",
                         f"--junitxml={out / 'kernel_tests.xml'}", *KERNEL_TESTS],
        "moe_layer": [python, "bench/moe_layer.py", "--size", "XL", "--tokens", str(32 * 256), "--dtype", "bf16",
                      "--reps", "5", "--warmup", "2", "--json", str(out / "moe_layer_XL_bf16.json")],
        "train_step": [python, "bench/train_step.py", "--model", "ProMoE-XL", "--batch", "32", "--dtype", "bf16",
                       "--backend", "triton", "--reps", "3", "--warmup", "1",
                       "--json", str(out / "train_step_XL_bf16.json")],
        "sampling": [python, str(Path(__file__).resolve()), "--sampling-only", "--out", str(out)],
    }


def run_section(name: str, command: list[str], limit_s: int, out: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit_s)
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        log = done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:
        status = f"timed out after {limit_s} s"
        log = "".join(part.decode() if isinstance(part, bytes) else (part or "")
                      for part in (error.stdout, error.stderr))
    (out / f"{name}.log").write_text(log)
    return dict(status=status, seconds=round(time.perf_counter() - start, 1), log_tail=log[-3000:])


def section_results(name: str, out: Path) -> object:
    """What a section left in --out: its JSON results, or the test counts of the junit file."""
    files = {"moe_layer": "moe_layer_XL_bf16.json", "train_step": "train_step_XL_bf16.json",
             "sampling": "sampling_XL_bf16.json"}
    if name == "kernel_tests":
        path = out / "kernel_tests.xml"
        if not path.exists():
            return None
        import xml.etree.ElementTree as ET

        suite = ET.parse(path).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    path = out / files[name]
    return json.loads(path.read_text())["results"] if path.exists() else None


def sampling_throughput(out: Path, steps: int = 50, batch: int = 32, cfg_scale: float = 1.5) -> None:
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
        seconds = []
        for _ in range(2):  # warm-up, then the measured run
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                images = generate(model, RectifiedFlow(), labels, generator, steps, cfg_scale)
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        results.append(dict(model=name, images_per_s=batch / seconds[-1], steps=steps, batch=batch,
                            cfg_scale=cfg_scale, finite=bool(torch.isfinite(images).all())))
        del model
        torch.cuda.empty_cache()
    (out / "sampling_XL_bf16.json").write_text(json.dumps(dict(results=results), indent=2))


def machine() -> dict:
    import torch
    import triton

    packages = {}
    for package in ("flash_attn", "grouped_gemm"):
        try:
            packages[package] = __import__(package).__dict__.get("__version__", "installed")
        except ImportError:
            packages[package] = None
    return dict(gpu=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())),
                memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__,
                platform=platform.platform(), cpus=os.cpu_count(), **packages)


def markdown(record: dict) -> str:
    lines = [f"## GPU check on {record['machine']['gpu']} (sm_{record['machine']['capability'].replace('.', '')})",
             "", f"machine: {record['machine']}", "", "| section | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {s['status']} | {s['seconds']} |" for name, s in record["sections"].items()]
    for name, section in record["sections"].items():
        results = section.get("results")
        if isinstance(results, dict):
            lines += ["", f"### {name}", "", " ".join(f"{key}: {value}" for key, value in results.items())]
        elif results:
            columns = list(results[0])
            lines += ["", f"### {name}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])
                                        for c in columns) + " |" for row in results]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON, the tables and the logs")
    parser.add_argument("--sections", nargs="+", default=list(SECTION_LIMITS_S), choices=list(SECTION_LIMITS_S))
    parser.add_argument("--sampling-only", action="store_true", help=argparse.SUPPRESS)  # the sampling section
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench/gpu_check.py needs a CUDA GPU, and torch sees none here (torch.cuda.is_available() is False): "
              "run it on a machine with one; nothing was run or written.", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sampling_only:
        sampling_throughput(args.out)
        return 0
    record = dict(machine=machine(), sections={})
    commands = section_commands(args.out.resolve())
    for name in args.sections:
        print(f"[gpu_check] {name} (at most {SECTION_LIMITS_S[name]} s)", flush=True)
        section = run_section(name, commands[name], SECTION_LIMITS_S[name], args.out)
        section["results"] = section_results(name, args.out)
        record["sections"][name] = section
        print(f"[gpu_check] {name}: {section['status']} in {section['seconds']} s", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(record, indent=2))  # after every section
    (args.out / "gpu_check.md").write_text(markdown(record))
    print(markdown(record))
    return 0 if all(s["status"] == "ok" for s in record["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
