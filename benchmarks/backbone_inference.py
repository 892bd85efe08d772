"""Each lever of the scoring backbone alone: memory layout, BatchNorm folding, conv + activation fusion,
bfloat16 (autocast or a bfloat16 copy) and float16, on the frozen tower PatchCore runs.

Prints one JSON line per (lever, batch) and writes results/backbone_inference.{json,md}: CPU ms per
image and per megapixel of model input (median of alternating rounds, so a load change on a shared
machine hits every lever alike) and the features' relative error against the exact float32 tower.
Images are random; speed does not depend on content, and the error is measured on real images by
vs_anomalib.py (image AUROC). Run with one thread:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/backbone_inference.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_anomalib import machine_description  # noqa: E402

from defectclip.io import write_json_atomic  # noqa: E402
from defectclip.scoring.inference import bf16_kernels_available, folded_copy  # noqa: E402
from defectclip.towers import OFFLINE_VISION, build_vision_tower  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tower", default=OFFLINE_VISION, help="vision tower spec")
    parser.add_argument("--layers", nargs="+", default=["blocks.2", "blocks.4"], help="stages PatchCore reads")
    parser.add_argument("--image-size", type=int, default=224, help="model input size (square), pixels")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes to time")
    parser.add_argument("--images", type=int, default=16, help="images per timing round")
    parser.add_argument("--rounds", type=int, default=7, help="alternating timing rounds (median kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="benchmarks/results/backbone_inference", help="output prefix for .json and .md")
    return parser.parse_args(argv)


def levers(tower, layers) -> dict[str, tuple[torch.nn.Module, torch.dtype, bool, Callable]]:
    """name -> (module, input dtype, channels-last input, context). Each adds one lever to the one
    before it, except autocast, which is the alternative to a bfloat16 copy."""
    plain = contextlib.nullcontext
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    return {
        "float32, NCHW input": (tower, torch.float32, False, plain),
        "float32, channels-last (previous default)": (tower, torch.float32, True, plain),
        "+ BatchNorm folded": (folded_copy(tower, layers, fuse=False), torch.float32, True, plain),
        "+ conv and activation fused (folded)": (folded_copy(tower, layers), torch.float32, True, plain),
        "float32 tower under bf16 autocast": (tower, torch.float32, True, autocast),
        "+ float16 copy (fp16)": (folded_copy(tower, layers, torch.float16), torch.float16, True, plain),
        "+ bfloat16 copy (bf16)": (folded_copy(tower, layers, torch.bfloat16), torch.bfloat16, True, plain),
    }


def prepare(images: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    images = images.to(dtype)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images.contiguous()


def relative_error(tower, module, dtype, channels_last, context, images, layers) -> float:
    """Largest over the stages of |features - exact features| / |exact features| (Frobenius norms)."""
    with torch.no_grad():
        exact = tower.forward_features(images, layers)
        with context():
            got = module.forward_features(prepare(images, dtype, channels_last), layers)
    return max(float((got[n].float() - exact[n]).norm() / exact[n].norm()) for n in layers)


def time_levers(cases: dict, images: torch.Tensor, batch: int, layers, rounds: int) -> dict[str, float]:
    batches = {name: [prepare(images[i : i + batch], dtype, cl) for i in range(0, len(images), batch)]
               for name, (_, dtype, cl, _) in cases.items()}
    times = {name: [] for name in cases}
    with torch.no_grad():
        for round_index in range(rounds + 1):
            for name, (module, _, _, context) in cases.items():
                start = time.process_time()
                with context():
                    for x in batches[name]:
                        module.forward_features(x, layers)
                if round_index:  # the first round sets up kernels: not timed
                    times[name].append(1000 * (time.process_time() - start) / len(images))
    return {name: float(np.median(values)) for name, values in times.items()}


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tower = build_vision_tower(args.tower)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, args.image_size, args.image_size, generator=generator)
    cases = levers(tower, args.layers)
    errors = {name: relative_error(tower, *case, images[:4], args.layers) for name, case in cases.items()}
    megapixels = args.image_size ** 2 / 1e6
    rows = []
    for batch in args.batches:
        for name, ms in time_levers(cases, images, batch, args.layers, args.rounds).items():
            row = {"lever": name, "batch": batch, "cpu_ms_per_image": ms, "cpu_ms_per_megapixel": ms / megapixels,
                   "feature_relative_error": errors[name]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {"args": vars(args), "machine": machine_description(), "amx": bf16_kernels_available(torch.device("cpu")),
              "rows": rows}
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), report)
    out.with_suffix(".md").write_text(markdown(report, args))
    return report


def markdown(report: dict, args) -> str:
    lines = [
        "<!-- generated by benchmarks/backbone_inference.py -->",
        "",
        f"`{args.tower}` to {args.layers} at {args.image_size} px, {report['machine']}, AMX tiles: "
        f"{'yes' if report['amx'] else 'no'}. CPU ms per image (median of {args.rounds} alternating rounds "
        f"of {args.images} random images); error = relative Frobenius error of the stage features against "
        "the exact float32 tower.",
        "",
        "| lever | " + " | ".join(f"batch {b} (ms / image)" for b in args.batches) + " | ms / megapixel (batch 1) | feature error |",
        "|---|" + "---|" * (len(args.batches) + 2),
    ]
    by_lever: dict[str, dict[int, dict]] = {}
    for row in report["rows"]:
        by_lever.setdefault(row["lever"], {})[row["batch"]] = row
    for lever, batches in by_lever.items():
        first = batches[args.batches[0]]
        cells = " | ".join(f"{batches[b]['cpu_ms_per_image']:.1f}" for b in args.batches)
        lines.append(f"| {lever} | {cells} | {first['cpu_ms_per_megapixel']:.0f} | {first['feature_relative_error']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
