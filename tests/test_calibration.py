"""Calibration capture (DESIGN §4 "Precision lives in the graphs"): real stage inputs, stored and read back.

One capture of a tiny build (8 requests of 7 samples, above the build's max batch of 5 so
``generate_many`` splits every request) is shared by the module; tests that damage a
calibration directory copy it first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MAX_BATCH, BuildCache, needs_demo

from calibration import (
    CalibrationError,
    CalibrationPlan,
    CalibrationSet,
    RecordingBackend,
    capture,
    layout,
    load_calibration,
)
from calibration.dataset import MANIFEST_NAME
from calibration.model import card_of
from calibration.readers import GraphReader, held_out_feeds
from ecar_export import random_inputs
from ecar_export.families.ecar import contract as ecar_contract
from ecar_export.families.ecar import schedule
from ecar_export.families.ecar.contract import config_of, graph_specs
from runtime import manifest as manifest_io
from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from runtime.errors import ECARError, InvalidRequestError
from runtime.graphs import Call, Kind
from runtime.pipeline import Pipeline

TINY = "tiny-1-2-4"
BATCH = 7  # > TINY_MAX_BATCH: each request runs as two batches
SPLITS = ("calibration", "held_out")


def _pipeline(build_dir: Path) -> Pipeline:
    manifest = manifest_io.load(build_dir)
    return Pipeline(manifest, OnnxRuntimeBackend(manifest, threads=1))


@pytest.fixture(scope="module")
def captured(build_cache: BuildCache, tmp_path_factory: pytest.TempPathFactory) -> tuple[Pipeline, CalibrationSet]:
    assert BATCH > TINY_MAX_BATCH
    pipeline = _pipeline(build_cache.get(TINY).dir)
    plan = CalibrationPlan.for_config(
        config_of(pipeline.manifest), num_requests=8, batch=BATCH, seed=11, max_samples=20, max_rows=24
    )
    done: list[int] = []
    result = capture(pipeline, plan, tmp_path_factory.mktemp("calibration"), progress=lambda d, n: done.append(d))
    assert done == list(range(1, 9))
    return pipeline, result


def _copy(result: CalibrationSet, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(result.root, target)
    return target


# ------------------------------------------------------------------------------------ plan
def test_default_plan_covers_every_class_and_holds_out_every_eighth_request() -> None:
    plan = CalibrationPlan(num_classes=10)
    requests = list(plan.requests())
    assert len(requests) >= 64 and all(len(labels) == plan.batch for labels, _ in requests)
    assert requests == list(plan.requests()), "plans are deterministic"
    assert len({seed for _, seed in requests}) == len(requests)
    held = plan.indices("held_out")
    assert held == [r for r in range(len(requests)) if r % 8 == 7]
    assert set(held).isdisjoint(plan.indices("calibration"))
    calibration_labels = {label for r in plan.indices("calibration") for label in requests[r][0]}
    assert calibration_labels == set(range(10))
    assert CalibrationPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


@pytest.mark.parametrize(
    "changes",
    [
        {"num_requests": 4},  # fewer than holdout_every: nothing held out
        {"num_requests": 8, "batch": 1},  # seven calibration samples cannot cover ten classes
        {"holdout_every": 1},
        {"batch": 0},
        {"max_mib": 0},
        {"cfg": "high"},
    ],
)
def test_plan_rejects_bad_fields(changes: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError):
        CalibrationPlan(num_classes=10, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("classes", [1, 7, 10, 100, 1000, 1001])
def test_covering_is_the_fewest_requests_whose_calibration_part_holds_every_class(classes: int) -> None:
    needed = CalibrationPlan.covering(classes, at_least=1)
    if needed >= 8:  # a plan needs at least one held-out request
        CalibrationPlan(num_classes=classes, num_requests=needed)
        with pytest.raises(InvalidRequestError, match="cover"):
            CalibrationPlan(num_classes=classes, num_requests=needed - 1)
    assert CalibrationPlan.covering(classes) == max(64, needed)
    assert CalibrationPlan.covering(1000) == 245  # ecar-b, FlowAR: held-out label blocks come round after a wrap


def test_a_plan_may_hold_some_classes_only_when_asked() -> None:
    """``every_class=False`` (``ecar-export build --calibration-some-classes``): 8 requests of a 1000-class model
    calibrate on the 56 classes of their 7 calibration requests; the default refuses them, naming the way out."""
    with pytest.raises(InvalidRequestError, match="cover 56 of 1000 classes"):
        CalibrationPlan(num_classes=1000, num_requests=8)
    plan = CalibrationPlan(num_classes=1000, num_requests=8, every_class=False)
    assert plan.covered_classes() == set(range(56))
    assert CalibrationPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    other = CalibrationPlan(num_classes=1000, num_requests=245, every_class=False)
    assert other != CalibrationPlan(num_classes=1000, num_requests=245), "a kept set of the other kind is not reused"
    with pytest.raises(InvalidRequestError, match="every_class must be true or false"):
        CalibrationPlan(num_classes=10, every_class="no")  # type: ignore[arg-type]

    from ecar_export.build import requests_for

    with pytest.raises(InvalidRequestError, match="--calibration-some-classes"):
        requests_for(1000, 8)
    assert requests_for(1000, 8, every_class=False) == (8, False)
    assert requests_for(1000, None, every_class=False) == (64, False) and requests_for(1000, None) == (245, True)
    # requests that hold every class anyway are the default build's plan, so its kept set stays reusable
    assert requests_for(1000, 245, every_class=False) == (245, True) == requests_for(1000, 245)
    assert requests_for(10, None, every_class=False) == (64, True)


# ---------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("fused", [False, True])
def test_row_layout_round_trips_every_graph(build_cache: BuildCache, rng: np.random.Generator, fused: bool) -> None:
    config = build_cache.model(TINY).config
    for spec in graph_specs(config, fuse_flow_loop=fused):
        for stage in ecar_contract.request_plan(config).graph_stages(spec.kind):
            feeds = random_inputs.for_config(spec, config, stage, 3, rng, family="ecar")
            dims = ecar_contract.request_plan(config).dims(stage, 3)
            constants = {t.name: feeds[t.name] for t in spec.inputs if layout.is_stage_input(spec, t)}
            rows = layout.to_rows(spec, feeds)
            assert set(rows) == {t.name for t in layout.stored_inputs(spec)}, "stage inputs are not stored"
            assert layout.row_count(rows) == dims["B"] * (dims["N"] if spec.kind.startswith("flow") else 1)
            back = layout.from_rows(spec, rows, constants)
            assert back.keys() == feeds.keys()
            for name in feeds:
                # a flow graph's grid comes back as its token rows in one grid (B = 1, N = B·N), in order
                want = feeds[name].reshape(back[name].shape) if spec.kind.startswith("flow") else feeds[name]
                assert back[name].size == feeds[name].size
                np.testing.assert_array_equal(back[name], want, err_msg=f"{spec.name}@{stage}.{name}")
            # a row selection is a valid call of the same graph
            picked = layout.from_rows(spec, layout.select(rows, np.array([2, 0])), constants)
            for tensor in layout.stored_inputs(spec):
                found = layout.row_axis(tensor)
                if found is None:
                    assert picked[tensor.name].shape == (1,)
                else:
                    axis, paired = found
                    if spec.kind.startswith("flow"):  # token rows come back as one grid: B = 1, N = rows
                        assert picked[tensor.name].shape[:2] == ((2, 2) if paired else (1, 2))
                    else:
                        assert picked[tensor.name].shape[axis] == (4 if paired else 2)
            if constants:  # stage inputs are not stored: feeds without them are refused
                with pytest.raises(ValueError, match="stage input"):
                    layout.from_rows(spec, rows, {})


def test_fixed_batches_have_one_shape_and_never_mix_flow_times(build_cache: BuildCache) -> None:
    config = build_cache.model(TINY).config
    spec = next(s for s in graph_specs(config) if s.name == "flow_step")
    rng = np.random.default_rng(0)
    parts = []
    for index, rows_in_group in enumerate((5, 12, 9)):
        feeds = random_inputs.for_config(spec, config, 1, 1, rng, family="ecar")
        feeds["x"] = rng.standard_normal((1, rows_in_group, config.latent_channels)).astype(np.float32)
        feeds["z"] = rng.standard_normal((2, rows_in_group, config.width)).astype(np.float32)
        feeds["t"] = np.array([0.9 - 0.1 * index], np.float32)
        parts.append(layout.to_rows(spec, feeds))
    rows = layout.concatenate(parts)
    loose = list(layout.batches(spec, rows, 4))
    assert [b["x"].shape[1] for b in loose] == [4, 1, 4, 4, 4, 4, 4, 1]
    fixed = list(layout.batches(spec, rows, 8, fixed=True))
    assert {b["x"].shape for b in fixed} == {(1, 5, config.latent_channels)}
    assert {b["z"].shape for b in fixed} == {(2, 5, config.width)}
    assert [float(b["t"][0]) for b in fixed] == pytest.approx([0.9] + [0.8] * 3 + [0.7] * 2)
    # every real row is fed at least once, and only real rows are fed
    fed = np.concatenate([b["x"][0] for b in fixed])
    assert {tuple(r) for r in fed} == {tuple(r) for r in rows["x"]}


# --------------------------------------------------------------------------------- capture
def test_every_graph_has_samples_in_both_splits(captured: tuple[Pipeline, CalibrationSet]) -> None:
    pipeline, result = captured
    config = config_of(pipeline.manifest)
    assert result.groups("backbone") == [f"stage{s}" for s in range(1, config.num_stages + 1)]
    for spec in graph_specs(config, fuse_flow_loop=True) + [ecar_contract.flow_step_spec(config)]:
        for group in result.groups(spec.name):
            dims = result.model.group_dims(group)
            for split in SPLITS:
                rows = result.rows(spec.name, split, group)
                assert layout.row_count(rows) > 0, f"{spec.name} {group} {split}"
                assert set(rows) == {t.name for t in layout.stored_inputs(spec)}
                for tensor in layout.stored_inputs(spec):
                    assert rows[tensor.name].dtype == np.dtype(tensor.dtype)
                    assert rows[tensor.name].shape[1:] == layout.row_shape(tensor, dims)
                    value = rows[tensor.name]
                    if tensor.dtype == "float32" and value.size:  # stage 1's past is empty, its prev zero
                        assert np.all(np.isfinite(value))
                        assert tensor.name == "prev" and group == "stage1" or np.any(value != 0), tensor.name
    entry = json.loads((result.root / MANIFEST_NAME).read_text())
    assert entry["checkpoint_sha256"] == pipeline.manifest.checkpoint_sha256
    for name, graph in entry["graphs"].items():
        assert graph["rows"] == {
            group: {split: layout.row_count(result.rows(name, split, group)) for split in SPLITS}
            for group in result.groups(name)
        }
        assert graph["inputs"] == [t.to_dict() for t in result.spec(name).inputs]


def test_flow_step_rows_cover_every_stage_and_step_at_their_times(captured: tuple[Pipeline, CalibrationSet]) -> None:
    pipeline, result = captured
    config = config_of(pipeline.manifest)
    request = ecar_contract.request_plan(config)
    weights = request.weights()
    expected = {(s, k) for s in range(1, config.num_stages + 1) for k in range(config.steps[s - 1])}
    for split in SPLITS:
        rows, meta = result.rows("flow_step", split), result.meta("flow_step", split)
        assert {(int(s), int(k)) for s, k in zip(meta["stage"], meta["step"])} == expected
        for stage, step in expected:
            mask = (meta["stage"] == stage) & (meta["step"] == step)
            t, dt = request.stage(stage).step_times()[step]
            assert np.all(rows["t"][mask] == np.float32(t)) and np.all(rows["dt"][mask] == np.float32(dt))
            assert np.all(rows["cfg"][mask] == np.float32(weights[stage - 1]))
            # no more rows than the plan allows per (stage, step)
            assert mask.sum() <= max(result.plan.max_rows, len(result.plan.indices(split)))
    # a fused build's flow_loop reads the first step of each stage, at the stage's times
    for stage in range(1, config.num_stages + 1):
        loop = result.meta("flow_loop", group=f"stage{stage}")
        assert np.all(loop["stage"] == stage) and np.all(loop["step"] == 0)
        feeds = next(iter(result.feeds("flow_loop", group=f"stage{stage}")))
        np.testing.assert_array_equal(feeds["t"], [t for t, _ in request.stage(stage).step_times()])


def test_held_out_requests_are_disjoint_from_calibration(captured: tuple[Pipeline, CalibrationSet]) -> None:
    _, result = captured
    plan = result.plan
    for name in result.graph_names():
        for group in result.groups(name):
            used = {split: set(result.meta(name, split, group)["request"].tolist()) for split in SPLITS}
            assert used["held_out"] <= set(plan.indices("held_out")), name
            assert used["calibration"] <= set(plan.indices("calibration")), name
            assert used["held_out"] and used["calibration"]
    labels = result.rows("backbone", group="stage1")["labels"]
    assert set(labels.tolist()) == set(range(plan.num_classes))


def test_stored_rows_are_the_pipeline_inputs(captured: tuple[Pipeline, CalibrationSet]) -> None:
    """Each stored backbone row is sample (request, j): its label and its own noise stream."""
    pipeline, result = captured
    config, plan = config_of(pipeline.manifest), result.plan
    for stage in range(1, config.num_stages + 1):
        group = f"stage{stage}"
        for split in SPLITS:
            rows, meta = result.rows("backbone", split, group), result.meta("backbone", split, group)
            assert np.all(meta["stage"] == stage)
            keys = [(plan.seed_of(int(r)), int(j)) for r, j in zip(meta["request"], meta["sample"])]
            noise = schedule.draw_noise(config, keys)[stage - 1]
            np.testing.assert_array_equal(rows["noise"], noise)
            expected_labels = [plan.labels(int(r))[int(j)] for r, j in zip(meta["request"], meta["sample"])]
            np.testing.assert_array_equal(rows["labels"], expected_labels)
            assert rows["past_kv"].shape[2] == ecar_contract.request_plan(config).stage(stage).cache_start
    # a stage's first flow_step rows are its backbone's outputs, at the (sample, token) their meta names
    for stage in range(1, config.num_stages + 1):
        group = f"stage{stage}"
        rows, meta = result.rows("backbone", "held_out", group), result.meta("backbone", "held_out", group)
        feeds = layout.from_rows(result.spec("backbone"), rows, result.constants("backbone", group))
        z, x, _ = pipeline.backend.run(Call(Kind.BACKBONE, stage), feeds)
        where = {(int(r), int(j)): i for i, (r, j) in enumerate(zip(meta["request"], meta["sample"]))}
        flow, flow_meta = result.rows("flow_step", "held_out"), result.meta("flow_step", "held_out")
        checked = 0
        for row in np.flatnonzero((flow_meta["stage"] == stage) & (flow_meta["step"] == 0)):
            i = where.get((int(flow_meta["request"][row]), int(flow_meta["sample"][row])))
            if i is None:
                continue
            token = int(flow_meta["token"][row])
            np.testing.assert_allclose(flow["x"][row], x[i, token], atol=1e-6)
            np.testing.assert_allclose(flow["z"][row, 0], z[i, token], atol=1e-5)
            np.testing.assert_allclose(flow["z"][row, 1], z[len(rows["labels"]) + i, token], atol=1e-5)
            checked += 1
        assert checked > 0, stage
    # the decoder's rows are the latents the pipeline returns
    meta = result.meta("decoder", "held_out")
    request = int(meta["request"][0])
    picked = meta["request"] == request
    latents = pipeline.generate_many(plan.labels(request), seed=plan.seed_of(request)).latents
    np.testing.assert_allclose(result.rows("decoder", "held_out")["x"][picked], latents[meta["sample"][picked]])


def test_stored_feeds_reproduce_the_recorded_outputs(captured: tuple[Pipeline, CalibrationSet]) -> None:
    """Rebatched rows are valid calls: the backbone on rebatched rows gives each sample's own result."""
    pipeline, result = captured
    group = "stage3"
    rows = result.rows("backbone", "held_out", group)
    batch = list(result.feeds("backbone", "held_out", batch_rows=3, group=group))
    assert sum(len(b["labels"]) for b in batch) == layout.row_count(rows)
    call = Call(Kind.BACKBONE, 3)
    whole = pipeline.backend.run(call, next(iter(result.feeds("backbone", "held_out", 1000, group=group))))
    parts = [pipeline.backend.run(call, feeds) for feeds in batch]
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), whole[1], atol=1e-5)  # x
    count = len(rows["labels"])
    z_whole = whole[0]
    z_parts = [p[0] for p in parts]
    cond = np.concatenate([z[: len(z) // 2] for z in z_parts])
    uncond = np.concatenate([z[len(z) // 2 :] for z in z_parts])
    np.testing.assert_allclose(cond, z_whole[:count], atol=1e-4)
    np.testing.assert_allclose(uncond, z_whole[count:], atol=1e-4)


def test_load_round_trip(captured: tuple[Pipeline, CalibrationSet]) -> None:
    pipeline, result = captured
    loaded = load_calibration(result.root)
    assert loaded.plan == result.plan and loaded.model == result.model and loaded.model.token_rows
    assert loaded.model.constants.arrays().keys() == pipeline.manifest.constants.arrays().keys()
    for key, value in pipeline.manifest.constants.arrays().items():
        np.testing.assert_array_equal(loaded.model.constants.arrays()[key], value)
    for name in loaded.graph_names():
        for group in loaded.groups(name):
            for split in SPLITS:
                for key, value in loaded.rows(name, split, group).items():
                    np.testing.assert_array_equal(value, result.rows(name, split, group)[key])
    card = pipeline.manifest.model
    loaded.check_compatible(card, pipeline.manifest.checkpoint_sha256)
    with pytest.raises(CalibrationError, match="checkpoint"):
        loaded.check_compatible(card, "0" * 64)
    other = dataclasses.replace(config_of(pipeline.manifest), cfg_scale=3.0)
    with pytest.raises(CalibrationError, match="config"):
        loaded.check_compatible(card_of("ecar", other.to_dict()), pipeline.manifest.checkpoint_sha256)
    with pytest.raises(CalibrationError, match="flowar"):
        loaded.check_compatible(dataclasses.replace(card, family="flowar"), pipeline.manifest.checkpoint_sha256)


def test_a_format_2_set_is_refused_naming_the_format_and_what_to_do(
    captured: tuple[Pipeline, CalibrationSet], tmp_path: Path
) -> None:
    """Sets written before the model was stored (format 2: an ECAR config, no stages file) cannot be read without
    ECAR's contract, which lives on the export side: refused, naming the version and "capture again"."""
    pipeline, result = captured
    target = _copy(result, tmp_path)
    data = json.loads((target / MANIFEST_NAME).read_text())
    old = {k: v for k, v in data.items() if k not in ("family", "request_plan", "flow_rows", "stage_constants")}
    old["format_version"], old["model"] = 2, config_of(pipeline.manifest).to_dict()
    (target / MANIFEST_NAME).write_text(json.dumps(old))
    with pytest.raises(
        CalibrationError, match=r"format version 2, .* reads 3 \(it stores an ECAR config.*capture again"
    ):
        load_calibration(target)


def as_rows(graph: str, array: np.ndarray) -> np.ndarray:
    """A fed array as the rows it was made of: a flow graph's token grid [1, M, ...] as M token rows."""
    return array.reshape(-1, *array.shape[2:]) if graph.startswith("flow") else array


def test_readers_feed_calibration_rows_only(captured: tuple[Pipeline, CalibrationSet]) -> None:
    _, result = captured
    for name in ("flow_step", "backbone", "decoder"):
        reader = GraphReader(result, name, batch_rows=4)
        feeds = list(reader)
        assert len(feeds) == len(reader) > 0
        parts = reader.parts()
        assert len(parts) == len(result.groups(name))
        for part in parts:  # one shape for every batch of a group
            assert len({tuple(f[k].shape for k in sorted(f)) for f in part}) == 1
        first_input = result.spec(name).inputs[0].name
        fed = np.concatenate([as_rows(name, f[first_input]) for f in feeds])
        calibration_rows = np.concatenate([result.rows(name, group=g)[first_input] for g in result.groups(name)])
        held = np.concatenate([result.rows(name, "held_out", g)[first_input] for g in result.groups(name)])
        if name != "backbone":  # labels repeat; float rows identify their source
            assert {r.tobytes() for r in fed} == {r.tobytes() for r in calibration_rows}
            assert not {r.tobytes() for r in fed} & {r.tobytes() for r in held}
        assert reader.get_next() is None
        reader.rewind()
        assert reader.get_next() is not None
        reader.set_range(1, 2)
        assert reader.get_next() is not None and reader.get_next() is None
        assert len(list(GraphReader(result, name, max_batches=2))) <= 2 * len(result.groups(name))
        # the reader makes each feed when asked, and makes exactly the feeds the set's own feeds() makes
        again = list(GraphReader(result, name, batch_rows=4))
        made = list(result.feeds(name, "calibration", 4, fixed=True))
        assert [sorted(f) for f in again] == [sorted(f) for f in made]
        assert all(np.array_equal(f[k], g[k]) for f, g in zip(again, made, strict=True) for k in f)
        reader.rewind()
        first = reader.get_next()
        reader.rewind()
        assert reader.get_next() is not first, "a feed is made when asked for, never kept by the reader"
        # validation reads a few held-out batches of every group (every stage of the backbone)
        few = held_out_feeds(result, name, max_batches=1)
        assert len(few) == len(result.groups(name)) and len(few) <= len(held_out_feeds(result, name))
        validation = held_out_feeds(result, name)
        assert sum(len(as_rows(name, f[first_input])) for f in validation) == result.count(name, "held_out")


def test_recording_backend_is_thread_safe_and_follows_the_request_plan(
    captured: tuple[Pipeline, CalibrationSet],
) -> None:
    pipeline, _ = captured
    config = config_of(pipeline.manifest)
    plan = pipeline.manifest.plan.calls()
    recorder = RecordingBackend(pipeline.backend)
    recording = Pipeline(pipeline.manifest, recorder)
    requests = [([1, 2], 5), ([3], 6), ([4, 0, 9], 7), ([8], 8)]
    reference = [pipeline.generate(labels, seed=seed).latents for labels, seed in requests]
    results: dict[int, np.ndarray] = {}

    def work(index: int) -> None:
        labels, seed = requests[index]
        results[index] = recording.generate(labels, seed=seed).latents

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, latents in enumerate(reference):
        np.testing.assert_array_equal(results[index], latents)
    calls = recorder.take()
    assert recorder.calls() == []
    assert len(calls) == len(requests) * len(plan) == len(requests) * (config.num_stages + sum(config.steps) + 1)
    assert len({c.thread for c in calls}) >= 1 and len({c.sequence for c in calls}) == len(calls)
    for call in calls:
        assert call.stage is not None
        if call.graph == "flow_step":
            assert call.step is not None
            assert float(call.feeds["t"][0]) == pipeline.manifest.plan.stage(call.stage).step_times()[call.step][0]
        elif call.graph == "backbone":
            assert int(call.feeds["level"][0]) == call.stage - 1 and call.step is None
        else:
            assert call.stage == config.num_stages
    assert recorder.describe()["recording"] is True and recorder.name == pipeline.backend.name


def test_recorded_feeds_are_private_copies(captured: tuple[Pipeline, CalibrationSet]) -> None:
    pipeline, _ = captured
    recorder = RecordingBackend(pipeline.backend)
    feeds = {"x": np.ones((1, 2, config_of(pipeline.manifest).latent_channels), np.float32)}
    feeds["z"] = np.ones((2, 2, config_of(pipeline.manifest).width), np.float32)
    feeds.update({name: np.array([0.5], np.float32) for name in ("t", "dt", "cfg")})
    recorder.run(Call(Kind.FLOW_STEP, 1, 0, (0.5,), (0.5,)), feeds)
    feeds["x"][:] = 7.0
    (call,) = recorder.calls()
    assert np.all(call.feeds["x"] == 1.0) and (call.stage, call.step) == (1, 0)


def test_capture_refuses_fused_reduced_precision_or_foreign_plans(
    captured: tuple[Pipeline, CalibrationSet], tmp_path: Path
) -> None:
    pipeline, _ = captured
    plan = CalibrationPlan.for_config(config_of(pipeline.manifest), num_requests=8, batch=2)
    for changes in ({"fuse_flow_loop": True}, {"precision": "fp16"}):
        other = Pipeline(dataclasses.replace(pipeline.manifest, **changes), pipeline.backend)
        with pytest.raises(InvalidRequestError):
            capture(other, plan, tmp_path / "never")
    with pytest.raises(InvalidRequestError, match="classes"):
        capture(pipeline, dataclasses.replace(plan, num_classes=12), tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_recapture_replaces_the_previous_files(captured: tuple[Pipeline, CalibrationSet], tmp_path: Path) -> None:
    pipeline, result = captured
    target = _copy(result, tmp_path)
    old = {p.name for p in target.glob("*.npz")}
    # a capture is deterministic: the same plan gives the same content-addressed files
    repeated = capture(pipeline, result.plan, tmp_path / "repeated")
    assert repeated.files() == result.files() == old
    plan = CalibrationPlan.for_config(config_of(pipeline.manifest), num_requests=8, batch=2, seed=99)
    again = capture(pipeline, plan, target)
    new = {p.name for p in target.glob("*.npz")}
    assert new == again.files()
    assert old != new
    assert not any(p.name.endswith(".tmp") for p in target.iterdir())
    assert load_calibration(target).plan.seed == 99


@needs_demo
def test_capture_does_not_depend_on_the_thread_count(build_cache: BuildCache, tmp_path: Path) -> None:
    # int8 builds capture with every core; the captured inputs must equal a one-thread capture
    manifest = manifest_io.load(build_cache.get("demo").dir)
    plan = CalibrationPlan.for_config(config_of(manifest), num_requests=16)
    files = []
    for threads in (1, None):
        pipeline = Pipeline(manifest, OnnxRuntimeBackend(manifest, threads=threads))
        result = capture(pipeline, plan, tmp_path / f"threads-{threads}")
        files.append({name: entry.file for name, entry in result.graphs.items()})
    assert files[0] == files[1]


# ------------------------------------------------------------------------- missing / corrupt
def test_missing_or_corrupt_files_raise_calibration_errors(
    captured: tuple[Pipeline, CalibrationSet], tmp_path: Path
) -> None:
    _, result = captured
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match="missing"):
        load_calibration(empty)

    def damaged(label: str) -> Path:
        return _copy(result, tmp_path / label)

    target = damaged("npz-missing")
    (target / result.graphs["flow_step"].file).unlink()
    with pytest.raises(CalibrationError, match="missing"):
        load_calibration(target)

    target = damaged("npz-flipped")
    path = target / result.graphs["backbone"].file
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(CalibrationError, match="sha256"):
        load_calibration(target)

    target = damaged("npz-truncated-unverified")
    path = target / result.graphs["decoder"].file
    path.write_bytes(path.read_bytes()[:100])
    lazy = load_calibration(target, verify=False)
    with pytest.raises(CalibrationError, match="corrupt"):
        lazy.rows("decoder")

    target = damaged("npz-garbage-with-matching-sha")
    path = target / result.graphs["decoder"].file
    path.write_bytes(b"not a zip file")
    data = json.loads((target / MANIFEST_NAME).read_text())
    data["graphs"]["decoder"]["sha256"] = hashlib.sha256(b"not a zip file").hexdigest()
    (target / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match="corrupt"):
        load_calibration(target)

    for label, edit in {
        "not-json": lambda text: text[: len(text) // 2],
        "version": lambda text: text.replace('"format_version": 3', '"format_version": 99'),
        "version-1": lambda text: text.replace('"format_version": 3', '"format_version": 1'),
        "no-family": lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "family"}),
        "bad-request-plan": lambda text: json.dumps({**json.loads(text), "request_plan": {"stages": []}}),
        "bad-flow-rows": lambda text: json.dumps({**json.loads(text), "flow_rows": "pixels"}),
        "stages-escaping": lambda text: text.replace(result.raw["stage_constants"]["file"], "../stages.npz"),
        "format": lambda text: text.replace('"ecar-calibration"', '"something-else"'),
        "graph-dropped": lambda text: json.dumps(
            {**json.loads(text), "graphs": {k: v for k, v in json.loads(text)["graphs"].items() if k != "decoder"}}
        ),
        "escaping-file": lambda text: text.replace(result.graphs["decoder"].file, "../decoder-000000000000.npz"),
        "bad-plan": lambda text: json.dumps({**json.loads(text), "plan": {"num_classes": "ten"}}),
        "bad-rows": lambda text: json.dumps(
            {
                **json.loads(text),
                "graphs": {
                    k: {**v, "rows": {g: {**r, "held_out": 0} for g, r in v["rows"].items()}}
                    for k, v in json.loads(text)["graphs"].items()
                },
            }
        ),
    }.items():
        target = damaged(label)
        manifest = target / MANIFEST_NAME
        manifest.write_text(edit(manifest.read_text()))
        with pytest.raises(CalibrationError) as info:
            load_calibration(target)
        assert isinstance(info.value, ECARError), label


def test_stored_rows_do_not_match_manifest_shapes(captured: tuple[Pipeline, CalibrationSet], tmp_path: Path) -> None:
    _, result = captured
    target = _copy(result, tmp_path)
    data = json.loads((target / MANIFEST_NAME).read_text())
    data["graphs"]["decoder"]["rows"]["all"]["calibration"] += 1
    (target / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match="does not hold the arrays"):
        load_calibration(target)


def test_calibration_imports_neither_torch_nor_ecar_export() -> None:
    """Dependency direction ecar_export -> calibration -> runtime (DESIGN §2)."""
    code = (
        "import sys, calibration, calibration.capture, calibration.readers, calibration.layout\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ecar_export'))\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)
