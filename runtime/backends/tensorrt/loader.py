"""Import TensorRT, name the CUDA build it needs, own its logger, and create runtimes.

``import tensorrt`` happens inside :func:`load_tensorrt`, never at import time. Every way
TensorRT can fail to start — not installed, only its type stubs, a CUDA build newer than the
driver, no usable GPU behind ``trt.Runtime`` — becomes a :class:`BackendUnavailableError`
that says what to do.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import threading
from collections import deque
from types import ModuleType
from typing import TYPE_CHECKING, Any

from runtime.errors import BackendUnavailableError

if TYPE_CHECKING:  # the stubs (tensorrt-stubs) type these where installed; Any otherwise
    import tensorrt as trt

LOG = logging.getLogger("ecar.tensorrt")
LOG_TAIL = 25
INSTALL = "install the 'tensorrt' extra (pip install 'ecar-export[tensorrt]') on a machine with an NVIDIA GPU"
# Oldest Linux driver branch per CUDA major version (CUDA's release notes, "minor version
# compatibility"): what a TensorRT build for that CUDA major needs.
DRIVER_BRANCH = {11: "R450", 12: "R525", 13: "R580"}
_CUDA_DIST = re.compile(r"^tensorrt[-_]cu(\d+)(?:[-_].*)?$")


def load_tensorrt() -> ModuleType:
    """``import tensorrt``, or :class:`BackendUnavailableError` saying how to get it.

    A stubs-only install (``tensorrt-stubs`` without TensorRT) imports as an empty namespace
    package; that is treated as "not installed".
    """
    try:
        import tensorrt

        module: ModuleType = tensorrt
    except Exception as exc:  # ImportError, or OSError/RuntimeError from a broken install
        raise BackendUnavailableError(
            f"TensorRT is not importable here ({type(exc).__name__}: {exc}); {INSTALL}, or use the onnxruntime backend"
        ) from None
    if not isinstance(getattr(module, "__version__", None), str) or not hasattr(module, "Builder"):
        raise BackendUnavailableError(
            f"TensorRT is not installed (the 'tensorrt' module found here is only type stubs); {INSTALL}, or use "
            "the onnxruntime backend"
        )
    return module


def tensorrt_version() -> str | None:
    """The installed TensorRT's version, or None where TensorRT cannot be imported."""
    try:
        return str(load_tensorrt().__version__)
    except BackendUnavailableError:
        return None


def tensorrt_major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def tensorrt_cuda_major() -> int | None:
    """The CUDA major version the installed TensorRT wheels were built for, or None if unknown.

    NVIDIA publishes one wheel family per CUDA major (``tensorrt-cu12``, ``tensorrt-cu13`` and
    their ``-libs`` / ``-bindings``); the plain ``tensorrt`` package pulls in one of them.
    """
    majors = set()
    for dist in importlib.metadata.distributions():
        name = str(dist.name or "").lower()
        match = _CUDA_DIST.match(name)
        if match:
            majors.add(int(match.group(1)))
    return max(majors) if len(majors) == 1 else None


def check_driver(cuda_major: int | None, driver_version: int, tensorrt: str) -> None:
    """Refuse a TensorRT build whose CUDA major is newer than what the driver supports.

    ``driver_version`` is ``cuDriverGetVersion``'s value (12080: the driver runs CUDA up to
    12.8). A CUDA 13 build of TensorRT needs an R580 or newer driver, and would otherwise fail
    deep inside its first call with an opaque error.
    """
    if cuda_major is None or driver_version <= 0:
        return
    supported = (driver_version // 1000, (driver_version % 1000) // 10)
    if supported[0] >= cuda_major:
        return
    branch = DRIVER_BRANCH.get(cuda_major, f"a CUDA {cuda_major} driver")
    raise BackendUnavailableError(
        f"TensorRT {tensorrt} is built for CUDA {cuda_major} and needs an NVIDIA driver for CUDA {cuda_major}.0 or "
        f"newer ({branch} or later), but this machine's driver supports CUDA {supported[0]}.{supported[1]}; "
        f"update the driver, or install the TensorRT build for CUDA {supported[0]} "
        f"(pip install 'tensorrt-cu{supported[0]}=={tensorrt}')"
    )


class LogBook:
    """The TensorRT log of this process, kept so errors can show what TensorRT said."""

    def __init__(self, size: int = 4000) -> None:
        self._lines: deque[tuple[int, str, str]] = deque(maxlen=size)
        self._count = 0
        self._lock = threading.Lock()

    def add(self, severity: str, message: str) -> None:
        with self._lock:
            self._count += 1
            self._lines.append((self._count, severity, message))

    def mark(self) -> int:
        with self._lock:
            return self._count

    def since(self, mark: int, limit: int = LOG_TAIL) -> list[str]:
        """The last ``limit`` messages logged after ``mark`` (warnings and errors first choice)."""
        with self._lock:
            lines = [(sev, msg) for number, sev, msg in self._lines if number > mark]
        important = [f"[{sev}] {msg}" for sev, msg in lines if sev in ("ERROR", "INTERNAL_ERROR", "WARNING")]
        chosen = important or [f"[{sev}] {msg}" for sev, msg in lines]
        return chosen[-limit:]


_LOGGER: Any = None
_LOGGER_LOCK = threading.Lock()
_PY_LEVELS = {
    "INTERNAL_ERROR": logging.ERROR,
    "ERROR": logging.ERROR,
    "WARNING": logging.WARNING,
    "INFO": logging.INFO,
}


def tensorrt_logger(trt_module: ModuleType) -> tuple[trt.ILogger, LogBook]:
    """The process-wide capturing ``trt.ILogger`` and its :class:`LogBook`.

    One instance per process: TensorRT keeps the logger given to the first Builder/Runtime and
    ignores (with a warning) any other one passed later.
    """
    global _LOGGER
    with _LOGGER_LOCK:
        if _LOGGER is None:
            base = trt_module.ILogger

            class CapturingLogger(base):  # type: ignore[misc, valid-type]
                def __init__(self) -> None:
                    base.__init__(self)
                    self.book = LogBook()

                def log(self, severity: Any, msg: str) -> None:
                    name = str(getattr(severity, "name", severity)).rsplit(".", 1)[-1]
                    if name == "VERBOSE":
                        return
                    self.book.add(name, msg)
                    LOG.log(_PY_LEVELS.get(name, logging.DEBUG), "TensorRT: %s", msg)

            _LOGGER = CapturingLogger()
        return _LOGGER, _LOGGER.book


def log_tail_text(book: LogBook, mark: int) -> str:
    tail = book.since(mark)
    return ("\nTensorRT log (last messages):\n  " + "\n  ".join(tail)) if tail else ""


def cannot_start(what: str, exc: BaseException, book: LogBook, mark: int) -> BackendUnavailableError:
    """The error for a TensorRT object that could not be created (CUDA did not start)."""
    return BackendUnavailableError(
        f"TensorRT cannot start CUDA here: {what} failed ({type(exc).__name__}: {exc}); check that the NVIDIA "
        "driver works (nvidia-smi), that CUDA_VISIBLE_DEVICES names a GPU and that the GPU has free memory, or use "
        "the onnxruntime backend" + log_tail_text(book, mark)
    )


def create_runtime(trt_module: ModuleType) -> trt.Runtime:
    """``trt.Runtime(logger)``; where CUDA cannot start, a :class:`BackendUnavailableError`.

    TensorRT's bindings raise ``TypeError: ... factory function returned nullptr`` when the
    runtime cannot initialise CUDA (no driver, no visible GPU, out of memory).
    """
    runtime: trt.Runtime = _create(trt_module, "Runtime")
    return runtime


def create_builder(trt_module: ModuleType) -> trt.Builder:
    """``trt.Builder(logger)``, with the same error handling as :func:`create_runtime`."""
    builder: trt.Builder = _create(trt_module, "Builder")
    return builder


def _create(trt_module: ModuleType, kind: str) -> Any:
    logger, book = tensorrt_logger(trt_module)
    mark = book.mark()
    try:
        made = getattr(trt_module, kind)(logger)
    except Exception as exc:
        raise cannot_start(f"creating a trt.{kind}", exc, book, mark) from None
    if made is None:
        raise cannot_start(f"creating a trt.{kind}", RuntimeError("returned None"), book, mark)
    return made
