"""Row layout of stored calibration inputs: every graph's feeds as independent rows.

Every graph of the contract (DESIGN §4) is row-independent along its batch axis: a
backbone's sample *i* reads ``labels[i]``, ``noise[i]``, ``prev[i]`` and the guidance rows
*i* and *B + i* of ``past_kv``; a flow graph's token *m* reads ``x[m]`` and the guidance
rows *m* and *M + m* of ``z``. So a calibration set stores rows, not calls, and rebuilds
feeds of any batch size from any subset of rows:

* an input whose row axis is ``B`` / ``M`` is stored with that axis first: ``[rows, ...]``;
* an input whose row axis is ``2B`` / ``2M`` (conditional rows, then unconditional rows)
  is stored as ``[rows, 2, ...]``: ``[:, 0]`` the conditional and ``[:, 1]`` the
  unconditional row of each sample or token (``past_kv`` [L, 2, 2B, h, T, d] becomes
  [rows, 2, L, 2, h, T, d]);
* a scalar input of shape ``[1]`` (``t``, ``dt``, ``cfg``) is stored once per row,
  ``[rows]``; a batch only ever joins rows that share every scalar value.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from runtime.graphs import GraphSpec, TensorSpec

ROW_DIMS = ("B", "M")
PAIRED_DIMS = ("2B", "2M")


def row_axis(tensor: TensorSpec) -> tuple[int, bool] | None:
    """(axis, paired) of a tensor's row axis, or None for a per-call scalar."""
    for axis, dim in enumerate(tensor.shape):
        if dim in ROW_DIMS:
            return axis, False
        if dim in PAIRED_DIMS:
            return axis, True
    return None


def scalar_inputs(spec: GraphSpec) -> list[str]:
    return [t.name for t in spec.inputs if row_axis(t) is None]


def row_shape(tensor: TensorSpec) -> tuple[int, ...]:
    """The stored shape of one row (without the leading row axis)."""
    found = row_axis(tensor)
    if found is None:
        return ()
    axis, paired = found
    rest = tuple(int(d) for i, d in enumerate(tensor.shape) if i != axis)
    return (2, *rest) if paired else rest


def row_bytes(spec: GraphSpec) -> int:
    """Stored bytes per row of a graph (all inputs)."""
    total = 0
    for tensor in spec.inputs:
        total += int(np.prod(row_shape(tensor), dtype=np.int64)) * np.dtype(tensor.dtype).itemsize
    return total


def to_rows(spec: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One call's feeds as rows (see the module doc); every input gets the same row count."""
    rows: dict[str, np.ndarray] = {}
    count: int | None = None
    for tensor in spec.inputs:
        value = np.asarray(feeds[tensor.name])
        found = row_axis(tensor)
        if found is None:
            continue
        axis, paired = found
        moved = np.moveaxis(value, axis, 0)
        if paired:
            half = moved.shape[0] // 2
            moved = np.stack([moved[:half], moved[half:]], axis=1)
        if count is not None and moved.shape[0] != count:
            raise ValueError(f"graph '{spec.name}': input '{tensor.name}' has {moved.shape[0]} rows, expected {count}")
        count = moved.shape[0]
        rows[tensor.name] = np.ascontiguousarray(moved)
    if count is None:
        raise ValueError(f"graph '{spec.name}' has no row axis")
    for tensor in spec.inputs:
        if row_axis(tensor) is None:
            value = np.asarray(feeds[tensor.name]).reshape(-1)
            if value.size != 1:
                raise ValueError(f"graph '{spec.name}': scalar input '{tensor.name}' holds {value.size} values")
            rows[tensor.name] = np.full(count, value[0], dtype=value.dtype)
    return rows


def from_rows(spec: GraphSpec, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds of one call from rows; scalar inputs must hold one value across the rows."""
    feeds: dict[str, np.ndarray] = {}
    for tensor in spec.inputs:
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
    return feeds


def row_count(rows: dict[str, np.ndarray]) -> int:
    counts = {int(array.shape[0]) for array in rows.values()}
    if len(counts) != 1:
        raise ValueError(f"rows disagree on their count: {sorted(counts)}")
    return counts.pop()


def select(rows: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {name: array[index] for name, array in rows.items()}


def concatenate(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not parts:
        return {}
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def batches(
    spec: GraphSpec, rows: dict[str, np.ndarray], batch_rows: int, fixed: bool = False
) -> Iterator[dict[str, np.ndarray]]:
    """Feeds of ``batch_rows`` rows each.

    Rows are grouped by their scalar inputs (a flow graph's ``t``, ``dt``, ``cfg``), in
    order of first appearance, so every batch is one valid call of the graph. The last
    batch of a group may be smaller, unless ``fixed``: then every batch has the same row
    count, ``min(batch_rows, smallest group)``, and a group's last batch is completed with
    that group's first rows (real rows used twice, never padding).
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    inputs = {t.name: rows[t.name] for t in spec.inputs}
    count = row_count(inputs)
    if count == 0:
        return
    scalars = scalar_inputs(spec)
    if scalars:
        keys = np.stack([inputs[name].astype(np.float64) for name in scalars], axis=1)
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        groups = [np.flatnonzero(inverse.reshape(-1) == g) for g in np.argsort(first)]
    else:
        groups = [np.arange(count)]
    if fixed:
        batch_rows = min(batch_rows, *(len(group) for group in groups))
    for group in groups:
        for start in range(0, len(group), batch_rows):
            index = group[start : start + batch_rows]
            if fixed and len(index) < batch_rows:
                index = np.concatenate([index, group[: batch_rows - len(index)]])
            yield from_rows(spec, select(inputs, index))
