"""The graph contract between export and runtime (DESIGN §4, contract version 2), in one place.

A build holds one graph per *kind*, each weight stored once:

* ``backbone`` — every stage. The transformer against the KV cache of the stages before,
  plus renoising (the stage's start state) and the stage's input tokens. What differs per
  stage comes in as inputs (:func:`stage_inputs`): the resampling matrices ``up`` / ``fresh``
  and the ``renoise`` coefficients, the ``positions`` and ``level`` to embed, and
  ``kv_tokens``, the tokens whose keys/values the stage emits (none for the last stage, whose
  cache nobody reads). Stage 1 runs the same graph: ``prev`` is one zero token, ``up`` zero,
  ``fresh`` the identity, the cache empty; ``level`` 0 selects the learned start token.
* ``flow_step`` — every stage and Euler step: the flow head on token rows, the guidance mix
  and the Euler update. ``flow_loop`` (fused builds, instead of ``flow_step``) runs a whole
  stage's steps in one call (an ONNX ``Loop`` over the given times).
* ``decoder`` — the final token grid to images.

Symbolic dims: ``B`` samples, ``2B`` guidance rows (conditional rows, then unconditional);
``N`` tokens of the stage, ``P`` tokens of the previous stage (1 for stage 1), ``T`` cached
tokens of the stages before (0 for stage 1), ``E`` tokens whose keys/values are emitted (N,
or 0 for the last stage); ``M`` = B·N token rows of a flow call, ``2M``; ``K`` Euler steps of
a fused loop. The KV cache is token-major, ``[T, L, 2, 2B, heads, head_dim]``: the cache of
stages 1..s-1 is a prefix of the whole request's cache, and a stage's emitted ``kv`` is the
next block of rows.

:func:`request_plan` is the one description of the order in which a request walks the
graphs (graph, stage, step, t, dt); the runtime, the TensorRT stage loop, the torch
reference sampler, the FLOP count and the calibration capture all follow it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Any

import numpy as np

from runtime import schedule
from runtime.config import ECARConfig
from runtime.errors import ManifestError

CONTRACT_VERSION = 2
Dim = int | str
DTYPES = ("float32", "int64")


class Kind(StrEnum):
    """The graph kinds of the contract (a kind's value is also its graph's name and JSON spelling)."""

    BACKBONE = "backbone"
    FLOW_STEP = "flow_step"
    FLOW_LOOP = "flow_loop"
    DECODER = "decoder"


FLOW_KINDS = (Kind.FLOW_STEP, Kind.FLOW_LOOP)
# Inputs of the backbone that are the same for every request of a stage (see stage_inputs).
STAGE_INPUTS = ("up", "fresh", "renoise", "positions", "level", "kv_tokens")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[Dim, ...]
    dtype: str  # numpy dtype name: float32 | int64

    def concrete(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: Any) -> TensorSpec:
        """The inverse of :meth:`to_dict`; :class:`ManifestError` for anything else."""
        if not isinstance(data, Mapping) or set(data) != {"name", "shape", "dtype"}:
            raise ManifestError(f"a tensor must be an object with name, shape and dtype, got {data!r:.120}")
        name, shape, dtype = data["name"], data["shape"], data["dtype"]
        dims_ok = isinstance(shape, list) and all(
            isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0) for d in shape
        )
        if not isinstance(name, str) or not name or not dims_ok or dtype not in DTYPES:
            raise ManifestError(f"tensor {name!r:.60}: invalid name, shape or dtype")
        return cls(name, tuple(shape), dtype)


@dataclass(frozen=True)
class GraphSpec:
    """One graph of the contract: its kind (also its name) and its inputs and outputs."""

    name: str
    kind: Kind
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        for tensor in (*self.inputs, *self.outputs):
            if tensor.name == name:
                return tensor
        raise KeyError(f"graph '{self.name}' has no tensor '{name}'")

    def shapes(self, dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
        """Concrete shape of every input and output at ``dims`` (see :func:`stage_dims`)."""
        return {t.name: t.concrete(dims) for t in (*self.inputs, *self.outputs)}

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": str(self.kind),
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    @classmethod
    def from_dict(cls, name: str, data: Any) -> GraphSpec:
        """The inverse of :meth:`to_dict` (a manifest's graph entry; other keys are ignored)."""
        if not isinstance(data, Mapping):
            raise ManifestError(f"graph '{name}': its entry must be an object")
        kind, inputs, outputs = data.get("kind"), data.get("inputs"), data.get("outputs")
        if kind not in tuple(Kind) or not isinstance(inputs, list) or not isinstance(outputs, list):
            raise ManifestError(f"graph '{name}': cannot read its contract (kind, inputs, outputs)")
        return cls(
            name, Kind(kind), tuple(map(TensorSpec.from_dict, inputs)), tuple(map(TensorSpec.from_dict, outputs))
        )


def kv_shape(config: ECARConfig, tokens: Dim) -> tuple[Dim, ...]:
    """The token-major KV cache layout: [tokens, layers, 2 (key, value), 2B, heads, head_dim]."""
    return (tokens, config.depth, 2, "2B", config.heads, config.head_dim)


def backbone_spec(config: ECARConfig) -> GraphSpec:
    c, d = config.latent_channels, config.width
    inputs = (
        TensorSpec("labels", ("B",), "int64"),
        TensorSpec("prev", ("B", "P", c), "float32"),
        TensorSpec("noise", ("B", "N", c), "float32"),
        TensorSpec("up", ("N", "P"), "float32"),
        TensorSpec("fresh", ("N", "N"), "float32"),
        TensorSpec("renoise", (2,), "float32"),
        TensorSpec("positions", ("N",), "int64"),
        TensorSpec("level", (1,), "int64"),
        TensorSpec("past_kv", kv_shape(config, "T"), "float32"),
        TensorSpec("kv_tokens", ("E",), "int64"),
    )
    outputs = (
        TensorSpec("z", ("2B", "N", d), "float32"),
        TensorSpec("x", ("B", "N", c), "float32"),
        TensorSpec("kv", kv_shape(config, "E"), "float32"),
    )
    return GraphSpec(Kind.BACKBONE, Kind.BACKBONE, inputs, outputs)


def flow_step_spec(config: ECARConfig) -> GraphSpec:
    c, d = config.latent_channels, config.width
    inputs = (
        TensorSpec("x", ("M", c), "float32"),
        TensorSpec("z", ("2M", d), "float32"),
        TensorSpec("t", (1,), "float32"),
        TensorSpec("dt", (1,), "float32"),
        TensorSpec("cfg", (1,), "float32"),
    )
    return GraphSpec(Kind.FLOW_STEP, Kind.FLOW_STEP, inputs, (TensorSpec("x_next", ("M", c), "float32"),))


def flow_loop_spec(config: ECARConfig) -> GraphSpec:
    """``flow_loop``: a stage's Euler steps at the times given (K of them) in one call."""
    c, d = config.latent_channels, config.width
    inputs = (
        TensorSpec("x", ("M", c), "float32"),
        TensorSpec("z", ("2M", d), "float32"),
        TensorSpec("t", ("K",), "float32"),
        TensorSpec("dt", ("K",), "float32"),
        TensorSpec("cfg", (1,), "float32"),
    )
    return GraphSpec(Kind.FLOW_LOOP, Kind.FLOW_LOOP, inputs, (TensorSpec("x_end", ("M", c), "float32"),))


def decoder_spec(config: ECARConfig) -> GraphSpec:
    n = config.tokens_per_stage[-1]
    image = ("B", config.image_channels, config.image_size, config.image_size)
    inputs = (TensorSpec("x", ("B", n, config.latent_channels), "float32"),)
    return GraphSpec(Kind.DECODER, Kind.DECODER, inputs, (TensorSpec("image", image, "float32"),))


# The decoder has a request's largest activations (KL-16 at 256²: 128 channels at full resolution, 32 MiB
# per image and tensor); its calls are cut into sub-batches whose widest activation stays under this.
DECODER_ACTIVATION_BYTES = 64 << 20


def decoder_batch(config: ECARConfig) -> int:
    """How many images one decoder call takes at most (the runtime splits larger batches; results are the same)."""
    widest = config.tokenizer_channels[0] if config.tokenizer_channels else config.tokenizer_width
    per_image = 4 * widest * config.image_size * config.image_size
    return max(1, DECODER_ACTIVATION_BYTES // per_image)


def flow_graph(fuse_flow_loop: bool) -> Kind:
    """The flow graph of a build: ``flow_loop`` when fused, else ``flow_step``."""
    return Kind.FLOW_LOOP if fuse_flow_loop else Kind.FLOW_STEP


def graph_specs(config: ECARConfig, fuse_flow_loop: bool = False) -> list[GraphSpec]:
    """Every graph of a build, in the order a request first calls them."""
    flow = flow_loop_spec(config) if fuse_flow_loop else flow_step_spec(config)
    return [backbone_spec(config), flow, decoder_spec(config)]


# ------------------------------------------------------------------ the request plan
@dataclass(frozen=True)
class Call:
    """One graph call of a request: which graph, at which stage (1-based) and Euler step.

    ``t`` / ``dt``: the step's time and step size (``flow_step``: one value each;
    ``flow_loop``: the stage's every step; other graphs: empty), float32-rounded as the
    graphs receive them. The decoder's stage is the last one. ``ends_stage``: the stage's
    last flow call, whose result is the stage's end state (the next stage's ``prev``).
    """

    graph: Kind
    stage: int
    step: int | None = None
    t: tuple[float, ...] = ()
    dt: tuple[float, ...] = ()
    ends_stage: bool = False


@lru_cache(maxsize=64)
def request_plan(config: ECARConfig, fuse_flow_loop: bool = False) -> tuple[Call, ...]:
    """Every graph call of one request, in order."""
    calls: list[Call] = []
    for stage in range(1, config.num_stages + 1):
        calls.append(Call(Kind.BACKBONE, stage))
        times = stage_times(config, stage)
        if fuse_flow_loop:
            t, dt = tuple(t for t, _ in times), tuple(d for _, d in times)
            calls.append(Call(Kind.FLOW_LOOP, stage, None, t, dt, ends_stage=True))
        else:
            last = len(times) - 1
            calls += [
                Call(Kind.FLOW_STEP, stage, step, (t,), (dt,), ends_stage=step == last)
                for step, (t, dt) in enumerate(times)
            ]
    calls.append(Call(Kind.DECODER, config.num_stages))
    return tuple(calls)


# What a request holds between graph calls, by slot, and which slot feeds each input of a call
# (FEEDS) and takes each output (RESULTS). Every executor resolves these slots in its own memory
# (runtime.request for numpy and torch arrays, the TensorRT backend for device buffers), so the
# wiring of a request is written once, here:
#   labels  int64 [B]           the request's class labels
#   noise   float32 [B, N, C]   the stage's noise (runtime.schedule.draw_noise)
#   stage   the stage's constant inputs, by input name (stage_inputs)
#   prev    float32 [B, P, C]   the previous stage's end state (first_prev at stage 1)
#   past    the KV cache: rows of the stages before feed past_kv; a stage's kv is stored after them
#   x, z    the current stage's flow state [M, C] (stored from the backbone's x [B, N, C]) and
#           conditioning rows [2M, D]; a call that ends its stage also stores x as prev [B, N, C]
#   t, dt   the call's times (Call.t, Call.dt); cfg the stage's guidance weight [1]
#   image   the decoded images
FEEDS: dict[Kind, dict[str, str]] = {
    Kind.BACKBONE: {
        "labels": "labels",
        "prev": "prev",
        "noise": "noise",
        "past_kv": "past",
        **{name: "stage" for name in STAGE_INPUTS},
    },
    Kind.FLOW_STEP: {"x": "x", "z": "z", "t": "t", "dt": "dt", "cfg": "cfg"},
    Kind.FLOW_LOOP: {"x": "x", "z": "z", "t": "t", "dt": "dt", "cfg": "cfg"},
    Kind.DECODER: {"x": "prev"},
}
RESULTS: dict[Kind, dict[str, str]] = {
    Kind.BACKBONE: {"z": "z", "x": "x", "kv": "past"},
    Kind.FLOW_STEP: {"x_next": "x"},
    Kind.FLOW_LOOP: {"x_end": "x"},
    Kind.DECODER: {"image": "image"},
}


def stage_times(config: ECARConfig, stage: int) -> list[tuple[float, float]]:
    """(t, dt) of each Euler step of a 1-based stage, as the samplers feed them (float32)."""
    times = schedule.stages(config)[stage - 1].times
    return [(float(np.float32(t)), float(np.float32(t - t_next))) for t, t_next in zip(times, times[1:])]


def cache_offsets(config: ECARConfig) -> tuple[int, ...]:
    """Row of the request's KV cache where each stage's keys/values start; the last entry is its size.

    Stage s reads rows ``[0, offsets[s-1])`` and writes rows ``[offsets[s-1], offsets[s])``; the
    last stage writes none, so the cache holds the tokens of stages 1..S-1.
    """
    offsets = [0]
    for tokens in config.tokens_per_stage[:-1]:
        offsets.append(offsets[-1] + tokens)
    return tuple(offsets)


def stage_dims(config: ECARConfig, stage: int, batch: int) -> dict[str, int]:
    """Every symbolic dim of the contract at a 1-based stage and batch size."""
    tokens = config.tokens_per_stage
    n = tokens[stage - 1]
    emitted = 0 if stage == config.num_stages else n
    return {
        "B": batch,
        "2B": 2 * batch,
        "N": n,
        "P": tokens[stage - 2] if stage > 1 else 1,
        "T": cache_offsets(config)[stage - 1],
        "E": emitted,
        "M": batch * n,
        "2M": 2 * batch * n,
        "K": config.steps[stage - 1],
    }


@lru_cache(maxsize=256)
def _stage_inputs(config: ECARConfig, stage: int) -> tuple[tuple[str, np.ndarray], ...]:
    st = schedule.stages(config)[stage - 1]
    n = st.tokens
    if st.prev_grid is None:  # stage 1: x = noise, no upsampled input
        up = np.zeros((n, 1), np.float32)
        fresh = np.eye(n, dtype=np.float32)
        coefficients = (0.0, 1.0)
    else:
        up = st.up().astype(np.float32)
        fresh = st.fresh().astype(np.float32)
        coefficients = schedule.renoise_coefficients(st.factor, st.tau_prev)
    start = sum(config.tokens_per_stage[: stage - 1])
    emitted = 0 if stage == config.num_stages else n
    arrays: dict[str, np.ndarray] = {
        "up": up,
        "fresh": fresh,
        "renoise": np.asarray(coefficients, np.float32),
        "positions": np.arange(start, start + n, dtype=np.int64),
        "level": np.array([stage - 1], np.int64),
        "kv_tokens": np.arange(emitted, dtype=np.int64),
    }
    for array in arrays.values():
        array.setflags(write=False)
    return tuple(arrays.items())


def stage_inputs(config: ECARConfig, stage: int) -> dict[str, np.ndarray]:
    """The backbone inputs of a 1-based stage that no request changes (read-only arrays).

    ``up`` [N, P] nearest upsampling and ``fresh`` [N, N] = I - U·D (:mod:`runtime.schedule`),
    ``renoise`` the two coefficients of :func:`runtime.schedule.renoise`, ``positions`` the
    stage's rows of the position table, ``level`` its index, ``kv_tokens`` the tokens whose
    keys/values it emits. Stage 1: ``up`` one zero column, ``fresh`` the identity and
    coefficients (0, 1), so its start state is its noise.
    """
    return dict(_stage_inputs(config, stage))


def first_prev(config: ECARConfig, batch: int) -> np.ndarray:
    """``prev`` of stage 1: one zero token per sample (multiplied by ``up`` = 0)."""
    return np.zeros((batch, 1, config.latent_channels), np.float32)


def new_cache(config: ECARConfig, batch: int) -> np.ndarray:
    """An empty KV cache for one request (rows are written stage by stage)."""
    return np.empty(kv_shape_concrete(config, cache_offsets(config)[-1], batch), np.float32)


def kv_shape_concrete(config: ECARConfig, tokens: int, batch: int) -> tuple[int, ...]:
    return (tokens, config.depth, 2, 2 * batch, config.heads, config.head_dim)


# ------------------------------------------------------------------ shapes and sample inputs
def sample_inputs(
    spec: GraphSpec, config: ECARConfig, stage: int, batch: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Fresh random inputs of one call at a stage, in the ranges the pipeline produces (never all zeros).

    The backbone's stage inputs are the real ones (:func:`stage_inputs`); flow scalars are
    drawn from the schedule's ranges.
    """
    dims = stage_dims(config, stage, batch)
    constants = stage_inputs(config, stage) if spec.kind == Kind.BACKBONE else {}
    feeds: dict[str, np.ndarray] = {}
    for tensor in spec.inputs:
        shape = tensor.concrete(dims)
        if tensor.name in constants:
            feeds[tensor.name] = np.array(constants[tensor.name])
        elif tensor.name == "labels":
            feeds[tensor.name] = rng.integers(0, config.num_classes, size=shape, dtype=np.int64)
        elif tensor.name == "t":
            feeds[tensor.name] = np.sort(rng.uniform(0.05, 1.0, size=shape))[::-1].astype(np.float32)
        elif tensor.name == "dt":
            feeds[tensor.name] = rng.uniform(0.01, 0.2, size=shape).astype(np.float32)
        elif tensor.name == "cfg":
            feeds[tensor.name] = rng.uniform(1.0, 4.0, size=shape).astype(np.float32)
        elif tensor.name == "past_kv":
            feeds[tensor.name] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
        else:
            feeds[tensor.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def graph_stages(config: ECARConfig, spec: GraphSpec) -> list[int]:
    """The stages at which a request calls ``spec`` (the decoder: the last one)."""
    fused = spec.kind == Kind.FLOW_LOOP
    return sorted({call.stage for call in request_plan(config, fused) if call.graph == spec.name})


def profile_shapes(
    spec: GraphSpec, config: ECARConfig, stage: int, min_batch: int, opt_batch: int, max_batch: int
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape of every input in the optimisation profile of one stage.

    Stage dims (N, P, T, E, K) are that stage's exact values; the batch axes span the
    build's batch range with the opt shape at ``opt_batch``.
    """
    low, opt, high = (stage_dims(config, stage, b) for b in (min_batch, opt_batch, max_batch))
    return {t.name: (t.concrete(low), t.concrete(opt), t.concrete(high)) for t in spec.inputs}
