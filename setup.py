from setuptools import find_packages, setup

# `kernels/` is a top-level folder of the repository but installs as `promoe.kernels`: a top-level import
# package named `kernels` belongs to another project on PyPI.
packages = find_packages(include=["promoe", "promoe.*"]) + ["promoe.kernels"]

setup(
    name="promoe",
    version="0.1.0",
    description="ProMoE and baseline Mixture-of-Experts Diffusion Transformers in PyTorch",
    python_requires=">=3.11",  # hashlib.file_digest (checkpoint digests)
    packages=packages,
    package_dir={"promoe.kernels": "kernels"},
    # No torch pin that a CPU build fails: install torch first (e.g. `pip install torch==2.13.0`). Tested: torch 2.13.0
    # with Triton 3.9 (CPU, the whole suite) and torch 2.11.0 with Triton 3.6.0, the GPU machine's versions (.ci/run's
    # second venv: the kernel, dispatch, router and model tests under Triton's interpreter, numpy < 2.2 there); torch
    # 2.9 and 2.10 are allowed but untested. diffusers is needed only by the VAE and the schedulers (imported where
    # used).
    install_requires=[
        "torch>=2.9", "triton", "numpy", "pyyaml", "safetensors", "tqdm", "diffusers", "scipy", "matplotlib",
        "scikit-learn",  # its digits are the demo's zero-install data
    ],
    extras_require={
        # accelerate: diffusers' group offloading moves each hooked module's inputs with its send_to_device (the
        # offloading tests of tests/test_hf.py; without it they skip)
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "ruff", "accelerate"],
        # grouped_gemm (MegaBlocks' grouped GEMM, without megablocks, whose only release pins torch 2.7.0): the
        # `grouped_gemm` dispatch backend, bf16 only. Both build from CUDA source; no test needs them.
        "gpu": ["flash-attn", "grouped_gemm"],
    },
    entry_points={"console_scripts": ["promoe-convert=promoe.convert:main"]},
)
