"""Graph contract 3: the request plan and the stage constants are build data, and the runtime is family-agnostic.

* the plan's JSON round trip and its strict validation (every bad field named);
* the guidance rule (ramp and threshold) as calls see it;
* the stages file: keys, round trip, a stage constant a graph gains is fed without runtime changes;
* spec validation against the contract's slots;
* the runtime's request path reads no ECAR-specific config field and imports no ECAR formula.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import ENGINE_CONFIGS, BuildCache, make_tiny_config
from onnx import TensorProto, helper

from ecar_export.families.ecar import contract as ecar_contract
from ecar_export.families.ecar.config import ECARConfig
from runtime import graphs, stage_constants
from runtime import manifest as manifest_io
from runtime.errors import InvalidRequestError, ManifestError
from runtime.fileio import sha256_file
from runtime.graphs import Call, GraphSpec, Kind, TensorSpec
from runtime.pipeline import Pipeline
from runtime.plan import RequestPlan, StagePlan, f32

TINY = "tiny-1-2-4"
ROOT = Path(__file__).resolve().parents[1]


def flowar_like_plan() -> RequestPlan:
    """A plan as FlowAR's export will write it: ramp s/(S-1), unguided above t = 0.9, one step per grid."""
    tokens = (1, 4, 16)
    stages = []
    start = 0
    for index, n in enumerate(tokens):
        emitted = 0 if index == len(tokens) - 1 else n
        times = tuple(f32(t) for t in np.linspace(1.0, 0.0, 5))
        stages.append(StagePlan(n, tokens[index - 1] if index else 1, start, emitted, times, index / 2))
        start += emitted
    return RequestPlan(tuple(stages), channels=8, cfg=3.0, guidance_below=0.9, decoder_batch=4)


# ------------------------------------------------------------------------ JSON round trip
@pytest.mark.parametrize("key", sorted(ENGINE_CONFIGS))
def test_ecar_plans_round_trip_through_json(key: str) -> None:
    plan = ecar_contract.request_plan(make_tiny_config(**ENGINE_CONFIGS[key]))
    again = RequestPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and hash(again) == hash(plan)
    assert again.calls() == plan.calls() and again.calls(True) == plan.calls(True)
    assert {again: 1}[plan] == 1  # frozen and hashable: usable as a cache key


def test_ecar_plan_holds_the_schedule_as_data() -> None:
    config = make_tiny_config(**ENGINE_CONFIGS["rgb-1-3-6-linear-cfg"])
    plan = ecar_contract.request_plan(config)
    assert plan.tokens == config.tokens_per_stage and plan.channels == config.latent_channels
    assert [s.prev_tokens for s in plan.stages] == [1, *config.tokens_per_stage[:-1]]
    assert [s.cache_start for s in plan.stages] == [0, 1, 10]
    assert [s.emitted for s in plan.stages] == [1, 9, 0] and plan.cache_rows == 10
    assert [s.steps for s in plan.stages] == list(config.steps)
    assert [s.ramp for s in plan.stages] == pytest.approx([1 / 3, 2 / 3, 1.0])  # 'linear': (s + 1) / S
    assert plan.weights(4.0) == pytest.approx((2.0, 3.0, 4.0)) and plan.weights()[-1] == config.cfg_scale
    assert plan.guidance_below is None and all(call.guided for call in plan.calls())
    constant = ecar_contract.request_plan(make_tiny_config())
    assert {s.ramp for s in constant.stages} == {1.0}  # 'constant': 1 each


def test_flowar_like_plan_round_trips_and_guides_below_its_threshold() -> None:
    plan = flowar_like_plan()
    assert RequestPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert plan.weights(3.0) == pytest.approx((1.0, 2.0, 3.0))  # ramp s / (S - 1)
    flows = [c for c in plan.calls() if c.graph == Kind.FLOW_STEP]
    assert [c.guided for c in flows if c.stage == 1] == [False, True, True, True]  # t = 1.0 > 0.9: weight 1
    assert all(c.guided == (c.t[0] <= 0.9) for c in flows)
    with pytest.raises(ManifestError, match="both sides of guidance_below"):
        plan.calls(True)  # a fused loop takes one weight per stage


def _mutations() -> list[Any]:
    def stage(field: str, value: Any, index: int = 1) -> Any:
        def change(data: dict[str, Any]) -> None:
            data["stages"][index][field] = value

        return change

    def top(field: str, value: Any) -> Any:
        def change(data: dict[str, Any]) -> None:
            data[field] = value

        return change

    def drop(field: str) -> Any:
        return lambda data: data.pop(field)

    return [
        pytest.param(top("stages", []), r"'stages' must hold at least one stage", id="no-stages"),
        pytest.param(top("stages", {}), r"'stages' must be a list", id="stages-object"),
        pytest.param(top("channels", 0), r"'channels' must be a positive integer", id="channels"),
        pytest.param(top("channels", 4.0), r"'channels' must be a positive integer", id="channels-float"),
        pytest.param(top("decoder_batch", True), r"'decoder_batch' must be a positive integer", id="decoder-batch"),
        pytest.param(top("cfg", "2"), r"'cfg' must be a number", id="cfg-text"),
        pytest.param(top("cfg", float("nan")), r"'cfg' must be a finite number", id="cfg-nan"),
        pytest.param(top("guidance_below", "x"), r"'guidance_below' must be a number", id="threshold"),
        pytest.param(drop("channels"), r"missing field 'channels'", id="missing-field"),
        pytest.param(top("surprise", 1), r"unknown field 'surprise'", id="unknown-field"),
        pytest.param(stage("tokens", -1), r"'stages\[1\]\.tokens' must be a positive integer", id="tokens"),
        pytest.param(stage("prev_tokens", 3), r"'stages\[1\]\.prev_tokens' is 3", id="prev-tokens"),
        pytest.param(stage("cache_start", 0), r"'stages\[1\]\.cache_start' is 0", id="cache-start"),
        pytest.param(stage("emitted", -4), r"'stages\[1\]\.emitted' must be a non-negative", id="emitted"),
        pytest.param(stage("times", [0.5]), r"'stages\[1\]\.times' must hold at least two", id="one-time"),
        pytest.param(stage("times", [0.25, 0.5]), r"'stages\[1\]\.times' must decrease", id="times-order"),
        pytest.param(stage("times", [0.7, 0.1]), r"'stages\[1\]\.times' holds 0.7, which is not a float32", id="f64"),
        pytest.param(stage("times", "0.5"), r"'stages\[1\]\.times' must be a list", id="times-text"),
        pytest.param(stage("ramp", None), r"'stages\[1\]\.ramp' must be a number", id="ramp"),
        pytest.param(lambda d: d["stages"][0].pop("ramp"), r"plan stages\[0\]: missing field 'ramp'", id="no-ramp"),
    ]


@pytest.mark.parametrize(("mutate", "message"), _mutations())
def test_a_bad_plan_is_refused_naming_the_field(mutate: Any, message: str) -> None:
    data = copy.deepcopy(ecar_contract.request_plan(make_tiny_config()).to_dict())
    RequestPlan.from_dict(copy.deepcopy(data))  # the control: the unchanged plan loads
    mutate(data)
    with pytest.raises(ManifestError, match=message):
        RequestPlan.from_dict(data)


def test_plan_weights_refuse_a_bad_cfg() -> None:
    plan = flowar_like_plan()
    for cfg in (float("nan"), 1e9, "2", True):
        with pytest.raises(InvalidRequestError, match="cfg must be a finite number"):
            plan.weights(cfg)  # type: ignore[arg-type]


# ------------------------------------------------------------------------ the stages file
def test_stages_file_round_trips_and_its_bytes_depend_only_on_the_arrays(tmp_path: Path) -> None:
    config = make_tiny_config()
    arrays = ecar_contract.stage_constants(config)
    assert set(arrays) == {f"backbone/{s}/{n}" for s in (1, 2, 3) for n in ecar_contract.BACKBONE_CONSTANTS}
    blob = stage_constants.encode(arrays)
    assert blob == stage_constants.encode(dict(reversed(list(arrays.items()))))  # key order does not matter
    (tmp_path / "stages.npz").write_bytes(blob)
    read = stage_constants.StageConstants.read(tmp_path / "stages.npz")
    assert read.arrays().keys() == arrays.keys()
    for key, value in arrays.items():
        np.testing.assert_array_equal(read.arrays()[key], value)
    up = read.get("backbone", 2)["up"]
    assert not up.flags.writeable
    assert dict(read.get("flow_step", 1)) == {}
    with pytest.raises(ManifestError, match="keys must be '<graph>/<stage>/<input>'"):
        stage_constants.StageConstants({"backbone/0/up": up})
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ManifestError, match=r"cannot read the stage constants '.*bad\.npz'"):
        stage_constants.StageConstants.read(tmp_path / "bad.npz")


def _rewrite(root: Path, change: Any) -> None:
    """Change a build's manifest document and write it back as a build would (with its digest)."""
    data = json.loads((root / manifest_io.MANIFEST_NAME).read_text())
    change(data)
    manifest_io.write(root, data)


def _write_constants(root: Path, data: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    blob = stage_constants.encode(arrays)
    name, digest = manifest_io.constants_file(blob)
    (root / name).write_bytes(blob)
    data["stage_constants"] = {"file": name, "sha256": digest}


def _add_bias_input(root: Path) -> dict[str, np.ndarray]:
    """Give the build's flow_step graph one more input, ``bias`` [N, C] added to x_next: a stage constant the
    build writes into its stages file (a new one per stage). Returns the biases by stage."""
    manifest = manifest_io.load(root)
    entry = manifest.graphs[Kind.FLOW_STEP]
    channels = manifest.plan.channels
    model = onnx.load(str(root / entry.file), load_external_data=False)
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["inner_x_next" if out == "x_next" else out for out in node.output]
    graph.node.append(helper.make_node("Add", ["inner_x_next", "bias"], ["x_next"], name="add_stage_bias"))
    graph.input.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, ["N", channels]))
    file = "flow_step-biased.onnx"
    onnx.save_model(model, str(root / file))
    rng = np.random.default_rng(4)
    biases = {
        stage: (0.01 * rng.standard_normal((tokens, channels))).astype(np.float32)
        for stage, tokens in enumerate(manifest.plan.tokens, start=1)
    }

    def change(data: dict[str, Any]) -> None:
        record = data["graphs"][Kind.FLOW_STEP]
        record["inputs"].append(TensorSpec("bias", ("N", channels), "float32").to_dict())
        record["file"], record["sha256"] = file, sha256_file(root / file)
        arrays = manifest.constants.arrays()
        arrays.update({stage_constants.key("flow_step", s, "bias"): b for s, b in biases.items()})
        _write_constants(root, data, arrays)

    _rewrite(root, change)
    return biases


class Recording:
    """A backend wrapper that keeps every call's feeds."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name, self.calls = inner, inner.name, []

    def run(self, call: Call, feeds: Any) -> list[np.ndarray]:
        self.calls.append((call, {k: np.array(v) for k, v in feeds.items()}))
        return self.inner.run(call, feeds)  # type: ignore[no-any-return]

    def describe(self) -> dict[str, object]:
        return self.inner.describe()  # type: ignore[no-any-return]


def test_a_graph_input_the_contract_does_not_name_is_fed_from_the_stages_file(
    build_cache: BuildCache, tmp_path: Path
) -> None:
    root = tmp_path / "engines"
    shutil.copytree(build_cache.get(TINY).dir, root)
    before = Pipeline.from_dir(root, backend="onnxruntime").generate([3, 1], seed=5)
    biases = _add_bias_input(root)
    pipe = Pipeline.from_dir(root, backend="onnxruntime")
    assert "bias" in pipe.manifest.graphs["flow_step"].spec.input_names()
    recording = Recording(pipe.backend)
    after = Pipeline(pipe.manifest, recording).generate([3, 1], seed=5)
    fed = [(call, feeds) for call, feeds in recording.calls if call.graph == Kind.FLOW_STEP]
    assert len(fed) == sum(s.steps for s in pipe.manifest.plan.stages)
    for call, feeds in fed:
        np.testing.assert_array_equal(feeds["bias"], biases[call.stage])
    assert not np.allclose(after.latents, before.latents, atol=1e-4), "the bias reached the graph"
    # zero biases: the graph is the original one again
    _rewrite(
        root,
        lambda data: _write_constants(
            root,
            data,
            {
                k: np.zeros_like(v) if k.startswith("flow_step/") else v
                for k, v in manifest_io.load(root).constants.arrays().items()
            },
        ),
    )
    zero = Pipeline.from_dir(root, backend="onnxruntime").generate([3, 1], seed=5)
    np.testing.assert_allclose(zero.latents, before.latents, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda arrays: arrays.pop("backbone/2/up"), r"stage constants: no 'backbone/2/up'"),
        (
            lambda arrays: arrays.update({"backbone/1/up": np.zeros((3, 3), np.float32)}),
            r"'backbone/1/up' is float32 \(3, 3\), the graph takes float32 \(1, 1\)",
        ),
        (
            lambda arrays: arrays.update({"backbone/2/level": np.array([1], np.int32)}),
            r"stage constant 'backbone/2/level': dtype int32",
        ),
        (
            lambda arrays: arrays.update({"flow_step/1/rotary": np.zeros(2, np.float32)}),
            r"'flow_step/1/rotary' is no input of a graph",
        ),
    ],
    ids=["missing", "wrong-shape", "wrong-dtype", "unused"],
)
def test_stage_constants_that_do_not_fit_the_specs_are_refused(
    build_cache: BuildCache, tmp_path: Path, change: Any, message: str
) -> None:
    root = tmp_path / "engines"
    shutil.copytree(build_cache.get(TINY).dir, root)
    arrays = manifest_io.load(root).constants.arrays()
    change(arrays)
    _rewrite(root, lambda data: _write_constants(root, data, arrays))
    with pytest.raises(ManifestError, match=message):
        manifest_io.load(root)


# ------------------------------------------------------------------------ specs against the contract
def _specs(config: ECARConfig, fused: bool = False) -> dict[str, GraphSpec]:
    return {spec.name: spec for spec in ecar_contract.graph_specs(config, fused)}


def _sizes(plan: RequestPlan) -> dict[str, int]:
    return {"c": plan.channels, "n_last": plan.tokens[-1]}


def _replace_tensor(spec: GraphSpec, name: str, **changes: Any) -> GraphSpec:
    def swap(tensor: TensorSpec) -> TensorSpec:
        return dataclasses.replace(tensor, **changes) if tensor.name == name else tensor

    return dataclasses.replace(spec, inputs=tuple(map(swap, spec.inputs)), outputs=tuple(map(swap, spec.outputs)))


def test_ecar_specs_satisfy_the_contract_and_fix_its_sizes() -> None:
    config = make_tiny_config(**ENGINE_CONFIGS["rgb-1-3-6-linear-cfg"])
    plan = ecar_contract.request_plan(config)
    for fused in (False, True):
        sizes = graphs.check_specs(_specs(config, fused), fused, _sizes(plan))
        assert sizes == {
            "c": config.latent_channels,
            "n_last": config.tokens_per_stage[-1],
            "d": config.width,
            "layers": config.depth,
            "heads": config.heads,
            "head_dim": config.head_dim,
            "image_channels": config.image_channels,
            "height": config.image_size,
            "width": config.image_size,
        }


@pytest.mark.parametrize(
    ("graph", "tensor", "changes", "message"),
    [
        ("flow_step", "x", {"shape": ("M", 4)}, r"graph 'flow_step' tensor 'x': rank 2, the contract has 3"),
        ("flow_step", "z", {"shape": ("2B", "N", 31)}, r"graph 'flow_step' tensor 'z': axis 2 is 31, .* 32"),
        ("flow_step", "cfg", {"dtype": "int64"}, r"tensor 'cfg': dtype int64, the contract has float32"),
        ("backbone", "noise", {"shape": ("B", "N", 5)}, r"tensor 'noise': axis 2 is 5, the contract has 4"),
        ("backbone", "past_kv", {"shape": ("T", 2, 2, "B", 2, 16)}, r"tensor 'past_kv': axis 3 is 'B'"),
        ("backbone", "up", {"shape": ("B", "P")}, r"input 'up' is a stage constant .* batch axis"),
        ("decoder", "x", {"shape": ("B", 15, 4)}, r"graph 'decoder' tensor 'x': axis 1 is 15, the contract has 16"),
    ],
)
def test_specs_that_break_the_contract_are_refused_naming_the_tensor(
    graph: str, tensor: str, changes: dict[str, Any], message: str
) -> None:
    config = make_tiny_config()
    specs = _specs(config)
    specs[graph] = _replace_tensor(specs[graph], tensor, **changes)
    with pytest.raises(ManifestError, match=message):
        graphs.check_specs(specs, False, _sizes(ecar_contract.request_plan(config)))


def test_the_slot_tables_name_the_same_tensors() -> None:
    for kind in Kind:
        inputs, outputs = graphs.SLOTS[kind]
        assert [name for name, _, _ in inputs] == list(graphs.FEEDS[kind]), kind
        assert [name for name, _, _ in outputs] == list(graphs.RESULTS[kind]), kind


def test_a_build_missing_a_graph_or_slot_is_refused() -> None:
    config = make_tiny_config()
    sizes = _sizes(ecar_contract.request_plan(config))
    with pytest.raises(ManifestError, match=r"missing \['flow_loop'\], unexpected \['flow_step'\]"):
        graphs.check_specs(_specs(config), True, sizes)
    specs = _specs(config)
    flow = specs["flow_step"]
    specs["flow_step"] = dataclasses.replace(flow, inputs=tuple(t for t in flow.inputs if t.name != "dt"))
    with pytest.raises(ManifestError, match=r"graph 'flow_step' has no input 'dt'"):
        graphs.check_specs(specs, False, sizes)


# ------------------------------------------------------------------------ the request path is family-agnostic
REQUEST_PATH = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "runtime").rglob("*.py"))  # all of runtime/
# What a request may read of the model config: what every family has (its name, its classes)
GENERIC_CONFIG_FIELDS = {"name", "num_classes"}


def _config_fields() -> set[str]:
    fields = {f.name for f in dataclasses.fields(ECARConfig)}
    properties = {name for name in dir(ECARConfig) if isinstance(getattr(ECARConfig, name, None), property)}
    return (fields | properties) - GENERIC_CONFIG_FIELDS


def test_the_request_path_reads_no_model_specific_config_field_and_no_ecar_formula() -> None:
    fields = _config_fields()
    assert {"window_bounds", "cfg_schedule", "scales", "tokens_per_stage", "latent_channels", "width"} <= fields
    offending = []
    for name in REQUEST_PATH:
        text = (ROOT / name).read_text()
        for match in re.finditer(r"\bconfig\.(\w+)", text):
            if match.group(1) in fields:
                offending.append(f"{name}: config.{match.group(1)}")
        for module in ("from ecar_export", "import ecar_export", "ECARConfig"):
            if module in text:
                offending.append(f"{name}: {module}")
    assert not offending, offending


def test_ecar_specific_config_fields_stay_in_the_ecar_modules() -> None:
    """window_bounds, cfg_schedule, scales, tokenizer_*: named only by the config, ECAR's schedule and ECAR's
    build data; a runtime module that reads them has a family code path."""
    allowed: set[str] = set()  # ECAR's config, schedule and contract live in ecar_export.families.ecar
    pattern = re.compile(r"\b(window_bounds|cfg_schedule|scales|tokenizer_\w+|tokens_per_stage|latent_channels)\b")
    offending = [
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for path in sorted((ROOT / "runtime").rglob("*.py"))
        if path.name not in allowed
        for match in pattern.finditer(path.read_text())
    ]
    assert not offending, offending


def test_the_isolation_checks_can_fail() -> None:
    """The checks above find what they look for (run on a text that has it)."""
    text = "weights = schedule.cfg_weights(self.config, cfg)\nn = self.config.tokens_per_stage[0]\n"
    fields = _config_fields()
    assert [m.group(1) for m in re.finditer(r"\bconfig\.(\w+)", text) if m.group(1) in fields] == ["tokens_per_stage"]
    assert re.search(r"\b(tokens_per_stage)\b", text)
