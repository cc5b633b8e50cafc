"""Inference backends behind one interface: run a named graph on numpy feeds."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    """What the Pipeline needs from a backend. ``run`` must be safe to call from several threads."""

    name: str

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def describe(self) -> dict[str, object]: ...
