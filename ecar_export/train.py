"""Deterministic training of the demo model on the digits: tokenizer first, then ECAR."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ecar_export.data import split
from ecar_export.families.ecar.config import ECARConfig
from ecar_export.families.ecar.model import ECAR

Progress = Callable[[str, int, int, float], None]  # phase, step, total, loss


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0
    tokenizer_steps: int = 500
    tokenizer_batch: int = 128
    tokenizer_lr: float = 2e-3
    latent_noise: float = 0.1
    latent_penalty: float = 1e-3
    steps: int = 1000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    ema: float = 0.998
    head_repeats: int = 2
    threads: int = 2


def train_demo(config: ECARConfig, settings: TrainSettings, progress: Progress | None = None) -> ECAR:
    """Train tokenizer and ECAR on the digits' training half; returns the EMA model in eval mode."""
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    data = split("train")
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels)
    model = ECAR(config)
    scale = train_tokenizer(model, images, settings, progress)
    model.config = dataclasses.replace(config, latent_scale=scale)
    model.requires_grad_(True)
    model.tokenizer.requires_grad_(False)
    with torch.no_grad():
        tokens = model.encode_tokens(images)
    train_generator(model, tokens, labels, settings, progress)
    return model.eval()


def train_tokenizer(model: ECAR, images: torch.Tensor, settings: TrainSettings, progress: Progress | None) -> float:
    """Fit the autoencoder; returns the latent scale that makes latents unit-variance."""
    tokenizer = model.tokenizer
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=settings.tokenizer_lr)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    for step in range(settings.tokenizer_steps):
        index = torch.randint(0, len(images), (settings.tokenizer_batch,), generator=generator)
        batch = images[index]
        latents = tokenizer.encode(batch)
        noisy = latents + settings.latent_noise * latents.detach().std() * torch.randn(
            latents.shape, generator=generator
        )
        loss = torch.mean((tokenizer.decode(noisy) - batch) ** 2)
        loss = loss + settings.latent_penalty * torch.mean(latents**2)
        lr = settings.tokenizer_lr * _cosine(step, settings.tokenizer_steps, 50)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if progress:
            progress("tokenizer", step + 1, settings.tokenizer_steps, loss.item())
    with torch.no_grad():
        std = float(tokenizer.encode(images).std())
    return 1.0 / std


def train_generator(
    model: ECAR, tokens: torch.Tensor, labels: torch.Tensor, settings: TrainSettings, progress: Progress | None
) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed + 2)
    model.train()
    for step in range(settings.steps):
        index = torch.randint(0, len(tokens), (settings.batch,), generator=generator)
        loss = model.training_loss_tokens(tokens[index], labels[index], settings.head_repeats)
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * _cosine(step, settings.steps, settings.warmup)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(settings.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, param in zip(ema, params):
                average.lerp_(param.detach(), 1.0 - decay)
        if progress:
            progress("ecar", step + 1, settings.steps, loss.item())
    with torch.no_grad():
        for average, param in zip(ema, params):
            param.copy_(average)


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * 0.95 + 0.05
