"""Named model presets: the bundled trained demo and random-initialised paper-scale architectures.

ECAR's presets are defined here; other families' (``flowar-s``, ``flowar-l``, ``flowar-h``) are their
family's (:attr:`ecar_export.families.Family.presets`) and load the same way, by name.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ecar_export.families.ecar.config import ECARConfig
from runtime.errors import ConfigError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEMO = "ecar-digits"

# The latent-diffusion VAEs of the paper-scale presets, as diffusers AutoencoderKL layouts.
# MAR's KL-16 (LDM ch 128, ch_mult 1,1,2,2,4, two ResNet layers per level, attention in the encoder's
# 16×16 level): 256² images to 16×16×16 latents, which MAR models multiplied by 0.2325.
KL16 = {
    "tokenizer": "kl",
    "tokenizer_channels": (128, 128, 256, 256, 512),
    "tokenizer_layers": 2,
    "tokenizer_groups": 32,
    "tokenizer_attention": (16,),
    "latent_scale": 0.2325,
    "image_output": "signed",
}
# Stable Diffusion's kl-f8 (sd-vae-ft-mse; LDM ch 128, ch_mult 1,2,4,4): 256² images to 32×32×4 latents,
# scaled by 0.18215.
KL_F8 = {**KL16, "tokenizer_channels": (128, 256, 512, 512), "tokenizer_attention": (), "latent_scale": 0.18215}

# Paper-scale architectures (random init, for export and benchmarks): 256×256 RGB,
# 16×16×16 KL-16 latents, scales 1, 2, 4, 8, 16.
_ECAR_B = ECARConfig(
    name="ecar-b",
    image_size=256,
    image_channels=3,
    latent_size=16,
    latent_channels=16,
    **KL16,  # type: ignore[arg-type]
    scales=(1, 2, 4, 8, 16),
    steps=(4, 4, 4, 4, 4),
    width=768,
    depth=12,
    heads=12,
    head_width=768,
    head_depth=6,
    num_classes=1000,
    cfg_scale=4.0,
)

_CONFIGS: dict[str, ECARConfig] = {
    # Trained demo: 16×16 grey digits, conv tokenizer to 8×8×4 latents, four stages.
    "ecar-digits": ECARConfig(cfg_scale=1.1),
    # The DiT-style single-stage baseline of the demo: one window [1, 0] at full resolution,
    # the same total number of flow steps (16).
    "ecar-digits-s1": ECARConfig(name="ecar-digits-s1", scales=(8,), steps=(16,), cfg_scale=1.1),
    "ecar-b": _ECAR_B,
    # The single-stage (S = 1) baseline of ecar-b: one window at the full 16×16 grid, the same
    # total number of flow steps (20 = 5 × 4); architecture otherwise identical.
    "ecar-b-s1": replace(_ECAR_B, name="ecar-b-s1", scales=(16,), steps=(20,), window_bounds=()),
    # ecar-b's backbone and flow head on Stable Diffusion's kl-f8 latents: a 32×32×4 grid, so one stage more
    # (scales 1 ... 32; the last stage has 1,024 tokens).
    "ecar-b-f8": replace(
        _ECAR_B,
        name="ecar-b-f8",
        latent_size=32,
        latent_channels=4,
        **KL_F8,  # type: ignore[arg-type]
        scales=(1, 2, 4, 8, 16, 32),
        steps=(4, 4, 4, 4, 4, 4),
        window_bounds=(),
    ),
    "ecar-l": replace(_ECAR_B, name="ecar-l", width=1024, depth=24, heads=16, head_width=1024, head_depth=8),
    # Paper scale, for the scale benchmark: ecar-b's latent layout with the backbone of the peers' largest
    # models (VAR-d30: width 1920, depth 30, 30 heads of 64) and MAR-H's flow head (width 1536, 12 blocks).
    # 2.1 B parameters, 8.6 GB of float32 weights.
    "ecar-h": replace(_ECAR_B, name="ecar-h", width=1920, depth=30, heads=30, head_width=1536, head_depth=12),
}
TRAINED = {DEMO: WEIGHTS_DIR / f"{DEMO}.safetensors"}


def _other_families() -> dict[str, Any]:
    """Preset name -> (family, config) of the presets other families define."""
    from ecar_export import families

    return {name: (family, config) for family in families.all_families() for name, config in family.presets.items()}


def names() -> list[str]:
    return sorted(_CONFIGS) + sorted(_other_families())


def architecture(name: str) -> ECARConfig:
    """The preset's config as written here, before training (latent_scale still 1)."""
    try:
        return _CONFIGS[name]
    except KeyError:
        raise ConfigError(f"unknown preset '{name}'; known presets: {', '.join(names())}") from None


def config(name: str) -> ECARConfig:
    """The config of any preset; for a trained preset, the one stored with its weights."""
    if name in TRAINED and TRAINED[name].is_file():
        from ecar_export import checkpoint

        return checkpoint.read_config(TRAINED[name])
    return architecture(name)


def checkpoint_path(name: str) -> Path:
    if name not in TRAINED:
        raise ConfigError(f"preset '{name}' has no trained weights; trained presets: {', '.join(TRAINED)}")
    return TRAINED[name]


def load(name: str):  # type: ignore[no-untyped-def]
    """A preset as a model: trained weights where the preset has them, a seeded random init otherwise."""
    import torch

    from ecar_export import checkpoint
    from ecar_export.families.ecar.model import ECAR

    if name in TRAINED:
        return checkpoint.load(checkpoint_path(name))
    others = _other_families()
    torch.manual_seed(0)
    if name in others:
        family, family_config = others[name]
        return family.create(family_config).eval()
    return ECAR(config(name)).eval()
