"""The request plan: how a request walks the graphs of a build, as data the build writes (graph contract 3).

A model family's export computes its :class:`RequestPlan` from its own config and writes it
into the manifest; the runtime
reads it back (:meth:`RequestPlan.from_dict`, strict: any bad field is a
:class:`~runtime.errors.ManifestError` naming it) and never derives it from a model config.
Everything a request needs beyond the graphs is here:

* per stage (:class:`StagePlan`): its token count ``N``, the previous stage's token count
  ``P``, the first KV-cache row of its keys/values ``T`` and how many rows it emits ``E``,
  its Euler times (``K + 1`` float32-rounded values of t, from the stage's start to its
  end) and its guidance ramp;
* the guidance rule: a stage's weight is ``w_s = 1 + (cfg - 1) * ramp_s``, and a step whose
  time ``t`` is above ``guidance_below`` runs unguided (weight 1); ``guidance_below`` None
  means every step is guided;
* the token channels ``C`` (the noise drawn per sample and stage is ``[N_s, C]``), the
  default guidance ``cfg``, and how many images one decoder call takes (``decoder_batch``).

:meth:`RequestPlan.calls` turns it into the ordered graph calls of one request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from runtime.errors import InvalidRequestError, ManifestError, shown
from runtime.graphs import Call, Kind
from runtime.limits import CFG_LIMIT


def check_cfg(cfg: object, name: str = "cfg") -> float:
    """A guidance weight as a float: a real number in [-CFG_LIMIT, CFG_LIMIT], else :class:`InvalidRequestError`.

    The graphs compute in float32: a weight that is finite in float64 but not in float32 (1e308),
    or just large enough to overflow the guidance mix, would give NaN latents and black images.
    """
    bad = InvalidRequestError(f"{name} must be a finite number in [-{CFG_LIMIT:g}, {CFG_LIMIT:g}], got {shown(cfg)}")
    if isinstance(cfg, (bool, np.bool_)) or not isinstance(cfg, (int, float, np.integer, np.floating)):
        raise bad
    try:
        value = float(cfg)
    except OverflowError:  # an int beyond float range
        raise bad from None
    if not math.isfinite(value) or abs(value) > CFG_LIMIT:
        raise bad
    return value


# The decoder has a request's largest activations (KL-16 at 256²: 128 channels at full resolution, 32 MiB
# per image and tensor); its calls are cut into sub-batches whose widest activation stays under this.
DECODER_ACTIVATION_BYTES = 64 << 20


def decoder_batch_for(widest_channels: int, height: int, width: int) -> int:
    """A plan's ``decoder_batch`` for a decoder whose widest full-resolution activation has ``widest_channels``
    float32 channels: as many images as keep one such activation under :data:`DECODER_ACTIVATION_BYTES`."""
    return max(1, DECODER_ACTIVATION_BYTES // (4 * widest_channels * height * width))


def f32(value: float) -> float:
    """``value`` rounded to float32, as the graphs receive it."""
    return float(np.float32(value))


@dataclass(frozen=True)
class StagePlan:
    """One stage of a request: its token counts, its KV-cache rows, its Euler times and its guidance ramp."""

    tokens: int  # N: tokens of the stage
    prev_tokens: int  # P: tokens of the previous stage's end state (stage 1: the one zero token it is given)
    cache_start: int  # T: KV-cache rows of the stages before (the stage reads rows [0, T))
    emitted: int  # E: rows of keys/values the stage emits (written at [T, T + E))
    times: tuple[float, ...]  # K + 1 float32 values of t, the stage's Euler grid from its start to its end
    ramp: float  # guidance ramp: w_s = 1 + (cfg - 1) * ramp

    @property
    def steps(self) -> int:
        """K, the stage's Euler steps."""
        return len(self.times) - 1

    def step_times(self) -> tuple[tuple[float, float], ...]:
        """(t, dt) of each Euler step, float32 as the graphs take them: dt = t_k - t_{k+1}."""
        return tuple((t, f32(t - t_next)) for t, t_next in zip(self.times, self.times[1:]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "prev_tokens": self.prev_tokens,
            "cache_start": self.cache_start,
            "emitted": self.emitted,
            "times": list(self.times),
            "ramp": self.ramp,
        }


STAGE_FIELDS = ("tokens", "prev_tokens", "cache_start", "emitted", "times", "ramp")
PLAN_FIELDS = ("stages", "channels", "cfg", "guidance_below", "decoder_batch")


@dataclass(frozen=True)
class RequestPlan:
    """How one request walks the graphs of a build (see the module doc); frozen and hashable."""

    stages: tuple[StagePlan, ...]
    channels: int  # C: channels of a token (the noise and the flow state are [B, N, C])
    cfg: float  # the default guidance weight
    guidance_below: float | None  # steps with t > guidance_below run at weight 1; None: every step is guided
    decoder_batch: int  # images per decoder call at most (the runtime splits larger batches)

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- queries
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def tokens(self) -> tuple[int, ...]:
        """N of every stage."""
        return tuple(stage.tokens for stage in self.stages)

    @property
    def cache_rows(self) -> int:
        """Rows of a request's whole KV cache: every stage's emitted rows."""
        return max(stage.cache_start + stage.emitted for stage in self.stages)

    def stage(self, stage: int) -> StagePlan:
        """A 1-based stage."""
        return self.stages[stage - 1]

    def weights(self, cfg: float | None = None) -> tuple[float, ...]:
        """Guidance weight of each stage, ``1 + (cfg - 1) * ramp_s`` (``cfg`` None: the plan's default)."""
        scale = check_cfg(self.cfg if cfg is None else cfg)
        return tuple(1.0 + (scale - 1.0) * stage.ramp for stage in self.stages)

    def guided(self, t: float) -> bool:
        """Whether a step at time ``t`` takes its stage's weight (else weight 1)."""
        return self.guidance_below is None or t <= self.guidance_below

    def dims(self, stage: int, batch: int) -> dict[str, int]:
        """Every symbolic dim of the contract at a 1-based stage and batch size."""
        st = self.stage(stage)
        return {
            "B": batch,
            "2B": 2 * batch,
            "N": st.tokens,
            "P": st.prev_tokens,
            "T": st.cache_start,
            "E": st.emitted,
            "K": st.steps,
        }

    def calls(self, fuse_flow_loop: bool = False) -> tuple[Call, ...]:
        """Every graph call of one request, in order (:class:`runtime.graphs.Call`)."""
        return self._calls_fused if fuse_flow_loop else self._calls_stepped

    def graph_stages(self, kind: Kind) -> list[int]:
        """The stages at which a request calls the graph of ``kind`` (the decoder: the last one)."""
        fused = kind == Kind.FLOW_LOOP
        return sorted({call.stage for call in self.calls(fused) if call.graph == kind})

    @cached_property
    def _calls_stepped(self) -> tuple[Call, ...]:
        return self._build_calls(False)

    @cached_property
    def _calls_fused(self) -> tuple[Call, ...]:
        return self._build_calls(True)

    def _build_calls(self, fused: bool) -> tuple[Call, ...]:
        calls: list[Call] = []
        for index, st in enumerate(self.stages):
            stage = index + 1
            calls.append(Call(Kind.BACKBONE, stage))
            times = st.step_times()
            if fused:
                guided = {self.guided(t) for t, _ in times}
                if len(guided) > 1:
                    raise ManifestError(
                        f"plan: stage {stage}'s steps lie on both sides of guidance_below ({self.guidance_below}), "
                        "but a fused flow_loop takes one guidance weight per stage; build without --fuse-flow-loop"
                    )
                t, dt = tuple(t for t, _ in times), tuple(d for _, d in times)
                calls.append(Call(Kind.FLOW_LOOP, stage, None, t, dt, ends_stage=True, guided=guided.pop()))
            else:
                last = len(times) - 1
                calls += [
                    Call(Kind.FLOW_STEP, stage, step, (t,), (dt,), ends_stage=step == last, guided=self.guided(t))
                    for step, (t, dt) in enumerate(times)
                ]
        calls.append(Call(Kind.DECODER, self.num_stages))
        return tuple(calls)

    # ------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise :class:`ManifestError` naming the first field that breaks the plan's rules."""
        if not self.stages:
            raise ManifestError("plan: field 'stages' must hold at least one stage")
        _positive_int(self.channels, "channels")
        _positive_int(self.decoder_batch, "decoder_batch")
        _finite(self.cfg, "cfg")
        if self.guidance_below is not None:
            _finite(self.guidance_below, "guidance_below")
        rows = 0
        for index, st in enumerate(self.stages):
            where = f"stages[{index}]"
            _positive_int(st.tokens, f"{where}.tokens")
            _positive_int(st.prev_tokens, f"{where}.prev_tokens")
            for name in ("cache_start", "emitted"):
                value = getattr(st, name)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ManifestError(f"plan: field '{where}.{name}' must be a non-negative integer, got {value!r}")
            if st.cache_start != rows:
                raise ManifestError(
                    f"plan: field '{where}.cache_start' is {st.cache_start}, but the stages before emit {rows} rows"
                )
            rows += st.emitted
            if index and st.prev_tokens != self.stages[index - 1].tokens:
                raise ManifestError(
                    f"plan: field '{where}.prev_tokens' is {st.prev_tokens}, but stage {index} has "
                    f"{self.stages[index - 1].tokens} tokens"
                )
            times = st.times
            if not isinstance(times, tuple) or len(times) < 2:
                raise ManifestError(f"plan: field '{where}.times' must hold at least two times (one Euler step)")
            for t in times:
                _finite(t, f"{where}.times")
                if f32(t) != t:
                    raise ManifestError(f"plan: field '{where}.times' holds {t!r}, which is not a float32 value")
            if any(a <= b for a, b in zip(times, times[1:])):
                raise ManifestError(f"plan: field '{where}.times' must decrease strictly")
            _finite(st.ramp, f"{where}.ramp")

    # -------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": [stage.to_dict() for stage in self.stages],
            "channels": self.channels,
            "cfg": self.cfg,
            "guidance_below": self.guidance_below,
            "decoder_batch": self.decoder_batch,
        }

    @classmethod
    def from_dict(cls, data: Any) -> RequestPlan:
        """The inverse of :meth:`to_dict`; :class:`ManifestError` naming the field for anything else."""
        if not isinstance(data, Mapping):
            raise ManifestError(f"plan: must be a JSON object, got {type(data).__name__}")
        _exact_fields(data, PLAN_FIELDS, "plan")
        raw_stages = data["stages"]
        if not isinstance(raw_stages, list):
            raise ManifestError(f"plan: field 'stages' must be a list, got {type(raw_stages).__name__}")
        stages = []
        for index, raw in enumerate(raw_stages):
            where = f"stages[{index}]"
            if not isinstance(raw, Mapping):
                raise ManifestError(f"plan: field '{where}' must be an object")
            _exact_fields(raw, STAGE_FIELDS, f"plan {where}")
            times = raw["times"]
            if not isinstance(times, list):
                raise ManifestError(f"plan: field '{where}.times' must be a list of numbers")
            stages.append(
                StagePlan(
                    tokens=raw["tokens"],
                    prev_tokens=raw["prev_tokens"],
                    cache_start=raw["cache_start"],
                    emitted=raw["emitted"],
                    times=tuple(_number(t, f"{where}.times") for t in times),
                    ramp=_number(raw["ramp"], f"{where}.ramp"),
                )
            )
        below = data["guidance_below"]
        return cls(
            stages=tuple(stages),
            channels=data["channels"],
            cfg=_number(data["cfg"], "cfg"),
            guidance_below=None if below is None else _number(below, "guidance_below"),
            decoder_batch=data["decoder_batch"],
        )


def _exact_fields(data: Mapping[str, Any], fields: tuple[str, ...], where: str) -> None:
    for name in fields:
        if name not in data:
            raise ManifestError(f"{where}: missing field '{name}'")
    extra = sorted(set(data) - set(fields))
    if extra:
        raise ManifestError(f"{where}: unknown field '{extra[0]}'")


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ManifestError(f"plan: field '{name}' must be a number, got {shown(value)}")
    return float(value)


def _finite(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ManifestError(f"plan: field '{name}' must be a finite number, got {shown(value)}")


def _positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ManifestError(f"plan: field '{name}' must be a positive integer, got {shown(value)}")
