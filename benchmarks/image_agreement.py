"""Do the reduced-precision builds draw the fp32 build's images? Per-image cosine on fresh seeds.

For a preset (default ``ecar-b``: random weights at a trained model's scale,
``_common.benchmark_weights``), every variant generates the same ``--seeds`` images (fresh seeds
and labels drawn at run time and recorded in the JSON) in batches of ``--batch``, and each image is
compared with the ONNX Runtime fp32 build's image of the same seed and label: cosine of the pixels
centred on mid-grey (uint8 ``p`` as ``p / 127.5 - 1``, the decoder's own [-1, 1] range; a plain
uint8 cosine would be inflated by the mean), the mean absolute pixel difference, and whether any
request failed with non-finite values (the pipeline refuses NaN/inf latents and pixels rather than
returning a black image). The bounds are the ones ``ecar-export check`` demands of each precision's
graphs (``ecar_export.precision.PRECISIONS``: fp16 0.999, int8 0.99), here per image, worst case.

The torch peers of ``pipeline_speed.py`` (``torch``, ``torch-bf16``, ``torch-compile-bf16``: the same
model, seeds and labels, decoder included) are measured the same way, so a reduced-precision variant's
agreement can be read beside the agreement the peer it is timed against reaches; the bf16 peers are held
to the fp16 bound, the half-precision path they are compared with.

Builds are shared with ``pipeline_speed.py`` (``benchmarks/.cache/engines/<preset>/``: run its
``--build-only`` first for ecar-b, whose int8 calibration capture takes most of an hour).

    python benchmarks/image_agreement.py [--preset ecar-b] [--seeds 64] [--batch 8]
        [--variants fp16,int8,ov-fp16,ov-int8] [--calibration-requests 245]
"""

from __future__ import annotations

import argparse
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import RESULTS, begin_run, benchmark_model, machine, write_json
from pipeline_speed import VARIANTS, autocast_bf16, build, build_key, compiled_walk

from ecar_export import presets
from ecar_export.precision import PRECISIONS
from ecar_export.torch_walk import TorchWalk
from runtime.errors import EngineError
from runtime.images import to_uint8
from runtime.pipeline import Pipeline

REFERENCE = "fp32"  # ONNX Runtime, the fp32 build
# the torch peers: --variants key -> the precision whose bound they are held to
TORCH_PEERS = {"torch": "fp32", "torch-bf16": "fp16", "torch-compile-bf16": "fp16"}


def centred(images: np.ndarray) -> np.ndarray:
    """uint8 images [B, H, W, ch] as float64 rows in [-1, 1]."""
    return images.reshape(len(images), -1).astype(np.float64) / 127.5 - 1.0


def generate(pipe: Pipeline, labels: np.ndarray, seeds: list[int], batch: int) -> tuple[np.ndarray | None, str]:
    """All images of the run in batches of ``batch`` (None and the reason where a request failed)."""
    parts = []
    for start in range(0, len(labels), batch):
        try:
            result = pipe.generate(labels[start : start + batch].tolist(), seed=seeds[start : start + batch])
        except EngineError as exc:
            return None, str(exc)
        parts.append(result.images)
    return np.concatenate(parts), ""


def torch_images(walk: TorchWalk, labels: np.ndarray, seeds: list[int], batch: int) -> np.ndarray:
    """The torch walk's uint8 images of every seed, in batches of ``batch`` (pixels as the pipeline makes them)."""
    parts = []
    for start in range(0, len(labels), batch):
        result = walk.generate(labels[start : start + batch].tolist(), seed=seeds[start : start + batch])
        parts.append(to_uint8(result.images.float().numpy()))
    return np.concatenate(parts)


def compare(got: np.ndarray, want: np.ndarray) -> dict[str, Any]:
    a, b = centred(got), centred(want)
    cosines = (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    pixels = np.abs(got.astype(np.int16) - want.astype(np.int16))
    return {
        "min_cosine": float(cosines.min()),
        "median_cosine": float(np.median(cosines)),
        "mean_cosine": float(cosines.mean()),
        "mean_abs_pixel": float(pixels.mean()),
        "max_abs_pixel": int(pixels.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ecar-b", choices=presets.names())
    parser.add_argument("--seeds", type=int, default=64, help="images per variant (fresh seeds and labels)")
    parser.add_argument("--batch", type=int, default=8, help="images per request")
    parser.add_argument(
        "--variants",
        default="fp16,int8,ov-fp32,ov-fp16,ov-int8",
        help="pipeline_speed.py build variants (and torch peers: torch, torch-bf16, torch-compile-bf16) "
        "compared with ONNX Runtime fp32",
    )
    parser.add_argument("--calibration-requests", type=int, default=None, help="as pipeline_speed.py's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/image_agreement_<preset>.json)")
    args = parser.parse_args()
    keys = [k.strip() for k in args.variants.split(",") if k.strip()]
    bad = [k for k in keys if k not in TORCH_PEERS and (k not in VARIANTS or VARIANTS[k][1] is None or k == REFERENCE)]
    if bad:
        parser.error(
            f"--variants: {', '.join(bad)} is neither a build variant of pipeline_speed.py other than fp32 nor a "
            f"torch peer ({', '.join(TORCH_PEERS)})"
        )
    if not 1 <= args.seeds <= 10_000 or not 1 <= args.batch <= 64:
        parser.error("--seeds must be in [1, 10000] and --batch in [1, 64]")
    begin_run()
    model, weights = benchmark_model(args.preset, seed=0)
    rng = np.random.default_rng(secrets.randbits(64))
    labels = rng.integers(0, model.config.num_classes, size=args.seeds)
    seeds = [int(s) for s in rng.integers(0, 2**62, size=args.seeds)]

    def pipeline(key: str) -> Pipeline:
        _, options, engine = VARIANTS[key]
        assert options is not None
        if options["precision"] == "int8":
            options = {**options, "calibration_requests": args.calibration_requests}
        pipe, _ = build(args.preset, build_key(options), model, args.batch, options, args.threads, engine)
        return pipe

    start = time.perf_counter()
    reference, failure = generate(pipeline(REFERENCE), labels, seeds, args.batch)
    if reference is None:
        raise SystemExit(f"the fp32 reference failed: {failure}")
    rows = []
    peers = {
        "torch": TorchWalk(model),
        "torch-bf16": TorchWalk(model, {k: autocast_bf16(f) for k, f in TorchWalk.eager_functions(model).items()}),
    }
    for key in keys:
        name, options, _ = VARIANTS[key]
        if key in TORCH_PEERS:
            precision = TORCH_PEERS[key]
            walk = peers.get(key) or compiled_walk(model, bf16=True, dynamic=False)
            with torch.no_grad():
                images: np.ndarray | None = torch_images(walk, labels, seeds, args.batch)
            failure = ""
        else:
            assert options is not None
            precision = str(options["precision"])
            images, failure = generate(pipeline(key), labels, seeds, args.batch)
        bound = PRECISIONS[precision].check_min_cosine
        row: dict[str, Any] = {"variant": name, "precision": precision, "min_cosine_bound": bound}
        if images is None:
            row.update(non_finite=True, error=failure, holds=False)
        else:
            row.update(compare(images, reference), non_finite=False)
            row["holds"] = row["min_cosine"] >= bound
        rows.append(row)
        shown = "NaN/inf: " + failure if images is None else f"min cosine {row['min_cosine']:.5f} (bound {bound})"
        print(f"{name:34s} {shown}", flush=True)
    write_json(
        args.out or RESULTS / f"image_agreement_{args.preset}.json",
        {
            "preset": args.preset,
            "weights": weights,
            "reference": VARIANTS[REFERENCE][0],
            "images": args.seeds,
            "batch": args.batch,
            "labels": labels.tolist(),
            "seeds": seeds,
            "cosine": "per image, pixels as p / 127.5 - 1",
            "rows": rows,
            "seconds": round(time.perf_counter() - start, 1),
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
