"""Serving through the loss of a node: a two-node Ray cluster on this machine, client load, a killed worker node.

The cluster is Ray's own multi-node test cluster (``ray.cluster_utils.Cluster``): a head and a
worker node as separate raylets, one CPU each, so the two generator replicas (one CPU each) sit
one per node; the ingress and the HTTP proxy live on the head. ``--clients`` threads send
``/generate`` requests (npy, one or two labels, distinct seeds) back to back. Once ``--before``
answers have arrived the worker node is killed (``Cluster.remove_node``, not graceful): requests
in flight on it must end with 503 and a JSON error, later ones succeed on the head's replica.
Once ``--after`` requests sent after the kill have succeeded, the load stops, a new worker node
joins, and the time until both replicas run again is measured. Every 200 answer is compared
with ``Pipeline.generate`` of the same request in this process.

    python benchmarks/serve_failover.py [--engine-dir DIR] [--clients 16]

Without ``--engine-dir`` the tiny model of the tests is built into a temporary directory. Writes
benchmarks/results/serve_failover.json; ``tests/test_serve_multinode.py`` runs the same scenario
(``run_scenario``) with fewer clients.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, load_average, machine, write_json  # noqa: E402

GENERATOR = "ECARGenerator"


@dataclass
class Call:
    payload: dict[str, Any]
    started: float  # seconds since the scenario's clock started
    latency: float
    status: int  # 0: no HTTP answer (connection error or client timeout)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def post(url: str, payload: dict[str, Any], timeout: float) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        f"{url}/generate", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, {k.lower(): v for k, v in answer.headers.items()}, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()
    except OSError as error:
        return 0, {}, str(error).encode()


def running_replicas() -> int:
    from ray import serve

    from runtime.serving.ray_app import APP_NAME

    application = serve.status().applications.get(APP_NAME)
    if application is None or GENERATOR not in application.deployments:
        return 0
    return int(application.deployments[GENERATOR].replica_states.get("RUNNING", 0))  # type: ignore[call-overload]


def same_images(got: np.ndarray, want: np.ndarray) -> bool:
    """The serving tests' criterion: uint8 within 1 level, >= 99.9 % of pixels identical."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    return bool(diff.max(initial=0) <= 1 and (diff == 0).mean() >= 0.999)


def build_tiny(out: Path) -> Path:
    """The tests' smallest engine build (``tiny-1-2-4``, max batch 5), for a run without ``--engine-dir``."""
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tests"))
    from conftest import TINY_MAX_BATCH, engine_model

    from ecar_export.build import build_engines

    build_engines(engine_model("tiny-1-2-4"), out, max_batch=TINY_MAX_BATCH, backend="onnxruntime")
    return out


def run_scenario(
    engine_dir: Path,
    *,
    clients: int = 6,
    before: int = 30,
    after: int = 20,
    backend: str = "onnxruntime",
    batch_wait_ms: float = 100.0,
    request_timeout_s: float = 20.0,
    deadline_s: float = 120.0,
) -> dict[str, Any]:
    """Run the scenario; a summary plus ``calls`` (every request) and ``final`` (requests after the rejoin)."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from runtime.pipeline import Pipeline
    from runtime.serving import ray_app

    pipe = Pipeline.from_dir(engine_dir, backend=backend, threads=1)
    classes = pipe.model.num_classes
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    summary: dict[str, Any] = {"clients": clients, "backend": backend, "batch_wait_ms": batch_wait_ms}
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        target = ray_app.application(
            engine_dir,
            replicas=2,
            cpus_per_replica=1,
            backend=backend,
            batch_wait_ms=batch_wait_ms,
            request_timeout_s=request_timeout_s,
        )
        clock = time.monotonic()
        url = ray_app.start(target, port=free_port(), address=cluster.address, proxy_location="HeadOnly")
        summary["deploy_s"] = time.monotonic() - clock
        summary["replicas_before"] = running_replicas()

        calls: list[Call] = []
        lock = threading.Lock()
        stop = threading.Event()
        counter = iter(range(10**9))
        killed: list[float] = []  # when remove_node returned

        def client() -> None:
            while not stop.is_set():
                with lock:
                    index = next(counter)
                labels = [index % classes, (3 * index + 1) % classes][: 1 + index % 2]
                payload = {"labels": labels, "seed": 1000 + index, "format": "npy"}
                started = time.monotonic()
                status, headers, body = post(url, payload, timeout=request_timeout_s + 30)
                with lock:
                    calls.append(Call(payload, started - clock, time.monotonic() - started, status, headers, body))

        def served_after_kill() -> int:
            with lock:
                return sum(1 for c in calls if killed and c.status == 200 and c.started > killed[0])

        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + deadline_s
        while sum(1 for c in list(calls) if c.status == 200) < before and time.monotonic() < deadline:
            time.sleep(0.05)
        summary["kill_at_s"] = time.monotonic() - clock
        cluster.remove_node(worker, allow_graceful=False)
        killed.append(time.monotonic() - clock)
        summary["kill_took_s"] = killed[0] - summary["kill_at_s"]
        lowest = running_replicas()
        while served_after_kill() < after and time.monotonic() < deadline:
            lowest = min(lowest, running_replicas())
            time.sleep(0.2)
        stop.set()
        for thread in threads:
            thread.join(timeout=request_timeout_s + 60)
        summary["hung_clients"] = sum(thread.is_alive() for thread in threads)
        # Serve's controller learns of the loss from Ray's node health checks, after the requests did
        while lowest >= 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            lowest = min(lowest, running_replicas())
        summary["loss_seen_after_s"] = time.monotonic() - clock - killed[0]
        summary["replicas_after_kill"] = lowest

        rejoin = time.monotonic()
        cluster.add_node(num_cpus=1)
        while running_replicas() < 2 and time.monotonic() - rejoin < deadline_s:
            time.sleep(0.2)
        summary["recover_s"] = time.monotonic() - rejoin
        summary["replicas_after_rejoin"] = running_replicas()

        final = [{"labels": [i % classes], "seed": 10**6 + i, "format": "npy"} for i in range(2 * clients)]
        results: list[Any] = [None] * len(final)

        def final_call(i: int) -> None:
            results[i] = post(url, final[i], timeout=request_timeout_s + 30)

        pool = [threading.Thread(target=final_call, args=(i,)) for i in range(len(final))]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        final_calls = [Call(p, 0.0, 0.0, r[0], r[1], r[2]) for p, r in zip(final, results)]
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        cluster.shutdown()

    wrong = 0
    for call in [*calls, *final_calls]:
        if call.status == 200:
            got = np.load(io.BytesIO(call.body), allow_pickle=False)
            want = pipe.generate(call.payload["labels"], seed=call.payload["seed"]).images
            wrong += not same_images(got, want)
    codes: dict[str, int] = {}
    for call in calls:
        codes[str(call.status)] = codes.get(str(call.status), 0) + 1
    failed = [c for c in calls if c.status != 200]
    summary.update(
        {
            "requests": len(calls),
            "ok": codes.get("200", 0),
            "unavailable_503": codes.get("503", 0),
            "other_codes": {k: v for k, v in codes.items() if k not in ("200", "503")},
            "wrong_images": wrong,
            "max_failed_latency_s": max((c.latency for c in failed), default=None),
            "max_latency_s": max((c.latency for c in calls), default=None),
            "median_latency_s": statistics.median([c.latency for c in calls]) if calls else None,
            "final_ok": sum(c.status == 200 for c in final_calls),
            "final_requests": len(final_calls),
        }
    )
    summary["calls"] = calls
    summary["final"] = final_calls
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-dir", type=Path, default=None, help="default: build the tests' tiny model")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--before", type=int, default=60, help="answers before the worker node is killed")
    parser.add_argument("--after", type=int, default=60, help="answers sent after the kill before the load stops")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_failover.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        engine_dir = args.engine_dir or build_tiny(Path(scratch) / "engines")
        load_start = load_average()
        summary = run_scenario(
            engine_dir, clients=args.clients, before=args.before, after=args.after, backend=args.backend
        )
    calls, final = summary.pop("calls"), summary.pop("final")
    failed = [c for c in calls if c.status != 200]
    summary["failed_requests"] = [
        {
            "started_s": round(c.started, 3),
            "latency_s": round(c.latency, 3),
            "status": c.status,
            "retry_after": c.headers.get("retry-after"),
            "error": json.loads(c.body).get("error") if c.status == 503 else c.body[:200].decode(errors="replace"),
        }
        for c in failed
    ]
    del final
    results = {
        "engine_dir": str(args.engine_dir) if args.engine_dir else "tests' tiny-1-2-4 build (onnxruntime)",
        "cluster": "ray.cluster_utils.Cluster on this machine: head + 1 worker node, 1 CPU each; 2 replicas",
        "machine": machine(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        **summary,
    }
    print(json.dumps({k: v for k, v in results.items() if k not in ("machine", "failed_requests")}, indent=2))
    write_json(args.out, results)


if __name__ == "__main__":
    main()
