"""The per-sample noise of a request: keys, and what is drawn from them (the contract every backend follows).

Sample ``i`` of a request owns the generator ``numpy.random.Generator(PCG64(SeedSequence([seed, i])))``
(or ``[seed_i, 0]`` when one seed per sample is given). From it, stage by stage, one array
``standard_normal((N_s, C), dtype=float32)`` is drawn, with ``N_s`` and ``C`` from the
build's request plan (:class:`runtime.plan.RequestPlan`). Nothing else is random, so a
sample's image depends only on its key, never on what else shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from runtime.errors import InvalidRequestError

MAX_SEED = 2**63 - 1


def noise_keys(seed: int | Sequence[int], batch: int) -> list[tuple[int, int]]:
    """Per-sample noise keys: (seed, i) for an int seed, (seed_i, 0) for a list of seeds."""
    if isinstance(seed, (bool, np.bool_)):
        raise InvalidRequestError(f"seed must be an integer, got {seed!r}")
    if isinstance(seed, (int, np.integer)):
        _check_seed(int(seed))
        return [(int(seed), i) for i in range(batch)]
    if isinstance(seed, np.ndarray):
        seed = seed.tolist()
    if isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence):
        raise InvalidRequestError(f"seed must be an integer or a list of integers, got {seed!r}")
    seeds = list(seed)
    if len(seeds) != batch:
        raise InvalidRequestError(f"got {len(seeds)} seeds for {batch} labels; give one seed per label")
    for value in seeds:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise InvalidRequestError(f"every seed must be an integer, got {value!r}")
        _check_seed(int(value))
    return [(int(value), 0) for value in seeds]


def check_keys(keys: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Explicit per-sample noise keys, validated: (seed, index) pairs of non-negative integers."""
    checked = []
    for key in keys:
        pair = tuple(key)
        if len(pair) != 2 or any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) for v in pair):
            raise InvalidRequestError(f"noise key {key!r} is not a (seed, index) pair of integers")
        _check_seed(int(pair[0]))
        if pair[1] < 0:
            raise InvalidRequestError(f"noise key {key!r}: the index must be a non-negative integer")
        checked.append((int(pair[0]), int(pair[1])))
    return checked


def _check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise InvalidRequestError(f"seed {seed} is out of range: use an integer in [0, 2**63 - 1]")


def draw(tokens: Sequence[int], channels: int, keys: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Noise of a batch, one float32 [B, N_s, C] array per stage, ``tokens`` giving each stage's N_s."""
    per_stage: list[list[np.ndarray]] = [[] for _ in tokens]
    for key in keys:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))
        for s, count in enumerate(tokens):
            per_stage[s].append(rng.standard_normal((count, channels), dtype=np.float32))
    return [np.stack(arrays) for arrays in per_stage]
