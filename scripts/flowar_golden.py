"""Golden fixtures and parity numbers for ecar_export.families.flowar, from the authors' FlowAR code.

The authors' code is not part of this repository: pass a checkout of it with ``--official DIR`` (the
directory holding ``models/flowar.py``). It runs unmodified on the CPU; this script only patches, at
run time:

* ``torchvision``: timm imports it at import time, but FlowAR uses only timm's SwiGLU and DropPath.
  An import hook serves empty placeholder modules instead (any use of one raises).
* ``torch.Tensor.cuda``: replaced by the identity, so the hard-coded ``.cuda()`` calls stay on the CPU.
* noise: ``sample_tokens`` draws each stage's noise with ``torch.randn``; the ``torch`` global of
  ``models/flowar.py`` (that module only) is swapped for a proxy whose ``randn`` hands out noise made
  here from a seeded generator, checking the requested shape.

Weights are the authors' constructor's (seeded), then made non-trivial: all-zero tensors (every
linear bias) are re-drawn, all-one tensors (RMSNorm weights) get jitter, the class and position
tables get N(0, 0.5).

Modes (run with an environment that has torch, timm and safetensors)::

    python scripts/flowar_golden.py --official DIR                 # writes tests/golden/flowar/
    python scripts/flowar_golden.py --official DIR --compare flowar-s --steps 25
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ecar_export.families.flowar import convert  # noqa: E402
from ecar_export.families.flowar.config import FLOWAR_TINY, FLOWAR_TINY_CROSS, PRESETS, FlowARConfig  # noqa: E402
from ecar_export.families.flowar.model import FlowAR  # noqa: E402
from ecar_export.families.flowar.sampler import noise_shapes, sample, time_grid  # noqa: E402

LABELS = (3, 207)
FIXTURES = {
    "tiny": (FLOWAR_TINY, "weights.safetensors", 1234),
    "cross": (FLOWAR_TINY_CROSS, "weights_cross.safetensors", 4321),
}
USE_CHECKPOINT = {"flowar-h", "flowar-tiny-cross"}  # the authors' H runs its blocks under torch.utils.checkpoint
HEAD_TIMES = (1.0, 0.9363636363636364, 0.3, 0.020833333333333332)  # grid points of the 25-step schedule


# ----------------------------------------------------------------------------- running the authors' code
class _Placeholders(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves empty modules for ``torchvision.*``; attributes are classes that raise when instantiated."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] == "torchvision":
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0"  # type: ignore[attr-defined]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


class _PlaceholderType(type):
    """Classes whose attributes (class-level ones too, like enum members) are further placeholders."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")


def _placeholder(where: str) -> type:
    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"{where} is a placeholder in this script")

    return _PlaceholderType(where.rsplit(".", 1)[-1], (), {"__init__": refuse, "__qualname__": where})


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _placeholder(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _NoiseProxy(types.ModuleType):
    """Stands in for ``torch`` inside the authors' flowar module: ``randn`` returns the next prepared tensor."""

    def __init__(self, noise: list[torch.Tensor]) -> None:
        super().__init__("torch")
        self._noise = list(noise)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def randn(self, *size: Any, **kwargs: Any) -> torch.Tensor:
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (list, tuple)) else tuple(size)
        if not self._noise or tuple(self._noise[0].shape) != tuple(int(s) for s in shape):
            raise RuntimeError(f"unexpected noise draw of shape {shape}")
        return self._noise.pop(0).clone()


def import_official(directory: Path) -> types.SimpleNamespace:
    sys.meta_path.insert(0, _Placeholders())
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    sys.path.insert(0, str(directory))
    import models.flowar as flowar_module  # type: ignore[import-not-found]
    import models.sampler as sampler_module  # type: ignore[import-not-found]

    return types.SimpleNamespace(flowar=flowar_module, sampler=sampler_module)


def build_official(official: types.SimpleNamespace, config: FlowARConfig, seed: int) -> Any:
    torch.manual_seed(seed)
    model = official.flowar.FlowAR(
        img_size=config.image_size, vae_stride=config.vae_stride, patch_size=1, vae_embed_dim=config.token_dim,
        encoder_embed_dim=config.width, encoder_depth=config.encoder_depth, encoder_num_heads=config.heads,
        decoder_embed_dim=config.width, decoder_depth=config.decoder_depth, decoder_num_heads=config.heads,
        mlp_ratio=config.mlp_ratio, class_num=config.num_classes, attn_dropout=0.1, proj_dropout=0.1, buffer_size=0,
        diffloss_d=config.head_depth, diffloss_w=config.head_width, scale=config.scales, cross=config.cross,
        use_checkpoint=config.name in USE_CHECKPOINT,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "class_emb.weight" or "pos_embed" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
            elif bool((p == 0).all()):
                scale = p.shape[-1] ** -0.5 if p.dim() > 1 else 0.02
                p.copy_(scale * torch.randn(p.shape, generator=generator))
            elif bool((p == 1).all()):
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()  # eval() selects the authors' KV-cache inference path


def run_official(
    official: types.SimpleNamespace, model: Any, labels: torch.Tensor, noise: list[torch.Tensor],
    steps: int, cfg: float, guidance: float,
) -> dict[str, Any]:  # fmt: skip
    """``sample_tokens`` with injected noise, recording each stage's encoder input, z and Euler result."""
    record: dict[str, list[torch.Tensor]] = {"input": [], "z": [], "tokens": []}
    encoder, decoder, euler = model.forward_mae_encoder, model.forward_mae_decoder, official.sampler.euler_sampler

    def encoder_spy(x: torch.Tensor, *args: Any) -> torch.Tensor:
        record["input"].append(x.clone())
        return encoder(x, *args)

    def decoder_spy(x: torch.Tensor, *args: Any) -> torch.Tensor:
        z = decoder(x, *args)
        record["z"].append(z.clone())
        return z

    def euler_spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = euler(*args, **kwargs)
        record["tokens"].append(out.clone())
        return out

    model.forward_mae_encoder, model.forward_mae_decoder = encoder_spy, decoder_spy
    official.sampler.euler_sampler = euler_spy
    official.flowar.torch = _NoiseProxy(noise)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            latents = model.sample_tokens(num_steps=steps, guidance=guidance, cfg=cfg, labels=labels)
    finally:
        official.flowar.torch = torch
        official.sampler.euler_sampler = euler
        del model.forward_mae_encoder, model.forward_mae_decoder
    return dict(record, latents=latents, seconds=time.perf_counter() - start)


def make_noise(model: FlowAR, batch: int, cfg: float, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in noise_shapes(model, batch, cfg)]


def head_case(z: torch.Tensor, times: tuple[float, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A head input: conditional row 0 of ``z`` repeated per time, fresh x_t, float32 times."""
    rows = len(times)
    cond = z[:1].repeat(rows, 1, 1)
    x = torch.randn(rows, z.shape[1], 16, generator=torch.Generator().manual_seed(seed))
    return x, torch.tensor(times, dtype=torch.float64).float(), cond


# ----------------------------------------------------------------------------- modes
def write_fixtures(official: types.SimpleNamespace, out: Path) -> None:
    arrays: dict[str, Any] = {}
    labels = torch.tensor(LABELS)
    for tag, (config, weights_file, seed) in FIXTURES.items():
        reference = build_official(official, config, seed)
        state = convert.to_model_state(reference.state_dict(), config, "the authors' model")
        convert.save(state, config, out / weights_file)
        noise = make_noise(FlowAR(config, tokenizer=False), len(LABELS), config.cfg, seed + 2)
        run = run_official(official, reference, labels, noise, config.steps, config.cfg, config.guidance)
        print(f"{tag}: sample_tokens {run['seconds']:.2f}s")
        p = f"{tag}/"
        arrays[p + "config_json"] = np.array(config.to_json())
        arrays[p + "labels"] = labels.numpy()
        arrays[p + "time_grid"] = time_grid(config.steps).numpy()
        for k in range(config.num_stages):
            arrays[p + f"noise{k}"] = noise[k].numpy()
            arrays[p + f"input{k}"] = run["input"][k].numpy()
            arrays[p + f"z{k}"] = run["z"][k].numpy()
            arrays[p + f"tokens{k}"] = run["tokens"][k].numpy()  # float64, all rows
        arrays[p + "latents"] = run["latents"].numpy()
        for name, stage, times in (("head8", 3, HEAD_TIMES), ("head16", 4, (0.5, 0.75))):
            x, t, cond = head_case(run["z"][stage], times, seed + 3 + stage)
            with torch.no_grad():
                v = reference.flownet(x, t, cond)
            arrays[p + f"{name}_x"], arrays[p + f"{name}_t"] = x.numpy(), t.numpy()
            arrays[p + f"{name}_z"], arrays[p + f"{name}_v"] = cond.numpy(), v.numpy()
    np.savez_compressed(out / "io.npz", **arrays)
    print("wrote", out)


def max_diff(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    err = (got.double() - ref.double()).abs().max().item()
    return {"max_abs_diff": err, "max_abs_ref": ref.double().abs().max().item()}


def compare(official: types.SimpleNamespace, config: FlowARConfig, steps: int, seed: int) -> dict[str, Any]:
    """Parity of this package against the authors' code at ``config``, same random weights, batch 1."""
    reference = build_official(official, config, seed)
    model = FlowAR(config, tokenizer=False)
    model.load_state_dict(convert.to_model_state(reference.state_dict(), config), strict=True)
    model.eval()
    labels = torch.tensor([207])
    noise = make_noise(model, 1, config.cfg, seed + 2)
    run = run_official(official, reference, labels, noise, steps, config.cfg, config.guidance)
    start = time.perf_counter()
    ours = sample(model, labels, steps=steps, noise=noise)
    seconds = time.perf_counter() - start
    report: dict[str, Any] = {"config": config.name, "steps": steps, "cfg": config.cfg, "guidance": config.guidance}
    report["seconds"] = {"official": run["seconds"], "this_package": seconds}
    # backbone per stage, teacher-forced: the stage inputs come from the authors' sampled tokens
    with torch.no_grad():
        cond = model.class_embedding(torch.cat([labels, torch.full_like(labels, config.null_class)]))
        cache, x = None, cond[:, None]
        for k in range(config.num_stages):
            if k > 0:
                x = model.stage_input(run["tokens"][k - 1].float()[:1].repeat(2, 1, 1), k)
                report[f"stage_input{k}"] = max_diff(x, run["input"][k])
            z, cache = model(x, cond, k, cache)
            report[f"backbone_z{k}"] = max_diff(z, run["z"][k])
        x_t, t, zc = head_case(run["z"][4], (0.5, 0.75), seed + 7)
        report["head_velocity_16x16"] = max_diff(model.flownet(x_t, t, zc), reference.flownet(x_t, t, zc))
    report["latents"] = max_diff(ours.latents, run["latents"])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="checkout of the authors' FlowAR code")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "golden" / "flowar")
    parser.add_argument("--compare", choices=sorted(PRESETS), help="report parity at this config instead")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps for --compare (default: config's)")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    official = import_official(args.official.resolve())
    if args.compare:
        config = PRESETS[args.compare]
        print(json.dumps(compare(official, config, args.steps or config.steps, args.seed), indent=1))
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        write_fixtures(official, args.out)


if __name__ == "__main__":
    main()
