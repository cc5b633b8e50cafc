"""``ecar-run``: engine directory in, images out (grid PNG + one PNG per sample); ``ecar-run serve``: HTTP."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from runtime.backends import selection
from runtime.cli_support import console, fail_on_ecar_errors, parse_labels, progress_bar

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.callback(
    invoke_without_command=True,
    help=(
        "Generate images with a built ECAR engine directory (see `ecar-export build`). Writes grid.png with every "
        "sample captioned by its class, plus one PNG per sample, into --out and prints where. Sample i of a request "
        "with --seed S draws its noise from key (S, i), so the same command gives the same images on every backend. "
        "`ecar-run serve` serves the engines over HTTP instead (see `ecar-run serve --help`)."
    ),
)
@fail_on_ecar_errors
def run(
    ctx: typer.Context,
    engine_dir: Annotated[Path, typer.Option("--engine-dir", help="Directory written by `ecar-export build`.")] = Path(
        "engines"
    ),
    labels: Annotated[str | None, typer.Option(help="Comma-separated class labels, e.g. 3,1,4.")] = None,
    per_class: Annotated[int | None, typer.Option("--per-class", help="N samples of every class (default 1).")] = None,
    seed: Annotated[int, typer.Option(help="Noise seed: sample i uses key (seed, i).")] = 0,
    cfg: Annotated[float | None, typer.Option(help="Guidance weight (default: the build's, its plan's cfg).")] = None,
    out: Annotated[Path, typer.Option(help="Output directory for the PNGs.")] = Path("out"),
    backend: Annotated[str, typer.Option(help=selection.RUN_HELP)] = "auto",
    device: Annotated[str, typer.Option(help=selection.DEVICE_HELP)] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print paths and timings as JSON on stdout.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    from runtime.images import write_outputs
    from runtime.pipeline import Pipeline

    pipe = Pipeline.from_dir(engine_dir, backend=backend, device=device)
    label_list = parse_labels(labels, per_class, pipe.model.num_classes)
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


@app.command(
    "serve",
    help=(
        "Serve a built engine directory over HTTP with Ray Serve until Ctrl-C: POST /generate "
        '(JSON {"labels": [3, 1], "seed": 0, "cfg": 1.5, "format": "png" | "npy"}), GET /healthz, GET /info. '
        "Concurrent requests are batched into shared engine batches (at most --max-batch samples, waiting at most "
        "--batch-wait-ms for a batch to fill); a request's images do not depend on what it shared a batch with. "
        "Starts a local Ray cluster, or joins one with --address. Needs the 'serve' extra: "
        "pip install 'ecar-export\\[serve]'."
    ),
)
@fail_on_ecar_errors
def serve_command(
    engine_dir: Annotated[Path, typer.Option("--engine-dir", help="Directory written by `ecar-export build`.")] = Path(
        "engines"
    ),
    replicas: Annotated[int, typer.Option(help="Replicas, each with its own copy of the engines.")] = 1,
    max_batch: Annotated[
        int | None, typer.Option("--max-batch", help="Most samples per engine batch (default: the engines' max batch).")
    ] = None,
    batch_wait_ms: Annotated[
        float, typer.Option("--batch-wait-ms", help="Longest wait for a batch to fill, in milliseconds.")
    ] = 10.0,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port of the HTTP API.")] = 8000,
    address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster (e.g. auto, or ray://head:10001) instead of starting one.")
    ] = None,
    cpus_per_replica: Annotated[
        float | None, typer.Option("--cpus-per-replica", help="CPUs per replica (default: cores / replicas).")
    ] = None,
    gpus_per_replica: Annotated[float, typer.Option("--gpus-per-replica", help="GPUs per replica.")] = 0.0,
    request_timeout_s: Annotated[
        float,
        typer.Option(
            "--request-timeout-s",
            help="Longest wait for a replica's answer; past it, or when a replica is lost, the request gets 503.",
        ),
    ] = 30.0,
    backend: Annotated[str, typer.Option(help=selection.RUN_HELP)] = "auto",
    device: Annotated[str, typer.Option(help=selection.DEVICE_HELP)] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Ray's logs and the access log.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
) -> None:
    from runtime.serving import ray_app as serve

    target = serve.application(
        engine_dir,
        replicas=replicas,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        backend=backend,
        device=device,
        cpus_per_replica=cpus_per_replica,
        gpus_per_replica=gpus_per_replica,
        request_timeout_s=request_timeout_s,
    )
    if address is None:
        serve.check_port_free(host, port)
    err = console()
    err.print(f"starting {replicas} replica(s) of {engine_dir} ...")
    url = serve.start(target, host=host, port=port, address=address, verbose=verbose)

    def announce(where: str) -> None:
        sys.stdout.write(f"{where}\n")
        sys.stdout.flush()
        err.print(f"serving on {where} (POST /generate, GET /healthz, GET /info); Ctrl-C stops")

    serve.serve_forever(url, announce)
    err.print("stopped")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
