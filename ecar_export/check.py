"""``ecar-export check``: every graph of a build against the torch model, at every stage it runs.

Each graph file is run by ONNX Runtime (or, with ``backend="openvino"``, by OpenVINO at the
inference precision it runs the build at) and the torch reference is run on the same inputs,
both through polygraphy's Comparator, once per stage the request plan calls it at (the
shared backbone and flow graph at every stage's shapes: stage 1 with an empty cache, the
last stage emitting none); the table reports the largest absolute difference and the cosine
similarity per output, and whether the graph's files still match the sha256s the manifest
recorded.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ecar_export import export, precision, random_inputs
from runtime import manifest as manifest_io
from runtime.fileio import sha256_file
from runtime.graphs import GraphSpec

CHECK_BACKENDS = ("onnxruntime", "openvino")


@dataclass
class GraphCheck:
    graph: str
    stage: int
    file: str
    sha_ok: bool
    max_abs: float
    cosine: float
    ok: bool
    error: str | None = None
    inputs: str = "random"


def _polygraphy_quiet() -> None:
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR


def _input_metadata(spec: GraphSpec) -> Any:
    """polygraphy's description of a graph's inputs, from the contract (symbolic dims as -1)."""
    from polygraphy.common import TensorMetadata

    meta = TensorMetadata()
    for tensor in spec.inputs:
        meta.add(tensor.name, np.dtype(tensor.dtype), [d if isinstance(d, int) else -1 for d in tensor.shape])
    return meta


def _torch_runner(model: nn.Module, spec: GraphSpec) -> Any:
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class TorchGraphRunner(BaseRunner):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(name=f"torch-{spec.name}", prefix="torch")

        def activate_impl(self) -> None:
            pass

        def get_input_metadata_impl(self) -> TensorMetadata:
            return _input_metadata(spec)

        def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
            start = time.perf_counter()
            outputs = OrderedDict(export.run_torch(model, spec, feed_dict))
            self.inference_time = time.perf_counter() - start
            return outputs

        def deactivate_impl(self) -> None:
            pass

    return TorchGraphRunner()


def _held_out_inputs(
    manifest: manifest_io.Manifest, calibration_dir: str | Path | None = None
) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """One batch of held-out calibration inputs per (graph, stage), where the build kept its calibration set.

    INT8 graphs are judged on real stage inputs the quantizer never saw; random inputs can
    fall outside the calibrated ranges and say little about a quantized graph.
    """
    from calibration import load_calibration
    from runtime.errors import ECARError

    if calibration_dir is not None:  # asked for explicitly: errors are the user's to see
        calibration = load_calibration(calibration_dir)
        calibration.check_compatible(manifest.model, manifest.checkpoint_sha256)
    elif manifest.calibration is not None:
        try:
            calibration = load_calibration(manifest.root / manifest.calibration.dir)
        except ECARError:
            return {}
    else:
        return {}
    inputs: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for call in manifest.plan.calls(manifest.fuse_flow_loop):
        if call.graph in calibration.graph_names() and (call.graph, call.stage) not in inputs:
            feeds = next(iter(calibration.stage_feeds(call.graph, call.stage)), None)
            if feeds is not None:
                inputs[call.graph, call.stage] = feeds
    return inputs


def _openvino_runner(path: Path, precision: str, spec: GraphSpec, bf16_safe: bool = True) -> Any:
    """A polygraphy runner that runs one graph file compiled by OpenVINO, as the runtime compiles it (at the
    precision the runtime picks: a graph the build marks ``bf16_safe: false`` never at bfloat16)."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    from runtime.backends.openvino_backend import compile_graph

    class OpenVINOGraphRunner(BaseRunner):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(name=f"openvino-{spec.name}", prefix="openvino")
            self.compiled: Any = None

        def activate_impl(self) -> None:
            self.compiled = compile_graph(path, precision, spec.name, bf16_safe=bf16_safe)

        def get_input_metadata_impl(self) -> TensorMetadata:
            return _input_metadata(spec)

        def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
            start = time.perf_counter()
            result = self.compiled({k: np.ascontiguousarray(v) for k, v in feed_dict.items()})
            outputs: OrderedDict[str, np.ndarray] = OrderedDict()
            for index, port in enumerate(self.compiled.outputs):
                for tensor_name in port.get_names():
                    outputs[tensor_name] = np.asarray(result[index])
            self.inference_time = time.perf_counter() - start
            return outputs

        def deactivate_impl(self) -> None:
            self.compiled = None

    return OpenVINOGraphRunner()


def compare(reference: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    ref, act = reference.astype(np.float64).ravel(), actual.astype(np.float64).ravel()
    max_abs = float(np.max(np.abs(ref - act))) if ref.size else 0.0
    denom = np.linalg.norm(ref) * np.linalg.norm(act)
    cosine = float(np.dot(ref, act) / denom) if denom > 0 else float(np.array_equal(ref, act))
    return max_abs, cosine


def check_build(
    engine_dir: str | Path,
    model: nn.Module,
    batch: int = 2,
    seed: int | None = None,
    calibration_dir: str | Path | None = None,
    backend: str = "onnxruntime",
) -> tuple[list[GraphCheck], int]:
    """Compare every graph at every stage on ``backend``; returns the results and the input seed used."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator

    _polygraphy_quiet()
    manifest = manifest_io.load(engine_dir, verify_files=False)
    seed = secrets.randbits(32) if seed is None else seed
    rng = np.random.default_rng(seed)
    held_out = _held_out_inputs(manifest, calibration_dir)
    batch = max(manifest.min_batch, min(batch, manifest.max_batch))
    if backend not in CHECK_BACKENDS:
        from runtime.errors import InvalidRequestError

        raise InvalidRequestError(f"unknown backend '{backend}' for check: use {', '.join(CHECK_BACKENDS)}")
    judged = precision.get(manifest.precision)
    atol, min_cosine = judged.check_atol, judged.check_min_cosine
    results: list[GraphCheck] = []
    for call in manifest.plan.calls(manifest.fuse_flow_loop):
        name, stage = call.graph, call.stage
        if any(r.graph == name and r.stage == stage for r in results):
            continue
        entry = manifest.graphs[name]
        path = manifest.path(entry.file)
        sha_ok = all(
            manifest.path(f).is_file() and sha256_file(manifest.path(f)) == digest
            for f, digest in ((entry.file, entry.sha256), *entry.data_files.items())
        )
        held = (name, stage) in held_out
        feeds = (
            held_out[name, stage]
            if held
            else random_inputs.call_inputs(
                entry.spec, manifest.plan, manifest.constants, manifest.model.num_classes, stage, batch, rng
            )
        )
        try:
            engine = (
                _openvino_runner(path, entry.precision, entry.spec, entry.bf16_safe)
                if backend == "openvino"
                else OnnxrtRunner(SessionFromOnnx(str(path), providers=["cpu"]))
            )
            runners = [engine, _torch_runner(model, entry.spec)]
            run = Comparator.run(runners, data_loader=[feeds])
            (_, onnx_iters), (_, torch_iters) = run[0], run[1]
            worst_abs, worst_cos, ok = 0.0, 1.0, True
            for output in entry.spec.output_names():
                ref, act = torch_iters[0][output], onnx_iters[0][output]
                if ref.shape != act.shape:
                    raise ValueError(f"output '{output}' has shape {act.shape}, torch gives {ref.shape}")
                if ref.size == 0:  # the last stage emits no keys/values
                    continue
                max_abs, cosine = compare(ref, act)
                scale = max(1.0, float(np.max(np.abs(ref))))
                ok &= (atol is None or max_abs <= atol * scale) and cosine >= min_cosine
                worst_abs, worst_cos = max(worst_abs, max_abs), min(worst_cos, cosine)
            inputs = "held-out" if held else "random"
            results.append(
                GraphCheck(name, stage, entry.file, sha_ok, worst_abs, worst_cos, ok and sha_ok, inputs=inputs)
            )
        except Exception as exc:  # a swapped or broken file fails to run: that is a failed check
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            results.append(
                GraphCheck(name, stage, entry.file, sha_ok, float("nan"), float("nan"), False, message[:200])
            )
    return results, seed
