"""DESIGN §2: ``runtime`` never imports torch. Checked in fresh interpreters."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import BLOCK_TORCH

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_importing_runtime_does_not_import_torch() -> None:
    result = run_python(
        """
        import sys
        import runtime, runtime.limits, runtime.errors, runtime.graphs, runtime.manifest, runtime.pipeline
        import runtime.plan, runtime.noise, runtime.stage_constants, runtime.request, runtime.cli
        assert runtime.noise.draw is not None
        loaded = sorted(name for name in sys.modules if name == "torch" or name.startswith("torch."))
        print("TORCH_MODULES", loaded)
        print("DIFFUSERS_MODULES", sorted(name for name in sys.modules if name.split(".")[0] == "diffusers"))
        """
    )
    assert result.returncode == 0, result.stderr
    assert "TORCH_MODULES []" in result.stdout, result.stdout
    assert "DIFFUSERS_MODULES []" in result.stdout, result.stdout  # the decoder is a graph, the VAE stays behind


def test_check_detects_torch_when_it_is_imported() -> None:
    # the probe above can fail: the same probe after importing the torch side reports torch
    result = run_python(
        """
        import sys
        import runtime, ecar_export.families.ecar.model
        print("TORCH_MODULES", "torch" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "TORCH_MODULES True" in result.stdout, result.stdout


def test_runtime_works_with_torch_blocked() -> None:
    result = run_python(
        BLOCK_TORCH
        + textwrap.dedent(
            """
        import numpy as np
        from runtime import noise

        drawn = noise.draw([1, 4, 16], 4, noise.noise_keys(7, 2))
        assert [n.shape for n in drawn] == [(2, 1, 4), (2, 4, 4), (2, 16, 4)], [n.shape for n in drawn]
        assert all(n.dtype == np.float32 for n in drawn)
        assert float(np.std(drawn[2])) > 0.5
        print("RUNTIME_OK")
        """
        )
    )
    assert result.returncode == 0, result.stderr
    assert "RUNTIME_OK" in result.stdout, result.stdout


def test_pipeline_is_importable_from_the_package_root_without_torch() -> None:
    """DESIGN §5's entry point: `from runtime import Pipeline`, still torch-free."""
    result = run_python(
        """
        import sys
        from runtime import Pipeline
        from runtime.pipeline import Pipeline as Direct
        assert Pipeline is Direct
        print("TORCH", "torch" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "TORCH False" in result.stdout, result.stdout


def test_runtime_imports_neither_ray_nor_its_web_stack() -> None:
    # serving is an optional extra: only `runtime.serving.ray_app` may import Ray
    result = run_python(
        """
        import sys
        import runtime, runtime.pipeline, runtime.cli, runtime.serving.requests
        from runtime import Pipeline
        loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("ray", "fastapi", "starlette"))
        print("SERVE_MODULES", loaded)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "SERVE_MODULES []" in result.stdout, result.stdout
