"""What every model family's config is built from: bounded, validated plain data that travels as JSON.

A family's config (ECAR's :class:`ecar_export.families.ecar.config.ECARConfig`, FlowAR's
:class:`ecar_export.families.flowar.config.FlowARConfig`) is a frozen dataclass deriving from
:class:`ModelConfig` (stage grid, JSON round trip, errors naming the field) and, where it decodes with a
latent-diffusion KL autoencoder, :class:`TokenizerLayout`. It travels with the weights (checkpoint
metadata) and with the engines (manifest); the runtime reads only its card (family, name, class count).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from runtime.errors import ConfigError, shown
from runtime.limits import CFG_LIMIT, MAX_CLASSES  # noqa: F401  (the families' configs import them from here)

# How the decoder's raw output becomes an image in [0, 1]: "sigmoid", or "signed" for decoders trained on
# images in [-1, 1] (the latent-diffusion VAEs): clip((x + 1) / 2, 0, 1).
IMAGE_OUTPUTS = ("sigmoid", "signed")
MAX_TOKENIZER_LEVELS = 8
MAX_TOKENIZER_CHANNELS = 4096
TOKENIZER_INT_LIMITS = {"tokenizer_layers": 64, "tokenizer_groups": 4096}  # TokenizerLayout's integers
MAX_STAGES = 64
MAX_STEPS = 10_000  # Euler steps of one stage
MAX_TOKENS = 1 << 20  # tokens of all stages together
MAX_PARAMETERS = 50_000_000_000  # 200 GB of float32 weights


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
    kl-f8), which :mod:`ecar_export.tokenizer` builds. ECAR's ``kl`` tokenizer and FlowAR's decoder are
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
