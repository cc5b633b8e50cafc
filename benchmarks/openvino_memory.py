"""OpenVINO's memory against ONNX Runtime's on one build: what it holds, where, and what releasing costs.

Each measurement is a fresh runtime-only process that loads the build, generates ``--requests``
batches of ``--batch`` one after another and reports, from ``/proc/self/status``: resident memory
after loading, its peak (``VmHWM``) and what stays resident after the requests, each split into
anonymous memory (heap: what the process really holds) and file-backed pages (the mapped weights
files, which the kernel can drop under pressure), plus the median seconds per batch after the
first. Variants, round-robin over ``--repeats`` processes each:

* ``onnxruntime-whole`` — ONNX Runtime with every call whole (``activation_budget = None``): the
  runtime before large calls were cut;
* ``onnxruntime`` — the backend's default: backbone and flow calls cut along the batch to keep their
  activations within ``runtime.sub_batches.HOST_ACTIVATION_BYTES``;
* ``openvino-whole`` — OpenVINO as it behaves by itself: every call whole, every compiled model's infer
  request keeping the buffers of the largest shape it ran, and the weights files' pages it read during
  compiling and its first calls left resident (the backend before this round);
* ``openvino-cut`` — calls cut as on ONNX Runtime, the weights files' pages left resident;
* ``openvino`` — the backend's default: calls cut, and the mapped weights' pages handed back after
  compiling and after each call at a new shape (OpenVINO runs on its own repacked copy);
* ``openvino-release`` — the default plus ``release_idle=True`` (``ECAR_OPENVINO_RELEASE=1``): an
  idle graph's intermediate memory released when another graph starts.

The build is ``benchmarks/.cache/engines/<preset>/<precision>`` (shared with pipeline_speed.py;
benchmark weights without zero tensors, see ``_common.benchmark_model``), built when missing.
Writes benchmarks/results/openvino_memory_<preset>.json (``_<precision>`` added for fp16).

    python benchmarks/openvino_memory.py [--preset ecar-b] [--precision fp32] [--batch 8] [--repeats 3] [--variants ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from _common import CACHE, RESULTS, begin_run, benchmark_model, machine, write_json

VARIANTS = ("onnxruntime-whole", "onnxruntime", "openvino-whole", "openvino-cut", "openvino", "openvino-release")

MEASURE = """
import json, sys, time
def status():
    wanted = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
    with open("/proc/self/status") as handle:
        rows = [line.split() for line in handle if line.startswith(wanted)]
    return {row[0].rstrip(":"): int(row[1]) / 1024 for row in rows}
directory, variant, batch, requests = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
from runtime import manifest as manifest_io
from runtime.pipeline import Pipeline
start = time.perf_counter()
manifest = manifest_io.load(directory)
if variant.startswith("onnxruntime"):
    from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    backend = OnnxRuntimeBackend(manifest, device="cpu")
else:
    from runtime.backends import openvino_backend
    if variant in ("openvino-whole", "openvino-cut"):  # the weights files' pages left resident
        openvino_backend._mapped_pages_dropper = lambda files: (lambda: None)
    backend = openvino_backend.OpenVINOBackend(manifest, release_idle=variant == "openvino-release")
if variant.endswith("-whole"):
    backend.activation_budget = None
pipe = Pipeline(manifest, backend)
load_s = time.perf_counter() - start
loaded = status()
labels = [i % pipe.model.num_classes for i in range(batch)]
seconds = []
for request in range(requests):
    start = time.perf_counter()
    pipe.generate(labels, seed=request)
    seconds.append(time.perf_counter() - start)
after = status()
print(json.dumps({"load_s": load_s, "loaded": loaded, "after": after, "seconds": seconds,
                  "torch_imported": "torch" in sys.modules}))
"""


def engine_dir(preset: str, precision: str, max_batch: int) -> tuple[Path, dict[str, Any]]:
    """The cached build of ``preset`` (benchmark weights), built when missing or made for smaller batches (the
    graphs are reused: only the manifest's profile changes); and how its weights were made."""
    from ecar_export.build import build_engines
    from runtime import manifest as manifest_io
    from runtime.errors import ECARError

    directory = CACHE / "engines" / preset / precision
    model, weights = benchmark_model(preset, seed=0)
    try:
        fits = manifest_io.load(directory, verify_files=False).max_batch >= max_batch
    except ECARError:  # missing, stale or damaged: build it (again)
        fits = False
    if not fits:
        build_engines(model, directory, max_batch=max_batch, precision=precision)
    return directory, weights


def measure(directory: Path, variant: str, batch: int, requests: int) -> dict[str, Any]:
    command = [sys.executable, "-c", textwrap.dedent(MEASURE), str(directory), variant, str(batch), str(requests)]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if result["torch_imported"]:
        raise SystemExit("the runtime process imported torch")
    return result


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def median(pick: Any) -> float:
        return round(statistics.median(pick(run) for run in runs), 1)

    return {
        "processes": len(runs),
        "load_s": round(statistics.median(run["load_s"] for run in runs), 3),
        "rss_after_load_mb": median(lambda r: r["loaded"]["VmRSS"]),
        "anon_after_load_mb": median(lambda r: r["loaded"]["RssAnon"]),
        "file_after_load_mb": median(lambda r: r["loaded"]["RssFile"]),
        "peak_rss_mb": median(lambda r: r["after"]["VmHWM"]),
        "rss_after_requests_mb": median(lambda r: r["after"]["VmRSS"]),
        "anon_after_requests_mb": median(lambda r: r["after"]["RssAnon"]),
        "file_after_requests_mb": median(lambda r: r["after"]["RssFile"]),
        "first_request_s": round(statistics.median(run["seconds"][0] for run in runs), 3),
        "seconds_per_batch": round(statistics.median(s for run in runs for s in run["seconds"][1:]), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ecar-b")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="batches per process (the first is the warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per variant, round-robin")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)} (default: all)"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.requests < 2:
        parser.error("--requests must be at least 2 (the first request is a warm-up)")
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "onnxruntime" not in variants:
        parser.error(f"--variants: unknown {unknown}; onnxruntime (the reference) must be one of them")
    begin_run()  # the start of the run, before any build of ours loads the machine
    directory, weights = engine_dir(args.preset, args.precision, args.batch)
    runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in variants}
    for repeat in range(args.repeats):
        for variant in variants:
            runs[variant].append(measure(directory, variant, args.batch, args.requests))
            print(f"repeat {repeat + 1}/{args.repeats}: {variant} done", file=sys.stderr, flush=True)
    rows = {variant: summarise(found) for variant, found in runs.items()}
    reference = rows["onnxruntime"]  # the same runtime on the other engine
    for row in rows.values():
        row["peak_vs_onnxruntime"] = round(row["peak_rss_mb"] / reference["peak_rss_mb"], 3)
        row["speed_vs_onnxruntime"] = round(reference["seconds_per_batch"] / row["seconds_per_batch"], 3)
        if "onnxruntime-whole" in rows:
            whole = rows["onnxruntime-whole"]["peak_rss_mb"]
            row["peak_vs_onnxruntime_whole"] = round(row["peak_rss_mb"] / whole, 3)
    print(f"\n{args.preset} {args.precision}, batch {args.batch}, median of {args.repeats} processes (MB, s):")
    print(f"{'variant':<18}{'after load':>11}{'peak':>8}{'after reqs':>11}{'(anon)':>8}{'s/batch':>9}{'peak/ORT':>9}")
    for variant, row in rows.items():
        print(
            f"{variant:<18}{row['rss_after_load_mb']:>11.0f}{row['peak_rss_mb']:>8.0f}"
            f"{row['rss_after_requests_mb']:>11.0f}{row['anon_after_requests_mb']:>8.0f}"
            f"{row['seconds_per_batch']:>9.2f}{row['peak_vs_onnxruntime']:>9.2f}"
        )
    write_json(
        args.out
        or RESULTS / f"openvino_memory_{args.preset}{'' if args.precision == 'fp32' else '_' + args.precision}.json",
        {
            "preset": args.preset,
            "precision": args.precision,
            "batch": args.batch,
            "requests_per_process": args.requests,
            "engine_dir": str(directory),
            **weights,
            "variants": rows,
            "runs": runs,
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
