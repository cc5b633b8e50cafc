"""Small building blocks shared by the backbone and the flow head."""

from __future__ import annotations

import math

import torch
from torch import nn


def zero_(module: nn.Module | torch.Tensor) -> None:
    """Zero every parameter of ``module`` (AdaLN-Zero gates and output layers start at zero)."""
    assert isinstance(module, nn.Module)
    for param in module.parameters():
        nn.init.zeros_(param)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation of a normalised activation."""
    return x * (1.0 + scale) + shift


class TanhGELU(nn.Module):
    """GELU, tanh approximation: ``nn.GELU(approximate="tanh")`` in torch, a fusable form in ONNX.

    Exported, the same function is written as ``(x·0.5)·(1 + tanh(√(2/π)·(x + 0.044715·x³)))``,
    the order ONNX Runtime's FastGelu fusion recognises: one fused kernel (with the preceding
    bias add) instead of eight elementwise passes over the MLP's widest activation. The
    exporter's own decomposition of ``gelu`` multiplies 0.5 with the bracket first and is not
    fused. Eager torch keeps its single GELU kernel, so the reference is not slowed.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return self.export_form(x)
        return nn.functional.gelu(x, approximate="tanh")

    @staticmethod
    def export_form(x: torch.Tensor) -> torch.Tensor:
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))
        return (x * 0.5) * (1.0 + torch.tanh(inner))


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of a flow time t in [0, 1] followed by a two-layer MLP."""

    def __init__(self, width: int, frequencies: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        half = frequencies // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = self.get_buffer("freqs")
        args = (t.reshape(-1, 1) * 1000.0) * freqs.reshape(1, -1)
        embedding: torch.Tensor = self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
        return embedding
