"""A Ray Serve deployment of the runtime: replicas, request batching and an HTTP API.

Optional extra ``serve`` (``pip install 'ecar-export[serve]'``); ``import runtime`` never
imports this module. Two deployments make one application:

- ``ECARIngress`` answers HTTP (FastAPI). It reads and validates the body (never more than
  ``MAX_BODY_BYTES`` plus one chunk), forwards the parsed request to a generator replica
  through a deployment handle with a time limit, and turns a replica that died, vanished with
  its node, or did not answer in time into 503 with a JSON error and ``Retry-After``. It holds
  no engines and is placed on the head node, which a cluster cannot lose and keep running.
- ``ECARGenerator`` replicas (spread over the nodes) each own one
  :class:`~runtime.pipeline.Pipeline` and batch concurrent requests with ``serve.batch`` —
  bounded by the number of samples in a batch (never more than the engine's max batch) and a
  wait timeout — then pack them into shared engine batches (``runtime.serving.requests``).

Routes:

- ``POST /generate``: see ``runtime.serving.requests`` for the JSON body and the response;
- ``GET /healthz``: 200 once a generator replica has loaded its engines;
- ``GET /info``: model, precision, backend, batching and versions.

Bad requests get 400 (unreadable body), 413 (body over the limit) or 422 (invalid fields) with
the runtime's message; 503 means no replica answered (retry after ``Retry-After`` seconds).
"""

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
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
    from ray.exceptions import RayActorError, RayError, RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
    from ray.serve.handle import DeploymentHandle
except ImportError as exc:  # the optional extra is missing
    raise BackendUnavailableError(
        f"serving needs Ray Serve ({exc.name} is not installed): pip install 'ecar-export[serve]'"
    ) from None

APP_NAME = "ecar"
DEFAULT_BATCH_WAIT_MS = 10.0
# The longest a request may take from the ingress to its answer (queue, engine batch, encoding).
DEFAULT_REQUEST_TIMEOUT_S = 30.0
RETRY_AFTER_S = 1
# Ray's head node carries this resource; a tiny share of it pins the ingress there.
HEAD_NODE_RESOURCE = "node:__internal_head__"

app = FastAPI(title="ECAR image generator", description="Class-conditional image generation from built engines.")


class BodyTooLarge(serving.BadRequest):
    """A body over the size limit: HTTP 413."""


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _unavailable(message: str) -> JSONResponse:
    return _error(503, message, {"Retry-After": str(RETRY_AFTER_S)})


def _samples(requests: list[serving.GenerateRequest]) -> int:
    return sum(len(request.labels) for request in requests)


async def read_body(
    headers: Mapping[str, str], chunks: AsyncIterator[bytes], limit: int = serving.MAX_BODY_BYTES
) -> bytes:
    """The request body, refused with :class:`BodyTooLarge` as soon as it is known to exceed ``limit``.

    A declared ``Content-Length`` over the limit is refused before anything is read; a body
    without one (chunked) is read chunk by chunk and dropped once past the limit, so at most
    ``limit`` bytes plus one chunk are ever held.
    """
    declared = headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            length = -1
        if length < 0:
            raise serving.BadRequest(f"Content-Length {declared!r} is not a byte count")
        if length > limit:
            raise BodyTooLarge(f"request body of {length} bytes is too large (limit {limit})")
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body of more than {limit} bytes is too large (limit {limit})")
        parts.append(chunk)
    return b"".join(parts)


def _retryable(exc: BaseException) -> bool:
    """Whether ``exc`` is the cluster failing (a replica or its node gone, overload, no answer in time)
    rather than the request or the engines: then another try, on another replica, may succeed."""
    if isinstance(exc, TimeoutError | BackPressureError | DeploymentUnavailableError | RayActorError):
        return True
    if isinstance(exc, RayTaskError):  # raised inside a task: retryable only if it wraps a failure of Ray's
        cause = getattr(exc, "cause", None)
        return isinstance(cause, BaseException) and cause is not exc and _retryable(cause)
    return isinstance(exc, RayError)  # ActorDiedError, NodeDiedError, WorkerCrashedError, ObjectLostError, ...


async def ask(method: Any, args: tuple[Any, ...], timeout_s: float) -> tuple[Any, JSONResponse | None]:
    """``method.remote(*args)`` of a deployment handle: its result, or the 503 to answer when no replica did."""
    response = method.remote(*args)
    try:
        return await asyncio.wait_for(response, timeout_s), None
    except Exception as exc:  # noqa: BLE001 - sorted below
        if isinstance(exc, TimeoutError):
            response.cancel()
            return None, _unavailable(f"no replica answered within {timeout_s:g} s; retry later")
        if _retryable(exc):
            reason = type(getattr(exc, "cause", None) or exc).__name__
            return None, _unavailable(f"the replica serving this request was lost ({reason}); retry")
        raise


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a generator replica answers: a response body, or an error status and message."""

    status: int
    content: bytes = b""
    media_type: str = "application/json"
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    error: str = ""


@serve.deployment(name="ECARGenerator")
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

    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "model": self.pipeline.model.name}

    async def info(self) -> dict[str, Any]:
        return serving.info(self.pipeline, self.max_batch, self.batch_wait_s)

    async def generate(self, request: serving.GenerateRequest) -> Outcome:
        # queue time counts from arrival here: clocks of other processes and nodes do not compare
        request = dataclasses.replace(request, received=time.perf_counter())
        try:
            reply = await self._generate_batch(request)
        except InvalidRequestError as exc:
            return Outcome(422, error=str(exc))
        except ECARError as exc:  # the engines failed: the server's fault, not the request's
            return Outcome(500, error=str(exc))
        content, media_type, headers = await asyncio.get_running_loop().run_in_executor(None, serving.encode, reply)
        return Outcome(200, content, media_type, headers)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_MS / 1000.0, batch_size_fn=_samples)
    async def _generate_batch(self, requests: list[serving.GenerateRequest]) -> list[serving.Reply]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._engine, serving.run_packed, self.pipeline, requests, self.max_batch)


@serve.deployment(name="ECARIngress")
@serve.ingress(app)
class ECARIngress:
    """The HTTP routes: read and check a request, hand it to a generator replica, answer within a time limit."""

    def __init__(
        self,
        generator: DeploymentHandle,
        num_classes: int,
        max_batch: int,
        default_cfg: float,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    ) -> None:
        self.generator = generator
        self.num_classes = num_classes
        self.max_batch = max_batch
        self.default_cfg = default_cfg
        self.timeout_s = request_timeout_s

    async def _call(self, method: str, *args: Any) -> tuple[Any, JSONResponse | None]:
        return await ask(getattr(self.generator, method), args, self.timeout_s)

    @app.get("/healthz")
    async def healthz(self) -> Response:
        result, failed = await self._call("healthz")
        return failed or JSONResponse(result)

    @app.get("/info")
    async def info(self) -> Response:
        result, failed = await self._call("info")
        if failed:
            return failed
        result["request_timeout_s"] = self.timeout_s
        return JSONResponse(result)

    @app.post("/generate")
    async def generate(self, request: Request) -> Response:
        try:
            body = await read_body(request.headers, request.stream())
            parsed = serving.parse_generate(body, self.num_classes, self.max_batch, self.default_cfg)
        except BodyTooLarge as exc:
            return _error(413, str(exc))
        except serving.BadRequest as exc:
            return _error(400, str(exc))
        except InvalidRequestError as exc:
            return _error(422, str(exc))
        outcome, failed = await self._call("generate", parsed)
        if failed:
            return failed
        if outcome.status != 200:
            return _error(outcome.status, outcome.error)
        return Response(content=outcome.content, media_type=outcome.media_type, headers=outcome.headers)


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
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
) -> Any:
    """The application (ingress + generator replicas), bound to an engine directory and ready for ``serve.run``.

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
    if not (request_timeout_s > 0 and math.isfinite(request_timeout_s)):
        raise InvalidRequestError(f"--request-timeout-s must be a positive number of seconds, got {request_timeout_s}")
    batch = max_batch or manifest.max_batch
    if cpus_per_replica is None:
        cpus_per_replica = float(max(1, (os.cpu_count() or 1) // replicas))
    if not cpus_per_replica > 0:
        raise InvalidRequestError(f"--cpus-per-replica must be > 0, got {cpus_per_replica}")
    threads = max(1, int(cpus_per_replica))
    options: dict[str, Any] = {"num_cpus": cpus_per_replica}
    if gpus_per_replica:
        options["num_gpus"] = gpus_per_replica
    generator = ECARGenerator.options(  # type: ignore[attr-defined]  # a Deployment once decorated
        num_replicas=replicas,
        # Requests wait in the replica's own queue, where the next batch forms. With a small
        # limit, Ray's proxy holds the excess back with exponential backoff instead: at 32
        # clients and a limit of 16, p95 latency went from 0.3 to 2.5 s.
        max_ongoing_requests=max(64, 4 * batch),
        ray_actor_options=options,
        logging_config={"log_level": "WARNING", "enable_access_log": False},
    ).bind(str(Path(engine_dir).resolve()), backend, device, threads, batch, batch_wait_ms)
    config = manifest.model
    return ECARIngress.options(  # type: ignore[attr-defined]
        num_replicas=1,
        max_ongoing_requests=max(1024, 16 * replicas * batch),
        # no engines and no CPU reserved; on the head node, whose loss ends the cluster anyway
        ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}},
        logging_config={"log_level": "WARNING", "enable_access_log": False},
    ).bind(generator, config.num_classes, batch, manifest.plan.cfg, request_timeout_s)


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
    proxy_location: str = "EveryNode",
) -> str:
    """Start (or join, with ``address``) a Ray cluster, deploy ``target`` and return its URL.

    ``proxy_location`` is Serve's: an HTTP proxy on every node (the default) or only the head ("HeadOnly").
    """
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
        proxy_location=proxy_location,
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
