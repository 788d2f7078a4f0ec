import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU tensors under Triton's interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Kernel outputs start as NaN (floats) or -7777 (integers): an element a kernel forgets to write shows."""
    import promoe.kernels.permute
    import promoe.kernels.plan
    import promoe.kernels.routing

    def poisoned(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -7777
        return torch.full(shape, fill, dtype=dtype, device=device)

    for module in (promoe.kernels.permute, promoe.kernels.plan, promoe.kernels.routing):
        monkeypatch.setattr(module, "empty_output", poisoned)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The output folder of a 3-step run of the demo config at a tiny width (checkpoint, EMA export, plots)."""
    root = Path(__file__).resolve().parent.parent
    out = tmp_path_factory.mktemp("tiny_run")
    command = [sys.executable, str(root / "train" / "run.py"), "--config", str(root / "configs" / "demo.yaml"),
               "--out", str(out), "--max-steps", "3", "model.overrides.hidden_size=32", "model.overrides.num_heads=4",
               "model.overrides.depth=2", "train.global_batch=16", "train.grid_steps=2",
               "train.fid_samples=0"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=root,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out
