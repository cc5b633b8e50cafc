"""The HTTP body size limit and the 503 of a lost replica, without a cluster: fake streams and handles.

A declared ``Content-Length`` over the limit is refused before the first chunk is read; a body
without one is read only until it passes the limit (at most the limit plus one chunk).
``test_serve.py`` checks the same limit over real sockets against a running server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest

pytest.importorskip("ray", reason="the 'serve' extra (Ray Serve) is not installed")

from ray.exceptions import ActorDiedError, ActorUnavailableError  # noqa: E402

from runtime.serving import ray_app  # noqa: E402
from runtime.serving import requests as serving  # noqa: E402

LIMIT = serving.MAX_BODY_BYTES


class CountingStream:
    """An endless (or ``total``-byte) body in ``chunk``-byte pieces that counts what was pulled from it."""

    def __init__(self, chunk: int, total: int | None = None) -> None:
        self.chunk, self.total, self.pulled = chunk, total, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.total is None or self.pulled < self.total:
            size = self.chunk if self.total is None else min(self.chunk, self.total - self.pulled)
            self.pulled += size
            yield b" " * size


def read(headers: dict[str, str], stream: CountingStream, limit: int = LIMIT) -> bytes:
    return asyncio.run(ray_app.read_body(headers, stream.__aiter__(), limit))


def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    stream = CountingStream(1024)
    with pytest.raises(ray_app.BodyTooLarge, match=f"request body of {10**9} bytes is too large"):
        read({"content-length": str(10**9)}, stream)
    assert stream.pulled == 0


@pytest.mark.parametrize("chunk", [1, 1000, 4096, LIMIT, 3 * LIMIT])
def test_a_chunked_body_is_read_only_past_the_limit(chunk: int) -> None:
    stream = CountingStream(chunk)  # endless: a reader that wanted it all would never return
    with pytest.raises(ray_app.BodyTooLarge, match=f"more than {LIMIT} bytes is too large"):
        read({}, stream)
    assert LIMIT < stream.pulled <= LIMIT + chunk


def test_a_body_whose_length_lies_is_still_cut_at_the_limit() -> None:
    stream = CountingStream(4096)
    with pytest.raises(ray_app.BodyTooLarge):
        read({"content-length": "10"}, stream)
    assert stream.pulled <= LIMIT + 4096


@pytest.mark.parametrize("size", [0, 1, LIMIT - 1, LIMIT])
def test_bodies_up_to_the_limit_are_read_whole(size: int) -> None:
    for headers in ({"content-length": str(size)}, {}):
        assert read(headers, CountingStream(1000, total=size)) == b" " * size


@pytest.mark.parametrize("declared", ["-1", "ten", ""])
def test_a_malformed_content_length_is_a_bad_request(declared: str) -> None:
    with pytest.raises(serving.BadRequest, match="is not a byte count") as caught:
        read({"content-length": declared}, CountingStream(10, total=0))
    assert not isinstance(caught.value, ray_app.BodyTooLarge)


@pytest.mark.parametrize(
    ("exc", "retryable"),
    [
        (TimeoutError(), True),
        (ray_app.RayActorError(), True),
        (ray_app.BackPressureError(num_queued_requests=3, max_queued_requests=2), True),
        (ray_app.DeploymentUnavailableError("ECARGenerator"), True),
        (ValueError("a bug"), False),
    ],
)
def test_which_failures_are_retryable(exc: BaseException, retryable: bool) -> None:
    assert ray_app._retryable(exc) is retryable


def test_a_task_error_is_retryable_only_when_it_wraps_a_lost_actor() -> None:
    from ray.exceptions import ActorDiedError, RayTaskError

    lost = RayTaskError("generate", "traceback", ActorDiedError())
    bug = RayTaskError("generate", "traceback", ZeroDivisionError("bug"))
    assert ray_app._retryable(lost) and not ray_app._retryable(bug)


class FakeMethod:
    """A deployment handle's method whose call raises ``error``, or sleeps ``delay`` seconds and answers."""

    def __init__(self, error: BaseException | None = None, delay: float = 0.0) -> None:
        self.error, self.delay, self.cancelled = error, delay, False

    def remote(self, *args: object) -> FakeMethod:
        return self

    def cancel(self) -> None:
        self.cancelled = True

    def __await__(self):  # type: ignore[no-untyped-def]
        return self._answer().__await__()

    async def _answer(self) -> str:
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return "answer"


def ask(method: FakeMethod, timeout_s: float = 5.0) -> tuple[object, object]:
    return asyncio.run(ray_app.ask(method, (), timeout_s))


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ray_app.RayActorError(), "RayActorError"),
        (ActorDiedError(), "ActorDiedError"),
        (ActorUnavailableError("node gone", None), "ActorUnavailableError"),
        (ray_app.DeploymentUnavailableError("ECARGenerator"), "DeploymentUnavailableError"),
    ],
)
def test_a_lost_replica_is_503_with_json_and_retry_after(error: BaseException, reason: str) -> None:
    result, failed = ask(FakeMethod(error))
    assert result is None and failed is not None
    assert failed.status_code == 503  # type: ignore[attr-defined]
    assert failed.headers["retry-after"] == str(ray_app.RETRY_AFTER_S)  # type: ignore[attr-defined]
    body = json.loads(failed.body)  # type: ignore[attr-defined]
    assert body == {"error": f"the replica serving this request was lost ({reason}); retry"}


def test_no_answer_in_time_is_503_and_the_call_is_cancelled() -> None:
    method = FakeMethod(delay=10)
    started = time.monotonic()
    result, failed = ask(method, timeout_s=0.2)
    assert time.monotonic() - started < 5 and method.cancelled
    assert failed.status_code == 503  # type: ignore[attr-defined]
    assert json.loads(failed.body) == {"error": "no replica answered within 0.2 s; retry later"}  # type: ignore[attr-defined]


def test_an_answer_is_passed_on_and_a_bug_is_not_hidden() -> None:
    assert ask(FakeMethod()) == ("answer", None)
    with pytest.raises(ZeroDivisionError):
        ask(FakeMethod(ZeroDivisionError("bug")))
