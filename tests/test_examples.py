"""The runnable examples of the docstrings a user reads first, run as doctests against a real build.

``Pipeline``, ``Pipeline.from_dir``, ``Pipeline.generate`` and ``build_engines`` each carry an
``Examples`` block (arguments first, then a runnable example, as diffusers' pipelines do);
these tests run every one of them, with ``engine_dir`` the bundled demo's fp32 build and
``tmp`` a fresh directory, so an example that drifts from the code fails here.
"""

from __future__ import annotations

import doctest
from pathlib import Path
from typing import Any

import pytest
from conftest import BuildCache, needs_demo

from ecar_export.build import build_engines
from runtime.pipeline import Pipeline

EXAMPLES = {
    "Pipeline": Pipeline,
    "Pipeline.from_dir": Pipeline.from_dir,
    "Pipeline.generate": Pipeline.generate,
    "build_engines": build_engines,
}


@needs_demo
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_docstring_examples_run(name: str, build_cache: BuildCache, tmp_path: Path) -> None:
    target: Any = EXAMPLES[name]
    globs = {"engine_dir": build_cache.get("demo").dir, "tmp": tmp_path, "Pipeline": Pipeline}
    finder = doctest.DocTestFinder(recurse=False)
    (test,) = finder.find(target, name, globs=globs)
    assert test.examples, f"{name} has no Examples block"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed (output above)"
