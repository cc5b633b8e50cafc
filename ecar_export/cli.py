"""``ecar-export``: build engine directories, check and inspect them, evaluate, sample and train the demo."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ecar_export.precision import CALIBRATION_METHODS
from ecar_export.precision import HELP as PRECISION_HELP
from runtime.backends import selection
from runtime.cli_support import console, fail_on_ecar_errors, parse_labels, progress_bar, stdout_console

app = typer.Typer(
    help=(
        "Export ECAR image generators for deployment. `build` traces a checkpoint's stages into ONNX graphs "
        "(fp32, fp16 or int8) and, where TensorRT and a GPU exist, compiles TensorRT plans, into an engine directory "
        "that `ecar-run` runs; `check` compares a build with the torch model graph by graph; `inspect` lists its "
        "graphs, sizes and FLOPs; `eval` scores generated digits; `sample` runs the torch reference; `train-demo` "
        "retrains the bundled demo model."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _group(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
) -> None:
    """Export ECAR image generators."""


CheckpointOpt = Annotated[
    Path | None,
    typer.Option("--checkpoint", help="ECAR .safetensors checkpoint (default: the bundled ecar-digits demo)."),
]
PresetOpt = Annotated[
    str | None,
    typer.Option(
        "--preset",
        help="A named preset instead of a checkpoint: ecar-digits (trained, bundled); random init: ecar-digits-s1, "
        "ecar-b, ecar-b-s1, ecar-b-f8, ecar-l, ecar-h, flowar-s, flowar-l, flowar-h.",
    ),
]
EngineDirOpt = Annotated[Path, typer.Option("--engine-dir", help="Directory written by `ecar-export build`.")]
LabelsOpt = Annotated[str | None, typer.Option(help="Comma-separated class labels, e.g. 3,1,4.")]
PerClassOpt = Annotated[int | None, typer.Option("--per-class", help="N samples of every class.")]
SeedOpt = Annotated[int, typer.Option(help="Noise seed: sample i uses key (seed, i).")]
CfgOpt = Annotated[float | None, typer.Option(help="Guidance weight (default: the model's cfg_scale).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


def _model_source(checkpoint: Path | None, preset: str | None):  # type: ignore[no-untyped-def]
    """A checkpoint path where the model has one (so builds record the file's sha256), else the model."""
    from ecar_export import presets
    from runtime.errors import InvalidRequestError

    if checkpoint is not None and preset is not None:
        raise InvalidRequestError("--checkpoint and --preset exclude each other; give one of them")
    if checkpoint is not None:
        return checkpoint
    name = preset if preset is not None else presets.DEMO
    if name in presets.TRAINED:
        return presets.checkpoint_path(name)
    return presets.load(name)


def _model(checkpoint: Path | None, preset: str | None):  # type: ignore[no-untyped-def]
    from ecar_export import checkpoint as ckpt
    from ecar_export import families

    source = _model_source(checkpoint, preset)
    if not isinstance(source, Path):
        return source  # a preset's random-init model
    return families.named(ckpt.family_of(source)).load(source)


def _ecar_model(checkpoint: Path | None, preset: str | None, command: str):  # type: ignore[no-untyped-def]
    """The model of a command that samples with ECAR's torch reference sampler (``sample``, ``eval``)."""
    from ecar_export import families
    from runtime.errors import InvalidRequestError

    model = _model(checkpoint, preset)
    family = families.of(model).name
    if family != "ecar":
        raise InvalidRequestError(
            f"{command} samples with ECAR's torch reference and this is a {family} model; build it "
            "(ecar-export build) and generate with ecar-run, or compare graphs with ecar-export check"
        )
    return model


@app.command("sample")
@fail_on_ecar_errors
def sample_cmd(
    checkpoint: CheckpointOpt = None,
    preset: PresetOpt = None,
    labels: LabelsOpt = None,
    per_class: PerClassOpt = None,
    seed: SeedOpt = 0,
    cfg: CfgOpt = None,
    out: Annotated[Path, typer.Option(help="Output directory for the PNGs.")] = Path("out"),
) -> None:
    """Sample with the torch reference model: grid.png (captioned by class) plus one PNG per sample."""
    from runtime.images import to_uint8, write_outputs

    model = _ecar_model(checkpoint, preset, "ecar-export sample")
    label_list = parse_labels(labels, per_class, model.config.num_classes)
    result = model.sample(label_list, seed=seed, cfg=cfg)
    grid, _ = write_outputs(to_uint8(result.images.numpy()), label_list, out)
    sys.stdout.write(f"{grid}\n")


@app.command("build")
@fail_on_ecar_errors
def build_cmd(
    checkpoint: CheckpointOpt = None,
    preset: PresetOpt = None,
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "fp32",
    backend: Annotated[str, typer.Option(help=selection.BUILD_HELP)] = "auto",
    out: Annotated[Path, typer.Option(help="Engine directory to write (replaced atomically).")] = Path("engines"),
    max_batch: Annotated[int, typer.Option("--max-batch", help="Largest batch the engines accept.")] = 8,
    fuse_flow_loop: Annotated[
        bool,
        typer.Option(
            "--fuse-flow-loop",
            help="Write each stage's Euler loop as one graph (flow_loop: an ONNX Loop over the flow step) instead of "
            "one flow_step call per step.",
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Rebuild every graph, even those unchanged since the last build in --out; int8: capture the "
            "calibration inputs again even where the kept set still matches.",
        ),
    ] = False,
    calibration_method: Annotated[
        str,
        typer.Option(
            "--calibration-method",
            help=f"INT8 only: {' | '.join(CALIBRATION_METHODS)}. Activations are calibrated on real stage inputs "
            "captured from the fp32 pipeline (--calibration-requests × 8 samples; every 8th request held out).",
        ),
    ] = "minmax",
    calibration_requests: Annotated[
        int | None,
        typer.Option(
            "--calibration-requests",
            min=1,
            max=1_000_000,
            help="INT8 only: requests of 8 samples the calibration capture runs (labels cycle through the classes). "
            "Default: the fewest whose calibration part holds every class, at least 64 (245 for 1000 classes; "
            "on two CPU cores ecar-b with its KL-16 decoder captures about 2 requests a minute).",
            show_default=False,
        ),
    ] = None,
    calibration_some_classes: Annotated[
        bool,
        typer.Option(
            "--calibration-some-classes",
            help="INT8 only: let --calibration-requests hold fewer than every class (default then 64 requests). "
            "For models with many classes: the classes it misses are quantized with the ranges measured on the "
            "others, so check the build (`ecar-export check`) and look at images of those classes.",
        ),
    ] = False,
) -> None:
    """Trace every stage of a model into ONNX graphs (and engines) plus a manifest, in --out."""
    from ecar_export.build import build_engines
    from runtime import manifest as manifest_io

    source = _model_source(checkpoint, preset)

    def announce(chosen: str) -> None:
        console().print(f"backend: {chosen}" + (" (auto)" if backend == "auto" else ""))
        if chosen == "onnxruntime" and precision != "fp32":
            console().print(
                f"TensorRT is not available here: writing the {precision} ONNX graphs for ONNX Runtime; "
                "compile them into TensorRT plans on a GPU machine with `ecar-export build --backend tensorrt`"
            )

    with progress_bar() as bar:
        task = bar.add_task("exporting", total=None)

        def report(name: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=f"exporting {name}")

        path = build_engines(
            source,
            out,
            precision=precision,
            backend=backend,
            max_batch=max_batch,
            fuse_flow_loop=fuse_flow_loop,
            progress=report,
            force=force,
            calibration_method=calibration_method,
            calibration_requests=calibration_requests,
            on_backend=announce,
            calibration_every_class=not calibration_some_classes,
        )
    sys.stdout.write(f"{path.parent}\n")
    written = manifest_io.load(path.parent, verify_files=False)
    reused = [name for name, entry in written.graphs.items() if entry.reused]
    note = (
        f" ({len(reused)} of {len(written.graphs)} graphs unchanged and reused; --force rebuilds them)"
        if reused
        else ""
    )
    if written.calibration is not None and written.calibration.reused:
        note += "; calibration inputs of the previous capture reused (same weights, plan and toolchain)"
    console().print(f"wrote {path}{note}")


@app.command("check")
@fail_on_ecar_errors
def check_cmd(
    engine_dir: EngineDirOpt = Path("engines"),
    checkpoint: CheckpointOpt = None,
    preset: PresetOpt = None,
    batch: Annotated[int, typer.Option(help="Batch size of the random test inputs.")] = 2,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="A calibration set (e.g. an int8 build's calibration/ folder) whose held-out stage inputs replace "
            "the random ones; int8 builds use their own by default."
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the random inputs (default: fresh).")] = None,
    backend: Annotated[
        str,
        typer.Option(
            help="Run the graphs with onnxruntime (default) or openvino (at the precision it runs the build at)."
        ),
    ] = "onnxruntime",
    as_json: JsonOpt = False,
) -> None:
    """Compare every graph of a build with the torch model at every stage it runs (polygraphy Comparator)."""
    import json

    from rich.table import Table

    from ecar_export.check import check_build

    model = _model(checkpoint, preset)
    results, used_seed = check_build(
        engine_dir, model, batch=batch, seed=seed, calibration_dir=calibration, backend=backend
    )
    if as_json:
        sys.stdout.write(json.dumps({"seed": used_seed, "graphs": [vars(r) for r in results]}, indent=2) + "\n")
    else:
        table = Table(title=f"{engine_dir} on {backend} vs torch (input seed {used_seed})")
        for column in ("graph", "stage", "file", "sha256", "inputs", "max abs", "cosine", "result"):
            table.add_column(column)
        for r in results:
            table.add_row(
                r.graph,
                str(r.stage),
                r.file,
                "ok" if r.sha_ok else "MISMATCH",
                r.inputs,
                f"{r.max_abs:.3g}",
                f"{r.cosine:.7f}",
                "pass" if r.ok else f"FAIL{': ' + r.error if r.error else ''}",
            )
        stdout_console().print(table)
    failed = [f"{r.graph}@stage{r.stage}" for r in results if not r.ok]
    if failed:
        console().print(f"check failed for: {', '.join(failed)}")
        raise SystemExit(1)


@app.command("inspect")
@fail_on_ecar_errors
def inspect_cmd(
    engine_dir: EngineDirOpt = Path("engines"),
    as_json: JsonOpt = False,
) -> None:
    """List a build's graphs: precision, file size, input shapes and FLOPs of one call at the opt batch."""
    import json

    from ecar_export.inspect_report import format_rows, inspect_rows

    rows = inspect_rows(engine_dir)
    if as_json:
        sys.stdout.write(json.dumps({"engine_dir": str(engine_dir), "graphs": rows}, indent=2) + "\n")
    else:
        sys.stdout.write(format_rows(rows) + "\n")


@app.command("eval")
@fail_on_ecar_errors
def eval_cmd(
    checkpoint: CheckpointOpt = None,
    preset: PresetOpt = None,
    engine_dir: Annotated[
        Path | None, typer.Option("--engine-dir", help="Evaluate a built engine directory instead of a checkpoint.")
    ] = None,
    per_class: Annotated[int, typer.Option("--per-class", help="Samples per class.")] = 50,
    seed: SeedOpt = 0,
    cfg: CfgOpt = None,
    backend: Annotated[str, typer.Option(help="With --engine-dir: " + selection.RUN_HELP)] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Class accuracy and Fréchet distance of generated digits (classifier trained on held-out real digits)."""
    import json

    from ecar_export.evaluate import evaluate

    sampler, source = _eval_sampler(checkpoint, preset, engine_dir, cfg, backend)
    with progress_bar() as bar:
        task = bar.add_task("sampling", total=per_class * 10)
        result = evaluate(
            sampler, per_class=per_class, seed=seed, progress=lambda done, total: bar.update(task, completed=done)
        )
    if as_json:
        sys.stdout.write(json.dumps({"source": source, **result.to_dict()}, indent=2) + "\n")
        return
    stdout_console().print(
        f"{source}: {result.samples} samples\n"
        f"  class accuracy     {100 * result.accuracy:.1f} %   (classifier on real training digits: "
        f"{100 * result.classifier_accuracy_on_real:.1f} %)\n"
        f"  Fréchet distance   {result.frechet_distance:.3f}   (real-data floor: {result.frechet_floor:.3f})"
    )


def _eval_sampler(  # type: ignore[no-untyped-def]
    checkpoint: Path | None, preset: str | None, engine_dir: Path | None, cfg: float | None, backend: str
):
    from ecar_export.evaluate import pipeline_sampler, torch_sampler
    from runtime.errors import InvalidRequestError

    if engine_dir is not None:
        if checkpoint is not None or preset is not None:
            raise InvalidRequestError("--engine-dir excludes --checkpoint / --preset")
        from runtime.pipeline import Pipeline

        pipe = Pipeline.from_dir(engine_dir, backend=backend)
        return pipeline_sampler(pipe, cfg), f"engines {engine_dir} ({pipe.backend.name}, {pipe.manifest.precision})"
    if backend != "auto":
        raise InvalidRequestError("--backend applies to --engine-dir only; the checkpoint runs on torch")
    model = _ecar_model(checkpoint, preset, "ecar-export eval")
    return torch_sampler(model, cfg), f"torch {checkpoint or preset or 'ecar-digits (bundled)'}"


@app.command("train-demo")
@fail_on_ecar_errors
def train_demo_cmd(
    out: Annotated[Path, typer.Option("--out", help="Where to write the trained checkpoint.")] = Path(
        "ecar-digits.safetensors"
    ),
    steps: Annotated[int, typer.Option(help="ECAR optimisation steps.")] = 1000,
    tokenizer_steps: Annotated[int, typer.Option(help="Autoencoder optimisation steps.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of every random choice in training.")] = 0,
) -> None:
    """Train the ecar-digits demo (tokenizer, then ECAR) on scikit-learn's digits, deterministically."""
    from ecar_export import checkpoint, presets
    from ecar_export.train import TrainSettings, train_demo

    settings = TrainSettings(seed=seed, steps=steps, tokenizer_steps=tokenizer_steps)
    with progress_bar() as bar:
        tasks = {
            "tokenizer": bar.add_task("tokenizer", total=settings.tokenizer_steps),
            "ecar": bar.add_task("ecar", total=settings.steps),
        }

        def report(phase: str, step: int, total: int, loss: float) -> None:
            bar.update(tasks[phase], completed=step, description=f"{phase} loss {loss:.4f}")

        model = train_demo(presets.architecture(presets.DEMO), settings, report)
    checkpoint.save(model, out)
    console().print(f"wrote {out}")


@app.command("convert")
@fail_on_ecar_errors
def convert_cmd(
    *,
    backbone: Annotated[
        Path | None,
        typer.Option(
            "--backbone",
            help="ECAR: the .safetensors checkpoint of the trained backbone and flow head; its config names the VAE "
            "layout (tokenizer 'kl', tokenizer_channels, latent_channels, latent_scale, ...). Tokenizer tensors in it, "
            "if any, are replaced.",
        ),
    ] = None,
    flowar: Annotated[
        Path | None,
        typer.Option(
            "--flowar",
            help="FlowAR, instead of --backbone: the authors' checkpoint (FlowAR-S.pth, FlowAR-L.pth, FlowAR-H.pth), "
            "a state dict that is flat or under 'model_ema' (preferred) or 'model', read with "
            "torch.load(weights_only=True). Its VAE is MAR's kl16.ckpt.",
        ),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            help="FlowAR only: the model the --flowar weights are, flowar-s, flowar-l or flowar-h (reduced test "
            "models: flowar-tiny, flowar-tiny-cross). Default: inferred from the weights' tensor shapes (S, L and H "
            "differ in width and depth).",
        ),
    ] = None,
    vae: Annotated[
        Path,
        typer.Option(
            "--vae",
            help="The VAE: an LDM / MAR checkpoint (kl16.ckpt: {'model': state_dict} or a bare state dict with "
            "encoder.*, decoder.*, quant_conv.*, post_quant_conv.*; .ckpt / .pth / .pt / .bin are read with "
            "torch.load(weights_only=True): tensors only), a .safetensors file (LDM or diffusers names) or a "
            "diffusers AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors).",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="The checkpoint to write (.safetensors, written atomically; nothing is written on a refusal). An "
            "ECAR one builds with `ecar-export build --checkpoint OUT`.",
        ),
    ],
) -> None:
    """Join trained weights and a published VAE (MAR's KL-16, SD's kl-f8, ...) into one safetensors checkpoint.

    ECAR (--backbone): every VAE tensor is mapped to diffusers' AutoencoderKL names and checked against the layout
    the backbone's config describes. FlowAR (--flowar): the authors' .pth and MAR's kl16.ckpt become one checkpoint
    holding the generator, the KL-16 decoder and the config, which `ecar-export build` takes like an ECAR one. Names,
    shapes, floating-point dtypes, finite values and the latent grid are checked; a misfit is refused naming the
    tensor and both shapes, and nothing is written. Examples:

        ecar-export convert --backbone ecar-b.safetensors --vae kl16.ckpt --out ecar-b-kl16.safetensors

        ecar-export convert --flowar FlowAR-S.pth --vae kl16.ckpt --out flowar-s.safetensors
    """
    from runtime.errors import InvalidRequestError

    if (backbone is None) == (flowar is None):
        raise InvalidRequestError(
            "give the trained weights with --backbone PATH (an ECAR checkpoint) or --flowar PATH (the authors' "
            "FlowAR .pth), one of them"
        )
    if backbone is not None:
        if config is not None:
            raise InvalidRequestError("--config applies to --flowar; an ECAR --backbone checkpoint carries its config")
        from ecar_export.vae import convert

        path = convert(backbone, vae, out)
        sys.stdout.write(f"{path}\n")
        console().print(f"wrote {path}; build it with `ecar-export build --checkpoint {path}`")
        return
    from ecar_export.families.flowar import PRESETS
    from ecar_export.families.flowar import convert as flowar_convert

    if config is not None and config not in PRESETS:
        raise InvalidRequestError(f"--config {config!r}: FlowAR models are {', '.join(PRESETS)}")
    assert flowar is not None
    path = flowar_convert.convert(flowar, vae, out, PRESETS[config] if config is not None else None)
    sys.stdout.write(f"{path}\n")
    console().print(f"wrote {path} (FlowAR, KL-16 decoder); build it with `ecar-export build --checkpoint {path}`")


# What `ecar-export` needs beyond the runtime layer (the `export` extra), as import names.
EXPORT_LAYER = (
    "torch",
    "onnx",
    "onnxscript",
    "onnx_ir",
    "onnx_graphsurgeon",
    "polygraphy",
    "safetensors",
    "sklearn",
    "diffusers",
)
INSTALL_EXPORT = "pip install torch==2.13.0 && pip install 'ecar-export[export,onnxruntime]'"


def missing_export_layer() -> list[str]:
    """Packages of the export layer (or an ONNX Runtime, CPU or GPU build) that cannot be imported here."""
    import importlib.util

    missing = [name for name in EXPORT_LAYER if importlib.util.find_spec(name) is None]
    if importlib.util.find_spec("onnxruntime") is None:  # onnxruntime and onnxruntime-gpu both provide it
        missing.append("onnxruntime")
    return missing


def main() -> None:
    asks_for_help = len(sys.argv) < 2 or any(arg in ("--help", "-h") for arg in sys.argv[1:])
    missing = [] if asks_for_help else missing_export_layer()
    if missing:
        console().print(
            f"error: ecar-export needs the export layer, which is not installed here (missing: {', '.join(missing)}). "
            f"Install it with: {INSTALL_EXPORT} (the CPU build of torch first; use 'ecar-export[export,gpu]' on a "
            "CUDA machine). The runtime alone (ecar-run, from runtime import Pipeline) needs none of it."
        )
        raise SystemExit(2)
    app()


if __name__ == "__main__":
    main()
