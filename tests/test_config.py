"""ECARConfig: JSON round trip, derived defaults and field validation (DESIGN §3)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from ecar_export.families.ecar.config import ECARConfig
from runtime.errors import ConfigError, ECARError

# A valid small config; every bad case below changes only the fields it names.
BASE: dict[str, Any] = {
    "image_size": 8,
    "latent_size": 4,
    "latent_channels": 4,
    "scales": (1, 2, 4),
    "steps": (2, 2, 2),
    "width": 32,
    "depth": 2,
    "heads": 2,
    "head_width": 32,
    "head_depth": 1,
}


def build(**changes: Any) -> ECARConfig:
    return ECARConfig(**{**BASE, **changes})


# ------------------------------------------------------------------ round trip
NON_DEFAULT_CONFIGS = [
    ECARConfig(),
    build(),
    build(
        name="custom-x",
        image_size=24,
        image_channels=3,
        latent_size=6,
        latent_channels=5,
        latent_scale=0.3712345678901234,
        tokenizer_width=12,
        scales=(1, 3, 6),
        window_bounds=(1.0, 0.8125, 0.1234567, 0.0),
        steps=(3, 1, 5),
        width=48,
        heads=4,
        mlp_ratio=2.5,
        head_width=40,
        head_depth=2,
        num_classes=7,
        cfg_scale=3.25,
        cfg_schedule="linear",
        class_dropout=0.0,
    ),
    build(scales=(4,), steps=(9,), cfg_scale=1.0),
]


@pytest.mark.parametrize("config", NON_DEFAULT_CONFIGS, ids=lambda c: c.name + "-" + "x".join(map(str, c.scales)))
@pytest.mark.parametrize("indent", [None, 2])
def test_json_round_trip_is_exact(config: ECARConfig, indent: int | None) -> None:
    text = config.to_json(indent=indent)
    restored = ECARConfig.from_json(text)
    assert restored == config
    assert restored.to_json(indent=indent) == text
    # the JSON is plain data a user can read: every field present, lists for the sequences
    data = json.loads(text)
    assert data["scales"] == list(config.scales)
    assert data["window_bounds"] == list(config.window_bounds)
    # bytes are accepted too
    assert ECARConfig.from_json(text.encode("utf-8")) == config


def test_round_trip_is_not_vacuous() -> None:
    # a changed field must change the JSON and break equality (so the round-trip test can fail)
    config = NON_DEFAULT_CONFIGS[2]
    changed = config.replace(latent_scale=config.latent_scale + 1e-12)
    assert changed != config
    assert changed.to_json() != config.to_json()


@pytest.mark.parametrize("stages", [1, 2, 3, 4, 5])
def test_window_bounds_default_is_uniform(stages: int) -> None:
    scales = tuple(2**s for s in range(stages))
    side = scales[-1]
    config = build(image_size=side, latent_size=side, scales=scales, steps=(1,) * stages)
    expected = [1.0 - s / stages for s in range(stages + 1)]
    assert len(config.window_bounds) == stages + 1
    assert config.window_bounds[0] == 1.0
    assert config.window_bounds[-1] == 0.0
    for got, want in zip(config.window_bounds, expected, strict=True):
        assert math.isclose(got, want, rel_tol=0.0, abs_tol=1e-12)


def test_lists_are_stored_as_tuples() -> None:
    config = build(scales=[1, 2, 4], steps=[2, 3, 4], window_bounds=[1.0, 0.5, 0.2, 0.0])
    assert config.scales == (1, 2, 4)
    assert config.steps == (2, 3, 4)
    assert config.window_bounds == (1.0, 0.5, 0.2, 0.0)
    hash(config)  # frozen and hashable (schedule tables are cached per config)


def test_derived_properties() -> None:
    config = build(scales=(1, 2, 4), width=32, heads=4)
    assert config.num_stages == 3
    assert config.tokens_per_stage == (1, 4, 16)
    assert config.total_tokens == 21
    assert config.head_dim == 8
    assert config.tokenizer_factor == 2
    assert config.null_class == config.num_classes


# ------------------------------------------------------------------ validation
# (changes, field names that must appear in the message)
BAD_FIELDS: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("image_size-not-multiple", {"image_size": 10, "latent_size": 4}, ("latent_size", "image_size")),
    ("image_size-ratio-3", {"image_size": 12, "latent_size": 4}, ("latent_size", "image_size")),
    ("image_size-smaller", {"image_size": 2, "latent_size": 4}, ("latent_size", "image_size")),
    ("image_channels-2", {"image_channels": 2}, ("image_channels",)),
    ("image_channels-0", {"image_channels": 0}, ("image_channels",)),
    ("latent_channels-0", {"latent_channels": 0}, ("latent_channels",)),
    ("latent_scale-0", {"latent_scale": 0.0}, ("latent_scale",)),
    ("latent_scale-negative", {"latent_scale": -1.5}, ("latent_scale",)),
    ("latent_scale-nan", {"latent_scale": float("nan")}, ("latent_scale",)),
    ("latent_scale-inf", {"latent_scale": float("inf")}, ("latent_scale",)),
    ("scales-not-increasing", {"scales": (2, 2, 4)}, ("scales",)),
    ("scales-decreasing", {"scales": (2, 1, 4)}, ("scales",)),
    ("scales-not-multiples", {"image_size": 10, "latent_size": 5, "scales": (1, 2, 5)}, ("scales",)),
    ("scales-last-not-latent_size", {"scales": (1, 2), "steps": (2, 2)}, ("scales",)),
    ("scales-empty", {"scales": (), "steps": ()}, ("scales",)),
    ("scales-zero", {"scales": (0, 2, 4)}, ("scales",)),
    ("window_bounds-too-short", {"window_bounds": (1.0, 0.5, 0.0)}, ("window_bounds",)),
    ("window_bounds-too-long", {"window_bounds": (1.0, 0.8, 0.5, 0.2, 0.0)}, ("window_bounds",)),
    ("window_bounds-not-from-1", {"window_bounds": (0.9, 0.6, 0.3, 0.0)}, ("window_bounds",)),
    ("window_bounds-not-to-0", {"window_bounds": (1.0, 0.6, 0.3, 0.1)}, ("window_bounds",)),
    ("window_bounds-not-decreasing", {"window_bounds": (1.0, 0.3, 0.6, 0.0)}, ("window_bounds",)),
    ("window_bounds-repeated", {"window_bounds": (1.0, 0.5, 0.5, 0.0)}, ("window_bounds",)),
    ("window_bounds-nan", {"window_bounds": (1.0, float("nan"), 0.3, 0.0)}, ("window_bounds",)),
    ("steps-wrong-length", {"steps": (2, 2)}, ("steps",)),
    ("steps-zero", {"steps": (2, 0, 2)}, ("steps",)),
    ("steps-bool", {"steps": (2, True, 2)}, ("steps",)),
    ("steps-float", {"steps": (2, 2.0, 2)}, ("steps",)),
    ("heads-not-dividing-width", {"width": 32, "heads": 3}, ("heads",)),
    ("cfg_schedule-unknown", {"cfg_schedule": "cosine"}, ("cfg_schedule",)),
    ("cfg_scale-nan", {"cfg_scale": float("nan")}, ("cfg_scale",)),
    ("class_dropout-1", {"class_dropout": 1.0}, ("class_dropout",)),
    ("class_dropout-negative", {"class_dropout": -0.1}, ("class_dropout",)),
    ("num_classes-0", {"num_classes": 0}, ("num_classes",)),
    ("depth-bool", {"depth": True}, ("depth",)),
    ("width-float", {"width": 32.0}, ("width",)),
    ("head_depth-string", {"head_depth": "2"}, ("head_depth",)),
    ("mlp_ratio-0", {"mlp_ratio": 0.0}, ("mlp_ratio",)),
    ("name-empty", {"name": ""}, ("name",)),
]


@pytest.mark.parametrize(("changes", "fields"), [c[1:] for c in BAD_FIELDS], ids=[c[0] for c in BAD_FIELDS])
def test_invalid_field_is_rejected_by_name(changes: dict[str, Any], fields: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        build(**changes)
    message = str(info.value)
    for field in fields:
        assert f"{field}" in message, message
    # the first-named field is the one the error reports as invalid
    assert f"'{fields[0]}'" in message, message
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, ECARError)


def test_bad_field_cases_are_valid_without_their_change() -> None:
    # every failure above comes from the change itself, never from the base
    build()
    build(image_size=10, latent_size=5, scales=(1, 5), steps=(2, 2))  # 5 is a multiple of 1


def test_replace_validates() -> None:
    with pytest.raises(ConfigError, match="'heads'"):
        build().replace(heads=5)


def test_from_json_rejects_unknown_fields_by_name() -> None:
    data = json.loads(build().to_json())
    data["flux_capacitor"] = 1
    data["another_field"] = "x"
    with pytest.raises(ConfigError) as info:
        ECARConfig.from_json(json.dumps(data))
    assert "flux_capacitor" in str(info.value)
    assert "another_field" in str(info.value)


@pytest.mark.parametrize(
    "text",
    ["{not json", "", '{"width": 32,}', b"\xff\xfe\x00garbage", "[1, 2, 3]", "null", '"a string"'],
    ids=["broken", "empty", "trailing-comma", "bad-bytes", "list", "null", "string"],
)
def test_from_json_rejects_invalid_json(text: str | bytes) -> None:
    with pytest.raises(ConfigError):
        ECARConfig.from_json(text)


def test_from_json_validates_values_by_name() -> None:
    data = json.loads(build().to_json())
    data["steps"] = [2, -1, 2]
    with pytest.raises(ConfigError, match="'steps'"):
        ECARConfig.from_json(json.dumps(data))


@pytest.mark.parametrize(("baseline", "multi_stage"), [("ecar-digits-s1", "ecar-digits"), ("ecar-b-s1", "ecar-b")])
def test_single_stage_presets_differ_from_their_model_only_in_the_stages(baseline: str, multi_stage: str) -> None:
    from ecar_export import presets

    single, multi = presets.architecture(baseline), presets.architecture(multi_stage)
    assert single.scales == (multi.latent_size,)
    assert single.window_bounds == (1.0, 0.0)
    assert sum(single.steps) == sum(multi.steps)  # the same total number of flow steps
    stage_fields = {"name", "scales", "window_bounds", "steps"}
    differing = {k for k, v in single.to_dict().items() if multi.to_dict()[k] != v}
    assert differing <= stage_fields
    assert ECARConfig.from_json(single.to_json()) == single
