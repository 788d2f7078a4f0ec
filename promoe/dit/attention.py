"""Multi-head self-attention: FlashAttention when installed and usable, else PyTorch SDPA (same maths)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from promoe.errors import Refusal

try:  # optional CUDA extra: pip install ".[gpu]"
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


def can_use_flash(x: torch.Tensor) -> bool:
    return flash_attn_func is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise Refusal(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # qk-norm as timm: LayerNorm over each head's channels of q and k.
        self.q_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x_BLD.shape
        q, k, v = self.qkv(x_BLD).view(batch, length, 3, self.num_heads, -1).unbind(2)  # each [B, L, H, hd]
        q, k = self.q_norm(q), self.k_norm(k)
        if can_use_flash(x_BLD):
            out = flash_attn_func(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            out = out.transpose(1, 2)
        return self.proj(out.reshape(batch, length, dim))
