"""The DiT backbone (Peebles & Xie) with adaLN-Zero blocks whose MLP is dense or a MoE layer; `compile_blocks`
compiles its blocks in place, for the training driver and the sampling CLI alike."""

import functools
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from promoe.dit.attention import Attention
from promoe.dit.embed import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_2d_pos_embed
from promoe.moe.layer import MoELayer


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Modulation(NamedTuple):
    """adaLN-Zero's six vectors [B, D] from a block's conditioning: shift, scale and gate of the attention, then of the
    MLP."""

    shift_msa: torch.Tensor
    scale_msa: torch.Tensor
    gate_msa: torch.Tensor
    shift_mlp: torch.Tensor
    scale_mlp: torch.Tensor
    gate_mlp: torch.Tensor


class DiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoELayer)

    def modulation(self, c: torch.Tensor) -> Modulation:
        return Modulation(*self.adaLN_modulation(c).chunk(6, dim=1))

    def mlp_input(self, x: torch.Tensor, m: Modulation) -> torch.Tensor:
        """The MLP's input: the residual stream after the attention, normalised, under the MLP's shift and scale."""
        return modulate(self.norm2(x), m.shift_mlp, m.scale_mlp)

    def forward(self, x, c, labels_B):
        m = self.modulation(c)
        x = x + m.gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), m.shift_msa, m.scale_msa))
        h = self.mlp_input(x, m)
        h, aux = self.mlp(h, labels_B) if self.is_moe else (self.mlp(h), {})
        return x + m.gate_mlp.unsqueeze(1) * h, aux


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """model(x, t, y) -> prediction [B, C_out, H, W]; with return_aux=True also the auxiliary losses.

    x: latents or pixels [B, C, H, W]; t: the timestep as the official code feeds it (sigma * 1000 for
    rectified flow, the step index for DDPM); y: labels, `num_classes` meaning the null class.
    In training the labels are dropped to the null class with p = class_dropout_prob (drop_labels=False when the
    caller has dropped them already), and the dropped labels are the ones every MoE layer routes by.
    With `gradient_checkpointing` (diffusers' convention: ModelMixin.enable_gradient_checkpointing sets it and
    `_gradient_checkpointing_func`), each block recomputes its forward in backward.
    """

    gradient_checkpointing = False
    _gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)

    def __init__(self, config, mlp_factory):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.in_channels = config.in_channels
        self.out_channels = config.in_channels * (2 if config.learn_sigma else 1)
        self.patch_size = config.patch_size
        self.num_classes = config.num_classes
        self.x_embedder = PatchEmbed(config.input_size, config.patch_size, config.in_channels, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = LabelEmbedder(config.num_classes, dim, config.class_dropout_prob)
        # Fixed, so a buffer (no optimiser or EMA state); not saved, it is rebuilt from the config.
        self.register_buffer("pos_embed", torch.zeros(1, self.x_embedder.num_patches, dim), persistent=False)
        self.blocks = nn.ModuleList(
            DiTBlock(dim, config.num_heads, mlp_factory(i), config.qk_norm) for i in range(config.depth)
        )
        self.final_layer = FinalLayer(dim, config.patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        # Every linear layer: xavier-uniform weights, zero biases.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # MoE parts with their own rule (experts as nn.Linear, prototypes N(0, 0.02), ...).
        for module in self.modules():
            if module is not self and hasattr(module, "init_weights"):
                module.init_weights()
        # Fixed 2-D sin-cos positions.
        grid = self.config.input_size // self.patch_size
        self.pos_embed.copy_(sincos_2d_pos_embed(self.pos_embed.shape[-1], grid)[None])
        # Patch embedding like an nn.Linear over the flattened patch.
        weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        # Label table and timestep MLP: N(0, 0.02).
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # Zero-out adaLN modulation, so every block starts as the identity.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # Zero-out the output layer.
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def routing_couples_samples(self) -> bool:
        """Whether routing makes a sample's output depend on the other samples of its batch (DiffMoE's batch-wide
        expert capacity): then guidance in one batch of conditional and null halves is not the two passes."""
        return any(block.is_moe and block.mlp.router.couples_samples for block in self.blocks)

    def unpatchify(self, x_BTP: torch.Tensor) -> torch.Tensor:
        """[B, T, p * p * C] -> [B, C, H, W]."""
        p, c = self.patch_size, self.out_channels
        h = w = self.config.input_size // p
        x = x_BTP.reshape(x_BTP.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x_BTP.shape[0], c, h * p, w * p)

    def forward(self, x, t, y, return_aux: bool = False, drop_labels: bool | None = None):
        if y.dim() != 1 or t.dim() != 1 or not (x.shape[0] == t.shape[0] == y.shape[0]):
            raise ValueError(f"expected x [B, C, H, W], t [B], y [B]; got {list(x.shape)}, {list(t.shape)}, "
                             f"{list(y.shape)}")
        if self.training if drop_labels is None else drop_labels:
            y = self.y_embedder.drop_labels(y)
        # (B, T, D), T = H * W / patch_size ** 2; in the dtype of the patches, whatever the buffer's (a model cast
        # tensor by tensor may keep it in fp32); the sum is taken before the cast, as the blocks' input cast took it.
        x = self.x_embedder(x)
        x = (x + self.pos_embed).to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        aux: dict[str, torch.Tensor] = {}
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, block_aux = self._gradient_checkpointing_func(block, x, c, y)
            else:
                x, block_aux = block(x, c, y)  # MoE layers route by the dropped labels
            for name, value in block_aux.items():
                aux[name] = aux[name] + value if name in aux else value
        x = self.unpatchify(self.final_layer(x, c))  # (B, C_out, H, W)
        return (x, aux) if return_aux else x


def compile_blocks(model: DiT) -> None:
    """Each block compiled in place (`Module.compile`: the state-dict keys keep their names, with no `_orig_mod.`),
    as the sampling CLI compiles; the training driver compiles so too (`promoe.training.parallel.apply_compile`)."""
    for block in model.blocks:
        block.compile()
