"""FlowAR's configuration: the architecture and the reference sampling settings of one model.

Plain data like :class:`ecar_export.families.ecar.config.ECARConfig`: a frozen dataclass with a JSON round trip (it
travels in a converted checkpoint's metadata) and a validation that names the offending field.
The presets carry the numbers of the authors' FlowAR-S, -L and -H.

The decoder (MAR's KL-16 VAE) is laid out by the fields every family shares
(:class:`ecar_export.families.config.TokenizerLayout`: ``tokenizer_channels``, ``tokenizer_layers``,
``tokenizer_groups``, ``tokenizer_attention``, ``image_output``) and built by
:class:`ecar_export.tokenizer.KLTokenizer`, as ECAR's ``kl`` tokenizer is; the properties
``image_channels``, ``latent_size``, ``latent_channels``, ``latent_shift`` and ``tokenizer_factor``
give it FlowAR's geometry under the names it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ecar_export.families.config import (
    CFG_LIMIT,
    MAX_CLASSES,
    MAX_PARAMETERS,
    MAX_STEPS,
    TOKENIZER_INT_LIMITS,
    ModelConfig,
    TokenizerLayout,
    check_fields,
)
from runtime.errors import ConfigError

HEAD_HEAD_DIM = 64  # the flow head always splits its width into heads of 64 channels
INT_LIMITS = {
    "image_size": 8192,
    "vae_stride": 64,
    "token_dim": 1024,
    "width": 32768,
    "encoder_depth": 1024,
    "decoder_depth": 1024,
    "heads": 1024,
    "head_width": 32768,
    "head_depth": 1024,
    "num_classes": MAX_CLASSES,
    "steps": MAX_STEPS,
    "resample_size": 1024,
    "rope_grid": 1024,
    **TOKENIZER_INT_LIMITS,
}
# MAR's KL-16 (LDM ch 128, ch_mult 1, 1, 2, 2, 4, two ResNet layers per encoder level and three per decoder level,
# self-attention in the encoder's 16x16 level and in the middle, GroupNorm 32): 256² images to 16x16x16 latents
KL16_CHANNELS = (128, 128, 256, 256, 512)
KL16_ATTENTION = (16,)
MAX_STAGES = 64


@dataclass(frozen=True)
class FlowARConfig(ModelConfig, TokenizerLayout):
    """Architecture and sampling settings of one FlowAR model. Defaults describe FlowAR-S."""

    DESCRIBED: ClassVar[str] = "FlowAR config"
    TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ("scales", *TokenizerLayout.LAYOUT_TUPLE_FIELDS)

    name: str = "flowar-s"
    # latent layout: a KL-16 tokenizer maps 256x256 images to 16x16 grids of 16-channel tokens
    image_size: int = 256
    vae_stride: int = 16
    token_dim: int = 16
    latent_scale: float = 0.2325  # tokens are the tokenizer's latents times this; divided out before decoding
    scales: tuple[int, ...] = (1, 2, 4, 8, 16)
    # backbone: encoder and decoder stacks of equal width (the decoder's adaLN takes the class embedding)
    width: int = 768
    encoder_depth: int = 6
    decoder_depth: int = 6
    heads: int = 12
    mlp_ratio: float = 4.0
    # flow head: a small transformer over a stage's tokens; `cross` adds cross-attention to the backbone output
    head_width: int = 1024
    head_depth: int = 2
    cross: bool = False
    num_classes: int = 1000  # labels 0..num_classes-1; row num_classes of the class table is the null class
    # sampling (the authors' README settings)
    steps: int = 25
    cfg: float = 4.3
    guidance: float = 0.9  # guidance applies while t <= this
    # geometry fixed by the reference code: the stage-input resampling goes through this grid, and RoPE
    # maps every stage onto positions 0..rope_grid
    resample_size: int = 16
    rope_grid: int = 16
    # decoder: MAR's KL-16 (TokenizerLayout's fields, with FlowAR's defaults); its output in [-1, 1] maps to [0, 1]
    tokenizer_channels: tuple[int, ...] = KL16_CHANNELS
    tokenizer_attention: tuple[int, ...] = KL16_ATTENTION
    image_output: str = "signed"

    def __post_init__(self) -> None:
        self._lists_to_tuples()
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def grid(self) -> int:
        """Side of the final token grid."""
        return self.image_size // self.vae_stride

    # the decoder's geometry under the names the KL tokenizer reads (ecar_export.tokenizer.KLLayoutConfig)
    @property
    def image_channels(self) -> int:
        return 3

    @property
    def latent_size(self) -> int:
        return self.grid

    @property
    def latent_channels(self) -> int:
        return self.token_dim

    @property
    def latent_shift(self) -> float:
        return 0.0

    @property
    def tokenizer_factor(self) -> int:
        return self.vae_stride

    @property
    def head_heads(self) -> int:
        return self.head_width // HEAD_HEAD_DIM

    @staticmethod
    def mlp_hidden(width: int, mlp_ratio: float = 4.0) -> int:
        """GEGLU hidden width: two thirds of ``width * mlp_ratio``, truncated as the reference does."""
        return int(width * mlp_ratio * 2 / 3.0)

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        bad = self._bad
        check_fields(self, INT_LIMITS, ("latent_scale", "mlp_ratio", "cfg", "guidance"), bad)
        if not isinstance(self.cross, bool):
            raise bad("cross", "must be true or false")
        if not 1e-6 <= self.latent_scale <= 1e6:
            raise bad("latent_scale", "must lie in [1e-6, 1e6]")
        if not 0 < self.mlp_ratio <= 64:
            raise bad("mlp_ratio", "must lie in (0, 64]")
        if abs(self.cfg) > CFG_LIMIT:
            raise bad("cfg", f"must lie in [-{CFG_LIMIT:g}, {CFG_LIMIT:g}]")
        if not 0.0 <= self.guidance <= 1.0:
            raise bad("guidance", "must lie in [0, 1]")
        if self.steps < 2:
            raise bad("steps", "needs at least 2 (the reference time grid is empty below that)")
        if self.image_size % self.vae_stride:
            raise bad("vae_stride", f"must divide image_size ({self.image_size})")
        if self.vae_stride & (self.vae_stride - 1):
            raise bad("vae_stride", "must be a power of two (each level of the KL decoder doubles the resolution)")
        self._check_layout_fields(bad)
        self._check_kl_layout("the KL decoder", self.image_size, self.grid, "image_size / vae_stride", bad)
        if self.width % self.heads or (self.width // self.heads) % 4:
            raise bad("heads", f"must divide width ({self.width}) into heads of a multiple of 4 channels (2-D RoPE)")
        if self.head_width % HEAD_HEAD_DIM:
            raise bad("head_width", f"must be a multiple of {HEAD_HEAD_DIM} (the head's attention head size)")
        self._validate_scales()
        parameters = self.parameter_estimate()
        if parameters > MAX_PARAMETERS:
            raise ConfigError(
                f"invalid config: width {self.width}, depth {self.encoder_depth}+{self.decoder_depth}, head "
                f"{self.head_width}x{self.head_depth} ask for about {parameters / 1e9:,.0f} B parameters; this "
                f"toolchain builds models of up to {MAX_PARAMETERS / 1e9:.0f} B"
            )

    def _validate_scales(self) -> None:
        self._check_scales(self.grid, "image_size / vae_stride")
        if any(self.resample_size % s for s in self.scales):
            raise self._bad("resample_size", "every scale must divide it (the stage input is an area mean over it)")

    def parameter_estimate(self) -> int:
        """Roughly how many weights the architecture has, from the config alone."""
        w, h = self.width, self.head_width
        block = (4 + 3 * 2 / 3 * self.mlp_ratio + 6) * w * w
        head_block = (4 + 3 * 2 / 3 * 4.0 + 6 + (3 if self.cross else 0)) * h * h
        tables = (self.num_classes + 1 + 3 * self.total_tokens) * w
        generator = (self.encoder_depth + self.decoder_depth) * block + self.head_depth * head_block + tables
        return int(generator + self.tokenizer_parameter_estimate())


# The authors' models (factories flowar_small / flowar_large / flowar_huge, README eval settings; eval.sh uses
# cfg 4.2 for S and cfg 2.8 for H instead).
FLOWAR_S = FlowARConfig()
FLOWAR_L = FlowARConfig(
    name="flowar-l", width=1024, encoder_depth=8, decoder_depth=8, heads=16, head_width=1024, head_depth=12,
    cross=True, cfg=2.4, guidance=0.9,
)  # fmt: skip
FLOWAR_H = FlowARConfig(
    name="flowar-h", width=1536, encoder_depth=15, decoder_depth=15, heads=16, head_width=1536, head_depth=12,
    cross=True, steps=50, cfg=2.4, guidance=0.7,
)  # fmt: skip
# Reduced models for tests and golden fixtures: the real latent geometry and scale schedule, small widths; a
# KL-16-shaped decoder (five levels, attention in the encoder's 16x16 level and in the middle) of narrow channels.
FLOWAR_TINY = FlowARConfig(
    name="flowar-tiny", width=32, encoder_depth=2, decoder_depth=2, heads=2, head_width=64, head_depth=2,
    tokenizer_channels=(8, 8, 16, 16, 32), tokenizer_layers=1, tokenizer_groups=8,
)  # fmt: skip
FLOWAR_TINY_CROSS = FLOWAR_TINY.replace(
    name="flowar-tiny-cross", head_width=128, head_depth=1, cross=True, steps=50, cfg=2.4, guidance=0.7
)

PRESETS = {c.name: c for c in (FLOWAR_S, FLOWAR_L, FLOWAR_H, FLOWAR_TINY, FLOWAR_TINY_CROSS)}
