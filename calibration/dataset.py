"""A calibration directory on disk and ``CalibrationSet``, its validated, lazily loaded view.

Layout (written by :func:`calibration.capture.capture`)::

    calibration.json            format, plan, the model (family, config, request plan, flow row unit),
                                checkpoint sha256, per-graph entries (their contract and files)
    backbone-<sha12>.npz        one file per stored graph (backbone, flow_step, decoder),
    flow_step-<sha12>.npz       named by content
    decoder-<sha12>.npz
    stages-<sha12>.npz          the fp32 build's stage constants (:mod:`runtime.stage_constants`)

Everything a reader needs of the model comes from these files (:class:`calibration.model.CapturedModel`),
so a set serves any model family.

A graph's rows are kept in *groups* (:meth:`CapturedModel.groups`): the backbone one per stage
(its rows' shapes differ by stage), a flow head stored as token grids too, every other graph one
group, ``all``. Each ``.npz`` holds, for every
group and both splits ("calibration", "held_out"), the graph's stored inputs in the row layout
of :mod:`calibration.layout` under ``<group>.<split>.<input>``, plus int32 provenance under
``<group>.<split>.meta.<field>``: ``request`` (the plan's request index), ``sample`` (the
sample within it) and ``stage`` for every row, and for ``flow_step`` also ``step`` (0-based
Euler step inside the stage) and, stored as token rows, ``token`` (the token within the
sample's stage grid).
``calibration.json`` is written last and atomically: a capture interrupted half-way never
leaves a directory that loads.

A fused build's ``flow_loop`` reads each stage's first Euler step, so its rows are derived from
the ``flow_step`` rows with ``step == 0``, one group per stage.

Format version 3 (this one) stores the model as its build describes it, so that this package reads a set
of any model family without knowing the family. Version 2 sets held an ECAR config only and are refused
(capture again: ``ecar-export build --precision int8`` does).
"""

from __future__ import annotations

import json
import os
import re
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calibration import layout
from calibration.errors import CalibrationError
from calibration.model import CapturedModel
from calibration.plan import SPLITS, CalibrationPlan
from runtime import stage_constants as constants_io
from runtime.errors import ECARError, InvalidRequestError
from runtime.fileio import npz_bytes, write_bytes_atomic
from runtime.formats import Format
from runtime.graphs import FLOW_KINDS, GraphSpec, Kind
from runtime.manifest import ModelCard
from runtime.plan import RequestPlan

FORMAT = "ecar-calibration"
FORMAT_VERSION = 3
MANIFEST_NAME = "calibration.json"
CALIBRATION_FORMAT = Format(
    FORMAT, FORMAT_VERSION, "calibration", "an ECAR calibration manifest", CalibrationError, "capture again"
)
META_FIELDS = ("request", "sample", "stage")
FLOW_META_FIELDS = ("request", "sample", "stage", "step")
TOKEN_META_FIELDS = ("request", "sample", "stage", "token", "step")
ROW_UNITS = {"token": True, "grid": False}  # calibration.json's flow_rows -> CapturedModel.token_rows
_FILE_NAME = re.compile(r"^[A-Za-z0-9_]+-[0-9a-f]{12}\.npz$")


def stored_specs(model: CapturedModel) -> dict[str, GraphSpec]:
    """The graphs a calibration set stores rows of: those of an unfused build."""
    return dict(model.specs)


def meta_fields(model: CapturedModel, spec: GraphSpec) -> tuple[str, ...]:
    if spec.kind not in FLOW_KINDS:
        return META_FIELDS
    return TOKEN_META_FIELDS if model.token_rows else FLOW_META_FIELDS


def array_layout(
    model: CapturedModel, spec: GraphSpec, group: str, rows: int
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every array key of one group and split of a graph's file: (shape, dtype)."""
    dims = model.group_dims(group)
    arrays: dict[str, tuple[tuple[int, ...], str]] = {}
    for tensor in layout.stored_inputs(spec, model.token_rows):
        arrays[tensor.name] = ((rows, *layout.row_shape(tensor, dims)), tensor.dtype)
    for name in meta_fields(model, spec):
        arrays[f"meta.{name}"] = ((rows,), "int32")
    return arrays


@dataclass(frozen=True)
class GraphData:
    """One graph's entry of ``calibration.json``."""

    spec: GraphSpec
    file: str
    sha256: str
    rows: dict[str, dict[str, int]]  # group -> split -> rows

    @property
    def name(self) -> str:
        return self.spec.name


class CalibrationSet:
    """Validated calibration inputs of every graph; arrays are read on first use."""

    def __init__(
        self,
        root: Path,
        model: CapturedModel,
        plan: CalibrationPlan,
        checkpoint_sha256: str,
        graphs_data: dict[str, GraphData],
        raw: dict[str, Any],
    ) -> None:
        self.root = root
        self.model = model
        self.plan = plan
        self.checkpoint_sha256 = checkpoint_sha256
        self.graphs = graphs_data
        self.raw = raw
        self._specs = dict(model.specs)
        self._specs[Kind.FLOW_LOOP] = model.loop_spec()
        self._cache: dict[str, dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- queries
    def graph_names(self) -> list[str]:
        """Every graph this set can feed: the stored ones and the derived ``flow_loop``."""
        return list(self._specs)

    def files(self) -> set[str]:
        """Every file of the set but its manifest: the graphs' rows and the stage constants."""
        return {entry.file for entry in self.graphs.values()} | {self.raw["stage_constants"]["file"]}

    def spec(self, graph: str) -> GraphSpec:
        try:
            return self._specs[graph]
        except KeyError:
            raise CalibrationError(
                f"calibration set has no graph '{graph}'; it holds {', '.join(self._specs)}"
            ) from None

    def groups(self, graph: str) -> list[str]:
        return self.model.groups(self.spec(graph))

    def rows(self, graph: str, split: str = "calibration", group: str | None = None) -> dict[str, np.ndarray]:
        """One group's stored inputs of one split, in the row layout of :mod:`calibration.layout`.

        ``group`` may be omitted for graphs with one group.
        """
        data = self._group(graph, split, group)
        return {t.name: data[t.name] for t in layout.stored_inputs(self.spec(graph), self.model.token_rows)}

    def meta(self, graph: str, split: str = "calibration", group: str | None = None) -> dict[str, np.ndarray]:
        """Provenance of each row: ``request``, ``sample``, ``stage`` (and ``token``, ``step`` for flow graphs)."""
        data = self._group(graph, split, group)
        return {key[len("meta.") :]: value for key, value in data.items() if key.startswith("meta.")}

    def count(self, graph: str, split: str = "calibration") -> int:
        """Rows of a split, over every group."""
        return sum(layout.row_count(self.rows(graph, split, group)) for group in self.groups(graph))

    def constants(self, graph: str, group: str) -> dict[str, np.ndarray]:
        return self.model.stage_inputs(self.spec(graph), group)

    def default_batch_rows(self, graph: str) -> int:
        """Rows per batch: the plan's batch of samples, or of tokens at the largest stage (token rows)."""
        spec = self.spec(graph)
        if spec.kind in FLOW_KINDS and self.model.token_rows:
            return self.plan.batch * max(self.model.plan.tokens)
        return self.plan.batch

    def feeds(
        self,
        graph: str,
        split: str = "calibration",
        batch_rows: int | None = None,
        fixed: bool = False,
        group: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Feeds of the graph, ``batch_rows`` rows per call (default :meth:`default_batch_rows`), group by group.

        ``fixed``: every call of a group has the same row count (see :func:`calibration.layout.batches`).
        ``group``: only that group.
        """
        for name in [group] if group is not None else self.groups(graph):
            for index in self.batch_indices(graph, split, batch_rows, fixed, name):
                yield self.feed(graph, split, name, index)

    def batch_indices(
        self, graph: str, split: str, batch_rows: int | None = None, fixed: bool = False, group: str | None = None
    ) -> list[np.ndarray]:
        """The rows of each of :meth:`feeds`' calls for one group, without making the feeds (see :meth:`feed`)."""
        size = batch_rows or self.default_batch_rows(graph)
        rows = self.rows(graph, split, group)
        return layout.batch_indices(self.spec(graph), rows, size, fixed, self.model.token_rows)

    def feed(self, graph: str, split: str, group: str, index: np.ndarray) -> dict[str, Any]:
        """One call's feed: the rows ``index`` of a group (one of :meth:`batch_indices`) with its constants."""
        rows = layout.select(self.rows(graph, split, group), index)
        return layout.from_rows(self.spec(graph), rows, self.constants(graph, group), self.model.token_rows)

    def stage_feeds(
        self, graph: str, stage: int, split: str = "held_out", batch_rows: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Feeds of the rows a request fed ``graph`` at ``stage`` (the decoder: the last stage's)."""
        spec = self.spec(graph)
        group = self.model.group_of(spec, stage)
        rows, meta = self.rows(graph, split, group), self.meta(graph, split, group)
        index = np.flatnonzero(meta["stage"] == stage)
        picked = layout.select(rows, index)
        if len(index):
            size = batch_rows or self.default_batch_rows(graph)
            yield from layout.batches(spec, picked, size, False, self.constants(graph, group), self.model.token_rows)

    def check_compatible(self, model: ModelCard, checkpoint_sha256: str) -> None:
        """Refuse a calibration set captured from another model (family or config) or checkpoint."""
        if not self.model.same_model(model.family, model.settings):
            raise CalibrationError(
                f"calibration set '{self.root}' was captured from {self.model.card.family} model "
                f"'{self.model.card.name}' with another config than {model.family} model '{model.name}'; "
                "capture again from the model being built"
            )
        if checkpoint_sha256 != self.checkpoint_sha256:
            raise CalibrationError(
                f"calibration set '{self.root}' was captured from checkpoint {self.checkpoint_sha256[:12]}…, "
                f"not {checkpoint_sha256[:12]}…; capture again from the checkpoint being built"
            )

    # --------------------------------------------------------------- internals
    def _group(self, graph: str, split: str, group: str | None) -> dict[str, np.ndarray]:
        if split not in SPLITS:
            raise InvalidRequestError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
        spec = self.spec(graph)
        names = self.model.groups(spec)
        if group is None:
            if len(names) != 1:
                raise InvalidRequestError(f"graph '{graph}' keeps its rows per stage: name a group ({names[0]}, ...)")
            group = names[0]
        if group not in names:
            raise InvalidRequestError(f"graph '{graph}' has no row group '{group}'; it has {', '.join(names)}")
        if spec.kind == Kind.FLOW_LOOP:
            return self._flow_loop_group(spec, split, group)
        arrays = self._load(graph)
        prefix = f"{group}.{split}."
        return {key[len(prefix) :]: value for key, value in arrays.items() if key.startswith(prefix)}

    def _flow_loop_group(self, spec: GraphSpec, split: str, group: str) -> dict[str, np.ndarray]:
        step = self.model.spec(Kind.FLOW_STEP)
        stage = self.model.group_stage(group)
        data = self._group(step.name, split, self.model.group_of(step, stage))
        first = np.flatnonzero((data["meta.stage"] == stage) & (data["meta.step"] == 0))
        picked = {t.name: data[t.name][first] for t in layout.stored_inputs(spec, self.model.token_rows)}
        picked.update({f"meta.{name}": data[f"meta.{name}"][first] for name in meta_fields(self.model, spec)})
        return picked

    def _load(self, graph: str) -> dict[str, np.ndarray]:
        with self._lock:
            if graph not in self._cache:
                entry = self.graphs[graph]
                self._cache[graph] = _read_arrays(self.root / entry.file, entry, self.raw_arrays(graph))
            return self._cache[graph]

    def raw_arrays(self, graph: str) -> dict[str, tuple[tuple[int, ...], str]]:
        entry = self.graphs[graph]
        expected: dict[str, tuple[tuple[int, ...], str]] = {}
        for group, counts in entry.rows.items():
            for split in SPLITS:
                for key, value in array_layout(self.model, entry.spec, group, counts[split]).items():
                    expected[f"{group}.{split}.{key}"] = value
        return expected


# ------------------------------------------------------------------------------- writing
def encode_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """An uncompressed ``.npz`` whose bytes depend only on the arrays (:func:`runtime.fileio.npz_bytes`), so a
    repeated capture gives the same content-addressed files."""
    return npz_bytes(arrays)


def write_calibration(
    out_dir: str | os.PathLike[str],
    model: CapturedModel,
    checkpoint_sha256: str,
    plan: CalibrationPlan,
    data: dict[str, dict[str, dict[str, dict[str, np.ndarray]]]],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write one ``.npz`` per graph, then ``calibration.json`` atomically; returns the manifest path.

    ``data[graph][group][split]`` maps stored input names and ``meta.<field>`` keys to row
    arrays. Files of an earlier capture that the new manifest no longer names are removed
    after the manifest is replaced.
    """
    root = Path(out_dir)
    previous = _previous_files(root)
    entries: dict[str, Any] = {}
    for name, spec in stored_specs(model).items():
        arrays: dict[str, np.ndarray] = {}
        counts: dict[str, dict[str, int]] = {}
        for group in model.groups(spec):
            counts[group] = {}
            for split in SPLITS:
                part = data[name][group][split]
                counts[group][split] = layout.row_count(part)
                for key, (shape, dtype) in array_layout(model, spec, group, counts[group][split]).items():
                    value = np.ascontiguousarray(part[key], dtype=dtype)
                    if value.shape != shape:
                        raise ValueError(f"graph '{name}' {group}.{split}.{key}: shape {value.shape}, expected {shape}")
                    arrays[f"{group}.{split}.{key}"] = value
        blob = encode_npz(arrays)
        digest = _sha256(blob)
        file = f"{name}-{digest[:12]}.npz"
        write_bytes_atomic(root / file, blob)
        entry: dict[str, Any] = {
            **spec.to_dict(),
            "file": file,
            "sha256": digest,
            "bytes": len(blob),
            "rows": counts,
            "row_unit": "token" if spec.kind == Kind.FLOW_STEP and model.token_rows else "sample",
        }
        if spec.kind == Kind.FLOW_STEP:
            entry["rows_per_step"] = {
                split: _per_step(
                    np.concatenate([data[name][g][split]["meta.stage"] for g in model.groups(spec)]),
                    np.concatenate([data[name][g][split]["meta.step"] for g in model.groups(spec)]),
                )
                for split in SPLITS
            }
        entries[name] = entry
    stages_blob = constants_io.encode(model.constants.arrays())
    stages_digest = _sha256(stages_blob)
    stages_file = f"stages-{stages_digest[:12]}.npz"
    write_bytes_atomic(root / stages_file, stages_blob)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **model.to_dict(),
        "stage_constants": {"file": stages_file, "sha256": stages_digest},
        "checkpoint_sha256": checkpoint_sha256,
        "plan": plan.to_dict(),
        "graphs": entries,
        **(extra or {}),
    }
    path = root / MANIFEST_NAME
    write_bytes_atomic(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    current = {entry["file"] for entry in entries.values()} | {stages_file}
    for stale in previous - current:
        (root / stale).unlink(missing_ok=True)
    return path


def _per_step(stage: np.ndarray, step: np.ndarray) -> list[list[int]]:
    pairs, counts = np.unique(np.stack([stage, step], axis=1), axis=0, return_counts=True)
    return [[int(s), int(k), int(c)] for (s, k), c in zip(pairs, counts)]


def _sha256(blob: bytes) -> str:
    import hashlib

    return hashlib.sha256(blob).hexdigest()


def _previous_files(root: Path) -> set[str]:
    try:
        data = json.loads((root / MANIFEST_NAME).read_bytes())
        named = [entry.get("file") for entry in data["graphs"].values()]
        if isinstance(data.get("stage_constants"), dict):
            named.append(data["stage_constants"].get("file"))
        return {file for file in named if isinstance(file, str) and _FILE_NAME.match(file)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


# ------------------------------------------------------------------------------- loading
def load_calibration(path: str | os.PathLike[str], verify: bool = True) -> CalibrationSet:
    """Read and validate a calibration directory; raises :class:`CalibrationError`.

    With ``verify`` (the default) every file's sha256 and array headers are checked now;
    the arrays themselves are read on first use.
    """
    root = Path(path)
    if not root.is_dir():
        raise CalibrationError(
            f"calibration directory '{root}' does not exist or is not a directory; "
            "capture one first (calibration.capture.capture)"
        )
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        raise CalibrationError(f"'{manifest}' is missing: '{root}' holds no complete calibration capture")
    data = CALIBRATION_FORMAT.read_json(manifest)
    return CALIBRATION_FORMAT.parse(str(manifest), lambda: _parse(root, manifest, data, verify))


def _parse(root: Path, manifest: Path, data: dict[str, Any], verify: bool) -> CalibrationSet:
    where = str(manifest)
    CALIBRATION_FORMAT.check_name(data, where)
    CALIBRATION_FORMAT.check_version(data, where, older="it stores an ECAR config, not the model its build describes")
    plan = CalibrationPlan.from_dict(data.get("plan"))
    checkpoint = data.get("checkpoint_sha256")
    if not isinstance(checkpoint, str):
        raise CalibrationError(f"{where}: missing field 'checkpoint_sha256'")
    raw_graphs = data.get("graphs")
    if not isinstance(raw_graphs, dict):
        raise CalibrationError(f"{where}: missing field 'graphs'")
    model = _captured_model(root, where, data, raw_graphs, verify)
    if plan.num_classes != model.card.num_classes:
        raise CalibrationError(
            f"{where}: the plan covers {plan.num_classes} classes, the model has {model.card.num_classes}; "
            "capture again"
        )
    entries = {name: _graph_entry(model, where, spec, raw_graphs[name]) for name, spec in model.specs.items()}
    result = CalibrationSet(root, model, plan, checkpoint, entries, data)
    if verify:
        for name, entry in entries.items():
            _verify_file(root / entry.file, entry, result.raw_arrays(name))
    return result


def _captured_model(
    root: Path, where: str, data: dict[str, Any], raw_graphs: dict[str, Any], verify: bool
) -> CapturedModel:
    """The model a set describes: its card, request plan, graph contract, stage constants and flow row unit."""
    card = ModelCard.from_manifest(data.get("family"), data.get("model"), where)
    request_plan = RequestPlan.from_dict(data.get("request_plan"))
    unit = data.get("flow_rows")
    if unit not in ROW_UNITS:
        raise CalibrationError(f"{where}: field 'flow_rows' must be one of {sorted(ROW_UNITS)}, got {unit!r}")
    specs = {name: GraphSpec.from_dict(name, entry) for name, entry in raw_graphs.items()}
    kinds = sorted(spec.kind for spec in specs.values())
    if kinds != sorted((Kind.BACKBONE, Kind.FLOW_STEP, Kind.DECODER)):
        raise CalibrationError(f"{where}: graphs must be one backbone, one flow_step and one decoder, got {kinds}")
    stages = data.get("stage_constants")
    file = stages.get("file") if isinstance(stages, dict) else None
    digest = stages.get("sha256") if isinstance(stages, dict) else None
    if not isinstance(file, str) or not _FILE_NAME.match(file) or not isinstance(digest, str):
        raise CalibrationError(f"{where}: field 'stage_constants' must name the stages file and its sha256")
    if verify:
        CALIBRATION_FORMAT.verify_file(root / file, digest, "stage constants")
    try:
        constants = constants_io.StageConstants.read(root / file)
    except ECARError as exc:
        raise CalibrationError(f"{where}: {exc}") from None
    return CapturedModel(card, request_plan, specs, constants, ROW_UNITS[unit])


def _graph_entry(model: CapturedModel, where: str, spec: GraphSpec, raw: Any) -> GraphData:
    here = f"{where} graph '{spec.name}'"
    file = raw.get("file")
    if not isinstance(file, str) or not _FILE_NAME.match(file):
        raise CalibrationError(f"{here}: bad file name {file!r}")
    digest = raw.get("sha256")
    if not isinstance(digest, str):
        raise CalibrationError(f"{here}: missing field 'sha256'")
    rows = raw.get("rows")
    names = model.groups(spec)

    def counts_ok(value: Any) -> bool:
        return (
            isinstance(value, dict)
            and set(value) == set(SPLITS)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value.values())
        )

    if not isinstance(rows, dict) or set(rows) != set(names) or not all(counts_ok(v) for v in rows.values()):
        raise CalibrationError(f"{here}: 'rows' must give a positive row count per group {names} and split")
    return GraphData(spec, file, digest, {group: dict(rows[group]) for group in names})


def _verify_file(path: Path, entry: GraphData, expected: dict[str, tuple[tuple[int, ...], str]]) -> None:
    CALIBRATION_FORMAT.verify_file(path, entry.sha256, f"calibration file of graph '{entry.name}'")
    headers = _npz_headers(path)
    if headers != expected:
        raise CalibrationError(
            f"calibration file '{path}' of graph '{entry.name}' does not hold the arrays its manifest describes; "
            "capture again"
        )


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """(shape, dtype) of every array of an .npz, read from the headers only."""
    headers: dict[str, tuple[tuple[int, ...], str]] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    raise CalibrationError(f"'{path}': unexpected member '{info.filename}'")
                with archive.open(info) as handle:
                    version = np.lib.format.read_magic(handle)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
                headers[info.filename[: -len(".npy")]] = (tuple(int(d) for d in shape), dtype.name)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CalibrationError(f"calibration file '{path}' is corrupt ({exc}); capture again") from None
    return headers


def _read_arrays(
    path: Path, entry: GraphData, expected: dict[str, tuple[tuple[int, ...], str]]
) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CalibrationError(f"calibration file '{path}' is corrupt or missing ({exc}); capture again") from None
    found = {key: (tuple(value.shape), value.dtype.name) for key, value in arrays.items()}
    if found != expected:
        raise CalibrationError(
            f"calibration file '{path}' of graph '{entry.name}' does not hold the arrays its manifest describes; "
            "capture again"
        )
    return arrays
