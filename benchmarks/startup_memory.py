"""Start-up and memory: a runtime-only process against a torch-reference process, same request.

Each measurement runs in a fresh interpreter: the time of ``import runtime``; the time from
``Pipeline.from_dir`` to the first image; and the peak resident memory (``ru_maxrss``) of a
process that generates one batch with the runtime, next to one that generates the same batch
with the torch reference model. Median of ``--repeats`` fresh processes each. Prints a table;
writes benchmarks/results/startup_memory.json.

    python benchmarks/startup_memory.py [--engine-dir engines] [--batch 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

IMPORT_RUNTIME = """
import time
start = time.perf_counter()
import runtime
print(time.perf_counter() - start)
"""

RUNTIME_REQUEST = """
import resource, sys, time
start = time.perf_counter()
from runtime import Pipeline
pipe = Pipeline.from_dir(sys.argv[1], backend="onnxruntime", device="cpu")
pipe.generate([i % pipe.config.num_classes for i in range(int(sys.argv[2]))], seed=0)
elapsed = time.perf_counter() - start
print(elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "torch" in sys.modules)
"""

TORCH_REQUEST = """
import resource, sys, time
start = time.perf_counter()
from ecar_export import presets
model = presets.load(presets.DEMO)
model.sample([i % model.config.num_classes for i in range(int(sys.argv[2]))], seed=0)
elapsed = time.perf_counter() - start
print(elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "torch" in sys.modules)
"""


def run(code: str, *args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], check=True, capture_output=True,
                         text=True)  # fmt: skip
    return out.stdout.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-dir", type=Path, default=Path("engines"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "startup_memory.json")
    args = parser.parse_args()
    if not (args.engine_dir / "manifest.json").is_file():
        from ecar_export.build import build_engines

        build_engines(None, args.engine_dir)
    load_start = [round(v, 2) for v in os.getloadavg()]  # the machine is shared: high load, noisy times
    imports = [float(run(IMPORT_RUNTIME)[0]) for _ in range(args.repeats)]
    runtime_runs = [run(RUNTIME_REQUEST, str(args.engine_dir), str(args.batch)) for _ in range(args.repeats)]
    torch_runs = [run(TORCH_REQUEST, str(args.engine_dir), str(args.batch)) for _ in range(args.repeats)]
    assert all(r[2] == "False" for r in runtime_runs), "the runtime process imported torch"
    result = {
        "engine_dir": str(args.engine_dir),
        "batch": args.batch,
        "repeats": args.repeats,
        "import_runtime_s": statistics.median(imports),
        "runtime_first_image_s": statistics.median(float(r[0]) for r in runtime_runs),
        "torch_first_image_s": statistics.median(float(r[0]) for r in torch_runs),
        "runtime_peak_rss_mb": statistics.median(float(r[1]) for r in runtime_runs),
        "torch_peak_rss_mb": statistics.median(float(r[1]) for r in torch_runs),
    }
    result["rss_ratio"] = result["runtime_peak_rss_mb"] / result["torch_peak_rss_mb"]
    result["load_average_at_start"] = load_start
    result["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print(f"import runtime                      {1000 * result['import_runtime_s']:8.1f} ms")
    print(
        f"from_dir -> first image (runtime)   {result['runtime_first_image_s']:8.2f} s   "
        f"(torch reference, load + sample: {result['torch_first_image_s']:.2f} s)"
    )
    print(
        f"peak RSS, batch {args.batch}: runtime {result['runtime_peak_rss_mb']:.0f} MB, "
        f"torch {result['torch_peak_rss_mb']:.0f} MB ({100 * result['rss_ratio']:.0f} %)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
