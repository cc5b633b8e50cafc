"""``ecar-run serve`` end to end: a real local Ray cluster on loopback serving the demo engines.

One server process (``ecar-run serve``, as a user starts it) is shared by the module; requests
come from threads of this process over HTTP. Every response is compared with
``Pipeline.generate`` of the same request in this process: uint8 within 1 level, >= 99.9 % of
pixels identical (a shared batch runs batch-size dependent kernels).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPResponse
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import AUTO_CPU_BACKEND, BuildCache, needs_demo
from PIL import Image
from test_serving import assert_same_images

from runtime import manifest as manifest_io
from runtime.images import grid_image
from runtime.pipeline import Pipeline
from runtime.serving.requests import MAX_BODY_BYTES

pytest.importorskip("ray", reason="the 'serve' extra (Ray Serve) is not installed")
pytestmark = needs_demo

ROOT = Path(__file__).resolve().parents[1]
ECAR_RUN = str(Path(sys.executable).parent / "ecar-run")
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(url: str, body: bytes | None = None, method: str | None = None, timeout: float = 60) -> Response:
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return Response(answer.status, {k.lower(): v for k, v in answer.headers.items()}, answer.read())
    except urllib.error.HTTPError as error:
        return Response(error.code, {k.lower(): v for k, v in error.headers.items()}, error.read())


@dataclass
class Server:
    process: subprocess.Popen[str]
    url: str
    engine_dir: Path
    pipe: Pipeline

    def generate(self, payload: dict[str, Any]) -> Response:
        return http(f"{self.url}/generate", json.dumps(payload).encode())


def start_server(engine_dir: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    command = [ECAR_RUN, "serve", "--engine-dir", str(engine_dir), "--port", str(port), *args]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"ecar-run serve exited with {process.returncode}:\n{process.stderr.read()}")
        try:
            if http(f"{url}/healthz", timeout=5).status == 200:
                return process, url
        except OSError:
            pass
        time.sleep(0.5)
    stop_server(process)
    raise AssertionError(f"ecar-run serve did not answer /healthz within {START_TIMEOUT_S} s")


def stop_server(process: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"ecar-run serve ignored Ctrl-C for {timeout} s:\n{err}") from None
    return process.returncode, out, err


@pytest.fixture(scope="module")
def server(build_cache: BuildCache) -> Iterator[Server]:
    engine_dir = build_cache.get("demo").dir
    process, url = start_server(engine_dir)
    try:
        yield Server(process, url, engine_dir, Pipeline.from_dir(engine_dir))
    finally:
        stop_server(process)


def test_concurrent_requests_equal_pipeline_generate(server: Server, rng: np.random.Generator) -> None:
    classes = server.pipe.model.num_classes
    requests = []
    seeds = rng.choice(2**62, size=40, replace=False)
    for index, seed in enumerate(seeds):
        size = int(rng.integers(1, 4))
        payload: dict[str, Any] = {
            "labels": [int(v) for v in rng.integers(0, classes, size=size)],
            "seed": int(seed),
            "format": "png" if index % 5 == 0 else "npy",
        }
        if index % 3 == 1:
            payload["cfg"] = float(rng.choice([1.0, 2.5]))
        requests.append(payload)
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        responses = list(pool.map(server.generate, requests))

    shared = []
    got, want = [], []
    for payload, response in zip(requests, responses):
        assert response.status == 200, response.body[:500]
        local = server.pipe.generate(payload["labels"], seed=payload["seed"], cfg=payload.get("cfg"))
        if payload["format"] == "npy":
            assert response.headers["content-type"] == "application/x-npy"
            got.append(np.load(io.BytesIO(response.body), allow_pickle=False))
            want.append(local.images)
        else:
            assert response.headers["content-type"] == "image/png"
            with Image.open(io.BytesIO(response.body)) as decoded:
                got.append(np.asarray(decoded)[None, ..., None])
            want.append(np.asarray(grid_image(local.images, payload["labels"]))[None, ..., None])
        assert response.headers["x-ecar-labels"] == ",".join(map(str, payload["labels"]))
        assert response.headers["x-ecar-seed"] == str(payload["seed"])
        timings = json.loads(response.headers["x-ecar-timings"])
        assert timings["total_s"] > 0 and timings["backend_s"] > 0
        shared.append(int(response.headers["x-ecar-batch-requests"]))
        assert int(response.headers["x-ecar-batch-samples"]) <= server.pipe.max_batch
    for a, b in zip(got, want):
        assert_same_images(a, b)
    assert max(shared) > 1, f"no request shared an engine batch: {shared}"


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b'{"labels": [1, 2', 400, "not valid JSON"),
        (b"[3]", 400, "must be a JSON object"),
        (b'{"labels": [10]}', 422, "label 10 is out of range; this model knows classes 0..9"),
        (b'{"labels": [1, 1, 1, 1, 1, 1, 1, 1, 1]}', 422, "9 labels exceed this server's max batch of 8"),
        (b'{"labels": "3"}', 422, "must be a list of integers"),
        (b'{"labels": [1], "seed": "zero"}', 422, "'seed' must be an integer"),
        (b'{"labels": [1], "cfg": [2]}', 422, "'cfg' must be a finite number"),
        (b'{"labels": [1], "format": "jpeg"}', 422, "'format' must be one of png, npy"),
        (b'{"label": [1]}', 422, "unknown field(s) label"),
    ],
)
def test_bad_requests_get_4xx_with_the_message(server: Server, body: bytes, status: int, fragment: str) -> None:
    response = http(f"{server.url}/generate", body)
    assert response.status == status, response.body
    assert fragment in response.json()["error"]


def test_healthz_and_info_describe_the_build(server: Server) -> None:
    health = http(f"{server.url}/healthz")
    assert health.status == 200 and health.json() == {"status": "ok", "model": "ecar-digits"}
    info = http(f"{server.url}/info").json()
    manifest = manifest_io.load(server.engine_dir)
    assert info["model"] == manifest.model.name and info["precision"] == manifest.precision
    assert info["engine_max_batch"] == manifest.max_batch == info["batching"]["max_batch"]
    assert info["backend"]["backend"] == AUTO_CPU_BACKEND
    backend = info["backend"]["backend"]
    assert info["versions"]["ray"] and info["versions"][backend] and info["backend"][backend]
    assert info["build_toolchain"] == manifest.toolchain


def test_unknown_routes_and_methods_are_4xx(server: Server) -> None:
    assert http(f"{server.url}/nowhere").status == 404
    assert http(f"{server.url}/generate", method="GET").status == 405


def raw_post(url: str, headers: dict[str, str], chunks: list[bytes], timeout: float = 20) -> Response:
    """POST /generate over a bare socket: the head with ``headers``, then ``chunks`` as sent; the answer.

    Sending stops early if the server closes the connection; the answer must come within ``timeout``.
    """
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    head = "".join(f"{key}: {value}\r\n" for key, value in headers.items())
    with socket.create_connection((host, int(port)), timeout=timeout) as conn:
        conn.sendall(f"POST /generate HTTP/1.1\r\nHost: {host}\r\n{head}\r\n".encode())
        with contextlib.suppress(OSError):
            for chunk in chunks:
                conn.sendall(chunk)
        answer = HTTPResponse(conn)
        answer.begin()
        return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read())


def test_a_declared_body_over_the_limit_is_refused_without_waiting_for_it(server: Server) -> None:
    started = time.monotonic()
    response = raw_post(server.url, {"Content-Length": str(10**9), "Content-Type": "application/json"}, [b"{}"])
    assert response.status == 413, response.body
    assert f"request body of {10**9} bytes is too large" in response.json()["error"]
    assert time.monotonic() - started < 10


def test_a_chunked_body_over_the_limit_is_refused_once_past_it(server: Server) -> None:
    # the body never ends (no last chunk): only a server that stops at the limit can answer
    piece = 8192
    chunk = f"{piece:x}\r\n".encode() + b" " * piece + b"\r\n"
    chunks = [chunk] * (MAX_BODY_BYTES // piece + 4)
    response = raw_post(server.url, {"Transfer-Encoding": "chunked", "Content-Type": "application/json"}, chunks)
    assert response.status == 413, response.body
    assert f"more than {MAX_BODY_BYTES} bytes is too large" in response.json()["error"]


def test_a_chunked_body_under_the_limit_is_served(server: Server) -> None:
    body = json.dumps({"labels": [2], "seed": 5, "format": "npy"}).encode()
    chunks = [f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (body[:7], body[7:])] + [b"0\r\n\r\n"]
    response = raw_post(server.url, {"Transfer-Encoding": "chunked", "Content-Type": "application/json"}, chunks)
    assert response.status == 200, response.body
    want = server.pipe.generate([2], seed=5).images
    assert_same_images(np.load(io.BytesIO(response.body), allow_pickle=False), want)


def test_ctrl_c_stops_the_server_and_its_cluster(server: Server) -> None:
    response = server.generate({"labels": [4], "seed": 1})
    assert response.status == 200
    code, out, err = stop_server(server.process)
    assert code == 0, err
    assert out.strip() == server.url
    assert "stopped" in err and "Traceback" not in err
    with pytest.raises(OSError):
        http(f"{server.url}/healthz", timeout=5)


# ------------------------------------------------------------------ user errors of the CLI
def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    env.pop("ECAR_DEBUG", None)
    return subprocess.run([ECAR_RUN, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    for fragment in fragments:
        assert fragment in message, message


def test_serve_help_explains_the_api() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for fragment in ("POST /generate", "GET /healthz", "--replicas", "--max-batch", "--batch-wait-ms", "--address"):
        assert fragment in text


def test_serve_with_a_missing_engine_dir_fails_before_starting_ray(tmp_path: Path) -> None:
    started = time.monotonic()
    result = run_cli("serve", "--engine-dir", str(tmp_path / "nowhere"))
    assert_user_error(result, f"engine directory '{tmp_path / 'nowhere'}' does not exist")
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("--max-batch", "9"), ("--max-batch 9 is outside 1..8",)),
        (("--max-batch", "0"), ("--max-batch 0 is outside 1..8",)),
        (("--replicas", "0"), ("--replicas must be a positive integer",)),
        (("--batch-wait-ms", "-1"), ("--batch-wait-ms must be >= 0",)),
        (("--port", "70000"), ("--port 70000 is not a TCP port",)),
    ],
)
def test_serve_rejects_bad_options(build_cache: BuildCache, args: tuple[str, ...], fragments: tuple[str, ...]) -> None:
    assert_user_error(run_cli("serve", "--engine-dir", str(build_cache.get("demo").dir), *args), *fragments)


def test_serve_on_a_busy_port_says_so(build_cache: BuildCache) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--engine-dir", str(build_cache.get("demo").dir), "--port", str(port))
    assert_user_error(result, f"cannot listen on 127.0.0.1:{port}", "choose another --port")


def test_serve_without_ray_names_the_extra_to_install(build_cache: BuildCache) -> None:
    code = f"""
import sys
sys.modules["ray"] = None  # as if the 'serve' extra were not installed
sys.argv = ["ecar-run", "serve", "--engine-dir", {str(build_cache.get("demo").dir)!r}]
from runtime.cli import main
main()
"""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert_user_error(result, "serving needs Ray Serve", "pip install 'ecar-export[serve]'")


def test_error_messages_print_brackets_as_written(tmp_path: Path) -> None:
    # rich would read "[x]" as markup and drop it; a path with brackets must survive
    missing = tmp_path / "engines[fp16]"
    result = run_cli("--engine-dir", str(missing))
    assert_user_error(result, f"engine directory '{missing}' does not exist")
