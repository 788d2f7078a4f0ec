"""Launch parameters shared by the kernels: block sizes and grids in one place, not at every call site."""

import functools
import os

import torch
import triton


def interpreted() -> bool:
    """Whether Triton's interpreter runs the kernels (TRITON_INTERPRET=1: the CPU's tests), which pays per program
    and per step and computes half-precision dots and sums wrongly."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Sums (over slots, over an expert's rows) and the kernels' arithmetic run in fp32 at least, float64 where an
    input is float64: the one rule for the definitions in `promoe.moe` and the kernels alike."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)


def token_block(num_tokens: int) -> int:
    """Tokens per program: 16 is the smallest tile `tl.dot` accepts; 64 keeps registers low at E = 64."""
    return 64 if num_tokens >= 64 else 16


def dim_block(dim: int) -> int:
    """Columns per inner step: a power of two, at most 128, so that D = 1152 runs in 9 steps."""
    return min(128, max(16, triton.next_power_of_2(dim)))


def expert_block(num_experts: int) -> int:
    return max(16, triton.next_power_of_2(num_experts))


def routing_blocks(num_tokens: int, dim: int, num_experts: int, itemsize: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D) of the routing kernel, chosen so that sm_80 and sm_90a compile it without spills:
    a [BLOCK_N, E] score tile next to the [BLOCK_N, BLOCK_D] token tile (fp32 inputs need the smaller one)."""
    if expert_block(num_experts) >= 64:
        return 16 if num_tokens < 32 else 32, min(64, dim_block(dim))
    return token_block(num_tokens), min(64 if itemsize >= 4 else 128, dim_block(dim))


def routing_backward_blocks(num_tokens: int, dim: int, num_experts: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D) of the routing backward, which holds a d-token tile and an [E, BLOCK_D] partial beside the
    forward's tiles: smaller than the forward's so that sm_80 and sm_90a compile it without spills. Each block
    writes E x D fp32 partial sums, so BLOCK_N stays as large as the registers allow (E * D * 4 / BLOCK_N bytes per
    token)."""
    if expert_block(num_experts) >= 64:
        return 16, min(32, dim_block(dim))
    return 16 if num_tokens < 32 else 32, min(64, dim_block(dim))


def plan_block(bins: int) -> int:
    """Slots per program of the plan kernels: their [BLOCK_S, bins] one-hot tile stays within 4096 elements."""
    return max(16, min(256, 4096 // bins))


def row_grid(num_rows: int, block_rows: int, dim: int, block_dim: int) -> tuple[int, int]:
    return triton.cdiv(num_rows, block_rows), triton.cdiv(dim, block_dim)


def empty_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here, uninitialised: the kernels must write every element (the tests
    poison this allocation to check that they do)."""
    return torch.empty(shape, dtype=dtype, device=device)
