"""The distribution as users install it: wheel and sdist contents, the runtime alone, the console scripts.

The wheel and sdist are built once (``python -m build --no-isolation``). The embedded install
is what a service that only wants ``from runtime import Pipeline`` gets: a fresh virtual
environment with the runtime wheel and ``onnxruntime`` (pinned by constraints.txt, from the
package index) — no torch, no ONNX tooling — which then loads an engine directory this run
built, from a working directory outside the source tree.
"""

from __future__ import annotations

import email
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import tomllib
import venv
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import BuildCache
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from PIL import Image

from ecar_export import export
from ecar_export.cli import EXPORT_LAYER
from runtime import graphs
from runtime import manifest as manifest_io
from runtime.errors import ECARError
from runtime.pipeline import Pipeline
from runtime.version import MIN_RUNTIME_FOR_CONTRACT, __version__

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny-1-2-4"


def run(command: list[str | Path], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``command`` in ``cwd``; by default in this process's environment without PYTHONPATH, so a fresh
    environment imports what is installed in it, never the working tree a developer points PYTHONPATH at."""
    if env is None:
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False
    )


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The wheel and the sdist, built from the working tree."""
    out = tmp_path_factory.mktemp("dist")
    work = tmp_path_factory.mktemp("build-tree") / "src"
    # build from a copy: building writes build/ and *.egg-info into the tree it runs in
    skip = (".venv", ".git", "build", "*.egg-info", ".stubs", "benchmarks", "engines", "out", "__pycache__")
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(*skip))
    result = run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, work], cwd=work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_wheel_holds_the_three_packages_and_the_demo_weights_and_nothing_else(dist: dict[str, Path]) -> None:
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = wheel.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_string(wheel.read(info).decode())
        entry_points = wheel.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"runtime", "ecar_export", "calibration"}, tops
    assert "ecar_export/weights/ecar-digits.safetensors" in names
    assert "runtime/pipeline.py" in names and "runtime/backends/tensorrt/backend.py" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "scripts/")) or "/tests/" in n]
    assert metadata["Name"] == "ecar-export" and metadata["Version"] == __version__
    requires = metadata.get_all("Requires-Dist")
    core = sorted(re.match(r"[A-Za-z0-9_.-]+", r).group() for r in requires if "extra ==" not in r)  # type: ignore[union-attr]
    assert core == ["numpy", "packaging", "pillow", "rich", "typer"], (
        "the runtime layer depends on no engine and no torch"
    )
    assert set(metadata.get_all("Provides-Extra")) >= {"onnxruntime", "gpu", "tensorrt", "openvino", "serve", "export"}
    torch = [r for r in requires if r.startswith("torch")]
    assert len(torch) == 1 and 'extra == "export"' in torch[0]
    gpu = [r for r in requires if 'extra == "gpu"' in r]
    assert gpu and all("onnxruntime-gpu" in r for r in gpu), "the gpu extra must not also pull the CPU build"
    assert all(">=" in r for r in requires if "extra ==" not in r), "version ranges, not exact pins"
    assert "ecar-run = runtime.cli:main" in entry_points and "ecar-export = ecar_export.cli:main" in entry_points


def test_sdist_holds_the_sources_the_weights_and_the_pins(dist: dict[str, Path]) -> None:
    with tarfile.open(dist["sdist"]) as sdist:
        names = [name.split("/", 1)[1] for name in sdist.getnames() if "/" in name]
    assert {"pyproject.toml", "README.md", "constraints.txt", "ecar_export/weights/ecar-digits.safetensors"} <= set(
        names
    )
    assert "runtime/graphs.py" in names and "calibration/capture.py" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "scripts/", ".ci/"))]


@pytest.fixture(scope="module")
def runtime_env(dist: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the runtime wheel and the CPU ONNX Runtime only."""
    env_dir = tmp_path_factory.mktemp("embedded") / "venv"
    venv.create(env_dir, with_pip=True)
    pip = [env_dir / "bin" / "python", "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    result = run([*pip, "-c", ROOT / "constraints.txt", f"{dist['wheel']}[onnxruntime]"], cwd=env_dir.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return env_dir


def test_the_export_layer_names_every_distribution_of_the_export_extra() -> None:
    # EXPORT_LAYER (import names) is what `ecar-export` checks for and what the runtime-only install must lack
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["export"]
    wanted = {canonicalize_name(Requirement(line).name) for line in extra}
    provides = importlib.metadata.packages_distributions()
    found = {canonicalize_name(dist) for name in EXPORT_LAYER for dist in provides.get(name, [])}
    assert found == wanted, (sorted(wanted - found), sorted(found - wanted))


def test_the_embedded_runtime_has_no_torch_and_generates_what_the_full_install_does(
    runtime_env: Path, build_cache: BuildCache, tmp_path: Path
) -> None:
    python = runtime_env / "bin" / "python"
    for module in EXPORT_LAYER:
        probe = run([python, "-c", f"import {module}"], cwd=tmp_path)
        assert probe.returncode != 0, f"{module} is importable in the runtime-only environment"
    build = build_cache.get(TINY)
    code = textwrap.dedent(
        """
        import json, sys
        import numpy as np
        import runtime
        from runtime import Pipeline
        pipe = Pipeline.from_dir(sys.argv[1], backend="auto")
        result = pipe.generate([1, 2, 3], seed=7)
        np.save(sys.argv[2], result.images)
        print(json.dumps({"file": runtime.__file__, "version": runtime.__version__,
                          "backend": pipe.backend.name, "torch": "torch" in sys.modules}))
        """
    )
    images_path = tmp_path / "images.npy"
    result = run([python, "-c", code, build.dir, images_path], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert str(runtime_env) in report["file"] and str(ROOT) not in report["file"], "not the installed wheel"
    assert report == {**report, "version": __version__, "backend": "onnxruntime", "torch": False}
    expected = Pipeline.from_dir(build.dir, backend="onnxruntime", device="cpu").generate([1, 2, 3], seed=7).images
    np.testing.assert_array_equal(np.load(images_path), expected)
    # the console script of the installed wheel
    out = tmp_path / "out"
    cli = run([runtime_env / "bin" / "ecar-run", "--engine-dir", build.dir, "--labels", "1,2,3", "--seed", "7",
               "--out", out], cwd=tmp_path)  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert (out / "grid.png").is_file()
    singles = sorted(p for p in out.glob("*.png") if p.name != "grid.png")
    assert len(singles) == 3
    for index, path in enumerate(singles):
        np.testing.assert_array_equal(np.asarray(Image.open(path)).reshape(expected[index].shape), expected[index])


def test_ecar_export_without_the_export_layer_says_what_to_install(runtime_env: Path, tmp_path: Path) -> None:
    result = run([runtime_env / "bin" / "ecar-export", "build", "--out", tmp_path / "engines"], cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert "pip install torch==2.13.0" in message and "'ecar-export[export,onnxruntime]'" in message, message
    assert "torch" in message.split("missing:")[1]
    assert not (tmp_path / "engines").exists()
    helped = run([runtime_env / "bin" / "ecar-export", "--help"], cwd=tmp_path)
    assert helped.returncode == 0 and "build" in helped.stdout


def test_the_export_console_script_runs_from_the_installed_wheel(
    dist: dict[str, Path], build_cache: BuildCache, tmp_path: Path
) -> None:
    """``ecar-export`` from the wheel's files (next to this environment's export layer), outside the tree."""
    target = tmp_path / "site"
    result = run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, dist["wheel"]],
                 cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = run([sys.executable, "-c", "import ecar_export, runtime; print(ecar_export.__file__, runtime.__file__)"],
                cwd=tmp_path, env=env)  # fmt: skip
    assert where.stdout.count(str(target)) == 2, where.stdout + where.stderr
    inspect = run([target / "bin" / "ecar-export", "inspect", "--engine-dir", build_cache.get(TINY).dir, "--json"],
                  cwd=tmp_path, env=env)  # fmt: skip
    assert inspect.returncode == 0, inspect.stderr[-3000:]
    assert {row["name"] for row in json.loads(inspect.stdout)["graphs"]} == {"backbone", "flow_step", "decoder"}


def test_builds_need_the_runtime_of_their_graph_contract(build_cache: BuildCache) -> None:
    """Graph contract 3 (the plan and stage constants as build data) first loads in 0.4.0: a build says so, and
    this runtime is at least that."""
    document = json.loads((build_cache.get(TINY).dir / "manifest.json").read_text())
    assert document["runtime"] == {"min_version": MIN_RUNTIME_FOR_CONTRACT, "built_by": __version__}
    assert graphs.CONTRACT_VERSION == 3 and MIN_RUNTIME_FOR_CONTRACT == "0.4.0"
    assert Version(__version__) >= Version(MIN_RUNTIME_FOR_CONTRACT)
    assert document["export_version"] == export.EXPORT_VERSION == 4


def _next_minor(version: str) -> str:
    major, minor = (int(part) for part in version.split(".")[:2])
    return f"{major}.{minor + 1}.0"


# the next minor release (always newer than this runtime, whatever its version), a major and a pre-release
@pytest.mark.parametrize("needed", [_next_minor(__version__), "1.0", "9.0.0rc1"])
def test_a_build_that_needs_a_newer_runtime_is_refused_naming_both_versions(
    build_cache: BuildCache, tmp_path: Path, needed: str
) -> None:
    work = tmp_path / "engines"
    shutil.copytree(build_cache.get(TINY).dir, work)
    document = json.loads((work / "manifest.json").read_text())
    document["runtime"] = {"min_version": needed, "built_by": "7.7.7"}
    manifest_io.write(work, document)  # a consistent manifest (its digest matches), from a newer toolchain
    with pytest.raises(ECARError) as refused:
        Pipeline.from_dir(work, backend="onnxruntime")
    message = str(refused.value)
    assert needed in message and __version__ in message and "7.7.7" in message, message
    cli = run([sys.executable, "-m", "runtime.cli", "--engine-dir", work, "--labels", "1", "--out", tmp_path / "o"],
              cwd=ROOT)  # fmt: skip
    assert cli.returncode != 0 and "Traceback" not in cli.stderr and needed in cli.stderr, cli.stderr[-2000:]
    assert not (tmp_path / "o").exists()


def test_a_build_that_an_older_runtime_can_load_still_loads(build_cache: BuildCache, tmp_path: Path) -> None:
    work = tmp_path / "engines"
    shutil.copytree(build_cache.get(TINY).dir, work)
    document = json.loads((work / "manifest.json").read_text())
    document["runtime"] = {"min_version": "0.1.9", "built_by": "0.1.9"}
    manifest_io.write(work, document)
    reference = Pipeline.from_dir(build_cache.get(TINY).dir, backend="onnxruntime").generate([4], seed=2).images
    np.testing.assert_array_equal(
        Pipeline.from_dir(work, backend="onnxruntime").generate([4], seed=2).images, reference
    )


@pytest.mark.parametrize("raw", ["", "latest", 3, None, ["0.2.0"]])
def test_a_malformed_minimum_runtime_version_is_refused(build_cache: BuildCache, tmp_path: Path, raw: object) -> None:
    work = tmp_path / "engines"
    shutil.copytree(build_cache.get(TINY).dir, work)
    document = json.loads((work / "manifest.json").read_text())
    document["runtime"] = {"min_version": raw, "built_by": __version__}
    manifest_io.write(work, document)
    with pytest.raises(ECARError, match=r"field 'runtime.min_version' must be a version string"):
        manifest_io.load(work)


@pytest.mark.parametrize(
    ("runtime_version", "needed", "loads"),
    [
        ("0.2", "0.2.0", True),  # the same version, written shorter
        ("0.2.0+local", "0.2.0", True),
        ("0.3.0rc1", "0.3.0", False),  # a pre-release is older than its release
        ("0.3.0.dev4", "0.3.0", False),
        ("0.3.0.post1", "0.3.0", True),
        ("0.10.0", "0.9.1", True),  # numbers, not text
        ("1.0.0", "1.0.1", False),
    ],
)
def test_runtime_versions_compare_as_versions(
    build_cache: BuildCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runtime_version: str, needed: str,
    loads: bool,
) -> None:  # fmt: skip
    work = tmp_path / "engines"
    shutil.copytree(build_cache.get(TINY).dir, work)
    document = json.loads((work / "manifest.json").read_text())
    document["runtime"] = {"min_version": needed, "built_by": needed}
    manifest_io.write(work, document)
    monkeypatch.setattr(manifest_io, "__version__", runtime_version)
    if loads:
        assert manifest_io.load(work).graphs
    else:
        with pytest.raises(ECARError, match=f"needs ecar-export's runtime {re.escape(needed)} or newer"):
            manifest_io.load(work)
