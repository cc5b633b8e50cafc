"""Device buffers of a request: the stage constants (once per backend) and one batch size's tensors.

:class:`StageInputs` — every graph's stage constants at every stage (the build's stages file,
:mod:`runtime.stage_constants`) in device memory, uploaded once when the backend loads; every
batch size binds the same ones.

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
from runtime.graphs import RESULTS, Call, Kind

if TYPE_CHECKING:
    from runtime.manifest import Manifest
    from runtime.plan import RequestPlan

F32 = np.dtype(np.float32)


class StageInputs:
    """Every graph's stage constants at every stage it runs at, in device memory (uploaded once, never changed)."""

    def __init__(self, cuda: gpu.CudaDriver, manifest: Manifest, stream: int) -> None:
        self.memory = DeviceAllocations(cuda)
        self.pinned = PinnedBuffers(cuda)
        self.addresses: dict[tuple[str, int], dict[str, int]] = {}
        self.specs = manifest.specs
        for name, entry in manifest.graphs.items():
            for stage in manifest.plan.graph_stages(entry.spec.kind):
                self.addresses[name, stage] = {}
                for input_name, array in manifest.constants.get(name, stage).items():
                    host = self.pinned.array(array.shape, array.dtype)
                    host[...] = array
                    pointer = self.memory.new(max(1, array.nbytes))
                    cuda.copy_to_device(pointer, host, stream)
                    self.addresses[name, stage][input_name] = pointer
        cuda.stream_synchronize(stream)

    def release(self) -> None:
        self.memory.free()
        self.pinned.free()


class Workspace:
    """Device and pinned host buffers of one batch size, made once and reused by every request."""

    def __init__(self, cuda: gpu.CudaDriver, manifest: Manifest, batch: int, stream: int) -> None:
        plan, fuse_flow_loop = manifest.plan, manifest.fuse_flow_loop
        self.batch = batch
        self.memory = DeviceAllocations(cuda)
        self.pinned = PinnedBuffers(cuda)
        self.timer = EventTimer(cuda)
        stages = range(1, plan.num_stages + 1)
        dims = {stage: plan.dims(stage, batch) for stage in stages}
        self.dims = dims
        c, d = plan.channels, manifest.sizes["d"]
        largest = max(plan.tokens)
        self.labels = self.memory.new(batch * 8)
        self.host_labels = self.pinned.array((batch,), np.dtype(np.int64))
        self.noise: dict[int, int] = {}
        self.host_noise: dict[int, np.ndarray] = {}
        for stage in stages:
            shape = (batch, dims[stage]["N"], c)
            self.noise[stage] = self.memory.new(nbytes(shape, F32))
            self.host_noise[stage] = self.pinned.array(shape, F32)
        first = (batch, plan.stages[0].prev_tokens, c)
        self.first_prev = self.memory.new(nbytes(first, F32))  # stage 1's prev: zeros
        cuda.memset(self.first_prev, 0, nbytes(first, F32), stream)
        self.z = self.memory.new(nbytes((2 * batch, largest, d), F32))
        self.x = (self.memory.new(nbytes((batch, largest, c), F32)), self.memory.new(nbytes((batch, largest, c), F32)))
        self.kv_row = nbytes(graphs.kv_row_shape(manifest.graphs[Kind.BACKBONE].spec, batch), F32)  # one token's
        cached = plan.cache_rows
        self.cache = self.memory.new(max(1, cached) * self.kv_row)
        self.kv_out = self.memory.new(max(1, max(dims[s]["E"] for s in stages)) * self.kv_row)
        self.image_shape = manifest.image_shape(batch)
        self.image = self.memory.new(nbytes(self.image_shape, F32))
        self.host_image = self.pinned.array(self.image_shape, F32)
        self.latents_shape = (batch, plan.tokens[-1], c)
        self.host_latents = self.pinned.array(self.latents_shape, F32)
        # per-request scalars, each in its own aligned slot: cfg per stage, the weight 1 of unguided steps, then
        # the flow times: per Euler step a (t, dt) pair of one value each (flow_step), or per stage the t and dt
        # arrays (flow_loop)
        self.num_stages = plan.num_stages
        self.steps = [plan.stage(s).step_times() for s in stages]
        self.slot_floats = ADDRESS_ALIGNMENT // 4
        width = max(len(steps) for steps in self.steps) if fuse_flow_loop else 1
        slot_count = plan.num_stages + 1 + 2 * (plan.num_stages if fuse_flow_loop else sum(map(len, self.steps)))
        self.slot_width = -(-width // self.slot_floats) * self.slot_floats
        self.host_scalars = self.pinned.array((slot_count * self.slot_width,), F32)
        self.host_scalars[:] = 0.0
        self.host_scalars[plan.num_stages * self.slot_width] = 1.0  # the unguided weight
        self.time_slot: dict[int, list[tuple[int, int]]] = {}
        slot = plan.num_stages + 1
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

    def cfg_slot(self, stage: int, guided: bool = True) -> int:
        return self.slot(stage - 1 if guided else self.num_stages)

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

    def __init__(self, ws: Workspace, stage_inputs: StageInputs, plan: RequestPlan) -> None:
        self.ws = ws
        self.stage_inputs = stage_inputs
        self.plan = plan
        self.prev = ws.first_prev  # the previous stage's end state
        self.x = ws.x[0]  # the current stage's flow state
        self._written_x = self.x

    def address(self, slot: str, name: str, call: Call) -> int:
        ws = self.ws
        if slot == "noise":
            return ws.noise[call.stage]
        if slot == graphs.STAGE:
            return self.stage_inputs.addresses[call.graph, call.stage][name]
        if slot == "past":
            return ws.cache
        if slot in ("t", "dt"):
            t_slot, dt_slot = ws.time_slot[call.stage][call.step or 0]
            return ws.slot(t_slot if slot == "t" else dt_slot)
        if slot == "cfg":
            return ws.cfg_slot(call.stage, call.guided)
        if slot in ("prev", "x"):
            return int(getattr(self, slot))
        return int(getattr(ws, slot))  # labels, z, image

    def bind(self, call: Call) -> dict[str, int]:
        """The device address of every input and output of ``call``."""
        spec = self.stage_inputs.specs[call.graph]
        bind = {name: self.address(slot, name, call) for name, slot in graphs.feeds(spec).items()}
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
            target = self.ws.cache + self.plan.stage(call.stage).cache_start * self.ws.kv_row
            cuda.copy_device(target, self.ws.kv_out, emitted * self.ws.kv_row, stream)
        if call.ends_stage:
            self.prev = self.x
