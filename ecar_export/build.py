"""``build_engines``: checkpoint in, engine directory out.

A build exports every graph of the contract into a staging directory inside the
target, gives each file a content-addressed name (``backbone_1-<sha12>.onnx``), moves
the files in beside whatever an earlier build left there, and then replaces
``manifest.json`` atomically — the single commit point. A build that dies before that
leaves the previous build loadable and untouched; files of the previous build that
the new manifest no longer names are removed only after the commit. One build at a time
may write into a directory (an advisory lock); graphs whose build key is unchanged since
the previous build are reused.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ecar_export import checkpoint, export, presets
from ecar_export.model import ECAR
from runtime import manifest as manifest_io
from runtime.errors import BackendUnavailableError, ECARError, InvalidRequestError, OutputError
from runtime.fileio import sha256_file
from runtime.graphs import graph_specs

Progress = Callable[[str, int, int], None]  # graph name, graphs done, graphs in all
MAX_BATCH_LIMIT = 4096
RECIPE_VERSION = 1  # bump when export or a precision recipe changes what a graph file holds


def resolve_backend(backend: str) -> str:
    """``auto`` -> tensorrt where TensorRT imports and a GPU is present, else onnxruntime."""
    if backend == "onnxruntime":
        return backend
    if backend in ("tensorrt", "auto"):
        if importlib.util.find_spec("tensorrt") is not None and _gpu_present():
            return "tensorrt"
        if backend == "tensorrt":
            raise BackendUnavailableError(
                "TensorRT is not available here (the 'tensorrt' package is not importable "
                "or no NVIDIA GPU is visible); "
                "install the 'tensorrt' extra on a GPU machine, or use --backend onnxruntime"
            )
        return "onnxruntime"
    raise InvalidRequestError(f"unknown backend '{backend}': use auto, onnxruntime or tensorrt")


def _gpu_present() -> bool:
    return Path("/dev/nvidiactl").exists() or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))


def load_model(source: ECAR | str | os.PathLike[str] | None) -> tuple[ECAR, str]:
    """The model to build and the sha256 that identifies its weights."""
    if isinstance(source, ECAR):
        digest = hashlib.sha256()
        for name, tensor in sorted(source.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        digest.update(source.config.to_json().encode())
        return source.eval(), digest.hexdigest()
    path = Path(source) if source is not None else presets.checkpoint_path(presets.DEMO)
    model = checkpoint.load(path)
    return model, sha256_file(path)


def toolchain_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for package in ("ecar-export", "torch", "onnx", "onnxruntime", "onnxscript", "onnx-graphsurgeon", "polygraphy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    versions["tensorrt"] = None
    return versions


def build_engines(
    model_or_checkpoint_path: ECAR | str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] = "engines",
    precision: str = "fp32",
    backend: str = "onnxruntime",
    max_batch: int = 8,
    fuse_flow_loop: bool = False,
    progress: Progress | None = None,
    force: bool = False,
) -> Path:
    """Export (and, for TensorRT, compile) every graph; returns the manifest's path.

    Graphs whose build key (weights, config, precision, opset, tool versions, builder
    options) matches the previous build in ``out_dir`` are reused unless ``force``.
    """
    if precision not in manifest_io.PRECISIONS:
        raise InvalidRequestError(f"unknown precision '{precision}': use fp32, fp16 or int8")
    if precision == "int8":
        raise ECARError("precision 'int8' is not yet supported by this version; build with --precision fp32 or fp16")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise InvalidRequestError(f"--max-batch must be an integer in [1, {MAX_BATCH_LIMIT}], got {max_batch!r}")
    chosen = resolve_backend(backend)
    if chosen == "tensorrt":
        raise BackendUnavailableError(
            "the TensorRT builder is not available in this version; use --backend onnxruntime"
        )
    model, weights_digest = load_model(model_or_checkpoint_path)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out '{out}' exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot write engines into '{out}': {exc.strerror or exc}; choose a writable --out"
        ) from None
    with _build_lock(out):
        for leftover in out.glob(".staging-*"):  # from builds that were killed
            shutil.rmtree(leftover, ignore_errors=True)
        try:
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
        except OSError as exc:
            raise OutputError(f"cannot write engines into '{out}': {exc.strerror or exc}") from None
        try:
            toolchain = toolchain_versions()
            keys = {
                spec.name: _graph_key(spec.to_dict(), spec.name, weights_digest, model, precision, toolchain)
                for spec in graph_specs(model.config, fuse_flow_loop)
            }
            reusable = {} if force else _reusable_graphs(out, keys)
            graphs_data = _export_all(model, staging, out, precision, fuse_flow_loop, keys, reusable, progress)
            manifest = {
                "format": manifest_io.FORMAT,
                "format_version": manifest_io.FORMAT_VERSION,
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "model": model.config.to_dict(),
                "schedule": _schedule_summary(model),
                "precision": precision,
                "backend": chosen,
                "fuse_flow_loop": fuse_flow_loop,
                "profile": {"min_batch": 1, "opt_batch": max(1, min(max_batch, 8)), "max_batch": max_batch},
                "checkpoint_sha256": weights_digest,
                "opset": export.OPSET,
                "toolchain": toolchain,
                "graphs": graphs_data,
            }
            previous = _previous_files(out)
            path = manifest_io.write(out, manifest)
            current = {str(entry["file"]) for entry in graphs_data.values()}
            for stale in previous - current:
                (out / stale).unlink(missing_ok=True)
            return path
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    """One build at a time per engine directory (an advisory lock the OS drops if we die)."""
    import fcntl

    try:
        handle = open(out / ".build.lock", "a+b")  # noqa: SIM115 - held for the whole build
    except OSError as exc:
        raise OutputError(
            f"cannot write engines into '{out}': {exc.strerror or exc}; choose a writable --out"
        ) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(f"another build is writing into '{out}'; wait for it or choose another --out") from None
        yield


def _graph_key(
    contract: dict[str, object], name: str, weights: str, model: ECAR, precision: str, tools: dict[str, str | None]
) -> str:
    """Everything a graph file depends on, hashed: equal keys mean an identical graph."""
    payload = {
        "graph": name,
        "contract": contract,
        "weights": weights,
        "config": model.config.to_dict(),
        "precision": precision,
        "opset": export.OPSET,
        "tools": tools,
        "recipe_version": RECIPE_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _reusable_graphs(out: Path, keys: dict[str, str]) -> dict[str, dict[str, object]]:
    """Graph records of the previous build whose key is unchanged and whose file is intact."""
    try:
        old = manifest_io.load(out)
    except ECARError:
        return {}
    records = old.raw.get("graphs", {})
    reusable = {}
    for name, record in records.items():
        if name in keys and isinstance(record, dict) and record.get("build_key") == keys[name]:
            reusable[name] = record
    return reusable


def _export_all(
    model: ECAR,
    staging: Path,
    out: Path,
    precision: str,
    fused: bool,
    keys: dict[str, str],
    reusable: dict[str, dict[str, object]],
    progress: Progress | None,
) -> dict[str, dict[str, object]]:
    """Export every graph in fp32, apply the precision recipe, move the results into ``out``."""
    specs = graph_specs(model.config, fused)
    todo = [spec for spec in specs if spec.name not in reusable]
    fp32_dir = staging / "fp32"
    fp32_dir.mkdir()
    steps = max(1, 2 * len(todo))
    for done, spec in enumerate(todo):
        if progress:
            progress(f"export {spec.name}", done, steps)
        with torch.no_grad():
            export.export_graph(model, spec, fp32_dir / f"{spec.name}.onnx")
    result: dict[str, dict[str, object]] = {}
    for spec in specs:
        if spec.name in reusable:
            result[spec.name] = {**reusable[spec.name], "reused": True}
    for done, spec in enumerate(todo):
        if progress:
            progress(f"{precision} {spec.name}", len(todo) + done, steps)
        source = fp32_dir / f"{spec.name}.onnx"
        temp = staging / f"{spec.name}.onnx"
        recipe = _apply_recipe(source, temp, precision)
        digest = sha256_file(temp)
        name = f"{spec.name}-{digest[:12]}.onnx"
        os.replace(temp, out / name)
        result[spec.name] = {
            **spec.to_dict(),
            "file": name,
            "sha256": digest,
            "precision": precision,
            "build_key": keys[spec.name],
            "reused": False,
            "builder": {
                "exporter": "torch.onnx.export(dynamo=True)",
                "opset": export.OPSET,
                "constant_folding": "polygraphy",
                "cleanup": "onnx-graphsurgeon",
                **recipe,
            },
        }
    if progress:
        progress("done", steps, steps)
    return {spec.name: result[spec.name] for spec in specs}


def _apply_recipe(source: Path, target: Path, precision: str) -> dict[str, object]:
    """Write the ``precision`` version of the fp32 graph ``source`` to ``target``; returns its recipe record."""
    if precision == "fp32":
        os.replace(source, target)
        return {"recipe": "fp32"}
    if precision == "fp16":
        import onnx

        from ecar_export.precision import fp16

        fp32_graph = onnx.load(str(source))
        kept = fp16.fp32_nodes(fp32_graph)
        onnx.save_model(fp16.convert(fp32_graph), str(target))
        return {
            "recipe": "fp16",
            "converter": "onnxruntime.transformers.float16",
            "fp32_nodes": len(kept),
            "fp32_ops": list(fp16.FP32_OPS),
        }
    raise ECARError(
        f"precision '{precision}' is not yet supported by this version; build with --precision fp32 or fp16"
    )


def _previous_files(out: Path) -> set[str]:
    try:
        old = manifest_io.load(out, verify_files=False)
    except ECARError:
        return set()
    return {entry.file for entry in old.graphs.values()} | {e.plan_file for e in old.graphs.values() if e.plan_file}


def _schedule_summary(model: ECAR) -> dict[str, object]:
    return {
        "scales": list(model.config.scales),
        "window_bounds": list(model.config.window_bounds),
        "steps": list(model.config.steps),
        "start_times": [st.t_start for st in model.stages],
    }
