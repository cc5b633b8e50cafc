"""The image decoder alone: diffusers' ``AutoencoderKL.decode`` in torch against the decoder graph on the engines.

For a preset with a KL tokenizer (default ``ecar-b``: MAR's KL-16 layout, 256² images, benchmark
weights without zero tensors), times one batch of ``--batch`` token grids through:

* torch: the model's own ``decode_tokens`` (the latent un-scaling, then the diffusers
  ``AutoencoderKL``'s ``post_quant_conv`` and ``decoder``: what ``AutoencoderKL.decode`` runs),
  eager at fp32 and under bf16 autocast, and under ``torch.compile`` (inductor, freezing) at fp32
  and bf16 autocast (the compile, the first call, reported apart);
* the decoder graph of the fp32 and fp16 builds (``benchmarks/.cache/engines/<preset>/``, shared
  with pipeline_speed.py, built when missing) on ONNX Runtime and OpenVINO, in the runtime's
  sub-batches (the build plan's ``decoder_batch``) with the runtime's session options;
* the same fp32 graph with the INT8 recipe's Q/DQ on its convolutions (``op_types`` MatMul, Gemm
  and Conv; the default recipe leaves the decoder's convolutions float), calibrated on the final
  latents of four fp32 requests of ``--batch`` samples (a fifth request's checks it) on both engines.

Variants are timed round-robin (``pipeline_speed.time_variants``); each one's images are compared
with torch eager fp32's (cosine, max |diff| in [0, 1] pixels). FLOPs per image from the graph
(``ecar_export.flops``), and each variant's share of the machine's GEMM peak for the precision it
runs (``peak.py``, measured before and after). Writes benchmarks/results/decoder_speed_<preset>.json.

    python benchmarks/decoder_speed.py [--preset ecar-b] [--batch 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch._inductor.config
from _common import CACHE, RESULTS, begin_run, benchmark_model, machine, write_json
from pipeline_speed import autocast_bf16, measure_peak, time_variants

from ecar_export import flops
from ecar_export.build import build_engines
from ecar_export.precision import int8, qdq
from runtime import manifest as manifest_io
from runtime.backends.onnxruntime_backend import session_options
from runtime.graphs import Kind

CONV_OPS = ("MatMul", "Gemm", "Conv")  # the INT8 recipe's products plus the decoder's convolutions
CALIBRATION_REQUESTS = 4  # fp32 requests whose final latents calibrate the convolutions' Q/DQ (one more checks)


def decoder_file(preset: str, model: Any, precision: str, batch: int) -> Any:
    """The decoder graph file of the cached ``precision`` build (built when missing) and its manifest."""
    directory = CACHE / "engines" / preset / precision
    if not (directory / "manifest.json").is_file():
        build_engines(model, directory, max_batch=batch, precision=precision)
    manifest = manifest_io.load(directory)
    return manifest.path(manifest.graphs[Kind.DECODER].file), manifest


def pipeline_latents(preset: str, model: Any, batch: int) -> np.ndarray:
    """Decoder inputs as requests produce them: the final latents of ``CALIBRATION_REQUESTS + 1`` requests
    of ``batch`` samples (random labels, seeds 0, 1, ...) on the fp32 build (ONNX Runtime); cached."""
    from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from runtime.pipeline import Pipeline

    cached = CACHE / "decoder-int8-conv" / preset / f"latents-b{batch}.npy"
    if cached.is_file():
        return np.load(cached)
    _, manifest = decoder_file(preset, model, "fp32", batch)
    pipe = Pipeline(manifest, OnnxRuntimeBackend(manifest, device="cpu", threads=2))
    rng = np.random.default_rng(1)
    latents = [
        pipe.generate(rng.integers(0, model.config.num_classes, size=batch).tolist(), seed=seed).latents
        for seed in range(CALIBRATION_REQUESTS + 1)
    ]
    cached.parent.mkdir(parents=True, exist_ok=True)
    np.save(cached, np.concatenate(latents))
    return np.load(cached)


def conv_int8_graph(preset: str, model: Any, batch: int) -> tuple[Path, dict[str, Any]]:
    """The fp32 decoder with Q/DQ on its convolutions, calibrated on the final latents of fp32 requests
    (:func:`pipeline_latents`: the last request's held out to check it); saved (with its weights beside it)
    under benchmarks/.cache/decoder-int8-conv/<preset>/."""
    from calibration.readers import FeedList
    from ecar_export import weights_io

    latents = pipeline_latents(preset, model, batch)
    fp32_path, _ = decoder_file(preset, model, "fp32", batch)
    fp32_graph = onnx.load(str(fp32_path))
    # a 256² decode is 250 GFLOP: calibrate on 2-image calls of the first requests, check on the last one's
    calls = [{"x": latents[i : i + 2]} for i in range(0, len(latents), 2)]
    held_out, calibration = calls[-batch // 2 :], calls[: -batch // 2]
    quantized = int8.quantize(fp32_graph, FeedList(calibration), op_types=CONV_OPS, threads=2)
    agreement = qdq.compare_graphs(fp32_graph, quantized, held_out, threads=2)
    report = {
        "quantized_convolutions": len(qdq.quantized_nodes(quantized, ("Conv",))),
        "convolutions": sum(1 for node in fp32_graph.graph.node if node.op_type == "Conv"),
        "calibration_images": 2 * len(calibration),
        "held_out_images": 2 * len(held_out),
        "held_out_cosine": {name: a.cosine for name, a in agreement.items()},
        "calibration_inputs": "final latents of fp32 requests (ONNX Runtime), random labels, seeds 0..",
    }
    target = CACHE / "decoder-int8-conv" / preset / "decoder.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    weights_io.save_with_external_data(quantized, target)
    return target, report


def ort_runner(graph: Path, threads: int, x: np.ndarray, step: int) -> Callable[[], np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), session_options(threads), providers=["CPUExecutionProvider"])
    return lambda: np.concatenate([session.run(None, {"x": x[i : i + step]})[0] for i in range(0, len(x), step)])


def openvino_runner(graph: Path, precision: str, threads: int, x: np.ndarray, step: int) -> tuple[Callable, str]:
    import openvino as ov

    from runtime.backends.openvino_backend import compile_config, cpu_capabilities

    core = ov.Core()
    compiled = core.compile_model(str(graph), "CPU", compile_config(precision, cpu_capabilities(core), threads))
    request = compiled.create_infer_request()

    def run() -> np.ndarray:
        out = []
        for i in range(0, len(x), step):
            request.infer({"x": np.ascontiguousarray(x[i : i + step])})
            out.append(np.array(request.get_output_tensor(0).data, copy=True))
        return np.concatenate(out)

    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    return run, hint.to_string() if hasattr(hint, "to_string") else str(hint)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ecar-b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gemm-size", type=int, default=2048)
    parser.add_argument("--gemm-repeats", type=int, default=10)
    args = parser.parse_args()
    begin_run()
    torch.set_num_threads(args.threads)
    model, weights = benchmark_model(args.preset, seed=0)
    config = model.config
    if config.tokenizer != "kl":
        parser.error(f"--preset {args.preset} has the small conv tokenizer; pick one with a KL autoencoder")
    x = np.random.default_rng(0).standard_normal((args.batch, config.tokens_per_stage[-1], config.latent_channels))
    x = x.astype(np.float32)
    fp32_path, fp32_manifest = decoder_file(args.preset, model, "fp32", args.batch)
    fp16_path, _ = decoder_file(args.preset, model, "fp16", args.batch)
    conv_int8, int8_report = conv_int8_graph(args.preset, model, args.batch)
    decoder_graph = onnx.load(str(fp32_path), load_external_data=False)
    spec = fp32_manifest.graphs[Kind.DECODER].spec
    step = fp32_manifest.plan.decoder_batch
    graph_flops = flops.call_flops(decoder_graph, spec, fp32_manifest.plan, config.num_stages, 1)["total"]

    tokens = torch.from_numpy(x)
    torch._inductor.config.freezing = True  # weights folded in as constants, as pipeline_speed's compiled peers
    compiled = {
        bf16: torch.compile(autocast_bf16(model.decode_tokens) if bf16 else model.decode_tokens, dynamic=False)
        for bf16 in (False, True)
    }

    def torch_runner(function: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            with torch.no_grad():
                return function(tokens).float().numpy()

        return run

    runners: dict[str, Callable[[], np.ndarray]] = {
        "torch eager fp32": torch_runner(model.decode_tokens),
        "torch eager bf16": torch_runner(autocast_bf16(model.decode_tokens)),
        "torch compile fp32": torch_runner(compiled[False]),
        "torch compile bf16": torch_runner(compiled[True]),
    }
    compile_seconds = {}
    for name in ("torch compile fp32", "torch compile bf16"):
        start = time.perf_counter()
        runners[name]()
        compile_seconds[name] = time.perf_counter() - start
    precision_of = {
        "torch eager fp32": "fp32",
        "torch eager bf16": "bf16",
        "torch compile fp32": "fp32",
        "torch compile bf16": "bf16",
    }
    runners["ORT fp32"] = ort_runner(fp32_path, args.threads, x, step)
    runners["ORT fp16 build"] = ort_runner(fp16_path, args.threads, x, step)
    runners["ORT int8 conv"] = ort_runner(conv_int8, args.threads, x, step)
    precision_of.update({"ORT fp32": "fp32", "ORT fp16 build": "fp32", "ORT int8 conv": "int8"})
    hints = {}
    for name, graph, build_precision in (
        ("OpenVINO fp32", fp32_path, "fp32"),
        ("OpenVINO fp16 build", fp16_path, "fp16"),
        ("OpenVINO int8 conv", conv_int8, "int8"),
    ):
        runners[name], hints[name] = openvino_runner(graph, build_precision, args.threads, x, step)
        precision_of[name] = (
            "int8" if build_precision == "int8" else {"f32": "fp32", "bf16": "bf16"}.get(hints[name], "fp16")
        )

    reference = runners["torch eager fp32"]()
    checks = {}
    for name, run in runners.items():
        got = run().astype(np.float64).ravel()
        want = reference.astype(np.float64).ravel()
        cosine = float(got @ want / np.sqrt((got @ got) * (want @ want)))
        checks[name] = {"image_cosine": cosine, "max_abs_pixel": float(np.max(np.abs(got - want)))}

    peak_before = measure_peak(args.gemm_size, args.threads, args.gemm_repeats, "before")
    walls, _ = time_variants({name: (lambda run=run: (run(), None)[1]) for name, run in runners.items()}, args.repeats)
    peak_after = measure_peak(args.gemm_size, args.threads, args.gemm_repeats, "after")
    peaks = {
        p: max(peak_before["peak_gflops_per_s"][p], peak_after["peak_gflops_per_s"][p])
        for p in peak_before["peak_gflops_per_s"]
    }
    work = graph_flops * args.batch
    reference_bf16 = float(np.median(walls["torch compile bf16"]))
    rows = []
    for name, seconds in walls.items():
        median = float(np.median(seconds))
        rate = work / median / 1e9
        precision = precision_of[name]
        rows.append(
            {
                "variant": name,
                "seconds": median,
                "min_seconds": min(seconds),
                "max_seconds": max(seconds),
                "images_per_s": args.batch / median,
                "vs_torch_compile_bf16": reference_bf16 / median,
                "gflops_per_s": rate,
                "runs_at": precision,
                "share_of_peak": rate / peaks[precision] if peaks.get(precision) else None,
                "openvino_inference_precision": hints.get(name),
                **checks[name],
            }
        )
    print(f"\n{args.preset} decoder, batch {args.batch} (sub-batches of {step}), {graph_flops / 1e9:.1f} GFLOP/image")
    print(f"{'variant':<22}{'s/batch':>9}{'img/s':>8}{'vs compile bf16':>17}{'GFLOP/s':>9}{'of peak':>9}{'cosine':>10}")
    for row in rows:
        share = f"{100 * row['share_of_peak']:.0f} % {row['runs_at']}" if row["share_of_peak"] else "-"
        print(
            f"{row['variant']:<22}{row['seconds']:>9.2f}{row['images_per_s']:>8.2f}"
            f"{row['vs_torch_compile_bf16']:>16.2f}×{row['gflops_per_s']:>9.0f}{share:>14}{row['image_cosine']:>10.5f}"
        )
    write_json(
        RESULTS / f"decoder_speed_{args.preset}.json",
        {
            "preset": args.preset,
            "batch": args.batch,
            "sub_batch": step,
            "repeats": args.repeats,
            "threads": args.threads,
            "gflop_per_image": graph_flops / 1e9,
            "decoder_layout": {
                "tokenizer_channels": list(config.tokenizer_channels),
                "latent_channels": config.latent_channels,
                "image_size": config.image_size,
            },
            **weights,
            "int8_conv": int8_report,
            "compile_seconds": compile_seconds,
            "peak_gflops_per_s": peaks,
            "peak_before": peak_before,
            "peak_after": peak_after,
            "rows": rows,
            "engine_dir_fp32": str(fp32_manifest.root),
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
