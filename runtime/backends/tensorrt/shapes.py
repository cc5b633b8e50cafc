"""Concrete shapes of a graph's tensors from the contract's symbolic dims (:mod:`runtime.graphs`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from runtime.errors import InvalidRequestError
from runtime.graphs import GraphSpec

EMPTY_ALLOWED = ("T", "E")
PAIRED = ("B",)  # dims whose doubles (2B guidance rows) the contract names


def resolve_dims(spec: GraphSpec, shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """The symbolic dims (B, 2B, N, P, T, E, K) of ``spec`` implied by concrete input ``shapes``.

    Only the cache lengths ``T`` and ``E`` may be 0 (stage 1 reads no cache, the last stage
    emits none). Raises :class:`InvalidRequestError` when a shape does not fit the contract.
    """
    values: dict[str, int] = {}
    for tensor in spec.inputs:
        if tensor.name not in shapes:
            raise InvalidRequestError(f"graph '{spec.name}' needs input '{tensor.name}'")
        shape = tuple(int(d) for d in shapes[tensor.name])
        if len(shape) != len(tensor.shape):
            raise InvalidRequestError(
                f"graph '{spec.name}' input '{tensor.name}' must have {len(tensor.shape)} dims, got shape {shape}"
            )
        for want, got in zip(tensor.shape, shape):
            if isinstance(want, int):
                if want != got:
                    raise InvalidRequestError(
                        f"graph '{spec.name}' input '{tensor.name}' has shape {shape}, the contract says "
                        f"{list(tensor.shape)}"
                    )
                continue
            base, factor = (want[1:], 2) if want.startswith("2") else (want, 1)
            if got < (0 if base in EMPTY_ALLOWED else 1) or got % factor:
                raise InvalidRequestError(f"graph '{spec.name}' input '{tensor.name}': dim {want}={got} is invalid")
            if values.setdefault(base, got // factor) != got // factor:
                raise InvalidRequestError(
                    f"graph '{spec.name}' input '{tensor.name}' has shape {shape}, inconsistent with the other inputs "
                    f"({base}={values[base]})"
                )
    dims = dict(values)
    for base in PAIRED:
        if base in values:
            dims[f"2{base}"] = 2 * values[base]
    return dims


def nbytes(shape: Sequence[int], dtype: np.dtype[Any]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
