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
    engine = _open(backend, manifest)
    from runtime.sub_batches import HOST_ACTIVATION_BYTES

    assert engine.activation_budget == HOST_ACTIVATION_BYTES  # a CPU backend cuts large calls by default
    whole = BatchRecorder(engine, None)
    one_each = BatchRecorder(engine, 1)  # under one sample's z: every backbone and flow call takes one sample
    # and the decoder one image (the plan's decoder_batch)
    single = dataclasses.replace(manifest, plan=dataclasses.replace(manifest.plan, decoder_batch=1))
    batch = build.max_batch
    labels = rng.integers(0, manifest.model.num_classes, size=batch).tolist()
    seed = int(rng.integers(0, 2**62))
    reference = Pipeline(manifest, whole).generate(labels, seed=seed)
    cut = Pipeline(single, one_each).generate(labels, seed=seed)
    assert set(whole.batches) == set(one_each.batches)
    for graph, sizes in whole.batches.items():
        assert set(sizes) == {batch}, graph  # uncut: one call per graph call of the request
        assert one_each.batches[graph] == [1] * (batch * len(sizes)), graph  # cut: one call per sample
    np.testing.assert_allclose(cut.latents, reference.latents, rtol=0, atol=1e-5)
    assert np.abs(cut.images.astype(int) - reference.images.astype(int)).max() <= 1
    assert Counter(cut.timings.calls) == Counter(reference.timings.calls)  # timings count the request's calls
