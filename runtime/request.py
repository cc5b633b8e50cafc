"""One request's walk through the graphs: its inputs, what it holds between calls, the feeds of a call.

:func:`runtime.graphs.request_plan` says which graphs a request calls, in which order;
:data:`runtime.graphs.FEEDS` and :data:`runtime.graphs.RESULTS` say which of the request's
slots feeds each input of a call and takes each output. :class:`RequestState` holds those
slots in arrays that slice and reshape like numpy's — numpy arrays for the
:class:`~runtime.pipeline.Pipeline`, torch tensors for the export side's reference sampler —
and :func:`walk` runs a request with any ``run(call, feeds) -> outputs``. The TensorRT
backend resolves the same slots to device buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from runtime import graphs, schedule
from runtime.config import ECARConfig
from runtime.graphs import FEEDS, RESULTS, Call

A = TypeVar("A")  # numpy arrays, or torch tensors on the export side
Run = Callable[[Call, dict[str, Any]], Sequence[Any]]


@dataclass(frozen=True)
class RequestInputs:
    """What is chosen or drawn per request: labels, every stage's noise, every stage's guidance weight."""

    labels: np.ndarray  # int64 [B]
    noise: tuple[np.ndarray, ...]  # float32 [B, N_s, C], one per stage (ε_1, η_2 .. η_S)
    cfg: tuple[float, ...]  # guidance weight w_s, one per stage

    @classmethod
    def draw(
        cls, config: ECARConfig, labels: np.ndarray, keys: Sequence[tuple[int, int]], cfg: float | None
    ) -> RequestInputs:
        """Noise from the per-sample ``keys`` (:func:`runtime.schedule.draw_noise`), weights from ``cfg``."""
        weights = schedule.cfg_weights(config, cfg)
        return cls(np.asarray(labels, np.int64), tuple(schedule.draw_noise(config, keys)), weights)

    @property
    def batch(self) -> int:
        return int(self.labels.shape[0])


def _same(array: np.ndarray) -> Any:
    return array


class RequestState(Generic[A]):
    """The slots of one request (see :data:`runtime.graphs.FEEDS`) in arrays made by ``convert``.

    ``convert`` turns a host numpy array into the executor's array type (identity for numpy,
    ``torch.from_numpy`` for torch); what the graphs return is stored as it comes.
    """

    def __init__(self, config: ECARConfig, inputs: RequestInputs, convert: Callable[[np.ndarray], A] = _same) -> None:
        self.config = config
        self.convert = convert
        rows = inputs.batch
        self.rows = rows
        self.labels: A = convert(inputs.labels)
        self.noise: list[A] = [convert(array) for array in inputs.noise]
        self.cfg: list[A] = [convert(np.array([weight], np.float32)) for weight in inputs.cfg]
        self.offsets = graphs.cache_offsets(config)
        self.cache: Any = convert(graphs.new_cache(config, rows))
        self.prev: Any = convert(graphs.first_prev(config, rows))
        self.x: Any = None
        self.z: Any = None
        self.image: Any = None

    def read(self, slot: str, name: str, call: Call) -> A:
        """The array in ``slot`` that feeds input ``name`` of ``call``."""
        index = call.stage - 1
        if slot == "stage":
            return self.convert(np.array(graphs.stage_inputs(self.config, call.stage)[name]))
        if slot == "noise":
            return self.noise[index]
        if slot == "past":
            return self.cache[: self.offsets[index]]  # type: ignore[no-any-return]
        if slot == "cfg":
            return self.cfg[index]
        if slot in ("t", "dt"):
            return self.convert(np.array(getattr(call, slot), np.float32))
        return getattr(self, slot)  # type: ignore[no-any-return]

    def write(self, slot: str, value: Any, call: Call) -> None:
        """Store output ``value`` of ``call`` in ``slot``."""
        index = call.stage - 1
        if slot == "past":
            start = self.offsets[index]
            self.cache[start : start + value.shape[0]] = value
        elif slot == "x":
            self.x = value.reshape(-1, self.config.latent_channels)
        elif slot == "z":
            self.z = value.reshape(-1, self.config.width)
        else:
            setattr(self, slot, value)
        if slot == "x" and call.ends_stage:
            self.prev = self.x.reshape(self.rows, self.config.tokens_per_stage[index], self.config.latent_channels)

    def feeds(self, call: Call) -> dict[str, A]:
        """Every input of ``call``, by name."""
        return {name: self.read(slot, name, call) for name, slot in FEEDS[call.graph].items()}

    def keep(self, call: Call, outputs: Sequence[Any]) -> None:
        """Store the outputs of ``call`` (in the graph's output order)."""
        slots = RESULTS[call.graph]
        if len(outputs) != len(slots):
            raise ValueError(f"graph '{call.graph}' returned {len(outputs)} outputs, the contract has {len(slots)}")
        for (_, slot), value in zip(slots.items(), outputs):
            self.write(slot, value, call)

    @property
    def latents(self) -> A:
        """The last stage's end state: the decoder's input, the sample in latent space."""
        return self.prev  # type: ignore[no-any-return]


def walk(state: RequestState[A], plan: Sequence[Call], run: Run) -> RequestState[A]:
    """Run every call of ``plan`` with ``run(call, feeds)``, keeping each call's outputs in ``state``."""
    for call in plan:
        state.keep(call, run(call, state.feeds(call)))
    return state
