"""A Ray Serve deployment of the runtime: replicas, request batching and an HTTP API.

Optional extra ``serve`` (``pip install 'ecar-export[serve]'``); ``import runtime`` never
imports this module. Each replica owns one :class:`~runtime.pipeline.Pipeline` and batches
concurrent requests with ``serve.batch`` — bounded by the number of samples in a batch
(never more than the engine's max batch) and a wait timeout — then packs them into shared
engine batches (``runtime.serving.requests``). Routes:

- ``POST /generate``: see ``runtime.serving.requests`` for the JSON body and the response;
- ``GET /healthz``: 200 once the replica has loaded its engines;
- ``GET /info``: model, precision, backend, batching and versions.

Bad requests get 400 (unreadable body) or 422 (invalid fields) with the runtime's message.
"""

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from runtime import manifest as manifest_io
from runtime.errors import BackendUnavailableError, ECARError, InvalidRequestError
from runtime.serving import requests as serving

try:
    import ray
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from ray import serve
except ImportError as exc:  # the optional extra is missing
    raise BackendUnavailableError(
        f"serving needs Ray Serve ({exc.name} is not installed): pip install 'ecar-export[serve]'"
    ) from None

APP_NAME = "ecar"
DEFAULT_BATCH_WAIT_MS = 10.0

app = FastAPI(title="ECAR image generator", description="Class-conditional image generation from built engines.")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _samples(requests: list[serving.GenerateRequest]) -> int:
    return sum(len(request.labels) for request in requests)


@serve.deployment(name="ECARGenerator")
@serve.ingress(app)
class ECARGenerator:
    """One replica: loads the engines once, then serves batched requests until stopped."""

    def __init__(
        self,
        engine_dir: str,
        backend: str = "auto",
        device: str = "auto",
        threads: int | None = None,
        max_batch: int | None = None,
        batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
    ) -> None:
        from runtime.pipeline import Pipeline

        self.pipeline = Pipeline.from_dir(engine_dir, backend=backend, device=device, threads=threads)
        self.max_batch = min(max_batch or self.pipeline.max_batch, self.pipeline.max_batch)
        self.batch_wait_s = batch_wait_ms / 1000.0
        self._generate_batch.set_max_batch_size(self.max_batch)  # type: ignore[attr-defined]
        self._generate_batch.set_batch_wait_timeout_s(self.batch_wait_s)  # type: ignore[attr-defined]
        # one engine batch at a time per replica; the event loop keeps queueing the next one
        self._engine = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ecar-engine")

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "model": self.pipeline.config.name}

    @app.get("/info")
    async def info(self) -> dict[str, Any]:
        return serving.info(self.pipeline, self.max_batch, self.batch_wait_s)

    @app.post("/generate")
    async def generate(self, request: Request) -> Response:
        body = await request.body()
        config = self.pipeline.config
        try:
            parsed = serving.parse_generate(body, config.num_classes, self.max_batch, config.cfg_scale)
        except serving.BadRequest as exc:
            return _error(400, str(exc))
        except InvalidRequestError as exc:
            return _error(422, str(exc))
        try:
            reply = await self._generate_batch(parsed)
        except InvalidRequestError as exc:
            return _error(422, str(exc))
        except ECARError as exc:  # the engines failed: the server's fault, not the request's
            return _error(500, str(exc))
        content, media_type, headers = await asyncio.get_running_loop().run_in_executor(None, serving.encode, reply)
        return Response(content=content, media_type=media_type, headers=headers)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_MS / 1000.0, batch_size_fn=_samples)
    async def _generate_batch(self, requests: list[serving.GenerateRequest]) -> list[serving.Reply]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._engine, serving.run_packed, self.pipeline, requests, self.max_batch)


def application(
    engine_dir: str | os.PathLike[str],
    *,
    replicas: int = 1,
    max_batch: int | None = None,
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
    backend: str = "auto",
    device: str = "auto",
    cpus_per_replica: float | None = None,
    gpus_per_replica: float = 0.0,
) -> Any:
    """The deployment, bound to an engine directory and ready for ``serve.run``.

    The engine directory is checked here, in the calling process, so that a wrong path is a
    clear error before any replica starts; replicas on other nodes need it at the same path.
    """
    manifest = manifest_io.load(engine_dir)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise InvalidRequestError(f"--replicas must be a positive integer, got {replicas!r}")
    if max_batch is not None and not 1 <= max_batch <= manifest.max_batch:
        raise InvalidRequestError(
            f"--max-batch {max_batch} is outside 1..{manifest.max_batch} (the engines' max batch); "
            "rebuild with a larger `ecar-export build --max-batch` to batch more"
        )
    if not batch_wait_ms >= 0:
        raise InvalidRequestError(f"--batch-wait-ms must be >= 0, got {batch_wait_ms}")
    batch = max_batch or manifest.max_batch
    if cpus_per_replica is None:
        cpus_per_replica = float(max(1, (os.cpu_count() or 1) // replicas))
    if not cpus_per_replica > 0:
        raise InvalidRequestError(f"--cpus-per-replica must be > 0, got {cpus_per_replica}")
    threads = max(1, int(cpus_per_replica))
    options: dict[str, Any] = {"num_cpus": cpus_per_replica}
    if gpus_per_replica:
        options["num_gpus"] = gpus_per_replica
    return ECARGenerator.options(  # type: ignore[attr-defined]  # a Deployment once decorated
        num_replicas=replicas,
        # Requests wait in the replica's own queue, where the next batch forms. With a small
        # limit, Ray's proxy holds the excess back with exponential backoff instead: at 32
        # clients and a limit of 16, p95 latency went from 0.3 to 2.5 s.
        max_ongoing_requests=max(64, 4 * batch),
        ray_actor_options=options,
        logging_config={"log_level": "WARNING", "enable_access_log": False},
    ).bind(str(Path(engine_dir).resolve()), backend, device, threads, batch, batch_wait_ms)


def check_port_free(host: str, port: int) -> None:
    """A clear error now rather than a proxy that never comes up."""
    if not 0 < port < 65536:
        raise InvalidRequestError(f"--port {port} is not a TCP port; use 1..65535")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise InvalidRequestError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or --host"
        ) from None


def start(
    target: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    verbose: bool = False,
) -> str:
    """Start (or join, with ``address``) a Ray cluster, deploy ``target`` and return its URL."""
    quiet = logging.INFO if verbose else logging.WARNING
    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level=quiet, log_to_driver=verbose)
        else:
            ray.init(
                address="local",
                num_cpus=os.cpu_count() or 1,
                include_dashboard=False,
                logging_level=quiet,
                log_to_driver=verbose,
            )
    for name in ("ray", "ray.serve"):
        logging.getLogger(name).setLevel(quiet)
    serve.start(
        http_options={"host": host, "port": port},
        logging_config={"log_level": "INFO" if verbose else "WARNING", "enable_access_log": verbose},
    )
    serve.run(target, name=APP_NAME, route_prefix="/", blocking=False)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def stop() -> None:
    """Remove this application, then disconnect; a cluster this process started goes down with it.

    Serve itself is left running on a joined cluster: other applications may live there.
    Ray's shutdown chatter goes to stderr so that stdout keeps only what the CLI printed.
    """
    with contextlib.redirect_stdout(sys.stderr):
        try:
            serve.delete(APP_NAME)
        finally:
            ray.shutdown()


def serve_forever(url: str, announce: Callable[[str], None]) -> None:
    """Block until Ctrl-C or SIGTERM, then stop cleanly."""

    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # set both explicitly: a shell starts background jobs with SIGINT ignored
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGINT, signal.SIGTERM)}
    announce(url)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop()
