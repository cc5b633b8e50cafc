"""``ecar-run``: engine directory in, images out (grid PNG + one PNG per sample)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from runtime.cli_support import console, fail_on_ecar_errors, parse_labels, progress_bar

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command(
    help=(
        "Generate images with a built ECAR engine directory (see `ecar-export build`). Writes grid.png with every "
        "sample captioned by its class, plus one PNG per sample, into --out and prints where. Sample i of a request "
        "with --seed S draws its noise from key (S, i), so the same command gives the same images on every backend."
    )
)
@fail_on_ecar_errors
def run(
    engine_dir: Annotated[Path, typer.Option("--engine-dir", help="Directory written by `ecar-export build`.")] = Path(
        "engines"
    ),
    labels: Annotated[str | None, typer.Option(help="Comma-separated class labels, e.g. 3,1,4.")] = None,
    per_class: Annotated[int | None, typer.Option("--per-class", help="N samples of every class (default 1).")] = None,
    seed: Annotated[int, typer.Option(help="Noise seed: sample i uses key (seed, i).")] = 0,
    cfg: Annotated[float | None, typer.Option(help="Guidance weight (default: the model's cfg_scale).")] = None,
    out: Annotated[Path, typer.Option(help="Output directory for the PNGs.")] = Path("out"),
    backend: Annotated[str, typer.Option(help="auto | onnxruntime | tensorrt.")] = "auto",
    device: Annotated[str, typer.Option(help="ONNX Runtime device: auto | cpu | cuda.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print paths and timings as JSON on stdout.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
) -> None:
    from runtime.images import write_outputs
    from runtime.pipeline import Pipeline

    pipe = Pipeline.from_dir(engine_dir, backend=backend, device=device)
    label_list = parse_labels(labels, per_class, pipe.config.num_classes)
    with progress_bar() as bar:
        task = bar.add_task("generating", total=len(label_list))
        result = pipe.generate_many(
            label_list, seed=seed, cfg=cfg, on_batch=lambda done, _: bar.update(task, completed=done)
        )
    grid, singles = write_outputs(result.images, label_list, out)
    if as_json:
        payload = {
            "grid": str(grid),
            "samples": [str(p) for p in singles],
            "labels": label_list,
            "seed": seed,
            "backend": pipe.backend.describe(),
            "timings": result.timings.to_dict(),
        }
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        sys.stdout.write(f"{grid}\n")
        console().print(
            f"{len(label_list)} samples in {result.timings.total:.2f} s on {pipe.backend.name}; "
            f"grid {grid}, one PNG per sample in {out}/"
        )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
