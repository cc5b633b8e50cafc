"""Which parts of a graph must stay fp32? Measure each island of the FP16 recipe on the demo model.

For every variant (no fp32 islands, each island alone, the full recipe) the demo's fp32
graphs are converted, the whole pipeline runs on ONNX Runtime CPU over the same requests,
and the final latents are compared with the fp32 pipeline's (max abs, cosine), along with
the quality yardstick. Prints a table; writes benchmarks/results/fp16_recipe.json.

    python benchmarks/fp16_recipe.py [--per-class 20]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from ecar_export import presets
from ecar_export.build import build_engines
from ecar_export.evaluate import evaluate, pipeline_sampler
from ecar_export.precision import fp16
from runtime import manifest as manifest_io
from runtime.fileio import sha256_file
from runtime.pipeline import Pipeline

VARIANTS: dict[str, tuple[str, ...]] = {
    "all fp16": (),
    "ops only (LayerNorm, Softmax)": ("ops",),
    "time only": ("time",),
    "state only": ("state",),
    "resampling only": ("resampling",),
    "recipe (all islands)": fp16.PARTS,
}


def convert_dir(fp32_dir: Path, out: Path, parts: tuple[str, ...]) -> None:
    shutil.copytree(fp32_dir, out)
    data = json.loads((out / "manifest.json").read_text())
    for entry in data["graphs"].values():
        path = out / entry["file"]
        onnx.save_model(fp16.convert(onnx.load(str(path)), parts), str(path))
        entry["sha256"] = sha256_file(path)
        entry["precision"] = "fp16"
    data["precision"] = "fp16"
    manifest_io.write(out, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fp16_recipe.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fp16-recipe-"))
    try:
        build_engines(presets.checkpoint_path(presets.DEMO), work / "fp32", max_batch=8)
        reference = Pipeline.from_dir(work / "fp32", backend="onnxruntime", device="cpu")
        labels = [c for c in range(10) for _ in range(4)]
        ref_latents = reference.generate_many(labels, seed=1).latents

        ref_eval = evaluate(pipeline_sampler(reference), per_class=args.per_class, seed=100)
        rows = [
            {
                "variant": "fp32",
                "latent_max_abs": 0.0,
                "latent_cosine": 1.0,
                "accuracy": ref_eval.accuracy,
                "frechet_distance": ref_eval.frechet_distance,
            }
        ]
        for index, (variant, parts) in enumerate(VARIANTS.items()):
            target = work / f"v{index}"
            convert_dir(work / "fp32", target, parts)
            pipe = Pipeline.from_dir(target, backend="onnxruntime", device="cpu")
            latents = pipe.generate_many(labels, seed=1).latents
            a, b = ref_latents.astype(np.float64).ravel(), latents.astype(np.float64).ravel()
            result = evaluate(pipeline_sampler(pipe), per_class=args.per_class, seed=100)
            rows.append(
                {
                    "variant": variant,
                    "latent_max_abs": float(np.max(np.abs(a - b))),
                    "latent_cosine": float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)),
                    "accuracy": result.accuracy,
                    "frechet_distance": result.frechet_distance,
                }
            )
        print(f"{'variant':32} {'latent max abs':>15} {'latent cosine':>14} {'accuracy':>9} {'FD':>7}")
        for row in rows:
            print(
                f"{row['variant']:32} {row['latent_max_abs']:15.5f} {row['latent_cosine']:14.8f} "
                f"{row['accuracy']:9.3f} {row['frechet_distance']:7.3f}"
            )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {"model": presets.DEMO, "samples": 10 * args.per_class, "latent_requests": len(labels), "rows": rows},
                indent=2,
            )
            + "\n"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
