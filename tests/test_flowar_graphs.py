"""FlowAR's contract-3 graphs (ecar_export.families.flowar.graphs): the walk against the reference sampler
and the golden fixtures, and the exported ONNX graphs against the torch functions at every stage.

Bounds: a whole request within 1e-3 · max(1, max|ref|), one graph call within 1e-4 · max(1, max|ref|).
Weights are random and non-trivial: the zero-initialised tensors (every linear bias) are re-drawn, the
RMSNorm weights jittered and the class and position tables drawn wide, as for the golden fixtures.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import SESSION_SEED
from torch import nn

from ecar_export import export, random_inputs
from ecar_export.families.flowar import convert, graphs
from ecar_export.families.flowar.config import FLOWAR_TINY, PRESETS, FlowARConfig
from ecar_export.families.flowar.model import FlowAR
from ecar_export.families.flowar.sampler import sample, stage_cfg, time_grid
from ecar_export.quiet import quiet
from ecar_export.torch_walk import TorchWalk
from runtime.graphs import GraphSpec
from runtime.noise import noise_keys
from runtime.request import RequestInputs

GOLDEN = Path(__file__).resolve().parent / "golden" / "flowar"
GRAPH_TOL, REQUEST_TOL = 1e-4, 1e-3


@pytest.fixture(scope="module", autouse=True)
def _threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is the fastest and deterministic
    yield
    torch.set_num_threads(threads)


def randomised(config: FlowARConfig, seed: int) -> FlowAR:
    """A model whose every weight matters: zero tensors re-drawn, ones jittered, tables drawn wide."""
    torch.manual_seed(seed)
    model = FlowAR(config)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.normal_(0.0, 0.02)
            elif bool((param == 1).all()):
                param.add_(torch.randn_like(param) * 0.1)
        for table in (model.class_emb.weight, *model.position_tables()):
            table.normal_(0.0, 0.5)
    return model.eval()


def max_diff(got: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, tol: float, what: str) -> float:
    """Assert ``max|got - ref| <= tol · max(1, max|ref|)``; returns the difference (printed for ``-s`` runs)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    if ref.size == 0:
        return 0.0
    err, scale = float(np.abs(got - ref).max()), float(np.abs(ref).max())
    print(f"{what}: max |diff| {err:.2e} (reference max {scale:.2f})")
    assert err <= tol * max(1.0, scale), f"{what}: max |diff| {err:.3e} > {tol * max(1.0, scale):.3e}"
    return err


def as_tokens(latents: torch.Tensor) -> torch.Tensor:
    """The reference sampler's latents ``[B, C, g, g]`` as the walk's ``[B, N, C]``."""
    return latents.flatten(2).transpose(1, 2)


# ------------------------------------------------------------------ the walk
@pytest.mark.parametrize("name", ["flowar-tiny", "flowar-tiny-cross"])
def test_walk_matches_reference_sampler(name: str, rng: np.random.Generator) -> None:
    """The graphs, walked as a runtime walks them, give the reference sampler's latents.

    The reference keeps rows ``[conditional; null]`` each with its own state and noise. At a step it
    guides (w_s > 1 and 0 <= t <= guidance) it feeds the head ``[x_c; x_c]`` and moves both halves by
    ``v_u + w·(v_c - v_u)``: that is flow_step on x = x_c. At a step it does not guide it feeds
    ``[x_c; x_n]`` and moves each half by its own velocity; the head treats rows independently
    (attention stays within a row's tokens), so x_c moves by ``v_c(x_c, z_c)`` whatever x_n is, and only
    the conditional rows are carried to the next stage and into the latents: x_n never reaches the
    output. flow_step fed cfg = 1 moves x_c by ``v_u + 1·(v_c - v_u) = v_c`` (up to float32 rounding),
    so the walk needs no null-row state at all. The reference's null noise here is independent of the
    walk's noise, which this comparison therefore also covers.
    """
    config = PRESETS[name]
    model = randomised(config, int(rng.integers(1 << 31)))
    batch = int(rng.integers(1, 3))
    labels = rng.integers(0, config.num_classes, size=batch)
    noise = [rng.standard_normal(shape).astype(np.float32) for shape in graphs.noise_shapes(config, batch)]
    null_noise = [rng.standard_normal(n.shape).astype(np.float32) for n in noise]
    latents = graphs.walk(model, labels, noise)
    ref = sample(
        model, torch.from_numpy(labels), noise=[torch.from_numpy(np.concatenate(p)) for p in zip(noise, null_noise)]
    )
    max_diff(latents, as_tokens(ref.latents), REQUEST_TOL, f"{name} walk vs reference sampler, final latents")


@pytest.mark.parametrize("tag", ["tiny", "cross"])
def test_walk_matches_golden_latents(tag: str) -> None:
    """The authors' whole request (labels 3 and 207, their noise's conditional rows) through the graphs."""
    model = convert.load(
        GOLDEN / {"tiny": "weights.safetensors", "cross": "weights_cross.safetensors"}[tag], tokenizer=False
    )
    with np.load(GOLDEN / "io.npz") as io:
        labels, latents = io[f"{tag}/labels"], io[f"{tag}/latents"]
        noise = [io[f"{tag}/noise{k}"][: len(labels)] for k in range(model.config.num_stages)]
    got = graphs.walk(model, labels, noise)
    max_diff(got, as_tokens(torch.from_numpy(latents)), REQUEST_TOL, f"{tag} walk vs golden latents")


def test_flow_step_at_cfg_one_ignores_the_null_half(rng: np.random.Generator) -> None:
    """cfg = 1 (an unguided step) moves x by the conditional velocity alone: the null half of z is inert."""
    model = randomised(FLOWAR_TINY, int(rng.integers(1 << 31)))
    c = graphs.stage_inputs(FLOWAR_TINY, 3)
    head = [torch.from_numpy(np.array(c[n])) for n in graphs.FLOW_STEP_CONSTANTS]
    x = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(int(rng.integers(1 << 31))))
    z = torch.randn(4, 16, FLOWAR_TINY.width)
    t, dt, one = torch.tensor([0.75]), torch.tensor([0.05]), torch.tensor([1.0])
    with torch.no_grad():
        stepped = model.flow_step(x, z, t, dt, one, *head)
        other_null = model.flow_step(x, torch.cat([z[:2], torch.randn(2, 16, FLOWAR_TINY.width)]), t, dt, one, *head)
        v_c = model.flownet(x, t.expand(2), z[:2], (head[0], head[1]))
    max_diff(stepped, x - dt * v_c, 1e-6, "cfg 1 step vs conditional Euler step")
    max_diff(other_null, stepped, 1e-6, "cfg 1 step with another null half")


def test_request_plan_follows_the_reference_rule() -> None:
    """Every stage walks the reference's whole grid (float32-rounded), weights ramp as the reference's and a
    step is guided where the reference guides (w_s > 1 and t <= guidance; at w_s = 1 the mix is v_c itself)."""
    for config in (PRESETS["flowar-tiny"], PRESETS["flowar-tiny-cross"]):
        grid = time_grid(config.steps).numpy()
        plan = graphs.request_plan(config)
        weights = plan.weights()
        for stage in range(1, config.num_stages + 1):
            weight = stage_cfg(config.cfg, stage - 1, config.num_stages)
            assert weights[stage - 1] == pytest.approx(weight, rel=1e-12)
            steps = plan.stage(stage).step_times()
            assert [t for t, _ in steps] == grid[:-1].astype(np.float32).tolist()
            dts = np.array([dt for _, dt in steps])
            assert np.allclose(dts, grid[:-1] - grid[1:], rtol=0, atol=1e-7) and (dts > 0).all()
            guided = [weight > 1 and 0 <= t <= config.guidance for t in grid[:-1]]
            runtime = [plan.guided(t) and weights[stage - 1] > 1 for t, _ in steps]
            assert runtime == guided
        assert weights[0] == 1.0  # the ramp starts at 1
        assert 0 < sum(plan.guided(t) for t, _ in plan.stage(1).step_times()) < len(grid) - 1  # t > guidance
    assert graphs.request_plan(FLOWAR_TINY, cfg=1.0).weights() == (1.0,) * FLOWAR_TINY.num_stages


@pytest.mark.parametrize("stage", [2, 3, 4, 5])
def test_up_matrix_is_the_reference_resampling(stage: int, rng: np.random.Generator) -> None:
    model = randomised(FLOWAR_TINY, 0)
    prev = torch.from_numpy(rng.standard_normal((2, FLOWAR_TINY.tokens_per_stage[stage - 2], 16)).astype(np.float32))
    up = torch.from_numpy(np.array(graphs.stage_inputs(FLOWAR_TINY, stage)["up"]))
    with torch.no_grad():
        max_diff(model.z_proj(up @ prev), model.stage_input(prev, stage - 1), 1e-6, f"stage {stage} input")


# ------------------------------------------------------------------ ONNX
class _Graph(nn.Module):
    """A graph function as a module whose forward takes the graph's inputs in order (the model's weights
    are the module's parameters). export.GraphModule is typed for ECAR; this is the same for FlowAR."""

    def __init__(self, model: FlowAR, spec: GraphSpec) -> None:
        super().__init__()
        self.model = model
        self.function = graphs.graph_function(model, spec.kind)

    def forward(self, *inputs: torch.Tensor) -> object:
        return self.function(*inputs)


def trace_onnx(model: FlowAR, spec: GraphSpec, path: Path) -> Path:
    """Trace one graph as ecar_export.export does (dynamo, opset 18, every symbolic dim dynamic, traced at
    export.TRACE_DIMS), then name-check, shape-infer and check it with export.clean and export.check."""
    dims = {**export.TRACE_DIMS, "2B": 2 * export.TRACE_DIMS["B"]}
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for tensor in spec.inputs:
        shape = tensor.concrete(dims)
        if tensor.name == "labels":
            feeds[tensor.name] = rng.integers(0, model.config.num_classes, size=shape, dtype=np.int64)
        elif tensor.name == "level":
            feeds[tensor.name] = np.array([1], np.int64)
        elif tensor.dtype == "int64":
            feeds[tensor.name] = np.arange(shape[0], dtype=np.int64)
        else:
            feeds[tensor.name] = rng.uniform(0.1, 1.0, size=shape).astype(np.float32)
    args = tuple(torch.from_numpy(feeds[name]) for name in spec.input_names())
    with quiet():
        program = torch.onnx.export(
            _Graph(model, spec).eval(),
            args,
            input_names=spec.input_names(),
            output_names=spec.output_names(),
            opset_version=export.OPSET,
            dynamo=True,
            dynamic_shapes=export._dynamic_shapes(spec),
            optimize=True,
            verbose=False,
        )
        assert program is not None
        program.save(str(path))
    onnx.save_model(export.clean(onnx.load(str(path)), spec), str(path))
    export.check(path)
    return path


class OnnxGraphs:
    """Each config's randomised model (fresh seed per session) and its graphs, exported on first use."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.models: dict[str, FlowAR] = {}
        self.sessions: dict[tuple[str, str], ort.InferenceSession] = {}

    def get(self, config: FlowARConfig, graph: str) -> tuple[FlowAR, GraphSpec, ort.InferenceSession]:
        if config.name not in self.models:
            self.models[config.name] = randomised(config, zlib.crc32(f"{SESSION_SEED}/{config.name}".encode()))
        model = self.models[config.name]
        spec = {s.name: s for s in graphs.graph_specs(config)}[graph]
        if (config.name, graph) not in self.sessions:
            path = trace_onnx(model, spec, self.folder / f"{config.name}-{graph}.onnx")
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for tensor, node in zip((*spec.inputs, *spec.outputs), (*session.get_inputs(), *session.get_outputs())):
                assert node.type == {"float32": "tensor(float)", "int64": "tensor(int64)"}[tensor.dtype], tensor
                fixed = [d if isinstance(d, int) else None for d in tensor.shape]
                assert [d if isinstance(d, int) else None for d in node.shape] == fixed, (tensor, node.shape)
            self.sessions[config.name, graph] = session
        return model, spec, self.sessions[config.name, graph]


@pytest.fixture(scope="module")
def onnx_graphs(tmp_path_factory: pytest.TempPathFactory) -> OnnxGraphs:
    return OnnxGraphs(tmp_path_factory.mktemp("flowar_onnx"))


def random_feeds(
    config: FlowARConfig, spec: GraphSpec, stage: int, batch: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Fresh inputs of one call at a stage: the stage's real constants and step times, random data elsewhere."""
    return random_inputs.for_config(spec, config, stage, batch, rng, family="flowar")


@pytest.mark.parametrize("stage", [1, 2, 3, 4, 5])
@pytest.mark.parametrize(
    ("name", "graph"),
    # the cross config's backbone is the tiny one's structure; its head has the cross-attention blocks of L/H
    [("flowar-tiny", "backbone"), ("flowar-tiny", "flow_step"), ("flowar-tiny-cross", "flow_step")],
)
def test_onnx_graph_matches_torch_at_every_stage(
    onnx_graphs: OnnxGraphs, name: str, graph: str, stage: int, rng: np.random.Generator
) -> None:
    """One exported graph serves every stage: stage 1 (one token, empty cache) to the last (no kv emitted)."""
    config = PRESETS[name]
    model, spec, session = onnx_graphs.get(config, graph)
    batch = int(rng.integers(1, 4))
    feeds = random_feeds(config, spec, stage, batch, rng)
    got = session.run(spec.output_names(), feeds)
    with torch.no_grad():
        ref = graphs.graph_function(model, spec.kind)(*(torch.from_numpy(feeds[n]) for n in spec.input_names()))
    refs = (ref,) if isinstance(ref, torch.Tensor) else ref
    dims = graphs.request_plan(config).dims(stage, batch)
    for output, out, expected in zip(spec.output_names(), got, refs):
        assert out.shape == spec.tensor(output).concrete(dims)
        max_diff(out, expected, GRAPH_TOL, f"{name} {graph} stage {stage} output {output}")


def test_onnx_decoder_matches_torch(onnx_graphs: OnnxGraphs, rng: np.random.Generator) -> None:
    """The decoder graph (once per request, after the last stage; flowar-tiny's reduced KL-16 layout) through ONNX."""
    config = PRESETS["flowar-tiny"]
    model, spec, session = onnx_graphs.get(config, "decoder")
    batch = int(rng.integers(1, 3))
    feeds = random_feeds(config, spec, config.num_stages, batch, rng)
    (got,) = session.run(spec.output_names(), feeds)
    with torch.no_grad():
        ref = model.decode_tokens(torch.from_numpy(feeds["x"]))
    assert got.shape == (batch, 3, config.image_size, config.image_size)
    assert 0.05 < float(ref.std()), "a real image, not a saturated one"
    max_diff(got, ref, GRAPH_TOL, "flowar-tiny decoder")


def test_shared_torch_walk_draws_the_runtimes_noise_and_decodes(rng: np.random.Generator) -> None:
    """``TorchWalk.generate`` (the benchmarks' torch reference) is :func:`graphs.walk` on the noise the runtime draws
    for the seed, then the decoder: what a FlowAR build's pipeline computes."""
    config = PRESETS["flowar-tiny"]
    model = randomised(config, int(rng.integers(1 << 31)))
    labels = rng.integers(0, config.num_classes, size=2)
    seed = int(rng.integers(1 << 31))
    walker = TorchWalk(model)
    inputs = RequestInputs.draw(walker.plan, labels, noise_keys(seed, len(labels)), None)
    result = walker.generate(labels, seed=seed)
    max_diff(result.latents, graphs.walk(model, labels, inputs.noise), 1e-6, "TorchWalk vs graphs.walk latents")
    with torch.no_grad():
        images = model.decode_tokens(result.latents)
    max_diff(result.images, images, 1e-6, "TorchWalk images vs the decoder on its latents")
    assert result.images.shape == (2, config.image_channels, config.image_size, config.image_size)
