"""ONNX external data: graphs whose weights live in a file beside them, handled without loading them.

A graph of a build is two files: ``<graph>-<sha12>.onnx`` (the graph; every initializer above
1 KiB stored outside it) and ``<graph>-<sha12>.weights`` (those initializers, ONNX external
data, each tensor 64-byte aligned). Both names are content-addressed; the graph file names
its weights file, so the graph's sha256 covers which weights it reads.

The functions here read graph files *without* their external data (a protobuf of the graph
alone, however large the model) and move, convert or copy tensor bytes file to file, one
tensor at a time, so no step holds a second copy of the weights.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from runtime.fileio import sha256_file

WEIGHTS_SUFFIX = ".weights"
STAGED_SUFFIX = ".data"  # the exporter's external data beside a staged graph file
ALIGNMENT = 64
CHUNK = 64 << 20
# (tensor as it will be stored, its bytes as read from the source) -> bytes to store
Transform = Callable[[TensorProto, bytes], bytes]


def external_info(tensor: TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def initializers(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Every initializer of ``graph`` and of its subgraphs (a fused loop's body reads outer ones)."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from initializers(attribute.g)
            for sub in attribute.graphs:
                yield from initializers(sub)


def is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def load_graph(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """A graph file without its external data (the weights stay on disk)."""
    return onnx.load(str(path), load_external_data=False)


def data_path(graph: Path) -> Path:
    """Where the exporter (and a recipe) keeps the external data of a staged graph file."""
    return Path(str(graph) + STAGED_SUFFIX)


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """Write a graph file whose external data stays where it is (replacing ``path``)."""
    path.unlink(missing_ok=True)
    onnx.save_model(model, str(path))


def relocate(model: onnx.ModelProto, location: str) -> None:
    """Point every external initializer of ``model`` at the data file ``location`` (same offsets)."""
    for tensor in initializers(model.graph):
        if is_external(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location


def data_files(model: onnx.ModelProto) -> list[str]:
    """The external data files a graph reads (relative locations), sorted."""
    return sorted({external_info(t)["location"] for t in initializers(model.graph) if is_external(t)})


def _read(source: Path, info: dict[str, str]) -> bytes:
    offset, length = int(info.get("offset", 0)), info.get("length")
    with open(source, "rb") as handle:
        handle.seek(offset)
        return handle.read(int(length)) if length is not None else handle.read()


def rewrite_data(
    model: onnx.ModelProto, source_dir: Path, target: Path, transform: Transform | None = None, threshold: int = 1024
) -> None:
    """Write every external initializer of ``model`` (read from ``source_dir``) into one file ``target``.

    Each tensor's bytes pass through ``transform`` (a dtype conversion, say); tensors whose
    stored bytes come out under ``threshold`` go inline. ``model`` is changed in place to
    point at ``target`` (by its file name: it must end up in the same directory as the graph).
    """
    with open(target, "wb") as out:
        for tensor in initializers(model.graph):
            if not is_external(tensor):
                continue
            info = external_info(tensor)
            data = _read(source_dir / info["location"], info)
            if transform is not None:
                data = transform(tensor, data)
            del tensor.external_data[:]
            if len(data) < threshold:
                tensor.data_location = TensorProto.DEFAULT
                tensor.raw_data = data
                continue
            position = out.tell()
            pad = -position % ALIGNMENT
            out.write(b"\0" * pad)
            offset = position + pad
            out.write(data)
            tensor.ClearField("raw_data")
            for key, value in (("location", target.name), ("offset", str(offset)), ("length", str(len(data)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = TensorProto.EXTERNAL
        out.flush()
        os.fsync(out.fileno())


def save_with_external_data(model: onnx.ModelProto, path: Path, threshold: int = 1024) -> None:
    """Save a model whose weights are loaded (e.g. after quantization) with them in ``path + '.data'``."""
    data = Path(str(path) + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=threshold,
    )


def finalize(graph: Path, directory: Path, name: str) -> dict[str, object]:
    """Give a graph file and its weights their content-addressed names in ``directory``.

    ``graph`` may read at most one external data file (beside it). The weights file is renamed
    ``<name>-<sha12>.weights`` first, the graph rewritten to name it, then the graph renamed
    ``<name>-<sha12>.onnx``. Returns the manifest's file fields: ``file``, ``sha256`` and
    ``data_files`` ({weights file: sha256}).
    """
    model = load_graph(graph)
    locations = data_files(model)
    if len(locations) > 1:
        raise ValueError(f"graph '{graph}' reads {len(locations)} external data files; expected at most one")
    weights: dict[str, str] = {}
    if locations:
        source = graph.parent / locations[0]
        digest = sha256_file(source)
        final = f"{name}-{digest[:12]}{WEIGHTS_SUFFIX}"
        os.replace(source, directory / final)
        for tensor in initializers(model.graph):
            if is_external(tensor):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = final
        weights[final] = digest
        graph.unlink()
        onnx.save_model(model, str(graph))
    blob = graph.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    file = f"{name}-{digest[:12]}.onnx"
    os.replace(graph, directory / file)
    return {"file": file, "sha256": digest, "data_files": weights}


def to_float16(original: dict[str, int]) -> Transform:
    """A :data:`Transform` that converts tensors the fp16 converter retyped (float32 -> float16).

    ``original`` maps initializer names to their data type before conversion. Values are
    converted by ONNX Runtime's own ``convert_np_to_float16`` (clipping to fp16's range), as the
    converter does for inline tensors.
    """
    from onnxruntime.transformers.float16 import convert_np_to_float16

    def transform(tensor: TensorProto, data: bytes) -> bytes:
        if original.get(tensor.name) == TensorProto.FLOAT and tensor.data_type == TensorProto.FLOAT16:
            values = np.frombuffer(data, dtype=np.float32)
            return np.asarray(convert_np_to_float16(values), dtype=np.float16).tobytes()
        return data

    return transform
