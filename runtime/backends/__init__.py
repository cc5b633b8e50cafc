"""Inference backends behind one interface: run one call of the request plan on numpy feeds.

A backend runs the graphs of a loaded build. :class:`Backend` is what every backend does:
run one :class:`~runtime.graphs.Call` of the build's request plan (:class:`~runtime.plan.RequestPlan`;
the call says its graph, stage and step) on host arrays. A backend that can also keep a whole request on
its device implements :class:`DeviceResidentBackend` (TensorRT does); the
:class:`~runtime.pipeline.Pipeline` then hands it the request's inputs at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from runtime.graphs import Call
from runtime.request import RequestInputs

StageCallback = Callable[[int, int], None]  # (stages done, stages in all)


class Backend(Protocol):
    """What the Pipeline needs from a backend. ``run`` must be safe to call from several threads.

    Optional: an ``activation_budget`` attribute, the bytes a backbone or flow call's conditioning ``z``
    ([2B, N, d] float32) may take before the Pipeline cuts the call along its batch
    (:mod:`runtime.sub_batches`). The CPU backends, whose memory grows with a call's rows, set it; a
    backend without it (or with None) gets those calls whole. The decoder is cut by the plan's
    ``decoder_batch`` on every backend.
    """

    name: str

    def run(self, call: Call, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs of ``call``'s graph, in the contract's output order."""
        ...

    def describe(self) -> dict[str, object]: ...


@dataclass
class DeviceRunResult:
    """What a device-resident backend returns for one request (times measured on the device)."""

    image: np.ndarray  # float32 [B, ch, H, W] in [0, 1], the decoder's output
    latents: np.ndarray  # float32 [B, N_S, C]
    stage_seconds: list[float]
    decoder_seconds: float
    graph_seconds: dict[str, float] = field(default_factory=dict)
    graph_calls: dict[str, int] = field(default_factory=dict)
    total_seconds: float = 0.0


@runtime_checkable
class DeviceResidentBackend(Backend, Protocol):
    """A backend that runs a whole request with every intermediate on its device."""

    def run_request(self, inputs: RequestInputs, on_stage: StageCallback | None = None) -> DeviceRunResult: ...
