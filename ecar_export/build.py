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

from ecar_export import checkpoint, export, flow_loop, presets, weights_io
from ecar_export.model import ECAR
from runtime import manifest as manifest_io
from runtime.errors import BackendUnavailableError, ECARError, InvalidRequestError, OutputError
from runtime.fileio import sha256_file
from runtime.graphs import GraphSpec, flow_step_spec, graph_specs

Progress = Callable[[str, int, int], None]  # graph name, graphs done, graphs in all
MAX_BATCH_LIMIT = 4096
# Bump a precision's version when its recipe changes the graphs it writes: builds of that
# precision are redone, the others stay reusable. int8 2: Gemm biases split off, one Q/DQ
# pair per quantized node (ORT's CPU provider fuses and runs them as uint8 kernels).
RECIPE_VERSIONS = {"fp32": 1, "fp16": 1, "int8": 2}
KILL_AT = "ECAR_BUILD_KILL_AT"
# Names a build gives its files; the sweep after a commit removes those no manifest names.
CONTENT_ADDRESSED = re.compile(r"^[A-Za-z0-9_]+-[0-9a-f]{12}\.(onnx|weights|plan)$")
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
    """``auto`` -> tensorrt where TensorRT imports and a GPU is present, else onnxruntime.

    ``openvino`` builds the same ONNX graphs and has OpenVINO read and compile each one before
    the commit, so a graph it cannot run fails the build, not the first request.
    """
    if backend == "onnxruntime":
        return backend
    if backend == "openvino":
        from runtime.backends.openvino_backend import load_openvino

        load_openvino()  # a clear BackendUnavailableError where OpenVINO is missing
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
    raise InvalidRequestError(f"unknown backend '{backend}': use auto, onnxruntime, openvino or tensorrt")


def _tensorrt_usable() -> bool:
    """TensorRT importable (a real one, not the type stubs) and an NVIDIA GPU visible to the driver."""
    from ecar_export.tensorrt_build import tensorrt_version
    from runtime.backends.tensorrt.gpu import gpu_available

    return tensorrt_version() is not None and gpu_available()


def load_model(source: ECAR | str | os.PathLike[str] | None) -> tuple[ECAR, str]:
    """The model to build and the sha256 that identifies its weights."""
    if isinstance(source, ECAR):
        digest = hashlib.sha256()
        for name, tensor in sorted(source.state_dict().items()):
            digest.update(name.encode())
            digest.update(memoryview(tensor.detach().cpu().contiguous().numpy()).cast("B"))
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
            specs = graph_specs(model.config, fuse_flow_loop)
            keys = {
                spec.name: _graph_key(spec.to_dict(), spec.name, weights_digest, model, precision, toolchain, options)
                for spec in specs
            }
            reusable = {} if force else _reusable_graphs(out, keys)
            if precision == "int8" and set(reusable) != set(keys):
                reusable = {}  # calibration runs the whole fp32 pipeline: rebuild every graph together
            context = _RecipeContext(precision, model, weights_digest, staging, options, toolchain)
            if precision == "int8" and not force:
                context.calibration = _previous_calibration(out, context)
            if precision == "int8" and context.calibration is None:
                reusable = {}  # no kept calibration set to stand on: capture again, requantize every graph
            records = _export_all(model, staging, out, context, specs, keys, reusable, progress)
            document = manifest_io.document(
                model.config,
                precision=precision,
                backend=chosen,
                fuse_flow_loop=fuse_flow_loop,
                max_batch=max_batch,
                checkpoint_sha256=weights_digest,
                opset=export.OPSET,
                export_version=export.EXPORT_VERSION,
                toolchain=toolchain,
                graphs=records,
            )
            if precision == "int8":
                if not context.calibration_reused:
                    _install_calibration(staging, out)
                document = manifest_io.with_calibration(
                    document, calibration_method, calibration_requests, reused=context.calibration_reused
                )
            if chosen == "tensorrt":
                document = _add_tensorrt_plans(out, document, model, max_batch, progress)
            if chosen == "openvino":
                _compile_openvino(out, document)
            moment("staged")
            path = manifest_io.write(out, document)
            moment("committed")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        sweep(out, document)
        return path


def moment(name: str) -> None:
    """A named moment of a build: where ``ECAR_BUILD_KILL_AT`` names it, the build dies here (tests)."""
    if os.environ.get(KILL_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def sweep(out: Path, document: dict[str, Any]) -> list[str]:
    """After a commit: remove every build artifact in ``out`` that ``document`` (the manifest) does not name.

    That is the previous build's files and any killed build's leftovers (content-addressed
    graphs, weights and plans moved in before a commit that never came, staging directories,
    temporary files, a calibration set no int8 manifest names). Files the toolchain did not
    write — a README, the user's own files — do not match these names and stay. Returns what
    was removed.
    """
    keep = manifest_io.named_files(document)
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


def _reusable_graphs(out: Path, keys: dict[str, str]) -> dict[str, manifest_io.GraphEntry]:
    """Graphs of the previous build whose key is unchanged and whose files are intact."""
    try:
        old = manifest_io.load(out)
    except ECARError:
        return {}
    return {name: entry for name, entry in old.graphs.items() if name in keys and entry.build_key == keys[name]}


def traced_spec(spec: GraphSpec, model: ECAR) -> GraphSpec:
    """The graph torch traces for ``spec``: ``flow_loop`` is ``flow_step`` wrapped in a Loop afterwards."""
    return flow_step_spec(model.config) if spec.kind == "flow_loop" else spec


def _export_all(
    model: ECAR,
    staging: Path,
    out: Path,
    context: _RecipeContext,
    specs: list[GraphSpec],
    keys: dict[str, str],
    reusable: dict[str, manifest_io.GraphEntry],
    progress: Progress | None,
) -> dict[str, dict[str, Any]]:
    """Export every graph in fp32, apply the precision recipe, move the results into ``out``."""
    precision = context.precision
    todo = [spec for spec in specs if spec.name not in reusable]
    fp32_dir = staging / "fp32"
    fp32_dir.mkdir()
    steps = max(1, 2 * len(todo))
    for done, spec in enumerate(todo):
        traced = traced_spec(spec, model)
        if progress:
            progress(f"export {spec.name}", done, steps)
        with torch.no_grad():
            export.export_graph(model, traced, fp32_dir / f"{traced.name}.onnx")
        moment(f"export:{spec.name}")
    result: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if spec.name in reusable:  # the ONNX side of the old record only: plans are this build's to add
            result[spec.name] = manifest_io.reused_record(spec, reusable[spec.name])
    for done, spec in enumerate(todo):
        traced = traced_spec(spec, model)
        if progress:
            progress(f"{precision} {spec.name}", len(todo) + done, steps)
        work = staging / spec.name
        work.mkdir()
        target = work / f"{spec.name}.onnx"
        recipe = _apply_recipe(fp32_dir / f"{traced.name}.onnx", target, traced.name, context)
        if spec.kind == "flow_loop":
            wrapped = flow_loop.wrap(weights_io.load_graph(target), spec)
            onnx_save(wrapped, target)
            recipe["flow_loop"] = "onnx Loop over the flow_step graph"
        export.check(target)
        files = weights_io.finalize(target, out, spec.name)
        moment(f"placed:{spec.name}")
        result[spec.name] = manifest_io.graph_record(
            spec,
            file=str(files["file"]),
            sha256=str(files["sha256"]),
            data_files=dict(files["data_files"]),  # type: ignore[call-overload]
            precision=precision,
            build_key=keys[spec.name],
            builder={
                "exporter": "torch.onnx.export(dynamo=True)",
                "opset": export.OPSET,
                "weights": "ONNX external data",
                "cleanup": "onnx-graphsurgeon",
                **recipe,
            },
        )
    if progress:
        progress("done", steps, steps)
    return {spec.name: result[spec.name] for spec in specs}


def onnx_save(model: Any, path: Path) -> None:
    import onnx

    path.unlink(missing_ok=True)
    onnx.save_model(model, str(path))


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
            records = {}
            for spec in graph_specs(self.model.config, False):
                model_file = fp32_dir / f"{spec.name}.onnx"
                data = export.data_path(model_file)
                records[spec.name] = manifest_io.graph_record(
                    spec,
                    file=model_file.name,
                    sha256=sha256_file(model_file),
                    data_files={data.name: sha256_file(data)} if data.is_file() else {},
                    precision="fp32",
                )
            staged = manifest_io.document(
                self.model.config,
                precision="fp32",
                backend="onnxruntime",
                fuse_flow_loop=False,
                max_batch=8,
                checkpoint_sha256=self.weights_digest,
                opset=export.OPSET,
                export_version=export.EXPORT_VERSION,
                toolchain=self.toolchain,
                graphs=records,
            )
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
    """Write the ``precision`` version of the fp32 graph ``source`` (and its weights) to ``target``.

    ``graph`` names the traced graph (its calibration rows). fp32 moves the weights file;
    fp16 streams them through the fp16 conversion tensor by tensor; int8 loads them
    (quantization reads and rewrites every weight). Returns the recipe's record.
    """
    import onnx

    source_data, target_data = export.data_path(source), export.data_path(target)
    if context.precision == "fp32":
        model = weights_io.load_graph(source)
        if source_data.is_file():
            os.replace(source_data, target_data)
            for tensor in weights_io.initializers(model.graph):
                if weights_io.is_external(tensor):
                    for entry in tensor.external_data:
                        if entry.key == "location":
                            entry.value = target_data.name
        onnx_save(model, target)
        return {"recipe": "fp32"}
    if context.precision == "fp16":
        from ecar_export.precision import fp16

        model = weights_io.load_graph(source)
        original = {t.name: t.data_type for t in weights_io.initializers(model.graph)}
        kept = fp16.fp32_nodes(model)
        converted = fp16.convert(model)
        weights_io.rewrite_data(converted, source.parent, target_data, weights_io.to_float16(original))
        onnx_save(converted, target)
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
        fp32_graph = onnx.load(str(source))  # with its weights: quantization rewrites them all
        quantized = int8.quantize(fp32_graph, GraphReader(calibration, graph), method, threads=1)
        records = int8.check_qdq(quantized)
        agreement = int8.compare_graphs(fp32_graph, quantized, held_out_feeds(calibration, graph))
        del fp32_graph
        weights_io.save_with_external_data(quantized, target)
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
    out: Path, document: dict[str, Any], model: ECAR, max_batch: int, progress: Progress | None
) -> dict[str, Any]:
    """Compile one TensorRT plan per graph, one optimisation profile per stage (strongly typed).

    Never run on a real TensorRT installation yet (see README "What has run where").
    """
    from ecar_export import tensorrt_build

    profile = document["profile"]
    records, block = tensorrt_build.build_plans(
        out,
        document["graphs"],
        model.config,
        (profile["min_batch"], profile["opt_batch"], max_batch),
        tensorrt_build.PlanOptions(),
        progress=(lambda name, done, total: progress(f"tensorrt {name}", done, total)) if progress else None,
        moment=moment,
    )
    return tensorrt_build.apply_plans(document, records, block)


def _compile_openvino(out: Path, document: dict[str, Any]) -> None:
    """OpenVINO reads and compiles every graph of the build (nothing is kept: compiling at load takes
    about as long as loading OpenVINO's cached blobs, 0.5 s for ecar-b, and the blobs are as large as
    the weights)."""
    from runtime.backends.openvino_backend import compile_graph

    for name, record in document["graphs"].items():
        compile_graph(out / record["file"], record["precision"], name)


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
    requests = context.options.get("calibration_requests")
    if (
        old.precision != "int8"
        or old.calibration is None
        or old.calibration.requests != requests
        or old.opset != export.OPSET
        or old.export_version != export.EXPORT_VERSION
        or old.toolchain != context.toolchain
    ):
        return None
    try:
        calibration = load_calibration(out / old.calibration.dir)
        calibration.check_compatible(context.model.config, context.weights_digest)
    except ECARError:
        return None
    if calibration.plan != CalibrationPlan.for_config(context.model.config, num_requests=requests):
        return None
    return calibration


def _install_calibration(staging: Path, out: Path) -> None:
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
