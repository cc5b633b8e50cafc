"""FLOPs per stage and per image: ECAR against its single-stage (S = 1) baseline, DiT-XL/2 and FlowAR.

Exports fp32 graphs of ``ecar-digits`` / ``ecar-digits-s1`` and ``ecar-b`` / ``ecar-b-s1``
(each S = 1 preset: one stage at the full token grid, the same total number of flow steps,
otherwise the same architecture) into ``benchmarks/.cache/engines/<preset>/fp32`` (reused when
unchanged; the benchmark weights of ``_common.benchmark_model``, so the cache is the one
pipeline_speed.py builds: FLOPs depend on shapes only) and counts every MatMul/Gemm/Conv with
``ecar_export.flops`` at batch 1.

Counts are FLOPs at 2 per multiply-add. Two per-image views:
- *per image*: everything one generated image costs — every stage's backbone call and all its
  flow-head steps, both halves of classifier-free guidance (the graphs run 2B rows), plus the
  decoder;
- *per network forward*: one pass of the backbone over the image's whole token sequence plus
  one flow-head evaluation of every token, for one guidance branch — the analogue of one
  DiT forward pass (a velocity for every token).

DiT-XL/2 (Peebles & Xie, 2023) is published at 118.6 Gflops per forward at 256×256; that
figure counts multiply-accumulates (28 blocks × 256 tokens × 12·1152² + attention ≈ 118.4 G,
recomputed below), i.e. 237.2 GFLOPs in this counter's convention. Its decoder (the SD VAE) is
not in that figure, so the comparison leaves ECAR's decoder out too. DiT samples with 250
DDPM steps and guidance: 2 × 250 forwards per image.

``--families`` counts ``ecar-b`` beside FlowAR-S and FlowAR-L (random init, the authors' configs; their
graphs exported like any build): FlowAR denoises every stage's whole token grid from fresh noise with a
transformer head over 25 steps, ECAR each stage's window with a per-token head over 4. Both use the
same KL-16 decoder, so the comparison is of the generators.

Prints tables; writes benchmarks/results/flops_compare.json.

    python benchmarks/flops_compare.py [--pairs digits,b] [--families ecar-b,flowar-s,flowar-l]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from _common import CACHE, RESULTS, benchmark_model, load_average, machine, write_json

from ecar_export import families, flops
from ecar_export.build import build_engines

PAIRS = {"digits": ("ecar-digits", "ecar-digits-s1"), "b": ("ecar-b", "ecar-b-s1")}
DIT_XL2_GMACS = 118.6  # published "Gflops" per forward, 256×256, patch 2 (multiply-accumulates)
DIT_SAMPLING_STEPS = 250


def dit_xl2_macs_estimate() -> float:
    """Multiply-accumulates of DiT-XL/2's transformer blocks at 256×256 (28 × D=1152, 256 tokens)."""
    depth, width, tokens = 28, 1152, 256
    per_block = tokens * 12 * width**2 + 2 * tokens**2 * width  # qkv+proj+MLP(4×), QK^T and AV
    return depth * per_block


def count(preset: str) -> dict[str, Any]:
    """FLOPs of one image of ``preset`` from its exported fp32 graphs."""
    out = CACHE / "engines" / preset / "fp32"
    start = time.perf_counter()
    model = benchmark_model(preset)[0]
    config = families.config_of(model)
    build_engines(model, out, max_batch=8)
    del model
    built = time.perf_counter() - start
    counted = flops.build_flops(out, batch=1)
    stages = [
        {
            "stage": s["stage"],
            "grid": f"{r}x{r}",
            "tokens": s["tokens"],
            "steps": s["steps"],
            "backbone": s["backbone"],
            "flow_per_step": s["flow_per_call"],
            "flow": s["flow"],
            "total": s["total"],
        }
        for s, r in zip(counted["stages"], config.scales)
    ]
    backbone = sum(s["backbone"] for s in stages)
    flow = sum(s["flow"] for s in stages)
    return {
        "preset": preset,
        "family": manifest_family(out),
        "scales": list(config.scales),
        "steps": [s["steps"] for s in stages],
        "total_flow_steps": sum(s["steps"] for s in stages),
        "build_or_reuse_s": built,
        "stages": stages,
        "per_image": {
            "backbone": backbone,
            "flow": flow,
            "decoder": counted["decoder"],
            "generator": backbone + flow,
            "total": counted["total"],
        },
        # one guidance branch: the backbone over every token once, the flow head on every token once
        "per_network_forward": (backbone + sum(s["flow_per_step"] for s in stages)) / 2,
    }


def manifest_family(engine_dir: Path) -> str:
    from runtime import manifest as manifest_io

    return manifest_io.load(engine_dir, verify_files=False).model.family


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="digits,b", help=f"comma-separated subset of {', '.join(PAIRS)}")
    parser.add_argument(
        "--families",
        default="ecar-b,flowar-s,flowar-l",
        help="presets of any family counted side by side ('' for none); ratios are to the first",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "flops_compare.json")
    args = parser.parse_args()
    load_start = load_average()
    dit_forward = 2e9 * DIT_XL2_GMACS
    results: dict[str, Any] = {}
    for key in args.pairs.split(","):
        multi, single = PAIRS[key]
        a, b = count(multi), count(single)
        results[key] = {
            "ecar": a,
            "single_stage": b,
            "single_stage_over_ecar": {
                "generator_per_image": b["per_image"]["generator"] / a["per_image"]["generator"],
                "total_per_image": b["per_image"]["total"] / a["per_image"]["total"],
                "per_network_forward": b["per_network_forward"] / a["per_network_forward"],
            },
        }
        print_pair(a, b)
    if "b" in results:
        ecar_b = results["b"]["ecar"]
        results["b"]["dit_xl2"] = {
            "published_gmacs_per_forward": DIT_XL2_GMACS,
            "recomputed_gmacs_per_forward_blocks_only": dit_xl2_macs_estimate() / 1e9,
            "flops_per_forward": dit_forward,
            "sampling_steps": DIT_SAMPLING_STEPS,
            "flops_per_image_with_cfg": 2 * DIT_SAMPLING_STEPS * dit_forward,
            "ecar_b_generator_per_image_over_one_dit_forward": ecar_b["per_image"]["generator"] / dit_forward,
            "ecar_b_network_forward_over_dit_forward": ecar_b["per_network_forward"] / dit_forward,
            "dit_image_over_ecar_b_image": 2 * DIT_SAMPLING_STEPS * dit_forward / ecar_b["per_image"]["generator"],
        }
        dit = results["b"]["dit_xl2"]
        print(
            f"\nDiT-XL/2, 256x256: {DIT_XL2_GMACS} G multiply-adds per forward (published; recomputed from its "
            f"blocks: {dit['recomputed_gmacs_per_forward_blocks_only']:.1f} G) = {dit_forward / 1e9:.1f} GFLOP"
        )
        print(
            f"  ecar-b per image (all stages, all steps, both guidance halves, no decoder): "
            f"{ecar_b['per_image']['generator'] / 1e9:.1f} GFLOP = "
            f"{dit['ecar_b_generator_per_image_over_one_dit_forward']:.2f} DiT-XL/2 forwards"
        )
        print(
            f"  ecar-b one network forward (one guidance branch): {ecar_b['per_network_forward'] / 1e9:.1f} GFLOP "
            f"= {dit['ecar_b_network_forward_over_dit_forward']:.2f} x a DiT-XL/2 forward"
        )
        print(
            f"  DiT-XL/2 per image at {DIT_SAMPLING_STEPS} steps with guidance: "
            f"{dit['flops_per_image_with_cfg'] / 1e12:.1f} TFLOP = {dit['dit_image_over_ecar_b_image']:.0f} x ecar-b"
        )
    side_by_side = [count(p) for p in args.families.split(",") if p]
    if side_by_side:
        print_side_by_side(side_by_side)
    write_json(
        args.out,
        {
            "note": "FLOPs = 2 per multiply-add of MatMul/Gemm/Conv, counted from exported fp32 graphs at batch 1 "
            "(ecar_export.flops); per image includes both classifier-free-guidance halves; per network forward = "
            "(backbone over all tokens + one flow-head call per stage) / 2, one guidance branch",
            "machine": {**machine(), "load_average_at_start": load_start, "load_average_at_end": load_average()},
            "pairs": results,
            "families": {
                "presets": side_by_side,
                "generator_per_image_over_first": {
                    item["preset"]: item["per_image"]["generator"] / side_by_side[0]["per_image"]["generator"]
                    for item in side_by_side
                },
            },
        },
    )


def print_pair(a: dict[str, Any], b: dict[str, Any]) -> None:
    print(f"\n{'preset':15} {'stage':>5} {'grid':>6} {'steps':>5} {'backbone GF':>12} {'flow GF':>10} {'total GF':>10}")
    for item in (a, b):
        for s in item["stages"]:
            print(
                f"{item['preset']:15} {s['stage']:5d} {s['grid']:>6} {s['steps']:5d} {s['backbone'] / 1e9:12.4f} "
                f"{s['flow'] / 1e9:10.4f} {s['total'] / 1e9:10.4f}"
            )
        image = item["per_image"]
        print(
            f"{item['preset']:15} {'image':>5} {'':>6} {item['total_flow_steps']:5d} {image['backbone'] / 1e9:12.4f} "
            f"{image['flow'] / 1e9:10.4f} {image['generator'] / 1e9:10.4f}  (+ decoder {image['decoder'] / 1e9:.4f})"
        )
    ratio = b["per_image"]["generator"] / a["per_image"]["generator"]
    print(f"{b['preset']} / {a['preset']}: {ratio:.2f}x the FLOPs per image (decoder excluded)")


def print_side_by_side(items: list[dict[str, Any]]) -> None:
    first = items[0]["per_image"]["generator"]
    ratio = "x " + items[0]["preset"]
    print(
        f"\n{'preset':10} {'family':7} {'steps':>6} {'backbone GF':>12} {'flow GF':>10} {'generator GF':>13} "
        f"{ratio:>10} {'decoder GF':>11}"
    )
    for item in items:
        image = item["per_image"]
        print(
            f"{item['preset']:10} {item['family']:7} {item['total_flow_steps']:6d} {image['backbone'] / 1e9:12.1f} "
            f"{image['flow'] / 1e9:10.1f} {image['generator'] / 1e9:13.1f} {image['generator'] / first:10.2f} "
            f"{image['decoder'] / 1e9:11.1f}"
        )


if __name__ == "__main__":
    main()
