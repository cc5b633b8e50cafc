"""Shared fixtures: tiny model configs and deterministically perturbed models.

Everything here is sized to run in milliseconds on a CPU: tests build many models.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import threading
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ecar_export.families.ecar.config import ECARConfig
from runtime.graphs import Call, Kind

# Tests share the machine with other work; one intra-op thread keeps runs light and deterministic.
torch.set_num_threads(1)

# Prefix for code run in a fresh interpreter where importing torch must fail.
BLOCK_TORCH = """
import importlib.abc
import sys


class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test ({name})")
        return None


sys.meta_path.insert(0, BlockTorch())
sys.modules["torch"] = None  # any `import torch` now raises ImportError
try:
    import torch  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("the torch block does not work")
"""

TINY_DEFAULTS: dict[str, Any] = {
    "name": "tiny",
    "image_size": 8,
    "image_channels": 1,
    "latent_size": 4,
    "latent_channels": 4,
    "tokenizer_width": 8,
    "scales": (1, 2, 4),
    "width": 32,
    "depth": 2,
    "heads": 2,
    "mlp_ratio": 2.0,
    "head_width": 32,
    "head_depth": 1,
    "num_classes": 10,
    "cfg_scale": 2.0,
}


def make_tiny_config(**overrides: Any) -> ECARConfig:
    """A small valid :class:`ECARConfig`; ``steps`` defaults to two Euler steps per stage."""
    values = {**TINY_DEFAULTS, **overrides}
    values.setdefault("steps", (2,) * len(values["scales"]))
    return ECARConfig(**values)


def make_perturbed_model(config: ECARConfig, seed: int = 0, scale: float = 0.1) -> Any:
    """An ECAR model built under ``torch.manual_seed(seed)`` with every parameter perturbed.

    Fresh models have zero-initialised AdaLN gates and output layers (their flow head
    predicts u = 0), which would make sampler comparisons vacuous; the perturbation
    makes every sub-network contribute. Returned in eval mode.
    """
    from ecar_export.families.ecar.model import ECAR

    torch.manual_seed(seed)
    model = ECAR(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * scale)
    return model.eval()


@pytest.fixture
def tiny_config() -> Callable[..., ECARConfig]:
    return make_tiny_config


@pytest.fixture
def perturbed_model() -> Callable[..., Any]:
    return make_perturbed_model


# --------------------------------------------------------------------------------------------
# Engine builds shared by the export / runtime tests (test_pipeline_parity, test_check).
#
# Builds cost seconds each, so every (config, max_batch, fuse) is built once per session and
# shared read-only; tests that modify a build copy its directory first.
# --------------------------------------------------------------------------------------------

# Random-init configs that differ in stage count, scale factors (2 and 3), widths, heads,
# latent channels, image channels, class counts, steps, windows and guidance schedules.
ENGINE_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-1-2-4": {},
    "rgb-1-3-6-linear-cfg": {
        "name": "rgb-1-3-6",
        "image_size": 12,
        "image_channels": 3,
        "latent_size": 6,
        "latent_channels": 3,
        "scales": (1, 3, 6),
        "steps": (1, 2, 3),
        "width": 48,
        "heads": 4,
        "depth": 1,
        "head_width": 24,
        "head_depth": 2,
        "num_classes": 7,
        "cfg_scale": 3.0,
        "cfg_schedule": "linear",
    },
    "two-stage-2-6": {
        "name": "two-stage-2-6",
        "image_size": 12,
        "latent_size": 6,
        "latent_channels": 2,
        "scales": (2, 6),
        "window_bounds": (1.0, 0.4, 0.0),
        "steps": (3, 2),
        "width": 24,
        "heads": 3,
        "depth": 3,
        "mlp_ratio": 3.0,
        "head_width": 16,
        "num_classes": 5,
    },
    "single-stage": {
        "name": "single-stage",
        "latent_channels": 5,
        "scales": (4,),
        "steps": (3,),
        "width": 16,
        "heads": 1,
        "depth": 1,
        "num_classes": 3,
        "cfg_scale": 1.5,
    },
}
TINY_MAX_BATCH = 5
DEMO_MAX_BATCH = 8


def demo_checkpoint_present() -> bool:
    from ecar_export import presets

    return presets.checkpoint_path(presets.DEMO).is_file()


needs_demo = pytest.mark.skipif(not demo_checkpoint_present(), reason="bundled checkpoint missing")


@dataclass
class Build:
    """One built engine directory and the torch model it was built from."""

    key: str
    model: Any
    dir: Path
    max_batch: int
    fuse_flow_loop: bool
    precision: str = "fp32"


def engine_model(key: str) -> Any:
    """The torch model of an engine config key ("demo" is the bundled trained checkpoint)."""
    if key == "demo":
        from ecar_export import presets

        return presets.load(presets.DEMO).eval()
    seed = sorted(ENGINE_CONFIGS).index(key) + 1
    return make_perturbed_model(make_tiny_config(**ENGINE_CONFIGS[key]), seed=seed)


def build_model(model: Any, out: Path, **options: Any) -> Path:
    """``build_engines`` that also asserts the build leaves torch's global grad mode as it found it."""
    from ecar_export.build import build_engines

    grad = torch.is_grad_enabled()
    path = build_engines(model, out, **options)
    assert torch.is_grad_enabled() == grad, "build_engines changed torch's grad mode"
    return path


# The CPU backend `backend="auto"` must pick here: OpenVINO where it is installed (the Makefile installs it;
# it was the faster CPU backend at every precision on ecar-b, README "Benchmarks"), else ONNX Runtime. Written out here
# rather than asked of runtime.backends.selection, so that a wrong choice there fails the tests.
AUTO_CPU_BACKEND = "openvino" if importlib.util.find_spec("openvino") is not None else "onnxruntime"


def run_concurrently(call: Callable[[int], Any], jobs: int, threads: int = 8, timeout: float = 300) -> dict[int, Any]:
    """``call(index)`` for every job index, spread over ``threads`` threads that start together (a barrier);
    the results by index. An exception in any thread fails the test, in the test's thread."""
    results: dict[int, Any] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def worker(first: int) -> None:
        try:
            barrier.wait()
            for index in range(first, jobs, threads):
                results[index] = call(index)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(first,)) for first in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=timeout)
    assert not errors, errors
    assert sorted(results) == list(range(jobs)), "a thread did not finish its jobs"
    return results


class BuildCache:
    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self.factory = factory
        self.builds: dict[tuple[str, bool, str], Build] = {}
        self.models: dict[str, Any] = {}

    def model(self, key: str) -> Any:
        if key not in self.models:
            self.models[key] = engine_model(key)
        return self.models[key]

    def get(self, key: str, fuse_flow_loop: bool = False, precision: str = "fp32") -> Build:
        """The build of ``key`` (max batch 8 for the demo, 5 for tiny configs), made on first use."""
        if (key, fuse_flow_loop, precision) not in self.builds:
            model = self.model(key)
            max_batch = DEMO_MAX_BATCH if key == "demo" else TINY_MAX_BATCH
            out = self.factory.mktemp(f"engines-{key}{'-fused' if fuse_flow_loop else ''}-{precision}")
            build_model(model, out, max_batch=max_batch, fuse_flow_loop=fuse_flow_loop, precision=precision)
            self.builds[key, fuse_flow_loop, precision] = Build(key, model, out, max_batch, fuse_flow_loop, precision)
        return self.builds[key, fuse_flow_loop, precision]


@pytest.fixture(scope="session")
def build_cache(tmp_path_factory: pytest.TempPathFactory) -> BuildCache:
    return BuildCache(tmp_path_factory)


# --------------------------------------------------------------------------------------------
# Fresh randomness: a new base seed every session (ECAR_TEST_SEED=... reproduces a run), one
# generator per test derived from it and the test's id.
# --------------------------------------------------------------------------------------------
SESSION_SEED = int(os.environ.get("ECAR_TEST_SEED") or secrets.randbits(32))


def pytest_report_header(config: pytest.Config) -> str:
    return f"random test inputs: ECAR_TEST_SEED={SESSION_SEED}"


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    return np.random.default_rng([SESSION_SEED, zlib.crc32(request.node.nodeid.encode())])


class BatchRecorder:
    """A backend wrapped to record the batch of every call it runs, by graph, with its own ``activation_budget``
    (the budget the Pipeline cuts calls by: runtime.sub_batches)."""

    def __init__(self, backend: Any, budget: int | None) -> None:
        self.inner, self.name, self.activation_budget = backend, backend.name, budget
        self.batches: dict[str, list[int]] = {}
        self.calls: list[tuple[str, int, int]] = []  # (graph, stage, samples) of every call, in order

    def run(self, call: Call, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        samples = feeds["labels"] if call.graph == Kind.BACKBONE else feeds["x"]  # every other kind's x is [B, ...]
        self.batches.setdefault(str(call.graph), []).append(len(samples))
        self.calls.append((str(call.graph), call.stage, len(samples)))
        return list(self.inner.run(call, feeds))

    def describe(self) -> dict[str, object]:
        return dict(self.inner.describe())
