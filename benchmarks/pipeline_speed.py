"""How fast is the runtime? Torch (eager and torch.compile, fp32 and bf16 autocast) against ONNX Runtime and OpenVINO.

Builds the preset of any model family (default the bundled ``ecar-digits``; presets without
trained weights, such as ``ecar-b`` or ``flowar-s``, are seeded random inits with every all-zero
tensor re-drawn at a trained model's scale, ``_common.benchmark_weights``: an engine would fold
zero products away) as fp32 (step graph), fp32 with the fused flow loop, fp16 and int8 (with and
without the fused loop) into ``benchmarks/.cache/engines/`` (gitignored; a rerun reuses every graph whose build key is
unchanged), then times, for every batch size, the torch reference (the runtime's request walk over
the model's graph functions, ``ecar_export.torch_walk``: float32, and under
``torch.autocast("cpu", dtype=torch.bfloat16)``, the half precision a CPU user would try first), the
same model with its three graph functions (backbone, flow step, decoder) under
``torch.compile`` (inductor, ``freezing = True``, static shapes unless ``--compile-dynamic``; at
fp32 and under bf16 autocast; the first call, which compiles, is reported apart), the same
functions compiled ahead of time by AOTInductor (``torch-aoti``: fp32, one package per call
shape; for the small presets) and each
build's ``Pipeline.generate`` on ONNX Runtime and on OpenVINO (one build, both engines), on the
same labels and seeds. ``--variants`` picks a subset. Every variant's latents of one call are
compared with torch eager fp32's (max |diff|, cosine).
Every variant gets one warm-up call, then the variants are timed round-robin: ``--repeats``
rounds, each variant once per round in a rotating order, a short pause before each call (idle
worker threads of the previous variant stop spinning), so that a noisy minute on a shared
machine hits one round of every variant rather than every round of one. A variant whose call
takes under a second gets, in each round, an untimed call and then as many timed calls as
fill a second, the round counting with their median (timed warm, as in a stream of requests). Reported times are
medians (min and max are kept in the JSON: on a shared machine the spread is large).

In the same run it measures the machine's GEMM peak per precision (``peak.py``: the best rate of
any installed engine on one ``--gemm-size``² product at fp32, bf16 and int8), once before and
once after the variants; the higher of the two medians counts. Each variant is set against the
peak of the precision it runs at: torch fp32 / bf16 by its variant, ONNX Runtime fp32 and fp16
builds at fp32 (its CPU provider has no fp16 GEMM on x86), OpenVINO at the precision its
compiled graphs report (``INFERENCE_PRECISION_HINT``), int8 builds at int8 (an upper-bound view:
only their quantized products run int8).

Reports images/s, the ratios to torch eager and to torch bf16, the runtime's overhead fraction (wall time outside
backend calls) and per-stage seconds, FLOPs per image (``ecar_export.flops``, multiply-adds of
MatMul/Gemm/Conv, 2 per MAC), the achieved GFLOP/s and its fraction of the peak of its precision.
Prints a table; writes benchmarks/results/pipeline_speed.json (``pipeline_speed_<preset>.json``
for other presets) and the per-stage chart next to it (``benchmarks/charts.py``).

    python benchmarks/pipeline_speed.py [--preset ecar-digits] [--batches 1,8] [--repeats 7]
        [--variants torch,torch-bf16,torch-compile,fp32,ov-fp32,ov-fused-fp16,...] [--threads 2] [--gemm-size 2048]
        [--smoke]  (any --repeats, tiny checks; the JSON says "smoke": true)
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import peak
import torch
from _common import CACHE, RESULTS, begin_run, benchmark_model, machine, write_json

from ecar_export import families, flops, presets
from ecar_export.build import build_engines
from ecar_export.torch_walk import GraphFunction, TorchWalk
from runtime import manifest as manifest_io
from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from runtime.graphs import Kind
from runtime.pipeline import Pipeline, Timings

TORCH = "torch eager"
TORCH_BF16 = "torch eager bf16 autocast"
TORCH_COMPILE = "torch compile fp32"
TORCH_COMPILE_BF16 = "torch compile bf16 autocast"
TORCH_AOTI = "torch aotinductor fp32"
# the graphs whose torch functions torch.compile compiles: every graph of a step build
GRAPH_KINDS = (Kind.BACKBONE, Kind.FLOW_STEP, Kind.DECODER)
# --variants key -> (variant name, build_engines options, engine); the torch variants are the references.
# ORT and OpenVINO variants of the same build options share one build.
VARIANTS: dict[str, tuple[str, dict[str, Any] | None, str]] = {
    "torch": (TORCH, None, "torch"),
    "torch-bf16": (TORCH_BF16, None, "torch-bf16"),
    "torch-compile": (TORCH_COMPILE, None, "torch-compile"),
    "torch-compile-bf16": (TORCH_COMPILE_BF16, None, "torch-compile-bf16"),
    "torch-aoti": (TORCH_AOTI, None, "torch-aoti"),
    "fp32": ("ort fp32", {"precision": "fp32"}, "onnxruntime"),
    "fused": ("ort fp32 fused loop", {"precision": "fp32", "fuse_flow_loop": True}, "onnxruntime"),
    "fp16": ("ort fp16", {"precision": "fp16"}, "onnxruntime"),
    "int8": ("ort int8", {"precision": "int8"}, "onnxruntime"),
    "ov-fp32": ("openvino fp32", {"precision": "fp32"}, "openvino"),
    "ov-fused": ("openvino fp32 fused loop", {"precision": "fp32", "fuse_flow_loop": True}, "openvino"),
    "ov-fp16": ("openvino fp16 build", {"precision": "fp16"}, "openvino"),
    "ov-fused-fp16": ("openvino fp16 build fused loop", {"precision": "fp16", "fuse_flow_loop": True}, "openvino"),
    # the same int8 recipe as ONNX Runtime's, built for OpenVINO (its toolchain in the key; ecar_export.precision.int8)
    "ov-int8": ("openvino int8", {"precision": "int8", "backend": "openvino"}, "openvino"),
    "ov-fused-int8": (
        "openvino int8 fused loop",
        {"precision": "int8", "backend": "openvino", "fuse_flow_loop": True},
        "openvino",
    ),
}


def autocast_bf16(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` run under ``torch.autocast("cpu", dtype=torch.bfloat16)``."""

    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return function(*args, **kwargs)

    return run


def compiled_walk(model: Any, bf16: bool, dynamic: bool) -> TorchWalk:
    """The model's request walk with each graph function under ``torch.compile``.

    Inductor with ``freezing`` (weights folded in as constants; it needs ``torch.no_grad()``, which
    the walk is under): the eager walk over the compiled functions, as the runtime walks its graphs;
    with ``bf16`` each function runs under bf16 autocast.
    """
    import torch._dynamo.config
    import torch._inductor.config

    torch._inductor.config.freezing = True
    # static shapes: one compile per stage shape and batch (5 stages x 3 functions x batches x 2 precisions)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
    eager = TorchWalk.eager_functions(model)
    functions = {
        kind: torch.compile(autocast_bf16(eager[kind]) if bf16 else eager[kind], dynamic=None if dynamic else False)
        for kind in GRAPH_KINDS
    }
    return TorchWalk(model, functions)


class _GraphFunction(torch.nn.Module):
    """One graph function as a module, for ``torch.export`` (positional inputs in the graph's order)."""

    def __init__(self, function: GraphFunction) -> None:
        super().__init__()
        self.function = function

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.function(*inputs)


Signature = tuple[tuple[tuple[int, ...], torch.dtype], ...]


class AotInductorWalk:
    """The request walk over AOTInductor packages of the graph functions, one package per call shape.

    :meth:`prepare` records the calls of one request (eager), exports each new shape with
    ``torch.export`` and compiles it with ``torch._inductor.aoti_compile_and_package`` (weights
    embedded; inductor's ``freezing`` as for torch.compile); :meth:`generate` dispatches every call to
    the package of its shape. Each package holds its own copy of the weights, so this suits the
    small presets (the demo: 9 packages per batch size), not ecar-b.
    """

    def __init__(self, model: Any, directory: Path) -> None:
        import torch._inductor.config

        torch._inductor.config.freezing = True
        self.model, self.directory = model, directory
        self.eager = TorchWalk.eager_functions(model)
        self.loaded: dict[tuple[Kind, Signature], Any] = {}
        self.returns_tuple: dict[Kind, bool] = {}
        self.walk = TorchWalk(model, {kind: self._dispatch(kind) for kind in GRAPH_KINDS})

    @staticmethod
    def _signature(inputs: tuple[torch.Tensor, ...]) -> Signature:
        return tuple((tuple(value.shape), value.dtype) for value in inputs)

    def _dispatch(self, kind: Kind) -> GraphFunction:
        def run(*inputs: torch.Tensor) -> Any:
            outputs = self.loaded[kind, self._signature(inputs)](*inputs)
            if self.returns_tuple[kind]:
                return tuple(outputs)
            return outputs if isinstance(outputs, torch.Tensor) else outputs[0]  # one output: a tensor or a list

        return run

    def prepare(self, labels: list[int], seed: int) -> float:
        """Export and compile every call shape of a request of ``labels`` not compiled yet; the seconds it took."""
        start = time.perf_counter()
        found: dict[tuple[Kind, Signature], tuple[torch.Tensor, ...]] = {}

        def record(kind: Kind) -> GraphFunction:
            def run(*inputs: torch.Tensor) -> Any:
                found.setdefault((kind, self._signature(inputs)), tuple(v.clone() for v in inputs))
                result = self.eager[kind](*inputs)
                self.returns_tuple[kind] = isinstance(result, tuple)
                return result

            return run

        TorchWalk(self.model, {kind: record(kind) for kind in GRAPH_KINDS}).generate(labels, seed=seed)
        with torch.no_grad():
            for (kind, signature), inputs in found.items():
                if (kind, signature) in self.loaded:
                    continue
                program = torch.export.export(_GraphFunction(self.eager[kind]), inputs, strict=False)
                path = self.directory / f"{kind}-{len(self.loaded)}.pt2"
                torch._inductor.aoti_compile_and_package(program, package_path=str(path))
                self.loaded[kind, signature] = torch._inductor.aoti_load_package(str(path))
        return time.perf_counter() - start

    def generate(self, labels: list[int], seed: int) -> Any:
        return self.walk.generate(labels, seed=seed)


def compare(latents: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """max |latents - reference| and their cosine similarity (flattened)."""
    a, b = latents.astype(np.float64).ravel(), reference.astype(np.float64).ravel()
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return {
        "max_abs": float(np.max(np.abs(a - b))),
        "max_abs_reference": float(np.max(np.abs(b))),
        "cosine": float(a @ b / norm) if norm else float("nan"),
    }


def openvino_execution(pipe: Pipeline) -> dict[str, Any]:
    """Per graph of an OpenVINO pipeline: its ``INFERENCE_PRECISION_HINT`` and its products' runtime precisions."""
    backend: Any = pipe.backend
    return {
        graph: {"inference_precision": backend.precision[graph]} | peak.runtime_precisions(compiled)
        for graph, compiled in backend.compiled.items()
    }


def run_precision(engine: str, build_precision: str | None, execution: dict[str, Any] | None) -> tuple[str, str]:
    """The precision whose peak a variant is set against, and why."""
    if engine in ("torch", "torch-compile", "torch-aoti"):
        return "fp32", "float32"
    if engine in ("torch-bf16", "torch-compile-bf16"):
        return "bf16", "bf16 autocast: its products run in bfloat16"
    if build_precision == "int8":
        return "int8", (
            "int8 build: its quantized products run int8, the rest at higher precision; the share of the int8 "
            "peak is an upper-bound view"
        )
    if engine == "onnxruntime":
        if build_precision == "fp16":
            return "fp32", "ONNX Runtime's CPU provider has no fp16 GEMM on x86: the fp16 build's products run in fp32"
        return "fp32", "float32"
    compiled = sorted({g["inference_precision"] for g in (execution or {}).values()})
    names = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
    precision = names.get(compiled[-1] if len(compiled) == 1 else "bf16" if "bf16" in compiled else "f32", "fp32")
    return precision, f"OpenVINO compiled the graphs at {', '.join(compiled)} (INFERENCE_PRECISION_HINT)"


def measure_peak(size: int, threads: int, repeats: int, when: str) -> dict[str, Any]:
    result = peak.measure(size, threads, repeats)
    rates = ", ".join(f"{p} {r:.1f}" for p, r in result["peak_gflops_per_s"].items())
    print(f"GEMM peak ({when}), GFLOP/s: {rates}", flush=True)
    return result


def build_key(options: dict[str, Any]) -> str:
    """The cache directory of a build: its precision, its target backend where not ONNX Runtime's, ``-fused``
    for fused flow loops (``fp32``, ``int8-openvino-fused``, ...)."""
    target = options.get("backend", "onnxruntime")
    return (
        str(options["precision"])
        + ("" if target == "onnxruntime" else f"-{target}")
        + ("-fused" if options.get("fuse_flow_loop") else "")
    )


def build(
    preset: str,
    key: str,
    model: Any,
    max_batch: int,
    options: dict[str, Any],
    threads: int,
    engine: str,
    open_pipeline: bool = True,
) -> tuple[Pipeline | None, float]:
    """Build (or reuse) one variant under ``benchmarks/.cache/engines/<preset>/<key>``; its pipeline, unless
    ``open_pipeline`` is false (``--build-only``: every open pipeline holds its weights, and an int8 build's
    quantization beside all of them ran ecar-b out of 24 GB)."""
    out = CACHE / "engines" / preset / key
    start = time.perf_counter()
    if options["precision"] == "int8" and not out.exists():
        # Every int8 build of a preset starts from a copy of one made before (the step build first):
        # build_engines re-quantizes from its calibration set, which records the same inputs for every
        # target and flow-loop form (the capture takes two hours on ecar-b). A build for the same target
        # first: its graphs' keys match, so only the flow graph is quantized again.
        builds = ("int8", "int8-openvino", "int8-fused", "int8-openvino-fused")
        for name in sorted(builds, key=lambda name: ("openvino" in name) != ("openvino" in key)):
            if name != key and (CACHE / "engines" / preset / name / "manifest.json").is_file():
                shutil.copytree(CACHE / "engines" / preset / name, out)
                break
    build_engines(model, out, max_batch=max_batch, **options)
    seconds = time.perf_counter() - start
    if not open_pipeline:
        return None, seconds
    manifest = manifest_io.load(out)
    if engine == "openvino":
        from runtime.backends.openvino_backend import OpenVINOBackend

        return Pipeline(manifest, OpenVINOBackend(manifest, threads=threads)), seconds
    return Pipeline(manifest, OnnxRuntimeBackend(manifest, device="cpu", threads=threads)), seconds


def time_variants(
    runners: dict[str, Callable[[], Timings | None]], repeats: int, pause: float = 0.3, block: float = 1.0
) -> tuple[dict[str, list[float]], dict[str, list[Timings]]]:
    """Warm every variant up, then time them round-robin: ``repeats`` rounds, every variant once per round.

    Interleaving keeps the ratios honest on a shared machine: a slow minute of a noisy
    neighbour slows one round of every variant instead of all rounds of one variant. The
    order rotates between rounds; ``pause`` before each variant's turn lets the previous
    variant's worker threads go idle (torch's OpenMP threads spin for a while after a parallel
    region). A variant's turn is one call, or, where a call takes under ``block`` seconds, an
    untimed call followed by as many timed calls as fill ``block`` seconds, the turn counting
    with the median of those: millisecond requests are timed warm, as in a stream of requests.
    """
    names = list(runners)
    calls: dict[str, int] = {}
    for name in names:
        time.sleep(pause)
        start = time.perf_counter()
        runners[name]()  # warm-up
        seconds = time.perf_counter() - start
        calls[name] = 1 if seconds >= block else max(1, math.ceil(block / max(seconds, 1e-6)))
    walls: dict[str, list[float]] = {name: [] for name in names}
    timings: dict[str, list[Timings]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            time.sleep(pause)
            if calls[name] > 1:
                runners[name]()
            turn: list[tuple[float, Timings | None]] = []
            for _ in range(calls[name]):
                start = time.perf_counter()
                result = runners[name]()
                turn.append((time.perf_counter() - start, result))
            wall, result = sorted(turn, key=lambda item: item[0])[len(turn) // 2]
            walls[name].append(wall)
            if result is not None:
                timings[name].append(result)
    return walls, timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=presets.DEMO, choices=presets.names())
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds after one warm-up (>= 5)")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gemm-size", type=int, default=2048, help="side of the square GEMM of the peak probe")
    parser.add_argument("--gemm-repeats", type=int, default=10)
    parser.add_argument(
        "--peak-threads", type=int, help="threads of the peak probe (default: every physical core, peak.py)"
    )
    parser.add_argument(
        "--compile-dynamic", action="store_true", help="torch.compile with automatic dynamic shapes (fewer compiles)"
    )
    parser.add_argument(
        "--calibration-requests",
        type=int,
        default=None,
        help="int8 calibration requests of 8 samples (default: the build's, the fewest whose calibration part "
        "covers every class and at least 64: 245 for 1000 classes, as every 8th request is held out)",
    )
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/pipeline_speed*.json)")
    parser.add_argument("--no-chart", action="store_true", help="do not draw the per-stage PNG chart")
    parser.add_argument(
        "--build-only",
        action="store_true",
        help="build (or reuse) the variants' engines and stop: make them ahead of a quiet window, time later",
    )
    parser.add_argument(
        "--smoke", action="store_true", help='a check that the script runs: any --repeats, JSON says "smoke": true'
    )
    args = parser.parse_args()
    if args.repeats < (1 if args.smoke else 5):
        parser.error("--repeats must be at least 5 (--smoke: 1)")
    keys = [k.strip() for k in args.variants.split(",") if k.strip()]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown or not keys:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if not any(VARIANTS[k][1] is not None for k in keys):
        parser.error("--variants needs at least one build (fp32, fused, fp16, int8 or an ov- variant)")
    suffix = "" if args.preset == presets.DEMO else f"_{args.preset}"
    out_path = args.out or RESULTS / f"pipeline_speed{suffix}.json"
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    begin_run()
    started = time.time()

    model, weights = benchmark_model(args.preset, seed=0)
    config = families.config_of(model)
    eager_walk = TorchWalk(model)
    executions: dict[str, dict[str, Any]] = {}
    build_seconds: dict[str, float] = {}
    pipes: dict[str, Pipeline] = {}
    for key in keys:
        name, options, engine = VARIANTS[key]
        if options is None:
            continue
        if options["precision"] == "int8":
            options = {**options, "calibration_requests": args.calibration_requests}
        directory = build_key(options)
        pipe, build_seconds[name] = build(
            args.preset, directory, model, max(batches), options, args.threads, engine, not args.build_only
        )
        print(f"built (or reused) {name} in {build_seconds[name]:.1f} s", flush=True)
        if pipe is None:
            continue
        pipes[name] = pipe
        if engine == "openvino":
            executions[name] = openvino_execution(pipe)
    if args.build_only:
        print(f"built {len(build_seconds)} variant(s) under {CACHE / 'engines' / args.preset}; nothing timed")
        return
    twins = {
        TORCH_COMPILE: compiled_walk(model, bf16=False, dynamic=args.compile_dynamic)
        if "torch-compile" in keys
        else None,
        TORCH_COMPILE_BF16: compiled_walk(model, bf16=True, dynamic=args.compile_dynamic)
        if "torch-compile-bf16" in keys
        else None,
    }
    aoti_directory = tempfile.TemporaryDirectory(prefix="ecar-aoti-") if "torch-aoti" in keys else None
    aoti = AotInductorWalk(model, Path(aoti_directory.name)) if aoti_directory else None
    compiles: dict[tuple[str, int], float] = {}

    peak_before = measure_peak(args.gemm_size, args.peak_threads or 0, args.gemm_repeats, "before")
    rows: list[dict[str, Any]] = []
    first_calls: dict[tuple[str, int], float] = {}
    latent_checks: dict[tuple[str, int], dict[str, float]] = {}
    # FLOPs of the computation torch eager performs: the step-graph build's count (any precision)
    reference = next((p for n, p in pipes.items() if "fused" not in n), next(iter(pipes.values())))
    for batch in batches:
        labels = [i % config.num_classes for i in range(batch)]
        runners: dict[str, Callable[[], Timings | None]] = {}
        if "torch" in keys:
            runners[TORCH] = lambda labels=labels: (eager_walk.generate(labels, seed=args.seed), None)[1]
        if "torch-bf16" in keys:

            def bf16(labels: list[int] = labels) -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    eager_walk.generate(labels, seed=args.seed)

            runners[TORCH_BF16] = bf16
        for twin_name, twin in twins.items():
            if twin is not None:
                runners[twin_name] = lambda twin=twin, labels=labels: (twin.generate(labels, seed=args.seed), None)[1]
        if aoti is not None:
            compiles[TORCH_AOTI, batch] = aoti.prepare(labels, args.seed)
            print(f"  B={batch} {TORCH_AOTI}: exported and compiled in {compiles[TORCH_AOTI, batch]:.1f} s", flush=True)
            runners[TORCH_AOTI] = lambda labels=labels: (aoti.generate(labels, seed=args.seed), None)[1]
        for name, pipe in pipes.items():
            runners[name] = lambda pipe=pipe, labels=labels: pipe.generate(labels, seed=args.seed).timings

        # One call of every variant before the timed rounds: its latents against torch eager fp32's, and its
        # time (for torch.compile: the compile of this batch's shapes, reported apart from the steady state).
        def latents_of(name: str, labels: list[int] = labels) -> np.ndarray:
            if name in pipes:
                return np.asarray(pipes[name].generate(labels, seed=args.seed).latents)
            if name == TORCH_BF16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return eager_walk.generate(labels, seed=args.seed).latents.float().numpy()
            sampler: Any = aoti if name == TORCH_AOTI else twins.get(name) or eager_walk
            return sampler.generate(labels, seed=args.seed).latents.float().numpy()

        reference_latents = latents_of(TORCH)
        for name in runners:
            start = time.perf_counter()
            latents = latents_of(name)
            first_calls[name, batch] = time.perf_counter() - start + compiles.get((name, batch), 0.0)
            latent_checks[name, batch] = compare(latents, reference_latents)
            check = latent_checks[name, batch]
            print(
                f"  B={batch} {name}: first call {first_calls[name, batch]:.2f} s, latents vs torch eager "
                f"max|diff| {check['max_abs']:.2e}, cosine {check['cosine']:.6f}",
                flush=True,
            )
        walls, timings = time_variants(runners, args.repeats)
        for name in runners:
            print(f"  B={batch} {name}: {1000 * statistics.median(walls[name]):.1f} ms", flush=True)
        counted = {name: flops.build_flops(pipe.manifest.root, batch) for name, pipe in pipes.items()}
        torch_flops = flops.build_flops(reference.manifest.root, batch)
        for name in (TORCH, TORCH_BF16, TORCH_COMPILE, TORCH_COMPILE_BF16, TORCH_AOTI):
            counted[name] = torch_flops
        eager = statistics.median(walls[TORCH]) if TORCH in walls else None
        eager_bf16 = statistics.median(walls[TORCH_BF16]) if TORCH_BF16 in walls else None
        for name in runners:
            wall = statistics.median(walls[name])
            row: dict[str, Any] = {
                "variant": name,
                "batch": batch,
                "median_s": wall,
                "min_s": min(walls[name]),
                "max_s": max(walls[name]),
                "images_per_s": batch / wall,
                "speedup_vs_torch_eager": eager / wall if eager else None,
                "speedup_vs_torch_bf16": eager_bf16 / wall if eager_bf16 else None,
                "flops_per_image": counted[name]["per_image"],
                "gflops_per_s": counted[name]["total"] / wall / 1e9,
                "flops_per_stage": [s["total"] for s in counted[name]["stages"]],
                "flops_decoder": counted[name]["decoder"],
                "first_call_s": first_calls[name, batch],
                "latents_vs_torch_eager": latent_checks[name, batch],
            }
            if name in twins:
                row["compile_s"] = first_calls[name, batch] - wall  # the first call less a steady-state call
            if (name, batch) in compiles:
                row["compile_s"] = compiles[name, batch]  # export and AOTInductor compile, timed alone
            key = next(k for k in keys if VARIANTS[k][0] == name)
            options, engine = VARIANTS[key][1], VARIANTS[key][2]
            row["precision"], row["precision_note"] = run_precision(
                engine, options["precision"] if options else None, executions.get(name)
            )
            if name in executions:
                row["openvino_execution"] = executions[name]
            if timings[name]:
                runs = timings[name]
                row["overhead_fraction"] = statistics.median(t.overhead / t.total for t in runs)
                row["backend_s"] = statistics.median(t.backend for t in runs)
                row["stages_s"] = [statistics.median(t.stages[i] for t in runs) for i in range(config.num_stages)]
                row["decoder_s"] = statistics.median(t.decoder for t in runs)
                row["graphs_s"] = {g: statistics.median(t.graphs[g] for t in runs) for g in runs[0].graphs}
            rows.append(row)
    peak_after = measure_peak(args.gemm_size, args.peak_threads or 0, args.gemm_repeats, "after")
    peaks = {
        precision: max(
            p["peak_gflops_per_s"][precision] for p in (peak_before, peak_after) if precision in p["peak_gflops_per_s"]
        )
        for precision in peak.PRECISIONS
        if any(precision in p["peak_gflops_per_s"] for p in (peak_before, peak_after))
    }
    for row in rows:
        rate = peaks.get(row["precision"])
        row["peak_gflops_per_s"] = rate
        row["fraction_of_peak"] = row["gflops_per_s"] / rate if rate else None

    print_table(rows, config.num_stages, peaks)
    result = {
        "smoke": args.smoke,
        "preset": args.preset,
        "weights": weights["weights"],
        "weights_detail": weights,
        "batches": batches,
        "repeats": args.repeats,
        "variants": [VARIANTS[k][0] for k in keys],
        "threads": args.threads,
        "int8_calibration_requests": next(
            (p.manifest.calibration.requests for p in pipes.values() if p.manifest.calibration is not None), None
        ),
        "seed": args.seed,
        "labels": "class i % num_classes for sample i",
        "machine": machine(),
        "wall_minutes": (time.time() - started) / 60,
        "build_seconds": build_seconds,
        "peak": {
            "note": "the best median GFLOP/s of any installed engine on one [n,n] @ W[n,n] product per precision "
            "(benchmarks/peak.py), measured before and after the variants; the higher counts. Each row's "
            "fraction_of_peak is against the peak of the precision it runs at (its 'precision')",
            "peak_gflops_per_s": peaks,
            "before": peak_before,
            "after": peak_after,
        },
        "torch_compile": {
            "backend": "inductor",
            "freezing": True,
            "dynamic": args.compile_dynamic,
            "compiled": [str(kind) for kind in GRAPH_KINDS],
            "note": "the request walk (ecar_export.torch_walk) over the compiled graph functions; first_call_s "
            "of each batch includes compiling its shapes, compile_s = first_call_s - median_s",
        },
        "aot_inductor": {
            "run": "torch-aoti" in keys,
            "note": "torch.export + torch._inductor.aoti_compile_and_package of each graph function, one package "
            "per call shape (static shapes, freezing on), loaded with aoti_load_package and walked by "
            "ecar_export.torch_walk; compile_s is the export and compile of a batch's shapes. Each package "
            "embeds the weights: not run on the paper-scale presets (ecar-b: ~10 packages of up to 0.5 GB per "
            "batch size)",
        },
        "flops_note": "multiply-add FLOPs (2 per MAC) of MatMul/Gemm/Conv from ecar_export.flops; "
        "torch eager uses the step-graph build's count",
        "rows": rows,
    }
    write_json(out_path, result)
    if aoti_directory is not None:
        aoti_directory.cleanup()
    if not args.no_chart:
        import charts

        print(f"wrote {charts.draw(result, out_path.with_suffix('.png'))}")


def print_table(rows: list[dict[str, Any]], num_stages: int, peaks: dict[str, float]) -> None:
    stage_head = " ".join(f"{'st' + str(i + 1) + ' ms':>8}" for i in range(num_stages))
    print("\nGEMM peak, GFLOP/s: " + ", ".join(f"{p} {r:.1f}" for p, r in peaks.items()))
    print(
        f"{'variant':32} {'B':>2} {'median ms':>10} {'min ms':>9} {'img/s':>8} {'x eager':>8} {'x bf16':>7} "
        f"{'ovh %':>6} "
        f"{stage_head} {'dec ms':>7} {'GFLOP/img':>10} {'GFLOP/s':>8} {'prec':>5} {'% peak':>7}"
    )
    for row in rows:
        if "stages_s" in row:
            stages = " ".join(f"{1000 * s:8.2f}" for s in row["stages_s"])
            overhead, decoder = f"{100 * row['overhead_fraction']:6.1f}", f"{1000 * row['decoder_s']:7.2f}"
        else:
            stages = " ".join(f"{'-':>8}" for _ in range(num_stages))
            overhead, decoder = f"{'-':>6}", f"{'-':>7}"
        speedup, versus_bf16 = row["speedup_vs_torch_eager"], row["speedup_vs_torch_bf16"]
        share = row["fraction_of_peak"]
        print(
            f"{row['variant']:32} {row['batch']:2d} {1000 * row['median_s']:10.2f} {1000 * row['min_s']:9.2f} "
            f"{row['images_per_s']:8.2f} {f'{speedup:8.2f}' if speedup else '       -'} "
            f"{f'{versus_bf16:7.2f}' if versus_bf16 else '      -'} {overhead} {stages} "
            f"{decoder} {row['flops_per_image'] / 1e9:10.3f} {row['gflops_per_s']:8.2f} {row['precision']:>5} "
            f"{f'{100 * share:7.1f}' if share is not None else '      -'}"
        )
    compiled = [row for row in rows if "compile_s" in row]
    for row in compiled:
        print(
            f"{row['variant']} B={row['batch']}: first call {row['first_call_s']:.1f} s "
            f"(compile ~{row['compile_s']:.1f} s)"
        )


if __name__ == "__main__":
    main()
