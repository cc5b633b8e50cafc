"""FLOP counting (ecar_export/flops.py) on hand-built graphs with known counts and on a tiny build."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ecar_export import flops, inspect_report
from ecar_export.families.ecar.contract import config_of
from runtime import manifest as manifest_io


def _model(nodes, inputs, outputs, initializers=()):  # type: ignore[no-untyped-def]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return model


def _weight(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ones(shape, np.float32), name)


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_gemm_counts_2mkn(batch: int) -> None:
    k, n = 5, 11
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    model = _model([node], [x], [y], [_weight("w", (n, k)), _weight("b", (n,))])
    result = flops.graph_flops(model, {"B": batch})  # the contract's name for the exporter's 'batch'
    assert result == {"by_op": {"Gemm": 2 * batch * k * n}, "total": 2 * batch * k * n, "unknown": []}


def test_matmul_counts_2mkn_and_leaves_the_model_alone() -> None:
    m, k, n = 6, 4, 9
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["rows", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])
    model = _model([helper.make_node("MatMul", ["a", "w"], ["y"])], [a], [y], [_weight("w", (k, n))])
    before = model.SerializeToString()
    assert flops.graph_flops(model, {"rows": m})["total"] == 2 * m * k * n
    assert model.SerializeToString() == before


def test_batched_matmul_broadcasts() -> None:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["B", 3, 8, 16])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["B", 3, 16, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = _model([helper.make_node("MatMul", ["a", "b"], ["y"])], [a, b], [y])
    assert flops.graph_flops(model, {"B": 2})["total"] == 2 * (2 * 3) * 8 * 16 * 5


@pytest.mark.parametrize(("stride", "pads"), [(1, 0), (1, 1), (2, 1)])
def test_conv_counts_2_cout_cin_kh_kw_hout_wout_b(stride: int, pads: int) -> None:
    batch, c_in, c_out, kh, kw, h, w = 3, 4, 6, 3, 2, 9, 10
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", c_in, h, w])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=[stride, stride], pads=[pads] * 4)
    model = _model([node], [x], [y], [_weight("w", (c_out, c_in, kh, kw)), _weight("b", (c_out,))])
    h_out = (h + 2 * pads - kh) // stride + 1
    w_out = (w + 2 * pads - kw) // stride + 1
    expected = 2 * c_out * c_in * kh * kw * h_out * w_out * batch
    assert flops.graph_flops(model, {"B": batch}) == {"by_op": {"Conv": expected}, "total": expected, "unknown": []}


def test_grouped_conv_and_conv_transpose() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Conv", ["x", "wg"], ["y"], group=2, pads=[1, 1, 1, 1]),  # out [B, 6, 5, 5]
        helper.make_node("ConvTranspose", ["y", "wt"], ["z"], strides=[2, 2]),  # in [B, 6, 5, 5], k 2x2
    ]
    model = _model(nodes, [x], [y, z], [_weight("wg", (6, 2, 3, 3)), _weight("wt", (6, 3, 2, 2))])
    result = flops.graph_flops(model, {"B": 2})
    assert result["by_op"]["Conv"] == 2 * (2 * 6 * 5 * 5) * 2 * 9
    assert result["by_op"]["ConvTranspose"] == 2 * (2 * 6 * 5 * 5) * 3 * 4


def test_missing_dim_is_an_error() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [x], [y], [_weight("w", (2, 2))])
    with pytest.raises(ValueError, match="rows"):
        flops.graph_flops(model, {"B": 1})


def test_tiny_build_flow_step_linear_in_m_and_backbone_grows(build_cache) -> None:  # type: ignore[no-untyped-def]
    build = build_cache.get("tiny-1-2-4")
    manifest = manifest_io.load(build.dir)
    entry = manifest.graphs["flow_step"]
    model = onnx.load(str(manifest.path(entry.file)), load_external_data=False)

    def step(batch: int, tokens: int) -> int:
        counted = flops.graph_flops(model, {"B": batch, "2B": 2 * batch, "N": tokens}, entry.spec)
        assert not counted["unknown"]
        return int(counted["total"])

    # affine in M: a per-token part and a part computed from `t` alone (the time embedding)
    per_token = step(1, 2) - step(1, 1)
    fixed = step(1, 1) - per_token
    assert per_token > 0 and 0 <= fixed < per_token
    for batch, tokens in [(1, 4), (2, 4), (5, 16), (3, 1), (4, 16)]:
        assert step(batch, tokens) == batch * tokens * per_token + fixed
    assert step(2, 16) - step(1, 16) == step(4, 16) - step(3, 16) == 16 * per_token

    one, five = flops.build_flops(build.dir, 1), flops.build_flops(build.dir, 5)
    config = config_of(manifest)
    for table in (one, five):
        backbones = [stage["backbone"] for stage in table["stages"]]
        assert all(a < b for a, b in zip(backbones, backbones[1:])), backbones
        for stage, tokens, steps in zip(table["stages"], config.tokens_per_stage, config.steps):
            assert stage["M"] == table["batch"] * tokens
            assert stage["flow"] == steps * stage["flow_per_call"]
            assert stage["flow_per_call"] == stage["M"] * per_token + fixed
        assert table["total"] == sum(s["total"] for s in table["stages"]) + table["decoder"]
        assert table["per_image"] == table["total"] / table["batch"]
    # all but flow_step's time embedding is linear in the batch
    flow_calls = sum(config.steps)
    assert five["total"] - fixed * flow_calls == 5 * (one["total"] - fixed * flow_calls)

    # the request's graph calls per stage, in the order the request plan makes them
    assert one["graphs"]["backbone@stage1"]["calls"] == 1 and one["graphs"]["decoder"]["calls"] == 1
    assert [one["graphs"][f"flow_step@stage{s}"]["calls"] for s in (1, 2, 3)] == list(config.steps)

    rows = inspect_report.inspect_rows(build.dir)
    assert [(row["name"], row["stage"]) for row in rows] == [
        ("backbone", 1), ("flow_step", 1), ("backbone", 2), ("flow_step", 2), ("backbone", 3), ("flow_step", 3),
        ("decoder", 3),
    ]  # fmt: skip
    for row in rows:
        entry = manifest.graphs[row["name"]]
        assert row["size_bytes"] == sum((build.dir / f).stat().st_size for f in (entry.file, *entry.data_files))
        assert row["precision"] == "fp32" and row["flops"] > 0 and not row["unknown"]
    for stage, tokens in enumerate(config.tokens_per_stage, start=1):  # each stage's profile: its own grid
        flow_row = next(row for row in rows if row["name"] == "flow_step" and row["stage"] == stage)
        m_opt = manifest.opt_batch * tokens
        assert flow_row["flops"] == m_opt * per_token + fixed
        assert [i["opt_shape"] for i in flow_row["inputs"]][:2] == [
            [manifest.opt_batch, tokens, config.latent_channels],
            [2 * manifest.opt_batch, tokens, config.width],
        ]


def test_inspect_cli_lists_every_graph(build_cache) -> None:  # type: ignore[no-untyped-def]
    import json

    from typer.testing import CliRunner

    from ecar_export.cli import app
    from runtime import manifest as manifest_io

    build = build_cache.get("tiny-1-2-4")
    result = CliRunner().invoke(app, ["inspect", "--engine-dir", str(build.dir), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["graphs"]
    assert {row["name"] for row in rows} == set(manifest_io.load(build.dir).graphs)
    assert all(row["flops"] > 0 for row in rows)
    table = CliRunner().invoke(app, ["inspect", "--engine-dir", str(build.dir)])
    assert table.exit_code == 0 and "flow_step" in table.stdout
    missing = CliRunner().invoke(app, ["inspect", "--engine-dir", str(build.dir / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
