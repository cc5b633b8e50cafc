"""Export -> runtime acceptance: the ONNX Runtime Pipeline against the torch reference (DESIGN §4-§5).

Every config is built once per session (conftest ``build_cache``). Labels and seeds are fresh per
run (ECAR_TEST_SEED reproduces one). Tolerances: latents max |diff| <= 1e-4 (float32, same math,
different kernels); >= 99.9 % of uint8 pixels identical.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import (
    BLOCK_TORCH,
    ENGINE_CONFIGS,
    Build,
    BuildCache,
    build_model,
    make_perturbed_model,
    needs_demo,
    run_concurrently,
)

from ecar_export.build import load_model
from ecar_export.families.ecar import contract as ecar_contract
from ecar_export.families.ecar.contract import graph_specs
from runtime import graphs
from runtime import manifest as manifest_io
from runtime.errors import ECARError, InvalidRequestError, ManifestError
from runtime.images import to_uint8
from runtime.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
LATENT_ATOL = 1e-4
PIXEL_MATCH = 0.999
MAX_SEED = 2**63 - 1

TINY = "tiny-1-2-4"
SCALE3 = "rgb-1-3-6-linear-cfg"
TWO_STAGE = "two-stage-2-6"

PARITY_CASES = [
    pytest.param(("demo", False), marks=needs_demo, id="demo"),
    pytest.param(("demo", True), marks=needs_demo, id="demo-fused"),
    *(pytest.param((key, False), id=key) for key in ENGINE_CONFIGS),
    pytest.param((TWO_STAGE, True), id=f"{TWO_STAGE}-fused"),
]


def load(build: Build) -> Pipeline:
    return Pipeline.from_dir(build.dir, backend="onnxruntime", device="cpu")


def random_request(rng: np.random.Generator, classes: int, batch: int) -> tuple[list[int], int]:
    return rng.integers(0, classes, size=batch).tolist(), int(rng.integers(0, MAX_SEED))


def expected_calls(build: Build) -> dict[str, int]:
    """One backbone call per stage; one flow_step call per Euler step (fused: one flow_loop call per stage)."""
    config = build.model.config
    calls = {"backbone": config.num_stages}
    if build.fuse_flow_loop:
        calls["flow_loop"] = config.num_stages
    else:
        calls["flow_step"] = sum(config.steps)
    calls["decoder"] = 1
    return calls


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("case", PARITY_CASES)
def test_generate_matches_torch_reference(case: tuple[str, bool], build_cache: BuildCache, rng: np.random.Generator):
    build = build_cache.get(*case)
    pipe, model, config = load(build), build.model, build.model.config
    assert pipe.max_batch == build.max_batch
    assert pipe.manifest.fuse_flow_loop is build.fuse_flow_loop
    identical = total = 0
    for batch in (1, 3, build.max_batch):
        labels, seed = random_request(rng, config.num_classes, batch)
        where = f"{build.key} fused={build.fuse_flow_loop} labels={labels} seed={seed}"
        result = pipe.generate(labels, seed=seed)
        ref = model.sample(labels, seed=seed)
        ref_latents, ref_images = ref.latents.numpy(), to_uint8(ref.images.numpy())

        side = config.image_size
        assert result.images.dtype == np.uint8
        assert result.images.shape == (batch, side, side, config.image_channels), where
        assert result.latents.dtype == np.float32
        assert result.latents.shape == ref_latents.shape == (batch, config.tokens_per_stage[-1], config.latent_channels)
        assert float(np.std(ref_latents)) > 1e-2, f"reference latents are degenerate ({where})"

        diff = float(np.max(np.abs(result.latents - ref_latents)))
        assert diff <= LATENT_ATOL, f"latents max abs diff {diff:.3g} > {LATENT_ATOL} ({where})"
        # a latent within 1e-4 of the reference can still land on the other side of a rounding
        # boundary: such a pixel differs by exactly 1. The identical fraction is counted over all
        # of the test's images (a demo batch of 3 has only 768 pixels: one flip would be 0.13 %).
        pixel_diff = np.abs(result.images.astype(np.int16) - ref_images.astype(np.int16))
        assert int(pixel_diff.max()) <= 1, f"a pixel differs by {int(pixel_diff.max())} ({where})"
        identical += int(np.sum(pixel_diff == 0))
        total += pixel_diff.size

        calls = dict(result.timings.calls)
        if build.fuse_flow_loop:
            assert "flow_loop" in calls and "flow_step" not in calls, calls
        assert calls == expected_calls(build), where
    assert identical / total >= PIXEL_MATCH, f"only {100 * identical / total:.3f} % of {total} pixels identical"


@pytest.mark.parametrize("case", [pytest.param((TINY, False), id=TINY), pytest.param((TWO_STAGE, True), id="fused")])
def test_timings_count_every_graph_call(case: tuple[str, bool], build_cache: BuildCache, rng: np.random.Generator):
    build = build_cache.get(*case)
    pipe, config = load(build), build.model.config
    labels, seed = random_request(rng, config.num_classes, 2)
    stages_seen: list[tuple[int, int]] = []
    timings = pipe.generate(labels, seed=seed, on_stage=lambda done, total: stages_seen.append((done, total))).timings

    assert len(timings.stages) == config.num_stages
    assert all(seconds > 0 for seconds in timings.stages)
    assert stages_seen == [(s, config.num_stages) for s in range(1, config.num_stages + 1)]
    assert dict(timings.calls) == expected_calls(build)
    assert set(timings.graphs) == set(timings.calls)
    assert all(seconds > 0 for seconds in timings.graphs.values())
    assert timings.decoder > 0 and timings.total >= timings.backend > 0
    payload = json.loads(json.dumps(timings.to_dict()))
    assert payload["graph_calls"] == expected_calls(build)
    assert len(payload["stages_s"]) == config.num_stages


# ----------------------------------------------------------------------------- seeds
def test_one_sample_request_equals_that_sample_inside_a_batch(build_cache: BuildCache, rng: np.random.Generator):
    build = build_cache.get(SCALE3)
    pipe, config = load(build), build.model.config
    batch = build.max_batch
    labels = rng.integers(0, config.num_classes, size=batch).tolist()
    seeds = [int(s) for s in rng.choice(MAX_SEED, size=batch, replace=False)]
    where = f"labels={labels} seeds={seeds}"
    big = pipe.generate(labels, seed=seeds)
    assert not np.array_equal(big.latents[0], big.latents[1]), "different seeds gave the same sample"

    for j in range(batch):
        alone = pipe.generate([labels[j]], seed=[seeds[j]])
        assert np.array_equal(alone.images[0], big.images[j]), f"sample {j} changes with its batch ({where})"
        np.testing.assert_allclose(alone.latents[0], big.latents[j], rtol=0, atol=1e-6, err_msg=where)
    # seed [s] is key (s, 0), the same as an int seed s for a one-sample request
    j = int(rng.integers(batch))
    assert np.array_equal(pipe.generate([labels[j]], seed=seeds[j]).images[0], big.images[j])

    # a permuted batch permutes the samples
    order = rng.permutation(batch)
    shuffled = pipe.generate([labels[i] for i in order], seed=[seeds[i] for i in order])
    assert np.array_equal(shuffled.images, big.images[order]), where
    # and the list-seed keys are the reference's keys
    ref = build.model.sample(labels, seed=seeds).latents.numpy()
    assert float(np.max(np.abs(big.latents - ref))) <= LATENT_ATOL, where


def test_generate_many_equals_per_batch_generate_calls(build_cache: BuildCache, rng: np.random.Generator):
    build = build_cache.get(TINY)
    pipe, config = load(build), build.model.config
    size = build.max_batch
    count = 2 * size + 2
    labels = rng.integers(0, config.num_classes, size=count).tolist()
    seeds = [int(s) for s in rng.integers(0, MAX_SEED, size=count)]
    where = f"labels={labels} seeds={seeds}"

    many = pipe.generate_many(labels, seed=seeds)
    parts = [pipe.generate(labels[i : i + size], seed=seeds[i : i + size]) for i in range(0, count, size)]
    assert many.images.shape[0] == many.latents.shape[0] == count
    assert np.array_equal(many.images, np.concatenate([p.images for p in parts])), where
    assert np.array_equal(many.latents, np.concatenate([p.latents for p in parts])), where
    assert many.timings.calls["backbone"] == len(parts) * config.num_stages == 3 * config.num_stages
    assert many.timings.calls["flow_step"] == len(parts) * sum(config.steps)
    assert len(many.timings.stages) == config.num_stages

    # int seed s: sample i has key (s, i) across all chunks
    seed = int(rng.integers(0, MAX_SEED))
    many_int = pipe.generate_many(labels, seed=seed)
    first = pipe.generate(labels[:size], seed=seed)
    assert np.array_equal(many_int.images[:size], first.images)
    assert np.array_equal(many_int.latents[:size], first.latents)
    restarted = pipe.generate(labels[size : 2 * size], seed=seed)  # keys (s, 0..) - not those of chunk 2
    assert not np.allclose(many_int.latents[size : 2 * size], restarted.latents, atol=1e-3)
    ref = build.model.sample(labels, seed=seed).latents.numpy()
    diff = float(np.max(np.abs(many_int.latents - ref)))
    assert diff <= LATENT_ATOL, f"generate_many(seed={seed}) vs torch keys (s, i): {diff:.3g}"


# ----------------------------------------------------------------------------- errors
BAD_REQUESTS: dict[str, tuple[Callable[[Pipeline], Any], str]] = {
    "batch-above-max": (lambda p: p.generate([1] * (p.max_batch + 1)), r"exceeds .*max batch 5"),
    "empty-labels": (lambda p: p.generate([]), "empty"),
    "label-out-of-range": (lambda p: p.generate([1, p.model.num_classes]), "out of range"),
    "negative-label": (lambda p: p.generate([-1]), "out of range"),
    "float-label": (lambda p: p.generate([1, 2.5]), "not an integer"),
    "string-label": (lambda p: p.generate(["3"]), "not an integer"),
    "bool-label": (lambda p: p.generate([True]), "not an integer"),
    "labels-as-string": (lambda p: p.generate("12"), "list of integers"),
    "negative-seed": (lambda p: p.generate([1, 2], seed=-1), "seed -1 is out of range"),
    "negative-seed-in-list": (lambda p: p.generate([1, 2], seed=[3, -4]), "seed -4 is out of range"),
    "seed-list-length": (lambda p: p.generate([1, 2], seed=[3]), "one seed per label"),
    "nan-cfg": (lambda p: p.generate([1], cfg=float("nan")), "finite"),
    "inf-cfg": (lambda p: p.generate([1], cfg=float("inf")), "finite"),
    "many-negative-seed": (lambda p: p.generate_many([1] * 7, seed=-2), "out of range"),
    "keyed-count": (lambda p: p.generate_keyed([1, 2], [(3, 0)]), "one per label"),
    "keyed-not-a-pair": (lambda p: p.generate_keyed([1], [(3, 0, 1)]), "not a .seed, index. pair"),
    "keyed-float-index": (lambda p: p.generate_keyed([1], [(3, 0.5)]), "not a .seed, index. pair"),
    "keyed-bool-seed": (lambda p: p.generate_keyed([1], [(True, 0)]), "not a .seed, index. pair"),
    "keyed-negative-index": (lambda p: p.generate_keyed([1], [(3, -1)]), "non-negative"),
    "keyed-seed-range": (lambda p: p.generate_keyed([1], [(2**63, 0)]), "out of range"),
    "keyed-batch-above-max": (lambda p: p.generate_keyed([1] * 6, [(0, i) for i in range(6)]), "max batch 5"),
}


@pytest.fixture(scope="module")
def tiny_pipe(build_cache: BuildCache) -> Pipeline:
    return load(build_cache.get(TINY))


def test_valid_request_is_accepted(tiny_pipe: Pipeline):
    # the control of the rejections below: the same pipeline serves a valid request at max batch
    result = tiny_pipe.generate(np.arange(tiny_pipe.max_batch) % 10, seed=[0, 1, 2, 3, MAX_SEED], cfg=1.5)
    assert result.images.shape[0] == tiny_pipe.max_batch


def test_sessions_are_created_with_the_runtime_options(build_cache: BuildCache):
    # no CPU arena (memory), no spinning intra-op threads (speed on a shared machine), threads capped on request
    pipe = Pipeline.from_dir(build_cache.get(TINY).dir, backend="onnxruntime", threads=1)
    for name, session in pipe.backend.sessions.items():
        options = session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0", name
        assert not options.enable_cpu_mem_arena and options.intra_op_num_threads == 1, name
    with pytest.raises(InvalidRequestError, match="threads must be a positive integer"):
        Pipeline.from_dir(build_cache.get(TINY).dir, threads=0)


def test_backbone_gelu_runs_as_one_fused_kernel_in_ort(build_cache: BuildCache, tmp_path: Path):
    """The MLP's GELU is exported in the form ORT fuses (FastGelu), not as eight elementwise ops."""
    import onnxruntime as ort

    from runtime.backends.onnxruntime_backend import session_options

    manifest = manifest_io.load(build_cache.get(TINY).dir)
    depth = ecar_contract.config_of(manifest).depth
    for name, entry in manifest.graphs.items():
        if entry.spec.kind != "backbone":
            continue
        exported = onnx.load(str(manifest.path(entry.file)))
        assert sum(n.op_type == "Tanh" for n in exported.graph.node) == depth, name  # one GELU per block
        options = session_options(threads=1)
        options.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
        ort.InferenceSession(str(manifest.path(entry.file)), sess_options=options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)  # its ops are enough
        ops = [n.op_type for n in optimized.graph.node]
        assert "Tanh" not in ops and "Pow" not in ops, f"{name}: GELU left unfused: {sorted(set(ops))}"
        assert sum(op in ("FastGelu", "BiasGelu", "Gelu") for op in ops) == depth, name


def test_tanh_gelu_export_form_equals_torch_gelu(rng: np.random.Generator):
    import torch

    from ecar_export.families.ecar.layers import TanhGELU

    x = torch.from_numpy(rng.standard_normal((64, 96)).astype(np.float32) * 4)
    eager = TanhGELU()(x)
    np.testing.assert_array_equal(eager.numpy(), torch.nn.functional.gelu(x, approximate="tanh").numpy())
    exported = TanhGELU.export_form(x)
    np.testing.assert_allclose(exported.numpy(), eager.numpy(), rtol=1e-5, atol=1e-6)


def test_generate_keyed_with_a_requests_keys_equals_generate(tiny_pipe: Pipeline, rng: np.random.Generator):
    # generate(labels, seed=s) is generate_keyed(labels, [(s, 0), (s, 1), ...]); same batch: bit for bit
    labels = [int(v) for v in rng.integers(0, tiny_pipe.model.num_classes, size=3)]
    seed = int(rng.integers(0, MAX_SEED))
    keyed = tiny_pipe.generate_keyed(labels, [(seed, i) for i in range(3)])
    plain = tiny_pipe.generate(labels, seed=seed)
    np.testing.assert_array_equal(keyed.latents, plain.latents)
    np.testing.assert_array_equal(keyed.images, plain.images)
    other = tiny_pipe.generate_keyed(labels, [(seed, i + 1) for i in range(3)])
    assert not np.array_equal(other.latents, plain.latents)


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_generate_rejects_invalid_requests(name: str, tiny_pipe: Pipeline):
    call, message = BAD_REQUESTS[name]
    with pytest.raises(InvalidRequestError, match=message) as info:
        call(tiny_pipe)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ECARError)


# ----------------------------------------------------------------------------- threads
def test_concurrent_generate_calls_equal_sequential_calls(build_cache: BuildCache, rng: np.random.Generator):
    build = build_cache.get(SCALE3)
    pipe, classes = load(build), build.model.config.num_classes
    threads_count, per_thread = 8, 25
    total = threads_count * per_thread
    requests = [random_request(rng, classes, int(rng.integers(1, build.max_batch + 1))) for _ in range(total)]
    sequential = [pipe.generate(labels, seed=seed) for labels, seed in requests]

    results = run_concurrently(lambda i: pipe.generate(requests[i][0], seed=requests[i][1]), total, threads_count)
    for index, expected in enumerate(sequential):
        assert np.array_equal(results[index].images, expected.images), f"request {index}: {requests[index]}"
        assert np.array_equal(results[index].latents, expected.latents), f"request {index}: {requests[index]}"


# ----------------------------------------------------------------------------- torch-free runtime
TORCH_BLOCKED_RUN = (
    BLOCK_TORCH
    + """
import numpy as np
from runtime.pipeline import Pipeline

result = Pipeline.from_dir(sys.argv[1]).generate([1, 2], seed=3)
np.save(sys.argv[2], result.latents)
np.save(sys.argv[3], result.images)
loaded = sorted(n for n in sys.modules if n.startswith("torch.") or (n == "torch" and sys.modules[n] is not None))
assert not loaded, loaded
print("RUNTIME_WITHOUT_TORCH_OK")
"""
)


def test_runtime_generates_where_torch_cannot_be_imported(build_cache: BuildCache, tmp_path: Path):
    build = build_cache.get(TINY)
    latents_file, images_file = tmp_path / "latents.npy", tmp_path / "images.npy"
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(TORCH_BLOCKED_RUN), str(build.dir), str(latents_file), str(images_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr
    assert "RUNTIME_WITHOUT_TORCH_OK" in run.stdout

    here = Pipeline.from_dir(build.dir).generate([1, 2], seed=3)
    assert np.array_equal(np.load(latents_file), here.latents)
    assert np.array_equal(np.load(images_file), here.images)


# ----------------------------------------------------------------------------- manifest
def read_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / manifest_io.MANIFEST_NAME).read_text())


def test_manifest_records_provenance_and_file_digests(build_cache: BuildCache):
    build = build_cache.get(TINY)
    data = read_manifest(build.dir)
    _, weights_digest = load_model(build.model)
    assert re.fullmatch(r"[0-9a-f]{64}", data["checkpoint_sha256"])
    assert data["checkpoint_sha256"] == weights_digest
    other = make_perturbed_model(build.model.config, seed=1234)
    assert load_model(other)[1] != weights_digest  # the digest identifies the weights

    for package in ("onnx", "onnxruntime", "torch"):
        assert data["toolchain"][package] == importlib.metadata.version(package), package
    assert data["opset"] >= 18
    assert data["profile"]["max_batch"] == build.max_batch == 5
    assert 1 <= data["profile"]["min_batch"] <= data["profile"]["opt_batch"] <= data["profile"]["max_batch"]
    assert data["precision"] == "fp32" and data["backend"] == "onnxruntime" and data["fuse_flow_loop"] is False
    assert data["model"] == build.model.config.to_dict()

    manifest = manifest_io.load(build.dir)
    assert manifest.max_batch == build.max_batch
    assert list(manifest.graphs) == [spec.name for spec in graph_specs(build.model.config)]
    assert data["format_version"] == manifest_io.FORMAT_VERSION == graphs.CONTRACT_VERSION
    for name, entry in data["graphs"].items():
        digest = hashlib.sha256((build.dir / entry["file"]).read_bytes()).hexdigest()
        assert entry["sha256"] == digest, name
        assert len(entry["data_files"]) == 1, f"{name}: its weights are one external data file"
        for data_file, data_digest in entry["data_files"].items():
            assert data_file.startswith(f"{name}-") and data_file.endswith(".weights")
            assert hashlib.sha256((build.dir / data_file).read_bytes()).hexdigest() == data_digest, name
    files = {f for entry in data["graphs"].values() for f in (entry["file"], *entry["data_files"])}
    constants = data["stage_constants"]
    assert re.fullmatch(r"stages-[0-9a-f]{12}\.npz", constants["file"]), constants
    assert hashlib.sha256((build.dir / constants["file"]).read_bytes()).hexdigest() == constants["sha256"]
    assert constants["file"] == f"stages-{constants['sha256'][:12]}.npz", "named by its content"
    assert sorted(os.listdir(build.dir)) == sorted(files | {manifest_io.MANIFEST_NAME, constants["file"]})
    assert data["plan"] == ecar_contract.request_plan(build.model.config).to_dict()


CONTRACT_CASES = [pytest.param((SCALE3, False), id=SCALE3), pytest.param((TWO_STAGE, True), id="fused")]


@pytest.mark.parametrize("case", CONTRACT_CASES)
def test_graph_files_are_valid_onnx_with_the_contract_io(case: tuple[str, bool], build_cache: BuildCache):
    build = build_cache.get(*case)
    manifest = manifest_io.load(build.dir)
    assert len(manifest.graphs) == len(graph_specs(build.model.config, build.fuse_flow_loop))
    for name, entry in manifest.graphs.items():
        path = manifest.path(entry.file)
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.load(str(path))
        opsets = {o.domain: o.version for o in proto.opset_import}
        assert opsets.get("", opsets.get("ai.onnx", 0)) >= 18, name
        spec = entry.spec
        assert [i.name for i in proto.graph.input] == spec.input_names(), name
        assert [o.name for o in proto.graph.output] == spec.output_names(), name
        symbols: dict[str, str] = {}
        for tensors, values in ((spec.inputs, proto.graph.input), (spec.outputs, proto.graph.output)):
            for tensor, value in zip(tensors, values):
                dims = value.type.tensor_type.shape.dim
                assert len(dims) == len(tensor.shape), f"{name}.{tensor.name}"
                for axis, (want, dim) in enumerate(zip(tensor.shape, dims)):
                    where = f"{name}.{tensor.name}[{axis}]"
                    if isinstance(want, int):
                        assert dim.HasField("dim_value") and dim.dim_value == want, where
                        continue
                    assert dim.HasField("dim_param") and dim.dim_param, f"{where} is not symbolic"
                    if tensors is spec.inputs:  # inputs of one graph share one symbol per dim kind
                        assert symbols.setdefault(want, dim.dim_param) == dim.dim_param, where


def test_rebuild_replaces_graph_files_and_keeps_other_files(build_cache: BuildCache, tmp_path: Path):
    build = build_cache.get(TINY)
    out = tmp_path / "engines"
    shutil.copytree(build.dir, out)
    old_files = {entry["file"] for entry in read_manifest(out)["graphs"].values()}
    readme = out / "README.md"
    readme.write_text("engines built by the test suite\n")

    other = make_perturbed_model(build.model.config, seed=99)
    build_model(other, out, max_batch=3)

    data = read_manifest(out)
    files = {entry["file"] for entry in data["graphs"].values()}
    weights = {f for entry in data["graphs"].values() for f in entry["data_files"]}
    onnx_files = {p.name for p in out.iterdir() if p.suffix == ".onnx"}
    assert onnx_files == files
    assert len(files) == len(graph_specs(other.config))
    assert not old_files & onnx_files, "files of the previous build were left behind"
    assert readme.read_text() == "engines built by the test suite\n"
    constants = data["stage_constants"]["file"]
    assert sorted(os.listdir(out)) == sorted(files | weights | {"README.md", manifest_io.MANIFEST_NAME, constants})

    pipe = Pipeline.from_dir(out, backend="onnxruntime", device="cpu")
    assert pipe.max_batch == 3
    result = pipe.generate([4, 2], seed=17)
    assert float(np.max(np.abs(result.latents - other.sample([4, 2], seed=17).latents.numpy()))) <= LATENT_ATOL


def _format_version(root: Path) -> None:
    data = read_manifest(root)
    data["format_version"] = manifest_io.FORMAT_VERSION + 1
    (root / manifest_io.MANIFEST_NAME).write_text(json.dumps(data))


def _modify_graph_bytes(root: Path) -> None:
    path = root / read_manifest(root)["graphs"]["backbone"]["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _modify_weights(root: Path) -> None:
    (path,) = (root / name for name in read_manifest(root)["graphs"]["backbone"]["data_files"])
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))


def _remove_weights(root: Path) -> None:
    for name in read_manifest(root)["graphs"]["flow_step"]["data_files"]:
        (root / name).unlink()


def _old_contract(root: Path) -> None:
    """A directory as the first contract wrote it: one backbone graph per stage, format version 1."""
    data = read_manifest(root)
    backbone = data["graphs"].pop("backbone")
    for stage in (1, 2, 3):
        data["graphs"][f"backbone_{stage}"] = {**backbone, "stage": stage}
    data["format_version"] = 1
    (root / manifest_io.MANIFEST_NAME).write_text(json.dumps(data))


def _contract_2(root: Path) -> None:
    """A directory as contract 2 wrote it: format version 2, no plan or stages file, flow graphs on token rows."""
    data = read_manifest(root)
    for key in ("plan", "stage_constants"):
        data.pop(key)
    data["format_version"] = 2
    data["runtime"] = {"min_version": "0.3.0", "built_by": "0.3.0"}
    (root / manifest_io.MANIFEST_NAME).write_text(json.dumps(data))


def _modify_stage_constants(root: Path) -> None:
    path = root / read_manifest(root)["stage_constants"]["file"]
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))


def _remove_stage_constants(root: Path) -> None:
    (root / read_manifest(root)["stage_constants"]["file"]).unlink()


def _escaping_file(root: Path) -> None:
    data = read_manifest(root)
    entry = data["graphs"]["backbone"]
    shutil.copyfile(root / entry["file"], root.parent / "x.onnx")  # same bytes and sha: only the path is wrong
    entry["file"] = "../x.onnx"
    (root / manifest_io.MANIFEST_NAME).write_text(json.dumps(data))


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing-dir": (lambda root: shutil.rmtree(root), "does not exist"),
    "missing-manifest": (lambda root: (root / manifest_io.MANIFEST_NAME).unlink(), "manifest.json' is missing"),
    "invalid-json": (lambda root: (root / manifest_io.MANIFEST_NAME).write_text('{"format": "ecar-'), "valid JSON"),
    "format-version": (_format_version, "format version"),
    "modified-graph": (_modify_graph_bytes, r"graph 'backbone'.*sha256"),
    "modified-weights": (_modify_weights, r"graph 'backbone'.*\.weights' does not match its sha256"),
    "missing-weights": (_remove_weights, r"graph 'flow_step'.*\.weights' is missing"),
    "old-contract": (_old_contract, r"format version 1, this runtime reads 3 \(built for an older graph contract"),
    "contract-2": (_contract_2, r"format version 2, this runtime reads 3 \(built for an older graph contract.*rebuild"),
    "modified-stage-constants": (
        _modify_stage_constants,
        r"stage_constants: '.*stages-[0-9a-f]{12}\.npz' does not match",
    ),
    "missing-stage-constants": (
        _remove_stage_constants,
        r"stage_constants: file '.*stages-[0-9a-f]{12}\.npz' is missing",
    ),
    "escaping-file": (_escaping_file, r"graph 'backbone'.*'\.\./x\.onnx' escapes"),
}


@pytest.mark.parametrize("name", [None, *CORRUPTIONS])
def test_corrupt_engine_directories_are_refused(name: str | None, build_cache: BuildCache, tmp_path: Path):
    root = tmp_path / "engines"
    shutil.copytree(build_cache.get(TINY).dir, root)
    if name is None:  # the control: an intact copy loads
        assert Pipeline.from_dir(root, backend="onnxruntime", device="cpu").generate([1], seed=2).images.shape[0] == 1
        return
    corrupt, message = CORRUPTIONS[name]
    corrupt(root)
    with pytest.raises(ManifestError, match=message):
        Pipeline.from_dir(root, backend="onnxruntime", device="cpu")
    with pytest.raises(ManifestError, match=message):
        manifest_io.load(root)


@pytest.mark.parametrize("backend", ["bogus", "TensorRT", "", "cuda"])
def test_an_unknown_backend_is_a_value_error_naming_the_choices(backend: str, build_cache: BuildCache) -> None:
    with pytest.raises(ValueError, match=r"unknown backend .*use auto, onnxruntime, openvino, tensorrt") as error:
        Pipeline.from_dir(build_cache.get(TINY).dir, backend=backend)
    assert isinstance(error.value, ECARError)
