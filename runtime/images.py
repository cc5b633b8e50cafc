"""Turning generated images into pixels and files a person can look at."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtime.fileio import atomic_path, output_dir


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images [B, ch, H, W] in [0, 1] -> uint8 [B, H, W, ch] (round half to even, clipped)."""
    pixels = np.clip(np.rint(np.asarray(images, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))


def _pil(pixels: np.ndarray):  # type: ignore[no-untyped-def]
    from PIL import Image

    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def grid_image(images: np.ndarray, labels: Sequence[int] | None = None, columns: int | None = None, zoom: int = 0):  # type: ignore[no-untyped-def]
    """A PIL image of uint8 [B, H, W, ch] samples in a grid, each cell captioned with its label."""
    from PIL import Image, ImageDraw

    count, height, width, channels = images.shape
    zoom = zoom or max(1, 64 // max(height, width))
    columns = columns or _row_length(labels, count)
    rows = -(-count // columns)
    caption = 12 if labels is not None else 0
    pad = 2
    cell_w, cell_h = width * zoom + pad, height * zoom + caption + pad
    mode = "L" if channels == 1 else "RGB"
    canvas = Image.new(mode, (columns * cell_w + pad, rows * cell_h + pad), color=255 if mode == "L" else (255,) * 3)
    draw = ImageDraw.Draw(canvas)
    for index in range(count):
        x0 = pad + (index % columns) * cell_w
        y0 = pad + (index // columns) * cell_h
        tile = _pil(images[index]).resize((width * zoom, height * zoom), Image.Resampling.NEAREST)
        canvas.paste(tile, (x0, y0 + caption))
        if labels is not None:
            draw.text((x0 + 1, y0), str(labels[index]), fill=0 if mode == "L" else (0, 0, 0))
    return canvas


def _row_length(labels: Sequence[int] | None, count: int) -> int:
    """One row per class when the labels come in equal runs (``--per-class N``), else rows of 10."""
    if labels is not None and count > 1:
        runs, run = [], 1
        for previous, current in zip(labels, labels[1:]):
            if current == previous:
                run += 1
            else:
                runs.append(run)
                run = 1
        runs.append(run)
        if len(runs) > 1 and len(set(runs)) == 1 and 1 < runs[0] <= 32:
            return runs[0]
    return min(count, 10)


def save_png(image, path: str | os.PathLike[str]) -> Path:  # type: ignore[no-untyped-def]
    """Write a PIL image as PNG atomically."""
    target = Path(path)
    with atomic_path(target) as temp:
        image.save(temp, format="PNG")
    return target


def write_outputs(
    images: np.ndarray, labels: Sequence[int], out_dir: str | os.PathLike[str], prefix: str = "sample"
) -> tuple[Path, list[Path]]:
    """Write ``grid.png`` plus one PNG per sample into ``out_dir``; returns their paths."""
    out = output_dir(out_dir, "--out")
    grid = save_png(grid_image(images, labels), out / "grid.png")
    singles = [
        save_png(_pil(pixels), out / f"{prefix}_{index:03d}_class{label}.png")
        for index, (pixels, label) in enumerate(zip(images, labels))
    ]
    return grid, singles
