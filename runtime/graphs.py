"""The graph contract between export and runtime (DESIGN §4), in one place per graph.

Each :class:`GraphSpec` names a graph's inputs and outputs with symbolic shapes
(``B`` batch, ``2B`` guidance rows, ``M`` tokens of a batch, ``2M``), dtypes, its
batch profile and how to make fresh random sample inputs for it. The exporter traces
against these specs, the runtime feeds them and the checker compares them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from runtime import schedule
from runtime.config import ECARConfig

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[Dim, ...]
    dtype: str  # numpy dtype name: float32 | int64

    def concrete(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class GraphSpec:
    name: str
    kind: str  # backbone | flow_step | flow_loop | decoder
    stage: int | None  # 1-based stage for per-stage graphs
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # token count per batch row along M (flow graphs); 0 for batch-only graphs
    tokens_per_row: tuple[int, ...] = field(default=())

    def dims(self, batch: int, tokens: int | None = None) -> dict[str, int]:
        m = batch * (tokens if tokens is not None else (self.tokens_per_row[-1] if self.tokens_per_row else 1))
        return {"B": batch, "2B": 2 * batch, "M": m, "2M": 2 * m}

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def sample_inputs(self, config: ECARConfig, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Fresh random inputs in the ranges the pipeline produces (never all zeros)."""
        dims = self.dims(batch)
        feeds: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            shape = spec.concrete(dims)
            if spec.name == "labels":
                feeds[spec.name] = rng.integers(0, config.num_classes, size=shape, dtype=np.int64)
            elif spec.name == "t":
                feeds[spec.name] = rng.uniform(0.05, 1.0, size=shape).astype(np.float32)
            elif spec.name == "dt":
                feeds[spec.name] = rng.uniform(0.01, 0.2, size=shape).astype(np.float32)
            elif spec.name == "cfg":
                feeds[spec.name] = rng.uniform(1.0, 4.0, size=shape).astype(np.float32)
            elif spec.name == "past_kv":
                feeds[spec.name] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
            else:
                feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
        return feeds

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "stage": self.stage,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "tokens_per_row": list(self.tokens_per_row),
        }


def kv_shape(config: ECARConfig, tokens: int) -> tuple[Dim, ...]:
    return (config.depth, 2, "2B", config.heads, tokens, config.head_dim)


def backbone_spec(config: ECARConfig, stage: int) -> GraphSpec:
    """``backbone_s`` (stage is 1-based)."""
    counts = config.tokens_per_stage
    n, c, d = counts[stage - 1], config.latent_channels, config.width
    inputs = [TensorSpec("labels", ("B",), "int64")]
    if stage > 1:
        inputs.append(TensorSpec("prev", ("B", counts[stage - 2], c), "float32"))
    inputs.append(TensorSpec("noise", ("B", n, c), "float32"))
    if stage > 1:
        inputs.append(TensorSpec("past_kv", kv_shape(config, sum(counts[: stage - 1])), "float32"))
    outputs = (
        TensorSpec("z", ("2B", n, d), "float32"),
        TensorSpec("x", ("B", n, c), "float32"),
        TensorSpec("present_kv", kv_shape(config, sum(counts[:stage])), "float32"),
    )
    return GraphSpec(f"backbone_{stage}", "backbone", stage, tuple(inputs), outputs, (n,))


def flow_step_spec(config: ECARConfig) -> GraphSpec:
    c, d = config.latent_channels, config.width
    inputs = (
        TensorSpec("x", ("M", c), "float32"),
        TensorSpec("z", ("2M", d), "float32"),
        TensorSpec("t", (1,), "float32"),
        TensorSpec("dt", (1,), "float32"),
        TensorSpec("cfg", (1,), "float32"),
    )
    return GraphSpec(
        "flow_step", "flow_step", None, inputs, (TensorSpec("x_next", ("M", c), "float32"),), config.tokens_per_stage
    )


def flow_loop_spec(config: ECARConfig, stage: int) -> GraphSpec:
    """``flow_loop_s``: the stage's whole Euler loop unrolled, times fixed at build time."""
    c, d = config.latent_channels, config.width
    n = config.tokens_per_stage[stage - 1]
    inputs = (
        TensorSpec("x", ("M", c), "float32"),
        TensorSpec("z", ("2M", d), "float32"),
        TensorSpec("cfg", (1,), "float32"),
    )
    return GraphSpec(
        f"flow_loop_{stage}", "flow_loop", stage, inputs, (TensorSpec("x_end", ("M", c), "float32"),), (n,)
    )


def decoder_spec(config: ECARConfig) -> GraphSpec:
    n = config.tokens_per_stage[-1]
    image = ("B", config.image_channels, config.image_size, config.image_size)
    return GraphSpec(
        "decoder",
        "decoder",
        None,
        (TensorSpec("x", ("B", n, config.latent_channels), "float32"),),
        (TensorSpec("image", image, "float32"),),
    )


def graph_specs(config: ECARConfig, fuse_flow_loop: bool = False) -> list[GraphSpec]:
    """Every graph of a build, in execution order."""
    specs = [backbone_spec(config, s) for s in range(1, config.num_stages + 1)]
    specs.append(flow_step_spec(config))
    if fuse_flow_loop:
        specs += [flow_loop_spec(config, s) for s in range(1, config.num_stages + 1)]
    specs.append(decoder_spec(config))
    return specs


def stage_times(config: ECARConfig, stage: int) -> list[tuple[float, float]]:
    """(t, dt) of each Euler step of a 1-based stage, as the samplers feed them (float32)."""
    times = schedule.stages(config)[stage - 1].times
    return [(float(np.float32(t)), float(np.float32(t - t_next))) for t, t_next in zip(times, times[1:])]


def profile_shapes(
    spec: GraphSpec, min_batch: int, opt_batch: int, max_batch: int
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape of every input for an optimisation profile over the batch range.

    Flow graphs' token axis M spans batch × tokens: the smallest stage at ``min_batch``, the
    largest stage at ``opt_batch`` / ``max_batch`` (``flow_step`` serves every stage).
    """
    tokens = spec.tokens_per_row or (1,)
    low = spec.dims(min_batch, min(tokens))
    opt = spec.dims(opt_batch, max(tokens))
    high = spec.dims(max_batch, max(tokens))
    return {t.name: (t.concrete(low), t.concrete(opt), t.concrete(high)) for t in spec.inputs}
