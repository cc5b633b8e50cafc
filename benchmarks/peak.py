"""The machine's GEMM peak per precision: the best rate any installed engine reaches on one square product.

For each precision a pipeline variant can run at, one ``[n, n] @ W[n, n]`` product (``W`` a
constant, as weights are) on all physical cores, through every installed engine that runs it;
median of ``--repeats`` calls after one warm-up; the best engine's median is the precision's peak:

* **fp32**: ONNX Runtime MatMul (the runtime's session options), ``torch.mm`` in float32,
  OpenVINO MatMul at ``INFERENCE_PRECISION_HINT`` f32;
* **bf16**: ``torch.mm`` in bfloat16; OpenVINO MatMul at bf16 where the CPU has avx512_bf16 or AMX;
* **int8**: ONNX Runtime MatMulInteger (uint8 × int8), ONNX Runtime and OpenVINO on a Q/DQ MatMul
  (uint8 activations, int8 weights: the int8 builds' pattern).

OpenVINO's compiled precision is read back (the hint, and the runtime precision of its
FullyConnected node). Also a theoretical peak per precision from the CPU's flags, vendor/family and
clock (:func:`theoretical`; the formula and its assumptions go with it). ``pipeline_speed.py`` runs
:func:`measure` in the same run; alone, it writes ``benchmarks/results/peak.json``:

    python benchmarks/peak.py [--size 2048] [--repeats 10] [--threads N] [--out PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import RESULTS, begin_run, cpu, machine, write_json  # noqa: E402

PRECISIONS = ("fp32", "bf16", "int8")
# OpenVINO's execution-graph layer types that compute products
PRODUCTS = ("FullyConnected", "MatMul", "Convolution", "GroupConvolution", "Deconvolution")


def _time(call: Callable[[], Any], repeats: int) -> tuple[float, float]:
    call()  # warm-up: weight packing, thread pool start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def _model(nodes: list[Any], inputs: list[Any], initializers: list[Any], size: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "gemm",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def fp32_model(size: int, rng: np.random.Generator) -> onnx.ModelProto:
    weight = numpy_helper.from_array(rng.standard_normal((size, size), dtype=np.float32), "w")
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])]
    return _model([helper.make_node("MatMul", ["a", "w"], ["y"])], inputs, [weight], size)


def qdq_model(size: int, rng: np.random.Generator) -> onnx.ModelProto:
    """float ``a`` -> Q/DQ (uint8, asymmetric) -> MatMul <- DQ(int8 constant, symmetric): the int8 builds' pattern."""
    weight = rng.integers(-127, 128, (size, size), dtype=np.int8)
    initializers = [
        numpy_helper.from_array(weight, "w_q"),
        numpy_helper.from_array(np.array(0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "w_zero"),
        numpy_helper.from_array(np.array(8.0 / 255, np.float32), "a_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "a_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["a", "a_scale", "a_zero"], ["a_q"]),
        helper.make_node("DequantizeLinear", ["a_q", "a_scale", "a_zero"], ["a_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"]),
        helper.make_node("MatMul", ["a_dq", "w_dq"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])]
    return _model(nodes, inputs, initializers, size)


def matmul_integer_model(size: int, rng: np.random.Generator) -> onnx.ModelProto:
    """uint8 ``a`` @ int8 constant -> int32, cast to float (ONNX Runtime's integer GEMM alone)."""
    weight = numpy_helper.from_array(rng.integers(-127, 128, (size, size), dtype=np.int8), "w")
    zero = numpy_helper.from_array(np.array(128, np.uint8), "a_zero")
    nodes = [
        helper.make_node("MatMulInteger", ["a", "w", "a_zero"], ["y_int"]),
        helper.make_node("Cast", ["y_int"], ["y"], to=TensorProto.FLOAT),
    ]
    inputs = [helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size])]
    return _model(nodes, inputs, [weight, zero], size)


def ort_rate(model: onnx.ModelProto, feed: np.ndarray, threads: int, repeats: int) -> tuple[float, float]:
    import onnxruntime as ort

    from runtime.backends.onnxruntime_backend import session_options

    session = ort.InferenceSession(
        model.SerializeToString(), sess_options=session_options(threads), providers=["CPUExecutionProvider"]
    )
    feeds = {"a": feed}
    return _time(lambda: session.run(None, feeds), repeats)


def openvino_rate(
    model: onnx.ModelProto, feed: np.ndarray, threads: int, repeats: int, hint: str
) -> tuple[float, float, dict[str, Any]]:
    """Median/min seconds of the ONNX ``model`` compiled by OpenVINO at ``hint``; what it compiled to."""
    import openvino as ov

    core = ov.Core()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "gemm.onnx"
        onnx.save(model, path)
        compiled = core.compile_model(
            core.read_model(str(path)),
            "CPU",
            {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads},
        )
    request = compiled.create_infer_request()
    median, best = _time(lambda: request.infer({0: feed}), repeats)
    return median, best, {"inference_precision": compiled_precision(compiled)} | runtime_precisions(compiled)


def compiled_precision(compiled: Any) -> str:
    """An OpenVINO compiled model's ``INFERENCE_PRECISION_HINT`` as OpenVINO spells it (f32, bf16, f16)."""
    value = compiled.get_property("INFERENCE_PRECISION_HINT")
    return value.to_string() if hasattr(value, "to_string") else str(value)


def runtime_precisions(compiled: Any) -> dict[str, Any]:
    """The layer types and runtime precisions of an OpenVINO compiled model's products (its execution graph)."""
    products: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if layer in PRODUCTS:
            precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
            key = f"{layer}:{precision}"
            products[key] = products.get(key, 0) + 1
    return {"products": products}


def torch_rate(size: int, threads: int, repeats: int, dtype: Any) -> tuple[float, float]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=generator).to(dtype)
        w = torch.randn(size, size, generator=generator).to(dtype)
        with torch.no_grad():
            return _time(lambda: torch.mm(a, w), repeats)
    finally:
        torch.set_num_threads(previous)


def default_threads() -> int:
    """All physical cores this process may use."""
    info = cpu()
    cores = [n for n in (info["physical_cores"], info["usable_threads"]) if n]
    return max(1, min(cores)) if cores else 1


def measure(size: int = 2048, threads: int | None = None, repeats: int = 10) -> dict[str, Any]:
    """Every engine's rate per precision; the best per precision is its peak (``peak_gflops_per_s``)."""
    threads = threads or default_threads()
    features = set(cpu()["features"])
    rng = np.random.default_rng(0)
    work = 2 * size**3
    a32 = rng.standard_normal((size, size), dtype=np.float32)
    a8 = rng.integers(0, 256, (size, size), dtype=np.uint8)
    runs: list[tuple[str, str, Callable[[], tuple[Any, ...]]]] = [
        ("fp32", "onnxruntime MatMul", lambda: ort_rate(fp32_model(size, rng), a32, threads, repeats)),
        ("fp32", "torch.mm float32", lambda: torch_rate(size, threads, repeats, _torch_dtype("float32"))),
        ("fp32", "openvino MatMul f32", lambda: openvino_rate(fp32_model(size, rng), a32, threads, repeats, "f32")),
        ("bf16", "torch.mm bfloat16", lambda: torch_rate(size, threads, repeats, _torch_dtype("bfloat16"))),
        (
            "int8",
            "onnxruntime MatMulInteger u8 x s8",
            lambda: ort_rate(matmul_integer_model(size, rng), a8, threads, repeats),
        ),
        ("int8", "onnxruntime Q/DQ MatMul", lambda: ort_rate(qdq_model(size, rng), a32, threads, repeats)),
        ("int8", "openvino Q/DQ MatMul", lambda: openvino_rate(qdq_model(size, rng), a32, threads, repeats, "f32")),
    ]
    if features & {"avx512_bf16", "amx_bf16"}:
        runs.insert(
            4,
            (
                "bf16",
                "openvino MatMul bf16",
                lambda: openvino_rate(fp32_model(size, rng), a32, threads, repeats, "bf16"),
            ),
        )
    measured: list[dict[str, Any]] = []
    for precision, engine, run in runs:
        entry: dict[str, Any] = {"precision": precision, "engine": engine}
        try:
            median, best, *extra = run()
        except Exception as exc:  # an engine that is not installed or cannot run the product
            entry["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        else:
            entry.update(
                median_s=median,
                min_s=best,
                gflops_per_s=work / median / 1e9,
                best_gflops_per_s=work / best / 1e9,
                **(extra[0] if extra else {}),
            )
        measured.append(entry)
    peaks: dict[str, Any] = {}
    for precision in PRECISIONS:
        rates = [m for m in measured if m["precision"] == precision and "gflops_per_s" in m]
        if rates:
            top = max(rates, key=lambda m: m["gflops_per_s"])
            peaks[precision] = {"gflops_per_s": top["gflops_per_s"], "engine": top["engine"]}
    theory = theoretical()
    bounds = theory.get("gflops_per_s", {})
    theory["measured_above"] = [p for p, v in peaks.items() if p in bounds and v["gflops_per_s"] > bounds[p]]
    if theory["measured_above"]:
        theory["measured_above_note"] = (
            "a measured peak above the theoretical one: the CPU model, clock or core count this machine reports "
            "(a hypervisor's) is not what computes; read the measured peaks"
        )
    return {
        "size": size,
        "threads": threads,
        "repeats": repeats,
        "flops_per_call": work,
        "note": f"one [n,n] @ W[n,n] product (W a constant), n = {size}, on {threads} threads; median of "
        f"{repeats} calls after a warm-up; a precision's peak is its best engine's median",
        "measured": measured,
        "peak_gflops_per_s": {p: v["gflops_per_s"] for p, v in peaks.items()},
        "peak_engine": {p: v["engine"] for p, v in peaks.items()},
        "theoretical": theory,
    }


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def theoretical(info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Peak GFLOP/s per precision from the CPU's flags, vendor/family and clock, where computable.

    fp32: cores × MHz × FLOP per cycle and core, with FLOP/cycle = FMA units × fp32 lanes × 2:
    AVX-512 on Intel 2 × 16 × 2 = 64 (Xeon Gold/Platinum; parts with one AVX-512 FMA unit have half),
    AVX-512 on AMD Zen 4 (family 25: 256-bit datapath) 2 × 8 × 2 = 32, Zen 5 (family 26) 64,
    AVX2 with FMA 2 × 8 × 2 = 32. bf16: AMX 1024 FLOP/cycle (a TMUL: 512 bf16 multiply-adds per
    cycle), else avx512_bf16 twice fp32 (VDPBF16PS: two products per fp32 lane). int8: AMX 2048
    ops/cycle, else VNNI (avx512_vnni / avx_vnni) four times fp32 (VPDPBUSD: four u8×s8 products
    per 32-bit lane). The clock is ``cpuinfo_max_freq`` where the kernel has it, else
    ``/proc/cpuinfo``'s MHz (no turbo; under a hypervisor the nominal clock). A hypervisor may also
    report a CPU model other than the host's: a measured rate above this peak says so.
    """
    info = info or cpu()
    features = set(info["features"])
    cores, vendor, family = info["physical_cores"], info["vendor"], info["family"]
    mhz = info["max_mhz"] or info["mhz"]
    clock = "cpuinfo_max_freq" if info["max_mhz"] else "/proc/cpuinfo cpu MHz"
    per_cycle: float | None
    if "avx512f" in features:
        if vendor == "AuthenticAMD":
            per_cycle, unit = (
                (32.0, "AMD Zen 4: 2 FMA x 8 fp32 lanes (256-bit datapath) x 2")
                if family == 25
                else (
                    64.0,
                    "AMD with AVX-512 (Zen 5 and later assumed): 2 FMA x 16 fp32 lanes x 2",
                )
            )
        else:
            per_cycle, unit = 64.0, "AVX-512: 2 FMA units x 16 fp32 lanes x 2 (assumes two AVX-512 FMA units)"
    elif {"avx2", "fma"} <= features:
        per_cycle, unit = 32.0, "AVX2: 2 FMA units x 8 fp32 lanes x 2"
    else:
        per_cycle, unit = None, "no FMA: not computed"
    result: dict[str, Any] = {"clock_mhz": mhz, "clock_source": clock, "cores": cores, "fp32_per_cycle": unit}
    if not (per_cycle and mhz and cores):
        return result | {"gflops_per_s": {}}
    scale = cores * mhz * 1e6 / 1e9
    rates: dict[str, float] = {"fp32": scale * per_cycle}
    if "amx_bf16" in features:
        rates["bf16"], result["bf16_per_cycle"] = scale * 1024, "AMX: 1024"
    elif "avx512_bf16" in features:
        rates["bf16"], result["bf16_per_cycle"] = scale * 2 * per_cycle, "avx512_bf16: 2 x fp32"
    if "amx_int8" in features:
        rates["int8"], result["int8_per_cycle"] = scale * 2048, "AMX: 2048"
    elif features & {"avx512_vnni", "avx_vnni"}:
        rates["int8"], result["int8_per_cycle"] = scale * 4 * per_cycle, "VNNI: 4 x fp32"
    result["formula"] = "cores x clock x FLOP per cycle and core (see the *_per_cycle entries)"
    result["gflops_per_s"] = rates
    return result


def print_peak(peak: dict[str, Any]) -> None:
    print(f"\nGEMM peak ({peak['note']})")
    theory = peak["theoretical"].get("gflops_per_s", {})
    for entry in peak["measured"]:
        if "error" in entry:
            print(f"  {entry['precision']:5} {entry['engine']:36} failed: {entry['error']}")
            continue
        compiled = (
            f"  compiled {entry['inference_precision']} {entry.get('products', '')}" if "products" in entry else ""
        )
        print(f"  {entry['precision']:5} {entry['engine']:36} {entry['gflops_per_s']:9.1f} GFLOP/s{compiled}")
    for precision, rate in peak["peak_gflops_per_s"].items():
        bound = theory.get(precision)
        versus = f" (theoretical {bound:.0f}: {100 * rate / bound:.0f} %)" if bound else ""
        print(f"  peak {precision}: {rate:.1f} GFLOP/s, {peak['peak_engine'][precision]}{versus}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="side of the square product")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per engine after one warm-up")
    parser.add_argument("--threads", type=int, help="threads per engine (default: every physical core)")
    parser.add_argument("--out", type=Path, default=RESULTS / "peak.json")
    parser.add_argument("--smoke", action="store_true", help="label the JSON a smoke run (not a measurement)")
    args = parser.parse_args()
    begin_run()
    peak = measure(args.size, args.threads, args.repeats)
    print_peak(peak)
    write_json(args.out, {"smoke": args.smoke, "peak": peak, "machine": machine()})


if __name__ == "__main__":
    main()
