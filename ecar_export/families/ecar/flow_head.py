"""The per-token flow head (MAR's SimpleMLPAdaLN shape): predicts the velocity u of one token."""

from __future__ import annotations

import torch
from torch import nn

from ecar_export.families.ecar.config import ECARConfig
from ecar_export.families.ecar.layers import TimeEmbedding, modulate, zero_


class ResBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(cond).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class FlowHead(nn.Module):
    def __init__(self, config: ECARConfig) -> None:
        super().__init__()
        width = config.head_width
        self.in_proj = nn.Linear(config.latent_channels, width)
        self.cond_proj = nn.Linear(config.width, width)
        self.time_embed = TimeEmbedding(width)
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(config.head_depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out_proj = nn.Linear(width, config.latent_channels)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            zero_(block.ada)
        zero_(self.final_ada)
        zero_(self.out_proj)

    def forward(self, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x [M, C], z [M, D], t [M] or [1] -> u [M, C]."""
        cond = self.cond_proj(z) + self.time_embed(t)
        h = self.in_proj(x)
        for block in self.blocks:
            h = block(h, cond)
        shift, scale = self.final_ada(cond).chunk(2, dim=-1)
        return self.out_proj(modulate(self.final_norm(h), shift, scale))
