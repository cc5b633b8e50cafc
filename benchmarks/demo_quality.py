#!/usr/bin/env python3
"""The demo's quality on every engine: the yardstick of ``ecar-export eval`` per precision and CPU backend.

    python benchmarks/demo_quality.py [--precisions fp32,fp16,int8] [--backends onnxruntime,openvino]
        [--per-class 50]

Builds (or reuses) the bundled ``ecar-digits`` checkpoint at each precision into
``benchmarks/.cache/engines/ecar-digits/<precision>`` (the builds ``pipeline_speed.py`` times),
then scores the torch reference and every build on every installed backend on the README's
protocol (labels 0..9 × ``--per-class``, sample i seeded with i, the model's default guidance):
class accuracy and Fréchet distance. Each engine row also gets its distance from the fp32 row
of the same backend, against the bounds the project holds half precision and int8 to (class
accuracy within 1 point, Fréchet distance within 10 %). Writes
``benchmarks/results/demo_quality.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import CACHE, RESULTS, load_average, machine, write_json  # noqa: E402

ACCURACY_POINTS = 0.01  # half precision and int8 within 1 point of fp32's class accuracy
FRECHET_FRACTION = 0.10  # and within 10 % of its Fréchet distance


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--precisions", default="fp32,fp16,int8")
    parser.add_argument("--backends", default="onnxruntime,openvino")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS / "demo_quality.json")
    args = parser.parse_args(argv)
    from ecar_export import presets
    from ecar_export.build import build_engines
    from ecar_export.evaluate import evaluate, pipeline_sampler, torch_sampler
    from runtime.pipeline import Pipeline

    started, load_start = time.time(), load_average()
    precisions = [p for p in args.precisions.split(",") if p]
    backends = [b for b in args.backends.split(",") if b and importlib.util.find_spec(b) is not None]
    model = presets.load(presets.DEMO).eval()

    rows: list[dict[str, Any]] = [
        {"source": "torch reference", **evaluate(torch_sampler(model), per_class=args.per_class).to_dict()}
    ]
    print(f"torch reference: {rows[0]['accuracy']:.3f} / {rows[0]['frechet_distance']:.3f}", flush=True)
    for precision in precisions:
        out = CACHE / "engines" / presets.DEMO / precision
        build_engines(model, out, precision=precision)
        for backend in backends:
            pipe = Pipeline.from_dir(out, backend=backend)
            result = evaluate(pipeline_sampler(pipe), per_class=args.per_class).to_dict()
            rows.append({"source": "engines", "precision": precision, "backend": backend, **result})
            print(f"{precision} on {backend}: {result['accuracy']:.3f} / {result['frechet_distance']:.3f}", flush=True)
    for row in rows[1:]:
        fp32 = next((r for r in rows[1:] if r["precision"] == "fp32" and r["backend"] == row["backend"]), None)
        if fp32 is None or row is fp32:
            continue
        row["accuracy_points_vs_fp32"] = row["accuracy"] - fp32["accuracy"]
        row["frechet_fraction_vs_fp32"] = row["frechet_distance"] / fp32["frechet_distance"] - 1
        row["within_bounds"] = (
            abs(row["accuracy_points_vs_fp32"]) <= ACCURACY_POINTS
            and abs(row["frechet_fraction_vs_fp32"]) <= FRECHET_FRACTION
        )
    write_json(
        args.out,
        {
            "benchmark": "demo_quality",
            "protocol": f"labels 0..9 x {args.per_class}, sample i seeded with i, default guidance",
            "bounds_vs_fp32": {"accuracy_points": ACCURACY_POINTS, "frechet_fraction": FRECHET_FRACTION},
            "rows": rows,
            "machine": {**machine(), "load_average_at_start": load_start, "load_average_at_end": load_average()},
            "wall_minutes": (time.time() - started) / 60,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
