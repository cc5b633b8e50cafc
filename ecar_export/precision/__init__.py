"""Precisions: what each one is, and the recipe that rewrites fp32 ONNX graphs into it.

TensorRT 11 builds strongly typed networks only, so precision is decided here, in the
graphs; ONNX Runtime and OpenVINO run the very same graphs on the CPU, which is how they are
tested. This module is the one registry of precisions (:data:`PRECISIONS`); the runtime keeps
only their names (:data:`runtime.manifest.PRECISIONS`), which it validates in manifests.

==========  ==================================================================
``fp32``    :mod:`ecar_export.precision.fp32` — the exported graphs as they are
``fp16``    :mod:`ecar_export.precision.fp16` — float16 compute, fp32 I/O and fp32 islands
``int8``    :mod:`ecar_export.precision.int8` — explicit Q/DQ, calibrated on real stage inputs
==========  ==================================================================

Every recipe module has ``apply(source, target, graph, inputs) -> record``: write the
precision's version of the fp32 graph ``source`` (and its external weights) to ``target``,
and return what the manifest records about it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime import manifest as manifest_io
from runtime.errors import InvalidRequestError

if TYPE_CHECKING:
    from calibration import CalibrationSet

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class RecipeInputs:
    """What a recipe needs besides the graph: the calibration set and method, and the recipe of the graphs an
    INT8 build keeps float (:func:`ecar_export.precision.int8.float_recipe_for`: "fp32", or "fp16" for
    TensorRT); all three INT8 only."""

    calibration: CalibrationSet | None = None
    calibration_method: str = "minmax"
    float_recipe: str = "fp32"


@dataclass(frozen=True)
class Precision:
    """One precision: its recipe, the recipe's version and what a build of it must reach.

    ``recipe_version``: bump it when the recipe changes the graphs it writes; builds of this
    precision are redone, the others stay reusable. ``check_atol`` / ``check_min_cosine``: per
    graph against the torch model (``ecar-export check``), |diff| <= atol * max(1, max|ref|)
    (None: judged by cosine alone) and the cosine similarity. ``request_tolerance``: a whole
    request against the fp32 torch reference on a GPU (``scripts/gpu_smoke.py``): latents max
    |diff| and mean |diff| of the uint8 pixels. ``calibrated``: the recipe needs a calibration set.
    """

    name: str
    recipe_version: int
    check_atol: float | None
    check_min_cosine: float
    request_tolerance: tuple[float, float]
    calibrated: bool
    summary: str

    def apply(self, source: Path, target: Path, graph: str, inputs: RecipeInputs) -> dict[str, object]:
        """Run the recipe (:mod:`ecar_export.precision.<name>`'s ``apply``) on one fp32 graph."""
        module: Any = importlib.import_module(f"ecar_export.precision.{self.name}")
        record: dict[str, object] = module.apply(source, target, graph, inputs)
        return record


PRECISIONS: Mapping[str, Precision] = {
    "fp32": Precision("fp32", 1, 1e-3, 0.99999, (2e-3, 0.25), False, "the exported float32 graphs"),
    # Reduced precision is judged by cosine alone (its max |diff| is reported). OpenVINO runs fp16
    # builds at bf16 where the CPU has it (8 mantissa bits instead of fp16's 11); the demo's graphs
    # still reach cosine 0.99997 there, so the fp16 bound holds for both.
    # 2: normalisation statistics written as plain ops and the decoder's final activation stay float32.
    # (The schedule scalars' closure seeing through shape arithmetic changed no ECAR graph, and FlowAR had no
    # fp16 builds before it: no version bump.)
    "fp16": Precision("fp16", 2, None, 0.999, (5e-2, 2.0), False, "float16 compute, fp32 I/O and fp32 islands"),
    # 2: Gemm biases split off, one Q/DQ pair per quantized node (ORT's CPU provider fuses and
    # runs them as uint8 kernels).
    "int8": Precision("int8", 2, None, 0.99, (0.25, 6.0), True, "explicit Q/DQ INT8, calibrated on real inputs"),
}
assert tuple(PRECISIONS) == manifest_io.PRECISIONS, "the runtime validates exactly these names"
HELP = "fp32 | fp16 | int8 (precision is set in the ONNX graphs; see README 'Precision')."


def get(name: str) -> Precision:
    """The precision called ``name``; :class:`InvalidRequestError` naming the choices otherwise."""
    if name not in PRECISIONS:
        raise InvalidRequestError(f"unknown precision '{name}': use {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def check_calibration_method(method: str) -> None:
    if method not in CALIBRATION_METHODS:
        raise InvalidRequestError(f"unknown calibration method '{method}': use {', '.join(CALIBRATION_METHODS)}")
