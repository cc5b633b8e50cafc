"""``CalibrationPlan``: which requests the fp32 pipeline runs to capture calibration inputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from calibration.errors import CalibrationError
from runtime.errors import InvalidRequestError

SPLITS = ("calibration", "held_out")
MiB = 1 << 20


@dataclass(frozen=True)
class CalibrationPlan:
    """``num_requests`` requests of ``batch`` samples, labels cycling through every class.

    Request *r* has labels ``(r·batch + j) mod num_classes`` for j < batch and seed
    ``seed + r`` (sample *j* draws the noise key ``(seed + r, j)``), so a plan is fully
    deterministic. Every ``holdout_every``-th request (r mod holdout_every = holdout_every - 1)
    is held out: its inputs are stored for validation and never given to a quantizer.

    ``every_class`` (the default): the calibration requests must hold every class, so that each class's
    activations shape the ranges; False lets a plan hold fewer (:meth:`covered_classes` says which), for
    models whose classes are too many to cover at the capture's cost (the classes it misses are quantized
    with the ranges of the others).

    Stored size is bounded per graph and split: at most ``max_samples`` samples of each
    batch graph (backbones, decoder) and ``max_rows`` token rows of ``flow_step`` per
    (stage, Euler step), both lowered further so that no graph's split exceeds
    ``max_mib`` MiB. Rows are drawn evenly across the split's requests.
    """

    num_classes: int
    num_requests: int = 64
    batch: int = 8
    seed: int = 0
    cfg: float | None = None
    holdout_every: int = 8
    max_samples: int = 256
    max_rows: int = 512
    max_mib: float = 8.0
    every_class: bool = True

    def __post_init__(self) -> None:
        for name in ("num_classes", "num_requests", "batch", "max_samples", "max_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"calibration plan: {name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidRequestError(f"calibration plan: seed must be a non-negative integer, got {self.seed!r}")
        if isinstance(self.holdout_every, bool) or not isinstance(self.holdout_every, int) or self.holdout_every < 2:
            raise InvalidRequestError(
                f"calibration plan: holdout_every must be an integer >= 2, got {self.holdout_every!r}"
            )
        if self.num_requests < self.holdout_every:
            raise InvalidRequestError(
                f"calibration plan: {self.num_requests} requests leave none held out "
                f"(every {self.holdout_every}th request is); use at least {self.holdout_every} requests"
            )
        if self.cfg is not None and (isinstance(self.cfg, bool) or not isinstance(self.cfg, (int, float))):
            raise InvalidRequestError(f"calibration plan: cfg must be a number or None, got {self.cfg!r}")
        if not isinstance(self.max_mib, (int, float)) or isinstance(self.max_mib, bool) or not self.max_mib > 0:
            raise InvalidRequestError(f"calibration plan: max_mib must be positive, got {self.max_mib!r}")
        if not isinstance(self.every_class, bool):
            raise InvalidRequestError(f"calibration plan: every_class must be true or false, got {self.every_class!r}")
        seen = self.covered_classes()
        if self.every_class and len(seen) < self.num_classes:
            raise InvalidRequestError(
                f"calibration plan: its calibration requests cover {len(seen)} of {self.num_classes} classes; "
                "use more requests or a larger batch"
            )

    def covered_classes(self) -> set[int]:
        """The classes the calibration requests (not the held-out ones) hold."""
        return {label for index in self.indices("calibration") for label in self.labels(index)}

    @staticmethod
    def covering(num_classes: int, at_least: int = 64, batch: int = 8, holdout_every: int = 8) -> int:
        """The fewest requests, at least ``at_least``, whose calibration requests hold every class (labels cycle
        through the classes; every ``holdout_every``-th request is held out, so some classes come round again
        only after a wrap: ECAR-b's 1000 classes need 245 requests of 8)."""
        seen: set[int] = set()
        requests = 0
        while len(seen) < num_classes:
            if requests % holdout_every != holdout_every - 1:
                seen.update((requests * batch + j) % num_classes for j in range(batch))
            requests += 1
        return max(at_least, requests)

    @classmethod
    def for_config(cls, config: Any, **overrides: Any) -> CalibrationPlan:
        """The default plan for a model config (its class count), with ``overrides``."""
        return cls(num_classes=config.num_classes, **overrides)

    def labels(self, index: int) -> list[int]:
        return [(index * self.batch + j) % self.num_classes for j in range(self.batch)]

    def seed_of(self, index: int) -> int:
        return self.seed + index

    def split(self, index: int) -> str:
        """ "held_out" for every ``holdout_every``-th request, else "calibration"."""
        return "held_out" if index % self.holdout_every == self.holdout_every - 1 else "calibration"

    def indices(self, split: str) -> list[int]:
        if split not in SPLITS:
            raise InvalidRequestError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
        return [r for r in range(self.num_requests) if self.split(r) == split]

    def requests(self) -> Iterator[tuple[list[int], int]]:
        """(labels, seed) of every request, in order (held-out ones included; see ``split``)."""
        for index in range(self.num_requests):
            yield self.labels(index), self.seed_of(index)

    @property
    def max_bytes(self) -> int:
        return int(self.max_mib * MiB)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> CalibrationPlan:
        if not isinstance(data, dict):
            raise CalibrationError("calibration plan must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise CalibrationError(f"calibration plan has unknown fields {unknown}")
        try:
            return cls(**data)
        except (TypeError, InvalidRequestError) as exc:
            raise CalibrationError(f"invalid calibration plan: {exc}") from None
