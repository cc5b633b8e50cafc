"""How fast is the runtime? Torch eager (fp32 and bf16 autocast) against the runtime on ONNX Runtime and OpenVINO.

Builds the preset (default the bundled ``ecar-digits``; presets without trained weights, such
as ``ecar-b``, are seeded random inits: speed does not depend on the weights) as fp32 (step
graph), fp32 with the fused flow loop, fp16 and int8 (with and without the fused loop) into
``benchmarks/.cache/engines/`` (gitignored; a rerun reuses every graph whose build key is
unchanged), then times, for every batch size, the torch reference (``model.sample``: float32,
and under ``torch.autocast("cpu", dtype=torch.bfloat16)``, the half precision a CPU user would
try first) and each build's ``Pipeline.generate`` on ONNX Runtime and on OpenVINO (one build,
both engines), on the same labels and seeds. ``--variants`` picks a subset.
Every variant gets one warm-up call, then the variants are timed round-robin: ``--repeats``
rounds, each variant once per round in a rotating order, a short pause before each call (idle
worker threads of the previous variant stop spinning), so that a noisy minute on a shared
machine hits one round of every variant rather than every round of one. A variant whose call
takes under a second gets, in each round, an untimed call and then as many timed calls as
fill a second, the round counting with their median (timed warm, as in a stream of requests). Reported times are
medians (min and max are kept in the JSON: on a shared machine the spread is large).

In the same run it measures the machine's float32 GEMM rate through ONNX Runtime: one
``--gemm-size``³ MatMul graph (the right operand a constant, as model weights are), loaded
with the runtime's own session options and thread count, median of ``--gemm-repeats`` calls,
once before and once after the variants; the higher of the two is the ceiling.

Reports images/s, the ratios to torch eager and to torch bf16, the runtime's overhead fraction (wall time outside
backend calls) and per-stage seconds, FLOPs per image (``ecar_export.flops``, multiply-adds of
MatMul/Gemm/Conv, 2 per MAC), the achieved GFLOP/s and its fraction of the GEMM ceiling.
Prints a table; writes benchmarks/results/pipeline_speed.json (``pipeline_speed_<preset>.json``
for other presets) and the per-stage chart next to it (``benchmarks/charts.py``).

    python benchmarks/pipeline_speed.py [--preset ecar-digits] [--batches 1,8] [--repeats 7]
        [--variants torch,torch-bf16,fp32,ov-fp32,ov-fused-fp16,...] [--threads 2] [--gemm-size 2048]
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from _common import CACHE, RESULTS, load_average, machine, write_json
from onnx import TensorProto, helper, numpy_helper

from ecar_export import flops, presets
from ecar_export.build import build_engines
from runtime import manifest as manifest_io
from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend, session_options
from runtime.pipeline import Pipeline, Timings

TORCH = "torch eager"
TORCH_BF16 = "torch eager bf16 autocast"
# --variants key -> (variant name, build_engines options, engine); the torch variants are the references.
# ORT and OpenVINO variants of the same build options share one build.
VARIANTS: dict[str, tuple[str, dict[str, Any] | None, str]] = {
    "torch": (TORCH, None, "torch"),
    "torch-bf16": (TORCH_BF16, None, "torch-bf16"),
    "fp32": ("ort fp32", {"precision": "fp32"}, "onnxruntime"),
    "fused": ("ort fp32 fused loop", {"precision": "fp32", "fuse_flow_loop": True}, "onnxruntime"),
    "fp16": ("ort fp16", {"precision": "fp16"}, "onnxruntime"),
    "int8": ("ort int8", {"precision": "int8"}, "onnxruntime"),
    "ov-fp32": ("openvino fp32", {"precision": "fp32"}, "openvino"),
    "ov-fused": ("openvino fp32 fused loop", {"precision": "fp32", "fuse_flow_loop": True}, "openvino"),
    "ov-fp16": ("openvino fp16 build", {"precision": "fp16"}, "openvino"),
    "ov-fused-fp16": ("openvino fp16 build fused loop", {"precision": "fp16", "fuse_flow_loop": True}, "openvino"),
    "ov-int8": ("openvino int8", {"precision": "int8"}, "openvino"),
    "ov-fused-int8": ("openvino int8 fused loop", {"precision": "int8", "fuse_flow_loop": True}, "openvino"),
}


def gemm_rate(size: int, threads: int, repeats: int) -> dict[str, Any]:
    """float32 GEMM rate of ONNX Runtime here: ``[size, size] @ W[size, size]``, median of ``repeats``."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((size, size), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    session = ort.InferenceSession(
        model.SerializeToString(), sess_options=session_options(threads), providers=["CPUExecutionProvider"]
    )
    feeds = {"a": rng.standard_normal((size, size), dtype=np.float32)}
    session.run(None, feeds)  # warm-up (weight pre-packing, thread pool start)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    work = 2 * size**3
    return {
        "size": size,
        "repeats": repeats,
        "flops_per_call": work,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "gflops_per_s": work / statistics.median(times) / 1e9,
        "best_gflops_per_s": work / min(times) / 1e9,
    }


def build_key(options: dict[str, Any]) -> str:
    """The cache directory of a build: its precision, ``-fused`` for fused flow loops (fp32: ``fp32``, ...)."""
    return str(options["precision"]) + ("-fused" if options.get("fuse_flow_loop") else "")


def build(
    preset: str, key: str, model: Any, max_batch: int, options: dict[str, Any], threads: int, engine: str
) -> tuple[Pipeline, float]:
    """Build (or reuse) one variant under ``benchmarks/.cache/engines/<preset>/<key>``; its pipeline."""
    out = CACHE / "engines" / preset / key
    start = time.perf_counter()
    step_build = CACHE / "engines" / preset / key.removesuffix("-fused")
    if options["precision"] == "int8" and key != step_build.name and not out.exists() and step_build.is_dir():
        # A fused int8 build starts from a copy of the step build: build_engines re-quantizes from its
        # calibration set (the capture, an hour on ecar-b, records the same inputs either way).
        shutil.copytree(step_build, out)
    build_engines(model, out, max_batch=max_batch, **options)
    seconds = time.perf_counter() - start
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
    parser.add_argument("--gemm-size", type=int, default=2048, help="side of the square GEMM of the ceiling")
    parser.add_argument("--gemm-repeats", type=int, default=10)
    parser.add_argument(
        "--calibration-requests",
        type=int,
        default=64,
        help="int8 calibration requests of 8 samples (their calibration part must cover every class: "
        ">= 245 for 1000 classes, as every 8th request is held out)",
    )
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/pipeline_speed*.json)")
    parser.add_argument("--no-chart", action="store_true", help="do not draw the per-stage PNG chart")
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
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
    load_start = load_average()
    started = time.time()

    model = presets.load(args.preset).eval()
    config = model.config
    build_seconds: dict[str, float] = {}
    pipes: dict[str, Pipeline] = {}
    for key in keys:
        name, options, engine = VARIANTS[key]
        if options is None:
            continue
        if options["precision"] == "int8":
            options = {**options, "calibration_requests": args.calibration_requests}
        directory = build_key(options)
        pipes[name], build_seconds[name] = build(
            args.preset, directory, model, max(batches), options, args.threads, engine
        )
        print(f"built (or reused) {name} in {build_seconds[name]:.1f} s", flush=True)

    gemm_before = gemm_rate(args.gemm_size, args.threads, args.gemm_repeats)
    print(f"GEMM ceiling (before): {gemm_before['gflops_per_s']:.1f} GFLOP/s", flush=True)
    rows: list[dict[str, Any]] = []
    # FLOPs of the computation torch eager performs: the step-graph build's count (any precision)
    reference = next((p for n, p in pipes.items() if "fused" not in n), next(iter(pipes.values())))
    for batch in batches:
        labels = [i % config.num_classes for i in range(batch)]
        runners: dict[str, Callable[[], Timings | None]] = {}
        if "torch" in keys:
            runners[TORCH] = lambda labels=labels: (model.sample(labels, seed=args.seed), None)[1]
        if "torch-bf16" in keys:

            def bf16(labels: list[int] = labels) -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    model.sample(labels, seed=args.seed)

            runners[TORCH_BF16] = bf16
        for name, pipe in pipes.items():
            runners[name] = lambda pipe=pipe, labels=labels: pipe.generate(labels, seed=args.seed).timings
        walls, timings = time_variants(runners, args.repeats)
        for name in runners:
            print(f"  B={batch} {name}: {1000 * statistics.median(walls[name]):.1f} ms", flush=True)
        counted = {name: flops.build_flops(pipe.manifest.root, batch) for name, pipe in pipes.items()}
        counted[TORCH] = counted[TORCH_BF16] = flops.build_flops(reference.manifest.root, batch)
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
            }
            if timings[name]:
                runs = timings[name]
                row["overhead_fraction"] = statistics.median(t.overhead / t.total for t in runs)
                row["backend_s"] = statistics.median(t.backend for t in runs)
                row["stages_s"] = [statistics.median(t.stages[i] for t in runs) for i in range(config.num_stages)]
                row["decoder_s"] = statistics.median(t.decoder for t in runs)
                row["graphs_s"] = {g: statistics.median(t.graphs[g] for t in runs) for g in runs[0].graphs}
            rows.append(row)
    gemm_after = gemm_rate(args.gemm_size, args.threads, args.gemm_repeats)
    print(f"GEMM ceiling (after): {gemm_after['gflops_per_s']:.1f} GFLOP/s", flush=True)
    ceiling = max(gemm_before["gflops_per_s"], gemm_after["gflops_per_s"])
    for row in rows:
        row["fraction_of_gemm"] = row["gflops_per_s"] / ceiling

    print_table(rows, config.num_stages, ceiling)
    result = {
        "preset": args.preset,
        "weights": "trained (bundled)" if args.preset in presets.TRAINED else "random init (torch seed 0)",
        "batches": batches,
        "repeats": args.repeats,
        "variants": [VARIANTS[k][0] for k in keys],
        "threads": args.threads,
        "int8_calibration_requests": args.calibration_requests if any("int8" in k for k in keys) else None,
        "seed": args.seed,
        "labels": "class i % num_classes for sample i",
        "machine": {
            **machine(),
            "load_average_at_start": load_start,
            "load_average_at_end": load_average(),
        },
        "wall_minutes": (time.time() - started) / 60,
        "build_seconds": build_seconds,
        "gemm": {
            "note": "one float32 MatMul [n,n] @ W[n,n] (W a constant) through ONNX Runtime CPU with the runtime's "
            "session options and thread count; ceiling = the higher median of the two measurements",
            "before": gemm_before,
            "after": gemm_after,
            "ceiling_gflops_per_s": ceiling,
        },
        "flops_note": "multiply-add FLOPs (2 per MAC) of MatMul/Gemm/Conv from ecar_export.flops; "
        "torch eager uses the step-graph build's count",
        "rows": rows,
    }
    write_json(out_path, result)
    if not args.no_chart:
        import charts

        print(f"wrote {charts.draw(result, out_path.with_suffix('.png'))}")


def print_table(rows: list[dict[str, Any]], num_stages: int, ceiling: float) -> None:
    stage_head = " ".join(f"{'st' + str(i + 1) + ' ms':>8}" for i in range(num_stages))
    print(f"\nGEMM ceiling {ceiling:.1f} GFLOP/s")
    print(
        f"{'variant':32} {'B':>2} {'median ms':>10} {'min ms':>9} {'img/s':>8} {'x eager':>8} {'x bf16':>7} "
        f"{'ovh %':>6} "
        f"{stage_head} {'dec ms':>7} {'GFLOP/img':>10} {'GFLOP/s':>8} {'% GEMM':>7}"
    )
    for row in rows:
        if "stages_s" in row:
            stages = " ".join(f"{1000 * s:8.2f}" for s in row["stages_s"])
            overhead, decoder = f"{100 * row['overhead_fraction']:6.1f}", f"{1000 * row['decoder_s']:7.2f}"
        else:
            stages = " ".join(f"{'-':>8}" for _ in range(num_stages))
            overhead, decoder = f"{'-':>6}", f"{'-':>7}"
        speedup, versus_bf16 = row["speedup_vs_torch_eager"], row["speedup_vs_torch_bf16"]
        print(
            f"{row['variant']:32} {row['batch']:2d} {1000 * row['median_s']:10.2f} {1000 * row['min_s']:9.2f} "
            f"{row['images_per_s']:8.2f} {f'{speedup:8.2f}' if speedup else '       -'} "
            f"{f'{versus_bf16:7.2f}' if versus_bf16 else '      -'} {overhead} {stages} "
            f"{decoder} {row['flops_per_image'] / 1e9:10.3f} {row['gflops_per_s']:8.2f} "
            f"{100 * row['fraction_of_gemm']:7.1f}"
        )


if __name__ == "__main__":
    main()
