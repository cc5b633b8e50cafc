"""FlowAR's building blocks: RMSNorm, GEGLU MLP, 2-D RoPE, attention and the adaLN blocks.

Module and parameter names follow the authors' code, so a checkpoint's keys need no renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

KVCache = tuple[torch.Tensor, torch.Tensor]  # keys, values: [B, heads, tokens so far, head_dim] each
# A stage's rotary tables, cos and sin [tokens, head_dim] (RoPE2D.angles). Given explicitly, they make a
# layer independent of the stage's size, so one traced graph serves every stage.
RopeTables = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps)`` over the last axis (computed in float32), times a weight if it has one."""

    def __init__(self, dim: int, weight: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return y if self.weight is None else y * self.weight


class GEGLU(nn.Module):
    """Gated MLP ``fc2(GELU(fc1_g x) · fc1_x x)`` with exact (erf) GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1_g(x)) * self.fc1_x(x))


class RoPE2D(nn.Module):
    """2-D rotary embedding of one square stage of ``n x n`` row-major tokens.

    Positions are stage-relative on a shared grid: token row r has position ``r / n * grid`` (so every
    stage spans 0..grid, top-left aligned). The first half of a head's channels rotates with the row
    position, the second half with the column position, in interleaved pairs (2m, 2m+1) that share
    the frequency ``10000^(-4m / head_dim)``.
    """

    def __init__(self, head_dim: int, grid: int = 16) -> None:
        super().__init__()
        half = head_dim // 2
        freqs = 1.0 / (10000 ** (torch.arange(0, half, 2)[: half // 2].float() / half))
        self.grid = grid
        # the reference stores these as a persistent buffer; here they are derived, never loaded
        self.register_buffer("freqs", freqs, persistent=False)

    def angles(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables ``[tokens, head_dim]`` for a stage of ``tokens`` (a square number)."""
        n = math.isqrt(tokens)
        freqs = self.get_buffer("freqs")
        pos = torch.arange(n, device=freqs.device).float() / n * self.grid
        axis = (pos[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # [n, head_dim / 2]
        half = axis.shape[-1]
        table = torch.cat([axis[:, None].expand(n, n, half), axis[None, :].expand(n, n, half)], -1)
        table = table.reshape(tokens, 2 * half)
        return table.cos(), table.sin()

    def forward(self, x: torch.Tensor, tables: RopeTables | None = None) -> torch.Tensor:
        """x ``[B, heads, tokens, head_dim]``; ``tables`` the stage's (cos, sin), else derived from its size."""
        cos, sin = self.angles(x.shape[2]) if tables is None else tables
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head self-attention with 2-D RoPE on q and k, optionally against the keys of earlier stages."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool, rope_grid: int = 16) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rope = RoPE2D(self.head_dim, rope_grid)

    def forward(
        self, x: torch.Tensor, past: KVCache | None = None, rope: RopeTables | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        """x ``[B, N, dim]`` (one stage); ``past`` the cached keys/values of earlier stages, already rotated.

        Returns the output and the cache extended by this stage. Without a mask: a stage's tokens see
        each other and every earlier stage (the block-causal training mask, one stage at a time).
        """
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.rope(q, rope), self.rope(k, rope)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out), (k, v)


class CrossAttention(nn.Module):
    """Attention from the head's tokens to the backbone output of the same tokens (RoPE on both sides)."""

    def __init__(self, dim: int, kv_dim: int, heads: int, rope_grid: int = 16) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.rope = RoPE2D(self.head_dim, rope_grid)

    def forward(self, x: torch.Tensor, context: torch.Tensor, rope: RopeTables | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).reshape(b, context.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(self.rope(q, rope), self.rope(k, rope), v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Backbone block: attention and MLP, each modulated and gated by the class embedding (adaLN)."""

    def __init__(self, dim: int, heads: int, hidden: int, rope_grid: int = 16) -> None:
        super().__init__()
        self.dim = dim
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias=True, rope_grid=rope_grid)
        self.mlp = GEGLU(dim, hidden)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, past: KVCache | None, rope: RopeTables | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        """x ``[B, N, dim]``, cond ``[B, dim]``."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond).view(-1, 1, 6, self.dim).unbind(2)
        h, cache = self.attn(self.norm1(x) * (1 + scale1) + shift1, past, rope)
        x = x + h * gamma1
        x = x + self.mlp(self.norm2(x) * (1 + scale2) + shift2) * gamma2
        return x, cache


class HeadBlock(nn.Module):
    """Flow-head block (FlowAR-S): self-attention and MLP under per-token adaLN from ``time + condition``."""

    def __init__(self, dim: int, heads: int, hidden: int, rope_grid: int = 16) -> None:
        super().__init__()
        self.dim = dim
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias=False, rope_grid=rope_grid)
        self.mlp = GEGLU(dim, hidden)
        self.ada_lin = nn.Linear(dim, 6 * dim)

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, c: torch.Tensor, z: torch.Tensor, rope: RopeTables | None = None
    ) -> torch.Tensor:
        """x, c ``[B, N, dim]``; temb ``[B, 1, dim]``; z (the raw backbone output) is unused here."""
        b, n, _ = x.shape
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(F.silu(temb + c)).view(b, n, 6, -1).unbind(2)
        x = x + self.attn(self.norm1(x) * (1 + scale1) + shift1, rope=rope)[0] * gamma1
        return x + self.mlp(self.norm2(x) * (1 + scale2) + shift2) * gamma2


class CrossHeadBlock(nn.Module):
    """Flow-head block (FlowAR-L/H): self-attention modulated by time alone, an ungated cross-attention to
    the backbone output, and an MLP under per-token adaLN from ``time + condition``."""

    def __init__(self, dim: int, heads: int, hidden: int, cond_dim: int, rope_grid: int = 16) -> None:
        super().__init__()
        self.dim = dim
        self.norm1, self.norm3 = RMSNorm(dim), RMSNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias=False, rope_grid=rope_grid)
        self.norm2_1, self.norm2_2 = RMSNorm(dim, weight=True), RMSNorm(cond_dim, weight=True)
        self.crossattn = CrossAttention(dim, cond_dim, heads, rope_grid)
        self.mlp = GEGLU(dim, hidden)
        self.ada_lin_attn = nn.Linear(dim, 3 * dim)
        self.ada_lin_mlp = nn.Linear(dim, 3 * dim)

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, c: torch.Tensor, z: torch.Tensor, rope: RopeTables | None = None
    ) -> torch.Tensor:
        b, n, _ = x.shape
        gamma1, scale1, shift1 = self.ada_lin_attn(F.silu(temb)).view(b, 1, 3, -1).unbind(2)
        gamma2, scale2, shift2 = self.ada_lin_mlp(F.silu(temb + c)).view(b, n, 3, -1).unbind(2)
        x = x + self.attn(self.norm1(x) * (1 + scale1) + shift1, rope=rope)[0] * gamma1
        x = x + self.crossattn(self.norm2_1(x), self.norm2_2(z), rope)
        return x + self.mlp(self.norm3(x) * (1 + scale2) + shift2) * gamma2
