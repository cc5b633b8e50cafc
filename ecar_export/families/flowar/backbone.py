"""FlowAR's autoregressive backbone: one scale (stage) at a time, against the keys of all earlier stages.

Stage 0's only token is the class embedding; stage k > 0 reads the previous stage's sampled tokens,
resampled to its own grid (bicubic up to a fixed grid, then an area mean down) and projected by
``z_proj``. An encoder and a decoder stack, each with its own learned position table, produce
``z``, which a third position table turns into the flow head's per-token condition.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ecar_export.families.flowar.config import FlowARConfig
from ecar_export.families.flowar.layers import Block, KVCache, RMSNorm, RopeTables


def _cubic(x: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel (torch's bicubic, A = -0.75)."""
    x = abs(x)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def bicubic_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """``[size_out, size_in]`` float64 matrix of torch's 1-D bicubic resize (half-pixel centres, no
    antialiasing, the four taps clamped to the border)."""
    out = torch.zeros(size_out, size_in, dtype=torch.float64)
    for i in range(size_out):
        src = (i + 0.5) * size_in / size_out - 0.5
        base = math.floor(src)
        for tap in (-1, 0, 1, 2):
            out[i, min(max(base + tap, 0), size_in - 1)] += _cubic(src - base - tap)
    return out


def area_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """``[size_out, size_in]`` float64 matrix of torch's 1-D area resize (adaptive average pooling)."""
    out = torch.zeros(size_out, size_in, dtype=torch.float64)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)
        out[i, start:end] = 1.0 / (end - start)
    return out


def resample_matrix(size_in: int, size_out: int, via: int) -> torch.Tensor:
    """The separable stage-input resampling, bicubic ``size_in -> via`` then area ``via -> size_out``, as one
    float32 ``[size_out, size_in]`` matrix M applied as ``M X Mᵀ`` to each channel's grid X."""
    return (area_matrix(via, size_out) @ bicubic_matrix(size_in, via)).float()


class Backbone(nn.Module):
    """The class-conditioned encoder-decoder transformer over stage token grids.

    Attribute names follow the authors' ``FlowAR`` module, so their keys load unchanged.
    """

    def __init__(self, config: FlowARConfig) -> None:
        super().__init__()
        self.config = config
        d, n, grid = config.width, config.total_tokens, config.rope_grid
        hidden = config.mlp_hidden(d, config.mlp_ratio)
        self.class_emb = nn.Embedding(config.num_classes + 1, d)
        self.z_proj = nn.Linear(config.token_dim, d)
        self.z_proj_ln = RMSNorm(d, weight=True)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n, d))
        self.encoder_blocks = nn.ModuleList(Block(d, config.heads, hidden, grid) for _ in range(config.encoder_depth))
        self.encoder_norm = RMSNorm(d, weight=True)
        self.decoder_embed = nn.Linear(d, d)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n, d))
        self.decoder_blocks = nn.ModuleList(Block(d, config.heads, hidden, grid) for _ in range(config.decoder_depth))
        self.decoder_norm = RMSNorm(d, weight=True)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, n, d))
        for table in (self.class_emb.weight, *self.position_tables()):
            nn.init.normal_(table, std=0.02)

    def position_tables(self) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        return self.encoder_pos_embed_learned, self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned

    def class_embedding(self, labels: torch.Tensor) -> torch.Tensor:
        """``[B, width]`` embeddings of class ids (``num_classes`` is the null class): the adaLN condition of
        every block and, as one token, stage 0's input."""
        return self.class_emb(labels)

    def stage_input(self, tokens: torch.Tensor, stage: int) -> torch.Tensor:
        """Input of ``stage`` (>= 1) from the previous stage's sampled tokens ``[B, s², token_dim]``."""
        scales = self.config.scales
        size_in, size_out = scales[stage - 1], scales[stage]
        m = resample_matrix(size_in, size_out, self.config.resample_size).to(tokens)
        b, _, c = tokens.shape
        grid = tokens.transpose(1, 2).reshape(b, c, size_in, size_in)
        grid = m @ grid @ m.T
        return self.z_proj(grid.reshape(b, c, size_out * size_out).transpose(1, 2))

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, stage: int, cache: list[KVCache] | None = None
    ) -> tuple[torch.Tensor, list[KVCache]]:
        """Run one stage: x ``[B, N_stage, width]`` (stage input), cond ``[B, width]`` (class embedding),
        ``cache`` the per-block keys/values of the stages before (None at stage 0).

        Returns the head condition ``z`` ``[B, N_stage, width]`` and the cache extended by this stage.
        """
        start, end = self.config.stage_slices[stage]
        rows = tuple(table[0, start:end] for table in self.position_tables())
        past: list[KVCache | None] = list(cache) if cache is not None else [None] * len(self.blocks())
        return self.transform(x, cond, rows, past)

    def blocks(self) -> list[Block]:
        """Every block, the encoder's then the decoder's (the order of the cache's layers)."""
        return [*self.encoder_blocks, *self.decoder_blocks]  # type: ignore[list-item]

    def transform(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        positions: tuple[torch.Tensor, ...],
        past: list[KVCache | None],
        rope: RopeTables | None = None,
    ) -> tuple[torch.Tensor, list[KVCache]]:
        """The two stacks on a stage input x ``[B, N, width]``: ``positions`` the stage's rows ``[N, width]`` of
        the encoder, decoder and diffusion position tables, ``past`` each block's cache of the stages before,
        ``rope`` the stage's rotary tables (derived from N when not given)."""
        encoder_rows, decoder_rows, diffusion_rows = positions
        depth = len(self.encoder_blocks)
        new: list[KVCache] = []
        h = self.z_proj_ln(x + encoder_rows)
        for i, block in enumerate(self.encoder_blocks):
            h, kv = block(h, cond, past[i], rope)
            new.append(kv)
        h = self.decoder_embed(self.encoder_norm(h)) + decoder_rows
        for i, block in enumerate(self.decoder_blocks, start=depth):
            h, kv = block(h, cond, past[i], rope)
            new.append(kv)
        return self.decoder_norm(h) + diffusion_rows, new
