"""Tokenizers: the autoencoders between images and latent grids, behind one interface.

Every tokenizer maps images [B, ch, H, W] in [0, 1] to latents [B, C, H/f, W/f] (``encode``, before
the model's ``latent_scale`` / ``latent_shift``) and back (``decode``, images in [0, 1]). The config's
``tokenizer`` field picks the architecture (:func:`make_tokenizer`):

* ``conv`` — the demo's small convolutional autoencoder (:class:`Tokenizer`), trained with it;
* ``kl`` — a latent-diffusion KL autoencoder as diffusers' ``AutoencoderKL`` (:class:`KLTokenizer`):
  MAR's KL-16 (16 channels, factor 16) and Stable Diffusion's kl-f8 (4 channels, factor 8) are two
  layouts of it. Published weights are converted into it by :mod:`ecar_export.vae`.

The ``kl`` tokenizer is built here for every model family: its layout is the config's
:class:`ecar_export.families.config.TokenizerLayout` fields plus the geometry :class:`KLLayoutConfig` names
(ECAR's config has them as fields, FlowAR's derives them from its own).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import nn

from ecar_export.families.ecar.config import ECARConfig


class KLLayoutConfig(Protocol):
    """What a config gives to lay out a ``kl`` tokenizer: TokenizerLayout's fields and the image / latent geometry."""

    @property
    def image_size(self) -> int: ...
    @property
    def image_channels(self) -> int: ...
    @property
    def latent_size(self) -> int: ...
    @property
    def latent_channels(self) -> int: ...
    @property
    def latent_scale(self) -> float: ...
    @property
    def latent_shift(self) -> float: ...
    @property
    def tokenizer_factor(self) -> int: ...
    @property
    def tokenizer_channels(self) -> tuple[int, ...]: ...
    @property
    def tokenizer_layers(self) -> int: ...
    @property
    def tokenizer_groups(self) -> int: ...
    @property
    def tokenizer_attention(self) -> tuple[int, ...]: ...
    @property
    def image_output(self) -> str: ...


def to_unit_range(raw: torch.Tensor, image_output: str) -> torch.Tensor:
    """The decoder's raw output as an image in [0, 1] (the config's ``image_output``)."""
    if image_output == "signed":
        return torch.clamp(raw * 0.5 + 0.5, 0.0, 1.0)
    return torch.sigmoid(raw)


class Tokenizer(nn.Module):
    """The ``conv`` tokenizer: image [B, ch, H, W] in [0, 1] <-> latent [B, C, H/f, W/f], f a power of two."""

    def __init__(self, config: ECARConfig) -> None:
        super().__init__()
        self.image_output = config.image_output
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
        return to_unit_range(self.decoder(latents), self.image_output)


def autoencoder_kl_config(config: KLLayoutConfig) -> dict[str, Any]:
    """The diffusers ``AutoencoderKL`` arguments of a ``kl`` tokenizer config (also its ``config.json`` keys).

    Encoder level i runs at ``image_size / 2**i``; the levels whose resolution is in
    ``tokenizer_attention`` have self-attention after each ResNet layer (MAR's KL-16: the last one).
    """
    channels = list(config.tokenizer_channels)
    down = [
        "AttnDownEncoderBlock2D" if config.image_size >> level in config.tokenizer_attention else "DownEncoderBlock2D"
        for level in range(len(channels))
    ]
    return {
        "in_channels": config.image_channels,
        "out_channels": config.image_channels,
        "down_block_types": down,
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": channels,
        "layers_per_block": config.tokenizer_layers,
        "act_fn": "silu",
        "latent_channels": config.latent_channels,
        "norm_num_groups": config.tokenizer_groups,
        "sample_size": config.image_size,
        "scaling_factor": config.latent_scale,
        "shift_factor": config.latent_shift or None,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }


class StatisticsGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters, same result) written as its statistics, so they are graph nodes.

    A group's mean and mean square (``ReduceMean``), the variance from them (clamped at 0) and the
    normalisation are plain ONNX ops in the exported graph, where the fp16 recipe keeps them in
    float32 (:mod:`ecar_export.precision.fp16`): in float16 a group's mean square overflows as soon as
    its values pass 256. A fused ``InstanceNormalization`` would leave that choice to each engine.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouped = x.reshape(x.shape[0], self.num_groups, -1)
        mean = grouped.mean(dim=-1, keepdim=True)
        mean_square = (grouped * grouped).mean(dim=-1, keepdim=True)
        variance = torch.relu(mean_square - mean * mean)
        normed = ((grouped - mean) / torch.sqrt(variance + self.eps)).reshape(x.shape)
        if not self.affine:
            return normed
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return normed * self.weight.reshape(shape) + self.bias.reshape(shape)


class KLTokenizer(nn.Module):
    """The ``kl`` tokenizer: a diffusers ``AutoencoderKL`` (weights under ``vae.``), latents its posterior mode.

    Its GroupNorms compute as :class:`StatisticsGroupNorm` (the same weights and results).
    """

    def __init__(self, config: KLLayoutConfig) -> None:
        super().__init__()
        from diffusers import AutoencoderKL

        self.image_output = config.image_output
        vae: Any = AutoencoderKL(**autoencoder_kl_config(config))
        for module in vae.modules():
            if type(module) is nn.GroupNorm:
                module.__class__ = StatisticsGroupNorm
        self.vae: Any = vae

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        moments = self.vae.quant_conv(self.vae.encoder(images * 2.0 - 1.0))
        return moments[:, : moments.shape[1] // 2]  # the mean; the rest is the log-variance

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return to_unit_range(self.vae.decoder(self.vae.post_quant_conv(latents)), self.image_output)


def make_tokenizer(config: ECARConfig) -> Tokenizer | KLTokenizer:
    """The tokenizer the config names (both have ``encode`` and ``decode``)."""
    return KLTokenizer(config) if config.tokenizer == "kl" else Tokenizer(config)
