"""The graph contract between export and runtime (DESIGN §4, contract version 3), in one place.

The contract says what a build's graphs take and return, never what model made them: a
model family's export writes its graph specs (:class:`GraphSpec`), its request plan
(:class:`runtime.plan.RequestPlan`) and its stage constants (:mod:`runtime.stage_constants`)
into the engine directory, and the runtime checks them against this contract and walks the
plan. Nothing here, nor on the runtime's request path, knows a model config. A build holds one
graph per *kind*, each weight stored once:

* ``backbone`` — every stage. Inputs fed from the request (:data:`SLOTS`): ``labels`` [B],
  ``prev`` [B, P, C] (the previous stage's end state; stage 1: the plan's ``P`` zero
  tokens), ``noise`` [B, N, C] (the stage's noise) and ``past_kv`` (the KV cache of the
  stages before); outputs ``z`` [2B, N, D] (the conditioning of the stage's tokens: the
  conditional rows, then the unconditional), ``x`` [B, N, C] (the stage's start state) and
  ``kv`` (the keys/values the stage emits). Every other input is a *stage constant*: the
  same for every request at a stage (ECAR's resampling matrices ``up`` / ``fresh``, the
  ``renoise`` coefficients, ``positions``, ``level`` and ``kv_tokens``), written by the build.
* ``flow_step`` — every stage and Euler step, over the stage's token grid: ``x`` [B, N, C],
  ``z`` [2B, N, D], ``t`` [1], ``dt`` [1], ``cfg`` [1] -> ``x_next`` [B, N, C] (the flow
  head, the guidance mix and the Euler update; a per-token head reshapes to rows inside).
  ``flow_loop`` (fused builds, instead of ``flow_step``) runs a whole stage's steps in one
  call: ``t`` and ``dt`` [K] -> ``x_end`` [B, N, C].
* ``decoder`` — the last stage's tokens ``x`` [B, N_S, C] to images ``image`` [B, ch, H, W].

Symbolic dims: ``B`` samples, ``2B`` guidance rows; ``N`` tokens of the stage, ``P`` tokens
of the previous stage, ``T`` cached tokens of the stages before, ``E`` tokens whose
keys/values the stage emits, ``K`` Euler steps of a fused loop — all of them the plan's
(:meth:`runtime.plan.RequestPlan.dims`). The KV cache is token-major,
``[T, layers, 2, 2B, heads, head_dim]``: the cache of stages 1..s-1 is a prefix of the whole
request's cache, and a stage's emitted ``kv`` [E, ...] is the next block of rows. ``C``, the
conditioning width ``D``, the cache's layers, heads and head_dim and the image's shape are
whatever the specs say, the same wherever they appear (:func:`check_specs`).

The runtime validates each graph's spec against :data:`SLOTS` (names, dtypes, ranks and the
shared dims) and checks that every other input has a stage constant, of its spec's shape, at
every stage the plan calls the graph; it feeds slot inputs from the request (:data:`FEEDS`)
and the rest from the stage constants.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from runtime.errors import ManifestError

if TYPE_CHECKING:
    from runtime.plan import RequestPlan

CONTRACT_VERSION = 3
Dim = int | str
DTYPES = ("float32", "int64")


class Kind(StrEnum):
    """The graph kinds of the contract (a kind's value is also its graph's name and JSON spelling)."""

    BACKBONE = "backbone"
    FLOW_STEP = "flow_step"
    FLOW_LOOP = "flow_loop"
    DECODER = "decoder"


FLOW_KINDS = (Kind.FLOW_STEP, Kind.FLOW_LOOP)


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
        """Concrete shape of every input and output at ``dims`` (:meth:`runtime.plan.RequestPlan.dims`)."""
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


def flow_graph(fuse_flow_loop: bool) -> Kind:
    """The flow graph of a build: ``flow_loop`` when fused, else ``flow_step``."""
    return Kind.FLOW_LOOP if fuse_flow_loop else Kind.FLOW_STEP


def kinds(fuse_flow_loop: bool) -> tuple[Kind, ...]:
    """The graphs of a build, in the order a request first calls them."""
    return (Kind.BACKBONE, flow_graph(fuse_flow_loop), Kind.DECODER)


# ------------------------------------------------------------------ a request's calls
@dataclass(frozen=True)
class Call:
    """One graph call of a request: which graph, at which stage (1-based) and Euler step.

    ``t`` / ``dt``: the step's time and step size (``flow_step``: one value each;
    ``flow_loop``: the stage's every step; other graphs: empty), float32-rounded as the
    graphs receive them. The decoder's stage is the last one. ``ends_stage``: the stage's
    last flow call, whose result is the stage's end state (the next stage's ``prev``).
    ``guided``: the call takes its stage's guidance weight (else weight 1; see
    :class:`runtime.plan.RequestPlan`).
    """

    graph: Kind
    stage: int
    step: int | None = None
    t: tuple[float, ...] = ()
    dt: tuple[float, ...] = ()
    ends_stage: bool = False
    guided: bool = True


# What a request holds between graph calls, by slot, and which slot feeds each input of a call
# (FEEDS) and takes each output (RESULTS). Every executor resolves these slots in its own memory
# (runtime.request for numpy and torch arrays, the TensorRT backend for device buffers), so the
# wiring of a request is written once, here:
#   labels  int64 [B]           the request's class labels
#   noise   float32 [B, N, C]   the stage's noise (runtime.noise.draw)
#   stage   a stage constant, by input name (runtime.stage_constants): every input not in FEEDS
#   prev    float32 [B, P, C]   the previous stage's end state (the plan's P zero tokens at stage 1)
#   past    the KV cache: rows of the stages before feed past_kv; a stage's kv is stored after them
#   x, z    the current stage's flow state [B, N, C] (from the backbone's x) and conditioning
#           [2B, N, D]; a call that ends its stage also stores x as prev
#   t, dt   the call's times (Call.t, Call.dt); cfg the call's guidance weight [1]
#   image   the decoded images
FEEDS: dict[Kind, dict[str, str]] = {
    Kind.BACKBONE: {"labels": "labels", "prev": "prev", "noise": "noise", "past_kv": "past"},
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
STAGE = "stage"  # the slot of every input FEEDS does not name


def feeds(spec: GraphSpec) -> dict[str, str]:
    """The slot of every input of ``spec``, in its input order: FEEDS' slots, else a stage constant."""
    slots = FEEDS[spec.kind]
    return {name: slots.get(name, STAGE) for name in spec.input_names()}


def constant_inputs(spec: GraphSpec) -> list[TensorSpec]:
    """The inputs of ``spec`` that are stage constants (every input no request slot feeds)."""
    return [t for t in spec.inputs if t.name not in FEEDS[spec.kind]]


# ------------------------------------------------------------------ what every spec must hold
# The slot-fed inputs and the outputs of each kind, in order. A dim is a contract dim (B, 2B, N,
# P, T, E, K: the plan's), a literal int, or a lowercase name: a size the build chooses, the same
# wherever the name appears (c: token channels, also the plan's; d: conditioning width; the cache's
# layers, heads, head_dim; the image's channels, height, width; n_last: the last stage's tokens).
_KV = ("layers", 2, "2B", "heads", "head_dim")
SLOTS: dict[Kind, tuple[tuple[tuple[str, tuple[Dim, ...], str], ...], tuple[tuple[str, tuple[Dim, ...], str], ...]]] = {
    Kind.BACKBONE: (
        (
            ("labels", ("B",), "int64"),
            ("prev", ("B", "P", "c"), "float32"),
            ("noise", ("B", "N", "c"), "float32"),
            ("past_kv", ("T", *_KV), "float32"),
        ),
        (
            ("z", ("2B", "N", "d"), "float32"),
            ("x", ("B", "N", "c"), "float32"),
            ("kv", ("E", *_KV), "float32"),
        ),
    ),
    Kind.FLOW_STEP: (
        (
            ("x", ("B", "N", "c"), "float32"),
            ("z", ("2B", "N", "d"), "float32"),
            ("t", (1,), "float32"),
            ("dt", (1,), "float32"),
            ("cfg", (1,), "float32"),
        ),
        (("x_next", ("B", "N", "c"), "float32"),),
    ),
    Kind.FLOW_LOOP: (
        (
            ("x", ("B", "N", "c"), "float32"),
            ("z", ("2B", "N", "d"), "float32"),
            ("t", ("K",), "float32"),
            ("dt", ("K",), "float32"),
            ("cfg", (1,), "float32"),
        ),
        (("x_end", ("B", "N", "c"), "float32"),),
    ),
    Kind.DECODER: (
        (("x", ("B", "n_last", "c"), "float32"),),
        (("image", ("B", "image_channels", "height", "width"), "float32"),),
    ),
}
CONTRACT_DIMS = ("B", "2B", "N", "P", "T", "E", "K")
BATCH_DIMS = ("B", "2B")


def check_specs(specs: Mapping[str, GraphSpec], fuse_flow_loop: bool, sizes: Mapping[str, int]) -> dict[str, int]:
    """Check a build's specs against :data:`SLOTS`; returns every size the specs fix, by name.

    ``sizes`` are the sizes known beforehand (the plan's ``c`` and ``n_last``). Raises
    :class:`ManifestError` naming the graph and tensor that break the contract.
    """
    expected = [str(kind) for kind in kinds(fuse_flow_loop)]
    if set(specs) != set(expected):
        missing, extra = sorted(set(expected) - set(specs)), sorted(map(str, set(specs) - set(expected)))
        raise ManifestError(f"graphs do not match the contract (missing {missing}, unexpected {extra}); rebuild")
    bound = dict(sizes)
    for name in expected:  # in call order: a size is bound where a request first meets it
        spec = specs[name]
        if spec.kind != name:
            raise ManifestError(f"graph '{name}' is of kind '{spec.kind}'; rebuild")
        ins, outs = SLOTS[spec.kind]
        names = spec.input_names()
        if len(set(names)) != len(names) or len(set(spec.output_names())) != len(spec.outputs):
            raise ManifestError(f"graph '{name}': tensor names must be unique")
        if spec.output_names() != [tensor for tensor, _, _ in outs]:
            raise ManifestError(
                f"graph '{name}': outputs {spec.output_names()}, the contract has {[t for t, _, _ in outs]}; rebuild"
            )
        for tensor_name, pattern, dtype in (*ins, *outs):
            if tensor_name not in names and tensor_name not in spec.output_names():
                raise ManifestError(f"graph '{name}' has no input '{tensor_name}'; rebuild")
            _match(name, spec.tensor(tensor_name), pattern, dtype, bound)
        for tensor in constant_inputs(spec):
            if any(d in BATCH_DIMS for d in tensor.shape):
                raise ManifestError(
                    f"graph '{name}': input '{tensor.name}' is a stage constant (no request slot feeds it) but has "
                    "a batch axis; rebuild"
                )
    return bound


def _match(graph: str, tensor: TensorSpec, pattern: tuple[Dim, ...], dtype: str, bound: dict[str, int]) -> None:
    where = f"graph '{graph}' tensor '{tensor.name}'"
    if tensor.dtype != dtype:
        raise ManifestError(f"{where}: dtype {tensor.dtype}, the contract has {dtype}; rebuild")
    if len(tensor.shape) != len(pattern):
        raise ManifestError(f"{where}: rank {len(tensor.shape)}, the contract has {len(pattern)}; rebuild")
    for axis, (dim, want) in enumerate(zip(tensor.shape, pattern)):
        if isinstance(want, int) or want in CONTRACT_DIMS:
            ok = dim == want
        elif isinstance(dim, int):
            ok = bound.setdefault(want, dim) == dim
        else:
            ok = False
        if not ok:
            shown = bound.get(want, want) if isinstance(want, str) else want
            raise ManifestError(f"{where}: axis {axis} is {dim!r}, the contract has {shown!r}; rebuild")


def check_constants(specs: Mapping[str, GraphSpec], plan: RequestPlan, arrays: Mapping[str, Any]) -> None:
    """Every stage-constant input has its array, of its spec's shape and dtype, at every stage its graph runs at.

    ``arrays`` are the stage constants by file key (:func:`runtime.stage_constants.key`); a key no
    graph needs is an error too (a build of another plan).
    """
    from runtime.stage_constants import key

    needed: set[str] = set()
    for spec in specs.values():
        for stage in plan.graph_stages(spec.kind):
            dims = plan.dims(stage, 1)
            for tensor in constant_inputs(spec):
                name = key(spec.name, stage, tensor.name)
                needed.add(name)
                if name not in arrays:
                    raise ManifestError(f"stage constants: no '{name}' (graph '{spec.name}' runs at stage {stage})")
                array = arrays[name]
                want = tensor.concrete(dims)
                if tuple(array.shape) != want or array.dtype.name != tensor.dtype:
                    raise ManifestError(
                        f"stage constants: '{name}' is {array.dtype.name} {tuple(array.shape)}, the graph takes "
                        f"{tensor.dtype} {want}"
                    )
    extra = sorted(set(arrays) - needed)
    if extra:
        raise ManifestError(f"stage constants: '{extra[0]}' is no input of a graph at a stage it runs at")


def kv_row_shape(backbone: GraphSpec, batch: int) -> tuple[int, ...]:
    """The shape of one cached token's keys/values at ``batch`` (the backbone's ``past_kv`` without its T axis)."""
    return backbone.tensor("past_kv").concrete({"T": 0, "2B": 2 * batch, "B": batch})[1:]


def profile_shapes(
    spec: GraphSpec, plan: RequestPlan, stage: int, min_batch: int, opt_batch: int, max_batch: int
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape of every input in the optimisation profile of one stage.

    Stage dims (N, P, T, E, K) are that stage's exact values; the batch axes span the
    build's batch range with the opt shape at ``opt_batch``.
    """
    low, opt, high = (plan.dims(stage, b) for b in (min_batch, opt_batch, max_batch))
    return {t.name: (t.concrete(low), t.concrete(opt), t.concrete(high)) for t in spec.inputs}


def specs_of(graphs: Sequence[GraphSpec]) -> dict[str, GraphSpec]:
    """Specs by graph name."""
    return {spec.name: spec for spec in graphs}
