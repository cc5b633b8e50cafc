"""Where OpenVINO's memory goes on one build: each graph's share, and dynamic against static shapes.

Each probe is a fresh runtime-only process reading ``/proc/self/status`` (anonymous memory, what the
process really holds; the mapped weights files are file-backed and not counted here):

* ``graphs`` — one request of ``--batch`` on the backend as it is (every graph compiled once with
  dynamic shapes), then each graph's ``CompiledModel.release_memory()`` in turn (with glibc's
  ``malloc_trim``): what each graph keeps after a request;
* ``dynamic`` — the backbone alone, compiled as the backend compiles it; memory after compiling and
  after its first call at each stage, then one timed pass over the stages;
* ``static-last`` — the backbone reshaped to the last stage's shapes and compiled: memory and the time
  of that stage's call;
* ``static-per-stage`` — one compiled backbone per stage, each reshaped to its stage: what a backend
  with static shapes would hold, and one timed pass over the stages.

Inputs are zeros of the stage's shapes with the build's own stage constants (memory and time do not
depend on the values). The build is the cached ``benchmarks/.cache/engines/<preset>/<precision>`` of
``openvino_memory.py``. Writes benchmarks/results/openvino_shapes_<preset>.json.

    python benchmarks/openvino_shapes.py [--preset ecar-b] [--precision fp32] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from typing import Any

from _common import RESULTS, begin_run, machine, write_json
from openvino_memory import engine_dir

PROBES = ("graphs", "dynamic", "static-last", "static-per-stage")

PROBE = """
import ctypes, json, sys, time
import numpy as np
def anon():
    with open("/proc/self/status") as handle:
        return int(next(line.split()[1] for line in handle if line.startswith("RssAnon"))) // 1024
directory, probe, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
import openvino as ov
from runtime import manifest as manifest_io
from runtime.backends import openvino_backend as ovb
manifest = manifest_io.load(directory)
trim = ctypes.CDLL("libc.so.6").malloc_trim
out = {"start_mb": anon()}
if probe == "graphs":
    from runtime.pipeline import Pipeline
    backend = ovb.OpenVINOBackend(manifest)
    pipe = Pipeline(manifest, backend)
    out["loaded_mb"] = anon()
    start = time.perf_counter()
    pipe.generate([i % pipe.model.num_classes for i in range(batch)], seed=0)
    out["request_s"] = time.perf_counter() - start
    out["after_request_mb"] = before = anon()
    out["held_by_graph_mb"] = {}
    for name, compiled in backend.compiled.items():
        compiled.release_memory(); trim(0)
        out["held_by_graph_mb"][name] = before - anon()
        before = anon()
    out["after_releasing_all_mb"] = anon()
else:
    entry = manifest.graphs["backbone"]
    spec = entry.spec
    stages = manifest.plan.graph_stages(spec.kind)
    def feeds(stage):
        dims, constants = manifest.plan.dims(stage, batch), manifest.constants.get(spec.name, stage)
        return {t.name: np.array(constants[t.name]) if t.name in constants
                else np.zeros(t.concrete(dims), np.dtype(t.dtype)) for t in spec.inputs}
    core = ov.Core()
    config = ovb.compile_config(entry.precision, ovb.cpu_capabilities(core), None, entry.bf16_safe)
    model = core.read_model(str(manifest.path(entry.file)))
    def static(stage):
        copy = model.clone()
        copy.reshape({name: ov.PartialShape(list(value.shape)) for name, value in feeds(stage).items()})
        return core.compile_model(copy, "CPU", config)
    out["tokens"] = [manifest.plan.dims(s, batch)["N"] for s in stages]
    if probe == "dynamic":
        request = core.compile_model(model, "CPU", config).create_infer_request()
        out["compiled_mb"] = anon()
        out["after_stage_mb"] = []
        for stage in stages:
            request.infer(feeds(stage)); out["after_stage_mb"].append(anon())
        start = time.perf_counter()
        for stage in stages:
            request.infer(feeds(stage))
        out["all_stages_s"] = time.perf_counter() - start
        start = time.perf_counter(); request.infer(feeds(stages[-1])); out["last_stage_s"] = time.perf_counter() - start
    elif probe == "static-last":
        request = static(stages[-1]).create_infer_request()
        out["compiled_mb"] = anon()
        request.infer(feeds(stages[-1])); out["after_call_mb"] = anon()
        start = time.perf_counter(); request.infer(feeds(stages[-1])); out["last_stage_s"] = time.perf_counter() - start
    else:
        requests = []
        out["after_stage_mb"] = []
        for stage in stages:
            request = static(stage).create_infer_request()
            request.infer(feeds(stage)); requests.append(request); out["after_stage_mb"].append(anon())
        start = time.perf_counter()
        for stage, request in zip(stages, requests):
            request.infer(feeds(stage))
        out["all_stages_s"] = time.perf_counter() - start
out["peak_rss_mb"] = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM"))) // 1024
print(json.dumps(out))
"""


def run_probe(directory: Any, probe: str, batch: int) -> dict[str, Any]:
    command = [sys.executable, "-c", textwrap.dedent(PROBE), str(directory), probe, str(batch)]
    env = {**os.environ, "ECAR_OPENVINO_RELEASE": "0"}  # the default backend: nothing released before it is measured
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"probe '{probe}' failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ecar-b")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    begin_run()
    directory, weights = engine_dir(args.preset, args.precision, args.batch)
    found = {}
    for probe in PROBES:
        found[probe] = run_probe(directory, probe, args.batch)
        print(f"{probe}: {json.dumps(found[probe])}", flush=True)
    write_json(
        RESULTS / f"openvino_shapes_{args.preset}.json",
        {
            "preset": args.preset,
            "precision": args.precision,
            "batch": args.batch,
            "engine_dir": str(directory),
            **weights,
            "probes": found,
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
