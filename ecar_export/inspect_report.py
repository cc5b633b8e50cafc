"""``ecar-export inspect``: a build's graphs, one row per graph and stage, with sizes, shapes and FLOPs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ecar_export.flops import call_flops, graph_models
from runtime import manifest as manifest_io
from runtime.graphs import profile_shapes


def _shape_text(shape: tuple[Any, ...]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def inspect_rows(engine_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One row per graph and stage it runs at, in the order of a request, for ``ecar-export inspect``.

    Each row: ``name``, ``kind``, ``stage``, ``precision``, ``file``, ``size_bytes`` (the graph
    and its weights), ``inputs`` (``[{"name", "dtype", "shape", "opt_shape"}]``: the contract's
    symbolic shape and the concrete shape of that stage's profile at the build's opt batch),
    ``flops`` (one call at those shapes) and ``flops_by_op``, ``unknown`` (counted nodes whose
    shapes inference left unknown), ``calls`` (how often a request calls the graph at that stage) and
    ``request_share`` (that graph and stage's part of the request's FLOPs: the decoder's is large on the
    paper-scale models).
    """
    manifest = manifest_io.load(engine_dir)
    models = graph_models(manifest)
    rows = []
    plan = manifest.plan.calls(manifest.fuse_flow_loop)
    calls: dict[tuple[str, int], int] = {}
    for call in plan:
        calls[call.graph, call.stage] = calls.get((call.graph, call.stage), 0) + 1
    seen: set[tuple[str, int]] = set()
    for call in plan:
        if (call.graph, call.stage) in seen:
            continue
        seen.add((call.graph, call.stage))
        entry = manifest.graphs[call.graph]
        spec = entry.spec
        shapes = profile_shapes(
            spec, manifest.plan, call.stage, manifest.min_batch, manifest.opt_batch, manifest.max_batch
        )
        opt = {name: value[1] for name, value in shapes.items()}
        counted = call_flops(models[call.graph], spec, manifest.plan, call.stage, manifest.opt_batch)
        rows.append(
            {
                "name": call.graph,
                "kind": spec.kind,
                "stage": call.stage,
                "precision": entry.precision,
                "file": entry.file,
                "size_bytes": sum(Path(manifest.path(f)).stat().st_size for f in (entry.file, *entry.data_files)),
                "inputs": [
                    {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "opt_shape": list(opt[t.name])}
                    for t in spec.inputs
                ],
                "opt_batch": manifest.opt_batch,
                "flops": counted["total"],
                "flops_by_op": counted["by_op"],
                "unknown": counted["unknown"],
                "calls": calls[call.graph, call.stage],
            }
        )
    total = sum(row["flops"] * row["calls"] for row in rows)
    for row in rows:
        row["request_share"] = row["flops"] * row["calls"] / total if total else 0.0
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """``inspect_rows`` as a plain-text table (one line per graph)."""
    header = (
        f"{'graph':10} {'stage':>5} {'precision':9} {'size':>13} {'GFLOP@opt':>10} {'calls':>5} {'request':>7}  "
        "inputs at the opt batch"
    )
    lines = [header]
    for row in rows:
        inputs = " ".join(f"{i['name']}{_shape_text(tuple(i['opt_shape']))}" for i in row["inputs"])
        lines.append(
            f"{row['name']:10} {row['stage']:>5} {row['precision']:9} {row['size_bytes']:>13,} "
            f"{row['flops'] / 1e9:>10.4f} {row['calls']:>5} {100 * row['request_share']:>6.1f}%  {inputs}"
        )
    shares: dict[str, float] = {}
    for row in rows:
        shares[row["name"]] = shares.get(row["name"], 0.0) + row["request_share"]
    lines.append("share of a request's FLOPs: " + ", ".join(f"{name} {100 * v:.1f} %" for name, v in shares.items()))
    return "\n".join(lines)
