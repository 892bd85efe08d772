"""Time the anomaly syntheses on synthetic 256x256 images and print one JSON line per method.

Usage: python benchmarks/bench_synth.py [--size 256] [--repeats 50] [--torch-batch 2] [--torch-threads 1]
The images are made here (smooth colour ramps plus noise), so no dataset is needed. Each line has the
median and the 10th/90th percentile wall time of one call in milliseconds, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from defectclip.synth import synthesize
from defectclip.synth.poisson_torch import poisson_blend


def textured_image(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    base = np.stack([x / size * 200, y / size * 200, 100 + 50 * np.sin(x / 6.0)], axis=-1)
    return np.clip(base + rng.normal(0, 10, base.shape) + 20, 0, 255).astype(np.uint8)


def machine() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {device}"


def time_calls(call, repeats: int) -> dict:
    """Median/percentile wall time of one call, plus median CPU time of this process (all threads).

    On a shared machine wall time includes waiting for other processes' work; CPU time does not, so a
    large gap between them means the machine was busy (load_avg_1m says how busy)."""
    call(0)  # warm-up: first calls pay for lazy initialisation
    wall, cpu = [], []
    for seed in range(repeats):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        call(seed)
        wall.append((time.perf_counter() - wall_start) * 1000)
        cpu.append((time.process_time() - cpu_start) * 1000)
    p10, median, p90 = np.percentile(wall, [10, 50, 90])
    return {
        "median_ms": round(median, 2),
        "p10_ms": round(p10, 2),
        "p90_ms": round(p90, 2),
        "cpu_median_ms": round(float(np.median(cpu)), 2),
        "repeats": repeats,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def bench_numpy_methods(size: int, repeats: int) -> None:
    image, other = textured_image(size, 0), textured_image(size, 1)[..., ::-1].copy()
    for name in ("nsa", "cutpaste", "perlin"):
        stats = time_calls(lambda seed: synthesize(name, image, other, seed), repeats)
        print(json.dumps({"bench": "synth", "method": name, "size": size, **stats, "machine": machine()}))


def bench_torch_blend(size: int, batch: int, repeats: int) -> None:
    """poisson_blend on a batch of `batch` images with one 40%-side square patch each (the NSA maximum)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    target = torch.from_numpy(np.stack([textured_image(size, s) for s in range(batch)])).permute(0, 3, 1, 2)
    source = target.flip(0).to(device)
    target = target.to(device)
    mask = torch.zeros(batch, size, size, dtype=torch.bool, device=device)
    side = int(0.4 * size)
    mask[:, size // 4 : size // 4 + side, size // 4 : size // 4 + side] = True

    def call(_seed: int) -> None:
        poisson_blend(target, source, mask)
        if device == "cuda":
            torch.cuda.synchronize()

    stats = time_calls(call, 3)
    print(json.dumps({"bench": "poisson_torch", "device": device, "batch": batch, "size": size,
                      "threads": torch.get_num_threads(), **stats, "machine": machine()}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per numpy method")
    parser.add_argument("--torch-batch", type=int, default=2, help="batch size for the torch Poisson blend; 0 skips it")
    parser.add_argument("--torch-threads", type=int, default=0, help="CPU threads for torch; 0 keeps torch's default")
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    bench_numpy_methods(args.size, args.repeats)
    if args.torch_batch:
        bench_torch_blend(args.size, args.torch_batch, args.repeats)


if __name__ == "__main__":
    main()
