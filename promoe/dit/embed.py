"""Input embedders of the DiT: patches, fixed 2-D sin-cos positions, timesteps, class labels."""

import math

import torch
import torch.nn as nn


class Conv2dInWeightDtype(nn.Conv2d):
    """nn.Conv2d that casts its input to its weight's dtype inside its own call: the dtype it computes in, whether the
    weight is stored in it, gathered in it (FSDP's mixed precision) or cast to it by a hook on the layer (diffusers'
    layerwise casting, which upcasts the weight only when the layer itself is called)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


class LinearInWeightDtype(nn.Linear):
    """nn.Linear that casts its input to its weight's dtype inside its own call (see Conv2dInWeightDtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, T, D] with T = (H / p) * (W / p): a p x p convolution with stride p."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = Conv2dInWeightDtype(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected input of shape [B, {', '.join(map(str, expected))}], got {list(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)  # pixels or latents in the compute dtype


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[P] -> [P, dim]: sin of the first dim/2 frequencies, then cos (MAE's layout)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d_pos_embed(dim: int, grid_size: int) -> torch.Tensor:
    """[grid_size**2, dim] fixed position embedding, row-major over (h, w), as DiT and MAE compute it:
    the first half of the channels encodes the column, the second half the row."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> [B, D]: a 256-channel sinusoid, then Linear -> SiLU -> Linear."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        # The sinusoid is fp32 whatever the model's dtype: its first layer takes it into the compute dtype.
        self.mlp = nn.Sequential(LinearInWeightDtype(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([args.cos(), args.sin()], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t, self.frequency_dim))


class LabelEmbedder(nn.Module):
    """Class labels -> [B, D]. Row `num_classes` of the table is the null class used for guidance."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def drop_labels(self, y: torch.Tensor) -> torch.Tensor:
        """Label dropout for classifier-free guidance: each label becomes the null class with p=dropout_prob."""
        drop = torch.rand(y.shape, device=y.device) < self.dropout_prob
        return torch.where(drop, self.num_classes, y)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)
