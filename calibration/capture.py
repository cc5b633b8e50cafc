"""Capture real stage inputs: run the fp32 pipeline over a plan and record every graph's feeds.

:class:`RecordingBackend` wraps any backend and keeps a copy of the feeds of every call,
with the call's place in the request (its :class:`runtime.graphs.Call`: stage, step).
:func:`capture` swaps it into a :class:`runtime.pipeline.Pipeline` and runs the
:class:`CalibrationPlan`. Because ``flow_step`` runs once per Euler step of every stage, and
the backbone once per stage, the recorded inputs cover the whole schedule.

What is stored (see :mod:`calibration.dataset` for the file layout):

* batch graphs (the backbone per stage, the decoder) keep whole samples, one row per sample
  (with its ``past_kv`` rows and both guidance rows); at most ``plan.max_samples`` per group
  and split, drawn evenly across the split's requests and balanced across classes;
* ``flow_step`` of a per-token head (ECAR's; ``token_rows``) keeps token rows (``x``, the
  token's conditional and unconditional ``z``, ``t``, ``dt``, ``cfg``, and its stage and
  step): per (stage, step) at most ``plan.max_rows`` rows per split, again spread evenly
  across requests. Tokens are independent along M, so a reader concatenates rows of the
  same (stage, step) from different requests into batches of a fixed row count;
* ``flow_step`` of a head that attends across a stage's tokens (FlowAR's) keeps whole
  samples of one call, one group per stage: per (stage, step) at most ``plan.max_samples``
  per split;
* both caps shrink until no group's split exceeds ``plan.max_mib`` MiB (a per-stage flow
  graph: its share, ``max_mib`` over the stages).

Subsets are drawn with ``numpy.random.default_rng([plan.seed, request, crc32(graph/group)])``,
so a capture is deterministic (and its files, named by content, are the same every time).
"""

from __future__ import annotations

import datetime as _dt
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration import layout
from calibration.dataset import CalibrationSet, load_calibration, meta_fields, stored_specs, write_calibration
from calibration.errors import CalibrationError
from calibration.model import CapturedModel
from calibration.plan import SPLITS, CalibrationPlan
from runtime.backends import Backend
from runtime.errors import InvalidRequestError
from runtime.graphs import Call, GraphSpec, Kind, constant_inputs
from runtime.pipeline import Pipeline

__all__ = ["CalibrationPlan", "CalibrationSet", "RecordedCall", "RecordingBackend", "capture", "load_calibration"]

Progress = Callable[[int, int], None]  # requests done, requests in all


@dataclass(frozen=True)
class RecordedCall:
    """One backend call: the graph, a private copy of its feeds, and where it ran in a request.

    ``stage`` (1-based) and ``step`` (0-based, flow_step only) are the call's place in the
    request plan (:class:`runtime.graphs.Call`).
    """

    graph: str
    feeds: dict[str, np.ndarray]
    stage: int
    step: int | None
    thread: int
    sequence: int


class RecordingBackend:
    """A backend that records a copy of every call's feeds and passes the outputs through.

    Thread-safe: calls from several threads are recorded with their thread id.
    """

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.activation_budget: int | None = None  # whole calls are recorded, as the request makes them
        self._lock = threading.Lock()
        self._calls: list[RecordedCall] = []
        self._sequence = 0

    def run(self, call: Call, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        copied = {name: np.array(value, copy=True) for name, value in feeds.items()}
        outputs = self.inner.run(call, feeds)
        with self._lock:
            recorded = RecordedCall(call.graph, copied, call.stage, call.step, threading.get_ident(), self._sequence)
            self._calls.append(recorded)
            self._sequence += 1
        return outputs

    def describe(self) -> dict[str, object]:
        return {**self.inner.describe(), "recording": True}

    def calls(self) -> list[RecordedCall]:
        """The calls recorded so far (a copy of the list)."""
        with self._lock:
            return list(self._calls)

    def take(self) -> list[RecordedCall]:
        """The calls recorded so far; forgets them."""
        with self._lock:
            calls, self._calls = self._calls, []
            return calls


@dataclass
class _Collector:
    """Rows of one graph and split, gathered request by request."""

    parts: list[dict[str, np.ndarray]] = field(default_factory=list)
    class_counts: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, rows: dict[str, np.ndarray]) -> None:
        self.parts.append(rows)

    def result(self, what: str) -> dict[str, np.ndarray]:
        if not self.parts:
            raise CalibrationError(f"the capture recorded no calls of graph {what}")
        return layout.concatenate(self.parts)


def capture(
    pipeline: Pipeline,
    plan: CalibrationPlan,
    out_dir: str | Path,
    progress: Progress | None = None,
    *,
    token_rows: bool = True,
) -> CalibrationSet:
    """Run the fp32 ``pipeline`` over ``plan``, store every graph's inputs in ``out_dir``, load them back.

    ``token_rows``: the model's flow head treats every token alone, so its inputs are kept as token
    rows (the model family says; :class:`calibration.model.CapturedModel`).
    """
    manifest = pipeline.manifest
    if manifest.precision != "fp32":
        raise InvalidRequestError(
            f"calibration needs the fp32 pipeline; '{manifest.root}' is a {manifest.precision} build"
        )
    if manifest.fuse_flow_loop:
        raise InvalidRequestError(
            f"calibration needs a build without --fuse-flow-loop ('{manifest.root}' is fused): flow_step must "
            "run once per Euler step; a fused build's flow_loop is calibrated from flow_step's rows"
        )
    model = CapturedModel.of_build(manifest, token_rows)
    if plan.num_classes != model.card.num_classes:
        raise InvalidRequestError(
            f"calibration plan covers {plan.num_classes} classes, the model has {model.card.num_classes}"
        )
    specs = stored_specs(model)
    step_spec = model.spec(Kind.FLOW_STEP)
    if token_rows and constant_inputs(step_spec):
        raise InvalidRequestError(
            f"'{manifest.root}': flow_step takes stage constants "
            f"({', '.join(t.name for t in constant_inputs(step_spec))}), so its tokens cannot be stored as rows "
            "that mix stages; capture with token_rows=False"
        )
    begin = time.perf_counter()
    recorder = RecordingBackend(pipeline.backend)
    recording = Pipeline(manifest, recorder)
    per_split = {split: len(plan.indices(split)) for split in SPLITS}
    keep = {
        (name, group, split): _quota(model, spec, group, plan, per_split[split])
        for name, spec in specs.items()
        for group in model.groups(spec)
        for split in SPLITS
    }
    collected = {key: _Collector() for key in keep}
    for index, (request_labels, seed) in enumerate(plan.requests()):
        recorder.take()
        recording.generate_many(request_labels, seed=seed, cfg=plan.cfg)
        calls = recorder.take()
        split = plan.split(index)
        for name, spec in specs.items():
            for group, rows in _request_rows(spec, [c for c in calls if c.graph == name], model, index).items():
                rng = np.random.default_rng([plan.seed, index, zlib.crc32(f"{name}/{group}".encode())])
                row_labels = np.asarray(request_labels)[rows["meta.sample"]]
                collector = collected[name, group, split]
                collector.add(_subsample(spec, rows, keep[name, group, split], rng, row_labels, collector.class_counts))
        if progress:
            progress(index + 1, plan.num_requests)
    data = {
        name: {
            group: {split: collected[name, group, split].result(f"{name} {group}") for split in SPLITS}
            for group in model.groups(spec)
        }
        for name, spec in specs.items()
    }
    extra = {
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "capture": {
            "seconds": round(time.perf_counter() - begin, 3),
            "backend": pipeline.backend.describe(),
            "engine_precision": manifest.precision,
            "flow_step_rows": "token rows; per (stage, step) at most plan.max_rows per split"
            if token_rows
            else "whole samples; per (stage, step) at most plan.max_samples per split",
        },
    }
    write_calibration(out_dir, model, manifest.checkpoint_sha256, plan, data, extra)
    return load_calibration(out_dir)


def _quota(model: CapturedModel, spec: GraphSpec, group: str, plan: CalibrationPlan, requests: int) -> int:
    """Rows kept per request (per stage and step for flow_step) of one group in a split of ``requests`` requests.

    The split's total stays within its cap, except that every request keeps at least one row.
    """
    row = layout.row_bytes(spec, model.group_dims(group), model.token_rows) + 4 * len(meta_fields(model, spec))
    if spec.kind != Kind.FLOW_STEP:
        cap = min(plan.max_samples, plan.max_bytes // row)
    elif model.token_rows:  # every stage's steps share the group
        cap = min(plan.max_rows, plan.max_bytes // (sum(s.steps for s in model.plan.stages) * row))
    else:  # a stage's group: its share of the budget over its steps
        steps = model.plan.stage(model.group_stage(group)).steps
        cap = min(plan.max_samples, plan.max_bytes // (model.plan.num_stages * steps * row))
    return max(1, cap // requests)


def _request_rows(
    spec: GraphSpec, calls: list[RecordedCall], model: CapturedModel, request: int
) -> dict[str, dict[str, np.ndarray]]:
    """All rows one request fed a graph (across the batches generate_many split it into), per group."""
    if not calls:
        raise CalibrationError(f"request {request} made no call of graph '{spec.name}'")
    parts: dict[str, list[dict[str, np.ndarray]]] = defaultdict(list)
    offsets: dict[tuple[int | None, int | None], int] = defaultdict(int)
    for call in calls:
        if call.stage is None:
            raise CalibrationError(f"a call of graph '{spec.name}' has no place in the request plan")
        rows = layout.to_rows(spec, call.feeds, model.token_rows)
        count = layout.row_count(rows)
        key = (call.stage, call.step)
        position = np.arange(offsets[key], offsets[key] + count, dtype=np.int32)  # row within the request
        offsets[key] += count
        rows["meta.request"] = np.full(count, request, np.int32)
        rows["meta.sample"] = position
        rows["meta.stage"] = np.full(count, call.stage, np.int32)
        if spec.kind == Kind.FLOW_STEP:
            if model.token_rows:
                tokens = model.plan.tokens[call.stage - 1]
                rows["meta.sample"], rows["meta.token"] = position // tokens, position % tokens
            rows["meta.step"] = np.full(count, call.step, np.int32)
        parts[model.group_of(spec, call.stage)].append(rows)
    return {group: layout.concatenate(found) for group, found in parts.items()}


def _subsample(
    spec: GraphSpec,
    rows: dict[str, np.ndarray],
    quota: int,
    rng: np.random.Generator,
    labels: np.ndarray | None,
    class_counts: dict[int, int],
) -> dict[str, np.ndarray]:
    """At most ``quota`` rows (per stage and step for flow_step), in their original order.

    Token rows are drawn at random. Samples of batch graphs are drawn class-balanced:
    one at a time, a sample of the class kept least so far in this graph, group and split
    (ties broken at random), so a capped split still covers every class it can.
    """
    if spec.kind == Kind.FLOW_STEP:
        keys = rows["meta.stage"].astype(np.int64) * 1_000_000 + rows["meta.step"]
        picked = []
        for key in np.unique(keys):
            group = np.flatnonzero(keys == key)
            picked.append(np.sort(rng.choice(group, size=min(quota, len(group)), replace=False)))
        index = np.concatenate(picked)
    else:
        assert labels is not None
        order = list(rng.permutation(layout.row_count(rows)))
        chosen = []
        for _ in range(min(quota, len(order))):
            best = min(order, key=lambda i: class_counts[int(labels[i])])
            order.remove(best)
            chosen.append(best)
            class_counts[int(labels[best])] += 1
        index = np.sort(np.asarray(chosen, dtype=np.int64))
    return layout.select(rows, index)
