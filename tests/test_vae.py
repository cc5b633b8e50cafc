"""The ``kl`` tokenizer (diffusers' AutoencoderKL): published VAE weights in, decoder graphs against diffusers.

Two reduced layouts keep the default suite fast while keeping each network's shape: ``KL16`` is MAR's
KL-16 (16 latent channels, attention in the encoder's last level, a mid-block attention) and ``F8`` is
Stable Diffusion's kl-f8 (4 latent channels, one level more, no encoder attention), both with narrow
channels. Weights are random and non-zero, fresh per run (ECAR_TEST_SEED reproduces one).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from conftest import build_model, make_perturbed_model, make_tiny_config
from safetensors.torch import save_file
from typer.testing import CliRunner

from ecar_export import checkpoint
from ecar_export.cli import app as export_app
from ecar_export.families.ecar import contract as ecar_contract
from ecar_export.families.ecar.config import ECARConfig
from ecar_export.families.ecar.model import ECAR
from ecar_export.tokenizer import autoencoder_kl_config
from runtime import manifest as manifest_io
from runtime import plan as plan_module
from runtime.graphs import Kind
from runtime.images import to_uint8
from runtime.pipeline import Pipeline

SEED = int(os.environ.get("ECAR_TEST_SEED", secrets.randbelow(2**31)))
ATOL = 1e-4  # max |diff| <= ATOL * max(1, max |ref|), float32
KL16 = {
    "image_size": 32,
    "image_channels": 3,
    "latent_size": 8,
    "latent_channels": 16,
    "scales": (1, 4, 8),
    "tokenizer": "kl",
    "tokenizer_channels": (16, 16, 32),
    "tokenizer_layers": 1,
    "tokenizer_groups": 8,
    "tokenizer_attention": (8,),
    "latent_scale": 0.2325,
    "image_output": "signed",
}
F8 = {
    **KL16,
    "latent_size": 4,
    "latent_channels": 4,
    "scales": (1, 2, 4),
    "tokenizer_channels": (16, 16, 32, 32),
    "tokenizer_attention": (),
    "latent_scale": 0.18215,
    "latent_shift": 0.1,
}


def kl_config(layout: dict[str, Any], **changes: Any) -> ECARConfig:
    return make_tiny_config(**{**layout, **changes})


# ------------------------------------------------------------------ an LDM / MAR checkpoint, made here
def ldm_shapes(config: ECARConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an LDM autoencoder (MAR's models/vae.py naming) of the config's layout."""
    channels, layers, z = config.tokenizer_channels, config.tokenizer_layers, config.latent_channels
    shapes: dict[str, tuple[int, ...]] = {}

    def resnet(prefix: str, cin: int, cout: int) -> None:
        shapes.update({f"{prefix}.norm1.weight": (cin,), f"{prefix}.norm1.bias": (cin,)})
        shapes.update({f"{prefix}.conv1.weight": (cout, cin, 3, 3), f"{prefix}.conv1.bias": (cout,)})
        shapes.update({f"{prefix}.norm2.weight": (cout,), f"{prefix}.norm2.bias": (cout,)})
        shapes.update({f"{prefix}.conv2.weight": (cout, cout, 3, 3), f"{prefix}.conv2.bias": (cout,)})
        if cin != cout:
            shapes.update({f"{prefix}.nin_shortcut.weight": (cout, cin, 1, 1), f"{prefix}.nin_shortcut.bias": (cout,)})

    def attention(prefix: str, c: int) -> None:
        shapes.update({f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,)})
        for name in ("q", "k", "v", "proj_out"):
            shapes.update({f"{prefix}.{name}.weight": (c, c, 1, 1), f"{prefix}.{name}.bias": (c,)})

    def middle(part: str, c: int) -> None:
        resnet(f"{part}.mid.block_1", c, c)
        attention(f"{part}.mid.attn_1", c)
        resnet(f"{part}.mid.block_2", c, c)
        shapes.update({f"{part}.norm_out.weight": (c,), f"{part}.norm_out.bias": (c,)})

    image = config.image_channels
    shapes.update({"encoder.conv_in.weight": (channels[0], image, 3, 3), "encoder.conv_in.bias": (channels[0],)})
    block_in = channels[0]
    for level, cout in enumerate(channels):
        for j in range(layers):
            resnet(f"encoder.down.{level}.block.{j}", block_in, cout)
            block_in = cout
            if config.image_size >> level in config.tokenizer_attention:
                attention(f"encoder.down.{level}.attn.{j}", cout)
        if level != len(channels) - 1:
            conv = f"encoder.down.{level}.downsample.conv"
            shapes.update({f"{conv}.weight": (cout, cout, 3, 3), f"{conv}.bias": (cout,)})
    middle("encoder", block_in)
    shapes.update({"encoder.conv_out.weight": (2 * z, block_in, 3, 3), "encoder.conv_out.bias": (2 * z,)})
    shapes.update({"quant_conv.weight": (2 * z, 2 * z, 1, 1), "quant_conv.bias": (2 * z,)})
    shapes.update({"post_quant_conv.weight": (z, z, 1, 1), "post_quant_conv.bias": (z,)})
    block_in = channels[-1]
    shapes.update({"decoder.conv_in.weight": (block_in, z, 3, 3), "decoder.conv_in.bias": (block_in,)})
    middle("decoder", block_in)
    for level in reversed(range(len(channels))):
        for j in range(layers + 1):
            resnet(f"decoder.up.{level}.block.{j}", block_in, channels[level])
            block_in = channels[level]
        if level:
            conv = f"decoder.up.{level}.upsample.conv"
            shapes.update({f"{conv}.weight": (block_in, block_in, 3, 3), f"{conv}.bias": (block_in,)})
    shapes.update({"decoder.norm_out.weight": (block_in,), "decoder.norm_out.bias": (block_in,)})
    shapes.update({"decoder.conv_out.weight": (image, block_in, 3, 3), "decoder.conv_out.bias": (image,)})
    return shapes


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Non-zero random weights: norms' scales near 1, convolutions scaled by their fan-in."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        values = torch.randn(shape, generator=generator)
        if "norm" in name and name.endswith(".weight"):
            values = 1.0 + 0.2 * values
        elif name.endswith(".bias"):
            values = 0.1 * values
        else:
            values = values / np.sqrt(np.prod(shape[1:]))
        tensors[name] = values
    return tensors


def backbone_file(config: ECARConfig, path: Path, seed: int) -> Path:
    """A backbone checkpoint: an ECAR checkpoint's tensors without the tokenizer's, and its config."""
    torch.manual_seed(seed)
    model = ECAR(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.startswith("tokenizer."):
                param.add_(0.1 * torch.randn_like(param))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("tokenizer.")}
    metadata = {"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION, "config": config.to_json()}
    save_file(state, str(path), metadata=metadata)
    return path


def diffusers_vae(config: ECARConfig, seed: int) -> Any:
    """diffusers' own AutoencoderKL of the layout, with random non-zero weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**autoencoder_kl_config(config)).eval()
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    return vae


def diffusers_image(vae: Any, config: ECARConfig, tokens: np.ndarray) -> np.ndarray:
    """What a diffusers user computes from model tokens: decode(z / scaling_factor + shift), then (x + 1) / 2."""
    side = config.latent_size
    z = torch.from_numpy(tokens).transpose(1, 2).reshape(-1, config.latent_channels, side, side)
    z = z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    with torch.no_grad():
        raw = vae.decode(z).sample
    return torch.clamp((raw + 1) / 2, 0, 1).numpy()


def convert(*argv: str) -> Any:
    return CliRunner().invoke(export_app, ["convert", *argv])


def decoder_outputs(engines: Path, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """The build's decoder graph on ONNX Runtime and on OpenVINO."""
    manifest = manifest_io.load(engines)
    graph = str(engines / manifest.graphs[Kind.DECODER].file)
    import onnxruntime as ort

    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    outputs = {"onnxruntime": session.run(None, {"x": tokens})[0]}
    try:
        import openvino as ov
    except ImportError:
        return outputs
    core = ov.Core()
    compiled = core.compile_model(core.read_model(graph), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    outputs["openvino"] = compiled({"x": tokens})[0]
    return outputs


def assert_close(found: np.ndarray, ref: np.ndarray, what: str) -> None:
    bound = ATOL * max(1.0, float(np.abs(ref).max()))
    error = float(np.abs(found - ref).max())
    assert error <= bound, f"{what}: max |diff| {error:.3g} > {bound:.3g} (seed {SEED})"


# ------------------------------------------------------------------ the three ways in
@pytest.fixture(scope="module")
def kl16_converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """MAR's path: a backbone checkpoint and a kl16.ckpt-style {'model': state_dict} file, converted and built."""
    tmp = tmp_path_factory.mktemp("kl16")
    config = kl_config(KL16)
    ldm = random_weights(ldm_shapes(config), SEED)
    ckpt = tmp / "kl16.ckpt"
    torch.save({"model": {**ldm, "loss.logvar": torch.zeros(())}, "epoch": 3}, ckpt)
    backbone = backbone_file(config, tmp / "backbone.safetensors", SEED + 1)
    out = tmp / "ecar-kl16.safetensors"
    result = convert("--backbone", str(backbone), "--vae", str(ckpt), "--out", str(out))
    assert result.exit_code == 0, result.output
    engines = tmp / "engines"
    build_model(out, engines, max_batch=3, backend="onnxruntime")
    return {"config": config, "ldm": ldm, "ckpt": ckpt, "backbone": backbone, "out": out, "engines": engines}


@pytest.fixture(scope="module")
def f8_converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The diffusers path: an AutoencoderKL saved with save_pretrained (config.json + safetensors)."""
    tmp = tmp_path_factory.mktemp("f8")
    config = kl_config(F8)
    vae = diffusers_vae(config, SEED + 2)
    vae.save_pretrained(tmp / "vae")
    backbone = backbone_file(config, tmp / "backbone.safetensors", SEED + 3)
    out = tmp / "ecar-f8.safetensors"
    result = convert("--backbone", str(backbone), "--vae", str(tmp / "vae"), "--out", str(out))
    assert result.exit_code == 0, result.output
    engines = tmp / "engines"
    build_model(out, engines, max_batch=3, backend="onnxruntime")
    return {"config": config, "vae": vae, "out": out, "engines": engines}


def test_ldm_checkpoint_converts_to_what_diffusers_own_conversion_loads(kl16_converted: dict[str, Any]) -> None:
    """The decoder of the converted checkpoint equals diffusers' AutoencoderKL after diffusers' own LDM conversion
    (convert_ldm_vae_checkpoint), and the encoder's level attention (which that function skips) loads too."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = kl16_converted["config"]
    model = checkpoint.load(kl16_converted["out"])  # strict: every tensor of the layout, encoder included
    reference = AutoencoderKL(**autoencoder_kl_config(config)).eval()
    converted = convert_ldm_vae_checkpoint(dict(kl16_converted["ldm"]), reference.config)
    reference.load_state_dict({k: v for k, v in converted.items() if k.startswith(("decoder.", "post_quant"))}, False)
    tokens = np.random.default_rng(SEED).standard_normal((2, config.latent_size**2, config.latent_channels))
    tokens = tokens.astype(np.float32)
    with torch.no_grad():
        ours = model.decode_tokens(torch.from_numpy(tokens)).numpy()
    assert_close(ours, diffusers_image(reference, config, tokens), "converted decoder vs diffusers")
    attention = model.state_dict()["tokenizer.vae.encoder.down_blocks.2.attentions.0.to_q.weight"]
    assert torch.equal(attention, kl16_converted["ldm"]["encoder.down.2.attn.0.q.weight"][:, :, 0, 0])


@pytest.mark.parametrize("way", ["kl16_converted", "f8_converted"])
def test_decoder_graph_matches_diffusers_decode_on_both_engines(way: str, request: pytest.FixtureRequest) -> None:
    setup = request.getfixturevalue(way)
    config = setup["config"]
    if "vae" in setup:
        vae = setup["vae"]
    else:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL(**autoencoder_kl_config(config)).eval()
        state = checkpoint.load(setup["out"]).state_dict()
        vae.load_state_dict({k[len("tokenizer.vae.") :]: v for k, v in state.items() if k.startswith("tokenizer.")})
    rng = np.random.default_rng(SEED)
    tokens = rng.standard_normal((3, config.latent_size**2, config.latent_channels)).astype(np.float32)
    reference = diffusers_image(vae, config, tokens)
    assert 0.05 < float(reference.std())  # a real image, not a saturated one
    for engine, image in decoder_outputs(setup["engines"], tokens).items():
        assert_close(image, reference, f"{way} decoder on {engine}")


@pytest.mark.parametrize("way", ["kl16_converted", "f8_converted"])
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_whole_request_matches_the_torch_reference(way: str, backend: str, request: pytest.FixtureRequest) -> None:
    if backend == "openvino":
        pytest.importorskip("openvino")
    setup = request.getfixturevalue(way)
    model = checkpoint.load(setup["out"])
    rng = np.random.default_rng(SEED)
    labels, seed = rng.integers(0, model.config.num_classes, size=3).tolist(), int(rng.integers(0, 2**62))
    result = Pipeline.from_dir(setup["engines"], backend=backend).generate(labels=labels, seed=seed)
    reference = model.sample(labels, seed=seed)
    assert np.abs(result.latents - reference.latents.numpy()).max() <= 1e-4
    pixels = to_uint8(reference.images.numpy())
    assert np.mean(np.abs(result.images.astype(int) - pixels.astype(int)) <= 1) >= 0.999


# ------------------------------------------------------------------ refusals
def _convert_error(tmp: Path, backbone: Path, vae: Path) -> str:
    out = tmp / "never.safetensors"
    result = convert("--backbone", str(backbone), "--vae", str(vae), "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not list(tmp.glob(".never*")), "a refused conversion leaves no file"
    return " ".join(result.output.split())


def test_wrong_vae_tensors_are_refused_by_name(kl16_converted: dict[str, Any], tmp_path: Path) -> None:
    ldm, backbone = kl16_converted["ldm"], kl16_converted["backbone"]
    cases = {
        "shape": ({"decoder.up.1.block.0.conv1.weight": torch.ones(16, 16, 3, 3)}, None),
        "missing": ({}, "decoder.mid.attn_1.q.bias"),
        "dtype": ({"decoder.conv_out.bias": torch.ones(3, dtype=torch.int64)}, None),
    }
    messages = {}
    for case, (changes, drop) in cases.items():
        state = {**ldm, **changes}
        state.pop(drop or "", None)
        torch.save({"model": state}, tmp_path / f"{case}.ckpt")
        messages[case] = _convert_error(tmp_path, backbone, tmp_path / f"{case}.ckpt")
    assert "VAE tensor 'decoder.up_blocks.1.resnets.0.conv1.weight' has shape (16, 16, 3, 3)" in messages["shape"]
    assert "the model's config needs (16, 32, 3, 3)" in messages["shape"]
    assert "lacks VAE tensor 'decoder.mid_block.attentions.0.to_q.bias'" in messages["missing"]
    assert "'decoder.conv_out.bias' is torch.int64" in messages["dtype"]


def test_a_vae_of_another_latent_grid_is_refused(kl16_converted: dict[str, Any], tmp_path: Path) -> None:
    f8 = random_weights(ldm_shapes(kl_config(F8)), SEED)
    save_file(f8, str(tmp_path / "kl-f8.safetensors"))
    message = _convert_error(tmp_path, kl16_converted["backbone"], tmp_path / "kl-f8.safetensors")
    assert "the VAE's layout does not match the model's latent grid" in message
    assert "4-channel latents at factor 8" in message and "16-channel latents at factor 4" in message


def test_pickles_need_the_conversion_command(kl16_converted: dict[str, Any], tmp_path: Path) -> None:
    """`build` keeps refusing pickles; a pickle holding objects is refused by convert too (weights_only)."""
    result = CliRunner().invoke(
        export_app, ["build", "--checkpoint", str(kl16_converted["ckpt"]), "--out", str(tmp_path / "e")]
    )
    assert result.exit_code == 2 and "never loaded" in " ".join(result.output.split())
    torch.save({"model": kl16_converted["ldm"], "args": Path("not/a/tensor")}, tmp_path / "objects.ckpt")
    message = _convert_error(tmp_path, kl16_converted["backbone"], tmp_path / "objects.ckpt")
    assert "weights_only=True" in message


# ------------------------------------------------------------------ fp16
def test_fp16_recipe_keeps_groupnorm_statistics_in_float32(kl16_converted: dict[str, Any]) -> None:
    """With large latents a group's mean square passes float16's range (65504): the naive conversion (every node
    float16) and the recipe without its statistics island compute inf there and a wrong image; the recipe stays
    finite and within cosine 0.999 of fp32. Evaluated with onnx's reference evaluator, which computes every node
    in its declared type as a strongly typed engine does (ONNX Runtime's CPU provider upcasts float16 math)."""
    from onnx.reference import ReferenceEvaluator

    from ecar_export.precision import fp16

    manifest = manifest_io.load(kl16_converted["engines"])
    fp32 = onnx.load(str(kl16_converted["engines"] / manifest.graphs[Kind.DECODER].file))
    config = kl16_converted["config"]
    rng = np.random.default_rng(SEED)
    tokens = (60.0 + 5.0 * rng.standard_normal((1, config.latent_size**2, config.latent_channels))).astype(np.float32)
    reference = ReferenceEvaluator(fp32).run(None, {"x": tokens})[0]

    def run(parts: tuple[str, ...]) -> tuple[np.ndarray, bool]:
        model = onnx.ModelProto()
        model.CopyFrom(fp32)
        evaluator = ReferenceEvaluator(fp16.convert(model, parts))
        with np.errstate(over="ignore", invalid="ignore"):
            values = evaluator.run(None, {"x": tokens}, intermediate=True)
        finite = all(np.isfinite(v).all() for v in values.values() if isinstance(v, np.ndarray) and v.dtype.kind == "f")
        return values["image"], finite

    def cosine(image: np.ndarray) -> float:
        a, b = image.ravel().astype(np.float64), reference.ravel().astype(np.float64)
        return float(a @ b / np.sqrt((a @ a) * (b @ b)))

    def wrong(image: np.ndarray) -> bool:
        return not np.isfinite(image).all() or cosine(image) < 0.99

    naive, naive_finite = run(())
    without, without_finite = run(tuple(p for p in fp16.PARTS if p != "statistics"))
    recipe, recipe_finite = run(fp16.PARTS)
    assert not naive_finite and not without_finite, "float16 GroupNorm statistics should overflow on this input"
    assert wrong(naive) and wrong(without)
    assert recipe_finite and np.isfinite(recipe).all()
    assert cosine(recipe) >= 0.999


# ------------------------------------------------------------------ memory
def test_pipeline_decodes_in_sub_batches_with_the_same_images(
    kl16_converted: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    built = Pipeline.from_dir(kl16_converted["engines"], backend="onnxruntime")
    # the build wrote the formula's value into its plan
    assert built.manifest.plan.decoder_batch == ecar_contract.decoder_batch(kl16_converted["config"])
    whole = built.generate(labels=[1, 2, 3], seed=SEED)
    monkeypatch.setattr(plan_module, "DECODER_ACTIVATION_BYTES", 1)  # one image per decoder call
    assert ecar_contract.decoder_batch(kl16_converted["config"]) == 1
    plan = dataclasses.replace(built.manifest.plan, decoder_batch=1)  # a build made under that limit
    pipe = Pipeline(dataclasses.replace(built.manifest, plan=plan), built.backend)
    batches: list[int] = []
    run = pipe.backend.run

    def counting(call: Any, feeds: dict[str, np.ndarray]) -> Any:
        if call.graph == Kind.DECODER:
            batches.append(len(feeds["x"]))
        return run(call, feeds)

    monkeypatch.setattr(pipe.backend, "run", counting)
    split = pipe.generate(labels=[1, 2, 3], seed=SEED)
    assert batches == [1, 1, 1]
    assert np.array_equal(split.images, whole.images)


def test_inspect_shows_the_decoders_share_of_a_request(kl16_converted: dict[str, Any]) -> None:
    from ecar_export import inspect_report

    rows = inspect_report.inspect_rows(kl16_converted["engines"])
    assert abs(sum(row["request_share"] for row in rows) - 1.0) < 1e-9
    (decoder,) = [row for row in rows if row["name"] == "decoder"]
    assert decoder["calls"] == 1 and 0.0 < decoder["request_share"] < 1.0
    result = CliRunner().invoke(export_app, ["inspect", "--engine-dir", str(kl16_converted["engines"])])
    assert result.exit_code == 0, result.output
    assert f"decoder {100 * decoder['request_share']:.1f} %" in result.output


# ------------------------------------------------------------------ paper scale (pytest -m slow)
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["ecar-b", "ecar-b-f8"])
def test_paper_scale_preset_builds_and_runs_on_both_engines(preset: str, tmp_path: Path) -> None:
    """The full-size VAE (KL-16: 38 M decoder parameters, 250 GFLOP per image) through `ecar-export build`:
    the preset's architecture with every weight perturbed (no zero-initialised gates, so the backbone and
    head contribute), saved as a checkpoint and built; one request on each engine against the torch
    reference. Minutes on two cores."""
    from ecar_export import presets

    model = make_perturbed_model(presets.architecture(preset), seed=SEED, scale=0.02)
    path = checkpoint.save(model, tmp_path / "model.safetensors")
    result = CliRunner().invoke(
        export_app,
        ["build", "--checkpoint", str(path), "--out", str(tmp_path / "e"), "--max-batch", "1", "--backend", "openvino"],
    )
    assert result.exit_code == 0, result.output
    reference = model.sample([207], seed=SEED)
    for backend in ("onnxruntime", "openvino"):
        if backend == "openvino":
            pytest.importorskip("openvino")
        out = Pipeline.from_dir(tmp_path / "e", backend=backend).generate(labels=[207], seed=SEED)
        ref = reference.latents.numpy()
        assert np.abs(out.latents - ref).max() <= 1e-3 * max(1.0, float(np.abs(ref).max())), backend
        pixels = to_uint8(reference.images.numpy()).astype(int)
        assert np.mean(np.abs(out.images.astype(int) - pixels) <= 1) >= 0.999, backend
