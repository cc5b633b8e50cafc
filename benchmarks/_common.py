"""Helpers shared by the benchmark scripts: machine record, load average, benchmark weights, cache dir, JSON output."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
# Trained baselines and exported builds that reruns reuse (gitignored).
CACHE = Path(__file__).resolve().parent / ".cache"

# A run that starts with a 1-minute load average above this is not a quiet run (stderr and ``"quiet": false``).
QUIET_LOAD = 0.3
PACKAGES = ("torch", "onnxruntime", "openvino", "onnx", "numpy")
# the instruction sets that decide which half-precision and integer kernels a CPU backend can use
CPU_FEATURES = (
    "fma",
    "avx2",
    "avx_vnni",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
)
# environment variables that set thread counts, spinning, pinning or the kernels' instruction set
THREAD_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "OMP_PROC_BIND",
    "OMP_PLACES",
    "OMP_DYNAMIC",
    "MKL_DYNAMIC",
    "GOMP_SPINCOUNT",
    "DNNL_MAX_CPU_ISA",
    "ONEDNN_MAX_CPU_ISA",
    "ORT_DISABLE_SPINNING",
)


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def _cpuinfo_blocks() -> list[dict[str, str]]:
    """``/proc/cpuinfo`` as one dict per logical CPU (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    blocks = []
    for chunk in text.strip().split("\n\n"):
        block = {}
        for line in chunk.splitlines():
            if ":" in line:
                key, value = line.split(":", 1)
                block[key.strip()] = value.strip()
        if block:
            blocks.append(block)
    return blocks


def cpu_model() -> str | None:
    blocks = _cpuinfo_blocks()
    return blocks[0].get("model name") if blocks else None


def cpu_flags() -> set[str]:
    blocks = _cpuinfo_blocks()
    return set(blocks[0].get("flags", "").split()) if blocks else set()


def cpu_features() -> list[str]:
    """Which of ``CPU_FEATURES`` this CPU reports (``/proc/cpuinfo`` flags; empty elsewhere)."""
    flags = cpu_flags()
    return [name for name in CPU_FEATURES if name in flags]


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def caches() -> list[dict[str, Any]]:
    """cpu0's caches from ``/sys/devices/system/cpu/cpu0/cache/index*``: level, type, size, which CPUs share it."""
    found = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        entry: dict[str, Any] = {}
        for name in ("level", "type", "size", "shared_cpu_list"):
            try:
                entry[name] = (index / name).read_text().strip()
            except OSError:
                entry[name] = None
        entry["level"] = _int(entry["level"])
        found.append(entry)
    return found


def max_mhz() -> float | None:
    """The CPU's maximum clock (``cpufreq/cpuinfo_max_freq``), where the kernel exposes it (often not in VMs)."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000
    except (OSError, ValueError):
        return None


def cpu() -> dict[str, Any]:
    """What identifies the CPU: vendor, family/model/stepping, name, clock, cores, threads, caches, flags."""
    blocks = _cpuinfo_blocks()
    first = blocks[0] if blocks else {}
    cores = {(b.get("physical id", "0"), b.get("core id")) for b in blocks if "core id" in b}
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    return {
        "vendor": first.get("vendor_id"),
        "family": _int(first.get("cpu family")),
        "model": _int(first.get("model")),
        "stepping": _int(first.get("stepping")),
        "model_name": first.get("model name"),
        "mhz": _float(first.get("cpu MHz")),
        "max_mhz": max_mhz(),
        "physical_cores": len(cores) or _int(first.get("cpu cores")),
        "logical_threads": len(blocks) or os.cpu_count(),
        "usable_threads": usable,
        "sockets": len({b.get("physical id") for b in blocks if "physical id" in b}) or None,
        "cache_size_cpuinfo": first.get("cache size"),
        "caches": caches(),
        "hypervisor": "hypervisor" in first.get("flags", "").split(),
        "features": cpu_features(),
    }


def torch_config() -> dict[str, Any] | None:
    """torch's BLAS, OpenMP and oneDNN as built (``torch.__config__.show()``) and its thread settings."""
    try:
        import torch
    except ImportError:
        return None
    show, parallel = torch.__config__.show(), torch.__config__.parallel_info()

    def line(pattern: str, text: str) -> str | None:
        match = re.search(pattern, text)
        return match.group(0).strip(" -\t") if match else None

    settings = dict(re.findall(r"(BLAS_INFO|LAPACK_INFO|USE_MKL|USE_MKLDNN|USE_OPENMP)=([^,\s]*)", show))
    return {
        "blas": settings.get("BLAS_INFO"),
        "lapack": settings.get("LAPACK_INFO"),
        "use_mkl": settings.get("USE_MKL"),
        "use_mkldnn": settings.get("USE_MKLDNN"),
        "openmp": line(r"OpenMP [^\n]*", show),
        "mkl": line(r"Intel\(R\) oneAPI Math Kernel Library[^\n]*|Intel\(R\) Math Kernel Library[^\n]*", show),
        "onednn": line(r"Intel\(R\) MKL-DNN[^\n]*|oneDNN[^\n]*", show),
        "cpu_capability": line(r"CPU capability usage: [^\n]*", show),
        "parallel_backend": line(r"ATen parallel backend: [^\n]*", parallel),
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
    }


def thread_environment() -> dict[str, str]:
    """The thread/OpenMP variables set in this process's environment (``KMP_*`` included); unset ones left out."""
    return {key: value for key, value in sorted(os.environ.items()) if key in THREAD_ENV or key.startswith("KMP_")}


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (the machine is shared: a high value means noisy timings)."""
    return [round(v, 2) for v in os.getloadavg()]


# The load when the benchmark started: when this module was imported, or at begin_run().
_start: dict[str, Any] = {"load_average_at_start": load_average(), "warned": False}


def begin_run(threshold: float = QUIET_LOAD) -> dict[str, Any]:
    """Record the load average now as the run's start; say on stderr if the machine is not quiet.

    Returns ``{"load_average_at_start": [1, 5, 15 min], "quiet": bool}``; :func:`machine` reports the same.
    """
    _start.update(load_average_at_start=load_average(), warned=False, threshold=threshold)
    return _quiet_check()


def _quiet_check() -> dict[str, Any]:
    load = _start["load_average_at_start"]
    threshold = _start.get("threshold", QUIET_LOAD)
    quiet = load[0] <= threshold
    if not quiet and not _start["warned"]:
        _start["warned"] = True
        print(
            f"warning: not a quiet run: the 1-minute load average was {load[0]} at the start (> {threshold}); "
            'timings will be noisy and the JSON says "quiet": false',
            file=sys.stderr,
            flush=True,
        )
    return {"load_average_at_start": load, "quiet": quiet}


def machine() -> dict[str, Any]:
    """The machine record of a result JSON: CPU, libraries, threads, load at the start (and now, its end)."""
    start = _quiet_check()
    info = cpu()
    return {
        # the keys of earlier results
        "cpu_count": os.cpu_count(),
        "cpu_model": info["model_name"],
        "cpu_features": info["features"],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions(),
        # what identifies the machine and its settings
        "cpu": info,
        "torch_config": torch_config(),
        "thread_environment": thread_environment(),
        "load_average_at_start": start["load_average_at_start"],
        "load_average_at_end": load_average(),
        "quiet": start["quiet"],
        "quiet_threshold": _start.get("threshold", QUIET_LOAD),
    }


# ------------------------------------------------------------------------------------------ weights
BENCHMARK_WEIGHT_STD = 0.02
BENCHMARK_BIAS_STD = 0.01
BENCHMARK_WEIGHTS = (
    f"random init (torch seed 0), every all-zero tensor re-drawn: N(0, {BENCHMARK_WEIGHT_STD}) weights, "
    f"N(0, {BENCHMARK_BIAS_STD}) biases; no zero tensors"
)


def zero_fraction(model: Any) -> float:
    """Fraction of the model's parameter values that are exactly zero."""
    total = zeros = 0
    for param in model.parameters():
        total += param.numel()
        zeros += int((param == 0).sum())
    return zeros / max(total, 1)


def benchmark_weights(model: Any, seed: int = 0) -> dict[str, Any]:
    """Give a random-init model a trained model's scale where its init put zero tensors; in place.

    The presets start DiT-style: zero AdaLN gates, zero output layers and zero biases (37 % of a
    random-init ``ecar-b``'s values). An engine folds such products away (OpenVINO does), which
    flatters its speed. Every parameter that is entirely zero is re-drawn, seeded: matrices (and
    embeddings) from N(0, 0.02), vectors from N(0, 0.01). Returns what the JSON records about it.
    """
    import torch

    before = zero_fraction(model)
    generator = torch.Generator().manual_seed(seed)
    redrawn = 0
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() and not param.any():
                std = BENCHMARK_WEIGHT_STD if param.ndim >= 2 else BENCHMARK_BIAS_STD
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * std)
                redrawn += 1
    return {
        "weights": BENCHMARK_WEIGHTS,
        "weights_seed": seed,
        "zero_fraction_before": before,
        "zero_fraction": zero_fraction(model),
        "tensors_redrawn": redrawn,
    }


def benchmark_model(preset: str, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A preset to benchmark, in eval mode: trained weights as they are, random inits via :func:`benchmark_weights`."""
    from ecar_export import presets

    model = presets.load(preset).eval()
    if preset in presets.TRAINED:
        return model, {"weights": "trained (bundled)", "zero_fraction": zero_fraction(model)}
    return model, benchmark_weights(model, seed)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=lambda v: np.asarray(v).tolist()) + "\n")
    print(f"\nwrote {path}")
