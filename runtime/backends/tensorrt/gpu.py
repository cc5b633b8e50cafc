"""Torch-free access to NVIDIA GPUs through the CUDA driver API (``libcuda.so.1``, via ctypes).

Why the driver API and not polygraphy.cuda or cuda-python: ``libcuda.so.1`` ships with the
NVIDIA driver, which TensorRT needs anyway, whereas the CUDA *runtime* library that
polygraphy.cuda loads (``libcudart``) is not part of TensorRT's pip wheels, and cuda-python
must match the CUDA major version of the installed TensorRT. The driver API's C ABI has been
stable for a decade; every symbol used here exists from CUDA 11.4 drivers on. TensorRT uses
the CUDA runtime internally, which works on the device's *primary* context; this module
retains that same primary context and makes it current, so buffers, streams and events made
here are the ones TensorRT sees.

What is here: GPU facts for manifests and compatibility checks (:func:`gpu_info`), and a thin
:class:`CudaDriver` with device memory, host<->device copies, streams, events and stream
capture into CUDA graphs — the few calls the TensorRT backend needs. Device pointers, streams,
events and graphs are plain ``int`` handles.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.errors import BackendUnavailableError, EngineError

# CUresult codes that mean "no usable GPU here" rather than a bug.
_NO_DEVICE_CODES = {
    3: "CUDA_ERROR_NOT_INITIALIZED",
    35: "CUDA_ERROR_INSUFFICIENT_DRIVER",
    100: "CUDA_ERROR_NO_DEVICE",
    101: "CUDA_ERROR_INVALID_DEVICE",
    999: "CUDA_ERROR_UNKNOWN",
}
_ATTR_CC_MAJOR = 75  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
_ATTR_CC_MINOR = 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
STREAM_NON_BLOCKING = 1  # CU_STREAM_NON_BLOCKING: no implicit sync with the legacy default stream
CAPTURE_MODE_THREAD_LOCAL = 1  # CU_STREAM_CAPTURE_MODE_THREAD_LOCAL

_P = ctypes.c_void_p
_SIZE = ctypes.c_size_t
_INT = ctypes.c_int
_UINT = ctypes.c_uint


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device as the driver reports it."""

    index: int
    name: str
    compute_capability: str  # "9.0"
    total_memory: int  # bytes
    driver_version: int  # e.g. 12080 for CUDA 12.8

    def to_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "name": self.name,
            "compute_capability": self.compute_capability,
            "total_memory": self.total_memory,
            "driver_version": self.driver_version,
        }


def host_array(pointer: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """A numpy array over ``pointer`` (host memory, e.g. from :meth:`CudaDriver.host_alloc`); no copy."""
    count = int(np.prod(shape, dtype=np.int64))
    raw = (ctypes.c_uint8 * (count * dtype.itemsize)).from_address(pointer)
    array: np.ndarray = np.frombuffer(memoryview(raw), dtype=dtype, count=count).reshape(shape)
    return array


def parse_compute_capability(value: str) -> tuple[int, int]:
    """``"8.6"`` -> ``(8, 6)``; raises ``ValueError`` for anything else."""
    major, sep, minor = str(value).strip().partition(".")
    if not sep or not major.isdigit() or not minor.isdigit():
        raise ValueError(f"compute capability must look like '8.6', got {value!r}")
    return int(major), int(minor)


class CudaDriver:
    """ctypes bindings of the CUDA driver API calls the runtime uses; one instance per process.

    Every method raises :class:`EngineError` (or :class:`BackendUnavailableError` while
    initialising) with the driver's error name on failure.
    """

    def __init__(self, library: str | None = None) -> None:
        lib = None
        errors = []
        for name in [library] if library else ["libcuda.so.1", "libcuda.so", None]:
            name = name or ctypes.util.find_library("cuda")  # the slow search only when the usual names fail
            if not name:
                continue
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError as exc:
                errors.append(str(exc))
        if lib is None:
            raise BackendUnavailableError(
                "no NVIDIA driver here (libcuda.so.1 cannot be loaded: "
                f"{'; '.join(errors) or 'not found'}); TensorRT needs an NVIDIA GPU and its driver"
            )
        self.lib = lib
        self._declare()
        status = self.lib.cuInit(0)
        if status != 0:
            raise BackendUnavailableError(
                f"the NVIDIA driver found no usable GPU (cuInit: {self.error_name(status)}); "
                "check nvidia-smi and CUDA_VISIBLE_DEVICES"
            )
        self._contexts: dict[int, int] = {}
        self._context_lock = threading.Lock()

    def _declare(self) -> None:
        signatures: dict[str, list[type]] = {
            "cuInit": [_UINT],
            "cuDriverGetVersion": [ctypes.POINTER(_INT)],
            "cuDeviceGetCount": [ctypes.POINTER(_INT)],
            "cuDeviceGet": [ctypes.POINTER(_INT), _INT],
            "cuDeviceGetName": [ctypes.c_char_p, _INT, _INT],
            "cuDeviceGetAttribute": [ctypes.POINTER(_INT), _INT, _INT],
            "cuDeviceTotalMem_v2": [ctypes.POINTER(_SIZE), _INT],
            "cuDevicePrimaryCtxRetain": [ctypes.POINTER(_P), _INT],
            "cuCtxSetCurrent": [_P],
            "cuCtxGetCurrent": [ctypes.POINTER(_P)],
            "cuMemAlloc_v2": [ctypes.POINTER(ctypes.c_uint64), _SIZE],
            "cuMemFree_v2": [ctypes.c_uint64],
            "cuMemHostAlloc": [ctypes.POINTER(_P), _SIZE, _UINT],
            "cuMemFreeHost": [_P],
            "cuMemcpyHtoDAsync_v2": [ctypes.c_uint64, _P, _SIZE, _P],
            "cuMemcpyDtoHAsync_v2": [_P, ctypes.c_uint64, _SIZE, _P],
            "cuMemcpyDtoDAsync_v2": [ctypes.c_uint64, ctypes.c_uint64, _SIZE, _P],
            "cuMemsetD8Async": [ctypes.c_uint64, ctypes.c_ubyte, _SIZE, _P],
            "cuStreamCreate": [ctypes.POINTER(_P), _UINT],
            "cuStreamSynchronize": [_P],
            "cuStreamDestroy_v2": [_P],
            "cuEventCreate": [ctypes.POINTER(_P), _UINT],
            "cuEventRecord": [_P, _P],
            "cuEventSynchronize": [_P],
            "cuEventElapsedTime": [ctypes.POINTER(ctypes.c_float), _P, _P],
            "cuEventDestroy_v2": [_P],
            "cuStreamBeginCapture_v2": [_P, _INT],
            "cuStreamEndCapture": [_P, ctypes.POINTER(_P)],
            "cuGraphInstantiateWithFlags": [ctypes.POINTER(_P), _P, ctypes.c_ulonglong],
            "cuGraphLaunch": [_P, _P],
            "cuGraphExecDestroy": [_P],
            "cuGraphDestroy": [_P],
            "cuGetErrorName": [_INT, ctypes.POINTER(ctypes.c_char_p)],
        }
        for name, argtypes in signatures.items():
            function = getattr(self.lib, name, None)
            if function is None:
                raise BackendUnavailableError(
                    f"the NVIDIA driver is too old: libcuda lacks '{name}'; update the driver (CUDA 11.4 or newer)"
                )
            function.argtypes = argtypes
            function.restype = _INT

    # ------------------------------------------------------------------ errors
    def error_name(self, status: int) -> str:
        text = ctypes.c_char_p()
        if self.lib.cuGetErrorName(status, ctypes.byref(text)) == 0 and text.value:
            return f"{text.value.decode(errors='replace')} ({status})"
        return _NO_DEVICE_CODES.get(status, f"CUresult {status}")

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise EngineError(f"CUDA call {what} failed: {self.error_name(status)}")

    # ----------------------------------------------------------------- devices
    def device_count(self) -> int:
        count = _INT()
        self.check(self.lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
        return count.value

    def _device(self, index: int) -> int:
        count = self.device_count()
        if not 0 <= index < count:
            raise BackendUnavailableError(
                f"GPU index {index} does not exist: the driver sees {count} GPU(s) (check CUDA_VISIBLE_DEVICES)"
            )
        handle = _INT()
        self.check(self.lib.cuDeviceGet(ctypes.byref(handle), index), "cuDeviceGet")
        return handle.value

    def info(self, index: int = 0) -> GpuInfo:
        device = self._device(index)
        name = ctypes.create_string_buffer(256)
        self.check(self.lib.cuDeviceGetName(name, len(name), device), "cuDeviceGetName")
        major, minor, version = _INT(), _INT(), _INT()
        self.check(self.lib.cuDeviceGetAttribute(ctypes.byref(major), _ATTR_CC_MAJOR, device), "cuDeviceGetAttribute")
        self.check(self.lib.cuDeviceGetAttribute(ctypes.byref(minor), _ATTR_CC_MINOR, device), "cuDeviceGetAttribute")
        memory = _SIZE()
        self.check(self.lib.cuDeviceTotalMem_v2(ctypes.byref(memory), device), "cuDeviceTotalMem")
        self.check(self.lib.cuDriverGetVersion(ctypes.byref(version)), "cuDriverGetVersion")
        return GpuInfo(
            index=index,
            name=name.value.decode(errors="replace").strip(),
            compute_capability=f"{major.value}.{minor.value}",
            total_memory=int(memory.value),
            driver_version=int(version.value),
        )

    def use_device(self, index: int) -> None:
        """Make device ``index``'s primary context current in the calling thread (cheap; call per thread)."""
        with self._context_lock:
            context = self._contexts.get(index)
            if context is None:
                handle = _P()
                self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(handle), self._device(index)), "retain")
                context = int(handle.value or 0)
                self._contexts[index] = context
        self.check(self.lib.cuCtxSetCurrent(_P(context)), "cuCtxSetCurrent")

    # ------------------------------------------------------------------ memory
    def malloc(self, nbytes: int) -> int:
        pointer = ctypes.c_uint64()
        self.check(self.lib.cuMemAlloc_v2(ctypes.byref(pointer), max(1, int(nbytes))), f"cuMemAlloc({nbytes} B)")
        return int(pointer.value)

    def free(self, pointer: int) -> None:
        if pointer:
            self.check(self.lib.cuMemFree_v2(pointer), "cuMemFree")

    def host_alloc(self, nbytes: int) -> int:
        """Page-locked (pinned) host memory: copies from and to it run asynchronously and at full speed."""
        pointer = _P()
        self.check(
            self.lib.cuMemHostAlloc(ctypes.byref(pointer), max(1, int(nbytes)), 0), f"cuMemHostAlloc({nbytes} B)"
        )
        return int(pointer.value or 0)

    def host_free(self, pointer: int) -> None:
        if pointer:
            self.check(self.lib.cuMemFreeHost(_P(pointer)), "cuMemFreeHost")

    def copy_to_device(self, pointer: int, array: np.ndarray, stream: int) -> None:
        """Host -> device, ordered on ``stream``. ``array`` must stay alive until the stream syncs."""
        if not array.flags.c_contiguous:
            raise EngineError("internal error: host array for a device copy is not contiguous")
        if array.nbytes:
            self.check(
                self.lib.cuMemcpyHtoDAsync_v2(pointer, array.ctypes.data, array.nbytes, _P(stream)), "cuMemcpyHtoD"
            )

    def copy_to_host(self, array: np.ndarray, pointer: int, stream: int) -> None:
        """Device -> host into ``array`` (C-contiguous, writable), ordered on ``stream``."""
        if not array.flags.c_contiguous or not array.flags.writeable:
            raise EngineError("internal error: host array for a device copy is not contiguous and writable")
        if array.nbytes:
            self.check(
                self.lib.cuMemcpyDtoHAsync_v2(array.ctypes.data, pointer, array.nbytes, _P(stream)), "cuMemcpyDtoH"
            )

    def copy_device(self, destination: int, source: int, nbytes: int, stream: int) -> None:
        if nbytes:
            self.check(self.lib.cuMemcpyDtoDAsync_v2(destination, source, nbytes, _P(stream)), "cuMemcpyDtoD")

    def memset(self, pointer: int, value: int, nbytes: int, stream: int) -> None:
        if nbytes:
            self.check(self.lib.cuMemsetD8Async(pointer, value, nbytes, _P(stream)), "cuMemsetD8")

    # ------------------------------------------------------------------ streams
    def stream_create(self) -> int:
        handle = _P()
        self.check(self.lib.cuStreamCreate(ctypes.byref(handle), STREAM_NON_BLOCKING), "cuStreamCreate")
        return int(handle.value or 0)

    def stream_synchronize(self, stream: int) -> None:
        self.check(self.lib.cuStreamSynchronize(_P(stream)), "cuStreamSynchronize")

    def stream_destroy(self, stream: int) -> None:
        if stream:
            self.check(self.lib.cuStreamDestroy_v2(_P(stream)), "cuStreamDestroy")

    # ------------------------------------------------------------------- events
    def event_create(self) -> int:
        handle = _P()
        self.check(self.lib.cuEventCreate(ctypes.byref(handle), 0), "cuEventCreate")
        return int(handle.value or 0)

    def event_record(self, event: int, stream: int) -> None:
        self.check(self.lib.cuEventRecord(_P(event), _P(stream)), "cuEventRecord")

    def event_elapsed_ms(self, start: int, end: int) -> float:
        """Milliseconds between two recorded, completed events."""
        value = ctypes.c_float()
        self.check(self.lib.cuEventElapsedTime(ctypes.byref(value), _P(start), _P(end)), "cuEventElapsedTime")
        return float(value.value)

    def event_destroy(self, event: int) -> None:
        if event:
            self.check(self.lib.cuEventDestroy_v2(_P(event)), "cuEventDestroy")

    # ------------------------------------------------------------- CUDA graphs
    def begin_capture(self, stream: int) -> None:
        self.check(self.lib.cuStreamBeginCapture_v2(_P(stream), CAPTURE_MODE_THREAD_LOCAL), "cuStreamBeginCapture")

    def end_capture(self, stream: int) -> int:
        graph = _P()
        self.check(self.lib.cuStreamEndCapture(_P(stream), ctypes.byref(graph)), "cuStreamEndCapture")
        return int(graph.value or 0)

    def graph_instantiate(self, graph: int) -> int:
        executable = _P()
        self.check(self.lib.cuGraphInstantiateWithFlags(ctypes.byref(executable), _P(graph), 0), "cuGraphInstantiate")
        return int(executable.value or 0)

    def graph_launch(self, executable: int, stream: int) -> None:
        self.check(self.lib.cuGraphLaunch(_P(executable), _P(stream)), "cuGraphLaunch")

    def graph_destroy(self, graph: int = 0, executable: int = 0) -> None:
        if executable:
            self.check(self.lib.cuGraphExecDestroy(_P(executable)), "cuGraphExecDestroy")
        if graph:
            self.check(self.lib.cuGraphDestroy(_P(graph)), "cuGraphDestroy")


_DRIVER: CudaDriver | None = None
_DRIVER_LOCK = threading.Lock()


def driver() -> CudaDriver:
    """The process-wide :class:`CudaDriver`; raises :class:`BackendUnavailableError` without a GPU."""
    global _DRIVER
    with _DRIVER_LOCK:
        if _DRIVER is None:
            _DRIVER = CudaDriver()
        return _DRIVER


def gpu_info(index: int = 0) -> GpuInfo:
    """Name, compute capability and memory of GPU ``index``; :class:`BackendUnavailableError` without one."""
    return driver().info(index)


def gpu_available() -> bool:
    """True when the NVIDIA driver loads and reports at least one GPU."""
    try:
        return driver().device_count() > 0
    except (BackendUnavailableError, EngineError):
        return False
