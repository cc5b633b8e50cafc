"""Peak memory of feeding a quantizer one graph's calibration split: feeds made on demand vs all kept.

An INT8 build hands ``calibration.readers.GraphReader`` to ONNX Runtime's calibrator, one reader per
row group (the backbone's stages). The reader makes each feed when the calibrator asks for it and
keeps only which rows each call takes; before, it made every feed of the split up front and every
group's reader made its own again. This script reads a kept calibration set (default: ecar-b's, made by
``pipeline_speed.py --build-only``) in fresh processes and walks every feed of one graph (default the
backbone, whose KV-cache inputs make it the largest) both ways, without running the graph:

* ``on_demand``: what the build does now (``GraphReader(...).parts()``, each part walked);
* ``kept``: what it did before, emulated: every feed of the split made into one list, then each
  group's feeds made into a list of their own, walked, and kept until the end.

Each process reports its peak RSS (ru_maxrss) after loading the set's arrays and after the walk.
JSON to benchmarks/results/calibration_reader_memory.json.

    python benchmarks/calibration_reader_memory.py [--set DIR] [--graph backbone]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import RESULTS, machine, write_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SET = ROOT / "benchmarks" / ".cache" / "engines" / "ecar-b" / "int8" / "calibration"

CHILD = """
import json, resource, sys
from calibration import load_calibration
from calibration.readers import GraphReader

root, graph, mode = sys.argv[1], sys.argv[2], sys.argv[3]
calibration = load_calibration(root, verify=False)
for group in calibration.groups(graph):
    calibration.rows(graph, "calibration", group)  # the set's arrays, read once (both ways hold them)
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
reader = GraphReader(calibration, graph)
calls, kept = 0, []
if mode == "on_demand":
    for part in reader.parts():
        while (feed := part.get_next()) is not None:
            calls += 1
else:
    kept.append(list(calibration.feeds(graph, "calibration", fixed=True)))
    for group in calibration.groups(graph):
        kept.append(list(calibration.feeds(graph, "calibration", fixed=True, group=group)))
        calls += len(kept[-1])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"mode": mode, "calls": calls, "rss_after_loading_mb": round(loaded, 1),
                  "peak_rss_mb": round(peak, 1)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", type=Path, default=DEFAULT_SET, help="a kept calibration set directory")
    parser.add_argument("--graph", default="backbone")
    parser.add_argument("--out", type=Path, default=RESULTS / "calibration_reader_memory.json")
    args = parser.parse_args()
    if not (args.set / "calibration.json").is_file():
        sys.exit(f"error: '{args.set}' holds no calibration set; build ecar-b's int8 variant first")
    rows = []
    for mode in ("on_demand", "kept"):
        run = subprocess.run(
            [sys.executable, "-c", CHILD, str(args.set), args.graph, mode],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        if run.returncode != 0:
            sys.exit(f"error: the {mode} walk failed:\n{run.stderr}")
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(
            f"{mode:>10}: {rows[-1]['calls']} calls, peak RSS {rows[-1]['peak_rss_mb']:.0f} MB "
            f"({rows[-1]['rss_after_loading_mb']:.0f} MB after loading the set's arrays)"
        )
    write_json(
        args.out,
        {"set": str(args.set), "graph": args.graph, "rows": rows, "machine": machine()},
    )


if __name__ == "__main__":
    main()
