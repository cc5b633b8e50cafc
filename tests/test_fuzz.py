"""Fuzzing the loaders: truncated, bit-flipped and random manifests, graph files and checkpoints.

Whatever the bytes, loading answers with an ECARError — never another exception, a crash or a
hang — and damage is *refused*, not only reported the right way: every mutation that changes a
manifest's content (every field is covered by its ``manifest_sha256``), bytes of a file covered
by a sha256 in the manifest, or the tensor table of a checkpoint must fail to load. Only damage
that changes nothing the loaders check (a graph file re-hashed into the manifest, checkpoint
metadata or tensor data) may load. Runs >= 400 cases.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import BuildCache, make_perturbed_model, make_tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecar_export import checkpoint
from runtime import manifest as manifest_io
from runtime.errors import ECARError
from runtime.fileio import sha256_file
from runtime.pipeline import Pipeline

TINY = "tiny-1-2-4"
FUZZ = settings(max_examples=110, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def pristine(build_cache: BuildCache) -> Path:
    return build_cache.get(TINY).dir


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    checkpoint.save(make_perturbed_model(make_tiny_config(), seed=3), path)
    return path.read_bytes()


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into a JSON document."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths(child, prefix + (index,))
    return found


def _refused(directory: Path) -> None:
    with pytest.raises(ECARError):
        manifest_io.load(directory)


def _parsed(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


@FUZZ
@given(data=st.data())
def test_mutated_manifests_give_ecar_errors(pristine: Path, tmp_path: Path, data: st.DataObject) -> None:
    work = _copy(pristine, tmp_path / "engines")
    document = json.loads((work / "manifest.json").read_text())
    paths = _paths(document)
    original = json.loads(json.dumps(document))
    path = data.draw(st.sampled_from(paths))
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(json_values)
    (work / "manifest.json").write_text(json.dumps(document))
    if _parsed((work / "manifest.json").read_bytes()) == original:  # the same value written back
        manifest_io.load(work)
    else:
        _refused(work)


@FUZZ
@given(data=st.data())
def test_damaged_manifest_bytes_give_ecar_errors(pristine: Path, tmp_path: Path, data: st.DataObject) -> None:
    work = _copy(pristine, tmp_path / "engines")
    raw = bytearray((work / "manifest.json").read_bytes())
    how = data.draw(st.sampled_from(["truncate", "flip", "random"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    else:
        raw = bytearray(
            data.draw(st.binary(max_size=300))
            if data.draw(st.booleans())
            else json.dumps(data.draw(json_values)).encode()
        )
    (work / "manifest.json").write_bytes(bytes(raw))
    if _parsed(bytes(raw)) == _parsed((pristine / "manifest.json").read_bytes()):
        manifest_io.load(work)  # e.g. a flipped bit that only changed white space
    else:
        _refused(work)


@FUZZ
@given(data=st.data())
def test_damaged_graph_files_give_ecar_errors(pristine: Path, tmp_path: Path, data: st.DataObject) -> None:
    """A damaged graph file with a matching sha256 in the manifest reaches ONNX Runtime's parser."""
    work = _copy(pristine, tmp_path / "engines")
    document = json.loads((work / "manifest.json").read_text())
    name = data.draw(st.sampled_from(sorted(document["graphs"])))
    target = work / document["graphs"][name]["file"]
    original = target.read_bytes()
    raw = bytearray(original)
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 16))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    target.write_bytes(bytes(raw))
    rehash = data.draw(st.booleans())
    if rehash:  # the damage is covered by a matching sha256: ONNX Runtime's parser is the judge
        document["graphs"][name]["sha256"] = sha256_file(target)
        manifest_io.write(work, document)
        try:
            Pipeline.from_dir(work, backend="onnxruntime", device="cpu")
        except ECARError:
            pass
    elif bytes(raw) != original:
        with pytest.raises(ECARError, match=name):
            Pipeline.from_dir(work, backend="onnxruntime", device="cpu")


@FUZZ
@given(data=st.data())
def test_damaged_checkpoints_give_ecar_errors(checkpoint_bytes: bytes, tmp_path: Path, data: st.DataObject) -> None:
    raw = bytearray(checkpoint_bytes)
    how = data.draw(st.sampled_from(["truncate", "flip-header", "flip-anywhere", "random"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip-header":
        header = 8 + int.from_bytes(raw[:8], "little")
        for _ in range(data.draw(st.integers(1, 6))):
            raw[data.draw(st.integers(0, header - 1))] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "flip-anywhere":
        for _ in range(data.draw(st.integers(1, 6))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    else:
        raw = bytearray(data.draw(st.binary(max_size=400)))
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(bytes(raw))
    tensors_changed = _tensor_table(bytes(raw)) != _tensor_table(checkpoint_bytes)
    if how in ("truncate", "random") or tensors_changed:  # sizes, dtypes, shapes or offsets no longer fit
        with pytest.raises(ECARError):
            checkpoint.load(path)
    else:  # only metadata or tensor values changed: may load (or be refused as an invalid config / NaN)
        try:
            checkpoint.load(path)
        except ECARError:
            pass


def _tensor_table(raw: bytes) -> Any:
    """A safetensors file's tensor entries (dtype, shape, offsets), or None where the header does not parse."""
    if len(raw) < 8:
        return None
    size = int.from_bytes(raw[:8], "little")
    header = _parsed(raw[8 : 8 + size]) if size <= len(raw) - 8 else None
    if not isinstance(header, dict):
        return None
    return {key: value for key, value in header.items() if key != "__metadata__"}
