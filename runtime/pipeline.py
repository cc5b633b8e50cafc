"""``Pipeline``: chain the stage graphs and drive the flow head's Euler loop (DESIGN §5).

The pipeline holds no per-request state, so one instance serves any number of
threads; backends create their sessions once, at load time.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from runtime import manifest as manifest_io
from runtime import noise, sub_batches
from runtime.backends import Backend, DeviceResidentBackend, StageCallback, selection
from runtime.errors import ECARError, EngineError, InvalidRequestError, ManifestError, shown
from runtime.graphs import Call, Kind
from runtime.images import to_uint8
from runtime.manifest import Manifest
from runtime.request import RequestInputs, RequestState, walk

MAX_SAMPLES = 10_000  # samples of one generate_many call (and of one ecar-run)


@dataclass
class Timings:
    """Seconds spent per stage, per graph, in backend calls, and for the whole request."""

    stages: list[float] = field(default_factory=list)
    graphs: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    decoder: float = 0.0
    total: float = 0.0

    @property
    def backend(self) -> float:
        return float(sum(self.graphs.values()))

    @property
    def overhead(self) -> float:
        """Wall time outside backend calls (noise, reshapes, bookkeeping)."""
        return max(0.0, self.total - self.backend)

    def to_dict(self) -> dict[str, object]:
        return {
            "total_s": self.total,
            "backend_s": self.backend,
            "overhead_s": self.overhead,
            "stages_s": list(self.stages),
            "decoder_s": self.decoder,
            "graphs_s": dict(self.graphs),
            "graph_calls": dict(self.calls),
        }


@dataclass
class GenerateResult:
    images: np.ndarray  # uint8 [B, H, W, ch]
    latents: np.ndarray  # float32 [B, N_S, C], the decoder's input
    timings: Timings


class Pipeline:
    """A loaded engine directory that generates images: the graphs chained, the flow head's Euler loop driven.

    Load one with :meth:`from_dir`; :meth:`generate` runs one batch, :meth:`generate_many`
    any number of samples. The pipeline holds no per-request state, so one instance serves
    any number of threads (backends create their sessions once, at load time). A sample's
    image depends only on its label, its noise key and ``cfg``: sample i of a request with
    seed S draws its noise from key (S, i), on every backend and in any batch.

    Args:
        manifest: the validated build (:func:`runtime.manifest.load`).
        backend: what runs its graphs (:func:`runtime.backends.selection.open_backend`).
        device_resident: where the backend can run a whole request on its device
            (:class:`~runtime.backends.DeviceResidentBackend`: TensorRT), do so; False walks
            the graphs through ``backend.run`` instead.

    Examples:
        >>> from runtime import Pipeline
        >>> pipe = Pipeline.from_dir(engine_dir)  # the demo: 16x16 grey digits, classes 0..9
        >>> result = pipe.generate([3, 1, 4], seed=7)
        >>> result.images.shape, result.images.dtype
        ((3, 16, 16, 1), dtype('uint8'))
        >>> again = pipe.generate([3, 1, 4], seed=7)  # the same labels and seed: the same images
        >>> bool((again.images == result.images).all())
        True
    """

    def __init__(self, manifest: Manifest, backend: Backend, device_resident: bool = True) -> None:
        self.manifest = manifest
        self.model = manifest.model  # name, family and class count (runtime.manifest.ModelCard)
        self.plan = manifest.plan
        self.backend = backend
        self.device_resident = device_resident

    @classmethod
    def from_dir(
        cls,
        path: str | os.PathLike[str],
        backend: str = "auto",
        device: str = "auto",
        threads: int | None = None,
    ) -> Pipeline:
        """Load an engine directory written by ``ecar-export build``.

        Args:
            path: the engine directory.
            backend: "auto", "onnxruntime", "openvino" or "tensorrt". "auto" takes TensorRT
                plans where the build has them and TensorRT can run here, else ONNX Runtime on
                CUDA where onnxruntime-gpu is installed (and ``device`` is not "cpu"), else the
                fastest installed CPU backend (OpenVINO where installed, else ONNX Runtime;
                :mod:`runtime.backends.selection`).
            device: ONNX Runtime's device: "auto", "cpu" or "cuda".
            threads: caps the CPU threads of each graph (ONNX Runtime's intra-op threads,
                OpenVINO's inference threads; default: one per core), for processes that share
                a machine, such as several serving replicas.

        Raises:
            ManifestError: the directory holds no complete, intact build of this runtime's
                graph contract (the message says what to rebuild).
            BackendUnavailableError: the backend asked for cannot run here.
            InvalidRequestError: an unknown backend or device, or a bad ``threads``.

        Examples:
            >>> pipe = Pipeline.from_dir(engine_dir, backend="onnxruntime", threads=1)
            >>> pipe.backend.name, pipe.manifest.precision, pipe.max_batch
            ('onnxruntime', 'fp32', 8)
            >>> Pipeline.from_dir(engine_dir, backend="tensorrt")
            Traceback (most recent call last):
            ...
            runtime.errors.BackendUnavailableError: '...' holds no TensorRT plans (built for onnxruntime); ...
        """
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise InvalidRequestError(f"threads must be a positive integer or None, got {threads!r}")
        selection.check_choice(backend)
        selection.check_device(device)
        for _ in range(2):  # a build that commits into the directory while we load: load the new build
            before = manifest_io.committed_digest(path)
            try:
                manifest = manifest_io.load(path)
                return cls(manifest, selection.open_backend(manifest, backend, device, threads))
            except ECARError:
                if manifest_io.committed_digest(path) == before:
                    raise  # nothing changed under us: the error is the build's
        raise ManifestError(
            f"the engine directory '{path}' changed while it was being loaded (a build committed into it twice); "
            "retry when the build has finished"
        )

    @property
    def max_batch(self) -> int:
        return self.manifest.max_batch

    # ------------------------------------------------------------------ API
    def generate(
        self,
        labels: Sequence[int] | np.ndarray,
        seed: int | Sequence[int] = 0,
        cfg: float | None = None,
        on_stage: StageCallback | None = None,
    ) -> GenerateResult:
        """Generate one batch (at most ``max_batch`` samples).

        Args:
            labels: one class label per sample (integers in ``[0, num_classes)``).
            seed: an integer (sample i draws its noise from key (seed, i)) or one integer per
                sample (sample i from key (seed[i], 0)), each in [0, 2**63 - 1].
            cfg: the guidance weight; None takes the build's default (its plan's ``cfg``).
            on_stage: called with (stages done, stages in all) after each stage.

        Returns:
            :class:`GenerateResult`: ``images`` uint8 [B, H, W, ch], ``latents`` float32
            [B, N_S, C] (the decoder's input) and per-stage and per-graph ``timings``.

        Raises:
            InvalidRequestError: (also a ``ValueError``) bad labels, seeds or cfg, or a batch
                beyond the build's profile.

        Examples:
            >>> pipe = Pipeline.from_dir(engine_dir)
            >>> result = pipe.generate([0, 1], seed=[11, 12], cfg=3.0)  # one seed per sample
            >>> result.images.shape, result.latents.shape
            ((2, 16, 16, 1), (2, 64, 4))
            >>> sorted(result.timings.graphs), len(result.timings.stages)
            (['backbone', 'decoder', 'flow_step'], 4)
            >>> pipe.generate([10])
            Traceback (most recent call last):
            ...
            runtime.errors.InvalidRequestError: label 10 is out of range; this model knows classes 0..9
        """
        label_array = self._check_labels(labels)
        if len(label_array) > self.max_batch:
            raise InvalidRequestError(
                f"batch of {len(label_array)} exceeds this build's profile (max batch {self.max_batch}); "
                "split the request or rebuild with a larger --max-batch"
            )
        keys = noise.noise_keys(seed, len(label_array))
        return self._run(label_array, keys, cfg, on_stage)

    def generate_keyed(
        self,
        labels: Sequence[int] | np.ndarray,
        keys: Sequence[tuple[int, int]],
        cfg: float | None = None,
        on_stage: StageCallback | None = None,
    ) -> GenerateResult:
        """One batch with explicit noise keys: sample i draws its noise from ``keys[i]``.

        This is how independent requests share one engine batch: request r with seed S_r
        contributes keys (S_r, 0), (S_r, 1), ..., so each of its samples gets exactly the
        noise it gets when served alone (``generate(labels_r, seed=S_r)``).
        """
        label_array = self._check_labels(labels)
        if len(keys) != len(label_array):
            raise InvalidRequestError(f"got {len(keys)} noise keys for {len(label_array)} labels; give one per label")
        if len(label_array) > self.max_batch:
            raise InvalidRequestError(
                f"batch of {len(label_array)} exceeds this build's profile (max batch {self.max_batch})"
            )
        return self._run(label_array, noise.check_keys(keys), cfg, on_stage)

    def generate_many(
        self,
        labels: Sequence[int] | np.ndarray,
        seed: int | Sequence[int] = 0,
        cfg: float | None = None,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> GenerateResult:
        """Any number of samples (at most :data:`MAX_SAMPLES`), run in batches of ``max_batch``; images equal one
        big ``generate``."""
        label_array = self._check_labels(labels)
        if len(label_array) > MAX_SAMPLES:
            raise InvalidRequestError(
                f"{len(label_array):,} samples in one call; at most {MAX_SAMPLES:,} (its images are held in memory "
                "together): split the work into several calls"
            )
        keys = noise.noise_keys(seed, len(label_array))
        results = []
        for start in range(0, len(label_array), self.max_batch):
            stop = start + self.max_batch
            results.append(self._run(label_array[start:stop], keys[start:stop], cfg, None))
            if on_batch:
                on_batch(min(stop, len(label_array)), len(label_array))
        timings = Timings()
        for result in results:
            timings.total += result.timings.total
            timings.decoder += result.timings.decoder
            for name, seconds in result.timings.graphs.items():
                timings.graphs[name] += seconds
                timings.calls[name] += result.timings.calls[name]
            for index, seconds in enumerate(result.timings.stages):
                if index < len(timings.stages):
                    timings.stages[index] += seconds
                else:
                    timings.stages.append(seconds)
        return GenerateResult(
            np.concatenate([r.images for r in results]), np.concatenate([r.latents for r in results]), timings
        )

    # ------------------------------------------------------------- internals
    def _check_labels(self, labels: Sequence[int] | np.ndarray) -> np.ndarray:
        one_dimensional = labels.ndim == 1 if isinstance(labels, np.ndarray) else isinstance(labels, Sequence)
        if isinstance(labels, (str, bytes)) or not one_dimensional:
            raise InvalidRequestError(f"labels must be a list of integers, got {shown(labels)}")
        values = list(labels.tolist() if isinstance(labels, np.ndarray) else labels)
        if not values:
            raise InvalidRequestError("labels must not be empty; give at least one class label")
        classes = self.model.num_classes
        for value in values:
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise InvalidRequestError(
                    f"label {shown(value)} is not an integer; labels are integers in [0, {classes - 1}]"
                )
            if not 0 <= int(value) < classes:
                raise InvalidRequestError(
                    f"label {shown(value)} is out of range; this model knows classes 0..{classes - 1}"
                )
        return np.asarray(values, dtype=np.int64)

    def _run(
        self,
        labels: np.ndarray,
        keys: list[tuple[int, int]],
        cfg: float | None,
        on_stage: StageCallback | None,
    ) -> GenerateResult:
        begin = time.perf_counter()
        timings = Timings()
        inputs = RequestInputs.draw(self.plan, labels, keys, cfg)
        if self.device_resident and isinstance(self.backend, DeviceResidentBackend):
            out = self.backend.run_request(inputs, on_stage)  # every intermediate stays on the device
            timings.stages = list(out.stage_seconds)
            timings.graphs.update(out.graph_seconds)
            timings.calls.update(out.graph_calls)
            timings.decoder = out.decoder_seconds
            _check_finite(out.latents, "the request (checked after its last stage on the device)")
            _check_finite(out.image, "the decoder", "pixels")
            images = to_uint8(out.image)
            timings.total = time.perf_counter() - begin
            return GenerateResult(images, out.latents, timings)
        stage_begin = begin

        def run(call: Call, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            nonlocal stage_begin
            start = time.perf_counter()
            if call.graph == Kind.BACKBONE:
                stage_begin = start
            outputs = self._call(call, feeds, len(labels))
            end = time.perf_counter()
            timings.graphs[str(call.graph)] += end - start
            timings.calls[str(call.graph)] += 1
            if call.graph == Kind.DECODER:
                timings.decoder = end - start
                _check_finite(outputs[0], "the decoder", "pixels")
            if call.ends_stage:
                _check_finite(outputs[0], f"stage {call.stage}")
                timings.stages.append(end - stage_begin)
                if on_stage:
                    on_stage(call.stage, self.plan.num_stages)
            return outputs

        manifest = self.manifest
        state: RequestState[np.ndarray] = RequestState(self.plan, manifest.specs, manifest.constants, inputs)
        walk(state, self.plan.calls(manifest.fuse_flow_loop), run)
        images = to_uint8(state.image)
        timings.total = time.perf_counter() - begin
        return GenerateResult(images, state.latents, timings)

    def _call(self, call: Call, feeds: dict[str, np.ndarray], batch: int) -> list[np.ndarray]:
        """``call`` on the backend, cut along its batch where it is large (:mod:`runtime.sub_batches`): the
        decoder into the plan's ``decoder_batch`` images (its activations are a request's largest), a
        backbone or flow call, on a backend with an ``activation_budget`` (the CPU backends), into as many
        samples as keep its conditioning within that budget."""
        spec = self.manifest.graphs[call.graph].spec  # not manifest.specs: that builds a dict on every call
        if call.graph == Kind.DECODER:
            step = self.plan.decoder_batch
        else:
            budget = getattr(self.backend, "activation_budget", None)
            if budget is None:
                return self.backend.run(call, feeds)
            step = sub_batches.samples_per_call(spec, self.plan.dims(call.stage, 1), budget)
        return sub_batches.run_cut(spec, feeds, batch, step, lambda part: self.backend.run(call, part))


def _check_finite(values: np.ndarray, where: str, what: str = "latents") -> None:
    """Latents or pixels that came out NaN or infinite are an error naming where, never a black image (the
    classic failure of a VAE decoder run in half precision: its GroupNorm statistics overflow)."""
    if not np.isfinite(values).all():
        raise EngineError(
            f"{where} produced non-finite {what} (NaN or inf) although the request was valid: the engines' numbers "
            "overflowed; try the fp32 build, a smaller cfg, or report it with the model and the request"
        )
