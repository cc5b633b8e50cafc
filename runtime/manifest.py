"""The engine directory's ``manifest.json``: what was built, from what, with which tools.

This module is the manifest's one owner: builds make their documents with :func:`document`,
:func:`graph_record`, :func:`with_calibration` and :func:`with_plans` and commit them with
:func:`write`; everyone else reads a validated :class:`Manifest` from :func:`load`.

The runtime validates a manifest completely before loading any graph: format and version
(the graph contract it was built for), schema, the model card (:class:`ModelCard`: the family's name
and config, of which the runtime reads only the name and the class count), the request plan
(:class:`runtime.plan.RequestPlan`, under ``plan``), every graph's spec against the contract
(:func:`runtime.graphs.check_specs`), file names that stay inside the directory, the sha256
of every file a graph needs (the graph, its external weights, its TensorRT plan) and of the
stage constants (``stage_constants``: ``{"file": "stages-<sha12>.npz", "sha256": ...}``,
checked against the specs and the plan by :func:`runtime.graphs.check_constants`), and last
the manifest's own ``manifest_sha256`` — a digest of its content
that :func:`write` adds, so that a manifest edited or damaged after the build wrote it (a
changed guidance scale, batch profile or precision that still parses) is refused instead of
silently changing what the engines do.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from runtime import graphs as contract
from runtime.backends import selection
from runtime.errors import ManifestError
from runtime.fileio import write_bytes_atomic
from runtime.formats import Format
from runtime.graphs import CONTRACT_VERSION, GraphSpec, Kind
from runtime.limits import MAX_CLASSES
from runtime.plan import RequestPlan
from runtime.stage_constants import StageConstants
from runtime.version import MIN_RUNTIME_FOR_CONTRACT, __version__

FORMAT = "ecar-engines"
FORMAT_VERSION = CONTRACT_VERSION  # the manifest format follows the graph contract
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")  # what each is: ecar_export.precision (the runtime only validates names)
DIGEST_FIELD = "manifest_sha256"
REBUILD = "rebuild the engines with this toolchain's `ecar-export build`"
OLDER_CONTRACT = "built for an older graph contract, which this runtime no longer loads"
MANIFEST_FORMAT = Format(
    FORMAT, FORMAT_VERSION, "manifest", "an ECAR engine manifest", ManifestError, REBUILD, "this runtime"
)


DEFAULT_FAMILY = "ecar"  # the family of builds whose manifest names none (written before families had names)


@dataclass(frozen=True)
class ModelCard:
    """The model a build serves, as the runtime sees it: whatever the family, only data.

    ``family`` names the export-side model family that wrote the build (``ecar``, ``flowar``, ...),
    ``settings`` is that family's whole config (the manifest's ``model`` object, which the family's
    export code reads back); the runtime itself reads only ``name`` and ``num_classes`` (labels are
    ``0..num_classes-1``). Everything else a request needs is the plan, the specs and the constants.
    """

    family: str
    name: str
    num_classes: int
    settings: Mapping[str, Any] = field(repr=False)

    @classmethod
    def from_manifest(cls, family: Any, model: Any, where: str) -> ModelCard:
        if not isinstance(family, str) or not family.isidentifier():
            raise ManifestError(f"{where}: field 'family' must name a model family (e.g. \"ecar\"), got {family!r}")
        if not isinstance(model, dict):
            raise ManifestError(f"{where}: field 'model' has the wrong type ({type(model).__name__})")
        name, classes = model.get("name"), model.get("num_classes")
        if not isinstance(name, str) or not name:
            raise ManifestError(f"{where}: invalid model config: field 'name' must be a non-empty string")
        limit = MAX_CLASSES
        if isinstance(classes, bool) or not isinstance(classes, int) or not 1 <= classes <= limit:
            raise ManifestError(
                f"{where}: invalid model config: field 'num_classes' must be an integer in [1, {limit:,}], "
                f"got {classes!r}"
            )
        return cls(family, name, classes, copy.deepcopy(model))


@dataclass(frozen=True)
class GraphEntry:
    spec: GraphSpec
    file: str  # the ONNX graph, relative to the engine directory
    sha256: str
    precision: str
    data_files: dict[str, str] = field(default_factory=dict)  # external weight data: file -> sha256
    plan_file: str | None = None  # TensorRT plan, where one was built
    plan_sha256: str | None = None
    build_key: str | None = None
    builder: dict[str, Any] = field(default_factory=dict)
    reused: bool = False
    tensorrt_builder: dict[str, Any] | None = None
    # False: the graph loses too much at bfloat16 (8 significant bits); a half-precision build of it runs at
    # float16 or float32 where a backend would pick bfloat16 (the model family says which graphs, measured)
    bf16_safe: bool = True

    @property
    def name(self) -> str:
        return self.spec.name

    def files(self) -> list[str]:
        """Every file this graph needs: the graph, its weights, its plan."""
        return [self.file, *self.data_files, *([self.plan_file] if self.plan_file else [])]


@dataclass(frozen=True)
class CalibrationRecord:
    """The INT8 calibration set a build kept (``dir``) and how it was captured."""

    dir: str
    method: str
    requests: int
    reused: bool


@dataclass(frozen=True)
class Manifest:
    root: Path
    model: ModelCard
    precision: str
    backend: str
    fuse_flow_loop: bool
    min_batch: int
    opt_batch: int
    max_batch: int
    graphs: dict[str, GraphEntry]
    toolchain: dict[str, Any]
    checkpoint_sha256: str
    plan: RequestPlan
    constants: StageConstants = field(repr=False)
    constants_file: str
    sizes: dict[str, int]  # what the specs fix: c, d, layers, heads, head_dim, image_channels, height, width, ...
    opset: int | None = None
    export_version: int | None = None
    created: str | None = None
    calibration: CalibrationRecord | None = None
    tensorrt: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def path(self, file: str) -> Path:
        return self.root / file

    @property
    def specs(self) -> dict[str, GraphSpec]:
        """Every graph's spec, by name."""
        return {name: entry.spec for name, entry in self.graphs.items()}

    def image_shape(self, batch: int) -> tuple[int, ...]:
        """The decoder's output shape at ``batch`` (from its spec)."""
        return self.graphs[Kind.DECODER].spec.tensor("image").concrete({"B": batch})

    def document(self) -> dict[str, Any]:
        """A deep copy of the JSON document, to derive a new manifest from (:func:`with_plans`)."""
        return copy.deepcopy(self.raw)

    def files(self) -> list[str]:
        """Every file of the build, graph by graph, then the stage constants."""
        return [*(name for entry in self.graphs.values() for name in entry.files()), self.constants_file]

    def bytes_on_disk(self) -> int:
        return sum(self.path(name).stat().st_size for name in self.files())


# ------------------------------------------------------------------------------ writing
def content_digest(data: dict[str, Any]) -> str:
    """sha256 of a manifest's content (canonical JSON of everything but :data:`DIGEST_FIELD`)."""
    body = {key: value for key, value in data.items() if key != DIGEST_FIELD}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def graph_record(
    spec: GraphSpec,
    *,
    file: str,
    sha256: str,
    data_files: Mapping[str, str],
    precision: str,
    build_key: str | None = None,
    builder: Mapping[str, Any] | None = None,
    reused: bool = False,
    bf16_safe: bool = True,
) -> dict[str, Any]:
    """One graph's entry: its contract, its files and how it was made (``bf16_safe``: :class:`GraphEntry`)."""
    record: dict[str, Any] = {
        **spec.to_dict(),
        "file": file,
        "sha256": sha256,
        "data_files": dict(data_files),
        "precision": precision,
        "reused": reused,
        "bf16_safe": bf16_safe,
    }
    if build_key is not None:
        record["build_key"] = build_key
    if builder is not None:
        record["builder"] = dict(builder)
    return record


def reused_record(spec: GraphSpec, entry: GraphEntry, bf16_safe: bool) -> dict[str, Any]:
    """A previous build's graph, unchanged, as this build's record (its ONNX side only: plans are this build's).

    ``bf16_safe`` is this build's: it says how backends may run the graph, not how it was made, so a
    family that changes its mind reaches reused graphs too."""
    return graph_record(
        spec,
        file=entry.file,
        sha256=entry.sha256,
        data_files=entry.data_files,
        precision=entry.precision,
        build_key=entry.build_key,
        builder=entry.builder,
        reused=True,
        bf16_safe=bf16_safe,
    )


def opt_batch(max_batch: int) -> int:
    """The batch size a build's engines are tuned for (TensorRT's optimisation profile): 8, or less."""
    return max(1, min(max_batch, 8))


def constants_file(blob: bytes) -> tuple[str, str]:
    """(file name, sha256) of a stages file with content ``blob``: named by content, like the graphs."""
    digest = hashlib.sha256(blob).hexdigest()
    return f"stages-{digest[:12]}.npz", digest


def document(
    family: str,
    config: Mapping[str, Any],
    *,
    plan: RequestPlan,
    stage_constants: Mapping[str, str],
    precision: str,
    backend: str,
    fuse_flow_loop: bool,
    max_batch: int,
    checkpoint_sha256: str,
    opset: int,
    export_version: int,
    toolchain: Mapping[str, Any],
    graphs: Mapping[str, dict[str, Any]],
) -> dict[str, Any]:
    """A whole manifest document (without TensorRT plans or a calibration set; see :func:`with_plans`).

    ``family`` and ``config``: the model family and its config as a JSON object (:class:`ModelCard`).

    ``stage_constants``: ``{"file": ..., "sha256": ...}`` of the stages file (:func:`constants_file`).
    """
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "runtime": {"min_version": MIN_RUNTIME_FOR_CONTRACT, "built_by": __version__},
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "family": family,
        "model": copy.deepcopy(dict(config)),
        "plan": plan.to_dict(),
        "stage_constants": dict(stage_constants),
        "precision": precision,
        "backend": backend,
        "fuse_flow_loop": fuse_flow_loop,
        "profile": {"min_batch": 1, "opt_batch": opt_batch(max_batch), "max_batch": max_batch},
        "checkpoint_sha256": checkpoint_sha256,
        "opset": opset,
        "export_version": export_version,
        "toolchain": dict(toolchain),
        "graphs": {name: copy.deepcopy(record) for name, record in graphs.items()},
    }


def with_calibration(data: dict[str, Any], method: str, requests: int, reused: bool) -> dict[str, Any]:
    """``data`` naming the INT8 calibration set kept in ``calibration/``."""
    return {**data, "calibration": {"dir": "calibration", "method": method, "requests": requests, "reused": reused}}


def with_plans(
    data: Mapping[str, Any], plans: Mapping[str, Mapping[str, Any]], block: Mapping[str, Any]
) -> dict[str, Any]:
    """A copy of a manifest document that names TensorRT plans: one per graph, and the ``tensorrt`` block.

    ``plans[graph]`` holds ``plan_file``, ``plan_sha256`` and ``tensorrt_builder``.
    """
    result = copy.deepcopy(dict(data))
    graphs = result.get("graphs")
    if not isinstance(graphs, dict) or set(graphs) != set(plans):
        raise ManifestError("the plans do not cover exactly the manifest's graphs; rebuild them all")
    for name, fields in plans.items():
        graphs[name].update(copy.deepcopy(dict(fields)))
    result["backend"] = "tensorrt"
    result["tensorrt"] = dict(block)
    toolchain = result.setdefault("toolchain", {})
    if isinstance(toolchain, dict):
        toolchain["tensorrt"] = block.get("version")
    return result


def named_files(data: Mapping[str, Any]) -> set[str]:
    """Every top-level entry of an engine directory that a manifest (its JSON data) names."""
    names = {MANIFEST_NAME}
    graphs = data.get("graphs")
    for record in graphs.values() if isinstance(graphs, dict) else ():
        if not isinstance(record, dict):
            continue
        for key in ("file", "plan_file"):
            if isinstance(record.get(key), str):
                names.add(record[key])
        if isinstance(record.get("data_files"), dict):
            names.update(name for name in record["data_files"] if isinstance(name, str))
    constants = data.get("stage_constants")
    if isinstance(constants, dict) and isinstance(constants.get("file"), str):
        names.add(constants["file"])
    calibration = data.get("calibration")
    if isinstance(calibration, dict) and isinstance(calibration.get("dir"), str):
        names.add(calibration["dir"])
    return names


def write(engine_dir: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (the commit point of a build), with its content digest."""
    path = Path(engine_dir) / MANIFEST_NAME
    body = {key: value for key, value in data.items() if key != DIGEST_FIELD}
    body[DIGEST_FIELD] = content_digest(body)
    write_bytes_atomic(path, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())
    return path


# ------------------------------------------------------------------------------ reading
def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise ManifestError(f"{where}: missing field '{key}'")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(f"{where}: field '{key}' has the wrong type ({type(value).__name__})")
    return value


def _safe_file(root: Path, name: Any, where: str) -> str:
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{where}: file name must be a non-empty string")
    if "/" in name or "\\" in name or name in (".", "..") or os.path.isabs(name) or "\x00" in name:
        raise ManifestError(f"{where}: file '{name}' escapes the engine directory; rebuild the engines")
    if not (root / name).resolve().is_relative_to(root.resolve()):
        raise ManifestError(f"{where}: file '{name}' escapes the engine directory; rebuild the engines")
    return name


def committed_digest(engine_dir: str | os.PathLike[str]) -> str | None:
    """The digest of the build committed in ``engine_dir`` right now (None where there is none to read).

    A loader compares it before and after loading: a different value means a build committed
    into the directory meanwhile (and may have swept the files of the one being loaded).
    """
    try:
        data = json.loads((Path(engine_dir) / MANIFEST_NAME).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    digest = data.get(DIGEST_FIELD) if isinstance(data, dict) else None
    return digest if isinstance(digest, str) else None


def load(engine_dir: str | os.PathLike[str], verify_files: bool = True) -> Manifest:
    """Read and validate an engine directory's manifest; raises :class:`ManifestError`."""
    root = Path(engine_dir)
    if not root.exists():
        raise ManifestError(
            f"engine directory '{root}' does not exist; build one with `ecar-export build --out {root}`"
        )
    if not root.is_dir():
        raise ManifestError(f"engine directory '{root}' is not a directory; pass --engine-dir DIR")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"'{path}' is missing: '{root}' holds no complete build; run `ecar-export build --out {root}`"
        )
    data = MANIFEST_FORMAT.read_json(path)
    return MANIFEST_FORMAT.parse(str(path), lambda: _parse(root, path, data, verify_files))


def _parse(root: Path, path: Path, data: dict[str, Any], verify_files: bool) -> Manifest:
    where = str(path)
    MANIFEST_FORMAT.check_name(data, where)
    _check_runtime_version(data.get("runtime"), where)
    MANIFEST_FORMAT.check_version(data, where, older=OLDER_CONTRACT)
    model = ModelCard.from_manifest(data.get("family", DEFAULT_FAMILY), _require(data, "model", dict, where), where)
    precision = _require(data, "precision", str, where)
    if precision not in PRECISIONS:
        raise ManifestError(f"{where}: unknown precision '{precision}'")
    backend = _require(data, "backend", str, where)
    if backend not in selection.BACKENDS:
        raise ManifestError(f"{where}: unknown backend '{backend}'")
    fused = _require(data, "fuse_flow_loop", bool, where)
    profile = _require(data, "profile", dict, where)
    batches = [_require(profile, key, int, f"{where} profile") for key in ("min_batch", "opt_batch", "max_batch")]
    if not 1 <= batches[0] <= batches[1] <= batches[2]:
        raise ManifestError(f"{where}: batch profile {batches} must satisfy 1 <= min <= opt <= max")
    toolchain = _require(data, "toolchain", dict, where)
    checkpoint = _require(data, "checkpoint_sha256", str, where)
    plan = RequestPlan.from_dict(_require(data, "plan", dict, where))
    raw_graphs = _require(data, "graphs", dict, where)
    specs = {name: GraphSpec.from_dict(name, raw) for name, raw in raw_graphs.items()}
    sizes = contract.check_specs(specs, fused, {"c": plan.channels, "n_last": plan.stages[-1].tokens})
    specs = {str(kind): specs[kind] for kind in contract.kinds(fused)}  # in the order a request calls them
    if fused:
        plan.calls(True)  # a guidance threshold that splits a fused stage is refused here
    entries = {
        name: _graph_entry(root, where, name, spec, raw_graphs[name], verify_files) for name, spec in specs.items()
    }
    constants, constants_name = _stage_constants(root, where, data.get("stage_constants"), verify_files)
    contract.check_constants(specs, plan, constants.arrays())
    calibration = _calibration(data.get("calibration"), where)
    tensorrt = data.get("tensorrt")
    if tensorrt is not None and not isinstance(tensorrt, dict):
        raise ManifestError(f"{where}: field 'tensorrt' has the wrong type ({type(tensorrt).__name__})")
    if data.get(DIGEST_FIELD) != content_digest(data):
        raise ManifestError(
            f"{where}: the manifest was edited or damaged after the build wrote it (its {DIGEST_FIELD} does not "
            "match its content); rebuild the engines"
        )
    opset, export_version, created = data.get("opset"), data.get("export_version"), data.get("created")
    return Manifest(
        root=root,
        model=model,
        precision=precision,
        backend=backend,
        fuse_flow_loop=fused,
        min_batch=batches[0],
        opt_batch=batches[1],
        max_batch=batches[2],
        graphs=entries,
        toolchain=toolchain,
        checkpoint_sha256=checkpoint,
        plan=plan,
        constants=constants,
        constants_file=constants_name,
        sizes=sizes,
        opset=opset if isinstance(opset, int) else None,
        export_version=export_version if isinstance(export_version, int) else None,
        created=created if isinstance(created, str) else None,
        calibration=calibration,
        tensorrt=tensorrt,
        raw=data,
    )


def _check_runtime_version(raw: Any, where: str) -> None:
    """Refuse a build that needs a newer runtime than this one, naming both versions."""
    if not isinstance(raw, dict):
        return  # builds before 0.2.0 name no runtime; their format version refuses them
    needed, built_by = raw.get("min_version"), raw.get("built_by")
    try:
        at_least = Version(needed) if isinstance(needed, str) else None
    except InvalidVersion:
        at_least = None
    if at_least is None:
        raise ManifestError(f"{where}: field 'runtime.min_version' must be a version string; rebuild the engines")
    if Version(__version__) < at_least:
        by = f" (it was built by ecar-export {built_by})" if isinstance(built_by, str) else ""
        raise ManifestError(
            f"{where}: this build needs ecar-export's runtime {needed} or newer{by}, but this runtime is "
            f"{__version__}; upgrade it (pip install -U 'ecar-export[onnxruntime]>={needed}') or rebuild the "
            "engines with this toolchain"
        )


def _calibration(raw: Any, where: str) -> CalibrationRecord | None:
    if raw is None:
        return None
    here = f"{where} calibration"
    if not isinstance(raw, dict):
        raise ManifestError(f"{here}: must be a JSON object")
    return CalibrationRecord(
        dir=_require(raw, "dir", str, here),
        method=_require(raw, "method", str, here),
        requests=_require(raw, "requests", int, here),
        reused=_require(raw, "reused", bool, here),
    )


def _stage_constants(root: Path, where: str, raw: Any, verify: bool) -> tuple[StageConstants, str]:
    """The stages file the manifest names, its sha256 checked (``verify``) and its arrays read."""
    here = f"{where} stage_constants"
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: missing field 'stage_constants' (the stages file); rebuild the engines")
    file = _safe_file(root, raw.get("file"), here)
    digest = _require(raw, "sha256", str, here)
    if verify:
        MANIFEST_FORMAT.verify_file(root / file, digest, here)
    elif not (root / file).is_file():
        raise ManifestError(f"{here}: file '{root / file}' is missing; {REBUILD}")
    return StageConstants.read(root / file), file


def _graph_entry(root: Path, where: str, name: str, spec: GraphSpec, raw: Any, verify: bool) -> GraphEntry:
    here = f"{where} graph '{name}'"
    if not isinstance(raw, dict):
        raise ManifestError(f"{here}: must be a JSON object")
    file = _safe_file(root, raw.get("file"), here)
    digest = _require(raw, "sha256", str, here)
    precision = _require(raw, "precision", str, here)
    if precision not in PRECISIONS:
        raise ManifestError(f"{here}: unknown precision '{precision}'")
    data_files = _require(raw, "data_files", dict, here)
    weights: dict[str, str] = {}
    for data_name, data_digest in data_files.items():
        _safe_file(root, data_name, here)
        if not isinstance(data_digest, str):
            raise ManifestError(f"{here}: the sha256 of '{data_name}' must be a string")
        weights[data_name] = data_digest
    plan, plan_digest = raw.get("plan_file"), raw.get("plan_sha256")
    if plan is not None:
        plan = _safe_file(root, plan, here)
        if not isinstance(plan_digest, str):
            raise ManifestError(f"{here}: 'plan_file' without 'plan_sha256'")
    builder, build_key, trt = raw.get("builder", {}), raw.get("build_key"), raw.get("tensorrt_builder")
    if not isinstance(builder, dict) or (build_key is not None and not isinstance(build_key, str)):
        raise ManifestError(f"{here}: 'builder' / 'build_key' have the wrong type")
    if trt is not None and not isinstance(trt, dict):
        raise ManifestError(f"{here}: 'tensorrt_builder' has the wrong type")
    bf16_safe = raw.get("bf16_safe", True)  # absent in builds made before the field
    if not isinstance(bf16_safe, bool):
        raise ManifestError(f"{here}: field 'bf16_safe' has the wrong type ({type(bf16_safe).__name__})")
    if verify:
        for item, expected in ((file, digest), *weights.items(), *([(plan, plan_digest)] if plan else [])):
            assert isinstance(expected, str)
            MANIFEST_FORMAT.verify_file(root / item, expected, here)
    return GraphEntry(
        spec=spec,
        file=file,
        sha256=digest,
        precision=precision,
        data_files=weights,
        plan_file=plan,
        plan_sha256=plan_digest,
        build_key=build_key,
        builder=builder,
        reused=bool(raw.get("reused", False)),
        tensorrt_builder=trt,
        bf16_safe=bf16_safe,
    )
