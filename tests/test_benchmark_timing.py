"""How ``benchmarks/pipeline_speed.py`` times its variants: round-robin rounds, warm blocks for short calls."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pipeline_speed  # noqa: E402


class _Clock:
    """A fake ``time`` module: ``perf_counter`` advances only when a fake call "runs"."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _runner(clock: _Clock, name: str, durations: list[float], log: list[str]) -> Callable[[], str]:
    def run() -> str:
        seconds = durations.pop(0) if len(durations) > 1 else durations[0]
        clock.now += seconds
        log.append(name)
        return f"{name}:{seconds}"

    return run


def test_variants_take_turns_in_a_rotating_order(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(pipeline_speed, "time", clock)
    log: list[str] = []
    runners = {name: _runner(clock, name, [2.0], log) for name in ("a", "b", "c")}
    walls, timings = pipeline_speed.time_variants(runners, repeats=4)  # type: ignore[arg-type]
    assert log[:3] == ["a", "b", "c"]  # one warm-up each
    assert log[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert walls == {name: pytest.approx([2.0] * 4) for name in runners}
    assert timings == {name: [f"{name}:2.0"] * 4 for name in runners}


def test_short_calls_are_timed_warm_in_blocks_and_count_with_their_median(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(pipeline_speed, "time", clock)
    log: list[str] = []
    # warm-up 0.25 s -> blocks of 4 timed calls after one untimed call; the slow call (9 s) is the cold one
    fast = [0.25, 9.0, 0.3, 0.1, 0.2, 0.4, 9.0, 0.2, 0.2, 0.2, 0.2]
    runners = {"fast": _runner(clock, "fast", fast, log), "slow": _runner(clock, "slow", [3.0], log)}
    walls, timings = pipeline_speed.time_variants(runners, repeats=2)  # type: ignore[arg-type]
    assert log.count("slow") == 1 + 2, "a call over a second is its own turn, no extra calls"
    assert log.count("fast") == 1 + 2 * (1 + 4)
    # round 1: untimed 9.0, timed [0.3, 0.1, 0.2, 0.4] -> median of four = the upper middle, 0.3
    # round 2: untimed 9.0, timed [0.2, 0.2, 0.2, 0.2] -> 0.2
    assert walls["fast"] == pytest.approx([0.3, 0.2])
    assert timings["fast"] == ["fast:0.3", "fast:0.2"], "the stage timings come from the call reported"
    assert walls["slow"] == pytest.approx([3.0, 3.0])


def test_the_machine_record_identifies_the_machine_and_says_whether_the_run_was_quiet(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import _common

    monkeypatch.setattr(_common, "load_average", lambda: [2.5, 1.0, 0.5])
    start = _common.begin_run()
    assert start == {"load_average_at_start": [2.5, 1.0, 0.5], "quiet": False}
    assert "not a quiet run" in capsys.readouterr().err
    record = _common.machine()
    for key in ("cpu_count", "cpu_model", "cpu_features", "platform", "python", "versions"):  # the older keys
        assert key in record
    assert record["quiet"] is False and record["load_average_at_end"] == [2.5, 1.0, 0.5]
    assert {"vendor", "family", "model", "stepping", "physical_cores", "logical_threads", "caches"} <= set(
        record["cpu"]
    )
    assert {"torch", "onnxruntime", "openvino", "numpy"} <= set(record["versions"])
    assert record["torch_config"]["blas"]
    monkeypatch.setattr(_common, "load_average", lambda: [0.1, 0.2, 0.3])
    assert _common.begin_run()["quiet"] is True
    assert capsys.readouterr().err == ""


def test_benchmark_weights_leave_no_zero_tensor() -> None:
    import _common
    import torch

    from ecar_export import presets

    model, weights = _common.benchmark_model("ecar-digits-s1")  # a random-init preset: DiT-style zero gates
    assert weights["zero_fraction_before"] > 0.05 and weights["tensors_redrawn"] > 0
    assert all(param.any() for param in model.parameters())
    assert "no zero tensors" in weights["weights"]
    again, _ = _common.benchmark_model("ecar-digits-s1")  # seeded: the same weights every time
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
    _, trained = _common.benchmark_model(presets.DEMO)
    assert trained["weights"] == "trained (bundled)"


def test_each_variant_is_set_against_the_peak_of_the_precision_it_runs_at() -> None:
    run = pipeline_speed.run_precision
    assert run("torch", None, None)[0] == "fp32" and run("torch-compile-bf16", None, None)[0] == "bf16"
    assert run("onnxruntime", "fp16", None)[0] == "fp32"
    assert run("onnxruntime", "int8", None)[0] == "int8" and "upper-bound" in run("openvino", "int8", {})[1]
    compiled = {"backbone": {"inference_precision": "bf16"}, "flow_step": {"inference_precision": "bf16"}}
    assert run("openvino", "fp16", compiled)[0] == "bf16"
    assert run("openvino", "fp32", {"backbone": {"inference_precision": "f32"}})[0] == "fp32"
