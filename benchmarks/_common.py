"""Helpers shared by the benchmark scripts: machine description, load average, cache dir, JSON output."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
# Trained baselines and exported builds that reruns reuse (gitignored).
CACHE = Path(__file__).resolve().parent / ".cache"


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for package in ("torch", "onnxruntime", "onnx", "numpy"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


# the instruction sets that decide which half-precision and integer kernels a CPU backend can use
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_features() -> list[str]:
    """Which of ``CPU_FEATURES`` this CPU reports (``/proc/cpuinfo`` flags; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [name for name in CPU_FEATURES if name in flags]
    except OSError:
        pass
    return []


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (the machine is shared: a high value means noisy timings)."""
    return [round(v, 2) for v in os.getloadavg()]


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cpu_features": cpu_features(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions(),
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=lambda v: np.asarray(v).tolist()) + "\n")
    print(f"\nwrote {path}")
