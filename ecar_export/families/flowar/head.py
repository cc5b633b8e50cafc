"""FlowAR's flow head: a small transformer that predicts the velocity of a stage's noisy tokens.

It sees the stage's tokens x_t ``[B, N, token_dim]``, the flow time t (1 = noise, 0 = data) and the
backbone output z ``[B, N, width]`` of the same tokens. Time and z enter every block through
per-token adaLN; FlowAR-L/H blocks also cross-attend to z.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ecar_export.families.flowar.config import FlowARConfig
from ecar_export.families.flowar.layers import CrossHeadBlock, HeadBlock, RMSNorm, RopeTables

MAX_TIMESTEP = 1000  # the head's timesteps are trunc(t * 1000) for t in [0, 1]


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding (cos half first) of an integer timestep 0..1000, then a two-layer MLP.

    The sinusoids are a table of every timestep's row, computed once in float32 exactly as the reference
    computes one row (``cos / sin(step * freqs)``), and looked up: the exported graph gathers a row instead
    of evaluating ``sin(step * freq)`` for steps up to 1000, which in half precision — OpenVINO runs fp16
    builds at bf16, whose spacing at 600 is 4 — would come out as noise (velocity cosine 0.92 against fp32
    at t = 0.6 on flowar-tiny; with the table the embedding is exact and only rounded once).
    """

    def __init__(self, width: int, frequencies: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        half = frequencies // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        args = torch.arange(MAX_TIMESTEP + 1, dtype=torch.float32)[:, None] * freqs[None]
        self.register_buffer("table", torch.cat([torch.cos(args), torch.sin(args)], dim=-1), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, steps: torch.Tensor) -> torch.Tensor:
        """steps ``[B]`` (whole numbers in 0..1000, any float or int dtype) -> ``[B, width]``."""
        index = steps.clamp(0, MAX_TIMESTEP).to(torch.int64)
        return self.mlp(self.get_buffer("table")[index])


class FinalLayer(nn.Module):
    """RMSNorm, adaLN shift/scale from ``time + condition``, then the projection to the token dim."""

    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.norm_final = RMSNorm(width)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class FlowHead(nn.Module):
    """The velocity model ``v(x_t, t, z)``; attribute names follow the authors' ``SimpleTransformerAdaLN``."""

    def __init__(self, config: FlowARConfig) -> None:
        super().__init__()
        w, heads, grid = config.head_width, config.head_heads, config.rope_grid
        hidden = config.mlp_hidden(w)
        self.time_embed = TimestepEmbedder(w)
        self.cond_embed = nn.Linear(config.width, w)
        self.input_proj = nn.Linear(config.token_dim, w)
        blocks: list[nn.Module] = [
            CrossHeadBlock(w, heads, hidden, config.width, grid) if config.cross else HeadBlock(w, heads, hidden, grid)
            for _ in range(config.head_depth)
        ]
        self.res_blocks = nn.ModuleList(blocks)
        self.final_layer = FinalLayer(w, config.token_dim)

    @staticmethod
    def timestep(t: torch.Tensor) -> torch.Tensor:
        """The integer timestep the head is trained on: ``t * 1000`` (float32) truncated toward zero.

        Kept as a float (``trunc``) rather than an integer cast; the values are the same whole numbers.
        """
        return torch.trunc(t.float() * 1000)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor, rope: RopeTables | None = None
    ) -> torch.Tensor:
        """x ``[B, N, token_dim]``, t ``[B]``, z ``[B, N, width]`` -> velocity ``[B, N, token_dim]``.

        ``rope``: the stage's rotary tables for the head's heads (derived from N when not given).
        """
        temb = self.time_embed(self.timestep(t)).unsqueeze(1)
        c = self.cond_embed(z)
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, temb, c, z, rope)
        return self.final_layer(h, c + temb)
