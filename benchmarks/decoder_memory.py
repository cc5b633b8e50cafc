"""Peak memory of the decoder at batch 8: one call vs the runtime's sub-batches
(``ecar_export.families.ecar.contract.decoder_batch``).

Exports a preset's decoder graph (the benchmark weights of ``_common.benchmark_model``; default
ecar-b's KL-16, 256² images) once into benchmarks/.cache/, then runs it in fresh processes on ONNX
Runtime with the runtime's session options: the whole batch in one call, and the batch in the
runtime's sub-batches. Each process reports its peak RSS before and after the decode (ru_maxrss)
and the seconds it took. JSON to benchmarks/results/decoder_memory.json.

    python benchmarks/decoder_memory.py [--preset ecar-b] [--batch 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
RESULTS = ROOT / "benchmarks" / "results"

CHILD = """
import json, resource, sys, time
import numpy as np
import onnxruntime as ort
from runtime.backends.onnxruntime_backend import session_options
graph, batch, step, tokens, channels, threads = sys.argv[1], *map(int, sys.argv[2:7])
session = ort.InferenceSession(graph, session_options(threads), providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).standard_normal((batch, tokens, channels)).astype(np.float32)
session.run(None, {"x": x[:1]})  # load and warm up at batch 1
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
images = np.concatenate([session.run(None, {"x": x[i : i + step]})[0] for i in range(0, batch, step)])
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"sub_batch": step, "rss_before_mb": before, "peak_rss_mb": peak, "seconds": seconds,
                  "image_shape": list(images.shape)}))
"""


def export_decoder(preset: str) -> tuple[Path, object]:
    from _common import benchmark_model

    from ecar_export import presets
    from ecar_export.export import export_graph
    from ecar_export.families.ecar.contract import decoder_spec

    config = presets.architecture(preset)
    path = CACHE / f"decoder-{preset}" / "decoder.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        export_graph(benchmark_model(preset)[0], decoder_spec(config), path)
    return path, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ecar-b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from ecar_export.families.ecar.contract import decoder_batch

    graph, config = export_decoder(args.preset)
    runs = []
    for step in (args.batch, decoder_batch(config)):  # type: ignore[arg-type]
        command = [sys.executable, "-c", CHILD, str(graph), str(args.batch), str(step)]
        command += [str(config.tokens_per_stage[-1]), str(config.latent_channels), str(args.threads)]  # type: ignore[attr-defined]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    record = {"preset": args.preset, "batch": args.batch, "threads": args.threads, "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "decoder_memory.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'sub-batch':>9} {'RSS before MB':>14} {'peak RSS MB':>12} {'seconds':>8}")
    for run in runs:
        print(f"{run['sub_batch']:>9} {run['rss_before_mb']:>14.0f} {run['peak_rss_mb']:>12.0f} {run['seconds']:>8.1f}")


if __name__ == "__main__":
    main()
