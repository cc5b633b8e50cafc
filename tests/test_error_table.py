"""Every user error in the README's failure table: exit code 2, the documented message, no traceback.

Each scenario damages a copy of a small build (or passes a bad argument) and runs the CLI in
process. The README's table lists the same scenario ids; a test keeps the two in step.
"""

from __future__ import annotations

import errno
import json
import pickle
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import BuildCache, make_perturbed_model, make_tiny_config
from safetensors.torch import save_file
from typer.testing import CliRunner

from ecar_export import checkpoint
from ecar_export.cli import app as export_app
from runtime.cli import app as run_app

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny-1-2-4"


@dataclass(frozen=True)
class Scenario:
    id: str
    app: str  # "run" | "export"
    prepare: Callable[[Path, Path, Path], list[str]]  # (engines copy, good checkpoint, tmp) -> argv
    message: str  # regex the one-paragraph message must match


def _graph_file(engines: Path, name: str = "backbone") -> Path:
    return engines / json.loads((engines / "manifest.json").read_text())["graphs"][name]["file"]


def _edit_manifest(engines: Path, edit: Callable[[dict], None]) -> None:  # type: ignore[type-arg]
    document = json.loads((engines / "manifest.json").read_text())
    edit(document)
    (engines / "manifest.json").write_text(json.dumps(document))


def _bad_checkpoint(tmp: Path, good: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    change(tensors)
    path = tmp / "bad.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def _run(engines: Path, *extra: str) -> list[str]:
    return ["--engine-dir", str(engines), "--out", str(engines.parent / "out"), *extra]


def _build(ckpt: Path, tmp: Path) -> list[str]:
    return ["build", "--checkpoint", str(ckpt), "--out", str(tmp / "new-engines"), "--backend", "onnxruntime"]


def _wrong_version(d: dict) -> None:  # type: ignore[type-arg]
    d["format_version"] = 99


def _bad_schema(d: dict) -> None:  # type: ignore[type-arg]
    d["profile"]["max_batch"] = "eight"


def _escape(d: dict) -> None:  # type: ignore[type-arg]
    d["graphs"]["decoder"]["file"] = "../decoder.onnx"


def _drop(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.pop(name)


def _nan(t: dict[str, torch.Tensor]) -> None:
    t["head.out_proj.weight"] = t["head.out_proj.weight"].clone().fill_(float("nan"))


def _misshape(t: dict[str, torch.Tensor]) -> None:
    t["head.out_proj.weight"] = t["head.out_proj.weight"][:, :-1].contiguous()


def _extra(t: dict[str, torch.Tensor]) -> None:
    t["head.surprise"] = torch.ones(3)


def _bad_config(tmp: Path, good: Path, **changes: int) -> Path:
    """The good checkpoint's tensors under a config whose numbers parse but do not fit them."""
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = dict(handle.metadata())
    metadata["config"] = json.dumps({**json.loads(metadata["config"]), **changes})
    path = tmp / "absurd.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def _giant_integer(engines: Path) -> None:
    """A manifest that is valid JSON holding an integer past Python's int-to-string digit limit."""
    text = (engines / "manifest.json").read_text()
    document = json.loads(text)
    needle = f'"max_batch": {document["profile"]["max_batch"]}'
    assert needle in text
    (engines / "manifest.json").write_text(text.replace(needle, '"max_batch": ' + "9" * 5001, 1))


def _overflowing_decoder(engines: Path) -> None:
    """The build's decoder graph with its image multiplied by a float32 overflow (as an fp16 VAE whose
    GroupNorm statistics overflowed), re-registered in the manifest so the damage is in the numbers only."""
    import onnx
    from onnx import TensorProto, helper

    from runtime import manifest as manifest_io
    from runtime.fileio import sha256_file

    path = _graph_file(engines, "decoder")
    model = onnx.load(str(path), load_external_data=False)
    output = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{o}_finite" if o == output else o for o in node.output]
    model.graph.initializer.append(helper.make_tensor("overflow", TensorProto.FLOAT, [], [3.0e38]))
    model.graph.node.extend(
        [
            helper.make_node("Mul", [f"{output}_finite", "overflow"], [f"{output}_big"]),
            helper.make_node("Mul", [f"{output}_big", "overflow"], [output]),
        ]
    )
    onnx.save_model(model, str(path))
    document = json.loads((engines / "manifest.json").read_text())
    document["graphs"]["decoder"]["sha256"] = sha256_file(path)
    manifest_io.write(engines, document)  # sealed again, as a build would


def _pickle(tmp: Path) -> Path:
    path = tmp / "model.pt"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    return path


SCENARIOS = [
    Scenario("missing-engine-dir", "run", lambda e, c, t: _run(t / "nowhere"), r"does not exist"),
    Scenario(
        "missing-manifest",
        "run",
        lambda e, c, t: [(e / "manifest.json").unlink(), *_run(e)][1:],
        r"manifest\.json' is missing",
    ),
    Scenario(
        "missing-graph-file",
        "run",
        lambda e, c, t: [_graph_file(e).unlink(), *_run(e)][1:],
        r"graph 'backbone'.*is missing",
    ),
    Scenario(
        "manifest-not-json",
        "run",
        lambda e, c, t: [(e / "manifest.json").write_text("{nope"), *_run(e)][1:],
        r"is not valid JSON",
    ),
    Scenario(
        "manifest-wrong-version",
        "run",
        lambda e, c, t: [_edit_manifest(e, _wrong_version), *_run(e)][1:],
        r"format version 99",
    ),
    Scenario(
        "manifest-schema",
        "run",
        lambda e, c, t: [_edit_manifest(e, _bad_schema), *_run(e)][1:],
        r"'max_batch' has the wrong type",
    ),
    Scenario(
        "graph-sha256-mismatch",
        "run",
        lambda e, c, t: [_graph_file(e).write_bytes(_graph_file(e).read_bytes() + b"x"), *_run(e)][1:],
        r"graph 'backbone'.*does not match its sha256",
    ),
    Scenario(
        "decoder-non-finite",
        "run",
        lambda e, c, t: [_overflowing_decoder(e), *_run(e)][1:],
        r"the decoder produced non-finite pixels \(NaN or inf\).*try the fp32 build",
    ),
    Scenario(
        "path-escapes-engine-dir",
        "run",
        lambda e, c, t: [_edit_manifest(e, _escape), *_run(e)][1:],
        r"escapes the engine directory",
    ),
    Scenario("no-tensorrt-plans", "run", lambda e, c, t: _run(e, "--backend", "tensorrt"), r"holds no TensorRT plans"),
    Scenario(
        "checkpoint-missing-file", "export", lambda e, c, t: _build(t / "absent.safetensors", t), r"does not exist"
    ),
    Scenario(
        "checkpoint-missing-tensor",
        "export",
        lambda e, c, t: _build(_bad_checkpoint(t, c, _drop("head.out_proj.bias")), t),
        r"lacks tensor 'head\.out_proj\.bias'",
    ),
    Scenario(
        "checkpoint-unexpected-tensor",
        "export",
        lambda e, c, t: _build(_bad_checkpoint(t, c, _extra), t),
        r"unexpected tensor 'head\.surprise'",
    ),
    Scenario(
        "checkpoint-misshaped-tensor",
        "export",
        lambda e, c, t: _build(_bad_checkpoint(t, c, _misshape), t),
        r"tensor 'head\.out_proj\.weight' has shape",
    ),
    Scenario(
        "checkpoint-non-finite",
        "export",
        lambda e, c, t: _build(_bad_checkpoint(t, c, _nan), t),
        r"tensor 'head\.out_proj\.weight' holds NaN",
    ),
    Scenario("checkpoint-pickle", "export", lambda e, c, t: _build(_pickle(t), t), r"never loaded"),
    Scenario(
        "checkpoint-config-absurd",
        "export",
        lambda e, c, t: _build(_bad_config(t, c, depth=10**9), t),
        r"invalid config field 'depth' = 1000000000: must be at most 1,024 \(an invalid model config",
    ),
    Scenario(
        "checkpoint-config-num-classes",
        "export",
        lambda e, c, t: _build(_bad_config(t, c, num_classes=10**12), t),
        r"'num_classes' = 1000000000000: must be at most 1,000,000",
    ),
    Scenario(
        "checkpoint-config-mismatch",
        "export",
        lambda e, c, t: _build(_bad_config(t, c, head_width=33), t),
        r"tensor '[a-z_.0-9]+' has shape \(.*\), the config needs \(.*\)",
    ),
    Scenario(
        "manifest-giant-integer",
        "run",
        lambda e, c, t: [_giant_integer(e), *_run(e)][1:],
        r"manifest\.json.*(too many digits|digit|not valid JSON)",
    ),
    Scenario(
        "inspect-giant-integer",
        "export",
        lambda e, c, t: [_giant_integer(e), "inspect", "--engine-dir", str(e)][1:],
        r"manifest\.json.*(too many digits|digit|not valid JSON)",
    ),
    Scenario("device-unknown", "run", lambda e, c, t: _run(e, "--device", "foo"), r"unknown device 'foo'"),
    Scenario(
        "cfg-out-of-range",
        "run",
        lambda e, c, t: _run(e, "--cfg", "1e308"),
        r"cfg must be a finite number in \[-100, 100\], got 1e\+308",
    ),
    Scenario(
        "per-class-too-many",
        "run",
        lambda e, c, t: _run(e, "--per-class", "100000"),
        r"--per-class 100,000 asks for 1,000,000 samples; one run makes at most 10,000",
    ),
    Scenario("label-out-of-range", "run", lambda e, c, t: _run(e, "--labels", "3,12"), r"class 12 is out of range"),
    Scenario("label-negative", "run", lambda e, c, t: _run(e, "--labels", "-1"), r"class -1 is out of range"),
    Scenario("label-not-integer", "run", lambda e, c, t: _run(e, "--labels", "3,x"), r"'x' is not an integer"),
    Scenario("labels-empty", "run", lambda e, c, t: _run(e, "--labels", ""), r"comma-separated class numbers"),
    Scenario("seed-out-of-range", "run", lambda e, c, t: _run(e, "--seed", "-5"), r"seed -5 is out of range"),
    Scenario("cfg-not-finite", "run", lambda e, c, t: _run(e, "--cfg", "nan"), r"cfg must be a finite number"),
    Scenario(
        "max-batch-invalid",
        "export",
        lambda e, c, t: [*_build(c, t), "--max-batch", "0"],
        r"--max-batch must be an integer",
    ),
    Scenario(
        "output-not-writable",
        "run",
        lambda e, c, t: ["--engine-dir", str(e), "--out", str(_file(t) / "sub")],
        r"cannot create output directory",
    ),
]


# Published VAEs (`ecar-export convert`): a backbone of a reduced KL-16 layout and VAE files made in tmp.
def _convert(tmp: Path, vae: Path) -> list[str]:
    from test_vae import KL16, backbone_file, kl_config

    backbone = backbone_file(kl_config(KL16), tmp / "backbone.safetensors", 0)
    return ["convert", "--backbone", str(backbone), "--vae", str(vae), "--out", str(tmp / "out.safetensors")]


def _vae_file(tmp: Path, layout: str = "kl16", change: Callable[[dict[str, Any]], None] | None = None) -> Path:
    from test_vae import F8, KL16, kl_config, ldm_shapes, random_weights

    state: dict[str, Any] = random_weights(ldm_shapes(kl_config(KL16 if layout == "kl16" else F8)), 0)
    if change is not None:
        change(state)
    path = tmp / "kl16.ckpt"
    torch.save({"model": state}, path)
    return path


VAE_SCENARIOS = [
    Scenario(
        "vae-misshaped-tensor",
        "export",
        lambda e, c, t: _convert(
            t, _vae_file(t, change=lambda s: s.update({"decoder.up.1.block.0.conv1.weight": torch.ones(16, 16, 3, 3)}))
        ),
        r"VAE tensor 'decoder\.up_blocks\.1\.resnets\.0\.conv1\.weight' has shape \(16, 16, 3, 3\), "
        r"the model's config needs \(16, 32, 3, 3\)",
    ),
    Scenario(
        "vae-missing-tensor",
        "export",
        lambda e, c, t: _convert(t, _vae_file(t, change=lambda s: s.pop("decoder.mid.attn_1.q.bias"))),
        r"lacks VAE tensor 'decoder\.mid_block\.attentions\.0\.to_q\.bias'",
    ),
    Scenario(
        "vae-layout-mismatch",
        "export",
        lambda e, c, t: _convert(t, _vae_file(t, "f8")),
        r"the VAE's layout does not match the model's latent grid: it makes 4-channel latents at factor 8",
    ),
    Scenario(
        "vae-pickled-objects",
        "export",
        lambda e, c, t: _convert(t, _vae_file(t, change=lambda s: s.update({"args": Path("x")}))),
        r"holds objects other than tensors and plain containers, which are never unpickled",
    ),
]
SCENARIOS += VAE_SCENARIOS


def _file(tmp: Path) -> Path:
    path = tmp / "a-file"
    path.write_text("not a directory")
    return path


@pytest.fixture(scope="module")
def good(build_cache: BuildCache, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    build = build_cache.get(TINY)
    ckpt = tmp_path_factory.mktemp("good") / "tiny.safetensors"
    checkpoint.save(make_perturbed_model(make_tiny_config(), seed=5), ckpt)
    return build.dir, ckpt


def _invoke(app_name: str, argv: list[str]):  # type: ignore[no-untyped-def]
    app = run_app if app_name == "run" else export_app
    return CliRunner().invoke(app, argv)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_user_error_gets_exit_2_and_a_clear_message(scenario: Scenario, good: tuple[Path, Path], tmp_path: Path):
    engines = shutil.copytree(good[0], tmp_path / "engines")
    result = _invoke(scenario.app, scenario.prepare(engines, good[1], tmp_path))
    output = result.output
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    assert re.search(scenario.message, " ".join(output.split()), re.DOTALL), output
    assert "error:" in output


def test_disk_full_while_writing_outputs(good: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from PIL import Image

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "out"
    result = _invoke("run", ["--engine-dir", str(good[0]), "--labels", "1,2", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "No space left on device" in result.output
    assert not list(out.glob("*.png")) and not list(out.glob(".*.tmp")), "no partial files may remain"


# TensorRT on this machine is stood in for by tests/fake_tensorrt.py (TensorRT cannot be installed
# here): the fake stands for "this machine's" TensorRT version and GPU; the manifest side, the
# loading code and the CLI's handling are the real ones.
PLAN_CASES = {
    "tensorrt-plan-other-version": (
        ("10.13.0.35", "NVIDIA H200", "9.0"),
        r"built with TensorRT 10\.13\.0\.35 but "
        r"this machine runs TensorRT 10\.14\.1.*rebuild",
    ),
    "tensorrt-plan-other-gpu": (
        ("10.14.1", "NVIDIA A100-SXM4-80GB", "8.0"),
        r"built for NVIDIA A100.*cannot run on "
        r"this NVIDIA H200.*rebuild",
    ),
}


def _fake_here(monkeypatch: pytest.MonkeyPatch, cuda_fails: bool = False) -> Any:
    """This machine: TensorRT 10.14.1 on an NVIDIA H200 (the fakes of tests/fake_tensorrt.py)."""
    from fake_tensorrt import install

    import ecar_export.export  # noqa: F401  (torch's exporter first: it probes the `tensorrt` module)
    from runtime.backends.tensorrt import gpu

    trt, cuda = install(cuda_fails=cuda_fails, patch=monkeypatch)
    trt.__version__ = "10.14.1"
    here = gpu.GpuInfo(0, "NVIDIA H200", "9.0", 141 << 30, 12080)
    monkeypatch.setattr(cuda, "info", lambda index=0: here)
    return trt


def _as_tensorrt_build(engines: Path, version: str, gpu_name: str, capability: str) -> None:
    """Turn a copy of an ONNX build into a (fake) TensorRT build, written as the builder writes it."""
    from runtime import manifest as manifest_io
    from runtime.fileio import sha256_file

    document = json.loads((engines / "manifest.json").read_text())
    document["backend"] = "tensorrt"
    document["tensorrt"] = {"version": version, "gpu_name": gpu_name, "compute_capability": capability,
                            "hardware_compatibility": "none", "strongly_typed": True}  # fmt: skip
    for name, record in document["graphs"].items():
        plan = engines / f"{name}-0123456789ab.plan"
        plan.write_text(json.dumps({"onnx": str(engines / record["file"])}))
        record["plan_file"], record["plan_sha256"] = plan.name, sha256_file(plan)
    manifest_io.write(engines, document)


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_tensorrt_plans_for_another_machine_are_refused(
    case: str, good: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (version, gpu_name, capability), message = PLAN_CASES[case]
    engines = shutil.copytree(good[0], tmp_path / "engines")
    _as_tensorrt_build(engines, version, gpu_name, capability)
    trt = _fake_here(monkeypatch)
    result = _invoke("run", _run(engines, "--backend", "tensorrt"))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert re.search(message, " ".join(result.output.split())), result.output
    assert trt.engines == [], "plans were deserialized before the compatibility check"


def test_tensorrt_cannot_start_cuda(good: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engines = shutil.copytree(good[0], tmp_path / "engines")
    _as_tensorrt_build(engines, "10.14.1", "NVIDIA H200", "9.0")
    _fake_here(monkeypatch, cuda_fails=True)
    result = _invoke("run", _run(engines, "--backend", "tensorrt"))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert re.search(r"error: TensorRT cannot start CUDA here: creating a trt\.Runtime failed.*nvidia-smi", text), text
    # the same build with --backend auto runs on ONNX Runtime, saying why in one line
    result = _invoke("run", _run(engines, "--backend", "auto", "--labels", "1"))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "instead: TensorRT cannot start CUDA here" in warnings[0]


def test_tensorrt_timing_cache_from_another_gpu(
    good: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ecar_export.backends.tensorrt import timing_cache_file

    trt = _fake_here(monkeypatch)
    cache_dir = tmp_path / "nfs-home-cache"
    monkeypatch.setenv("ECAR_TENSORRT_CACHE", str(cache_dir))
    stale = timing_cache_file(cache_dir, "NVIDIA H200", "9.0", "10.14.1")
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"other-gpu:written on a machine with another H200 driver")
    result = _invoke("export", [*_build(good[1], tmp_path)[:-1], "tensorrt"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert re.search(
        r"warning: timing cache '.*' was made on another GPU or TensorRT version; starting a fresh one", text
    )
    assert trt.state.cache_refused and b"other-gpu" not in stale.read_bytes()


def test_readme_table_lists_every_scenario() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## When things go wrong", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `([a-z0-9-]+)` \|", table, re.MULTILINE))
    extra = {"disk-full", "tensorrt-cannot-start-cuda", "tensorrt-timing-cache-other-gpu"}
    extra |= {"openvino-not-installed", "openvino-cannot-read-graph"}  # tests/test_openvino.py
    assert rows == {s.id for s in SCENARIOS} | extra | set(PLAN_CASES)
