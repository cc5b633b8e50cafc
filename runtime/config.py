"""The model configuration: every architectural and sampling choice of an ECAR model.

The config travels with the weights (checkpoint metadata) and with the engines
(manifest), so it is plain data: a frozen dataclass with a JSON round trip and a
validation that names the offending field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from runtime.errors import ConfigError, shown

CFG_SCHEDULES = ("constant", "linear")
# The tokenizer's architecture: "conv", the demo's small convolutional autoencoder (tokenizer_width wide), or
# "kl", a latent-diffusion KL autoencoder (diffusers' AutoencoderKL: MAR's KL-16, Stable Diffusion's kl-f8),
# laid out by the tokenizer_* fields.
TOKENIZERS = ("conv", "kl")
# How the decoder's raw output becomes an image in [0, 1]: "sigmoid", or "signed" for decoders trained on
# images in [-1, 1] (the latent-diffusion VAEs): clip((x + 1) / 2, 0, 1).
IMAGE_OUTPUTS = ("sigmoid", "signed")
MAX_TOKENIZER_LEVELS = 8
CFG_LIMIT = 100.0  # |guidance weight| allowed: far beyond useful values, far below float32 overflow
MAX_TOKENIZER_CHANNELS = 4096
TOKENIZER_INT_LIMITS = {"tokenizer_layers": 64, "tokenizer_groups": 4096}  # TokenizerLayout's integers
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
    "num_classes": 1_000_000,
}
MAX_STAGES = 64
MAX_STEPS = 10_000  # Euler steps of one stage
MAX_TOKENS = 1 << 20  # tokens of all stages together
MAX_PARAMETERS = 50_000_000_000  # 200 GB of float32 weights
TUPLE_FIELDS = ("scales", "window_bounds", "steps", "tokenizer_channels", "tokenizer_attention")


def check_fields(
    config: object, int_limits: Mapping[str, int], numbers: Iterable[str], bad: Callable[[str, str], ConfigError]
) -> None:
    """The checks every model family's config starts with: a name, bounded positive integers, finite numbers."""
    name = getattr(config, "name", None)
    if not isinstance(name, str) or not name:
        raise bad("name", "must be a non-empty string")
    for field_name, limit in int_limits.items():
        value = getattr(config, field_name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(field_name, "must be a positive integer")
        if value > limit:
            raise bad(field_name, f"must be at most {limit:,}")
    for field_name in numbers:
        value = getattr(config, field_name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(field_name, "must be a finite number")


class StageGrid:
    """What a scale-wise generator's config derives from its ``scales`` (the token grid side of each
    stage, coarse to fine) and its transformer's ``width`` and ``heads``; every model family's
    config mixes it in."""

    scales: tuple[int, ...]
    width: int
    heads: int

    @property
    def num_stages(self) -> int:
        return len(self.scales)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def tokens_per_stage(self) -> tuple[int, ...]:
        return tuple(side * side for side in self.scales)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens_per_stage)

    @property
    def stage_slices(self) -> tuple[tuple[int, int], ...]:
        """``(start, end)`` of each stage's tokens in the sequence of all stages."""
        ends = [sum(self.tokens_per_stage[: k + 1]) for k in range(self.num_stages)]
        return tuple(zip([0, *ends[:-1]], ends))


class ModelConfig(StageGrid):
    """What every model family's config shares besides its fields: plain data that travels as JSON
    (checkpoint metadata, manifests), errors that name the offending field, and the checks of the
    stage scales. A family's config is a frozen dataclass deriving from it."""

    TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ("scales",)  # fields that JSON holds as lists
    DESCRIBED: ClassVar[str] = "model config"  # how errors name the document

    num_classes: int

    @property
    def null_class(self) -> int:
        """The class-table row of the unconditional (guidance) branch: the one after the last label."""
        return self.num_classes

    def _lists_to_tuples(self) -> None:
        """In ``__post_init__``: the tuple fields given as lists (as JSON and keyword callers do) become tuples."""
        for name in self.TUPLE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    def _bad(self, name: str, why: str) -> ConfigError:
        return ConfigError(f"invalid config field '{name}' = {shown(getattr(self, name))}: {why}")

    def _check_scales(self, last: int, last_means: str) -> None:
        """``scales``: 1..MAX_STAGES positive integers, strictly increasing, the last ``last``; tokens bounded."""
        bad, scales = self._bad, self.scales
        if not isinstance(scales, tuple) or not scales:
            raise bad("scales", "must be a non-empty list of token-grid sides")
        if len(scales) > MAX_STAGES:
            raise bad("scales", f"at most {MAX_STAGES} stages")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in scales):
            raise bad("scales", "every scale must be a positive integer")
        if any(later <= earlier for earlier, later in zip(scales, scales[1:])):
            raise bad("scales", "must be strictly increasing")
        if scales[-1] != last:
            raise bad("scales", f"the last scale must equal {last_means} ({last})")
        if self.total_tokens > MAX_TOKENS:
            raise bad("scales", f"at most {MAX_TOKENS:,} tokens in all stages together")

    # ---------------------------------------------------------------- JSON I/O
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)  # type: ignore[call-overload]  # every subclass is a dataclass
        for name in self.TUPLE_FIELDS:
            data[name] = list(data[name])
        return dict(data)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        if not isinstance(data, dict):
            raise ConfigError(f"a {cls.DESCRIBED} must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
        if unknown:
            raise ConfigError(f"unknown {cls.DESCRIBED} field(s): {', '.join(map(str, unknown))}")
        values = dict(data)
        for name in cls.TUPLE_FIELDS:
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
            raise ConfigError(f"{cls.DESCRIBED} is not valid JSON: {shown(exc)}") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class TokenizerLayout:
    """The decoder fields every family's config shares: how the decoder's output becomes an image and the
    layout of a latent-diffusion KL autoencoder (diffusers' ``AutoencoderKL``: MAR's KL-16, Stable Diffusion's
    kl-f8), which :mod:`ecar_export.model.tokenizer` builds. ECAR's ``kl`` tokenizer and FlowAR's decoder are
    laid out by these fields; a family's config derives from it and may give other defaults."""

    LAYOUT_TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ("tokenizer_channels", "tokenizer_attention")

    # block_out_channels per level (one level per factor 2 of image side / latent side, plus one), ResNet layers
    # per encoder level (the decoder has one more), GroupNorm groups, and the encoder resolutions with
    # self-attention blocks (LDM's attn_resolutions; MAR's KL-16: 16)
    tokenizer_channels: tuple[int, ...] = ()
    tokenizer_layers: int = 2
    tokenizer_groups: int = 32
    tokenizer_attention: tuple[int, ...] = ()
    image_output: str = "sigmoid"

    def _check_layout_fields(self, bad: Callable[[str, str], ConfigError]) -> None:
        """``image_output`` and the element types of the layout lists (the integers go through check_fields)."""
        if self.image_output not in IMAGE_OUTPUTS:
            raise bad("image_output", f"must be one of {', '.join(IMAGE_OUTPUTS)}")
        for name in self.LAYOUT_TUPLE_FIELDS:
            values = getattr(self, name)
            if not isinstance(values, tuple) or any(
                isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_TOKENIZER_CHANNELS for v in values
            ):
                raise bad(name, f"must be a list of integers in [1, {MAX_TOKENIZER_CHANNELS}]")

    def _check_kl_layout(
        self, what: str, image_size: int, latent_size: int, ratio: str, bad: Callable[[str, str], ConfigError]
    ) -> None:
        """The KL layout between ``image_size``² images and ``latent_size``² latents (a power-of-two factor,
        ``ratio`` naming it): one channel count per level, groups dividing them, attention at encoder
        resolutions."""
        channels, attention = self.tokenizer_channels, self.tokenizer_attention
        factor = image_size // latent_size
        levels = factor.bit_length()  # factor 2**k: k downsampling steps, k + 1 levels
        if len(channels) != levels:
            raise bad(
                "tokenizer_channels",
                f"{what} from {image_size}² images to {latent_size}² latents has {levels} levels ({ratio} = "
                f"{factor}); give one channel count per level",
            )
        if levels > MAX_TOKENIZER_LEVELS:
            raise bad("tokenizer_channels", f"at most {MAX_TOKENIZER_LEVELS} levels")
        if any(c % self.tokenizer_groups for c in channels):
            raise bad("tokenizer_groups", f"must divide every tokenizer channel count {list(channels)}")
        resolutions = {image_size >> level for level in range(levels)}
        if any(r not in resolutions for r in attention):
            raise bad("tokenizer_attention", f"every entry must be an encoder resolution: {sorted(resolutions)}")

    def tokenizer_parameter_estimate(self) -> int:
        """Roughly how many weights the KL autoencoder has: two 3x3 convolutions per ResNet layer, a decoder level
        one layer more."""
        return sum(9 * 2 * (2 * self.tokenizer_layers + 1) * c * c for c in self.tokenizer_channels)


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
