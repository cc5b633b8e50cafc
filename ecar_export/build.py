"""``build_engines``: checkpoint in, engine directory out.

A build exports every graph of the contract into a staging directory inside the
target, gives each file a content-addressed name (``backbone_1-<sha12>.onnx``), moves
the files (graphs, then TensorRT plans) in beside whatever an earlier build left there,
and then replaces ``manifest.json`` atomically — the single commit point. A build that
dies before that leaves the previous build loadable and untouched. After the commit the
directory is swept: every content-addressed file and build leftover that the manifest
just written does not name is removed — the previous build's files, and those of any
build that was killed before its commit. One build at a time may write into a directory
(an advisory lock on the directory itself); graphs whose build key is unchanged since the
previous build are reused.

``ECAR_BUILD_KILL_AT=<moment>`` (a test hook) makes the build SIGKILL itself at one of its
named moments: ``export:<graph>`` (a graph traced to ONNX), ``placed:<graph>`` (its file
moved into the directory), ``calibration:<request>`` (during the INT8 capture),
``plan:<graph>`` (a TensorRT plan serialised), ``staged`` (everything in place, manifest not
yet written) and ``committed`` (manifest written, sweep not yet done).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ecar_export import checkpoint, export, presets
from ecar_export.model import ECAR
from runtime import manifest as manifest_io
from runtime.errors import BackendUnavailableError, ECARError, InvalidRequestError, OutputError
from runtime.fileio import sha256_file
from runtime.graphs import graph_specs

Progress = Callable[[str, int, int], None]  # graph name, graphs done, graphs in all
MAX_BATCH_LIMIT = 4096
# Bump a precision's version when its recipe changes the graphs it writes: builds of that
# precision are redone, the others stay reusable. int8 2: Gemm biases split off, one Q/DQ
# pair per quantized node (ORT's CPU provider fuses and runs them as uint8 kernels).
RECIPE_VERSIONS = {"fp32": 1, "fp16": 1, "int8": 2}
# What a reused graph record keeps from the previous build: its ONNX file and how it was made.
REUSED_FIELDS = ("file", "sha256", "precision", "build_key", "builder")
KILL_AT = "ECAR_BUILD_KILL_AT"
# Names a build gives its files; the sweep after a commit removes those no manifest names.
CONTENT_ADDRESSED = re.compile(r"^[A-Za-z0-9_]+-[0-9a-f]{12}\.(onnx|plan)$")
LEFTOVERS = (
    re.compile(r"^\.staging-.+$"),  # a killed build's staging directory
    re.compile(r"^\..+\.plan\.building$"),  # a plan being written
    re.compile(r"^\.manifest\.json\..+\.tmp$"),  # a manifest being written
    re.compile(r"^\.calibration-old$"),  # a calibration set being replaced
    re.compile(r"^\.build\.lock$"),  # the lock file of earlier toolchain versions
)
CALIBRATION_METHODS = (
    "minmax",
    "entropy",
    "percentile",
)  # bump when export or a precision recipe changes what a graph file holds


def resolve_backend(backend: str) -> str:
    """``auto`` -> tensorrt where TensorRT imports and a GPU is present, else onnxruntime."""
    if backend == "onnxruntime":
        return backend
    if backend in ("tensorrt", "auto"):
        if _tensorrt_usable():
            return "tensorrt"
        if backend == "tensorrt":
            raise BackendUnavailableError(
                "TensorRT is not available here (the 'tensorrt' package is not importable "
                "or no NVIDIA GPU is visible); "
                "install the 'tensorrt' extra on a GPU machine, or use --backend onnxruntime"
            )
        return "onnxruntime"
    raise InvalidRequestError(f"unknown backend '{backend}': use auto, onnxruntime or tensorrt")


def _tensorrt_usable() -> bool:
    """TensorRT importable (a real one, not the type stubs) and an NVIDIA GPU visible to the driver."""
    from ecar_export.tensorrt_build import tensorrt_version
    from runtime.gpu import gpu_available

    return tensorrt_version() is not None and gpu_available()


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
    from ecar_export.tensorrt_build import tensorrt_version

    versions["tensorrt"] = tensorrt_version()
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
    calibration_method: str = "minmax",
    calibration_requests: int = 64,
) -> Path:
    """Export (and, for TensorRT, compile) every graph; returns the manifest's path.

    Graphs whose build key (weights, config, precision, opset, tool versions, builder
    options) matches the previous build in ``out_dir`` are reused unless ``force``.
    """
    if precision not in manifest_io.PRECISIONS:
        raise InvalidRequestError(f"unknown precision '{precision}': use fp32, fp16 or int8")
    if calibration_method not in CALIBRATION_METHODS:
        raise InvalidRequestError(
            f"unknown calibration method '{calibration_method}': use {', '.join(CALIBRATION_METHODS)}"
        )
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise InvalidRequestError(f"--max-batch must be an integer in [1, {MAX_BATCH_LIMIT}], got {max_batch!r}")
    chosen = resolve_backend(backend)
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
        try:
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
        except OSError as exc:
            raise OutputError(f"cannot write engines into '{out}': {exc.strerror or exc}") from None
        try:
            toolchain = toolchain_versions()
            options: dict[str, object] = {}
            if precision == "int8":
                options = {"calibration_method": calibration_method, "calibration_requests": calibration_requests}
            keys = {
                spec.name: _graph_key(spec.to_dict(), spec.name, weights_digest, model, precision, toolchain, options)
                for spec in graph_specs(model.config, fuse_flow_loop)
            }
            reusable = {} if force else _reusable_graphs(out, keys)
            if precision == "int8" and set(reusable) != set(keys):
                reusable = {}  # calibration runs the whole fp32 pipeline: rebuild every graph together
            context = _RecipeContext(precision, model, weights_digest, staging, options, toolchain)
            if precision == "int8" and not force:
                context.calibration = _previous_calibration(out, context)
            if precision == "int8" and context.calibration is None:
                reusable = {}  # no kept calibration set to stand on: capture again, requantize every graph
            graphs_data = _export_all(model, staging, out, context, fuse_flow_loop, keys, reusable, progress)
            manifest = _manifest(model, precision, chosen, fuse_flow_loop, max_batch, weights_digest, toolchain)
            manifest["graphs"] = graphs_data
            if precision == "int8":
                if context.calibration_reused:
                    manifest["calibration"] = {"dir": "calibration", **options, "reused": True}
                else:
                    manifest["calibration"] = {**_install_calibration(staging, out, options), "reused": False}
            if chosen == "tensorrt":
                manifest = _add_tensorrt_plans(out, manifest, max_batch, progress)
            moment("staged")
            path = manifest_io.write(out, manifest)
            moment("committed")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        sweep(out, manifest)
        return path


def moment(name: str) -> None:
    """A named moment of a build: where ``ECAR_BUILD_KILL_AT`` names it, the build dies here (tests)."""
    if os.environ.get(KILL_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def sweep(out: Path, manifest: dict[str, Any]) -> list[str]:
    """After a commit: remove every build artifact in ``out`` that ``manifest`` does not name.

    That is the previous build's files and any killed build's leftovers (content-addressed
    graphs and plans moved in before a commit that never came, staging directories, temporary
    files, a calibration set no int8 manifest names). Files the toolchain did not write — a
    README, the user's own files — do not match these names and stay. Returns what was removed.
    """
    keep = manifest_io.named_files(manifest)
    removed = []
    for entry in sorted(os.listdir(out)):
        if entry in keep:
            continue
        stale_calibration = entry == "calibration" and (out / entry / "calibration.json").is_file()
        if not (CONTENT_ADDRESSED.match(entry) or stale_calibration or any(p.match(entry) for p in LEFTOVERS)):
            continue
        target = out / entry
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    """One build at a time per engine directory: an advisory lock on the directory itself (dropped if we die)."""
    import fcntl

    try:
        handle = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise OutputError(
            f"cannot write engines into '{out}': {exc.strerror or exc}; choose a writable --out"
        ) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(f"another build is writing into '{out}'; wait for it or choose another --out") from None
        yield
    finally:
        os.close(handle)


def _graph_key(
    contract: dict[str, object],
    name: str,
    weights: str,
    model: ECAR,
    precision: str,
    tools: dict[str, str | None],
    options: dict[str, object],
) -> str:
    """Everything a graph file depends on, hashed: equal keys mean an identical graph."""
    payload = {
        "graph": name,
        "contract": contract,
        "weights": weights,
        "config": model.config.to_dict(),
        "precision": precision,
        "opset": export.OPSET,
        "export_version": export.EXPORT_VERSION,
        "tools": tools,
        "recipe_version": RECIPE_VERSIONS[precision],
        "options": options,
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
    context: _RecipeContext,
    fused: bool,
    keys: dict[str, str],
    reusable: dict[str, dict[str, object]],
    progress: Progress | None,
) -> dict[str, dict[str, object]]:
    """Export every graph in fp32, apply the precision recipe, move the results into ``out``."""
    precision = context.precision
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
        moment(f"export:{spec.name}")
    result: dict[str, dict[str, object]] = {}
    for spec in specs:
        if spec.name in reusable:  # the ONNX side of the old record only: plans are this build's to add
            kept = {key: reusable[spec.name][key] for key in REUSED_FIELDS if key in reusable[spec.name]}
            result[spec.name] = {**spec.to_dict(), **kept, "reused": True}
    for done, spec in enumerate(todo):
        if progress:
            progress(f"{precision} {spec.name}", len(todo) + done, steps)
        source = fp32_dir / f"{spec.name}.onnx"
        temp = staging / f"{spec.name}.onnx"
        recipe = _apply_recipe(source, temp, spec.name, context)
        digest = sha256_file(temp)
        name = f"{spec.name}-{digest[:12]}.onnx"
        os.replace(temp, out / name)
        moment(f"placed:{spec.name}")
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


@dataclass
class _RecipeContext:
    """What a precision recipe needs besides the graph (INT8: the calibration set, made once)."""

    precision: str
    model: ECAR
    weights_digest: str
    staging: Path
    options: dict[str, object]
    toolchain: dict[str, str | None]
    calibration: Any = None

    @property
    def calibration_reused(self) -> bool:
        """The calibration set is the previous build's (``out/calibration``), not a new capture."""
        return self.calibration is not None and not self.calibration.root.is_relative_to(self.staging)

    def calibration_set(self) -> Any:
        """Capture the real inputs of every graph by running the staged fp32 graphs (once)."""
        if self.calibration is None:
            from calibration import CalibrationPlan, capture
            from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
            from runtime.pipeline import Pipeline

            fp32_dir = self.staging / "fp32"
            staged = _manifest(self.model, "fp32", "onnxruntime", False, 8, self.weights_digest, self.toolchain)
            staged["graphs"] = {
                spec.name: {
                    **spec.to_dict(),
                    "file": f"{spec.name}.onnx",
                    "sha256": sha256_file(fp32_dir / f"{spec.name}.onnx"),
                    "precision": "fp32",
                }
                for spec in graph_specs(self.model.config, False)
            }
            manifest_io.write(fp32_dir, staged)
            loaded = manifest_io.load(fp32_dir)
            # every core: the capture is the long part of an int8 build, and MLAS splits a GEMM by
            # output tiles, so the captured inputs do not depend on the thread count (checked on the demo)
            pipe = Pipeline(loaded, OnnxRuntimeBackend(loaded, device="cpu"))
            requests = self.options.get("calibration_requests", 64)
            assert isinstance(requests, int)
            plan = CalibrationPlan.for_config(self.model.config, num_requests=requests)
            self.calibration = capture(
                pipe, plan, self.staging / "calibration", progress=lambda done, _: moment(f"calibration:{done}")
            )
        return self.calibration


def _apply_recipe(source: Path, target: Path, graph: str, context: _RecipeContext) -> dict[str, object]:
    """Write the ``precision`` version of the fp32 graph ``source`` to ``target``; returns its recipe record."""
    import onnx

    if context.precision == "fp32":
        os.replace(source, target)
        return {"recipe": "fp32"}
    if context.precision == "fp16":
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
    if context.precision == "int8":
        from calibration.readers import GraphReader, held_out_feeds
        from ecar_export.precision import int8

        calibration = context.calibration_set()
        method = str(context.options["calibration_method"])
        fp32_graph = onnx.load(str(source))
        quantized = int8.quantize(fp32_graph, GraphReader(calibration, graph), method, threads=1)
        records = int8.check_qdq(quantized)
        agreement = int8.compare_graphs(fp32_graph, quantized, held_out_feeds(calibration, graph))
        onnx.save_model(quantized, str(target))
        return {
            "recipe": "int8",
            "quantizer": "onnxruntime.quantization.quantize_static (QDQ, symmetric int8, per-channel weights)",
            "calibration_method": method,
            "qdq_nodes": len(records),
            "held_out_cosine": {name: round(a.cosine, 7) for name, a in agreement.items()},
            "held_out_max_abs": {name: a.max_abs for name, a in agreement.items()},
        }
    raise InvalidRequestError(f"unknown precision '{context.precision}'")


def _add_tensorrt_plans(
    out: Path, manifest: dict[str, Any], max_batch: int, progress: Progress | None
) -> dict[str, Any]:
    """Compile one TensorRT plan per graph (strongly typed: precision comes from the graphs).

    Never run on a real TensorRT installation yet (see README "What has run where").
    """
    from ecar_export import tensorrt_build

    profile = manifest["profile"]
    records, block = tensorrt_build.build_plans(
        out,
        manifest["graphs"],
        (profile["min_batch"], profile["opt_batch"], max_batch),
        tensorrt_build.PlanOptions(),
        progress=(lambda name, done, total: progress(f"tensorrt {name}", done, total)) if progress else None,
        moment=moment,
    )
    return tensorrt_build.apply_plans(manifest, records, block)


def _previous_calibration(out: Path, context: _RecipeContext) -> Any:
    """The previous INT8 build's calibration set, where capturing again would record the same inputs.

    The capture is the long part of an INT8 build (about an hour for ecar-b on two cores);
    it depends on the fp32 pipeline (weights, config, opset, export version, exporter and
    ONNX Runtime versions) and on the plan (the number of requests), not on the quantization recipe.
    So a rebuild after a recipe change re-quantizes from the kept set; ``force`` captures
    again. Anything that does not match, or a set that fails its checksums, means a new capture.
    """
    from calibration import CalibrationPlan, load_calibration

    try:
        old = manifest_io.load(out)
    except ECARError:
        return None
    record = old.raw.get("calibration")
    requests = context.options.get("calibration_requests")
    if (
        old.precision != "int8"
        or not isinstance(record, dict)
        or record.get("calibration_requests") != requests
        or old.raw.get("opset") != export.OPSET
        or old.raw.get("export_version") != export.EXPORT_VERSION
        or old.toolchain != context.toolchain
    ):
        return None
    try:
        calibration = load_calibration(out / str(record.get("dir", "calibration")))
        calibration.check_compatible(context.model.config, context.weights_digest)
    except ECARError:
        return None
    if calibration.plan != CalibrationPlan.for_config(context.model.config, num_requests=requests):
        return None
    return calibration


def _install_calibration(staging: Path, out: Path, options: dict[str, object]) -> dict[str, object]:
    """Keep the calibration set with the build (``out/calibration``): ``check`` validates on its held-out split."""
    source = staging / "calibration"
    target = out / "calibration"
    retired = out / ".calibration-old"
    if not source.is_dir():  # never retire the kept set without a new one to put in its place
        raise RuntimeError(f"internal error: no calibration set was captured into '{source}'")
    shutil.rmtree(retired, ignore_errors=True)
    if target.exists():
        os.replace(target, retired)
    os.replace(source, target)
    shutil.rmtree(retired, ignore_errors=True)
    return {"dir": "calibration", **options}


def _manifest(
    model: ECAR,
    precision: str,
    backend: str,
    fused: bool,
    max_batch: int,
    weights_digest: str,
    toolchain: dict[str, str | None],
) -> dict[str, Any]:
    return {
        "format": manifest_io.FORMAT,
        "format_version": manifest_io.FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": model.config.to_dict(),
        "schedule": _schedule_summary(model),
        "precision": precision,
        "backend": backend,
        "fuse_flow_loop": fused,
        "profile": {"min_batch": 1, "opt_batch": max(1, min(max_batch, 8)), "max_batch": max_batch},
        "checkpoint_sha256": weights_digest,
        "opset": export.OPSET,
        "export_version": export.EXPORT_VERSION,
        "toolchain": toolchain,
        "graphs": {},
    }


def _schedule_summary(model: ECAR) -> dict[str, object]:
    return {
        "scales": list(model.config.scales),
        "window_bounds": list(model.config.window_bounds),
        "steps": list(model.config.steps),
        "start_times": [st.t_start for st in model.stages],
    }
