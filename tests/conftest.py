import os

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
