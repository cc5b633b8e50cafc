"""The TensorRT backend: deserialized plans, device-resident buffers, one CUDA stream (DESIGN §5).

Two ways to run:

* :meth:`TensorRTBackend.run` — the :class:`~runtime.backends.Backend` protocol: numpy feeds in,
  numpy outputs out, one graph per call (through pinned host buffers). Buffers are allocated
  per graph and input shape and then reused.
* :meth:`TensorRTBackend.generate_on_device` — a whole request on the device: labels, noise and
  the per-request scalars go in, the decoded image and final latents come out, and every
  intermediate (z, x, KV cache) stays in device buffers that are bound to the next engine by
  address. With ``cuda_graphs=True`` each stage's flow loop is replayed from a CUDA graph
  (:mod:`runtime.backends.tensorrt.cuda_graphs`).

Threading: one lock around everything that touches the shared stream, execution contexts and
buffers. Concurrent calls from several threads are safe and return what sequential calls
return; they run one at a time on the GPU, which is also why every context can share one
activation buffer. For GPU-side concurrency create one backend per thread.

Compatibility: before anything is deserialized, the driver is checked against the CUDA build of
the installed TensorRT, and the manifest's ``tensorrt`` block against the running TensorRT
version and GPU (:mod:`runtime.trt.compat`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from runtime import gpu, graphs
from runtime.backends.tensorrt import cuda_graphs
from runtime.backends.tensorrt.cuda_graphs import StageGraph
from runtime.backends.tensorrt.engine import EngineRunner
from runtime.backends.tensorrt.memory import DeviceAllocations, PinnedBuffers, SharedScratch
from runtime.backends.tensorrt.shapes import nbytes, resolve_dims
from runtime.backends.tensorrt.workspace import StageInputs, Workspace
from runtime.errors import ECARError, EngineError, InvalidRequestError, ManifestError
from runtime.manifest import Manifest
from runtime.trt import loader
from runtime.trt.compat import REBUILD, RunningEnvironment, check_plan_compatibility
from runtime.trt.loader import log_tail_text

if TYPE_CHECKING:
    import tensorrt as trt

LOG = logging.getLogger("ecar.tensorrt")


def probe(manifest: Manifest, device_index: int = 0) -> str | None:
    """Why this build's TensorRT plans cannot run here, or None when they can.

    It really tries: imports TensorRT, starts the CUDA driver, checks the driver against the
    CUDA build of TensorRT, creates a ``trt.Runtime`` (deserializing nothing) and checks the
    plans' TensorRT version and GPU. For ``Pipeline.from_dir(backend="auto")``, which falls
    back to ONNX Runtime when this says why not.
    """
    if manifest.backend != "tensorrt":
        return f"the build holds no TensorRT plans (built for {manifest.backend})"
    missing = [name for name, entry in manifest.graphs.items() if not entry.plan_file]
    if missing:
        return f"the manifest names no TensorRT plan for {', '.join(missing)}; {REBUILD}"
    try:
        trt_module = loader.load_tensorrt()
        cuda = gpu.driver()
        info = cuda.info(device_index)
        loader.check_driver(loader.tensorrt_cuda_major(), info.driver_version, str(trt_module.__version__))
        cuda.use_device(device_index)
        loader.create_runtime(trt_module)
        environment = RunningEnvironment(str(trt_module.__version__), info.name, info.compute_capability)
        check_plan_compatibility(manifest.tensorrt, environment)
    except ECARError as exc:
        return str(exc)
    return None


@dataclass
class DeviceRunResult:
    """What :meth:`TensorRTBackend.generate_on_device` returns (times from CUDA events)."""

    image: np.ndarray  # float32 [B, ch, H, W] in [0, 1], the decoder's output
    latents: np.ndarray  # float32 [B, N_S, C]
    stage_seconds: list[float]
    decoder_seconds: float
    graph_seconds: dict[str, float] = field(default_factory=dict)
    graph_calls: dict[str, int] = field(default_factory=dict)
    total_seconds: float = 0.0


@dataclass
class _HostCall:
    """Device buffers and pinned staging arrays of one (graph, input shapes) for :meth:`run`."""

    device: dict[str, int]
    host: dict[str, np.ndarray]


class TensorRTBackend:
    """Runs a build's TensorRT plans. See the module docstring for threading and the device path."""

    name = "tensorrt"

    def __init__(
        self,
        manifest: Manifest,
        device_index: int = 0,
        cuda_graphs: bool = False,
        *,
        trt_module: ModuleType | None = None,
        cuda: gpu.CudaDriver | None = None,
        environment: RunningEnvironment | None = None,
    ) -> None:
        # trt_module / cuda / environment: test seams (fakes); normally discovered here.
        if manifest.backend != "tensorrt":
            raise ManifestError(
                f"'{manifest.root}' holds no TensorRT plans (built for {manifest.backend}); "
                "rebuild with `ecar-export build --backend tensorrt` on a machine with TensorRT"
            )
        self.trt = trt_module or loader.load_tensorrt()
        self.cuda = cuda or gpu.driver()
        self.device_index = device_index
        self.cuda.use_device(device_index)
        info = self.cuda.info(device_index)
        if trt_module is None:
            loader.check_driver(loader.tensorrt_cuda_major(), info.driver_version, str(self.trt.__version__))
        if environment is None:
            environment = RunningEnvironment(str(self.trt.__version__), info.name, info.compute_capability)
        self.environment = environment
        self.warnings = check_plan_compatibility(manifest.tensorrt, environment)
        for text in self.warnings:
            LOG.warning("%s", text)
        missing = [name for name, entry in manifest.graphs.items() if not entry.plan_file]
        if missing:
            raise ManifestError(f"the manifest names no TensorRT plan for {', '.join(missing)}; {REBUILD}")
        self.manifest = manifest
        self.config = manifest.config
        self.cuda_graphs = cuda_graphs
        self._lock = threading.RLock()
        self._logger, self._book = loader.tensorrt_logger(self.trt)
        self._runtime: trt.Runtime = loader.create_runtime(self.trt)
        self.runners: dict[str, EngineRunner] = {}
        self._stream = 0
        self._scratch: SharedScratch | None = None
        self._host_calls: dict[tuple[str, tuple[tuple[str, int], ...]], _HostCall] = {}
        self._host_memory = DeviceAllocations(self.cuda)
        self._host_pinned = PinnedBuffers(self.cuda)
        self._workspaces: dict[int, Workspace] = {}
        self._stage_inputs: StageInputs | None = None
        try:
            for name, entry in manifest.graphs.items():
                assert entry.plan_file is not None
                path = manifest.path(entry.plan_file)
                try:
                    data = path.read_bytes()  # the manifest loader verified its sha256
                except OSError as exc:
                    raise ManifestError(f"cannot read TensorRT plan '{path}': {exc}; {REBUILD}") from None
                mark = self._book.mark()
                engine: trt.ICudaEngine | None = self._runtime.deserialize_cuda_engine(data)
                if engine is None:
                    raise EngineError(
                        f"TensorRT {self.environment.tensorrt_version} cannot deserialize the plan of graph '{name}' "
                        f"('{path}'); {REBUILD}" + log_tail_text(self._book, mark)
                    )
                stages = graphs.graph_stages(self.config, entry.spec)
                self.runners[name] = EngineRunner(name, entry.spec, engine, self.trt, self._book, stages)
            self._stream = self.cuda.stream_create()
            # one activation buffer for every context (they run one at a time on one stream)
            self._scratch = SharedScratch(self.cuda, max(runner.memory_needed() for runner in self.runners.values()))
            for runner in self.runners.values():
                runner.open_contexts(self._scratch, self._stream)
            self._stage_inputs = StageInputs(self.cuda, self.config, self._stream)
        except BaseException:
            self.close()
            raise

    @property
    def scratch_bytes(self) -> int:
        """Size of the activation buffer all execution contexts share."""
        return self._scratch.size if self._scratch else 0

    # ------------------------------------------------------------------ Backend protocol
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        runner = self.runners.get(graph)
        if runner is None:
            raise EngineError(f"this build has no graph '{graph}'")
        dims = resolve_dims(runner.spec, {name: np.shape(value) for name, value in feeds.items()})
        key = (graph, tuple(sorted(dims.items())))
        with self._lock:
            self._check_open()
            self.cuda.use_device(self.device_index)
            call = self._host_calls.get(key)
            if call is None:
                names = (*runner.inputs, *runner.outputs)
                call = _HostCall(
                    device={n: self._host_memory.new(nbytes(runner.shape(n, dims), runner.dtypes[n])) for n in names},
                    host={n: self._host_pinned.array(runner.shape(n, dims), runner.dtypes[n]) for n in names},
                )
                self._host_calls[key] = call
            for name in runner.inputs:
                np.copyto(call.host[name], feeds[name], casting="same_kind")
                self.cuda.copy_to_device(call.device[name], call.host[name], self._stream)
            stage = runner.stage_for(dims, self.config.tokens_per_stage, self.manifest.max_batch)
            runner.enqueue(runner.contexts[stage], dims, call.device, self._stream)
            for name in runner.outputs:
                self.cuda.copy_to_host(call.host[name], call.device[name], self._stream)
            self.cuda.stream_synchronize(self._stream)
            return [call.host[name].copy() for name in runner.outputs]

    def describe(self) -> dict[str, object]:
        return {
            "backend": self.name,
            "tensorrt": self.environment.tensorrt_version,
            "gpu": self.environment.gpu_name,
            "compute_capability": self.environment.compute_capability,
            "device_index": self.device_index,
            "plans": {name: entry.plan_file for name, entry in self.manifest.graphs.items()},
            "device_resident": True,
            "cuda_graphs": self.cuda_graphs,
            "shared_activation_bytes": self.scratch_bytes,
            "threading": "one lock: concurrent calls are safe and run one at a time on the GPU",
            "warnings": list(self.warnings),
        }

    # ------------------------------------------------------------------ device-resident request
    def generate_on_device(
        self,
        labels: np.ndarray | Sequence[int],
        noise: Sequence[np.ndarray],
        cfg_weights: Sequence[float],
        on_stage: Callable[[int, int], None] | None = None,
    ) -> DeviceRunResult:
        """One whole request with every intermediate on the device.

        ``labels`` int [B]; ``noise`` one float32 [B, N_s, C] array per stage (as
        :func:`runtime.schedule.draw_noise` makes them); ``cfg_weights`` one guidance weight per
        stage (:func:`runtime.schedule.cfg_weights`). Copies in: labels, noise and the scalars;
        copies out: the image and the final latents, all through pinned host buffers.
        ``on_stage`` (stages done, stages in all) is called after each stage has finished on the
        GPU (that costs one stream sync per stage).
        """
        config = self.config
        label_array = np.asarray(labels)
        batch = int(label_array.shape[0]) if label_array.ndim == 1 else 0
        if not 1 <= batch <= self.manifest.max_batch:
            raise InvalidRequestError(
                f"batch of {batch} samples is outside this build's profile (1..{self.manifest.max_batch})"
            )
        if len(noise) != config.num_stages or len(cfg_weights) != config.num_stages:
            raise InvalidRequestError(f"need noise and a cfg weight for each of the {config.num_stages} stages")
        for index, (array, tokens) in enumerate(zip(noise, config.tokens_per_stage)):
            expected = (batch, tokens, config.latent_channels)
            if tuple(np.shape(array)) != expected:
                raise InvalidRequestError(
                    f"noise of stage {index + 1} must have shape {expected}, got {np.shape(array)}"
                )
        begin = time.perf_counter()
        with self._lock:
            self._check_open()
            self.cuda.use_device(self.device_index)
            workspace = self._workspace(batch)
            return self._generate(workspace, label_array, list(noise), list(cfg_weights), on_stage, begin)

    def _workspace(self, batch: int) -> Workspace:
        workspace = self._workspaces.get(batch)
        if workspace is None:
            workspace = Workspace(self.cuda, self.config, batch, self.manifest.fuse_flow_loop, self._stream)
            self._workspaces[batch] = workspace
        return workspace

    def _generate(
        self,
        ws: Workspace,
        labels: np.ndarray,
        noise: list[np.ndarray],
        cfg_weights: list[float],
        on_stage: Callable[[int, int], None] | None,
        begin: float,
    ) -> DeviceRunResult:
        """Walk the request plan (:func:`runtime.graphs.request_plan`) with every tensor on the device."""
        config, cuda, stream, timer = self.config, self.cuda, self._stream, ws.timer
        assert self._stage_inputs is not None
        timer.reset()
        calls: list[tuple[str, int, int, int]] = []  # graph, start event, end event, engine calls
        stage_marks: list[tuple[int, int]] = []
        np.copyto(ws.host_labels, labels, casting="same_kind")
        for stage, weight in enumerate(cfg_weights, start=1):
            ws.set_cfg(stage, weight)
        cuda.copy_to_device(ws.labels, ws.host_labels, stream)
        for stage, array in enumerate(noise, start=1):
            np.copyto(ws.host_noise[stage], array, casting="same_kind")
            cuda.copy_to_device(ws.noise[stage], ws.host_noise[stage], stream)
        cuda.copy_to_device(ws.scalars, ws.host_scalars, stream)

        def call(runner: EngineRunner, stage: int, bind: dict[str, int]) -> None:
            start = timer.mark(stream)
            runner.enqueue(runner.contexts[stage], ws.dims[stage], bind, stream)
            calls.append((runner.name, start, timer.mark(stream), 1))

        offsets = graphs.cache_offsets(config)
        prev = ws.first_prev  # the previous stage's end state
        current = ws.x[0]  # the flow state of this stage (never the buffer ``prev`` is in)
        stage_start = 0
        for request_call in graphs.request_plan(config, self.manifest.fuse_flow_loop):
            stage, graph = request_call.stage, request_call.graph
            runner = self.runners[graph]
            if graph == "backbone":
                stage_start = timer.mark(stream)
                current = ws.x[1] if prev == ws.x[0] else ws.x[0]
                bind = {
                    "labels": ws.labels,
                    "prev": prev,
                    "noise": ws.noise[stage],
                    **self._stage_inputs.addresses[stage],
                    "past_kv": ws.cache,
                    "z": ws.z,
                    "x": current,
                    "kv": ws.kv_out,
                }
                call(runner, stage, bind)
                emitted = ws.dims[stage]["E"]
                if emitted:  # append the stage's keys/values to the cache (the next stage's past)
                    target = ws.cache + offsets[stage - 1] * ws.kv_row
                    cuda.copy_device(target, ws.kv_out, emitted * ws.kv_row, stream)
                continue
            if graph == "decoder":
                decode_start = timer.mark(stream)
                call(runner, stage, {"x": prev, "image": ws.image})
                decode_end = timer.mark(stream)
                continue
            other = ws.x[1] if current == ws.x[0] else ws.x[0]
            if graph == "flow_loop":
                t_slot, dt_slot = ws.time_slot[stage][0]
                bind = {"x": current, "z": ws.z, "t": ws.slot(t_slot), "dt": ws.slot(dt_slot)}
                call(runner, stage, {**bind, "cfg": ws.cfg_slot(stage), "x_end": other})
                prev = other
            elif request_call.step == 0:  # flow_step: the stage's whole loop, enqueued at its first step
                prev = self._flow_loop(ws, stage, calls, (current, other))
            else:
                continue
            stage_marks.append((stage_start, timer.mark(stream)))
            if on_stage:
                cuda.stream_synchronize(stream)
                on_stage(stage, config.num_stages)
        cuda.copy_to_host(ws.host_image, ws.image, stream)
        cuda.copy_to_host(ws.host_latents, prev, stream)
        cuda.stream_synchronize(stream)
        graph_seconds: dict[str, float] = {}
        graph_calls: dict[str, int] = {}
        for name, start, end, count in calls:
            graph_seconds[name] = graph_seconds.get(name, 0.0) + timer.seconds(start, end)
            graph_calls[name] = graph_calls.get(name, 0) + count
        return DeviceRunResult(
            image=ws.host_image.copy(),
            latents=ws.host_latents.copy(),
            stage_seconds=[timer.seconds(a, b) for a, b in stage_marks],
            decoder_seconds=timer.seconds(decode_start, decode_end),
            graph_seconds=graph_seconds,
            graph_calls=graph_calls,
            total_seconds=time.perf_counter() - begin,
        )

    def _flow_loop(
        self, ws: Workspace, stage: int, calls: list[tuple[str, int, int, int]], buffers: tuple[int, int]
    ) -> int:
        """Enqueue a stage's Euler loop (x ping-pongs from ``buffers[0]``); returns the final buffer.

        With ``cuda_graphs``, the loop runs on a context of its own per (batch size, stage):
        eagerly twice (a warm-up, then a run that is captured), replayed from then on.
        """
        runner = self.runners["flow_step"]
        timer, stream = ws.timer, self._stream
        steps = ws.time_slot[stage]
        final = buffers[len(steps) % 2]
        dims = ws.dims[stage]

        def enqueue_all(context: trt.IExecutionContext, timed: bool) -> None:
            for step, (t_slot, dt_slot) in enumerate(steps):
                bind = {
                    "x": buffers[step % 2],
                    "x_next": buffers[(step + 1) % 2],
                    "z": ws.z,
                    "t": ws.slot(t_slot),
                    "dt": ws.slot(dt_slot),
                    "cfg": ws.cfg_slot(stage),
                }
                start = timer.mark(stream) if timed else -1
                runner.enqueue(context, dims, bind, stream)
                if timed:
                    calls.append((runner.name, start, timer.mark(stream), 1))

        if not self.cuda_graphs or not steps:
            enqueue_all(runner.contexts[stage], timed=True)
            return final
        stage_graph = ws.stage_graphs.get(stage)
        if stage_graph is None:
            assert self._scratch is not None
            stage_graph = StageGraph(context=runner.new_context(self._scratch, stage, stream))
            ws.stage_graphs[stage] = stage_graph
        if stage_graph.executable:
            start = timer.mark(stream)
            self.cuda.graph_launch(stage_graph.executable, stream)
            calls.append((runner.name, start, timer.mark(stream), len(steps)))
            return final
        # eager on the stage's own context; after the first (warm-up) run, capture the loop
        enqueue_all(stage_graph.context, timed=True)
        if stage_graph.failed is None:
            if stage_graph.warmed:
                failure = cuda_graphs.capture(
                    self.cuda, stream, stage_graph, lambda: enqueue_all(stage_graph.context, timed=False)
                )
                if failure is not None:
                    message = f"CUDA graph capture of stage {stage}'s flow loop failed; running it eagerly ({failure})"
                    self.warnings.append(message)
                    LOG.warning("%s", message)
            else:
                stage_graph.warmed = True
        return final

    # ------------------------------------------------------------------ lifetime
    def _check_open(self) -> None:
        if not self._stream:
            raise EngineError("this TensorRT backend is closed")

    def release_buffers(self) -> None:
        """Free the cached per-batch-size buffers (they are re-made on the next call)."""
        with self._lock:
            self.cuda.use_device(self.device_index)
            for workspace in self._workspaces.values():
                workspace.release(self.cuda)
            self._workspaces.clear()
            self._host_calls.clear()
            self._host_memory.free()
            self._host_pinned.free()

    def close(self) -> None:
        """Free every device resource; the backend cannot run afterwards."""
        with self._lock:
            if self._stream:
                self.cuda.stream_synchronize(self._stream)
            self.release_buffers()
            self.runners.clear()
            if self._stage_inputs is not None:
                self._stage_inputs.release()
                self._stage_inputs = None
            if self._scratch is not None:
                self._scratch.free()
                self._scratch = None
            if self._stream:
                self.cuda.stream_destroy(self._stream)
                self._stream = 0

    def __enter__(self) -> TensorRTBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
