"""Every kernel lowers for sm_80 and sm_90a ahead of time (no GPU) without register spills, within shared memory.

The compile runs in a subprocess without TRITON_INTERPRET: the interpreter, which the other kernel tests use,
replaces Triton's @jit library functions with Python ones that the compiler cannot lower.
"""

import json
import os
import subprocess
import sys

import pytest

from promoe.kernels.report import ARCHITECTURES, SHARED_MEMORY_LIMIT, SPECS


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))  # a fresh compile, not a cache hit
    out = subprocess.run([sys.executable, "-m", "promoe.kernels.report", "--json"], env=env, capture_output=True,
                         text=True, check=True).stdout
    return {(row["kernel"], row["arch"]): row for row in json.loads(out.splitlines()[-1])}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.label)
def test_kernel_compiles_without_spills(report, spec, arch):
    row = report[(spec.label, arch)]
    assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row
    assert row["shared_bytes"] <= SHARED_MEMORY_LIMIT[ARCHITECTURES[arch]], row
    assert 0 < row["registers"] <= 255, row
