#!/usr/bin/env python3
"""The demo's guidance sweep: the quality yardstick (``ecar-export eval``) at several cfg values.

    python benchmarks/cfg_sweep.py [--cfg 1.0,1.25,...] [--per-class 50]

Runs the torch reference of the bundled ``ecar-digits`` checkpoint on the README's protocol
(labels 0..9 × 50, sample i seeded with i) once per guidance weight, prints class accuracy and
Fréchet distance per value, and names the default the demo should ship with: the lowest
Fréchet distance among the values with at least 99 % class accuracy. Writes
``benchmarks/results/cfg_sweep.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS, load_average, machine, write_json  # noqa: E402

MIN_ACCURACY = 0.99
DEFAULT_VALUES = "0.75,1.0,1.1,1.2,1.3,1.4,1.5,1.75,2.0,2.5"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--cfg", default=DEFAULT_VALUES, help=f"comma-separated guidance weights ({DEFAULT_VALUES})")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS / "cfg_sweep.json")
    args = parser.parse_args(argv)
    import torch

    from ecar_export import presets
    from ecar_export.evaluate import evaluate, torch_sampler

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = presets.load(presets.DEMO)
    rows = []
    start_load = load_average()
    print(f"{'cfg':>5} {'accuracy':>9} {'Fréchet':>8} {'seconds':>8}")
    for value in (float(v) for v in args.cfg.split(",")):
        begin = time.perf_counter()
        result = evaluate(torch_sampler(model, cfg=value), per_class=args.per_class)
        seconds = time.perf_counter() - begin
        rows.append({"cfg": value, **result.to_dict(), "seconds": round(seconds, 2)})
        print(f"{value:>5.2f} {100 * result.accuracy:>8.1f}% {result.frechet_distance:>8.3f} {seconds:>8.1f}")
    eligible = [row for row in rows if row["accuracy"] >= MIN_ACCURACY]
    best = min(eligible, key=lambda row: row["frechet_distance"]) if eligible else None
    shipped = model.config.cfg_scale
    print(
        f"\nbest with >= {100 * MIN_ACCURACY:.0f} % accuracy: cfg {best['cfg'] if best else None}; shipped: {shipped}"
    )
    write_json(
        args.out,
        {
            "benchmark": "cfg_sweep",
            "model": presets.DEMO,
            "protocol": f"torch reference, labels 0..9 x {args.per_class}, sample i seeded with i",
            "min_accuracy": MIN_ACCURACY,
            "rows": rows,
            "best_cfg": best["cfg"] if best else None,
            "shipped_cfg": shipped,
            "machine": machine(),
            "load_average": {"start": start_load, "end": load_average()},
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
