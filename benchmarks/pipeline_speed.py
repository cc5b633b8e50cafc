"""How fast is the runtime? Torch eager against the ONNX Runtime CPU pipeline, per precision.

Builds the preset (default the bundled ``ecar-digits``) once into a temp dir as fp32 (step
graph), fp32 with the fused flow loop, fp16 and int8, then times, for every batch size, the
torch reference (``model.sample``) and each build's ``Pipeline.generate`` on the same labels
and seeds. Each variant runs as one block: a pause (idle worker threads of the previous variant
stop spinning), one warm-up call, then ``--repeats`` timed calls; reported times are medians
(min and max are kept in the JSON: on a shared machine the spread is large).
Reports images/s, the ratio to torch eager, the runtime's overhead fraction (wall time outside
backend calls) and per-stage seconds, FLOPs per image (``ecar_export.flops``, multiply-adds of
MatMul/Gemm/Conv, 2 per MAC) and the achieved GFLOP/s. Prints a table; writes
benchmarks/results/pipeline_speed.json.

    python benchmarks/pipeline_speed.py [--preset ecar-digits] [--batches 1,8] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecar_export import flops, presets
from ecar_export.build import build_engines
from runtime import manifest as manifest_io
from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from runtime.pipeline import Pipeline, Timings

# name -> build_engines options
BUILDS: dict[str, dict[str, Any]] = {
    "ort fp32": {"precision": "fp32"},
    "ort fp32 fused loop": {"precision": "fp32", "fuse_flow_loop": True},
    "ort fp16": {"precision": "fp16"},
    "ort int8": {"precision": "int8"},
}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=presets.DEMO, choices=presets.names())
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up (>= 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pipeline_speed.json")
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    model = presets.load(args.preset).eval()
    config = model.config
    work = Path(tempfile.mkdtemp(prefix="pipeline-speed-"))
    try:
        build_seconds: dict[str, float] = {}
        pipes: dict[str, Pipeline] = {}
        for name, options in BUILDS.items():
            start = time.perf_counter()
            out = work / name.replace(" ", "-")
            build_engines(model, out, max_batch=max(batches), **options)
            build_seconds[name] = time.perf_counter() - start
            print(f"built {name} in {build_seconds[name]:.1f} s", flush=True)
            manifest = manifest_io.load(out)
            pipes[name] = Pipeline(manifest, OnnxRuntimeBackend(manifest, device="cpu", threads=args.threads))

        rows: list[dict[str, Any]] = []
        for batch in batches:
            labels = [i % config.num_classes for i in range(batch)]
            runners: dict[str, Callable[[], Timings | None]] = {
                "torch eager": lambda labels=labels: (model.sample(labels, seed=args.seed), None)[1]
            }
            for name, pipe in pipes.items():
                runners[name] = lambda pipe=pipe, labels=labels: pipe.generate(labels, seed=args.seed).timings
            walls: dict[str, list[float]] = {name: [] for name in runners}
            timings: dict[str, list[Timings]] = {name: [] for name in runners}
            for name, run in runners.items():
                time.sleep(0.5)  # let the previous variant's idle worker threads stop spinning
                run()  # warm-up
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    result = run()
                    walls[name].append(time.perf_counter() - start)
                    if result is not None:
                        timings[name].append(result)
            counted = {name: flops.build_flops(pipe.manifest.root, batch) for name, pipe in pipes.items()}
            counted["torch eager"] = counted["ort fp32"]  # the same computation as the step-graph build
            eager = statistics.median(walls["torch eager"])
            for name in runners:
                wall = statistics.median(walls[name])
                row: dict[str, Any] = {
                    "variant": name,
                    "batch": batch,
                    "median_s": wall,
                    "min_s": min(walls[name]),
                    "max_s": max(walls[name]),
                    "images_per_s": batch / wall,
                    "speedup_vs_torch_eager": eager / wall,
                    "flops_per_image": counted[name]["per_image"],
                    "gflops_per_s": counted[name]["total"] / wall / 1e9,
                }
                if timings[name]:
                    runs = timings[name]
                    row["overhead_fraction"] = statistics.median(t.overhead / t.total for t in runs)
                    row["backend_s"] = statistics.median(t.backend for t in runs)
                    row["stages_s"] = [statistics.median(t.stages[i] for t in runs) for i in range(config.num_stages)]
                    row["decoder_s"] = statistics.median(t.decoder for t in runs)
                    row["graphs_s"] = {g: statistics.median(t.graphs[g] for t in runs) for g in runs[0].graphs}
                    row["flops_per_stage"] = [s["total"] for s in counted[name]["stages"]]
                rows.append(row)

        stage_head = " ".join(f"{'st' + str(i + 1) + ' ms':>8}" for i in range(config.num_stages))
        print(
            f"\n{'variant':20} {'B':>2} {'median ms':>10} {'min ms':>8} {'img/s':>8} {'x eager':>8} {'ovh %':>6} "
            f"{stage_head} {'dec ms':>7} {'MFLOP/img':>10} {'GFLOP/s':>8}"
        )
        for row in rows:
            if "stages_s" in row:
                stages = " ".join(f"{1000 * s:8.2f}" for s in row["stages_s"])
                overhead, decoder = f"{100 * row['overhead_fraction']:6.1f}", f"{1000 * row['decoder_s']:7.2f}"
            else:
                stages = " ".join(f"{'-':>8}" for _ in range(config.num_stages))
                overhead, decoder = f"{'-':>6}", f"{'-':>7}"
            print(
                f"{row['variant']:20} {row['batch']:2d} {1000 * row['median_s']:10.2f} {1000 * row['min_s']:8.2f} "
                f"{row['images_per_s']:8.1f} "
                f"{row['speedup_vs_torch_eager']:8.2f} {overhead} {stages} {decoder} "
                f"{row['flops_per_image'] / 1e6:10.2f} {row['gflops_per_s']:8.2f}"
            )
        result = {
            "preset": args.preset,
            "batches": batches,
            "repeats": args.repeats,
            "threads": args.threads,
            "seed": args.seed,
            "labels": "class i % num_classes for sample i",
            "machine": {
                "cpu_count": os.cpu_count(),
                "cpu_model": cpu_model(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "load_average_at_end": list(os.getloadavg()),
                "versions": versions(),
            },
            "build_seconds": build_seconds,
            "flops_note": "multiply-add FLOPs (2 per MAC) of MatMul/Gemm/Conv from ecar_export.flops; "
            "torch eager uses the fp32 step-graph build's count",
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=lambda v: np.asarray(v).tolist()) + "\n")
        print(f"\nwrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
