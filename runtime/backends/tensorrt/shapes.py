"""Concrete shapes of a graph's tensors from the contract's symbolic dims (B, 2B, M, 2M)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from runtime.errors import InvalidRequestError
from runtime.graphs import GraphSpec


def resolve_dims(spec: GraphSpec, shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """The symbolic dims (B, 2B, M, 2M) of ``spec`` implied by concrete input ``shapes``.

    Raises :class:`InvalidRequestError` when a shape does not fit the graph's contract.
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
            if got <= 0 or got % factor:
                raise InvalidRequestError(f"graph '{spec.name}' input '{tensor.name}': dim {want}={got} is invalid")
            if values.setdefault(base, got // factor) != got // factor:
                raise InvalidRequestError(
                    f"graph '{spec.name}' input '{tensor.name}' has shape {shape}, inconsistent with the other inputs "
                    f"({base}={values[base]})"
                )
    dims = dict(values)
    for base, value in values.items():
        dims[f"2{base}"] = 2 * value
    return dims


def nbytes(shape: Sequence[int], dtype: np.dtype[Any]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
