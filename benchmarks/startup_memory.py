"""Start-up and memory: a runtime-only process against a torch-reference process, same request.

For every ``--presets`` entry (default the bundled ``ecar-digits`` and ``ecar-b``, both in one
run), each measurement in a fresh interpreter: the time of ``import runtime``; the time from
``Pipeline.from_dir`` to the first image; and the peak resident memory (``VmHWM``: the process's
own high-water mark) of a process that generates one batch with the runtime (fp32 build; on ONNX
Runtime, the target's row, and on OpenVINO), next to one that generates the same batch with the
torch reference model (both with the benchmark weights of ``_common.benchmark_model``: no
zero tensors, the same weights the build holds). Median of ``--repeats`` fresh processes each. Prints a table; writes
benchmarks/results/startup_memory.json.

Builds: the demo's is ``--engine-dir`` (default ``engines``, what ``make demo`` builds); other
presets use ``benchmarks/.cache/engines/<preset>/fp32`` (shared with pipeline_speed.py), built
when missing.

    python benchmarks/startup_memory.py [--presets ecar-digits,ecar-b] [--batch 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from _common import CACHE, RESULTS, benchmark_model, machine, write_json

IMPORT_RUNTIME = """
import time
start = time.perf_counter()
import runtime
print(time.perf_counter() - start)
"""

# The process's own peak: Linux's VmHWM, the high-water mark of this address space. (``ru_maxrss``
# is not: Linux carries the parent's RSS at fork across exec into it, so a child of a large parent
# reads the parent's size.)
PEAK_RSS_MB = """
def peak_rss_mb():
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

RUNTIME_REQUEST = """
import sys, time
start = time.perf_counter()
from runtime import Pipeline
pipe = Pipeline.from_dir(sys.argv[1], backend=sys.argv[3])
pipe.generate([i % pipe.model.num_classes for i in range(int(sys.argv[2]))], seed=0)
elapsed = time.perf_counter() - start
print(elapsed, peak_rss_mb(), "torch" in sys.modules)
"""

TORCH_REQUEST = """
import sys, time
start = time.perf_counter()
import torch
sys.path.insert(0, BENCHMARKS)
from _common import benchmark_model
model, _ = benchmark_model(sys.argv[1])
with torch.no_grad():
    model.sample([i % model.config.num_classes for i in range(int(sys.argv[2]))], seed=0)
elapsed = time.perf_counter() - start
print(elapsed, peak_rss_mb(), "torch" in sys.modules)
"""

TORCH_REQUEST = TORCH_REQUEST.replace("BENCHMARKS", repr(str(Path(__file__).resolve().parent)))

TARGETS = {"ecar-digits": 0.40, "ecar-b": 1.00}  # runtime peak RSS / torch reference peak RSS


def run(code: str, *args: str) -> list[str]:
    command = [sys.executable, "-c", PEAK_RSS_MB + textwrap.dedent(code), *args]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return out.stdout.split()


def engine_dir(preset: str, demo_dir: Path) -> Path:
    from ecar_export import presets

    directory = demo_dir if preset == presets.DEMO else CACHE / "engines" / preset / "fp32"
    if not (directory / "manifest.json").is_file():
        from ecar_export.build import build_engines

        build_engines(benchmark_model(preset)[0] if preset not in presets.TRAINED else None, directory)
    return directory


def measure(preset: str, directory: Path, batch: int, repeats: int) -> dict[str, Any]:
    runtime_runs = [run(RUNTIME_REQUEST, str(directory), str(batch), "onnxruntime") for _ in range(repeats)]
    openvino_runs = [run(RUNTIME_REQUEST, str(directory), str(batch), "openvino") for _ in range(repeats)]
    torch_runs = [run(TORCH_REQUEST, preset, str(batch)) for _ in range(repeats)]
    assert all(r[2] == "False" for r in runtime_runs + openvino_runs), "the runtime process imported torch"
    result: dict[str, Any] = {
        "preset": preset,
        "engine_dir": str(directory),
        "batch": batch,
        "repeats": repeats,
        "runtime_first_image_s": statistics.median(float(r[0]) for r in runtime_runs),
        "torch_first_image_s": statistics.median(float(r[0]) for r in torch_runs),
        "runtime_peak_rss_mb": statistics.median(float(r[1]) for r in runtime_runs),
        "torch_peak_rss_mb": statistics.median(float(r[1]) for r in torch_runs),
        "openvino_first_image_s": statistics.median(float(r[0]) for r in openvino_runs),
        "openvino_peak_rss_mb": statistics.median(float(r[1]) for r in openvino_runs),
    }
    result["rss_ratio"] = result["runtime_peak_rss_mb"] / result["torch_peak_rss_mb"]
    result["openvino_rss_ratio"] = result["openvino_peak_rss_mb"] / result["torch_peak_rss_mb"]
    result["target_rss_ratio"] = TARGETS.get(preset)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="ecar-digits,ecar-b")
    parser.add_argument("--engine-dir", type=Path, default=Path("engines"), help="the demo's build (make demo)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "startup_memory.json")
    args = parser.parse_args()
    directories = {preset: engine_dir(preset, args.engine_dir) for preset in args.presets.split(",")}
    load_start = [round(v, 2) for v in os.getloadavg()]  # the machine is shared: high load, noisy times
    imports = [float(run(IMPORT_RUNTIME)[0]) for _ in range(args.repeats)]
    rows = [measure(preset, directory, args.batch, args.repeats) for preset, directory in directories.items()]
    result = {
        "import_runtime_s": statistics.median(imports),
        "presets": rows,
        "load_average_at_start": load_start,
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "machine": machine(),
        "weights": {preset: benchmark_model(preset)[1] for preset in directories},
    }
    print(f"import runtime {1000 * result['import_runtime_s']:.1f} ms")
    for row in rows:
        target = row["target_rss_ratio"]
        verdict = "" if target is None else (" (target met)" if row["rss_ratio"] <= target else " (TARGET MISSED)")
        goal = f", target <= {100 * target:.0f} %{verdict}" if target is not None else ""
        print(
            f"{row['preset']}: from_dir -> first image {row['runtime_first_image_s']:.2f} s (torch load + sample "
            f"{row['torch_first_image_s']:.2f} s); peak RSS, batch {args.batch}: runtime "
            f"{row['runtime_peak_rss_mb']:.0f} MB, torch {row['torch_peak_rss_mb']:.0f} MB = "
            f"{100 * row['rss_ratio']:.0f} %{goal}; on OpenVINO: first image {row['openvino_first_image_s']:.2f} s, "
            f"{row['openvino_peak_rss_mb']:.0f} MB = {100 * row['openvino_rss_ratio']:.0f} %"
        )
    write_json(args.out, result)


if __name__ == "__main__":
    main()
