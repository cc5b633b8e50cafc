#!/usr/bin/env python3
"""Models of paper scale: build, size, memory and parity of ``ecar-h`` (2.1 B parameters) on this machine.

    python benchmarks/scale.py [--presets ecar-h,ecar-b] [--precisions fp32,fp16] [--reuse]

For every preset (seeded random weights; see ``WEIGHTS``: the presets' DiT-style zero init would
make the check vacuous) and precision, each step in a
fresh process of its own, so that its peak resident memory (``wait4``'s ``ru_maxrss``) is its
own:

* **build** — ``build_engines`` from the preset, as ``ecar-export build --preset`` does: the
  time of each phase (model init, each graph's export and precision recipe, the commit) from
  the build's progress callback, and the process's peak RSS against the model's fp32 weight
  bytes (target: <= 2.5x);
* **size** — every file the manifest names, against the fp32 weight bytes (targets: <= 1.1x
  for fp32 builds, <= 0.6x for fp16);
* **parity** (``--request`` default: one sample, class 207, seed 0) — the torch reference in one
  process, the runtime (``Pipeline.from_dir``, ONNX Runtime CPU) on each build in another; their
  latents compared: max |diff| against 1e-3 * max(1, max |ref|) for fp32 (the parity tests'
  bound), cosine for fp16. Load and request seconds and peak RSS of each process are kept.

Builds go to ``benchmarks/.cache/scale/`` (gitignored; ecar-h needs 13 GB of disk for both
precisions). ``--reuse`` keeps existing builds instead of rebuilding (their build phases are
then not measured). Prints a table; writes ``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import CACHE, RESULTS, load_average, machine, write_json  # noqa: E402

# Presets without trained weights start as a DiT-style init: zero AdaLN gates and a zero output layer,
# so every block is the identity and the flow head predicts u = 0 -- a parity check on such a model
# compares little more than the noise. Every step here loads the preset and then gives it non-trivial
# weights: unit-variance embeddings and random (1/sqrt(fan-in)) values where the init put zeros; the
# same seeded weights in every process.
WEIGHTS = """
import math
import torch
from ecar_export import presets

def load(name):
    model = presets.load(name)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith(("class_embed.weight", "level_embed.weight", "pos_embed", "start_token")):
                param.copy_(torch.randn(param.shape, generator=generator))
            elif param.ndim == 2 and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[1]))
    return model
"""

# every child: load the preset with its seeded weights, timed (sys.argv[1] names the preset)
TIMED_LOAD = (
    WEIGHTS
    + """
import json, sys, time
begin = time.perf_counter()
model = load(sys.argv[1])
loaded = time.perf_counter()
"""
)

BUILD = (
    TIMED_LOAD
    + """
from ecar_export.build import build_engines
marks = []
build_engines(model, sys.argv[2], precision=sys.argv[3], backend="onnxruntime", force=True,
              progress=lambda name, done, total: marks.append((name, time.perf_counter())))
end = time.perf_counter()
phases = {"model init (seeded random weights)": loaded - begin}
if marks:
    phases["hash weights, open the directory"] = marks[0][1] - loaded
for (name, start), (_, stop) in zip(marks, marks[1:]):  # each phase lasts until the next one starts
    phases[name] = stop - start
phases["commit and sweep"] = end - marks[-1][1] if marks else end - loaded
weights = sum(p.numel() * 4 for p in model.parameters())
params = sum(p.numel() for p in model.parameters())
print(json.dumps({"seconds": end - begin, "phases": phases, "fp32_weight_bytes": weights, "parameters": params}))
"""
)

TORCH = (
    TIMED_LOAD
    + """
import numpy as np
from ecar_export.torch_walk import TorchWalk
labels, seed = json.loads(sys.argv[3])
with torch.inference_mode():
    result = TorchWalk(model).generate(labels, seed=seed)
end = time.perf_counter()
np.save(sys.argv[2], result.latents.numpy())
print(json.dumps({"load_seconds": loaded - begin, "request_seconds": end - loaded}))
"""
)

RUNTIME = """
import json, sys, time
import numpy as np
begin = time.perf_counter()
from runtime import Pipeline
pipe = Pipeline.from_dir(sys.argv[1], backend="onnxruntime", device="cpu")
loaded = time.perf_counter()
labels, seed = json.loads(sys.argv[3])
result = pipe.generate(labels, seed=seed)
end = time.perf_counter()
np.save(sys.argv[2], result.latents)
print(json.dumps({"load_seconds": loaded - begin, "request_seconds": end - loaded,
                  "torch_imported": "torch" in sys.modules}))
"""


def run_child(code: str, *args: str) -> tuple[dict[str, Any], float]:
    """Run ``code`` in a fresh interpreter: its JSON result and its peak RSS in bytes (from wait4).

    Linux carries the parent's RSS at fork across exec into the child's ``ru_maxrss``, so this is
    the larger of the child's own peak and this process's size; this process stays small (numpy,
    no model), far below any step's peak.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # files: no pipe can fill up
        process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if process.returncode:
            raise SystemExit(f"child failed ({process.returncode}):\n{err.read()[-4000:]}")
        return json.loads(out.read().strip().splitlines()[-1]), float(usage.ru_maxrss * 1024)


def engine_bytes(directory: Path) -> int:
    from runtime import manifest as manifest_io

    return manifest_io.load(directory, verify_files=False).bytes_on_disk()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--presets", default="ecar-h", help="comma-separated presets (default ecar-h)")
    parser.add_argument("--precisions", default="fp32,fp16")
    parser.add_argument("--request", default="[[207], [0]]", help="JSON [labels, seeds] of the parity request")
    parser.add_argument("--reuse", action="store_true", help="keep existing builds (their build is not measured)")
    parser.add_argument(
        "--no-parity",
        action="store_true",
        help="builds and sizes only: no torch reference, no runtime request (FlowAR-H's take 20 minutes each here)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args(argv)
    start_load = load_average()
    rows: list[dict[str, Any]] = []
    for preset in args.presets.split(","):
        with tempfile.TemporaryDirectory(prefix=f"scale-{preset}-") as work:
            reference = Path(work) / "torch.npy"
            if not args.no_parity:
                torch_result, torch_peak = run_child(TORCH, preset, str(reference), args.request)
                ref = np.load(reference)
                seconds = torch_result["request_seconds"]
                print(f"{preset}: torch reference {seconds:.1f} s, peak RSS {torch_peak / 2**30:.2f} GiB")
            for precision in args.precisions.split(","):
                out = CACHE / "scale" / f"{preset}-{precision}"
                row: dict[str, Any] = {"preset": preset, "precision": precision, "engine_dir": str(out)}
                if not (args.reuse and (out / "manifest.json").is_file()):
                    build, peak = run_child(BUILD, preset, str(out), precision)
                    row["build"] = {**build, "peak_rss_bytes": peak}
                    row["build"]["peak_rss_vs_fp32_weights"] = peak / build["fp32_weight_bytes"]
                    weights = build["fp32_weight_bytes"]
                    print(
                        f"  build {precision}: {build['seconds']:.0f} s, peak RSS {peak / 2**30:.2f} GiB "
                        f"= {peak / weights:.2f} x the fp32 weights ({weights / 2**30:.2f} GiB)"
                    )
                size = engine_bytes(out)
                weights = row.get("build", {}).get("fp32_weight_bytes") or _weights(preset)
                row["size"] = {"engine_bytes": size, "fp32_weight_bytes": weights, "ratio": size / weights}
                rows.append(row)
                print(f"  {precision}: engines {size / 2**30:.2f} GiB = {size / weights:.2f} x the fp32 weights")
                if args.no_parity:
                    continue
                latents = Path(work) / f"{precision}.npy"
                runtime_result, runtime_peak = run_child(RUNTIME, str(out), str(latents), args.request)
                got = np.load(latents)
                diff = float(np.max(np.abs(got - ref)))
                bound = 1e-3 * max(1.0, float(np.max(np.abs(ref))))
                cosine = float(np.dot(got.ravel(), ref.ravel()) / (np.linalg.norm(got) * np.linalg.norm(ref)))
                row["parity"] = {
                    "request": json.loads(args.request),
                    "latents_max_abs": diff,
                    "fp32_bound": bound,
                    "within_fp32_bound": diff <= bound,
                    "cosine": cosine,
                    "torch": {**torch_result, "peak_rss_bytes": torch_peak},
                    "runtime": {**runtime_result, "peak_rss_bytes": runtime_peak},
                }
                load, request = runtime_result["load_seconds"], runtime_result["request_seconds"]
                print(
                    f"  {precision}: batch-1 latents "
                    f"max |diff| {diff:.2e} (bound {bound:.1e}), cosine {cosine:.6f}; runtime load {load:.1f} s, "
                    f"request {request:.1f} s, peak RSS {runtime_peak / 2**30:.2f} GiB"
                )
    write_json(
        args.out,
        {
            "benchmark": "scale",
            "rows": rows,
            "targets": {
                "build_peak_rss_vs_fp32_weights": 2.5,
                "engine_bytes_vs_fp32_weights": {"fp32": 1.1, "fp16": 0.6},
                "fp32_latents": "max |diff| <= 1e-3 * max(1, max |ref|)",
            },
            "machine": machine(),
            "load_average": {"start": start_load, "end": load_average()},
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )
    return 0


def _weights(preset: str) -> int:
    """fp32 weight bytes of a preset, counted from its config without building the model."""
    import torch

    from ecar_export import families, presets
    from ecar_export.families.ecar.model import ECAR

    others = {name: (f, c) for f in families.all_families() for name, c in f.presets.items()}
    with torch.device("meta"):
        if preset in others:
            family, config = others[preset]
            model = family.create(config)
        else:
            model = ECAR(presets.architecture(preset))
    return sum(p.numel() * 4 for p in model.parameters())


if __name__ == "__main__":
    sys.exit(main())
