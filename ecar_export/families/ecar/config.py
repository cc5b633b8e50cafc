"""ECAR's model configuration: every architectural and sampling choice of an ECAR model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Self

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

CFG_SCHEDULES = ("constant", "linear")
# The tokenizer's architecture: "conv", the demo's small convolutional autoencoder (tokenizer_width wide), or
# "kl", a latent-diffusion KL autoencoder (diffusers' AutoencoderKL: MAR's KL-16, Stable Diffusion's kl-f8),
# laid out by the tokenizer_* fields.
TOKENIZERS = ("conv", "kl")
# Upper bounds of the integer fields: generous for any image generator, small enough that a config
# asking for absurd sizes is refused before anything is allocated (a checkpoint's or a manifest's
# config is read before its tensors).
INT_LIMITS = {
    "image_size": 8192,
    "image_channels": 3,
    "latent_size": 1024,
    "latent_channels": 1024,
    "tokenizer_width": 4096,
    **TOKENIZER_INT_LIMITS,
    "width": 32768,
    "depth": 1024,
    "heads": 1024,
    "head_width": 32768,
    "head_depth": 1024,
    "num_classes": MAX_CLASSES,
}
TUPLE_FIELDS = ("scales", "window_bounds", "steps", "tokenizer_channels", "tokenizer_attention")


@dataclass(frozen=True)
class ECARConfig(ModelConfig, TokenizerLayout):
    """Architecture, latent layout and sampling schedule of one ECAR model.

    Defaults describe the bundled ``ecar-digits`` demo model.
    """

    TUPLE_FIELDS: ClassVar[tuple[str, ...]] = TUPLE_FIELDS

    name: str = "ecar-digits"
    # images and the tokenizer (a small convolutional autoencoder)
    image_size: int = 16
    image_channels: int = 1
    latent_size: int = 8
    latent_channels: int = 4
    latent_scale: float = 1.0
    # the model works on (latent - latent_shift) * latent_scale (diffusers' shift_factor and scaling_factor)
    latent_shift: float = 0.0
    tokenizer: str = "conv"
    tokenizer_width: int = 32
    # "kl" tokenizers: laid out by TokenizerLayout's fields (tokenizer_channels, ..., image_output)
    # stages: token grid side per stage, window boundaries tau_0 = 1 > ... > tau_S = 0, Euler steps
    scales: tuple[int, ...] = (1, 2, 4, 8)
    window_bounds: tuple[float, ...] = ()
    steps: tuple[int, ...] = (4, 4, 4, 4)
    # autoregressive backbone
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    # per-token flow head
    head_width: int = 128
    head_depth: int = 3
    # conditioning and guidance
    num_classes: int = 10
    cfg_scale: float = 2.0
    cfg_schedule: str = "constant"
    class_dropout: float = 0.1

    def __post_init__(self) -> None:
        self._lists_to_tuples()
        if not self.window_bounds and isinstance(self.scales, tuple) and self.scales:
            count = len(self.scales)
            object.__setattr__(self, "window_bounds", tuple(1.0 - s / count for s in range(count + 1)))
        self.validate()

    # ------------------------------------------------------------------ derived (and StageGrid's)
    @property
    def tokenizer_factor(self) -> int:
        return self.image_size // self.latent_size

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""

        bad = self._bad
        check_fields(self, INT_LIMITS, ("latent_scale", "latent_shift", "mlp_ratio", "cfg_scale", "class_dropout"), bad)
        if self.image_channels not in (1, 3):
            raise bad("image_channels", "must be 1 (grey) or 3 (RGB)")
        factor, rest = divmod(self.image_size, self.latent_size)
        if rest or factor < 1 or factor & (factor - 1):
            raise bad("latent_size", "image_size / latent_size must be a power of two (1, 2, 4, ...)")
        if not 1e-6 <= self.latent_scale <= 1e6:
            raise bad("latent_scale", "must lie in [1e-6, 1e6]")
        if abs(self.latent_shift) > 1e6:
            raise bad("latent_shift", "must lie in [-1e6, 1e6]")
        self._validate_tokenizer()
        if not 0 < self.mlp_ratio <= 64:
            raise bad("mlp_ratio", "must lie in (0, 64]")
        if abs(self.cfg_scale) > CFG_LIMIT:
            raise bad("cfg_scale", f"must lie in [-{CFG_LIMIT:g}, {CFG_LIMIT:g}]")
        if not 0.0 <= self.class_dropout < 1.0:
            raise bad("class_dropout", "must lie in [0, 1)")
        if self.width % self.heads:
            raise bad("heads", f"must divide width ({self.width})")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise bad("cfg_schedule", f"must be one of {', '.join(CFG_SCHEDULES)}")
        self._validate_stages()
        parameters = self.parameter_estimate()
        if parameters > MAX_PARAMETERS:
            raise ConfigError(
                f"invalid config: width {self.width}, depth {self.depth}, head {self.head_width}x{self.head_depth} and "
                f"{self.num_classes:,} classes ask for about {parameters / 1e9:,.0f} B parameters "
                f"({4 * parameters / 2**30:,.0f} GiB of float32 weights); this toolchain builds models of up to "
                f"{MAX_PARAMETERS / 1e9:.0f} B"
            )

    def parameter_estimate(self) -> int:
        """Roughly how many weights the architecture has (its matrices), from the config alone."""
        block = (4 + 2 * self.mlp_ratio + 6) * self.width**2  # attention, MLP, AdaLN modulation
        head = self.head_depth * 5 * self.head_width**2 + self.width * self.head_width
        embeddings = (self.num_classes + 1 + self.total_tokens) * self.width
        return int(self.depth * block + head + embeddings + self.tokenizer_parameter_estimate())

    def _validate_tokenizer(self) -> None:
        bad = self._bad
        if self.tokenizer not in TOKENIZERS:
            raise bad("tokenizer", f"must be one of {', '.join(TOKENIZERS)}")
        self._check_layout_fields(bad)
        if self.tokenizer == "conv":
            if self.tokenizer_channels or self.tokenizer_attention:
                raise bad(
                    "tokenizer_channels" if self.tokenizer_channels else "tokenizer_attention",
                    "applies to 'kl' tokenizers",
                )
            return
        self._check_kl_layout("a 'kl' tokenizer", self.image_size, self.latent_size, "image_size / latent_size", bad)

    def _validate_stages(self) -> None:
        bad = self._bad
        scales, bounds, steps = self.scales, self.window_bounds, self.steps
        self._check_scales(self.latent_size, "latent_size")
        if any(current % previous for previous, current in zip(scales, scales[1:])):
            raise bad("scales", "each scale must be a larger integer multiple of the one before")
        if not isinstance(bounds, tuple) or len(bounds) != len(scales) + 1:
            raise bad("window_bounds", f"needs {len(scales) + 1} values (one more than stages)")
        if any(isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) for b in bounds):
            raise bad("window_bounds", "every bound must be a finite number")
        if bounds[0] != 1.0 or bounds[-1] != 0.0:
            raise bad("window_bounds", "must start at 1.0 (noise) and end at 0.0 (data)")
        if any(later >= earlier for earlier, later in zip(bounds, bounds[1:])):
            raise bad("window_bounds", "must be strictly decreasing")
        if not isinstance(steps, tuple) or len(steps) != len(scales):
            raise bad("steps", f"needs one Euler step count per stage ({len(scales)})")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in steps):
            raise bad("steps", "every stage needs a positive integer number of steps")
        if max(steps) > MAX_STEPS:
            raise bad("steps", f"at most {MAX_STEPS:,} Euler steps per stage")

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``; new scales without new window_bounds get the uniform default."""
        if "scales" in changes and "window_bounds" not in changes:
            changes["window_bounds"] = ()
        return super().replace(**changes)
