"""Device buffers of a request: the stage inputs (once per backend) and one batch size's tensors.

:class:`StageInputs` — the backbone's stage inputs of every stage (:func:`runtime.graphs.stage_inputs`)
in device memory, uploaded once when the backend loads; every batch size binds the same ones.

:class:`Workspace` — every tensor of a whole request at one batch size, bound between engines
by address: labels, each stage's noise, the guidance rows ``z`` and the flow state ``x``
(ping-pong buffers sized for the largest stage, since stages run one after another), the KV
cache (token-major, so stage s reads the prefix the stages before it wrote) with a staging
buffer for a stage's emitted keys/values, the image, and the per-request scalars; plus the
pinned host arrays the inputs and results pass through.

:class:`DeviceSlots` — a request's slots (:data:`runtime.graphs.FEEDS` / ``RESULTS``) as the
addresses of one workspace's buffers, call by call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from runtime import graphs
from runtime.backends.tensorrt import gpu
from runtime.backends.tensorrt.cuda_graphs import StageGraph
from runtime.backends.tensorrt.memory import ADDRESS_ALIGNMENT, DeviceAllocations, EventTimer, PinnedBuffers
from runtime.backends.tensorrt.shapes import nbytes
from runtime.graphs import FEEDS, RESULTS, Call, Kind

if TYPE_CHECKING:
    from runtime.config import ECARConfig

F32 = np.dtype(np.float32)


class StageInputs:
    """The backbone's stage inputs of every stage, in device memory (uploaded once, never changed)."""

    def __init__(self, cuda: gpu.CudaDriver, config: ECARConfig, stream: int) -> None:
        self.memory = DeviceAllocations(cuda)
        self.pinned = PinnedBuffers(cuda)
        self.addresses: dict[int, dict[str, int]] = {}
        for stage in range(1, config.num_stages + 1):
            self.addresses[stage] = {}
            for name, array in graphs.stage_inputs(config, stage).items():
                host = self.pinned.array(array.shape, array.dtype)
                host[...] = array
                pointer = self.memory.new(array.nbytes)
                cuda.copy_to_device(pointer, host, stream)
                self.addresses[stage][name] = pointer
        cuda.stream_synchronize(stream)

    def release(self) -> None:
        self.memory.free()
        self.pinned.free()


class Workspace:
    """Device and pinned host buffers of one batch size, made once and reused by every request."""

    def __init__(self, cuda: gpu.CudaDriver, config: ECARConfig, batch: int, fuse_flow_loop: bool, stream: int) -> None:
        self.batch = batch
        self.memory = DeviceAllocations(cuda)
        self.pinned = PinnedBuffers(cuda)
        self.timer = EventTimer(cuda)
        stages = range(1, config.num_stages + 1)
        dims = {stage: graphs.stage_dims(config, stage, batch) for stage in stages}
        self.dims = dims
        c, d = config.latent_channels, config.width
        largest = max(config.tokens_per_stage)
        self.labels = self.memory.new(batch * 8)
        self.host_labels = self.pinned.array((batch,), np.dtype(np.int64))
        self.noise: dict[int, int] = {}
        self.host_noise: dict[int, np.ndarray] = {}
        for stage in stages:
            shape = (batch, dims[stage]["N"], c)
            self.noise[stage] = self.memory.new(nbytes(shape, F32))
            self.host_noise[stage] = self.pinned.array(shape, F32)
        self.first_prev = self.memory.new(nbytes((batch, 1, c), F32))  # stage 1's prev: zeros
        cuda.memset(self.first_prev, 0, batch * c * 4, stream)
        self.z = self.memory.new(nbytes((2 * batch, largest, d), F32))
        self.x = (self.memory.new(nbytes((batch, largest, c), F32)), self.memory.new(nbytes((batch, largest, c), F32)))
        self.kv_row = nbytes(graphs.kv_shape_concrete(config, 1, batch), F32)  # one token's keys/values
        cached = graphs.cache_offsets(config)[-1]
        self.cache = self.memory.new(max(1, cached) * self.kv_row)
        self.kv_out = self.memory.new(max(1, max(dims[s]["E"] for s in stages)) * self.kv_row)
        self.image_shape = (batch, config.image_channels, config.image_size, config.image_size)
        self.image = self.memory.new(nbytes(self.image_shape, F32))
        self.host_image = self.pinned.array(self.image_shape, F32)
        self.latents_shape = (batch, config.tokens_per_stage[-1], c)
        self.host_latents = self.pinned.array(self.latents_shape, F32)
        # per-request scalars, each in its own aligned slot: cfg per stage, then the flow times: per Euler
        # step a (t, dt) pair of one value each (flow_step), or per stage the t and dt arrays (flow_loop)
        self.steps = [graphs.stage_times(config, s) for s in stages]
        self.slot_floats = ADDRESS_ALIGNMENT // 4
        width = max(len(steps) for steps in self.steps) if fuse_flow_loop else 1
        slot_count = config.num_stages + 2 * (config.num_stages if fuse_flow_loop else sum(map(len, self.steps)))
        self.slot_width = -(-width // self.slot_floats) * self.slot_floats
        self.host_scalars = self.pinned.array((slot_count * self.slot_width,), F32)
        self.host_scalars[:] = 0.0
        self.time_slot: dict[int, list[tuple[int, int]]] = {}
        slot = config.num_stages
        for stage, steps in zip(stages, self.steps):
            pairs = []
            for group in [steps] if fuse_flow_loop else [[step] for step in steps]:
                for column, (t, dt) in enumerate(group):
                    self.host_scalars[slot * self.slot_width + column] = t
                    self.host_scalars[(slot + 1) * self.slot_width + column] = dt
                pairs.append((slot, slot + 1))
                slot += 2
            self.time_slot[stage] = pairs
        self.scalars = self.memory.new(self.host_scalars.nbytes)
        self.stage_graphs: dict[int, StageGraph] = {}

    def slot(self, index: int) -> int:
        return self.scalars + index * self.slot_width * 4

    def cfg_slot(self, stage: int) -> int:
        return self.slot(stage - 1)

    def set_cfg(self, stage: int, weight: float) -> None:
        self.host_scalars[(stage - 1) * self.slot_width] = np.float32(weight)

    def release(self, cuda: gpu.CudaDriver) -> None:
        for stage_graph in self.stage_graphs.values():
            cuda.graph_destroy(stage_graph.graph, stage_graph.executable)
        self.stage_graphs.clear()
        self.timer.destroy()
        self.memory.free()
        self.pinned.free()


class DeviceSlots:
    """Where each slot of a request lives in a :class:`Workspace`, as the request walks its calls.

    :meth:`bind` gives every input and output of a call its device address; :meth:`stored`
    (after the call is enqueued) moves the slots on: the flow state ping-pongs between the
    two ``x`` buffers, never writing the buffer it reads; a stage's emitted keys/values are
    appended to the cache; a call that ends its stage makes its state the next ``prev``.
    """

    def __init__(self, ws: Workspace, stage_inputs: StageInputs, offsets: tuple[int, ...]) -> None:
        self.ws = ws
        self.stage_inputs = stage_inputs
        self.offsets = offsets
        self.prev = ws.first_prev  # the previous stage's end state
        self.x = ws.x[0]  # the current stage's flow state
        self._written_x = self.x

    def address(self, slot: str, name: str, call: Call) -> int:
        ws = self.ws
        if slot == "noise":
            return ws.noise[call.stage]
        if slot == "stage":
            return self.stage_inputs.addresses[call.stage][name]
        if slot == "past":
            return ws.cache
        if slot in ("t", "dt"):
            t_slot, dt_slot = ws.time_slot[call.stage][call.step or 0]
            return ws.slot(t_slot if slot == "t" else dt_slot)
        if slot == "cfg":
            return ws.cfg_slot(call.stage)
        if slot in ("prev", "x"):
            return int(getattr(self, slot))
        return int(getattr(ws, slot))  # labels, z, image

    def bind(self, call: Call) -> dict[str, int]:
        """The device address of every input and output of ``call``."""
        bind = {name: self.address(slot, name, call) for name, slot in FEEDS[call.graph].items()}
        for name, slot in RESULTS[call.graph].items():
            if slot == "x":  # the other buffer than the one this call reads its state from
                reading = self.prev if call.graph == Kind.BACKBONE else self.x
                self._written_x = self.ws.x[1] if reading == self.ws.x[0] else self.ws.x[0]
                bind[name] = self._written_x
            elif slot == "past":  # staged, then appended to the cache (stored)
                bind[name] = self.ws.kv_out
            else:
                bind[name] = self.address(slot, name, call)
        return bind

    def stored(self, call: Call, cuda: gpu.CudaDriver, stream: int) -> None:
        """``call`` is enqueued: its outputs are now in the slots :meth:`bind` gave them."""
        slots = RESULTS[call.graph].values()
        if "x" in slots:
            self.x = self._written_x
        emitted = self.ws.dims[call.stage]["E"]
        if "past" in slots and emitted:  # the stage's keys/values become the next stage's past
            target = self.ws.cache + self.offsets[call.stage - 1] * self.ws.kv_row
            cuda.copy_device(target, self.ws.kv_out, emitted * self.ws.kv_row, stream)
        if call.ends_stage:
            self.prev = self.x
