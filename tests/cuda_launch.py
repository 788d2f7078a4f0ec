"""pytest plugin: run the kernel tests' Triton launches compiled, on the GPU (`pytest -p tests.cuda_launch`).

The kernel tests build their inputs on the CPU (seeded CPU generators) and, without a GPU, run the kernels under
Triton's interpreter. With this plugin, on a CUDA machine with TRITON_INTERPRET unset, every launch of a compiled
kernel copies the storages of its CPU tensor arguments to the GPU (whole storages, so that offsets and strides stay
valid), runs there, and copies them back: the same tests then check the compiled kernels, including the native
bf16/fp16 `tl.dot` path that the interpreter cannot run. `bench/gpu_check.py` runs the kernel tests this way.
"""

import os

import pytest
import torch


def _run_on_gpu(original_run):
    def run(kernel, *args, **kwargs):
        storages = {}  # CPU storage pointer -> (CPU storage, its GPU copy)

        def to_gpu(value):
            if not isinstance(value, torch.Tensor) or value.device.type != "cpu":
                return value
            storage = value.untyped_storage()
            if storage.data_ptr() not in storages:
                storages[storage.data_ptr()] = (storage, storage.cuda())
            gpu = torch.empty(0, dtype=value.dtype, device="cuda")
            return gpu.set_(storages[storage.data_ptr()][1], value.storage_offset(), value.shape, value.stride())

        result = original_run(kernel, *map(to_gpu, args), **{k: to_gpu(v) for k, v in kwargs.items()})
        torch.cuda.synchronize()
        for cpu_storage, gpu_storage in storages.values():
            cpu_storage.copy_(gpu_storage)
        return result

    return run


@pytest.fixture(autouse=True)
def kernels_on_the_gpu(monkeypatch):
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("tests.cuda_launch runs compiled kernels on a CUDA GPU (TRITON_INTERPRET unset)")
    from triton.runtime.jit import JITFunction

    monkeypatch.setattr(JITFunction, "run", _run_on_gpu(JITFunction.run))
