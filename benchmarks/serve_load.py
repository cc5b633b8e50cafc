"""Serving load: throughput and latency of `ecar-run serve` for 1 vs N concurrent clients, batched or not.

The server runs in its own process (``ecar-run serve`` on loopback, a local Ray cluster); this
process is the load generator. For each server setting — request batching on (the default
``--max-batch``, ``--batch-wait-ms``) and off (``--max-batch 1``) — and each client count, the
clients send single-image requests (distinct seeds, labels cycling over the classes) back to back
until ``--requests`` answers have arrived or ``--seconds`` have passed, after a warm-up. Reports
images/s, p50/p95 latency and the mean number of requests per engine batch; prints a table and
writes benchmarks/results/serve_load.json. First, for scale, the same engines' images/s in this
process at batch 1 and at the max batch: their ratio bounds what batching can buy.

    python benchmarks/serve_load.py [--engine-dir engines] [--backend auto] [--clients 1,8,16,32] [--requests 96]

``--backend`` is resolved once, in this process, and the server gets the backend it resolved to,
recorded in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, load_average, machine, write_json  # noqa: E402

from runtime import manifest as manifest_io  # noqa: E402

ECAR_RUN = str(Path(sys.executable).parent / "ecar-run")
SETTINGS = {"batching": [], "no batching": ["--max-batch", "1"]}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(engine_dir: Path, extra: list[str], timeout: float = 180) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [ECAR_RUN, "serve", "--engine-dir", str(engine_dir), "--port", str(port), *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"ecar-run serve exited with {process.returncode}: {process.stderr.read().decode()}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as answer:
                if answer.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"ecar-run serve did not come up within {timeout} s")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def request(url: str, label: int, seed: int) -> tuple[float, int]:
    body = json.dumps({"labels": [label], "seed": seed, "format": "npy"}).encode()
    started = time.perf_counter()
    call = urllib.request.Request(f"{url}/generate", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(call, timeout=120) as answer:
        answer.read()
        shared = int(answer.headers["X-ECAR-Batch-Requests"])
    return time.perf_counter() - started, shared


def drive(url: str, clients: int, count: int, seconds: float, classes: int, seed_base: int) -> dict[str, Any]:
    """``clients`` threads, each sending requests back to back, until ``count`` answers or ``seconds``."""
    latencies: list[float] = []
    shared: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    issued = [0]
    deadline = time.perf_counter() + seconds

    def client() -> None:
        while time.perf_counter() < deadline:
            with lock:
                if issued[0] >= count:
                    return
                index = issued[0]
                issued[0] += 1
            try:
                latency, batch = request(url, index % classes, seed_base + index)
            except (OSError, urllib.error.HTTPError) as exc:
                with lock:
                    errors.append(str(exc))
                continue
            with lock:
                latencies.append(latency)
                shared.append(batch)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "wall_s": wall,
        "images_per_s": len(latencies) / wall if wall else 0.0,
        "p50_ms": 1000 * statistics.median(ordered) if ordered else None,
        "p95_ms": 1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else None,
        "mean_requests_per_batch": statistics.fmean(shared) if shared else None,
        "max_requests_per_batch": max(shared) if shared else None,
    }


def engine_ceiling(engine_dir: Path, backend: str, repeats: int = 7) -> dict[str, Any]:
    """Images/s of ``Pipeline.generate`` in this process at batch 1 and at the max batch (no server running).

    Their ratio bounds what batching can buy once the engine, not HTTP, is the bottleneck.
    """
    from runtime.pipeline import Pipeline

    pipe = Pipeline.from_dir(engine_dir, backend=backend)
    rates: dict[str, Any] = {"backend": pipe.backend.name}
    for batch in (1, pipe.max_batch):
        labels = [i % pipe.model.num_classes for i in range(batch)]
        pipe.generate(labels, seed=0)
        times = []
        for repeat in range(repeats):
            started = time.perf_counter()
            pipe.generate(labels, seed=repeat + 1)
            times.append(time.perf_counter() - started)
        rates[f"batch_{batch}_images_per_s"] = batch / statistics.median(times)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-dir", type=Path, default=Path("engines"))
    parser.add_argument("--clients", default="1,8,16,32", help="comma-separated concurrent client counts")
    parser.add_argument("--requests", type=int, default=96, help="answers per measurement")
    parser.add_argument("--seconds", type=float, default=60.0, help="time bound per measurement")
    parser.add_argument("--warmup", type=int, default=8, help="requests before measuring")
    parser.add_argument("--backend", default="auto", help="the engine of the server and of the in-process rates")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_load.json")
    args = parser.parse_args()
    clients = [int(part) for part in args.clients.split(",")]
    config = manifest_io.load(args.engine_dir).model
    classes = config.num_classes

    results: dict[str, Any] = {
        "engine_dir": str(args.engine_dir),
        "model": config.name,
        "request": "one image per request, format npy",
        "requests_per_measurement": args.requests,
        "seconds_bound": args.seconds,
        "machine": machine(),
        "load_average_start": load_average(),
        "settings": {},
    }
    results["engine_in_process"] = engine_ceiling(args.engine_dir, args.backend)
    results["backend"] = results["engine_in_process"]["backend"]  # what --backend resolved to here
    print("engine in process:", results["engine_in_process"], flush=True)
    for setting, extra in SETTINGS.items():
        process, url = start_server(args.engine_dir, [*extra, "--backend", results["backend"]])
        try:
            for index in range(args.warmup):
                request(url, index % classes, 10**9 + index)
            rows = []
            for count in clients:
                row = drive(url, count, args.requests, args.seconds, classes, seed_base=10**6 * (count + 1))
                rows.append(row)
                print(
                    f"{setting:12s} clients {count:3d}: {row['images_per_s']:6.1f} img/s  "
                    f"p50 {row['p50_ms']:7.1f} ms  p95 {row['p95_ms']:7.1f} ms  "
                    f"requests/batch {row['mean_requests_per_batch']:.2f} (max {row['max_requests_per_batch']})  "
                    f"errors {row['errors']}",
                    flush=True,
                )
        finally:
            stop_server(process)
        results["settings"][setting] = {"server_args": extra, "rows": rows}
    results["load_average_end"] = load_average()

    batched = {row["clients"]: row for row in results["settings"]["batching"]["rows"]}
    alone = {row["clients"]: row for row in results["settings"]["no batching"]["rows"]}
    results["throughput_ratio_batching"] = {
        str(count): batched[count]["images_per_s"] / alone[count]["images_per_s"]
        for count in clients
        if alone[count]["images_per_s"]
    }
    print("\nthroughput, batching vs not:", {k: round(v, 2) for k, v in results["throughput_ratio_batching"].items()})
    write_json(args.out, results)


if __name__ == "__main__":
    main()
