"""One graph call cut along its batch: fewer samples per call, the same outputs.

Every graph of the contract treats its samples independently, and every tensor that carries them does
so on one of the contract's batch axes (:data:`runtime.graphs.BATCH_DIMS`): ``B``, one row per sample,
or ``2B``, the samples' conditional rows followed by their unconditional rows (the guidance halves).
So a call on samples ``[start, stop)`` is the full call cut: :func:`cut` takes those samples' rows
(from both halves of a ``2B`` axis), :func:`join` puts the parts' outputs back in order, and the result
is the uncut call's (bit for bit where an engine's kernels do not depend on the batch).

Why a runtime cuts calls: a call's activations grow with its token rows, and on the CPU that memory
is held per call. OpenVINO's CPU plugin keeps, for every compiled graph, the buffers of the largest
shape it has run, side by side for all layers of a dynamic-shape graph: ecar-b's backbone held 3.2 GB
after its last stage at batch 8 (16 rows of 256 tokens) and 0.4 GB after the same stage one sample at a
time. ONNX Runtime on the CPU allocates them during each call. A product of one sample's 512 token rows
already runs at the CPU's full GEMM speed, so a cut costs a few extra calls and nothing else:
:func:`samples_per_call` keeps a call's conditioning ``z`` — ``[2B, N, d]`` float32, as wide as the
backbone's activations — under a backend's ``activation_budget`` (:func:`host_activation_budget` for
the CPU backends: :data:`HOST_ACTIVATION_BYTES`, measured on a 2-core Zen 4 by
``benchmarks/openvino_memory.py``, both engines with and without; ``$ECAR_ACTIVATION_BUDGET`` sets
another, 0 none). The decoder is cut by the build's own ``decoder_batch`` instead (:mod:`runtime.plan`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from runtime.errors import ConfigError
from runtime.graphs import GraphSpec, TensorSpec

# What one call's conditioning z ([2B, N, d] float32) may take on a CPU backend before the call is cut:
# ecar-b (d = 768) then runs its last stage (256 tokens) one sample per call and its fourth (64) five.
HOST_ACTIVATION_BYTES = 2 << 20
BUDGET_ENV = "ECAR_ACTIVATION_BUDGET"  # bytes, overriding HOST_ACTIVATION_BYTES; 0: never cut


def host_activation_budget() -> int | None:
    """The CPU backends' ``activation_budget``: ``$ECAR_ACTIVATION_BUDGET`` where set (a whole number of
    bytes; 0 turns cutting off, for machines where the measured default does not suit), else
    :data:`HOST_ACTIVATION_BYTES`. :class:`ConfigError` naming the variable for anything else."""
    raw = os.environ.get(BUDGET_ENV)
    if raw is None or not raw.strip():
        return HOST_ACTIVATION_BYTES
    try:
        value = int(raw.strip()) if len(raw) <= 32 and raw.strip().isdigit() else -1
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(
            f"{BUDGET_ENV} must be a whole number of bytes (0: never cut calls; default {HOST_ACTIVATION_BYTES}), "
            f"got {raw[:40]!r}; fix or unset it"
        )
    return value or None


def samples_per_call(spec: GraphSpec, dims: Mapping[str, int], budget: int) -> int:
    """How many samples one call of ``spec`` takes so that its ``z`` stays within ``budget`` bytes (at least
    one). ``dims``: the call's stage dims at batch 1 (:meth:`runtime.plan.RequestPlan.dims`). A graph
    without ``z`` (the decoder) is never cut by this rule: its cap is the plan's ``decoder_batch``."""
    if "z" not in spec.input_names() + spec.output_names():
        return 1 << 62
    z = spec.tensor("z")
    per_sample = int(np.prod(z.concrete(dict(dims)), dtype=np.int64)) * np.dtype(z.dtype).itemsize
    return max(1, budget // max(1, per_sample))


def _batch_axis(tensor: TensorSpec) -> tuple[int, bool] | None:
    """The axis of ``tensor`` that holds samples and whether it holds them twice (``2B``); None: no batch."""
    for axis, dim in enumerate(tensor.shape):
        if dim in ("B", "2B"):
            return axis, dim == "2B"
    return None


def cut(
    tensors: Sequence[TensorSpec], values: Mapping[str, np.ndarray], start: int, stop: int
) -> dict[str, np.ndarray]:
    """The values of samples ``[start, stop)``: every tensor with a batch axis cut, the others as they are."""
    out: dict[str, np.ndarray] = {}
    for tensor in tensors:
        value = values[tensor.name]
        found = _batch_axis(tensor)
        if found is not None:
            axis, doubled = found
            if doubled:
                half = value.shape[axis] // 2
                rows = np.r_[start:stop, half + start : half + stop]
                value = np.take(value, rows, axis=axis)
            else:
                value = value[(slice(None),) * axis + (slice(start, stop),)]
        out[tensor.name] = value
    return out


def join(tensors: Sequence[TensorSpec], parts: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """The outputs of the whole call from its parts' outputs (each in ``tensors``' order, samples in order)."""
    joined = []
    for index, tensor in enumerate(tensors):
        pieces = [part[index] for part in parts]
        found = _batch_axis(tensor)
        if found is None:  # no batch: every part computed the same value
            joined.append(pieces[0])
            continue
        axis, doubled = found
        if doubled:  # all conditional halves, then all unconditional ones
            halves = [np.split(piece, 2, axis=axis) for piece in pieces]
            pieces = [h[0] for h in halves] + [h[1] for h in halves]
        joined.append(np.concatenate(pieces, axis=axis))
    return joined


def run_cut(
    spec: GraphSpec,
    feeds: Mapping[str, np.ndarray],
    batch: int,
    step: int,
    run: Callable[[Mapping[str, np.ndarray]], list[np.ndarray]],
) -> list[np.ndarray]:
    """``run(feeds)`` for a call of ``batch`` samples, made as calls of at most ``step`` samples each."""
    if batch <= step:
        return run(feeds)
    parts = [run(cut(spec.inputs, feeds, start, min(start + step, batch))) for start in range(0, batch, step)]
    return join(spec.outputs, parts)
