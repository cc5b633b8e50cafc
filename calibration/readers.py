"""ONNX Runtime calibration data readers over a stored :class:`CalibrationSet`.

:class:`GraphReader` feeds a quantizer the *calibration* split of one graph only; the
held-out split is reached through :func:`held_out_feeds`, for validating a quantized
graph on inputs its calibration never saw. :class:`FeedList` feeds a fixed list of feeds
(inputs made elsewhere: a benchmark's own requests, a test's hand-made graph).
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from calibration.dataset import CalibrationSet

T = TypeVar("T")


class FeedList(CalibrationDataReader):
    """A rewindable reader over a fixed list of feeds, in order."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds, self.next = feeds, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.next >= len(self.feeds):
            return None
        self.next += 1
        return self.feeds[self.next - 1]

    def rewind(self) -> None:
        self.next = 0

    def __len__(self) -> int:
        return len(self.feeds)


class GraphReader(CalibrationDataReader):
    """Feeds of one graph's calibration split, ``batch_rows`` rows per call, one shape per group.

    Batch graphs get ``batch_rows`` samples per call (default: the plan's batch); flow
    graphs get ``batch_rows`` token rows of one (stage, step) per call (default: the
    plan's batch × the largest stage's tokens). Feeds come group by group (the backbone's
    stages); within a group every call has the same shapes. ``max_batches`` caps the calls
    per group, spread evenly over it; ``group`` reads one group only. :meth:`parts` gives one
    reader per group: ORT's histogram calibrators stack a tensor's values over one
    ``collect_data`` call, which needs one shape. Supports ``len`` and ``set_range`` (ORT's
    strided calibration) and ``rewind``.

    Each feed is made when it is asked for and not kept: the reader holds only which rows
    each call takes. (Holding every feed of ecar-b's backbone, KV caches included, beside the
    set's own arrays took an int8 build to 18 GB.)
    """

    def __init__(
        self,
        calibration: CalibrationSet,
        graph: str,
        batch_rows: int | None = None,
        max_batches: int | None = None,
        group: str | None = None,
    ) -> None:
        self.calibration = calibration
        self.graph = graph
        self.batch_rows = batch_rows or calibration.default_batch_rows(graph)
        self.max_batches = max_batches
        self.group_names = [group] if group is not None else calibration.groups(graph)
        calls: list[tuple[str, np.ndarray]] = []
        for name in self.group_names:
            indices = calibration.batch_indices(graph, "calibration", self.batch_rows, fixed=True, group=name)
            part = [(name, index) for index in indices]
            calls += _spread(part, max_batches) if max_batches is not None else part
        self._calls = calls
        self._start, self._stop, self._next = 0, len(calls), 0

    def parts(self) -> list[GraphReader]:
        """One reader per group (the same batches, split by shape), each at its start."""
        if len(self.group_names) == 1:
            self.rewind()
            return [self]
        return [
            GraphReader(self.calibration, self.graph, self.batch_rows, self.max_batches, group)
            for group in self.group_names
        ]

    def get_next(self) -> dict[str, Any] | None:
        if self._next >= self._stop:
            return None
        group, index = self._calls[self._next]
        self._next += 1
        return self.calibration.feed(self.graph, "calibration", group, index)

    def __len__(self) -> int:
        return len(self._calls)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start, self._stop = max(0, start_index), min(len(self._calls), end_index)
        self._next = self._start

    def rewind(self) -> None:
        self._start, self._stop, self._next = 0, len(self._calls), 0


def held_out_feeds(
    calibration: CalibrationSet, graph: str, batch_rows: int | None = None, max_batches: int | None = None
) -> list[dict[str, np.ndarray]]:
    """Feeds of one graph's held-out split (never given to a quantizer), for validation; ``max_batches``: at most
    that many per group, spread evenly over it (every stage keeps some)."""
    feeds: list[dict[str, np.ndarray]] = []
    for group in calibration.groups(graph):
        indices = calibration.batch_indices(graph, "held_out", batch_rows, group=group)
        picked = _spread(indices, max_batches) if max_batches is not None else indices
        feeds += [calibration.feed(graph, "held_out", group, index) for index in picked]  # only the picked ones
    return feeds


def _spread(feeds: list[T], count: int) -> list[T]:
    """``count`` feeds (or calls) spread evenly over the list (every group of a flow graph keeps some)."""
    if count < 1:
        raise ValueError(f"max_batches must be at least 1, got {count}")
    if count >= len(feeds):
        return feeds
    picks = np.unique(np.linspace(0, len(feeds) - 1, count).round().astype(int))
    return [feeds[i] for i in picks]
