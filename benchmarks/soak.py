"""Soak test of the runtime: many requests on one Pipeline, watching memory and latency drift.

Runs ``--requests`` generate calls (random labels and seeds, batch 1..max) on one Pipeline
from several threads, samples the process's resident memory and each request's latency,
and reports RSS growth and the latency drift between the first and last tenth of the run.
The first tenth is the warm-up: ONNX Runtime's memory arena grows there to the largest
concurrent working set and is kept. Fails (exit 1) if RSS grows by more than
``--max-rss-growth-mb`` after the warm-up.

    python benchmarks/soak.py [--engine-dir engines] [--requests 600] [--threads 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from runtime.pipeline import Pipeline


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-dir", type=Path, default=Path("engines"))
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--max-rss-growth-mb", type=float, default=50.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "soak.json")
    args = parser.parse_args()
    if not (args.engine_dir / "manifest.json").is_file():
        from ecar_export.build import build_engines

        build_engines(None, args.engine_dir)
    pipe = Pipeline.from_dir(args.engine_dir, backend="onnxruntime", device="cpu")
    classes, max_batch = pipe.model.num_classes, pipe.max_batch
    pipe.generate([0], seed=0)
    warm_rss = rss_mb()
    latencies: list[tuple[int, float]] = []
    rss_samples: list[tuple[int, float]] = []
    lock = threading.Lock()
    counter = iter(range(args.requests))

    def worker(thread: int) -> None:
        rng = np.random.default_rng(thread)
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            labels = rng.integers(0, classes, size=int(rng.integers(1, max_batch + 1))).tolist()
            start = time.perf_counter()
            pipe.generate(labels, seed=int(rng.integers(0, 2**31)))
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append((index, elapsed / len(labels)))
                if index % 25 == 0:
                    rss_samples.append((index, rss_mb()))

    begin = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - begin
    final_rss = rss_mb()
    ordered = [lat for _, lat in sorted(latencies)]
    tenth = max(1, len(ordered) // 10)
    after_warmup = [mb for index, mb in sorted(rss_samples) if index >= tenth]
    warm_rss = after_warmup[0] if after_warmup else warm_rss
    first, last = statistics.median(ordered[:tenth]), statistics.median(ordered[-tenth:])
    result = {
        "engine_dir": str(args.engine_dir),
        "requests": len(ordered),
        "threads": args.threads,
        "wall_s": wall,
        "rss_after_first_tenth_mb": warm_rss,
        "rss_final_mb": final_rss,
        "rss_growth_mb": final_rss - warm_rss,
        "rss_samples_mb": [mb for _, mb in sorted(rss_samples)],
        "median_latency_per_image_first_tenth_ms": 1000 * first,
        "median_latency_per_image_last_tenth_ms": 1000 * last,
        "latency_drift": last / first - 1.0,
    }
    print(f"{result['requests']} requests on {args.threads} threads in {wall:.1f} s")
    print(f"RSS {warm_rss:.1f} MB after the first tenth -> {final_rss:.1f} MB ({result['rss_growth_mb']:+.1f} MB)")
    print(
        f"median latency per image: first tenth {1000 * first:.2f} ms, last tenth {1000 * last:.2f} ms "
        f"(drift {100 * result['latency_drift']:+.1f} %)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["rss_growth_mb"] > args.max_rss_growth_mb else 0


if __name__ == "__main__":
    raise SystemExit(main())
