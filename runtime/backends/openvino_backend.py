"""OpenVINO backend: the build's very ONNX graphs, compiled for the CPU by OpenVINO (optional extra).

OpenVINO reads the ``.onnx`` files (and their external weights) directly and runs them with its
own CPU kernels, which use AMX / AVX-512 where the CPU has them. Precision stays the build's
choice; what OpenVINO runs at (its ``INFERENCE_PRECISION_HINT``) follows from it:

* fp32 builds run at ``f32`` (OpenVINO's CPU default is bf16 where the CPU has it: it is set
  explicitly, so an fp32 build is an fp32 computation);
* fp16 builds run at the CPU's best half precision: ``bf16`` where the CPU reports BF16, else
  ``f16`` where it reports FP16, else ``f32``; a graph the build marks as not ``bf16_safe``
  (:class:`runtime.manifest.GraphEntry`; the family decides: ECAR's flow step, whose bf16 error took
  ecar-b's worst image cosine to 0.993, and FlowAR's backbone and flow head, 35-48 % of what the labels
  change over a request's 120 steps) skips ``bf16``;
* int8 builds run their Q/DQ-marked products on OpenVINO's integer kernels; the rest of the
  graph at the same half precision as fp16 builds.

``describe()`` reports what each graph was compiled at and the CPU's capabilities.

Threading: one compiled model per graph, created once; every call takes an infer request of
that graph from a pool (created on first need, reused after), so one backend serves any
number of threads and concurrent calls return what sequential calls return. ``threads`` caps
the CPU threads of every compiled model (``INFERENCE_NUM_THREADS``), for replicas sharing a
machine.

A workaround, measured on OpenVINO 2026.4: when the very first inference of a compiled model has
a degenerate shape — an empty input (the backbone's cache at stage 1), or a one-token grid (FlowAR's
flow head, an attention over the stage's tokens, at stage 1: its later stages then come out wrong by
up to 1.9 where ONNX Runtime agrees with torch to 1e-5) — the CPU plugin computes wrong values for
later shapes (its shape-keyed primitive cache; disabling it, ``CPU_RUNTIME_CACHE_CAPACITY=0``, fixes
them and doubles the demo's backbone time). So every new infer request of a graph that runs at more
than one stage first runs one warm-up inference at the last stage it runs at, the largest grid.

Memory: a compiled model's infer request keeps the intermediate buffers of the largest shape it
has run, for every layer of a dynamic-shape graph side by side, and all three graphs keep theirs at
once; and OpenVINO maps each weights file, reads it while compiling and preparing kernels, and then
runs on its own repacked copy. As OpenVINO behaves by itself, ecar-b at batch 8 (fp32) peaked at
5.1 GB where ONNX Runtime peaked at 1.7 GB. Two things bring that down at little cost
(``benchmarks/openvino_memory.py``): the Pipeline cuts large backbone and flow calls along the batch
(:attr:`activation_budget`, :mod:`runtime.sub_batches`; the backbone's buffers after ecar-b's last
stage fall from 3.2 GB to 0.4 GB), and the backend hands the mapped weights' pages back after
compiling, after an infer request's warm-up and after each call at a new shape
(:func:`_mapped_pages_dropper`; 0.7 GB on ecar-b; not measured with the model cache on, which reads
compiled blobs instead):
peak 2.3 GB, 1.6x ONNX Runtime's on the same runtime, 1-3 % slower. With ``release_idle``
(``$ECAR_OPENVINO_RELEASE=1``), when a call of one graph starts, every *other* graph that has no call
in flight and has run since its last release gives its intermediate memory back
(``CompiledModel.release_memory``), and glibc's ``malloc_trim`` returns the freed heap to the system:
peak 1.9 GB (1.4x), but a request takes 4-7 % longer (the buffers are allocated and faulted in
again every stage), about as fast as ONNX Runtime at fp32. So it is off by default, for speed; where
memory is short, turn it on, or use ONNX Runtime. What stays is OpenVINO's own: its repacked weights
(about 1.5x the weights file, after the first calls) and each graph's buffers at a one-sample
call.

Compiled models can be cached on disk (OpenVINO's ``CACHE_DIR``: ``cache_dir`` or
``$ECAR_OPENVINO_CACHE``); off by default: measured on ecar-b, compiling every graph takes 0.6 s,
loading the cached blobs 0.5 s, and the cache is as large as the weights (392 MB).
``ecar-export build --backend openvino`` compiles every graph once (:func:`compile_graph`), so a
graph OpenVINO cannot run fails the build.
"""

from __future__ import annotations

import ctypes
import functools
import os
import queue
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime import graphs
from runtime.errors import BackendUnavailableError, EngineError
from runtime.graphs import Call
from runtime.manifest import Manifest
from runtime.sub_batches import host_activation_budget

CACHE_ENV = "ECAR_OPENVINO_CACHE"  # a directory: OpenVINO keeps compiled blobs there (off when unset)
RELEASE_ENV = "ECAR_OPENVINO_RELEASE"  # "1": release idle graphs' intermediate memory (see the module doc)

INSTALL = "pip install 'ecar-export[openvino]'"


def load_openvino() -> Any:
    """``import openvino``, or :class:`BackendUnavailableError` saying how to get it."""
    try:
        import openvino
    except Exception as exc:  # ImportError, or a broken install
        raise BackendUnavailableError(
            f"OpenVINO is not installed here ({type(exc).__name__}: {exc}); install the 'openvino' extra "
            f"({INSTALL}) or use the onnxruntime backend"
        ) from None
    return openvino


def cpu_capabilities(core: Any) -> list[str]:
    try:
        return [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    except Exception:  # a CPU plugin without the property
        return []


def inference_precision(build_precision: str, capabilities: list[str], bf16_safe: bool = True) -> str:
    """The ``INFERENCE_PRECISION_HINT`` a graph of ``build_precision`` runs at on this CPU."""
    if build_precision == "fp32":
        return "f32"
    if bf16_safe and "BF16" in capabilities:
        return "bf16"
    if "FP16" in capabilities:
        return "f16"
    return "f32"


def _heap_trimmer() -> Callable[[], object]:
    """glibc's ``malloc_trim(0)`` (hands freed heap pages back to the system), or a no-op elsewhere."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return functools.partial(trim, 0)


MADV_PAGEOUT = 21  # Linux >= 5.4 madvise(2): reclaim a range's pages now (a file's clean pages are just freed)


def _mapped_pages_dropper(files: set[str]) -> Callable[[], None]:
    """A function that hands back this process's resident pages of its read-only mappings of ``files``
    (real paths): ``madvise(MADV_PAGEOUT)`` on each. OpenVINO maps a graph's weights file and reads it
    only while it prepares kernels for a new shape (it runs on its own repacked copy), so the mapped pages
    are a second copy of the weights in memory until the kernel reclaims them. Reclaiming them loses
    nothing: a later read faults them in again from the file. ``MADV_PAGEOUT`` rather than
    ``MADV_DONTNEED``: the ranges are read from ``/proc/self/maps`` before they are advised, and should a
    range be unmapped and its addresses reused by another thread in between, a page-out of live memory
    only moves it to swap where DONTNEED would zero it. The price: pages another mapping shares (a second
    backend of the same build in this process, or another process) stay resident. Never raises (a
    cleanup must not fail a call); a no-op where Linux's ``/proc/self/maps`` or glibc's ``madvise`` is
    missing or the kernel predates ``MADV_PAGEOUT``."""
    try:
        madvise = ctypes.CDLL("libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):  # not glibc
        return lambda: None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    wanted = {os.fsencode(path) for path in files}

    def drop() -> None:
        try:
            with open("/proc/self/maps", "rb") as handle:  # paths are bytes: any encoding, spaces included
                lines = handle.read().splitlines()
            for line in lines:
                fields = line.split(maxsplit=5)
                # address range, permissions, offset, device, inode, path ("... (deleted)" once replaced)
                if len(fields) < 6 or b"w" in fields[1] or fields[5].removesuffix(b" (deleted)") not in wanted:
                    continue
                low, high = (int(address, 16) for address in fields[0].split(b"-"))
                madvise(low, high - low, MADV_PAGEOUT)  # EINVAL on an older kernel: the pages simply stay
        except Exception:  # not Linux, or an unexpected maps line: keep the pages, never fail the call
            return

    return drop


def default_cache_dir() -> Path | None:
    explicit = os.environ.get(CACHE_ENV)
    return Path(explicit) if explicit else None


def compile_config(
    precision: str, capabilities: list[str], threads: int | None = None, bf16_safe: bool = True
) -> dict[str, Any]:
    """The CPU plugin configuration a graph of ``precision`` is compiled with."""
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": inference_precision(precision, capabilities, bf16_safe),
        "PERFORMANCE_HINT": "LATENCY",
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


def compile_graph(
    path: str | os.PathLike[str],
    precision: str,
    name: str,
    core: Any = None,
    threads: int | None = None,
    bf16_safe: bool = True,
) -> Any:
    """Read and compile one graph file for the CPU; :class:`EngineError` naming the graph where OpenVINO cannot."""
    ov = load_openvino()
    core = core if core is not None else ov.Core()
    try:
        model = core.read_model(str(path))
        config = compile_config(precision, cpu_capabilities(core), threads, bf16_safe)
        return core.compile_model(model, "CPU", config)
    except Exception as exc:  # OpenVINO raises RuntimeError with its own message
        text = " ".join(str(exc).split())[:600]
        raise EngineError(
            f"OpenVINO {ov.__version__} cannot read or compile graph '{name}' from '{path}': {text}; rebuild the "
            "engines, or use the onnxruntime backend"
        ) from None


class OpenVINOBackend:
    name = "openvino"

    def __init__(
        self,
        manifest: Manifest,
        threads: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        release_idle: bool | None = None,
    ) -> None:
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        ov = load_openvino()
        self.version = str(ov.__version__)
        core = ov.Core()
        self.capabilities = cpu_capabilities(core)
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        if cache is not None:
            try:
                cache.mkdir(parents=True, exist_ok=True)
                core.set_property({"CACHE_DIR": str(cache)})
            except Exception as exc:
                raise BackendUnavailableError(
                    f"cannot use '{cache}' as OpenVINO's model cache ({type(exc).__name__}: {exc}); "
                    f"point {CACHE_ENV} at a writable directory or unset it"
                ) from None
        self.cache_dir = cache
        self.threads = threads
        self.compiled: dict[str, Any] = {}
        self.precision: dict[str, str] = {}
        self.output_index: dict[str, list[int]] = {}  # the contract's outputs, by OpenVINO output port
        self._pools: dict[str, queue.SimpleQueue[Any]] = {}
        self._warm_up: dict[str, dict[str, np.ndarray]] = {}
        self.release_idle = release_idle if release_idle is not None else os.environ.get(RELEASE_ENV) == "1"
        self._in_flight: dict[str, int] = {}  # calls running per graph, guarded by self._graph_locks
        self._holding: dict[str, bool] = {}  # has run since its last release (same lock)
        self._graph_locks: dict[str, threading.Lock] = {}
        self._trim_heap = _heap_trimmer()
        self.activation_budget = host_activation_budget()  # large calls come cut (runtime.sub_batches)
        weights = {os.path.realpath(manifest.path(f)) for entry in manifest.graphs.values() for f in entry.data_files}
        self._drop_mapped_weights = _mapped_pages_dropper(weights)
        self._shapes_run: dict[str, set[tuple[tuple[int, ...], ...]]] = {}  # input shapes each graph has run
        for name, entry in manifest.graphs.items():
            compiled = compile_graph(manifest.path(entry.file), entry.precision, name, core, threads, entry.bf16_safe)
            self.compiled[name] = compiled
            actual = compiled.get_property("INFERENCE_PRECISION_HINT")
            self.precision[name] = actual.to_string() if hasattr(actual, "to_string") else str(actual)
            ports = [set(output.get_names()) for output in compiled.outputs]
            wanted = entry.spec.output_names()
            indices = [next((i for i, names in enumerate(ports) if want in names), -1) for want in wanted]
            if -1 in indices:
                found = sorted(n for names in ports for n in names)
                raise EngineError(
                    f"graph '{name}' compiled by OpenVINO has outputs {found}, the contract says {wanted}; "
                    "rebuild the engines"
                )
            self.output_index[name] = indices
            self._pools[name] = queue.SimpleQueue()
            self._shapes_run[name] = set()
            self._in_flight[name] = 0
            self._holding[name] = False
            self._graph_locks[name] = threading.Lock()
            stages = manifest.plan.graph_stages(entry.spec.kind)
            if len(stages) > 1:  # its first stage's shapes are degenerate (module doc)
                self._warm_up[name] = _warm_up_feeds(entry.spec, manifest, stages[-1])
        self._drop_mapped_weights()  # compiling read every weight into OpenVINO's own copy

    def _request(self, graph: str) -> Any:
        try:
            return self._pools[graph].get_nowait()
        except queue.Empty:
            request = self.compiled[graph].create_infer_request()
            if graph in self._warm_up:  # see the module doc: never an empty input first
                request.infer(self._warm_up[graph])
                self._drop_mapped_weights()  # its kernels may have read the weights files
            return request

    def run(self, call: Call, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        graph, request = call.graph, None
        if graph not in self._graph_locks:
            raise EngineError(f"this build has no graph '{graph}'")
        if self.release_idle:  # the bookkeeping only the release needs stays off the default path
            self._release_others(graph)
            with self._graph_locks[graph]:  # a release never overlaps a call of its graph
                self._in_flight[graph] += 1
                self._holding[graph] = True
        try:
            request = self._request(graph)  # creating one (and its warm-up) can fail too
            request.infer({name: np.ascontiguousarray(value) for name, value in feeds.items()})
            outputs = [np.array(request.get_output_tensor(i).data, copy=True) for i in self.output_index[graph]]
            shapes = tuple(np.shape(value) for value in feeds.values())
            if shapes not in self._shapes_run[graph]:  # kernels made for a new shape: the weights file was read
                self._shapes_run[graph].add(shapes)
                self._drop_mapped_weights()
            return outputs
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"OpenVINO failed to run graph '{graph}': {' '.join(str(exc).split())[:600]}") from None
        finally:
            if request is not None:
                self._pools[graph].put(request)
            if self.release_idle:
                with self._graph_locks[graph]:
                    self._in_flight[graph] -= 1

    def _release_others(self, graph: str) -> None:
        """Release the intermediate memory of every other graph that holds some and has no call in flight."""
        released = False
        for other, lock in self._graph_locks.items():
            if other == graph:
                continue
            with lock:
                if not self._holding[other] or self._in_flight[other]:
                    continue
                self._holding[other] = False
                try:
                    self.compiled[other].release_memory()
                    released = True
                except Exception:  # an OpenVINO without it, or one that cannot release now: keep the buffers
                    pass
        if released:
            self._trim_heap()

    def describe(self) -> dict[str, object]:
        return {
            "backend": self.name,
            "openvino": self.version,
            "device": "CPU",
            "inference_precision": dict(self.precision),
            "cpu_capabilities": list(self.capabilities),
            "threads": self.threads,
            "cache_dir": str(self.cache_dir) if self.cache_dir else None,
            "release_idle": self.release_idle,
            "activation_budget": self.activation_budget,
        }


def _warm_up_feeds(spec: graphs.GraphSpec, manifest: Manifest, stage: int) -> dict[str, np.ndarray]:
    """Inputs of one call of ``spec`` at ``stage``, batch 1 (zeros; the stage's own constants)."""
    dims = manifest.plan.dims(stage, 1)
    constants = manifest.constants.get(spec.name, stage)
    return {
        t.name: np.array(constants[t.name]) if t.name in constants else np.zeros(t.concrete(dims), np.dtype(t.dtype))
        for t in spec.inputs
    }
