"""``Pipeline``: chain the stage graphs and drive the flow head's Euler loop (DESIGN §5).

The pipeline holds no per-request state, so one instance serves any number of
threads; backends create their sessions once, at load time.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from runtime import graphs, schedule
from runtime import manifest as manifest_io
from runtime.backends import Backend, selection
from runtime.errors import BackendUnavailableError, ECARWarning, InvalidRequestError
from runtime.images import to_uint8
from runtime.manifest import Manifest

StageCallback = Callable[[int, int], None]  # (stages done, stages in all)
BACKEND_CHOICES = selection.CHOICES


@dataclass
class Timings:
    """Seconds spent per stage, per graph, in backend calls, and for the whole request."""

    stages: list[float] = field(default_factory=list)
    graphs: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    decoder: float = 0.0
    total: float = 0.0

    @property
    def backend(self) -> float:
        return float(sum(self.graphs.values()))

    @property
    def overhead(self) -> float:
        """Wall time outside backend calls (noise, reshapes, bookkeeping)."""
        return max(0.0, self.total - self.backend)

    def to_dict(self) -> dict[str, object]:
        return {
            "total_s": self.total,
            "backend_s": self.backend,
            "overhead_s": self.overhead,
            "stages_s": list(self.stages),
            "decoder_s": self.decoder,
            "graphs_s": dict(self.graphs),
            "graph_calls": dict(self.calls),
        }


@dataclass
class GenerateResult:
    images: np.ndarray  # uint8 [B, H, W, ch]
    latents: np.ndarray  # float32 [B, N_S, C], the decoder's input
    timings: Timings


class Pipeline:
    def __init__(self, manifest: Manifest, backend: Backend, device_resident: bool = True) -> None:
        """``device_resident``: where the backend can run a whole request on its device (TensorRT's
        ``generate_on_device``), do so; False walks the graphs through ``backend.run`` instead."""
        self.manifest = manifest
        self.config = manifest.config
        self.backend = backend
        self.device_resident = device_resident

    @classmethod
    def from_dir(
        cls,
        path: str | os.PathLike[str],
        backend: str = "auto",
        device: str = "auto",
        threads: int | None = None,
    ) -> Pipeline:
        """Load an engine directory. ``backend``: "auto", "onnxruntime", "openvino" or "tensorrt".

        "auto" takes TensorRT plans where the build has them and TensorRT can run here, else
        ONNX Runtime on CUDA where onnxruntime-gpu is installed (and ``device`` is not "cpu"),
        else the fastest installed CPU backend for the build's precision
        (:mod:`runtime.backends.selection`: OpenVINO where installed, else ONNX Runtime).
        ``device`` (ONNX Runtime): "auto", "cpu" or "cuda". ``threads`` caps the CPU threads of
        each graph (ONNX Runtime's intra-op threads, OpenVINO's inference threads; default: one
        per core), for processes that share a machine, such as several serving replicas.
        """
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise InvalidRequestError(f"threads must be a positive integer or None, got {threads!r}")
        selection.check_choice(backend)
        manifest = manifest_io.load(path)
        if backend == "tensorrt" and manifest.backend != "tensorrt":
            raise BackendUnavailableError(
                f"'{path}' holds no TensorRT plans (built for {manifest.backend}); "
                "rebuild with `ecar-export build --backend tensorrt` on a machine with TensorRT"
            )
        if manifest.backend == "tensorrt" and backend in ("tensorrt", "auto"):
            from runtime.backends import tensorrt

            problem = tensorrt.probe(manifest)
            if problem is None:
                return cls(manifest, tensorrt.TensorRTBackend(manifest))
            if backend == "tensorrt":
                raise BackendUnavailableError(problem)
            fallback = "onnxruntime" if _cuda_wanted(device) else selection.cpu_backend(manifest.precision)
            where = "ONNX Runtime on CUDA" if _cuda_wanted(device) else selection.NAMES[fallback]
            warnings.warn(
                f"the TensorRT plans in '{path}' cannot run here, using {where} instead: {problem.splitlines()[0]}",
                ECARWarning,
                stacklevel=2,
            )
            backend = fallback
        chosen = backend == "auto"
        if backend == "auto":
            if _cuda_wanted(device):
                backend = "onnxruntime"
            else:
                backend = selection.cpu_backend(manifest.precision)
                device = "cpu" if backend == "onnxruntime" else device
        if backend == "openvino":
            from runtime.backends.openvino_backend import OpenVINOBackend

            try:
                return cls(manifest, OpenVINOBackend(manifest, threads=threads))
            except BackendUnavailableError as exc:  # installed but broken: auto goes on with ONNX Runtime
                if not (chosen and selection.installed("onnxruntime")):
                    raise
                warnings.warn(f"using ONNX Runtime instead of OpenVINO: {exc}", ECARWarning, stacklevel=2)
                device = "cpu"
        from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

        return cls(manifest, OnnxRuntimeBackend(manifest, device=device, threads=threads))

    @property
    def max_batch(self) -> int:
        return self.manifest.max_batch

    # ------------------------------------------------------------------ API
    def generate(
        self,
        labels: Sequence[int] | np.ndarray,
        seed: int | Sequence[int] = 0,
        cfg: float | None = None,
        on_stage: StageCallback | None = None,
    ) -> GenerateResult:
        """Generate one batch (at most ``max_batch`` samples)."""
        label_array = self._check_labels(labels)
        if len(label_array) > self.max_batch:
            raise InvalidRequestError(
                f"batch of {len(label_array)} exceeds this build's profile (max batch {self.max_batch}); "
                "split the request or rebuild with a larger --max-batch"
            )
        keys = schedule.noise_keys(seed, len(label_array))
        return self._run(label_array, keys, cfg, on_stage)

    def generate_keyed(
        self,
        labels: Sequence[int] | np.ndarray,
        keys: Sequence[tuple[int, int]],
        cfg: float | None = None,
        on_stage: StageCallback | None = None,
    ) -> GenerateResult:
        """One batch with explicit noise keys: sample i draws its noise from ``keys[i]``.

        This is how independent requests share one engine batch: request r with seed S_r
        contributes keys (S_r, 0), (S_r, 1), ..., so each of its samples gets exactly the
        noise it gets when served alone (``generate(labels_r, seed=S_r)``).
        """
        label_array = self._check_labels(labels)
        if len(keys) != len(label_array):
            raise InvalidRequestError(f"got {len(keys)} noise keys for {len(label_array)} labels; give one per label")
        if len(label_array) > self.max_batch:
            raise InvalidRequestError(
                f"batch of {len(label_array)} exceeds this build's profile (max batch {self.max_batch})"
            )
        return self._run(label_array, schedule.check_keys(keys), cfg, on_stage)

    def generate_many(
        self,
        labels: Sequence[int] | np.ndarray,
        seed: int | Sequence[int] = 0,
        cfg: float | None = None,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> GenerateResult:
        """Any number of samples, run in batches of ``max_batch``; images equal one big ``generate``."""
        label_array = self._check_labels(labels)
        keys = schedule.noise_keys(seed, len(label_array))
        results = []
        for start in range(0, len(label_array), self.max_batch):
            stop = start + self.max_batch
            results.append(self._run(label_array[start:stop], keys[start:stop], cfg, None))
            if on_batch:
                on_batch(min(stop, len(label_array)), len(label_array))
        timings = Timings()
        for result in results:
            timings.total += result.timings.total
            timings.decoder += result.timings.decoder
            for name, seconds in result.timings.graphs.items():
                timings.graphs[name] += seconds
                timings.calls[name] += result.timings.calls[name]
            for index, seconds in enumerate(result.timings.stages):
                if index < len(timings.stages):
                    timings.stages[index] += seconds
                else:
                    timings.stages.append(seconds)
        return GenerateResult(
            np.concatenate([r.images for r in results]), np.concatenate([r.latents for r in results]), timings
        )

    # ------------------------------------------------------------- internals
    def _check_labels(self, labels: Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(labels, (str, bytes)):
            raise InvalidRequestError(f"labels must be a list of integers, got {labels!r}")
        values = list(labels.tolist() if isinstance(labels, np.ndarray) else labels)
        if not values:
            raise InvalidRequestError("labels must not be empty; give at least one class label")
        classes = self.config.num_classes
        for value in values:
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise InvalidRequestError(
                    f"label {value!r} is not an integer; labels are integers in [0, {classes - 1}]"
                )
            if not 0 <= int(value) < classes:
                raise InvalidRequestError(
                    f"label {int(value)} is out of range; this model knows classes 0..{classes - 1}"
                )
        return np.asarray(values, dtype=np.int64)

    def _call(self, timings: Timings, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        start = time.perf_counter()
        outputs = self.backend.run(graph, feeds)
        timings.graphs[graph] += time.perf_counter() - start
        timings.calls[graph] += 1
        return outputs

    def _run(
        self,
        labels: np.ndarray,
        keys: list[tuple[int, int]],
        cfg: float | None,
        on_stage: StageCallback | None,
    ) -> GenerateResult:
        begin = time.perf_counter()
        timings = Timings()
        config = self.config
        weights = schedule.cfg_weights(config, cfg)
        noise = schedule.draw_noise(config, keys)
        on_device = getattr(self.backend, "generate_on_device", None) if self.device_resident else None
        if on_device is not None:  # TensorRT: every intermediate stays on the GPU for the whole request
            out = on_device(labels, noise, weights, on_stage)
            timings.stages = list(out.stage_seconds)
            timings.graphs.update(out.graph_seconds)
            timings.calls.update(out.graph_calls)
            timings.decoder = out.decoder_seconds
            images = to_uint8(out.image)
            timings.total = time.perf_counter() - begin
            return GenerateResult(images, out.latents, timings)
        rows, channels, width = len(labels), config.latent_channels, config.width
        offsets = graphs.cache_offsets(config)
        cache = graphs.new_cache(config, rows)
        prev = graphs.first_prev(config, rows)
        flat_x: np.ndarray = np.empty(0, np.float32)
        flat_z: np.ndarray = flat_x
        cfg_in: np.ndarray = flat_x
        stage_begin = begin
        image = None
        for call in graphs.request_plan(config, self.manifest.fuse_flow_loop):
            index = call.stage - 1
            if call.graph == "backbone":
                stage_begin = time.perf_counter()
                feeds = {
                    "labels": labels,
                    "prev": prev,
                    "noise": noise[index],
                    "past_kv": cache[: offsets[index]],
                    **graphs.stage_inputs(config, call.stage),
                }
                z, x, kv = self._call(timings, call.graph, feeds)
                cache[offsets[index] : offsets[index] + len(kv)] = kv
                flat_x, flat_z = x.reshape(rows * x.shape[1], channels), z.reshape(-1, width)
                cfg_in = np.array([weights[index]], dtype=np.float32)
                continue
            if call.graph == "decoder":
                decode_begin = time.perf_counter()
                (image,) = self._call(timings, "decoder", {"x": prev})
                timings.decoder = time.perf_counter() - decode_begin
                continue
            times = {"t": np.array(call.t, np.float32), "dt": np.array(call.dt, np.float32)}
            (flat_x,) = self._call(timings, call.graph, {"x": flat_x, "z": flat_z, **times, "cfg": cfg_in})
            if call.graph == "flow_loop" or call.step == config.steps[index] - 1:  # the stage is done
                prev = flat_x.reshape(rows, config.tokens_per_stage[index], channels)
                timings.stages.append(time.perf_counter() - stage_begin)
                if on_stage:
                    on_stage(call.stage, config.num_stages)
        assert image is not None
        images = to_uint8(image)
        timings.total = time.perf_counter() - begin
        return GenerateResult(images, prev, timings)


def _cuda_wanted(device: str) -> bool:
    """ONNX Runtime on CUDA: asked for, or ``auto`` with onnxruntime-gpu seeing a GPU."""
    return device == "cuda" or (device == "auto" and selection.onnxruntime_has_cuda())
