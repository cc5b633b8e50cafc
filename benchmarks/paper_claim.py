"""The paper's claim at small scale: ECAR against the single-stage (S = 1) flow, same training budget.

Trains ``ecar-digits-s1`` (one stage at the full 8×8 token grid, 16 Euler steps: the same
total number of flow steps as ``ecar-digits``' 4 × 4) with exactly the recipe and budget of the
bundled ``ecar-digits`` checkpoint (``TrainSettings()``: 500 autoencoder steps, then 1,000
ECAR steps of batch 64 on the same training half of the digits, seed 0). The trained
checkpoint is cached under ``benchmarks/.cache/`` and reused; ``--retrain`` trains it again.

For the bundled ``ecar-digits`` and the trained ``ecar-digits-s1`` it then reports
- quality: the eval yardstick (``ecar_export.evaluate``: class accuracy and Fréchet distance)
  on the torch reference, ``--per-class 50`` at the model's default cfg (1.5), seeds 0…499,
  as in the README's demo numbers;
- FLOPs per image, counted from the exported fp32 graphs (``ecar_export.flops``);
- ORT fp32 latency of one request of ``--batch`` samples (median of ``--repeats`` after a warm-up).

Prints a table; writes benchmarks/results/paper_claim.json.

    python benchmarks/paper_claim.py [--retrain] [--batch 8] [--repeats 7] [--per-class 50]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import CACHE, RESULTS, load_average, machine, write_json

from ecar_export import checkpoint, flops, presets
from ecar_export.build import build_engines
from ecar_export.evaluate import evaluate, torch_sampler
from ecar_export.families.ecar.model import ECAR
from ecar_export.train import TrainSettings, train_demo
from runtime import manifest as manifest_io
from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from runtime.pipeline import Pipeline

BASELINE = "ecar-digits-s1"
BASELINE_CHECKPOINT = CACHE / f"{BASELINE}.safetensors"
BASELINE_RECORD = CACHE / f"{BASELINE}.json"


def trained_baseline(retrain: bool = False) -> tuple[Path, dict[str, Any]]:
    """The S = 1 baseline's checkpoint, trained with the bundled demo's settings (cached)."""
    if BASELINE_CHECKPOINT.is_file() and BASELINE_RECORD.is_file() and not retrain:
        return BASELINE_CHECKPOINT, json.loads(BASELINE_RECORD.read_text())
    settings = TrainSettings()
    print(f"training {BASELINE} ({settings.tokenizer_steps} + {settings.steps} steps) ...", flush=True)
    wall, cpu = time.perf_counter(), _cpu_seconds()
    last = [0.0]

    def report(phase: str, step: int, total: int, loss: float) -> None:
        if step % 100 == 0 or step == total:
            print(f"  {phase} {step}/{total} loss {loss:.4f} ({time.perf_counter() - wall:.0f} s)", flush=True)
            last[0] = loss

    model = train_demo(presets.architecture(BASELINE), settings, report)
    record = {
        "preset": BASELINE,
        "settings": settings.__dict__,
        "wall_s": time.perf_counter() - wall,
        "cpu_s": _cpu_seconds() - cpu,
        "final_loss": last[0],
        "load_average_at_end": load_average(),
    }
    CACHE.mkdir(parents=True, exist_ok=True)
    checkpoint.save(model, BASELINE_CHECKPOINT)
    BASELINE_RECORD.write_text(json.dumps(record, indent=2) + "\n")
    return BASELINE_CHECKPOINT, record


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(name: str, model: ECAR, per_class: int, batch: int, repeats: int, threads: int) -> dict[str, Any]:
    """Quality (torch reference), FLOPs per image (exported fp32 graphs), ORT fp32 and torch latency."""
    config = model.config
    print(f"{name}: eval yardstick, {per_class * 10} samples ...", flush=True)
    quality = evaluate(torch_sampler(model), per_class=per_class, seed=0)
    out = CACHE / "engines" / f"{name}-trained" / "fp32"
    build_engines(model, out, max_batch=batch)
    counted = flops.build_flops(out, batch)
    manifest = manifest_io.load(out)
    pipe = Pipeline(manifest, OnnxRuntimeBackend(manifest, device="cpu", threads=threads))
    labels = [i % config.num_classes for i in range(batch)]
    ort_s = _median_time(lambda: pipe.generate(labels, seed=0), repeats)
    torch_s = _median_time(lambda: model.sample(labels, seed=0), repeats)
    return {
        "model": name,
        "scales": list(config.scales),
        "steps": list(config.steps),
        "cfg": config.cfg_scale,
        "quality": quality.to_dict(),
        "flops_per_image": counted["per_image"],
        "flops_per_image_without_decoder": (counted["total"] - counted["decoder"]) / batch,
        "flops_per_stage_per_image": [s["total"] / batch for s in counted["stages"]],
        "ort_fp32_batch_s": ort_s,
        "ort_fp32_images_per_s": batch / ort_s,
        "torch_eager_batch_s": torch_s,
    }


def _median_time(run: Any, repeats: int) -> float:
    time.sleep(0.5)
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retrain", action="store_true", help="train the S = 1 baseline again (else reuse the cache)")
    parser.add_argument("--per-class", type=int, default=50, help="eval samples per class (README: 50)")
    parser.add_argument("--batch", type=int, default=8, help="batch of the latency measurement")
    parser.add_argument("--repeats", type=int, default=7, help="timed requests after one warm-up (>= 5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "paper_claim.json")
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    torch.set_num_threads(args.threads)
    load_start = load_average()
    baseline_path, training = trained_baseline(args.retrain)
    settings = (args.per_class, args.batch, args.repeats, args.threads)
    rows = [
        measure(presets.DEMO, presets.load(presets.DEMO).eval(), *settings),
        measure(BASELINE, checkpoint.load(baseline_path).eval(), *settings),
    ]
    ecar, single = rows
    print(
        f"\n{'model':15} {'stages':>6} {'steps':>5} {'accuracy':>8} {'Frechet':>8} {'GFLOP/img':>9} "
        f"{'ORT ms B=' + str(args.batch):>11} {'img/s':>6} {'torch ms':>9}"
    )
    for row in rows:
        q = row["quality"]
        print(
            f"{row['model']:15} {len(row['scales']):6d} {sum(row['steps']):5d} {100 * q['accuracy']:7.1f}% "
            f"{q['frechet_distance']:8.3f} {row['flops_per_image'] / 1e9:9.3f} {1000 * row['ort_fp32_batch_s']:11.1f} "
            f"{row['ort_fp32_images_per_s']:6.1f} {1000 * row['torch_eager_batch_s']:9.1f}"
        )
    print(f"(real-data Frechet floor {ecar['quality']['frechet_floor']:.3f})")
    write_json(
        args.out,
        {
            "note": "ecar-digits: the bundled checkpoint (ecar-export train-demo defaults = TrainSettings()); "
            "ecar-digits-s1: trained here with the same TrainSettings() (same data split, steps, batch, seed). "
            "Quality: ecar_export.evaluate on the torch reference at the model's default cfg, seeds 0.. "
            "(the README's demo protocol). FLOPs: exported fp32 graphs, 2 per multiply-add, both guidance halves. "
            "Latency: one request of `batch` samples, ORT CPU fp32, median of `repeats` after a warm-up.",
            "per_class": args.per_class,
            "batch": args.batch,
            "repeats": args.repeats,
            "threads": args.threads,
            "baseline_training": training,
            "machine": {**machine(), "load_average_at_start": load_start, "load_average_at_end": load_average()},
            "rows": rows,
            "single_stage_over_ecar": {
                "flops_per_image": single["flops_per_image"] / ecar["flops_per_image"],
                "ort_fp32_latency": single["ort_fp32_batch_s"] / ecar["ort_fp32_batch_s"],
                "frechet_distance": single["quality"]["frechet_distance"] / ecar["quality"]["frechet_distance"],
            },
        },
    )


if __name__ == "__main__":
    main()
