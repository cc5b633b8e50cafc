"""Can a build's TensorRT plans run on this machine? Decided before anything is deserialized.

Plans load only in the exact TensorRT version that built them and, unless they were built with
a hardware compatibility level, on GPUs of the same compute capability. The manifest's
``tensorrt`` block records what they were built with; :func:`check_plan_compatibility` compares
it with :class:`RunningEnvironment`, the facts of this machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from runtime.backends.tensorrt import gpu
from runtime.backends.tensorrt.loader import load_tensorrt
from runtime.errors import ManifestError

REBUILD = "rebuild with `ecar-export build --backend tensorrt` on this machine"
HARDWARE_COMPATIBILITY_LEVELS = ("none", "same_compute_capability", "ampere_plus")
AMPERE = (8, 0)


@dataclass(frozen=True)
class RunningEnvironment:
    """What plans must match on this machine."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str


def running_environment(device_index: int = 0) -> RunningEnvironment:
    version = str(load_tensorrt().__version__)
    info = gpu.gpu_info(device_index)
    return RunningEnvironment(version, info.name, info.compute_capability)


def check_plan_compatibility(block: object, env: RunningEnvironment) -> list[str]:
    """Refuse plans that cannot load here; returns warnings for differences that still load.

    ``block`` is the manifest's top-level ``tensorrt`` object: {version, gpu_name,
    compute_capability, hardware_compatibility, strongly_typed}. Raises
    :class:`ManifestError` naming what differs and what to rebuild.
    """
    if not isinstance(block, Mapping):
        raise ManifestError(f"the manifest has no 'tensorrt' block describing its plans; {REBUILD}")
    for key in ("version", "gpu_name", "compute_capability"):
        if not isinstance(block.get(key), str):
            raise ManifestError(f"the manifest's 'tensorrt' block lacks a valid '{key}'; {REBUILD}")
    level = block.get("hardware_compatibility", "none")
    if level not in HARDWARE_COMPATIBILITY_LEVELS:
        raise ManifestError(
            f"the manifest's 'tensorrt' block has unknown hardware_compatibility {level!r} "
            f"(known: {', '.join(HARDWARE_COMPATIBILITY_LEVELS)}); {REBUILD}"
        )
    built_version = block["version"]
    if built_version != env.tensorrt_version:
        raise ManifestError(
            f"the TensorRT plans were built with TensorRT {built_version} but this machine runs TensorRT "
            f"{env.tensorrt_version}; plans load only in the exact TensorRT version that built them: {REBUILD} "
            f"(or install TensorRT {built_version})"
        )
    try:
        built_cc = gpu.parse_compute_capability(block["compute_capability"])
        here_cc = gpu.parse_compute_capability(env.compute_capability)
    except ValueError as exc:
        raise ManifestError(f"the manifest's 'tensorrt' block: {exc}; {REBUILD}") from None
    built_gpu = f"{block['gpu_name']} (compute capability {block['compute_capability']})"
    here_gpu = f"{env.gpu_name} (compute capability {env.compute_capability})"
    if level == "ampere_plus":
        if here_cc < AMPERE:
            raise ManifestError(
                f"the TensorRT plans were built with hardware compatibility 'ampere_plus', which needs an Ampere or "
                f"newer GPU (compute capability >= 8.0), but this GPU is {here_gpu}; {REBUILD}"
            )
    elif built_cc != here_cc:
        raise ManifestError(
            f"the TensorRT plans were built for {built_gpu} and cannot run on this {here_gpu}; {REBUILD}, "
            "or build portable plans with hardware compatibility 'ampere_plus'"
        )
    warnings = []
    if block["gpu_name"] != env.gpu_name:
        warnings.append(
            f"plans were built on {built_gpu} and run on {here_gpu}: they load, but their kernels were tuned for "
            f"the other GPU; {REBUILD} for best speed"
        )
    return warnings
