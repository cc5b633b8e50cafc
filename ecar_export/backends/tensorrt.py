"""Compile a build's ONNX graphs into TensorRT plans (DESIGN §4: precision lives in the graphs).

Networks are strongly typed by default (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; the
only mode TensorRT 11 has): an FP16 graph gives an FP16 plan, an explicit Q/DQ graph an INT8
plan, and float32 graphs are built with TF32 off so they match ONNX Runtime's float32. On
TensorRT 10 the weakly typed path (BuilderFlag.FP16 / INT8 on a float32 graph) is available as
an option; INT8 there still needs Q/DQ graphs (calibrators are not used: TensorRT 11 removed
them).

One engine per graph kind (its weights once on the GPU), with one optimisation profile per
stage the graph runs at (:meth:`runtime.plan.RequestPlan.graph_stages`): the stage's exact token, cache
and step counts, the batch spanning the manifest's range with the opt shape at its opt batch
(:func:`runtime.graphs.profile_shapes`) — the runtime gives each profile its own execution
context. Builds reuse a timing cache, one file per GPU and
TensorRT version (:func:`timing_cache_file`); a cache TensorRT refuses (made on another GPU or
TensorRT version, e.g. in a shared cache directory) is replaced by a fresh one, with a warning.
The builder's choices are one frozen :class:`PlanOptions`. Plans are written atomically under
content-addressed names; the manifest is not touched here (:func:`apply_plans` returns the
fields to write, :func:`build_plans_for_dir` does the whole job for an existing ONNX build).

TensorRT is imported lazily: importing this module works without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime import manifest as manifest_io
from runtime.backends.tensorrt import gpu, loader
from runtime.backends.tensorrt.compat import HARDWARE_COMPATIBILITY_LEVELS
from runtime.backends.tensorrt.loader import LogBook, load_tensorrt, log_tail_text, tensorrt_logger, tensorrt_major
from runtime.errors import ECARWarning, EngineError, InvalidRequestError
from runtime.fileio import atomic_path, write_bytes_atomic
from runtime.graphs import GraphSpec, profile_shapes
from runtime.plan import RequestPlan

if TYPE_CHECKING:  # typed by tensorrt-stubs where installed
    import tensorrt as trt

Profile = tuple[int, int, int]  # (min_batch, opt_batch, max_batch)
Progress = Callable[[str, int, int], None]  # graph name, plans done, plans in all
WEAK_PRECISIONS = manifest_io.PRECISIONS
PARSER_ERRORS_SHOWN = 10


def tensorrt_version() -> str | None:
    """The installed TensorRT's version, or None where ``import tensorrt`` fails (or finds only stubs)."""
    return loader.tensorrt_version()


@dataclass(frozen=True)
class PlanOptions:
    """How plans are built (one object instead of a list of keyword arguments).

    ``strongly_typed=False`` (TensorRT 10 only) with ``weakly_typed_precision`` "fp16" / "int8"
    sets the builder's precision flags instead of reading precision from the graphs.
    ``hardware_compatibility``: "none", "same_compute_capability" or "ampere_plus".
    ``workspace_bytes``: limit of the builder's workspace pool. ``allow_tf32``: let float32
    layers use TF32 (off: float32 plans match ONNX Runtime's float32). ``timing_cache``: reuse
    the per-GPU timing cache in ``timing_cache_dir`` (default :func:`default_timing_cache_dir`).
    """

    strongly_typed: bool = True
    weakly_typed_precision: str | None = None
    hardware_compatibility: str = "none"
    workspace_bytes: int | None = None
    allow_tf32: bool = False
    timing_cache: bool = True
    timing_cache_dir: str | None = None
    device_index: int = 0

    def validate(self, version: str, trt_module: Any) -> None:
        """Refuse options this TensorRT cannot honour (raises :class:`InvalidRequestError`)."""
        level = self.hardware_compatibility
        if level not in HARDWARE_COMPATIBILITY_LEVELS:
            raise InvalidRequestError(
                f"unknown hardware compatibility {level!r}: use {', '.join(HARDWARE_COMPATIBILITY_LEVELS)}"
            )
        if level != "none" and not hasattr(trt_module.HardwareCompatibilityLevel, level.upper()):
            raise InvalidRequestError(f"TensorRT {version} has no hardware compatibility level {level.upper()}")
        if self.strongly_typed:
            if self.weakly_typed_precision is not None:
                raise InvalidRequestError(
                    "weakly_typed_precision applies to weakly typed networks only; pass strongly_typed=False"
                )
            return
        if tensorrt_major(version) >= 11 or not hasattr(trt_module.BuilderFlag, "FP16"):
            raise InvalidRequestError(
                f"TensorRT {version} builds strongly typed networks only: put the precision into the ONNX graphs "
                "(FP16 graphs, Q/DQ INT8 graphs) and build with strongly_typed=True"
            )
        if self.weakly_typed_precision not in WEAK_PRECISIONS:
            raise InvalidRequestError(f"weakly_typed_precision must be one of {', '.join(WEAK_PRECISIONS)}")

    def cache_dir(self) -> Path:
        return Path(self.timing_cache_dir) if self.timing_cache_dir is not None else default_timing_cache_dir()


@dataclass(frozen=True)
class PlanRecord:
    """What one plan build produced; :meth:`manifest_fields` goes into the manifest's graph entry."""

    graph: str
    plan_file: str
    plan_sha256: str
    plan_bytes: int
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    options: PlanOptions
    profile: Profile
    build_seconds: float
    timing_cache: str | None
    timing_cache_replaced: bool = False
    # per optimisation profile (in index order): its stage and every dynamic input's (min, opt, max)
    profiles: tuple[dict[str, Any], ...] = ()

    def manifest_fields(self) -> dict[str, object]:
        return {
            "plan_file": self.plan_file,
            "plan_sha256": self.plan_sha256,
            "tensorrt_builder": {
                "tensorrt": self.tensorrt_version,
                "strongly_typed": self.options.strongly_typed,
                "weakly_typed_precision": self.options.weakly_typed_precision,
                "hardware_compatibility": self.options.hardware_compatibility,
                "batch_profile": list(self.profile),
                "profiles": [dict(p) for p in self.profiles],
                "build_seconds": round(self.build_seconds, 3),
                "plan_bytes": self.plan_bytes,
            },
        }


# ----------------------------------------------------------------------------- timing cache
def default_timing_cache_dir() -> Path:
    """``$ECAR_TENSORRT_CACHE`` or ``$XDG_CACHE_HOME/ecar-export/tensorrt`` (``~/.cache/...``)."""
    explicit = os.environ.get("ECAR_TENSORRT_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ecar-export" / "tensorrt"


def timing_cache_file(cache_dir: str | os.PathLike[str], gpu_name: str, compute_capability: str, version: str) -> Path:
    """One timing cache per GPU model and TensorRT version: ``trt-<version>-sm<cc>-<gpu>.timing-cache``."""
    major, minor = gpu.parse_compute_capability(compute_capability)
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"
    safe_version = re.sub(r"[^0-9A-Za-z.]+", "-", version)
    return Path(cache_dir) / f"trt-{safe_version}-sm{major}{minor}-{slug}.timing-cache"


def _load_timing_cache(config: trt.IBuilderConfig, path: Path | None, book: LogBook, mark: int) -> bool:
    """Give ``config`` the timing cache in ``path`` (or a fresh one); True when a stale cache was set aside.

    ``set_timing_cache(cache, ignore_mismatch=False)`` returns False for a cache whose device
    properties differ from this GPU's (a cache directory shared between machines, an NFS home):
    the build then starts from a fresh cache, and :func:`_save_timing_cache` replaces the stale
    file atomically when the plan is built.
    """
    data = b""
    if path is not None and path.is_file():
        try:
            data = path.read_bytes()
        except OSError:
            data = b""
    cache: trt.ITimingCache | None = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, False):
        return False
    if not data:
        where = f" from '{path}'" if path else ""
        raise EngineError(f"TensorRT cannot use a timing cache{where}" + log_tail_text(book, mark))
    fresh: trt.ITimingCache | None = config.create_timing_cache(b"")
    if fresh is None or not config.set_timing_cache(fresh, False):
        raise EngineError("TensorRT cannot create a fresh timing cache" + log_tail_text(book, mark))
    warnings.warn(
        f"timing cache '{path}' was made on another GPU or TensorRT version; starting a fresh one (the file is "
        "replaced when this build ends)",
        ECARWarning,
        stacklevel=3,
    )
    return True


def _save_timing_cache(config: trt.IBuilderConfig, path: Path | None) -> None:
    if path is None:
        return
    cache: trt.ITimingCache | None = config.get_timing_cache()
    if cache is None:
        return
    write_bytes_atomic(path, bytes(memoryview(cache.serialize())))


# ----------------------------------------------------------------------------- one plan
def _parser_errors(parser: trt.OnnxParser) -> str:
    lines = []
    for index in range(min(parser.num_errors, PARSER_ERRORS_SHOWN)):
        error = parser.get_error(index)
        node = _call_or(error, "node_name", "") or f"#{_call_or(error, 'node', '?')}"
        operator = _call_or(error, "node_operator", "")
        where = f"node {node}" + (f" ({operator})" if operator else "")
        lines.append(f"{where}: {_call_or(error, 'desc', str(error))} [{_call_or(error, 'code', '')}]")
    if parser.num_errors > PARSER_ERRORS_SHOWN:
        lines.append(f"... and {parser.num_errors - PARSER_ERRORS_SHOWN} more")
    return "\n  ".join(lines)


def _call_or(obj: Any, method: str, default: object) -> str:
    function = getattr(obj, method, None)
    if function is None:
        return str(default)
    try:
        return str(function())
    except Exception:  # an accessor missing in this TensorRT version
        return str(default)


def _network_inputs(network: trt.INetworkDefinition) -> dict[str, tuple[int, ...]]:
    inputs = {}
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        inputs[tensor.name] = tuple(int(tensor.shape[d]) for d in range(len(tensor.shape)))
    return inputs


def stage_profiles(
    spec: GraphSpec, plan: RequestPlan, profile: Profile, dynamic: set[str] | None = None
) -> list[dict[str, Any]]:
    """The optimisation profiles of a graph's engine: one per stage it runs at, in index order.

    Each: ``{"stage": s, "shapes": {input: [min, opt, max]}}`` for the inputs in ``dynamic``
    (default: every input; static inputs need no profile entry).
    """
    result = []
    for stage in plan.graph_stages(spec.kind):
        shapes = profile_shapes(spec, plan, stage, *profile)
        chosen = {
            name: [list(s) for s in value] for name, value in shapes.items() if dynamic is None or name in dynamic
        }
        result.append({"stage": stage, "shapes": chosen})
    return result


def _serialize(
    onnx_path: Path,
    spec: GraphSpec,
    plan: RequestPlan,
    profile: Profile,
    options: PlanOptions,
    timing_cache_path: Path | None,
) -> tuple[bytes, bool, list[dict[str, Any]]]:
    """Parse ``onnx_path`` and build one serialized plan with a profile per stage.

    Returns the plan, whether a stale timing cache was replaced, and the profiles.
    """
    load_tensorrt()  # a clear BackendUnavailableError where TensorRT is missing
    import tensorrt as trt

    version = str(trt.__version__)
    options.validate(version, trt)
    min_batch, opt_batch, max_batch = profile
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise InvalidRequestError(f"batch profile {profile} must satisfy 1 <= min <= opt <= max")
    logger, book = tensorrt_logger(trt)
    mark = book.mark()
    builder = loader.create_builder(trt)
    flags = 0
    if options.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # ignored (always on) in TRT 11
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise EngineError(
            f"TensorRT {version} cannot parse '{onnx_path}' (graph '{spec.name}'):\n  {_parser_errors(parser)}"
            + log_tail_text(book, mark)
        )
    inputs = _network_inputs(network)
    unknown = sorted(set(inputs) - set(spec.input_names()))
    if unknown:
        raise EngineError(f"'{onnx_path}' has inputs {unknown} that graph '{spec.name}' does not define; re-export it")
    config = builder.create_builder_config()
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_bytes))
    if not options.allow_tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if not options.strongly_typed and options.weakly_typed_precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
        if options.weakly_typed_precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # explicit Q/DQ graphs: no calibrator
    if options.hardware_compatibility != "none":
        config.hardware_compatibility_level = getattr(
            trt.HardwareCompatibilityLevel, options.hardware_compatibility.upper()
        )
    dynamic = {name for name, dims in inputs.items() if any(d < 0 for d in dims)}
    profiles = stage_profiles(spec, plan, profile, dynamic)
    for entry in profiles:
        optimisation = builder.create_optimization_profile()
        for name, (low, opt, high) in entry["shapes"].items():
            optimisation.set_shape(name, trt.Dims(list(low)), trt.Dims(list(opt)), trt.Dims(list(high)))
        if config.add_optimization_profile(optimisation) < 0:
            raise EngineError(
                f"TensorRT rejected the profile of stage {entry['stage']} (batch {profile}) of graph '{spec.name}'"
                + log_tail_text(book, mark)
            )
    replaced = _load_timing_cache(config, timing_cache_path, book, mark)
    serialized: trt.IHostMemory | None = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(
            f"TensorRT {version} failed to build a plan for graph '{spec.name}' from '{onnx_path}'"
            + log_tail_text(book, mark)
        )
    _save_timing_cache(config, timing_cache_path)
    return bytes(memoryview(serialized)), replaced, profiles


def build_plan(
    onnx_path: str | os.PathLike[str],
    plan_path: str | os.PathLike[str],
    spec: GraphSpec,
    plan: RequestPlan,
    profile: Profile,
    options: PlanOptions = PlanOptions(),
    timing_cache_path: str | os.PathLike[str] | None = None,
) -> PlanRecord:
    """Compile one ONNX graph into a TensorRT plan at ``plan_path`` (written atomically).

    ``profile``: (min, opt, max) batch; the plan gets one optimisation profile per stage of
    ``config`` the graph runs at. ``timing_cache_path``: a file read before and written
    after the build (None: no timing cache; see :func:`timing_cache_file` for its name).
    Raises :class:`BackendUnavailableError` without TensorRT or a usable GPU (including a
    driver too old for TensorRT's CUDA build), :class:`EngineError` (with TensorRT's last log
    lines) when parsing or building fails.
    """
    trt = load_tensorrt()
    version = str(trt.__version__)
    cuda = gpu.driver()
    info = cuda.info(options.device_index)
    loader.check_driver(loader.tensorrt_cuda_major(), info.driver_version, version)
    cuda.use_device(options.device_index)
    begin = time.perf_counter()
    cache = Path(timing_cache_path) if timing_cache_path is not None else None
    data, replaced, profiles = _serialize(Path(onnx_path), spec, plan, profile, options, cache)
    seconds = time.perf_counter() - begin
    target = Path(plan_path)
    with atomic_path(target) as temp:
        temp.write_bytes(data)
    return PlanRecord(
        graph=spec.name,
        plan_file=target.name,
        plan_sha256=hashlib.sha256(data).hexdigest(),
        plan_bytes=len(data),
        tensorrt_version=version,
        gpu_name=info.name,
        compute_capability=info.compute_capability,
        options=options,
        profile=profile,
        build_seconds=seconds,
        timing_cache=str(cache) if cache is not None else None,
        timing_cache_replaced=replaced,
        profiles=tuple(profiles),
    )


# ----------------------------------------------------------------------------- a whole build
def build_plans(
    engine_dir: str | os.PathLike[str],
    graph_files: Mapping[str, tuple[GraphSpec, str]],
    plan: RequestPlan,
    profile: Profile,
    options: PlanOptions = PlanOptions(),
    *,
    progress: Progress | None = None,
    moment: Callable[[str], None] | None = None,
) -> tuple[dict[str, PlanRecord], dict[str, object]]:
    """One plan per graph of a build; returns the per-graph records and the manifest's ``tensorrt`` block.

    ``graph_files``: each graph's contract and ONNX file (relative to ``engine_dir``). Plans go into ``engine_dir`` as
    ``<graph>-<sha12>.plan`` (atomic writes; nothing else is changed). ``moment`` is called with
    ``"plan:<graph>"`` after each plan is in place (build.py's kill-test hook).
    """
    version = str(load_tensorrt().__version__)
    info = gpu.driver().info(options.device_index)
    root = Path(engine_dir)
    cache = (
        timing_cache_file(options.cache_dir(), info.name, info.compute_capability, version)
        if options.timing_cache
        else None
    )
    records: dict[str, PlanRecord] = {}
    items = list(graph_files.items())
    for done, (name, (spec, onnx_file)) in enumerate(items):
        if progress:
            progress(name, done, len(items))
        staging = root / f".{name}.plan.building"
        record = build_plan(root / onnx_file, staging, spec, plan, profile, options, cache)
        final = f"{name}-{record.plan_sha256[:12]}.plan"
        os.replace(staging, root / final)
        records[name] = dataclasses.replace(record, plan_file=final)
        if moment:
            moment(f"plan:{name}")
    if progress:
        progress("done", len(items), len(items))
    block: dict[str, object] = {
        "version": version,
        "gpu_name": info.name,
        "compute_capability": info.compute_capability,
        "hardware_compatibility": options.hardware_compatibility,
        "strongly_typed": options.strongly_typed,
    }
    return records, block


def apply_plans(
    manifest_data: Mapping[str, Any], records: Mapping[str, PlanRecord], block: Mapping[str, object]
) -> dict[str, Any]:
    """A copy of a manifest's JSON data that names the plans: what build.py writes for a TensorRT build."""
    return manifest_io.with_plans(manifest_data, {name: r.manifest_fields() for name, r in records.items()}, block)


def build_plans_for_dir(engine_dir: str | os.PathLike[str], options: PlanOptions = PlanOptions()) -> Path:
    """Add TensorRT plans to an existing ONNX build in place; the manifest is replaced atomically last.

    Plan files a previous manifest named and the new one does not are removed after the
    commit. Returns the manifest's path.
    """
    root = Path(engine_dir)
    manifest = manifest_io.load(root)
    old_plans = {entry.plan_file for entry in manifest.graphs.values() if entry.plan_file}
    batches = (manifest.min_batch, manifest.opt_batch, manifest.max_batch)
    graph_files = {name: (entry.spec, entry.file) for name, entry in manifest.graphs.items()}
    records, block = build_plans(root, graph_files, manifest.plan, batches, options)
    data = apply_plans(manifest.document(), records, block)
    path = manifest_io.write(root, data)
    for stale in old_plans - {record.plan_file for record in records.values()}:
        (root / stale).unlink(missing_ok=True)
    return path
