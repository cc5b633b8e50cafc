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
previous build are reused (:mod:`ecar_export.graph_keys`). What each precision does to the
graphs is :mod:`ecar_export.precision`'s; an INT8 build's calibration set is
:mod:`calibration.lifecycle`'s; the TensorRT and OpenVINO steps are :mod:`ecar_export.backends`'.

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
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecar_export import checkpoint, export, families, flow_loop, graph_keys, precision, presets, weights_io
from ecar_export.precision import PRECISIONS, Precision, RecipeInputs
from ecar_export.precision.int8 import FLOAT_KINDS, calibration_batches, float_recipe_for, op_types_for
from runtime import manifest as manifest_io
from runtime import stage_constants
from runtime.backends import selection
from runtime.errors import InvalidRequestError, OutputError
from runtime.fileio import output_dir, sha256_file, write_bytes_atomic
from runtime.graphs import GraphSpec, Kind

Progress = Callable[[str, int, int], None]  # graph name, graphs done, graphs in all
MAX_BATCH_LIMIT = 4096
KILL_AT = "ECAR_BUILD_KILL_AT"
CALIBRATION_REQUESTS = 64
# Names a build gives its files; the sweep after a commit removes those no manifest names.
CONTENT_ADDRESSED = re.compile(r"^[A-Za-z0-9_]+-[0-9a-f]{12}\.(onnx|weights|plan|npz)$")
LEFTOVERS = (
    re.compile(r"^\.staging-.+$"),  # a killed build's staging directory
    re.compile(r"^\..+\.plan\.building$"),  # a plan being written
    re.compile(r"^\.manifest\.json\..+\.tmp$"),  # a manifest being written
    re.compile(r"^\.calibration-old$"),  # a calibration set being replaced
    re.compile(r"^\.build\.lock$"),  # the lock file of earlier toolchain versions
)


def load_model(source: nn.Module | str | os.PathLike[str] | None) -> tuple[nn.Module, str]:
    """The model to build (of any family, :mod:`ecar_export.families`) and the sha256 that identifies its weights."""
    if isinstance(source, nn.Module):
        families.of(source)  # a model of a known family
        digest = hashlib.sha256()
        for name, tensor in sorted(source.state_dict().items()):
            digest.update(name.encode())
            digest.update(memoryview(tensor.detach().cpu().contiguous().numpy()).cast("B"))
        digest.update(families.config_of(source).to_json().encode())
        return source.eval(), digest.hexdigest()
    path = Path(source) if source is not None else presets.checkpoint_path(presets.DEMO)
    model = families.named(checkpoint.family_of(path)).load(path)
    return model, sha256_file(path)


def build_engines(
    model_or_checkpoint_path: nn.Module | str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] = "engines",
    precision: str = "fp32",
    backend: str = "onnxruntime",
    max_batch: int = 8,
    fuse_flow_loop: bool = False,
    progress: Progress | None = None,
    force: bool = False,
    calibration_method: str = "minmax",
    calibration_requests: int | None = None,
    on_backend: Callable[[str], None] | None = None,
    calibration_every_class: bool = True,
) -> Path:
    """Export (and, for TensorRT, compile) every graph of a model into an engine directory; returns the manifest's path.

    Args:
        model_or_checkpoint_path: a model of a known family (:mod:`ecar_export.families`: an
            :class:`~ecar_export.families.ecar.model.ECAR`, a FlowAR), a safetensors checkpoint (its metadata names
            its family), or None for the bundled ``ecar-digits`` demo.
        out_dir: the engine directory (created; an earlier build in it stays loadable until
            this one commits).
        precision: "fp32", "fp16" or "int8" (:mod:`ecar_export.precision`).
        backend: "onnxruntime", "openvino", "tensorrt" or "auto"
            (:func:`runtime.backends.selection.build_target`).
        max_batch: the largest batch the engines accept.
        fuse_flow_loop: write each stage's Euler loop as one ONNX ``Loop`` graph
            (``flow_loop``) instead of ``flow_step``.
        progress: called with (what, done, in all) as graphs are exported and converted.
        force: rebuild every graph, even those unchanged since the previous build in
            ``out_dir`` (whose build key matches: weights, config, precision, opset, tool
            versions, builder options); int8: capture the calibration inputs again.
        calibration_method: int8 only: "minmax", "entropy" or "percentile".
        calibration_requests: int8 only: requests of 8 samples the calibration capture runs; None: the
            fewest whose calibration part holds every class, at least :data:`CALIBRATION_REQUESTS`
            (:meth:`calibration.plan.CalibrationPlan.covering`; 245 for 1000 classes).
        on_backend: called once with the backend the build writes for, before any export.
        calibration_every_class: int8 only: the calibration requests must hold every class (the
            default); False lets ``calibration_requests`` hold fewer (default then
            :data:`CALIBRATION_REQUESTS`), for models with more classes than the capture can afford.

    Examples:
        >>> from ecar_export.build import build_engines
        >>> from runtime import Pipeline
        >>> path = build_engines(None, out_dir=tmp / "engines", max_batch=2)  # None: the bundled demo
        >>> path.name, sorted(p.suffix for p in path.parent.iterdir())
        ('manifest.json', ['.json', '.npz', '.onnx', '.onnx', '.onnx', '.weights', '.weights', '.weights'])
        >>> Pipeline.from_dir(path.parent).generate([3, 3, 3]).images.shape  # beyond max_batch=2
        Traceback (most recent call last):
        ...
        runtime.errors.InvalidRequestError: batch of 3 exceeds this build's profile (max batch 2); ...
    """
    recipe = precision_of(precision, calibration_method, calibration_requests)
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise InvalidRequestError(f"--max-batch must be an integer in [1, {MAX_BATCH_LIMIT}], got {max_batch!r}")
    chosen = selection.build_target(backend)
    if on_backend:
        on_backend(chosen)
    model, weights_digest = load_model(model_or_checkpoint_path)
    family = families.of(model)
    if recipe.calibrated and not family.calibrated:
        raise InvalidRequestError(
            f"--precision {recipe.name}: the INT8 calibration capture does not serve model family "
            f"'{family.name}' yet; build it at fp32 or fp16"
        )
    if not isinstance(calibration_every_class, bool):
        raise InvalidRequestError(f"calibration_every_class must be True or False, got {calibration_every_class!r}")
    num_classes = families.config_of(model).num_classes
    requests, calibration_every_class = (
        requests_for(num_classes, calibration_requests, calibration_every_class) if recipe.calibrated else (0, True)
    )
    specs = family.graph_specs(model.config, fuse_flow_loop)  # refuses what the family cannot build, before output
    out = output_dir(out_dir, "--out")
    with _build_lock(out):
        try:
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
        except OSError as exc:
            raise OutputError(f"cannot write engines into '{out}': {exc.strerror or exc}") from None
        try:
            toolchain = graph_keys.toolchain_versions()
            options: dict[str, object] = {}
            if recipe.calibrated:
                options = {"calibration_method": calibration_method, "calibration_requests": requests}
                if not calibration_every_class:  # builds that cover every class keep their keys
                    options["calibration_every_class"] = False

            def graph_options(spec: GraphSpec) -> dict[str, object]:
                if not recipe.calibrated:
                    return options
                batches = calibration_batches(spec.kind)
                covered = {**options, "int8_op_types": list(op_types_for(spec.kind))}  # the recipe's coverage
                float_recipe = float_recipe_for(chosen)
                if spec.kind in FLOAT_KINDS and float_recipe != "fp32":  # fp32 builds keep their keys
                    covered["int8_float_recipe"] = f"{float_recipe}/v{PRECISIONS[float_recipe].recipe_version}"
                return covered if batches is None else {**covered, "calibration_batches": batches}

            keys = {
                spec.name: graph_keys.graph_key(spec, weights_digest, model, recipe, toolchain, graph_options(spec))
                for spec in specs
            }
            reusable = {} if force else graph_keys.reusable_graphs(out, keys)
            calibration = _Calibration(
                out, staging, model, weights_digest, toolchain, requests, calibration_every_class
            )
            if recipe.calibrated:
                if not force:
                    calibration.kept = calibration.previous()
                if calibration.kept is None:
                    # a new capture: every graph is quantized again from it (a graph kept from an older build was
                    # calibrated on another capture); with the kept set, only the graphs whose key changed
                    reusable = {}
            records = _export_all(
                model, staging, out, recipe, calibration, calibration_method, chosen, specs, keys, reusable, progress
            )
            tools = {**toolchain, **_backend_versions(chosen)}
            document = _document(
                out, model, weights_digest, recipe.name, chosen, fuse_flow_loop, max_batch, tools, records
            )
            if recipe.calibrated:
                if calibration.captured is not None:
                    from calibration import lifecycle

                    lifecycle.install(calibration.captured.root, out)
                reused = calibration.captured is None
                document = manifest_io.with_calibration(document, calibration_method, requests, reused)
            if chosen == "tensorrt":
                document = _add_tensorrt_plans(out, document, specs, records, model, max_batch, progress)
            if chosen == "openvino":
                from ecar_export.backends import openvino

                openvino.compile_all(
                    out, ((name, r["file"], r["precision"], r["bf16_safe"]) for name, r in records.items())
                )
            moment("staged")
            path = manifest_io.write(out, document)
            moment("committed")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        sweep(out, document)
        return path


def write_stage_constants(directory: Path, model: nn.Module) -> dict[str, str]:
    """Write the build's stages file (:mod:`runtime.stage_constants`) into ``directory``, named by content;
    returns the manifest's ``stage_constants`` entry."""
    blob = stage_constants.encode(families.of(model).stage_constants(model.config))
    name, digest = manifest_io.constants_file(blob)
    if not (directory / name).is_file() or sha256_file(directory / name) != digest:
        write_bytes_atomic(directory / name, blob)
    return {"file": name, "sha256": digest}


def _document(
    directory: Path,
    model: nn.Module,
    weights: str,
    precision: str,
    backend: str,
    fused: bool,
    max_batch: int,
    toolchain: dict[str, str | None],
    records: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The manifest document of a build of ``model`` (this toolchain's opset and export version), its
    request plan and its stages file (written into ``directory``)."""
    family = families.of(model)
    return manifest_io.document(
        family.name,
        families.config_of(model).to_dict(),
        plan=family.request_plan(model.config),
        stage_constants=write_stage_constants(directory, model),
        precision=precision,
        backend=backend,
        fuse_flow_loop=fused,
        max_batch=max_batch,
        checkpoint_sha256=weights,
        opset=export.OPSET,
        export_version=export.EXPORT_VERSION,
        toolchain=toolchain,
        graphs=records,
    )


def precision_of(name: str, calibration_method: str, calibration_requests: int | None) -> Precision:
    """The precision of a build, its calibration settings checked."""
    recipe = precision.get(name)
    precision.check_calibration_method(calibration_method)
    if calibration_requests is not None and (
        isinstance(calibration_requests, bool) or not isinstance(calibration_requests, int) or calibration_requests < 1
    ):
        raise InvalidRequestError(f"--calibration-requests must be a positive integer, got {calibration_requests!r}")
    return recipe


def requests_for(num_classes: int, asked: int | None, every_class: bool = True) -> tuple[int, bool]:
    """The calibration capture's request count and whether its requests hold every class: ``asked``, or the
    default for ``num_classes`` classes. An ``asked`` count whose calibration requests miss a class is refused
    naming the count that covers them, unless ``every_class`` is False (then the default count is
    :data:`CALIBRATION_REQUESTS`); requests that hold every class anyway capture what a default build
    captures, so they are that build's plan (and reuse its kept set)."""
    from calibration.plan import CalibrationPlan

    needed = CalibrationPlan.covering(num_classes, at_least=1)
    if not every_class:
        requests = CALIBRATION_REQUESTS if asked is None else asked
        return requests, requests >= needed
    if asked is None:
        return max(CALIBRATION_REQUESTS, needed), True
    if asked < needed:
        raise InvalidRequestError(
            f"--calibration-requests {asked}: the calibration requests of 8 samples must hold each of the model's "
            f"{num_classes} classes at least once; use at least {needed}, leave the option out, or add "
            "--calibration-some-classes to calibrate on the classes those requests hold"
        )
    return asked, True


def _backend_versions(backend: str) -> dict[str, str | None]:
    """Versions the manifest records for the backend a build is for, beyond the export tools."""
    if backend != "openvino":
        return {}
    try:
        return {"openvino": importlib.metadata.version("openvino")}
    except importlib.metadata.PackageNotFoundError:
        return {"openvino": None}


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


def traced_spec(spec: GraphSpec, model: nn.Module) -> GraphSpec:
    """The graph torch traces for ``spec``: ``flow_loop`` is ``flow_step`` wrapped in a Loop afterwards."""
    if spec.kind != Kind.FLOW_LOOP:
        return spec
    return next(s for s in families.of(model).graph_specs(model.config, False) if s.kind == Kind.FLOW_STEP)


class _Calibration:
    """An INT8 build's calibration set: the kept one (:func:`calibration.lifecycle.previous`) or a new capture.

    The capture runs the staged fp32 graphs (``staging/fp32``, every graph exported) through
    the runtime, once, when the first graph needs it.
    """

    def __init__(
        self,
        out: Path,
        staging: Path,
        model: nn.Module,
        weights: str,
        toolchain: dict[str, str | None],
        requests: int,
        every_class: bool = True,
    ) -> None:
        from calibration.lifecycle import CaptureKey
        from calibration.model import card_of

        self.out, self.staging, self.model, self.weights, self.requests = out, staging, model, weights, requests
        family = families.of(model)
        card = card_of(family.name, families.config_of(model).to_dict())
        self.key = CaptureKey(
            card, weights, requests, export.OPSET, export.EXPORT_VERSION, toolchain, family.token_rows, every_class
        )
        self.kept: Any = None  # calibration.CalibrationSet, the previous build's
        self.captured: Any = None  # calibration.CalibrationSet, this build's new capture

    def previous(self) -> Any:
        from calibration import lifecycle

        return lifecycle.previous(self.out, self.key)

    def get(self) -> Any:
        """The set the int8 recipe quantizes with (captured on first use where none is kept)."""
        if self.kept is not None:
            return self.kept
        if self.captured is None:
            from calibration import lifecycle

            fp32_dir = self.staging / "fp32"
            records = {}
            for spec in families.of(self.model).graph_specs(self.model.config, False):
                graph = fp32_dir / f"{spec.name}.onnx"
                data = weights_io.data_path(graph)
                records[spec.name] = manifest_io.graph_record(
                    spec,
                    file=graph.name,
                    sha256=sha256_file(graph),
                    data_files={data.name: sha256_file(data)} if data.is_file() else {},
                    precision="fp32",
                )
            tools = dict(self.key.toolchain)
            manifest_io.write(
                fp32_dir,
                _document(fp32_dir, self.model, self.weights, "fp32", "onnxruntime", False, 8, tools, records),
            )
            self.captured = lifecycle.capture_from(
                fp32_dir, self.key, self.staging / "calibration", lambda done, _: moment(f"calibration:{done}")
            )
        return self.captured


def _export_all(
    model: nn.Module,
    staging: Path,
    out: Path,
    recipe: Precision,
    calibration: _Calibration,
    calibration_method: str,
    backend: str,
    specs: list[GraphSpec],
    keys: dict[str, str],
    reusable: dict[str, manifest_io.GraphEntry],
    progress: Progress | None,
) -> dict[str, dict[str, Any]]:
    """Export every graph in fp32, apply the precision recipe, move the results into ``out``."""
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
    bf16_unsafe = families.of(model).bf16_unsafe
    for spec in specs:
        if spec.name in reusable:  # the ONNX side of the old record only: plans are this build's to add
            safe = spec.kind not in bf16_unsafe
            result[spec.name] = manifest_io.reused_record(spec, reusable[spec.name], bf16_safe=safe)
    for done, spec in enumerate(todo):
        traced = traced_spec(spec, model)
        if progress:
            progress(f"{recipe.name} {spec.name}", len(todo) + done, steps)
        work = staging / spec.name
        work.mkdir()
        target = work / f"{spec.name}.onnx"
        inputs = RecipeInputs(
            calibration.get() if recipe.calibrated else None, calibration_method, float_recipe_for(backend)
        )
        record = recipe.apply(fp32_dir / f"{traced.name}.onnx", target, traced.name, inputs)
        if spec.kind == Kind.FLOW_LOOP:
            weights_io.save_graph(flow_loop.wrap(weights_io.load_graph(target), spec), target)
            record["flow_loop"] = "onnx Loop over the flow_step graph"
        export.check(target)
        files = weights_io.finalize(target, out, spec.name)
        moment(f"placed:{spec.name}")
        result[spec.name] = manifest_io.graph_record(
            spec,
            file=str(files["file"]),
            sha256=str(files["sha256"]),
            data_files=dict(files["data_files"]),  # type: ignore[call-overload]
            precision=recipe.name,
            build_key=keys[spec.name],
            bf16_safe=spec.kind not in bf16_unsafe,
            builder={
                "exporter": "torch.onnx.export(dynamo=True)",
                "opset": export.OPSET,
                "weights": "ONNX external data",
                "cleanup": "onnx-graphsurgeon",
                **record,
            },
        )
    if progress:
        progress("done", steps, steps)
    return {spec.name: result[spec.name] for spec in specs}


def _add_tensorrt_plans(
    out: Path,
    document: dict[str, Any],
    specs: list[GraphSpec],
    records: dict[str, dict[str, Any]],
    model: nn.Module,
    max_batch: int,
    progress: Progress | None,
) -> dict[str, Any]:
    """Compile one TensorRT plan per graph, one optimisation profile per stage (strongly typed).

    Never run on a real TensorRT installation yet (see README "What has run where").
    """
    from ecar_export.backends import tensorrt

    opt_batch = manifest_io.opt_batch(max_batch)
    plans, block = tensorrt.build_plans(
        out,
        {spec.name: (spec, str(records[spec.name]["file"])) for spec in specs},
        families.of(model).request_plan(model.config),
        (1, opt_batch, max_batch),
        tensorrt.PlanOptions(),
        progress=(lambda name, done, total: progress(f"tensorrt {name}", done, total)) if progress else None,
        moment=moment,
    )
    return tensorrt.apply_plans(document, plans, block)
