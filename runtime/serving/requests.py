"""What a served generate request is, and how concurrent requests share one engine batch.

Everything here is plain Python + numpy, so it is tested without a cluster; ``runtime.serving.ray_app``
wraps it in a Ray Serve deployment. The HTTP contract:

``POST /generate`` with a JSON object
``{"labels": [int, ...], "seed": int, "cfg": float (optional), "format": "png" | "npy" (optional)}``
answers with a PNG grid (``image/png``) or the uint8 array ``[B, H, W, C]`` as an ``.npy`` file
(``application/x-npy``); timings and batch facts travel in ``X-ECAR-*`` headers.

Sample i of a request with seed S draws its noise from key (S, i) (DESIGN §4) whatever else
shares its engine batch, so a request's images do not depend on what it was batched with
(up to the last float bits of batch-size dependent kernels).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.errors import InvalidRequestError, shown
from runtime.noise import MAX_SEED
from runtime.plan import check_cfg

FORMATS = {"png": "image/png", "npy": "application/x-npy"}
FIELDS = ("labels", "seed", "cfg", "format")
MAX_BODY_BYTES = 64 * 1024


class BadRequest(InvalidRequestError):
    """A request the server cannot even read (not JSON, not an object): HTTP 400."""


@dataclass(frozen=True)
class GenerateRequest:
    labels: tuple[int, ...]
    seed: int
    cfg: float  # resolved: the build's default (its plan's cfg) when the request gave none
    format: str = "png"
    received: float = field(default_factory=time.perf_counter, compare=False)

    @property
    def keys(self) -> list[tuple[int, int]]:
        return [(self.seed, index) for index in range(len(self.labels))]


@dataclass
class Reply:
    images: np.ndarray  # uint8 [B, H, W, C], this request's samples only
    request: GenerateRequest
    batch_requests: int  # requests that shared the engine batch (1 = served alone)
    batch_samples: int  # samples in that engine batch
    queue_s: float  # from arrival at the replica to the start of its engine batch
    timings: dict[str, Any]  # the shared batch's Timings.to_dict()


def parse_generate(body: bytes, num_classes: int, max_batch: int, default_cfg: float) -> GenerateRequest:
    """Validate a ``/generate`` body; raises :class:`BadRequest` (400) or :class:`InvalidRequestError` (422)."""
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"request body of {len(body)} bytes is too large (limit {MAX_BODY_BYTES})")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, an int past the digit limit
        if isinstance(exc, ValueError) and not isinstance(exc, UnicodeDecodeError | json.JSONDecodeError):
            raise InvalidRequestError(f"a number in the request has too many digits ({shown(exc)})") from None
        raise BadRequest(
            f"request body is not valid JSON ({shown(exc)}); send an object like "
            '{"labels": [3, 1], "seed": 0, "format": "png"}'
        ) from None
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise InvalidRequestError(f"unknown field(s) {', '.join(unknown)}; known fields: {', '.join(FIELDS)}")
    if "labels" not in data:
        raise InvalidRequestError("missing field 'labels': a list of class labels, e.g. [3, 1, 4]")
    labels = data["labels"]
    if not isinstance(labels, list):
        raise InvalidRequestError(f"'labels' must be a list of integers, got {_as_json(labels)}")
    if not labels:
        raise InvalidRequestError("'labels' must not be empty; give at least one class label")
    for value in labels:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequestError(
                f"label {_as_json(value)} is not an integer; labels are integers in [0, {num_classes - 1}]"
            )
        if not 0 <= value < num_classes:
            raise InvalidRequestError(
                f"label {shown(value)} is out of range; this model knows classes 0..{num_classes - 1}"
            )
    if len(labels) > max_batch:
        raise InvalidRequestError(
            f"{len(labels)} labels exceed this server's max batch of {max_batch}; split the request"
        )
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise InvalidRequestError(f"'seed' must be an integer in [0, 2**63 - 1], got {_as_json(seed)}")
    cfg = data.get("cfg")
    cfg = check_cfg(default_cfg if cfg is None else cfg, "'cfg'")
    fmt = data.get("format", "png")
    if fmt not in FORMATS:
        raise InvalidRequestError(f"'format' must be one of {', '.join(FORMATS)}, got {_as_json(fmt)}")
    return GenerateRequest(tuple(labels), seed, float(cfg), fmt)


def pack(requests: Sequence[GenerateRequest], max_batch: int) -> list[list[int]]:
    """Group request indices into engine batches: same cfg, at most ``max_batch`` samples, arrival order kept.

    A request that alone holds more than ``max_batch`` samples (allowed up to the engine's
    profile) runs as a batch of its own.
    """
    if max_batch < 1:
        raise InvalidRequestError(f"max batch must be at least 1, got {max_batch}")
    groups: list[list[int]] = []
    open_group: dict[float, int] = {}  # cfg -> index of the group still taking requests
    sizes: list[int] = []
    for index, request in enumerate(requests):
        size = len(request.labels)
        if size >= max_batch:
            groups.append([index])
            sizes.append(size)
            continue
        slot = open_group.get(request.cfg)
        if slot is None or sizes[slot] + size > max_batch:
            slot = len(groups)
            groups.append([])
            sizes.append(0)
            open_group[request.cfg] = slot
        groups[slot].append(index)
        sizes[slot] += size
    return groups


def run_packed(pipeline: Any, requests: Sequence[GenerateRequest], max_batch: int | None = None) -> list[Reply]:
    """Serve ``requests`` together through ``pipeline.generate_keyed``; one :class:`Reply` each, in order.

    ``max_batch`` bounds the samples of one shared engine batch (default: the engine's profile).
    """
    replies: list[Reply | None] = [None] * len(requests)
    for group in pack(requests, min(max_batch or pipeline.max_batch, pipeline.max_batch)):
        members = [requests[i] for i in group]
        labels = [label for request in members for label in request.labels]
        keys = [key for request in members for key in request.keys]
        started = time.perf_counter()
        result = pipeline.generate_keyed(labels, keys, cfg=members[0].cfg)
        timings = result.timings.to_dict()
        offset = 0
        for index, request in zip(group, members):
            count = len(request.labels)
            replies[index] = Reply(
                images=result.images[offset : offset + count],
                request=request,
                batch_requests=len(members),
                batch_samples=len(labels),
                queue_s=max(0.0, started - request.received),
                timings=timings,
            )
            offset += count
    return [reply for reply in replies if reply is not None]


def encode(reply: Reply) -> tuple[bytes, str, dict[str, str]]:
    """The response body, its media type, and the ``X-ECAR-*`` headers of a reply."""
    request = reply.request
    if request.format == "npy":
        buffer = io.BytesIO()
        np.save(buffer, reply.images, allow_pickle=False)
        body = buffer.getvalue()
    else:
        from runtime.images import grid_image

        buffer = io.BytesIO()
        grid_image(reply.images, list(request.labels)).save(buffer, format="PNG")
        body = buffer.getvalue()
    timings = {key: value for key, value in reply.timings.items() if key in ("total_s", "backend_s", "overhead_s")}
    timings["queue_s"] = reply.queue_s
    headers = {
        "X-ECAR-Labels": ",".join(str(label) for label in request.labels),
        "X-ECAR-Seed": str(request.seed),
        "X-ECAR-Cfg": repr(request.cfg),
        "X-ECAR-Batch-Requests": str(reply.batch_requests),
        "X-ECAR-Batch-Samples": str(reply.batch_samples),
        "X-ECAR-Timings": json.dumps({key: round(value, 6) for key, value in timings.items()}),
    }
    return body, FORMATS[request.format], headers


def info(pipeline: Any, max_batch: int, batch_wait_s: float) -> dict[str, Any]:
    """``GET /info``: what this server runs and how it batches."""
    from importlib import metadata

    manifest, model = pipeline.manifest, pipeline.model
    channels, height, width = manifest.image_shape(1)[1:]
    versions: dict[str, str | None] = {}
    for package in ("ecar-export", "onnxruntime", "openvino", "numpy", "ray"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "model": model.name,
        "family": model.family,
        "num_classes": model.num_classes,
        "image": {"size": height, "height": height, "width": width, "channels": channels},
        "cfg_scale": manifest.plan.cfg,
        "precision": manifest.precision,
        "fuse_flow_loop": manifest.fuse_flow_loop,
        "engine_max_batch": manifest.max_batch,
        "backend": pipeline.backend.describe(),
        "batching": {"max_batch": max_batch, "batch_wait_ms": round(batch_wait_s * 1000, 3)},
        "formats": list(FORMATS),
        "versions": versions,
        "build_toolchain": manifest.toolchain,
    }


def _as_json(value: object, limit: int = 120) -> str:
    """A value of the request body as the client wrote it (JSON), cut short like :func:`runtime.errors.shown`."""
    try:
        text = json.dumps(value)
    except ValueError:  # an integer past the int-to-string digit limit
        return shown(value, limit)
    return text if len(text) <= limit else text[: limit - 1] + "…"
