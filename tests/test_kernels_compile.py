"""Every kernel lowers for sm_80 and sm_90a ahead of time (no GPU) without register spills, within shared memory."""

import pytest

from promoe.kernels.report import ARCHITECTURES, SHARED_MEMORY_LIMIT, SPECS, kernel_resources


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.label)
def test_kernel_compiles_without_spills(spec, arch):
    capability = ARCHITECTURES[arch]
    resources = kernel_resources(spec, capability)
    assert resources.spill_stores == 0 and resources.spill_loads == 0, resources
    assert resources.shared_bytes <= SHARED_MEMORY_LIMIT[capability], resources
    assert 0 < resources.registers <= 255
