"""Per-stage latency and FLOPs charts of a ``pipeline_speed`` result, drawn with Pillow.

Left panel: milliseconds per request spent in each stage (backbone + flow graph calls) and in
the decoder, one bar per ONNX Runtime variant, at the result's largest batch. Right panel:
GFLOP per image of each stage and the decoder, counted from the exported graphs. Values are
written on the bars.

    python benchmarks/charts.py [benchmarks/results/pipeline_speed*.json ...]

(re)draws ``<result>.png`` next to each JSON file; ``pipeline_speed.py`` calls :func:`draw`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from _common import RESULTS
from PIL import Image, ImageDraw, ImageFont

COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]
WIDTH, HEIGHT = 1500, 620
MARGIN_TOP, MARGIN_BOTTOM, MARGIN_LEFT = 110, 95, 90


def _font(size: int) -> Any:
    return ImageFont.load_default(size=size)


def _nice_max(value: float) -> float:
    """A round axis maximum at or above ``value`` (1, 2 or 5 × 10^k)."""
    if value <= 0:
        return 1.0
    power = 10.0 ** int(f"{value:e}".split("e")[1])
    for step in (1, 2, 5, 10):
        if value <= step * power:
            return step * power
    return 10 * power


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    groups: list[str],
    series: dict[str, list[float]],
    title: str,
    y_label: str,
    x_label: str,
    legend: bool = True,
) -> None:
    """Grouped bar chart of ``series`` (name -> one value per group) inside ``box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    small, normal = _font(13), _font(16)
    top = _nice_max(max((v for values in series.values() for v in values), default=1.0) * 1.08)
    draw.text(((x0 + x1) / 2, y0 - 38), title, font=_font(18), fill="black", anchor="mm")
    for tick in range(6):  # y grid and tick labels
        value = top * tick / 5
        y = y1 - (y1 - y0) * tick / 5
        draw.line([(x0, y), (x1, y)], fill="#e3e3e3")
        draw.text((x0 - 6, y), _fmt(value) if value else "0", font=small, fill="black", anchor="rm")
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill="black", width=2)
    label = Image.new("RGBA", (int(y1 - y0), 24), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((label.width / 2, 12), y_label, font=normal, fill="black", anchor="mm")
    rotated = label.rotate(90, expand=True)
    draw._image.paste(rotated, (x0 - 78, y0), rotated)  # type: ignore[attr-defined]
    draw.text(((x0 + x1) / 2, y1 + 48), x_label, font=normal, fill="black", anchor="mm")
    group_width = (x1 - x0) / len(groups)
    bar = min(56.0, group_width * 0.8 / max(1, len(series)))
    for g, group in enumerate(groups):
        centre = x0 + group_width * (g + 0.5)
        draw.text((centre, y1 + 18), group, font=small, fill="black", anchor="mm")
        left = centre - bar * len(series) / 2
        for s, values in enumerate(series.values()):
            value = values[g]
            height = (y1 - y0) * value / top
            bx = left + s * bar
            draw.rectangle([bx + 1, y1 - height, bx + bar - 1, y1], fill=COLOURS[s % len(COLOURS)])
            draw.text((bx + bar / 2, y1 - height - 3), _fmt(value), font=_font(11), fill="black", anchor="md")
    if legend:  # top left inside the panel (early stages are the cheap ones)
        lx, ly = x0 + 14, y0 + 6
        for s, name in enumerate(series):
            draw.rectangle([lx, ly + 20 * s, lx + 14, ly + 20 * s + 14], fill=COLOURS[s % len(COLOURS)])
            draw.text((lx + 20, ly + 20 * s + 7), name, font=small, fill="black", anchor="lm")


def draw(result: dict[str, Any], path: Path) -> Path:
    rows = [row for row in result["rows"] if "stages_s" in row]
    batch = max(row["batch"] for row in rows)
    rows = [row for row in rows if row["batch"] == batch]
    stages = len(rows[0]["stages_s"])
    groups = [f"stage {i + 1}" for i in range(stages)] + ["decoder"]
    latency = {row["variant"]: [1000 * s for s in row["stages_s"]] + [1000 * row["decoder_s"]] for row in rows}
    reference = next((row for row in rows if row["variant"] == "ort fp32"), rows[0])
    per_image = [f / batch / 1e9 for f in reference["flops_per_stage"]] + [reference["flops_decoder"] / batch / 1e9]
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    canvas = ImageDraw.Draw(image)
    machine = result.get("machine", {})
    canvas.text(
        (WIDTH / 2, 26),
        f"{result['preset']}: where the time and the FLOPs go, per stage",
        font=_font(22),
        fill="black",
        anchor="mm",
    )
    canvas.text(
        (WIDTH / 2, 52),
        f"ONNX Runtime CPU, {result['threads']} threads, batch {batch}, median of {result['repeats']} requests; "
        f"{machine.get('cpu_count', '?')}-core {machine.get('cpu_model') or 'CPU'}",
        font=_font(14),
        fill="#444444",
        anchor="mm",
    )
    split = int(WIDTH * 0.62)
    _panel(
        canvas,
        (MARGIN_LEFT, MARGIN_TOP, split - 40, HEIGHT - MARGIN_BOTTOM),
        groups,
        latency,
        f"latency per request (batch {batch})",
        "milliseconds",
        "stage (backbone + flow steps) and decoder",
    )
    _panel(
        canvas,
        (split + MARGIN_LEFT - 10, MARGIN_TOP, WIDTH - 30, HEIGHT - MARGIN_BOTTOM),
        groups,
        {"FLOPs": per_image},
        "FLOPs per image (fp32 graphs, incl. CFG)",
        "GFLOP per image",
        "stage and decoder",
        legend=False,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]] or sorted(RESULTS.glob("pipeline_speed*.json"))
    for path in paths:
        print(draw(json.loads(path.read_text()), path.with_suffix(".png")))


if __name__ == "__main__":
    main()
