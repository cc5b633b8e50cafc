"""Request parsing, packing and shared-batch generation of the HTTP server, without a cluster.

``runtime.serving.requests`` is plain Python: these tests pin its contract; ``test_serve.py`` runs the
same code behind a real Ray Serve deployment.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import BuildCache, needs_demo
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from runtime.errors import InvalidRequestError
from runtime.images import grid_image
from runtime.pipeline import Pipeline
from runtime.serving import requests as serving

CLASSES, MAX_BATCH, DEFAULT_CFG = 10, 8, 1.5
PIXEL_MATCH = 0.999


def parse(body: object) -> serving.GenerateRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return serving.parse_generate(raw, CLASSES, MAX_BATCH, DEFAULT_CFG)


def test_a_full_request_is_read_as_given() -> None:
    request = parse({"labels": [3, 1, 4], "seed": 2**63 - 1, "cfg": 2, "format": "npy"})
    assert request.labels == (3, 1, 4)
    assert request.seed == 2**63 - 1 and request.cfg == 2.0 and request.format == "npy"
    assert request.keys == [(2**63 - 1, 0), (2**63 - 1, 1), (2**63 - 1, 2)]


def test_defaults_are_seed_0_the_models_cfg_and_png() -> None:
    request = parse({"labels": [7]})
    assert (request.seed, request.cfg, request.format) == (0, DEFAULT_CFG, "png")
    assert parse({"labels": [7], "cfg": None}).cfg == DEFAULT_CFG


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{", 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not valid JSON"),
        (b"", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b'"labels"', 400, "must be a JSON object"),
        (b"x" * (serving.MAX_BODY_BYTES + 1), 400, "too large"),
        ({}, 422, "missing field 'labels'"),
        ({"labels": []}, 422, "must not be empty"),
        ({"labels": "3"}, 422, "must be a list of integers"),
        ({"labels": [3, "1"]}, 422, 'label "1" is not an integer'),
        ({"labels": [2.0]}, 422, "label 2.0 is not an integer"),
        ({"labels": [True]}, 422, "label true is not an integer"),
        ({"labels": [10]}, 422, "label 10 is out of range; this model knows classes 0..9"),
        ({"labels": [-1]}, 422, "label -1 is out of range"),
        ({"labels": [0] * (MAX_BATCH + 1)}, 422, "9 labels exceed this server's max batch of 8"),
        ({"labels": [1], "seed": -1}, 422, "'seed' must be an integer"),
        ({"labels": [1], "seed": 2**63}, 422, "'seed' must be an integer"),
        ({"labels": [1], "seed": "7"}, 422, "'seed' must be an integer"),
        ({"labels": [1], "seed": 1.5}, 422, "'seed' must be an integer"),
        ({"labels": [1], "cfg": "high"}, 422, "'cfg' must be a finite number"),
        ({"labels": [1], "cfg": True}, 422, "'cfg' must be a finite number"),
        (b'{"labels": [1], "cfg": NaN}', 422, "'cfg' must be a finite number"),
        ({"labels": [1], "format": "gif"}, 422, "'format' must be one of png, npy"),
        # numbers that parse but are absurd: past the int-to-string digit limit, or overflowing float32
        (b'{"labels": [1], "seed": ' + b"7" * 5001 + b"}", 422, "a number in the request has too many digits"),
        (b'{"labels": [1], "cfg": ' + b"9" * 401 + b"}", 422, "'cfg' must be a finite number in [-100, 100]"),
        ({"labels": [1], "cfg": 1e308}, 422, "'cfg' must be a finite number in [-100, 100], got 1e+308"),
        ({"labels": [1], "cfg": -3.5e38}, 422, "'cfg' must be a finite number in [-100, 100]"),
        (b'{"labels": [' + b"1" * 5001 + b"]}", 422, "a number in the request has too many digits"),
        ({"labels": [1], "label": [2]}, 422, "unknown field(s) label"),
    ],
)
def test_bad_requests_name_what_is_wrong(body: object, status: int, fragment: str) -> None:
    expected = serving.BadRequest if status == 400 else InvalidRequestError
    with pytest.raises(expected) as caught:
        parse(body)
    assert fragment in str(caught.value)
    if status == 422:
        assert not isinstance(caught.value, serving.BadRequest)


requests_strategy = st.lists(
    st.tuples(st.integers(1, MAX_BATCH), st.sampled_from([1.0, 1.5, 3.0])), min_size=1, max_size=24
)


@settings(max_examples=200, deadline=None)
@given(shapes=requests_strategy, max_batch=st.integers(1, MAX_BATCH))
def test_packing_keeps_batches_within_bounds_and_cfg_uniform(shapes: list[tuple[int, float]], max_batch: int) -> None:
    requests = [serving.GenerateRequest(tuple([0] * size), seed, cfg) for seed, (size, cfg) in enumerate(shapes)]
    groups = serving.pack(requests, max_batch)
    assert sorted(i for group in groups for i in group) == list(range(len(requests)))
    for group in groups:
        assert group == sorted(group)
        assert len({requests[i].cfg for i in group}) == 1
        samples = sum(len(requests[i].labels) for i in group)
        assert samples <= max_batch or len(group) == 1
    # nothing is split needlessly: two groups of one cfg could not have been merged
    for cfg in {cfg for _, cfg in shapes}:
        sizes = [sum(len(requests[i].labels) for i in g) for g in groups if requests[g[0]].cfg == cfg]
        assert all(a + b > max_batch for a, b in zip(sizes, sizes[1:]))


def test_packing_rejects_a_nonpositive_bound() -> None:
    with pytest.raises(InvalidRequestError, match="at least 1"):
        serving.pack([serving.GenerateRequest((1,), 0, 1.5)], 0)


def assert_same_images(got: np.ndarray, want: np.ndarray) -> None:
    """uint8 images equal up to 1 level, >= 99.9 % of pixels identical (batch-size dependent kernels)."""
    assert got.shape == want.shape and got.dtype == want.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert int(diff.max()) <= 1, f"pixel differs by {int(diff.max())}"
    assert float(np.mean(diff == 0)) >= PIXEL_MATCH


@needs_demo
def test_shared_batches_give_each_request_its_own_images(build_cache: BuildCache, rng: np.random.Generator) -> None:
    pipe = Pipeline.from_dir(build_cache.get("demo").dir)
    requests = []
    for _ in range(7):
        labels = tuple(int(v) for v in rng.integers(0, CLASSES, size=int(rng.integers(1, 4))))
        cfg = float(rng.choice([1.0, DEFAULT_CFG]))
        requests.append(serving.GenerateRequest(labels, int(rng.integers(0, 2**63 - 1)), cfg, "npy"))
    replies = serving.run_packed(pipe, requests)
    assert len(replies) == len(requests)
    assert max(reply.batch_requests for reply in replies) > 1, "nothing was batched"
    pixels_alone = []
    pixels_shared = []
    for request, reply in zip(requests, replies):
        assert reply.request is request
        alone = pipe.generate(list(request.labels), seed=request.seed, cfg=request.cfg)
        assert reply.batch_samples <= pipe.max_batch
        pixels_alone.append(alone.images)
        pixels_shared.append(reply.images)
    assert_same_images(np.concatenate(pixels_shared), np.concatenate(pixels_alone))


@needs_demo
def test_encoded_replies_decode_to_the_images(build_cache: BuildCache, rng: np.random.Generator) -> None:
    pipe = Pipeline.from_dir(build_cache.get("demo").dir)
    labels = tuple(int(v) for v in rng.integers(0, CLASSES, size=3))
    seed = int(rng.integers(0, 2**31))
    as_npy, as_png = (serving.GenerateRequest(labels, seed, DEFAULT_CFG, fmt) for fmt in ("npy", "png"))
    reply_npy, reply_png = serving.run_packed(pipe, [as_npy, as_png])
    body, media, headers = serving.encode(reply_npy)
    assert media == "application/x-npy"
    np.testing.assert_array_equal(np.load(io.BytesIO(body), allow_pickle=False), reply_npy.images)
    assert headers["X-ECAR-Labels"] == ",".join(map(str, labels)) and headers["X-ECAR-Seed"] == str(seed)
    assert headers["X-ECAR-Batch-Requests"] == "2" and headers["X-ECAR-Batch-Samples"] == "6"
    timings = json.loads(headers["X-ECAR-Timings"])
    assert timings["total_s"] > 0 and timings["queue_s"] >= 0
    body, media, _ = serving.encode(reply_png)
    assert media == "image/png"
    with Image.open(io.BytesIO(body)) as decoded:
        np.testing.assert_array_equal(np.asarray(decoded), np.asarray(grid_image(reply_png.images, list(labels))))
