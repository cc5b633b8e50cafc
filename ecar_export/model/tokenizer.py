"""The tokenizer: a small convolutional autoencoder between images and latent grids."""

from __future__ import annotations

import math

import torch
from torch import nn

from runtime.config import ECARConfig


class Tokenizer(nn.Module):
    """Image [B, ch, H, W] in [0, 1] <-> latent [B, C, H/f, W/f], f a power of two."""

    def __init__(self, config: ECARConfig) -> None:
        super().__init__()
        width, channels = config.tokenizer_width, config.image_channels
        levels = int(math.log2(config.tokenizer_factor))
        encoder: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.SiLU()]
        for _ in range(levels):
            encoder += [nn.Conv2d(width, width, 4, stride=2, padding=1), nn.SiLU()]
        encoder += [nn.Conv2d(width, width, 3, padding=1), nn.SiLU()]
        encoder += [nn.Conv2d(width, config.latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*encoder)
        decoder: list[nn.Module] = [nn.Conv2d(config.latent_channels, width, 3, padding=1), nn.SiLU()]
        decoder += [nn.Conv2d(width, width, 3, padding=1), nn.SiLU()]
        for _ in range(levels):
            decoder += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1), nn.SiLU()]
        decoder += [nn.Conv2d(width, channels, 3, padding=1)]
        self.decoder = nn.Sequential(*decoder)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images * 2.0 - 1.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(latents))
