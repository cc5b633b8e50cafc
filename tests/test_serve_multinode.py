"""Serving survives losing a node: Ray's multi-node test cluster on this machine, a worker node killed under load.

``benchmarks/serve_failover.py`` (``run_scenario``) runs it: a head and a worker node (separate
raylets, one CPU each) hold one generator replica each; clients send requests back to back; the
worker node is killed mid-load. Requests in flight on it must end, within the request timeout,
with 503, a JSON error and ``Retry-After`` (``test_serve_limits.py`` checks that mapping for each
of Ray's errors without a cluster); every 200 must carry the image ``Pipeline.generate``
gives for the same request; later requests succeed on the head's replica, and both replicas run
again once a new worker node joins.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import BuildCache

pytest.importorskip("ray", reason="the 'serve' extra (Ray Serve) is not installed")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from serve_failover import run_scenario  # noqa: E402

REQUEST_TIMEOUT_S = 20.0


def test_serving_survives_losing_a_worker_node(build_cache: BuildCache) -> None:
    engine_dir = build_cache.get("tiny-1-2-4").dir
    result = run_scenario(engine_dir, clients=6, before=30, after=20, request_timeout_s=REQUEST_TIMEOUT_S)
    calls = result["calls"]
    summary = {k: v for k, v in result.items() if k not in ("calls", "final")}

    assert result["replicas_before"] == 2, summary  # one per node: each node has room for one
    assert result["replicas_after_kill"] == 1, summary
    assert result["hung_clients"] == 0, summary
    # every request got an answer: an image, or 503 with a JSON error and Retry-After
    assert result["other_codes"] == {}, [c.body[:300] for c in calls if c.status not in (200, 503)]
    # How many are lost depends on what the dead replica had accepted at the kill (0 to 3 here):
    # requests it had not yet accepted are routed to the survivor by Serve itself.
    for call in (c for c in calls if c.status == 503):
        assert call.headers["content-type"] == "application/json"
        assert call.headers["retry-after"] == "1"
        assert "retry" in json.loads(call.body)["error"]
        assert call.latency < REQUEST_TIMEOUT_S + 5, summary
    assert result["wrong_images"] == 0, summary
    # the survivors serve what came later; both replicas are back once a node rejoins
    served_late = [c for c in calls if c.status == 200 and c.started > result["kill_at_s"] + result["kill_took_s"]]
    assert len(served_late) >= 20, summary
    assert result["replicas_after_rejoin"] == 2, summary
    assert result["final_ok"] == result["final_requests"], summary
