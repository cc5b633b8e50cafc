"""The autoregressive backbone: a pre-norm AdaLN transformer over stage token grids.

Training runs every stage in one sequence under a block-causal mask; inference runs one
stage at a time against a token-major KV cache ``[tokens, layers, 2, rows, heads, head_dim]``
(:func:`runtime.graphs.kv_shape`): the cache of the stages before a stage is a prefix of the
request's cache, and each stage emits the rows of its own tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from ecar_export.families.ecar.config import ECARConfig
from ecar_export.families.ecar.layers import TanhGELU, modulate, zero_


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(
        self, x: torch.Tensor, past: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, N, D]; past [T, 2, B, h, dh] (token-major keys/values) or None; mask additive [N, T + N] or None.

        Returns the output [B, N, D] and this call's own keys and values, each [B, h, N, dh].
        """
        rows, tokens, width = x.shape
        qkv = self.qkv(x).reshape(rows, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        keys, values = k, v
        if past is not None:
            keys = torch.cat([past[:, 0].permute(1, 2, 0, 3), k], dim=2)
            values = torch.cat([past[:, 1].permute(1, 2, 0, 3), v], dim=2)
        scores = (q * self.head_dim**-0.5) @ keys.transpose(-1, -2)
        if mask is not None:
            scores = scores + mask
        out = torch.softmax(scores, dim=-1) @ values
        out = out.transpose(1, 2).reshape(rows, tokens, width)
        return self.proj(out), k, v


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), TanhGELU(), nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, past: torch.Tensor | None, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond).unsqueeze(1).chunk(6, dim=-1)
        attn, k, v = self.attn(modulate(self.norm1(x), shift1, scale1), past, mask)
        x = x + gate1 * attn
        x = x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x, k, v


class Backbone(nn.Module):
    def __init__(self, config: ECARConfig) -> None:
        super().__init__()
        width = config.width
        self.config = config
        self.class_embed = nn.Embedding(config.num_classes + 1, width)
        self.start_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.total_tokens, width))
        self.level_embed = nn.Embedding(config.num_stages, width)
        self.in_proj = nn.Linear(config.latent_channels, width)
        self.blocks = nn.ModuleList(Block(width, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        offsets = [0]
        for tokens in config.tokens_per_stage:
            offsets.append(offsets[-1] + tokens)
        self.offsets = tuple(offsets)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for param in (self.start_token, self.pos_embed, self.class_embed.weight, self.level_embed.weight):
            nn.init.normal_(param, std=0.02)
        for block in self.blocks:
            zero_(block.ada)
        zero_(self.final_ada)

    def stage_inputs(self, stage: int, cond: torch.Tensor, upsampled_prev: torch.Tensor | None) -> torch.Tensor:
        """Input tokens [rows, N_s, D] of a stage given as a Python int (training): the start token for
        stage 0, else Linear(U(Q_{s-1}))."""
        lo, hi = self.offsets[stage], self.offsets[stage + 1]
        if upsampled_prev is None:
            tokens = (self.start_token + cond.unsqueeze(1)).expand(-1, hi - lo, -1)
        else:
            tokens = self.in_proj(upsampled_prev)
        return tokens + self.pos_embed[:, lo:hi] + self.level_embed.weight[stage]

    def stage_tokens(
        self, cond: torch.Tensor, upsampled: torch.Tensor, positions: torch.Tensor, level: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`stage_inputs` with the stage as data: ``positions`` [N] rows of the position table,
        ``level`` [1]; level 0 takes the start token (``upsampled`` is then ignored)."""
        projected = self.in_proj(upsampled)
        start = (self.start_token + cond.unsqueeze(1)).expand_as(projected)
        tokens = torch.where(level.reshape(1, 1, 1) == 0, start, projected)
        return tokens + self.pos_embed[0, positions] + self.level_embed(level)

    def _run(
        self, x: torch.Tensor, cond: torch.Tensor, past: torch.Tensor | None, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        new_kv = []
        for layer, block in enumerate(self.blocks):
            x, k, v = block(x, cond, None if past is None else past[:, layer], mask)
            new_kv.append((k, v))
        shift, scale = self.final_ada(cond).unsqueeze(1).chunk(2, dim=-1)
        return modulate(self.final_norm(x), shift, scale), new_kv

    def forward_cached(
        self, tokens: torch.Tensor, cond: torch.Tensor, past: torch.Tensor, kv_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One stage against the cache of the stages before it (``past`` [T, L, 2, rows, h, dh], T may be 0).

        Returns z [rows, N, D] and the keys/values of the tokens ``kv_tokens`` selects,
        token-major [E, L, 2, rows, h, dh] (E may be 0: then nothing is assembled).
        """
        z, new_kv = self._run(tokens, cond, past, None)
        emitted = [
            torch.stack([k.index_select(2, kv_tokens), v.index_select(2, kv_tokens)]).permute(3, 0, 1, 2, 4)
            for k, v in new_kv
        ]  # per layer [E, 2, rows, h, dh]
        return z, torch.stack(emitted, dim=1)

    def forward_prefix(self, cond: torch.Tensor, upsampled: list[torch.Tensor | None]) -> torch.Tensor:
        """All stages 0..len(upsampled)-1 in one sequence under the block-causal mask: z [rows, T, D]."""
        stages = len(upsampled)
        x = torch.cat([self.stage_inputs(s, cond, upsampled[s]) for s in range(stages)], dim=1)
        return self._run(x, cond, None, self.block_causal_mask(stages).to(x.dtype))[0]

    def block_causal_mask(self, stages: int) -> torch.Tensor:
        """Additive mask: a token of stage s sees every token of stages <= s."""
        level = torch.cat([torch.full((self.offsets[s + 1] - self.offsets[s],), s) for s in range(stages)])
        allowed = level[None, :] <= level[:, None]
        return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
