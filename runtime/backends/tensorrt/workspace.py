"""Every buffer of a whole request at one batch size: device tensors bound between engines by
address, and the pinned host arrays the request's inputs and results pass through."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from runtime import gpu
from runtime.backends.tensorrt.cuda_graphs import StageGraph
from runtime.backends.tensorrt.memory import ADDRESS_ALIGNMENT, DeviceAllocations, EventTimer, PinnedBuffers
from runtime.backends.tensorrt.shapes import nbytes
from runtime.graphs import stage_times

if TYPE_CHECKING:
    from runtime.backends.tensorrt.engine import EngineRunner
    from runtime.config import ECARConfig

F32 = np.dtype(np.float32)


class Workspace:
    """Device and pinned host buffers of one batch size, made once and reused by every request."""

    def __init__(self, cuda: gpu.CudaDriver, config: ECARConfig, runners: dict[str, EngineRunner], batch: int) -> None:
        self.batch = batch
        self.memory = DeviceAllocations(cuda)
        self.pinned = PinnedBuffers(cuda)
        self.timer = EventTimer(cuda)
        backbones = [runners[f"backbone_{s}"] for s in range(1, config.num_stages + 1)]
        dims = backbones[0].spec.dims(batch)
        self.dims = dims
        self.labels = self.memory.new(batch * 8)
        self.host_labels = self.pinned.array((batch,), np.dtype(np.int64))
        self.noise: list[int] = []
        self.host_noise: list[np.ndarray] = []
        self.z: list[int] = []
        self.x: list[int] = []
        self.scratch: list[int] = []
        self.kv: list[int] = []
        for runner in backbones:
            noise_shape = runner.shape("noise", dims)
            self.noise.append(self.memory.new(nbytes(noise_shape, F32)))
            self.host_noise.append(self.pinned.array(noise_shape, F32))
            self.z.append(self.memory.new(nbytes(runner.shape("z", dims), F32)))
            self.x.append(self.memory.new(nbytes(runner.shape("x", dims), F32)))
            self.scratch.append(self.memory.new(nbytes(runner.shape("x", dims), F32)))
            self.kv.append(self.memory.new(nbytes(runner.shape("present_kv", dims), F32)))
        decoder = runners["decoder"]
        self.image_shape = decoder.shape("image", dims)
        self.image = self.memory.new(nbytes(self.image_shape, F32))
        self.host_image = self.pinned.array(self.image_shape, F32)
        self.latents_shape = (batch, config.tokens_per_stage[-1], config.latent_channels)
        self.host_latents = self.pinned.array(self.latents_shape, F32)
        # per-request scalars: cfg per stage, then (t, dt) per flow step, each in its own aligned slot
        self.steps = [stage_times(config, s) for s in range(1, config.num_stages + 1)]
        slots = config.num_stages + 2 * sum(len(steps) for steps in self.steps)
        self.slot_floats = ADDRESS_ALIGNMENT // 4
        self.host_scalars = self.pinned.array((slots * self.slot_floats,), F32)
        self.host_scalars[:] = 0.0
        self.time_slot: list[list[tuple[int, int]]] = []
        slot = config.num_stages
        for steps in self.steps:
            pairs = []
            for t, dt in steps:
                self.host_scalars[slot * self.slot_floats] = t
                self.host_scalars[(slot + 1) * self.slot_floats] = dt
                pairs.append((slot, slot + 1))
                slot += 2
            self.time_slot.append(pairs)
        self.scalars = self.memory.new(self.host_scalars.nbytes)
        self.stage_graphs: dict[int, StageGraph] = {}

    def slot(self, index: int) -> int:
        return self.scalars + index * ADDRESS_ALIGNMENT

    def release(self, cuda: gpu.CudaDriver) -> None:
        for stage_graph in self.stage_graphs.values():
            cuda.graph_destroy(stage_graph.graph, stage_graph.executable)
        self.stage_graphs.clear()
        self.timer.destroy()
        self.memory.free()
        self.pinned.free()
