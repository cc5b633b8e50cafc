"""The engine directory's ``manifest.json``: what was built, from what, with which tools.

The runtime validates a manifest completely before loading any graph: format and
version, schema, the model config, every graph named by the config's contract with
exactly the contract's inputs and outputs, file names that stay inside the directory,
each file's sha256, and last the manifest's own ``manifest_sha256`` — a digest of its
content that :func:`write` adds, so that a manifest edited or damaged after the build
wrote it (a changed guidance scale, batch profile or precision that still parses) is
refused instead of silently changing what the engines do.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.config import ECARConfig
from runtime.errors import ConfigError, ECARError, ManifestError
from runtime.fileio import sha256_file, write_bytes_atomic
from runtime.graphs import GraphSpec, graph_specs

FORMAT = "ecar-engines"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")
BACKENDS = ("onnxruntime", "tensorrt")
DIGEST_FIELD = "manifest_sha256"


def content_digest(data: dict[str, Any]) -> str:
    """sha256 of a manifest's content (canonical JSON of everything but :data:`DIGEST_FIELD`)."""
    body = {key: value for key, value in data.items() if key != DIGEST_FIELD}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class GraphEntry:
    spec: GraphSpec
    file: str  # ONNX file, relative to the engine directory
    sha256: str
    precision: str
    plan_file: str | None = None  # TensorRT plan, where one was built
    plan_sha256: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class Manifest:
    root: Path
    config: ECARConfig
    precision: str
    backend: str
    fuse_flow_loop: bool
    min_batch: int
    opt_batch: int
    max_batch: int
    graphs: dict[str, GraphEntry]
    toolchain: dict[str, Any]
    checkpoint_sha256: str
    raw: dict[str, Any]

    def path(self, file: str) -> Path:
        return self.root / file


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
    try:
        data = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ManifestError(f"'{path}' is not valid JSON ({exc}); rebuild the engines") from None
    try:
        return _parse(root, path, data, verify_files)
    except ManifestError:
        raise
    except ECARError as exc:
        raise ManifestError(f"'{path}': {exc}") from None


def _parse(root: Path, path: Path, data: Any, verify_files: bool) -> Manifest:
    where = str(path)
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: the manifest must be a JSON object")
    if data.get("format") != FORMAT:
        raise ManifestError(f"{where}: not an ECAR engine manifest (format {data.get('format')!r})")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{where}: manifest format version {version!r}, this runtime reads {FORMAT_VERSION}; "
            "rebuild the engines with this toolchain's `ecar-export build`"
        )
    try:
        config = ECARConfig.from_dict(_require(data, "model", dict, where))
    except ConfigError as exc:
        raise ManifestError(f"{where}: invalid model config: {exc}") from None
    precision = _require(data, "precision", str, where)
    if precision not in PRECISIONS:
        raise ManifestError(f"{where}: unknown precision '{precision}'")
    backend = _require(data, "backend", str, where)
    if backend not in BACKENDS:
        raise ManifestError(f"{where}: unknown backend '{backend}'")
    fused = _require(data, "fuse_flow_loop", bool, where)
    profile = _require(data, "profile", dict, where)
    batches = [_require(profile, key, int, f"{where} profile") for key in ("min_batch", "opt_batch", "max_batch")]
    if not 1 <= batches[0] <= batches[1] <= batches[2]:
        raise ManifestError(f"{where}: batch profile {batches} must satisfy 1 <= min <= opt <= max")
    toolchain = _require(data, "toolchain", dict, where)
    checkpoint = _require(data, "checkpoint_sha256", str, where)
    raw_graphs = _require(data, "graphs", dict, where)
    specs = {spec.name: spec for spec in graph_specs(config, fused)}
    if set(raw_graphs) != set(specs):
        missing, extra = sorted(set(specs) - set(raw_graphs)), sorted(set(raw_graphs) - set(specs))
        raise ManifestError(f"{where}: graphs do not match the model (missing {missing}, unexpected {extra}); rebuild")
    entries = {}
    for name, spec in specs.items():
        entries[name] = _graph_entry(root, where, name, spec, raw_graphs[name], verify_files)
    if data.get(DIGEST_FIELD) != content_digest(data):
        raise ManifestError(
            f"{where}: the manifest was edited or damaged after the build wrote it (its {DIGEST_FIELD} does not "
            "match its content); rebuild the engines"
        )
    return Manifest(
        root=root,
        config=config,
        precision=precision,
        backend=backend,
        fuse_flow_loop=fused,
        min_batch=batches[0],
        opt_batch=batches[1],
        max_batch=batches[2],
        graphs=entries,
        toolchain=toolchain,
        checkpoint_sha256=checkpoint,
        raw=data,
    )


def _graph_entry(root: Path, where: str, name: str, spec: GraphSpec, raw: Any, verify: bool) -> GraphEntry:
    here = f"{where} graph '{name}'"
    if not isinstance(raw, dict):
        raise ManifestError(f"{here}: must be a JSON object")
    contract = spec.to_dict()
    for key in ("kind", "stage", "inputs", "outputs"):
        if raw.get(key) != contract[key]:
            raise ManifestError(f"{here}: '{key}' does not match the graph contract of this runtime; rebuild")
    file = _safe_file(root, raw.get("file"), here)
    digest = _require(raw, "sha256", str, here)
    precision = _require(raw, "precision", str, here)
    plan = raw.get("plan_file")
    plan_digest = raw.get("plan_sha256")
    if plan is not None:
        plan = _safe_file(root, plan, here)
        if not isinstance(plan_digest, str):
            raise ManifestError(f"{here}: 'plan_file' without 'plan_sha256'")
    if verify:
        for item, expected in ((file, digest), (plan, plan_digest)):
            if item is None:
                continue
            target = root / item
            if not target.is_file():
                raise ManifestError(f"{here}: file '{target}' is missing; rebuild the engines")
            try:
                actual = sha256_file(target)
            except OSError as exc:
                raise ManifestError(f"{here}: cannot read '{target}': {exc}") from None
            if actual != expected:
                raise ManifestError(
                    f"{here}: '{target}' does not match its sha256 in the manifest (corrupt or replaced); "
                    "rebuild the engines"
                )
    return GraphEntry(spec, file, digest, precision, plan, plan_digest)


def named_files(data: dict[str, Any]) -> set[str]:
    """Every top-level entry of an engine directory that a manifest (its JSON data) names."""
    names = {MANIFEST_NAME}
    graphs = data.get("graphs")
    for record in graphs.values() if isinstance(graphs, dict) else ():
        for key in ("file", "plan_file"):
            if isinstance(record, dict) and isinstance(record.get(key), str):
                names.add(record[key])
    calibration = data.get("calibration")
    if isinstance(calibration, dict) and isinstance(calibration.get("dir"), str):
        names.add(calibration["dir"])
    return names


def write(engine_dir: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (the commit point of a build), with its content digest."""
    path = Path(engine_dir) / MANIFEST_NAME
    document = {**data, DIGEST_FIELD: content_digest(data)}
    write_bytes_atomic(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())
    return path
