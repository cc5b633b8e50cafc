"""The TensorRT backend: deserialized plans, device-resident buffers, one CUDA stream (DESIGN §5).

Two ways to run:

* :meth:`TensorRTBackend.run` — the :class:`~runtime.backends.Backend` protocol: numpy feeds in,
  numpy outputs out, one graph per call (through pinned host buffers). Buffers are allocated
  per graph and input shape and then reused.
* :meth:`TensorRTBackend.run_request` — a whole request on the device: labels, noise and
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
version and GPU (:mod:`runtime.backends.tensorrt.compat`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from runtime.backends import DeviceRunResult, StageCallback, selection
from runtime.backends.tensorrt import cuda_graphs, gpu, loader
from runtime.backends.tensorrt.compat import REBUILD, RunningEnvironment, check_plan_compatibility
from runtime.backends.tensorrt.cuda_graphs import StageGraph
from runtime.backends.tensorrt.engine import EngineRunner
from runtime.backends.tensorrt.loader import log_tail_text
from runtime.backends.tensorrt.memory import DeviceAllocations, PinnedBuffers, SharedScratch
from runtime.backends.tensorrt.shapes import nbytes, resolve_dims
from runtime.backends.tensorrt.workspace import DeviceSlots, StageInputs, Workspace
from runtime.errors import ECARError, EngineError, InvalidRequestError, ManifestError
from runtime.graphs import Call, Kind
from runtime.manifest import Manifest
from runtime.request import RequestInputs

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
        return selection.no_plans(manifest.root, manifest.backend)
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
class _HostCall:
    """Device buffers and pinned staging arrays of one (graph, input shapes) for :meth:`run`."""

    device: dict[str, int]
    host: dict[str, np.ndarray]


class TensorRTBackend:
    """Runs a build's TensorRT plans. See the module docstring for threading and the device path."""

    name = "tensorrt"
    activation_budget: int | None = None  # the profiles size the device memory: backbone and flow calls stay whole

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
            raise ManifestError(selection.no_plans(manifest.root, manifest.backend))
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
        self.plan = manifest.plan
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
                stages = self.plan.graph_stages(entry.spec.kind)
                self.runners[name] = EngineRunner(name, entry.spec, engine, self.trt, self._book, stages)
            self._stream = self.cuda.stream_create()
            # one activation buffer for every context (they run one at a time on one stream)
            self._scratch = SharedScratch(self.cuda, max(runner.memory_needed() for runner in self.runners.values()))
            for runner in self.runners.values():
                runner.open_contexts(self._scratch, self._stream)
            self._stage_inputs = StageInputs(self.cuda, manifest, self._stream)
        except BaseException:
            self.close()
            raise

    @property
    def scratch_bytes(self) -> int:
        """Size of the activation buffer all execution contexts share."""
        return self._scratch.size if self._scratch else 0

    # ------------------------------------------------------------------ Backend protocol
    def run(self, call: Call, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        runner = self.runners.get(call.graph)
        if runner is None:
            raise EngineError(f"this build has no graph '{call.graph}'")
        dims = resolve_dims(runner.spec, {name: np.shape(value) for name, value in feeds.items()})
        key = (call.graph, tuple(sorted(dims.items())))
        with self._lock:
            self._check_open()
            self.cuda.use_device(self.device_index)
            host_call = self._host_calls.get(key)
            if host_call is None:
                names = (*runner.inputs, *runner.outputs)
                host_call = _HostCall(
                    device={n: self._host_memory.new(nbytes(runner.shape(n, dims), runner.dtypes[n])) for n in names},
                    host={n: self._host_pinned.array(runner.shape(n, dims), runner.dtypes[n]) for n in names},
                )
                self._host_calls[key] = host_call
            for name in runner.inputs:
                np.copyto(host_call.host[name], feeds[name], casting="same_kind")
                self.cuda.copy_to_device(host_call.device[name], host_call.host[name], self._stream)
            runner.enqueue(runner.context(call.stage), dims, host_call.device, self._stream)
            for name in runner.outputs:
                self.cuda.copy_to_host(host_call.host[name], host_call.device[name], self._stream)
            self.cuda.stream_synchronize(self._stream)
            return [host_call.host[name].copy() for name in runner.outputs]

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
    def run_request(self, inputs: RequestInputs, on_stage: StageCallback | None = None) -> DeviceRunResult:
        """One whole request with every intermediate on the device.

        ``inputs``: the labels, every stage's noise and guidance weight
        (:class:`runtime.request.RequestInputs`). Copies in: labels, noise and the scalars;
        copies out: the image and the final latents, all through pinned host buffers.
        ``on_stage`` (stages done, stages in all) is called after each stage has finished on the
        GPU (that costs one stream sync per stage).
        """
        plan = self.plan
        batch = int(inputs.labels.shape[0]) if inputs.labels.ndim == 1 else 0
        if not 1 <= batch <= self.manifest.max_batch:
            raise InvalidRequestError(
                f"batch of {batch} samples is outside this build's profile (1..{self.manifest.max_batch})"
            )
        if len(inputs.noise) != plan.num_stages or len(inputs.cfg) != plan.num_stages:
            raise InvalidRequestError(f"need noise and a cfg weight for each of the {plan.num_stages} stages")
        for index, (array, tokens) in enumerate(zip(inputs.noise, plan.tokens)):
            expected = (batch, tokens, plan.channels)
            if tuple(np.shape(array)) != expected:
                raise InvalidRequestError(
                    f"noise of stage {index + 1} must have shape {expected}, got {np.shape(array)}"
                )
        begin = time.perf_counter()
        with self._lock:
            self._check_open()
            self.cuda.use_device(self.device_index)
            workspace = self._workspace(batch)
            return self._generate(workspace, inputs, on_stage, begin)

    def _workspace(self, batch: int) -> Workspace:
        workspace = self._workspaces.get(batch)
        if workspace is None:
            workspace = Workspace(self.cuda, self.manifest, batch, self._stream)
            self._workspaces[batch] = workspace
        return workspace

    def _generate(
        self, ws: Workspace, inputs: RequestInputs, on_stage: StageCallback | None, begin: float
    ) -> DeviceRunResult:
        """Walk the request plan (:meth:`runtime.plan.RequestPlan.calls`) with every tensor on the device.

        Each call's buffers come from the contract's slot tables (:class:`DeviceSlots`); a
        stage's flow steps are enqueued together when its last step comes, so that they can
        be replayed from a CUDA graph.
        """
        plan, cuda, stream, timer = self.plan, self.cuda, self._stream, ws.timer
        assert self._stage_inputs is not None
        timer.reset()
        calls: list[tuple[str, int, int, int]] = []  # graph, start event, end event, engine calls
        stage_marks: list[tuple[int, int]] = []
        np.copyto(ws.host_labels, inputs.labels, casting="same_kind")
        for stage, weight in enumerate(inputs.cfg, start=1):
            ws.set_cfg(stage, weight)
        cuda.copy_to_device(ws.labels, ws.host_labels, stream)
        for stage, array in enumerate(inputs.noise, start=1):
            np.copyto(ws.host_noise[stage], array, casting="same_kind")
            cuda.copy_to_device(ws.noise[stage], ws.host_noise[stage], stream)
        cuda.copy_to_device(ws.scalars, ws.host_scalars, stream)
        slots = DeviceSlots(ws, self._stage_inputs, plan)
        stage_start = decode_start = decode_end = 0
        steps: list[dict[str, int]] = []  # the binds of the current stage's flow steps
        for call in plan.calls(self.manifest.fuse_flow_loop):
            runner = self.runners[call.graph]
            bind = slots.bind(call)
            if call.graph == Kind.FLOW_STEP:
                steps.append(bind)
                if call.ends_stage:  # the stage's whole loop, enqueued at its last step
                    self._flow_loop(ws, call.stage, calls, steps)
                    steps = []
            else:
                start = timer.mark(stream)
                if call.graph == Kind.BACKBONE:
                    stage_start = start
                runner.enqueue(runner.context(call.stage), ws.dims[call.stage], bind, stream)
                end = timer.mark(stream)
                calls.append((runner.name, start, end, 1))
                if call.graph == Kind.DECODER:
                    decode_start, decode_end = start, end
            slots.stored(call, cuda, stream)
            if call.ends_stage:
                stage_marks.append((stage_start, timer.mark(stream)))
                if on_stage:
                    cuda.stream_synchronize(stream)
                    on_stage(call.stage, plan.num_stages)
        cuda.copy_to_host(ws.host_image, ws.image, stream)
        cuda.copy_to_host(ws.host_latents, slots.prev, stream)
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
        self, ws: Workspace, stage: int, calls: list[tuple[str, int, int, int]], steps: list[dict[str, int]]
    ) -> None:
        """Enqueue a stage's Euler loop (``steps``: each step's binds, in order).

        With ``cuda_graphs``, the loop runs on a context of its own per (batch size, stage):
        eagerly twice (a warm-up, then a run that is captured), replayed from then on; a replay
        needs the very binds it captured (every request of a batch size binds the same buffers).
        """
        runner = self.runners[Kind.FLOW_STEP]
        timer, stream = ws.timer, self._stream
        dims = ws.dims[stage]

        def enqueue_all(context: trt.IExecutionContext, timed: bool) -> None:
            for bind in steps:
                start = timer.mark(stream) if timed else -1
                runner.enqueue(context, dims, bind, stream)
                if timed:
                    calls.append((runner.name, start, timer.mark(stream), 1))

        if not self.cuda_graphs:
            enqueue_all(runner.context(stage), timed=True)
            return
        stage_graph = ws.stage_graphs.get(stage)
        if stage_graph is None:
            assert self._scratch is not None
            stage_graph = StageGraph(context=runner.new_context(self._scratch, stage, stream))
            ws.stage_graphs[stage] = stage_graph
        if stage_graph.executable and stage_graph.binds == steps:
            start = timer.mark(stream)
            self.cuda.graph_launch(stage_graph.executable, stream)
            calls.append((runner.name, start, timer.mark(stream), len(steps)))
            return
        # eager on the stage's own context; after the first (warm-up) run, capture the loop
        enqueue_all(stage_graph.context, timed=True)
        if stage_graph.failed is None and not stage_graph.executable:
            if stage_graph.warmed:
                stage_graph.binds = [dict(bind) for bind in steps]
                failure = cuda_graphs.capture(
                    self.cuda, stream, stage_graph, lambda: enqueue_all(stage_graph.context, timed=False)
                )
                if failure is not None:
                    message = f"CUDA graph capture of stage {stage}'s flow loop failed; running it eagerly ({failure})"
                    self.warnings.append(message)
                    LOG.warning("%s", message)
            else:
                stage_graph.warmed = True

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
