"""Row layout of stored calibration inputs: every graph's feeds as independent rows.

Every graph of the contract (:mod:`runtime.graphs`) is row-independent along its batch
axis: a backbone's sample *i* reads ``labels[i]``, ``prev[i]``, ``noise[i]`` and the
guidance rows *i* and *B + i* of ``past_kv``. ECAR's flow head is also independent along its
tokens, so a flow graph's feeds (``x`` [B, N, C], ``z`` [2B, N, D]) are kept as token rows —
the grid cut into ``M = B·N`` rows, :func:`row_view` — and fed back as one grid of
``B = 1``, ``N = M`` tokens: token *m* reads ``x[m]`` and the guidance rows *m* and *M + m*
of ``z``. A flow head that attends across a stage's tokens (FlowAR's) is not: its grids stay
whole, one sample of one call per row (``tokens=False`` in every function here), like a
backbone's. So a calibration set stores rows, not calls, and rebuilds feeds of any batch size
from any subset of rows:

* an input whose row axis is ``B`` / ``M`` is stored with that axis first: ``[rows, ...]``;
* an input whose row axis is ``2B`` / ``2M`` (conditional rows, then unconditional rows)
  is stored as ``[rows, 2, ...]``: ``[:, 0]`` the conditional and ``[:, 1]`` the
  unconditional row of each sample or token (``past_kv`` [T, L, 2, 2B, h, dh] becomes
  [rows, 2, T, L, 2, h, dh]);
* a scalar input of shape ``[1]`` (``t``, ``dt``, ``cfg``) is stored once per row,
  ``[rows]``; a batch only ever joins rows that share every scalar value;
* a *stage input* — the same for every call of a stage (a graph's stage constants,
  :func:`runtime.graphs.constant_inputs`: the backbone's ``up``, ``fresh``, ``renoise``,
  ``positions``, ``level``, ``kv_tokens``; a fused loop's ``t`` / ``dt``) — is not stored:
  feeds take it from the build's data (``constants``).

Rows of one graph whose shapes or stage inputs differ by stage (the backbone's ``prev``, ``noise``
and ``past_kv``; a grid-row flow head's token grids and rotary tables) are kept in one *group*
per stage (:meth:`calibration.model.CapturedModel.groups`); a batch never mixes groups.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from runtime.graphs import FEEDS, FLOW_KINDS, GraphSpec, Kind, TensorSpec

ROW_DIMS = ("B", "M")
PAIRED_DIMS = ("2B", "2M")


def row_axis(tensor: TensorSpec) -> tuple[int, bool] | None:
    """(axis, paired) of a tensor's row axis, or None where it has none."""
    for axis, dim in enumerate(tensor.shape):
        if dim in ROW_DIMS:
            return axis, False
        if dim in PAIRED_DIMS:
            return axis, True
    return None


_GRID_ROWS = {"B": "M", "2B": "2M"}  # a flow graph's [B, N, ...] / [2B, N, ...] as token rows


def row_view(spec: GraphSpec, tokens: bool = True) -> GraphSpec:
    """``spec`` with a flow graph's token grids as token rows: [B, N, ...] -> [M, ...], [2B, N, ...] -> [2M, ...]
    (``tokens`` False: a flow head whose tokens are not independent keeps its grids, one sample per row)."""
    if spec.kind not in FLOW_KINDS or not tokens:
        return spec

    def rows(tensor: TensorSpec) -> TensorSpec:
        if len(tensor.shape) >= 2 and tensor.shape[0] in _GRID_ROWS and tensor.shape[1] == "N":
            return TensorSpec(tensor.name, (_GRID_ROWS[str(tensor.shape[0])], *tensor.shape[2:]), tensor.dtype)
        return tensor

    return GraphSpec(spec.name, spec.kind, tuple(map(rows, spec.inputs)), tuple(map(rows, spec.outputs)))


def is_stage_input(spec: GraphSpec, tensor: TensorSpec) -> bool:
    """Inputs fixed by the stage: a graph's stage constants, a fused loop's per-step times."""
    if tensor.name not in FEEDS[spec.kind]:
        return True
    return spec.kind == Kind.FLOW_LOOP and tensor.name in ("t", "dt")


def stored_inputs(spec: GraphSpec, tokens: bool = True) -> list[TensorSpec]:
    """The inputs a calibration set stores per row (in the row view): row inputs and per-call scalars."""
    view = row_view(spec, tokens)
    return [t for t in view.inputs if not is_stage_input(view, t)]


def scalar_inputs(spec: GraphSpec, tokens: bool = True) -> list[str]:
    return [t.name for t in stored_inputs(spec, tokens) if row_axis(t) is None]


def row_shape(tensor: TensorSpec, dims: Mapping[str, int]) -> tuple[int, ...]:
    """The stored shape of one row (without the leading row axis), at a stage's ``dims``."""
    found = row_axis(tensor)
    if found is None:
        return ()
    axis, paired = found
    rest = tuple(int(d) if isinstance(d, int) else int(dims[d]) for i, d in enumerate(tensor.shape) if i != axis)
    return (2, *rest) if paired else rest


def row_bytes(spec: GraphSpec, dims: Mapping[str, int], tokens: bool = True) -> int:
    """Stored bytes per row of a graph (all stored inputs) at a stage's ``dims``."""
    total = 0
    for tensor in stored_inputs(spec, tokens):
        total += int(np.prod(row_shape(tensor, dims), dtype=np.int64)) * np.dtype(tensor.dtype).itemsize
    return total


def to_rows(spec: GraphSpec, feeds: Mapping[str, np.ndarray], tokens: bool = True) -> dict[str, np.ndarray]:
    """One call's feeds as rows (see the module doc); every stored input gets the same row count."""
    if spec.kind in FLOW_KINDS and tokens:  # token grids as token rows
        feeds = {name: _grid_to_rows(spec, name, value) for name, value in feeds.items()}
    rows: dict[str, np.ndarray] = {}
    count: int | None = None
    for tensor in stored_inputs(spec, tokens):
        found = row_axis(tensor)
        if found is None:
            continue
        axis, paired = found
        moved = np.moveaxis(np.asarray(feeds[tensor.name]), axis, 0)
        if paired:
            half = moved.shape[0] // 2
            moved = np.stack([moved[:half], moved[half:]], axis=1)
        if count is not None and moved.shape[0] != count:
            raise ValueError(f"graph '{spec.name}': input '{tensor.name}' has {moved.shape[0]} rows, expected {count}")
        count = moved.shape[0]
        rows[tensor.name] = np.ascontiguousarray(moved)
    if count is None:
        raise ValueError(f"graph '{spec.name}' has no row axis")
    for name in scalar_inputs(spec, tokens):
        value = np.asarray(feeds[name]).reshape(-1)
        if value.size != 1:
            raise ValueError(f"graph '{spec.name}': scalar input '{name}' holds {value.size} values")
        rows[name] = np.full(count, value[0], dtype=value.dtype)
    return rows


def from_rows(
    spec: GraphSpec,
    rows: Mapping[str, np.ndarray],
    constants: Mapping[str, np.ndarray] | None = None,
    tokens: bool = True,
) -> dict[str, np.ndarray]:
    """Feeds of one call from rows of one group; stage inputs from ``constants``.

    Scalar inputs must hold one value across the rows.
    """
    feeds: dict[str, np.ndarray] = {}
    view = row_view(spec, tokens)
    for tensor in view.inputs:
        if is_stage_input(view, tensor):
            if constants is None or tensor.name not in constants:
                raise ValueError(f"graph '{spec.name}': no value for stage input '{tensor.name}'")
            feeds[tensor.name] = np.array(constants[tensor.name])
            continue
        value = rows[tensor.name]
        found = row_axis(tensor)
        if found is None:
            if value.size == 0 or np.any(value != value[0]):
                raise ValueError(f"graph '{spec.name}': rows of one batch disagree on scalar input '{tensor.name}'")
            feeds[tensor.name] = np.array([value[0]], dtype=value.dtype)
            continue
        axis, paired = found
        if paired:
            value = np.concatenate([value[:, 0], value[:, 1]], axis=0)
        feeds[tensor.name] = np.ascontiguousarray(np.moveaxis(value, 0, axis))
    if spec.kind in FLOW_KINDS and tokens:  # token rows as one grid: B = 1, N = M (2B = 2 guidance rows of M tokens)
        for tensor in spec.inputs:
            if view.tensor(tensor.name).shape != tensor.shape:
                guidance = 2 if tensor.shape[0] == "2B" else 1
                value = feeds[tensor.name]
                feeds[tensor.name] = value.reshape(guidance, value.shape[0] // guidance, *value.shape[1:])
    return feeds


def _grid_to_rows(spec: GraphSpec, name: str, value: np.ndarray) -> np.ndarray:
    """A flow graph's token-grid input as token rows (the row view's shape); other inputs unchanged."""
    tensor = spec.tensor(name) if name in spec.input_names() else None
    if tensor is None or row_view(spec).tensor(name).shape == tensor.shape:
        return value
    array = np.asarray(value)
    return array.reshape(array.shape[0] * array.shape[1], *array.shape[2:])


def row_count(rows: Mapping[str, np.ndarray]) -> int:
    counts = {int(array.shape[0]) for array in rows.values()}
    if len(counts) != 1:
        raise ValueError(f"rows disagree on their count: {sorted(counts)}")
    return counts.pop()


def select(rows: Mapping[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {name: array[index] for name, array in rows.items()}


def concatenate(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not parts:
        return {}
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def batches(
    spec: GraphSpec,
    rows: Mapping[str, np.ndarray],
    batch_rows: int,
    fixed: bool = False,
    constants: Mapping[str, np.ndarray] | None = None,
    tokens: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Feeds of ``batch_rows`` rows each, from the rows of one group (the rows :func:`batch_indices` picks)."""
    inputs = {t.name: rows[t.name] for t in stored_inputs(spec, tokens)}
    for index in batch_indices(spec, rows, batch_rows, fixed, tokens):
        yield from_rows(spec, select(inputs, index), constants, tokens)


def batch_indices(
    spec: GraphSpec, rows: Mapping[str, np.ndarray], batch_rows: int, fixed: bool = False, tokens: bool = True
) -> list[np.ndarray]:
    """The rows of each batch of ``batch_rows`` rows, from the rows of one group; nothing is copied.

    Rows are grouped by their scalar inputs (a flow graph's ``t``, ``dt``, ``cfg``), in
    order of first appearance, so every batch is one valid call of the graph. The last
    batch of a group may be smaller, unless ``fixed``: then every batch has the same row
    count, ``min(batch_rows, smallest group)``, and a group's last batch is completed with
    that group's first rows (real rows used twice, never padding).
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    inputs = {t.name: rows[t.name] for t in stored_inputs(spec, tokens)}
    count = row_count(inputs)
    if count == 0:
        return []
    scalars = scalar_inputs(spec, tokens)
    if scalars:
        keys = np.stack([inputs[name].astype(np.float64) for name in scalars], axis=1)
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        groups = [np.flatnonzero(inverse.reshape(-1) == g) for g in np.argsort(first)]
    else:
        groups = [np.arange(count)]
    if fixed:
        batch_rows = min(batch_rows, *(len(group) for group in groups))
    picked = []
    for group in groups:
        for start in range(0, len(group), batch_rows):
            index = group[start : start + batch_rows]
            if fixed and len(index) < batch_rows:
                index = np.concatenate([index, group[: batch_rows - len(index)]])
            picked.append(index)
    return picked
