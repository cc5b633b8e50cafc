#!/usr/bin/env python3
"""TensorRT smoke test: plans for an existing ONNX build, compared with ONNX Runtime on the same graphs.

    python scripts/gpu_smoke.py --engine-dir engines/ [--out smoke.json] [--requests 4] [--cuda-graphs]

Copies the build (manifest and every file it names) into a work directory, compiles TensorRT
plans there (``ecar_export.backends.tensorrt.build_plans_for_dir``), then runs N requests three
ways and compares latents and images:

* reference — ONNX Runtime on the CPU running the build's own graphs (the same precision as
  the plans: an fp16 build is compared with ORT running its fp16 graphs);
* "pipeline" — ``Pipeline(..., device_resident=False)``: every graph call through
  ``TensorRTBackend.run`` (numpy in, numpy out, a host round trip per call);
* "device" — ``TensorRTBackend.run_request``: the whole request on the GPU. Prints a table,
writes JSON with ``--out``, and exits 1 on a mismatch, 77 where TensorRT or an NVIDIA GPU is
absent (the "skipped" exit code of automake-style test drivers), 2 on a usage error.

Tolerances (per the build's precision; TensorRT builds float32 graphs with TF32 off):
latents max |diff| and mean |diff| of uint8 pixels, see ``ecar_export.precision.Precision.request_tolerance``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ecar_export.families.ecar import contract as ecar_contract  # noqa: E402
from ecar_export.families.ecar import schedule  # noqa: E402
from ecar_export.precision import PRECISIONS  # noqa: E402
from runtime import manifest as manifest_io  # noqa: E402
from runtime.backends.tensorrt import gpu  # noqa: E402
from runtime.errors import ECARError  # noqa: E402
from runtime.images import to_uint8  # noqa: E402
from runtime.request import RequestInputs  # noqa: E402

SKIP = 77
# precision -> (latents max abs diff, mean abs pixel diff in uint8 levels)


@dataclass
class Row:
    request: int
    path: str  # "pipeline" (TensorRT via Backend.run) or "device" (run_request)
    batch: int
    seed: int
    latents_max_abs: float
    pixels_mean_abs: float
    pixels_max_abs: int
    pixels_identical: float
    seconds: float
    reference_seconds: float
    ok: bool


def unavailable_reason(device_index: int = 0) -> str | None:
    """Why the smoke test cannot run here ("TensorRT not installed" / "no NVIDIA GPU"), or None."""
    from ecar_export.backends.tensorrt import tensorrt_version

    if tensorrt_version() is None:
        return "TensorRT not installed"
    if not gpu.gpu_available():
        return "no NVIDIA GPU"
    if gpu.driver().device_count() <= device_index:
        return f"no NVIDIA GPU with index {device_index}"
    return None


def copy_build(source: Path, target: Path) -> Path:
    """Copy the manifest and every file it names (graphs, plans, calibration set; nothing else) into ``target``."""
    manifest_io.load(source)  # validate first
    target.mkdir(parents=True, exist_ok=True)
    for name in sorted(manifest_io.named_files(json.loads((source / manifest_io.MANIFEST_NAME).read_text()))):
        if (source / name).is_dir():
            shutil.copytree(source / name, target / name, dirs_exist_ok=True)
        else:
            shutil.copy2(source / name, target / name)
    return target


def compare(
    reference: tuple[np.ndarray, np.ndarray], candidate: tuple[np.ndarray, np.ndarray], precision: str
) -> dict[str, Any]:
    """Latents/images of a candidate against the reference, with the verdict for ``precision``."""
    (ref_latents, ref_images), (latents, images) = reference, candidate
    latent_tol, pixel_tol = PRECISIONS[precision].request_tolerance
    pixel_diff = np.abs(images.astype(np.int16) - ref_images.astype(np.int16))
    result = {
        "latents_max_abs": float(np.max(np.abs(latents - ref_latents))),
        "pixels_mean_abs": float(np.mean(pixel_diff)),
        "pixels_max_abs": int(np.max(pixel_diff)),
        "pixels_identical": float(np.mean(pixel_diff == 0)),
    }
    result["ok"] = bool(
        latents.shape == ref_latents.shape
        and images.shape == ref_images.shape
        and result["latents_max_abs"] <= latent_tol
        and result["pixels_mean_abs"] <= pixel_tol
    )
    return result


def run_smoke(
    engine_dir: Path,
    work_dir: Path,
    requests: int = 4,
    batch: int | None = None,
    seed: int = 0,
    cuda_graphs: bool = False,
    device_index: int = 0,
    hardware_compatibility: str = "none",
    timing_cache_dir: Path | None = None,
) -> tuple[list[Row], dict[str, Any]]:
    """Build plans for a copy of ``engine_dir`` in ``work_dir`` and compare TensorRT with ONNX Runtime."""
    from ecar_export.backends.tensorrt import PlanOptions, build_plans_for_dir
    from runtime.backends.tensorrt import TensorRTBackend
    from runtime.pipeline import Pipeline

    copy_build(engine_dir, work_dir)
    begin = time.perf_counter()
    options = PlanOptions(
        hardware_compatibility=hardware_compatibility,
        timing_cache_dir=str(timing_cache_dir) if timing_cache_dir is not None else None,
        device_index=device_index,
    )
    build_plans_for_dir(work_dir, options)
    build_seconds = time.perf_counter() - begin
    reference = Pipeline.from_dir(engine_dir, backend="onnxruntime", device="cpu")
    manifest = manifest_io.load(work_dir)
    config, precision = ecar_contract.config_of(manifest), manifest.precision
    rows: list[Row] = []
    rng = np.random.default_rng(seed)
    size = min(batch or 4, manifest.max_batch)
    with TensorRTBackend(manifest, device_index=device_index, cuda_graphs=cuda_graphs) as backend:
        pipeline = Pipeline(manifest, backend, device_resident=False)  # every graph call through run()
        for request in range(requests):
            labels = rng.integers(0, config.num_classes, size=size).tolist()
            request_seed = seed + request
            start = time.perf_counter()
            ref = reference.generate(labels, seed=request_seed)
            ref_seconds = time.perf_counter() - start
            start = time.perf_counter()
            host = pipeline.generate(labels, seed=request_seed)
            host_seconds = time.perf_counter() - start
            inputs = RequestInputs.draw(
                manifest.plan, np.asarray(labels), schedule.noise_keys(request_seed, size), None
            )
            start = time.perf_counter()
            device = backend.run_request(inputs)
            device_seconds = time.perf_counter() - start
            candidates = {
                "pipeline": ((host.latents, host.images), host_seconds),
                "device": ((device.latents, to_uint8(device.image)), device_seconds),
            }
            for path, (candidate, seconds) in candidates.items():
                verdict = compare((ref.latents, ref.images), candidate, precision)
                rows.append(
                    Row(request, path, size, request_seed, seconds=seconds, reference_seconds=ref_seconds, **verdict)
                )
        info = backend.describe()
    summary = {
        "engine_dir": str(engine_dir),
        "work_dir": str(work_dir),
        "precision": precision,
        "tolerances": dict(zip(("latents_max_abs", "pixels_mean_abs"), PRECISIONS[precision].request_tolerance)),
        "plan_build_seconds": build_seconds,
        "backend": info,
        "gpu": gpu.gpu_info(device_index).to_dict(),
        "ok": all(row.ok for row in rows),
    }
    return rows, summary


def print_table(rows: list[Row]) -> None:
    header = f"{'req':>3} {'path':<8} {'B':>3} {'lat max|d|':>11} {'px mean|d|':>10} {'px max':>6} {'same px':>8}"
    header += f" {'trt s':>8} {'ort s':>8}  ok"
    print(header)
    for r in rows:
        print(
            f"{r.request:>3} {r.path:<8} {r.batch:>3} {r.latents_max_abs:>11.3g} {r.pixels_mean_abs:>10.3f} "
            f"{r.pixels_max_abs:>6d} {100 * r.pixels_identical:>7.2f}% {r.seconds:>8.4f} {r.reference_seconds:>8.4f}  "
            f"{'yes' if r.ok else 'NO'}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--engine-dir", type=Path, required=True, help="an existing ONNX build (ecar-export build)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--requests", type=int, default=4, help="requests to compare (default 4)")
    parser.add_argument("--batch", type=int, default=None, help="samples per request (default min(4, max batch))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cuda-graphs", action="store_true", help="capture each stage's flow loop (device path)")
    parser.add_argument("--device-index", type=int, default=0)
    parser.add_argument(
        "--hardware-compatibility", default="none", choices=["none", "same_compute_capability", "ampere_plus"]
    )
    parser.add_argument("--timing-cache-dir", type=Path, default=None)
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="where the TensorRT copy goes (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary TensorRT copy")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be >= 1")
    reason = unavailable_reason(args.device_index)
    if reason:
        print(f"gpu_smoke: skipped: {reason} (needs TensorRT and an NVIDIA GPU)", file=sys.stderr)
        return SKIP
    temp = None
    if args.work_dir is None:
        temp = Path(tempfile.mkdtemp(prefix="ecar-trt-smoke-"))
        work_dir = temp / "engines"
    else:
        work_dir = args.work_dir
    try:
        settings = ("requests", "batch", "seed", "cuda_graphs", "device_index", "hardware_compatibility")
        options = {name: getattr(args, name) for name in (*settings, "timing_cache_dir")}
        rows, summary = run_smoke(args.engine_dir, work_dir, **options)
    except ECARError as exc:
        print(f"gpu_smoke: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if temp is not None and not args.keep:
            shutil.rmtree(temp, ignore_errors=True)
    print_table(rows)
    print(
        f"precision {summary['precision']}, tolerances {summary['tolerances']}: {'OK' if summary['ok'] else 'MISMATCH'}"
    )
    if args.out:
        args.out.write_text(json.dumps({**summary, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
