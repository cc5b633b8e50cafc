"""An INT8 build's calibration set, from capture to the engine directory.

The capture is the long part of an INT8 build (nearly two hours for ecar-b with its KL-16 decoder on two cores), so a
build keeps its set in ``<engine dir>/calibration`` and the next build reuses it where a new
capture would record the same inputs (:func:`previous`). A capture depends on the fp32
pipeline (weights, config, opset, export version, the export tools' versions) and on the plan
(the number of requests), not on the quantization recipe: a rebuild after a recipe change
re-quantizes from the kept set. :func:`capture_from` runs the staged fp32 graphs of a build
over a :class:`~calibration.plan.CalibrationPlan`; :func:`install` moves a new set into the
engine directory, never leaving it without one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibration.dataset import CalibrationSet, load_calibration
from calibration.plan import CalibrationPlan
from runtime import manifest as manifest_io
from runtime.backends import selection
from runtime.errors import ECARError
from runtime.pipeline import Pipeline

KEPT = "calibration"  # the set's directory inside an engine directory
RETIRED = ".calibration-old"  # a kept set being replaced


@dataclass(frozen=True)
class CaptureKey:
    """Everything the captured inputs depend on: equal keys, equal captures.

    ``model``: the card a build of the model writes (:func:`calibration.model.card_of`);
    ``token_rows``: how its flow head's inputs are stored (:class:`calibration.model.CapturedModel`);
    ``every_class``: whether the requests must hold every class (:class:`~calibration.plan.CalibrationPlan`).
    """

    model: manifest_io.ModelCard
    checkpoint_sha256: str
    requests: int
    opset: int
    export_version: int
    toolchain: Mapping[str, Any]
    token_rows: bool = True
    every_class: bool = True

    def plan(self) -> CalibrationPlan:
        return CalibrationPlan(
            num_classes=self.model.num_classes, num_requests=self.requests, every_class=self.every_class
        )


def previous(engine_dir: Path, key: CaptureKey) -> CalibrationSet | None:
    """The previous INT8 build's kept set in ``engine_dir``, where capturing again would record the same inputs.

    Anything that does not match ``key``, or a set that fails its checksums, means None (a
    new capture).
    """
    try:
        old = manifest_io.load(engine_dir)
    except ECARError:
        return None
    if (
        old.precision != "int8"
        or old.calibration is None
        or old.calibration.requests != key.requests
        or old.opset != key.opset
        or old.export_version != key.export_version
        # the export tools only: a build's manifest adds its target's versions (OpenVINO, TensorRT), and the capture
        # runs the fp32 graphs on ONNX Runtime whatever the target
        or {tool: old.toolchain.get(tool) for tool in key.toolchain} != dict(key.toolchain)
    ):
        return None
    try:
        kept = load_calibration(engine_dir / old.calibration.dir)
        kept.check_compatible(key.model, key.checkpoint_sha256)
    except ECARError:
        return None
    return kept if kept.plan == key.plan() and kept.model.token_rows == key.token_rows else None


def capture_from(
    fp32_build: str | os.PathLike[str], key: CaptureKey, out_dir: Path, progress: Callable[[int, int], None] | None
) -> CalibrationSet:
    """Capture the real inputs of every graph by running the fp32 build in ``fp32_build`` over ``key``'s plan.

    On every core: MLAS splits a GEMM by output tiles, so the captured inputs do not depend on
    the thread count (checked on the demo).
    """
    import calibration  # the package's capture, looked up at call time (tests replace it)

    manifest = manifest_io.load(fp32_build)
    pipe = Pipeline(manifest, selection.open_backend(manifest, "onnxruntime", "cpu"))
    return calibration.capture(pipe, key.plan(), out_dir, progress=progress, token_rows=key.token_rows)


def install(new_set: Path, engine_dir: Path) -> None:
    """Move a captured set into ``engine_dir`` as its kept set (``check`` validates on its held-out split)."""
    target, retired = engine_dir / KEPT, engine_dir / RETIRED
    if not new_set.is_dir():  # never retire the kept set without a new one to put in its place
        raise RuntimeError(f"internal error: no calibration set was captured into '{new_set}'")
    shutil.rmtree(retired, ignore_errors=True)
    if target.exists():
        os.replace(target, retired)
    os.replace(new_set, target)
    shutil.rmtree(retired, ignore_errors=True)
