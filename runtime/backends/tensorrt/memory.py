"""Device and pinned host memory of the TensorRT backend, and CUDA-event timing.

* :class:`DeviceAllocations` — device buffers owned together and freed together.
* :class:`PinnedBuffers` — page-locked host arrays, the staging area of every copy in and out
  (copies from pageable memory are synchronous and slower; from pinned memory they overlap).
* :class:`SharedScratch` — the one activation buffer every execution context uses. Contexts are
  created with user-managed device memory; they run one at a time on one stream, so a single
  buffer sized to the largest context's need serves them all (instead of one statically
  allocated buffer per context, each sized for its profile's maximum).
* :class:`EventTimer` — CUDA events around engine calls, read after the request's final sync.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.backends.tensorrt import gpu

ADDRESS_ALIGNMENT = 256  # bytes; TensorRT wants 256-byte aligned tensor addresses


def aligned(nbytes: int) -> int:
    return -(-max(1, nbytes) // ADDRESS_ALIGNMENT) * ADDRESS_ALIGNMENT


class DeviceAllocations:
    """Device buffers owned by one object, freed together."""

    def __init__(self, cuda: gpu.CudaDriver) -> None:
        self.cuda = cuda
        self.pointers: list[int] = []
        self.bytes = 0

    def new(self, nbytes: int) -> int:
        size = aligned(nbytes)  # every buffer starts ADDRESS_ALIGNMENT-aligned relative to the next one
        pointer = self.cuda.malloc(size)
        self.pointers.append(pointer)
        self.bytes += size
        return pointer

    def free(self) -> None:
        while self.pointers:
            self.cuda.free(self.pointers.pop())
        self.bytes = 0


class PinnedBuffers:
    """Page-locked host arrays (``cuMemHostAlloc``), freed together."""

    def __init__(self, cuda: gpu.CudaDriver) -> None:
        self.cuda = cuda
        self.pointers: list[int] = []

    def array(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        pointer = self.cuda.host_alloc(aligned(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize))
        self.pointers.append(pointer)
        return gpu.host_array(pointer, shape, dtype)

    def free(self) -> None:
        while self.pointers:
            self.cuda.host_free(self.pointers.pop())


class SharedScratch:
    """One device buffer for the activation memory of every execution context."""

    def __init__(self, cuda: gpu.CudaDriver, nbytes: int) -> None:
        self.cuda = cuda
        self.size = aligned(nbytes) if nbytes > 0 else 0
        self.pointer = cuda.malloc(self.size) if self.size else 0

    def free(self) -> None:
        if self.pointer:
            self.cuda.free(self.pointer)
            self.pointer = 0


class EventTimer:
    """CUDA events recorded around engine calls, read after the request's final sync."""

    def __init__(self, cuda: gpu.CudaDriver) -> None:
        self.cuda = cuda
        self.events: list[int] = []
        self.used = 0

    def mark(self, stream: int) -> int:
        if self.used == len(self.events):
            self.events.append(self.cuda.event_create())
        index = self.used
        self.cuda.event_record(self.events[index], stream)
        self.used += 1
        return index

    def seconds(self, start: int, end: int) -> float:
        return self.cuda.event_elapsed_ms(self.events[start], self.events[end]) / 1000.0

    def reset(self) -> None:
        self.used = 0

    def destroy(self) -> None:
        while self.events:
            self.cuda.event_destroy(self.events.pop())
