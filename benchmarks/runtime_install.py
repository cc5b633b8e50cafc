#!/usr/bin/env python3
"""The embedded install: size on disk and import time of the runtime alone (wheel + one CPU engine).

    python benchmarks/runtime_install.py [--wheel dist/ecar_export-*.whl] [--repeats 10] [--extras onnxruntime,openvino]

Builds the wheel (``python -m build --no-isolation``, from a copy of the tree) unless ``--wheel``
names one, creates a fresh virtual environment without pip (what a service image ships: the
interpreter and its packages), installs ``<wheel>[onnxruntime]`` into it with the pins of
constraints.txt (this environment's pip, ``--python``) — and the same with ``[openvino]`` in a
second one — and measures the environment's site-packages on disk (each package's share too)
and the median time of ``import runtime`` and of ``from runtime import Pipeline`` in fresh
interpreters. Writes benchmarks/results/runtime_install.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS, machine, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_MB = 150


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--wheel", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--extras", default="onnxruntime,openvino", help="engine extras, one environment each")
    parser.add_argument("--out", type=Path, default=RESULTS / "runtime_install.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="runtime-install-") as work:
        root = Path(work)
        wheel = args.wheel
        if wheel is None:
            tree = root / "src"  # building writes build/ and *.egg-info into the tree it runs in
            skip = (".venv", ".git", "build", "*.egg-info", ".stubs", "benchmarks", "engines", "out", "__pycache__")
            shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(*skip))
            subprocess.run(
                [sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", root / "dist", tree],
                check=True,
                capture_output=True,
            )
            (wheel,) = (root / "dist").glob("*.whl")
        results = {extra: measure(root / extra, wheel, extra, args.repeats) for extra in args.extras.split(",")}
    result = {
        "benchmark": "runtime_install",
        "wheel": Path(wheel).name,
        "install": "fresh venv without pip; <wheel>[<extra>] with constraints.txt",
        "target_mb": TARGET_MB,
        "extras": results,
        "machine": machine(),
    }
    for extra, row in results.items():
        print(f"[{extra}] runtime environment: {row['site_packages_mb']} MB (target {TARGET_MB} MB); "
              f"torch importable: {row['torch_importable']}")  # fmt: skip
        for name, size in list(row["packages_mb"].items())[:8]:
            print(f"  {name:28s} {size:7.1f} MB")
        print(f"  import runtime {1000 * row['import_runtime_s']:.1f} ms, from runtime import Pipeline "
              f"{1000 * row['import_pipeline_s']:.1f} ms")  # fmt: skip
    write_json(args.out, result)
    return 0


def measure(env: Path, wheel: Path, extra: str, repeats: int) -> dict[str, object]:
    """Install ``<wheel>[extra]`` into a fresh venv at ``env``; its size and import times."""
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--disable-pip-version-check",
         "-c", ROOT / "constraints.txt", f"{wheel}[{extra}]"],
        check=True,
    )  # fmt: skip
    site = next((env / "lib").glob("python*/site-packages"))
    timings = {}
    for label, statement in (("import runtime", "import runtime"), ("Pipeline", "from runtime import Pipeline")):
        code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
        runs = [float(subprocess.run([python, "-c", code], check=True, capture_output=True, text=True,
                                     cwd=env).stdout) for _ in range(repeats)]  # fmt: skip
        timings[label] = statistics.median(runs)
    torch = subprocess.run([python, "-c", "import torch"], capture_output=True, cwd=env).returncode == 0
    packages = {}
    for entry in sorted(site.iterdir()):
        if entry.name.endswith((".dist-info", ".pth")) or entry.name == "__pycache__":
            continue
        packages[entry.name] = tree_bytes(entry) if entry.is_dir() else entry.stat().st_size
    total = tree_bytes(site)
    return {
        "site_packages_bytes": total,
        "site_packages_mb": round(total / 2**20, 1),
        "packages_mb": {name: round(size / 2**20, 1) for name, size in sorted(packages.items(), key=lambda kv: -kv[1])},
        "import_runtime_s": timings["import runtime"],
        "import_pipeline_s": timings["Pipeline"],
        "torch_importable": torch,
    }


if __name__ == "__main__":
    sys.exit(main())
