"""One request's walk through the graphs: its inputs, what it holds between calls, the feeds of a call.

The build's :class:`runtime.plan.RequestPlan` says which graphs a request calls, in which
order; :func:`runtime.graphs.feeds` and :data:`runtime.graphs.RESULTS` say which of the
request's slots feeds each input of a call and takes each output, every input no slot feeds
being a stage constant (:class:`runtime.stage_constants.StageConstants`). :class:`RequestState`
holds those slots in arrays that slice like numpy's — numpy arrays for the
:class:`~runtime.pipeline.Pipeline`, torch tensors for the export side's reference sampler —
and :func:`walk` runs a request with any ``run(call, feeds) -> outputs``. The TensorRT
backend resolves the same slots to device buffers. Nothing here knows a model family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from runtime import graphs, noise
from runtime.graphs import RESULTS, Call, GraphSpec, Kind
from runtime.plan import RequestPlan
from runtime.stage_constants import StageConstants

A = TypeVar("A")  # numpy arrays, or torch tensors on the export side
Run = Callable[[Call, dict[str, Any]], Sequence[Any]]


@dataclass(frozen=True)
class RequestInputs:
    """What is chosen or drawn per request: labels, every stage's noise, every stage's guidance weight."""

    labels: np.ndarray  # int64 [B]
    noise: tuple[np.ndarray, ...]  # float32 [B, N_s, C], one per stage
    cfg: tuple[float, ...]  # guidance weight w_s, one per stage (a call that is not guided takes 1)

    @classmethod
    def draw(
        cls, plan: RequestPlan, labels: np.ndarray, keys: Sequence[tuple[int, int]], cfg: float | None
    ) -> RequestInputs:
        """Noise from the per-sample ``keys`` (:func:`runtime.noise.draw`), weights from ``cfg`` (the plan's rule)."""
        drawn = noise.draw(plan.tokens, plan.channels, keys)
        return cls(np.asarray(labels, np.int64), tuple(drawn), plan.weights(cfg))

    @property
    def batch(self) -> int:
        return int(self.labels.shape[0])


def _same(array: np.ndarray) -> Any:
    return array


def first_prev(plan: RequestPlan, batch: int) -> np.ndarray:
    """``prev`` of stage 1: the plan's P zero tokens per sample."""
    return np.zeros((batch, plan.stages[0].prev_tokens, plan.channels), np.float32)


def new_cache(plan: RequestPlan, backbone: GraphSpec, batch: int) -> np.ndarray:
    """An empty KV cache for one request (rows are written stage by stage)."""
    return np.empty((plan.cache_rows, *graphs.kv_row_shape(backbone, batch)), np.float32)


class RequestState(Generic[A]):
    """The slots of one request (see :data:`runtime.graphs.FEEDS`) in arrays made by ``convert``.

    ``specs`` are the build's graphs by name, ``constants`` its stage constants. ``convert``
    turns a host numpy array into the executor's array type (identity for numpy,
    ``torch.from_numpy`` for torch); what the graphs return is stored as it comes.
    """

    def __init__(
        self,
        plan: RequestPlan,
        specs: Mapping[str, GraphSpec],
        constants: StageConstants,
        inputs: RequestInputs,
        convert: Callable[[np.ndarray], A] = _same,
    ) -> None:
        self.plan = plan
        self.constants = constants
        self.convert = convert
        self._feeds = {name: graphs.feeds(spec) for name, spec in specs.items()}
        rows = inputs.batch
        self.rows = rows
        self.labels: A = convert(inputs.labels)
        self.noise: list[A] = [convert(array) for array in inputs.noise]
        self.cfg: list[A] = [convert(np.array([weight], np.float32)) for weight in inputs.cfg]
        self.unguided: A = convert(np.ones(1, np.float32))
        self.cache: Any = convert(new_cache(plan, specs[Kind.BACKBONE], rows))
        self.prev: Any = convert(first_prev(plan, rows))
        self.x: Any = None
        self.z: Any = None
        self.image: Any = None

    def read(self, slot: str, name: str, call: Call) -> A:
        """The array in ``slot`` that feeds input ``name`` of ``call``."""
        index = call.stage - 1
        if slot == graphs.STAGE:
            return self.convert(np.array(self.constants.get(call.graph, call.stage)[name]))
        if slot == "noise":
            return self.noise[index]
        if slot == "past":
            return self.cache[: self.plan.stages[index].cache_start]  # type: ignore[no-any-return]
        if slot == "cfg":
            return self.cfg[index] if call.guided else self.unguided
        if slot in ("t", "dt"):
            return self.convert(np.array(getattr(call, slot), np.float32))
        return getattr(self, slot)  # type: ignore[no-any-return]

    def write(self, slot: str, value: Any, call: Call) -> None:
        """Store output ``value`` of ``call`` in ``slot``."""
        if slot == "past":
            start = self.plan.stages[call.stage - 1].cache_start
            self.cache[start : start + value.shape[0]] = value
        else:
            setattr(self, slot, value)
        if slot == "x" and call.ends_stage:
            self.prev = self.x

    def feeds(self, call: Call) -> dict[str, A]:
        """Every input of ``call``, by name."""
        return {name: self.read(slot, name, call) for name, slot in self._feeds[call.graph].items()}

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
