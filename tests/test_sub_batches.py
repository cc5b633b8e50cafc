"""Calls cut along their batch (runtime.sub_batches): the same results from smaller calls.

The CPU backends declare an ``activation_budget``; the Pipeline then runs a backbone or flow call that
would hold more than that as several calls of fewer samples, and the decoder in the plan's
``decoder_batch``. Checked here: cutting and joining put every sample's rows back where they were
(both guidance halves of a ``2B`` axis, on whichever axis it is), the rule picks the samples that fit,
and whole requests give the uncut requests' results on ONNX Runtime and OpenVINO while the engines
really see the smaller calls.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections import Counter
from typing import Any

import numpy as np
import pytest
from conftest import BatchRecorder, BuildCache

from runtime import manifest as manifest_io
from runtime import sub_batches
from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from runtime.errors import ConfigError
from runtime.graphs import Kind
from runtime.pipeline import Pipeline

TINY = "tiny-1-2-4"
BACKENDS = [
    pytest.param("onnxruntime", id="onnxruntime"),
    pytest.param(
        "openvino",
        id="openvino",
        marks=pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="OpenVINO not installed"),
    ),
]


def _values(spec_tensors: Any, dims: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {t.name: rng.standard_normal(t.concrete(dims)).astype(np.float32) for t in spec_tensors}


def test_cut_and_join_put_every_samples_rows_back(build_cache: BuildCache, rng: np.random.Generator) -> None:
    manifest = manifest_io.load(build_cache.get(TINY).dir)
    batch = 5
    for spec in manifest.specs.values():
        stage = manifest.plan.num_stages
        dims = manifest.plan.dims(stage, batch)
        if spec.kind == Kind.BACKBONE:
            dims["T"] = 3  # a cache with rows, whatever the stage
        tensors = [*spec.inputs, *spec.outputs]
        values = _values(tensors, dims, rng)
        for step in range(1, batch + 1):
            starts = range(0, batch, step)
            parts = [sub_batches.cut(tensors, values, i, min(i + step, batch)) for i in starts]
            for part, start in zip(parts, starts):
                stop = min(start + step, batch)
                for tensor in tensors:
                    shape = tensor.shape
                    if "2B" in shape:  # the samples' conditional rows, then their unconditional ones
                        axis = shape.index("2B")
                        rows = [*range(start, stop), *range(batch + start, batch + stop)]
                        assert np.array_equal(part[tensor.name], np.take(values[tensor.name], rows, axis=axis))
                    elif "B" in shape:
                        axis = shape.index("B")
                        rows = list(range(start, stop))
                        assert np.array_equal(part[tensor.name], np.take(values[tensor.name], rows, axis=axis))
                    else:
                        assert part[tensor.name] is values[tensor.name]
            joined = sub_batches.join(tensors, [[part[t.name] for t in tensors] for part in parts])
            for tensor, value in zip(tensors, joined):
                assert np.array_equal(value, values[tensor.name]), (spec.name, tensor.name, step)


def test_samples_per_call_keeps_z_within_the_budget(build_cache: BuildCache) -> None:
    manifest = manifest_io.load(build_cache.get(TINY).dir)
    plan = manifest.plan
    for stage in range(1, plan.num_stages + 1):
        dims = plan.dims(stage, 1)
        for name in ("backbone", "flow_step"):
            spec = manifest.specs[name]
            per_sample = int(np.prod(spec.tensor("z").concrete(dims))) * 4  # [2, N, d] float32
            for samples in (1, 2, 7):
                assert sub_batches.samples_per_call(spec, dims, samples * per_sample) == samples
                assert sub_batches.samples_per_call(spec, dims, samples * per_sample + per_sample - 1) == samples
            assert sub_batches.samples_per_call(spec, dims, per_sample - 1) == 1  # never zero samples
    decoder = manifest.specs["decoder"]  # its cap is the plan's decoder_batch, not this rule
    assert sub_batches.samples_per_call(decoder, plan.dims(plan.num_stages, 1), 1) > 10**9


def _open(backend: str, manifest: manifest_io.Manifest) -> Any:
    if backend == "openvino":
        from runtime.backends.openvino_backend import OpenVINOBackend

        return OpenVINOBackend(manifest)
    return OnnxRuntimeBackend(manifest, device="cpu")


@pytest.mark.parametrize("fused", [False, True], ids=["flow-step", "fused-loop"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cut_requests_give_the_whole_requests_results(
    backend: str, fused: bool, build_cache: BuildCache, rng: np.random.Generator
) -> None:
    build = build_cache.get("two-stage-2-6", fuse_flow_loop=True) if fused else build_cache.get(TINY)
    manifest = manifest_io.load(build.dir)
    plan, batch = manifest.plan, build.max_batch
    engine = _open(backend, manifest)
    assert engine.activation_budget == sub_batches.HOST_ACTIVATION_BYTES  # a CPU backend cuts large calls
    labels = rng.integers(0, manifest.model.num_classes, size=batch).tolist()
    seed = int(rng.integers(0, 2**62))
    whole = BatchRecorder(engine, None)
    reference = Pipeline(manifest, whole).generate(labels, seed=seed)
    assert all(size == batch for _, _, size in whole.calls)  # uncut: one call per graph call of the request
    width = int(manifest.specs["backbone"].tensor("z").shape[-1])

    def z_bytes(stage: int) -> int:  # one sample's z: its two guidance rows of N tokens, d float32 each
        return 2 * plan.stage(stage).tokens * width * 4

    # budgets: under one sample everywhere; two samples of the last stage (uneven parts: 2 + 2 + 1 of 5);
    # then the decoder one image per call (the plan's decoder_batch)
    single = dataclasses.replace(manifest, plan=dataclasses.replace(plan, decoder_batch=1))
    for budget in (1, 2 * z_bytes(plan.num_stages)):
        recorded = BatchRecorder(engine, budget)
        cut = Pipeline(single, recorded).generate(labels, seed=seed)
        for graph, stage in dict.fromkeys((g, s) for g, s, _ in whole.calls):
            step = 1 if graph == Kind.DECODER else max(1, budget // z_bytes(stage))
            parts = [min(step, batch - start) for start in range(0, batch, step)]
            logical = sum(1 for g, s, _ in whole.calls if (g, s) == (graph, stage))
            got = [size for g, s, size in recorded.calls if (g, s) == (graph, stage)]
            assert got == parts * logical, (graph, stage, budget, got[: len(parts) + 1])
        np.testing.assert_allclose(cut.latents, reference.latents, rtol=0, atol=1e-5)
        assert np.abs(cut.images.astype(int) - reference.images.astype(int)).max() <= 1
        assert Counter(cut.timings.calls) == Counter(reference.timings.calls)  # timings count the request's calls


@pytest.mark.parametrize(("value", "budget"), [("", sub_batches.HOST_ACTIVATION_BYTES), ("4096", 4096), (" 0 ", None)])
def test_the_budget_can_be_set_or_turned_off(value: str, budget: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sub_batches.BUDGET_ENV, value)
    assert sub_batches.host_activation_budget() == budget


@pytest.mark.parametrize("value", ["-1", "2MiB", "1e6", "4.5", "9" * 5000, "0x10"])
def test_an_absurd_budget_is_an_error_naming_the_variable(
    value: str, build_cache: BuildCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(sub_batches.BUDGET_ENV, value)
    with pytest.raises(ConfigError, match=f"{sub_batches.BUDGET_ENV} must be a whole number of bytes"):
        Pipeline.from_dir(build_cache.get(TINY).dir, backend="onnxruntime", device="cpu")
