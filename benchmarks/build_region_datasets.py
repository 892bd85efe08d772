"""Build the split-mask caption datasets of the development data and record their statistics and timings.

Usage: python benchmarks/build_region_datasets.py [--data ../shared/data] [--out outputs/region_datasets]
       [--num-proc 2] [--agreement-sample 300]

Prints JSON lines and writes benchmarks/results/region_datasets.json; the Markdown summary in
benchmarks/results/region_datasets.md is written from the same numbers. Measures:
- split only: DBSCAN region splitting of every NEU-Seg train mask (masks read beforehand, timed apart),
  in one process and in two (the machine's two cores);
- agreement: on a sample of NEU-Seg masks and on every magnetic-tile mask, whether the subsampled split
  finds as many regions as clustering every pixel (max_points large enough that nothing is subsampled);
- build: `hub.datasets.build_dataset` for magnetic_tile and neu_seg, end to end.
Wall-clock and CPU seconds are both given, with the load average: other work on a shared machine
stretches wall time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time
from pathlib import Path

import numpy as np

from defectclip.data import IndexMaskDataset, MVTecDataset, load_index_mask, load_mask
from defectclip.data.regions import split_regions, split_sample_regions
from hub.datasets import BuildConfig, build_dataset, source_info

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        gpu = "no GPU"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {gpu}, Python {platform.python_version()}"


def _children_cpu() -> float:
    """CPU seconds of finished child processes (worker pools) so far."""
    times = os.times()
    return times.children_user + times.children_system


class Timer:
    """Wall seconds, CPU seconds of this process and of the worker processes it waited for, and the
    1-minute load average at the start (above 2 on this 2-core machine, other work competed)."""

    def __enter__(self) -> "Timer":
        self.wall, self.cpu, self.children = time.perf_counter(), time.process_time(), _children_cpu()
        self.load = os.getloadavg()[0]
        return self

    def __exit__(self, *exc) -> None:
        self.wall = round(time.perf_counter() - self.wall, 2)
        self.cpu = round(time.process_time() - self.cpu, 2)
        self.children = round(_children_cpu() - self.children, 2)

    def as_dict(self) -> dict:
        return {"wall_s": self.wall, "cpu_s": self.cpu, "worker_cpu_s": self.children,
                "load_avg_1min_at_start": round(self.load, 2)}


def read_masks_by_type(root: Path, split: str) -> list[dict[str, np.ndarray]]:
    dataset = IndexMaskDataset(root, split)
    masks = []
    for ref in dataset.refs:
        index = load_index_mask(ref.index_mask_path)
        masks.append({name: index == k for k, name in sorted(dataset.classes.items()) if (index == k).any()})
    return masks


def _split_counts(masks: dict[str, np.ndarray]) -> tuple[int, int]:
    result = split_sample_regions(masks)
    return len(result), result.total_dropped


def split_only(root: Path, workers: int) -> dict:
    """Split every train image's masks, in this process or in a pool of `workers` forked processes."""
    with Timer() as reading:
        images = read_masks_by_type(root, "train")
    with Timer() as splitting:
        if workers == 1:
            counts = [_split_counts(masks) for masks in images]
        else:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                counts = pool.map(_split_counts, images, chunksize=64)
    return {
        "measure": "split_only", "dataset": "neu_seg/train", "workers": workers, "images": len(images),
        "masks": sum(len(m) for m in images), "regions": sum(n for n, _ in counts),
        "dropped": sum(d for _, d in counts),
        "read_masks": reading.as_dict(), "split": splitting.as_dict(),
        "ms_per_image_wall": round(1000 * splitting.wall / len(images), 2),
    }


def read_mvtec_masks(root: Path) -> list[np.ndarray]:
    dataset = MVTecDataset(root, "test")
    return [load_mask(path) for ref in dataset.refs for path in ref.mask_paths.values()]


def agreement(name: str, masks: list[np.ndarray], sample: int, seed: int = 0) -> dict:
    """Region counts from the default (subsampled) split versus clustering every pixel."""
    picks = np.random.default_rng(seed).choice(len(masks), size=min(sample, len(masks)), replace=False)
    same, subsampled = 0, 0
    for i in picks:
        fast = split_regions(masks[i])
        full = split_regions(masks[i], max_points=masks[i].size)
        same += len(fast) == len(full)
        subsampled += fast.stride > 1
    return {"measure": "subsample_agreement", "dataset": name, "masks": len(picks),
            "subsampled": subsampled, "same_region_count": same, "share_same": round(same / len(picks), 3)}


def build(data: Path, out: Path, name: str, num_proc: int) -> dict:
    config = BuildConfig(source=data / name, out_dir=out / name, overwrite=True, num_proc=num_proc,
                         repo_id=f"defectclip/{name.replace('_', '-')}-regions")
    with Timer() as timer:
        stats = build_dataset(config, source_info(data / name))
    size = sum(p.stat().st_size for p in (out / name).rglob("*") if p.is_file())
    return {"measure": "build", "dataset": name, "out_dir": str(out / name), "num_proc": num_proc,
            **timer.as_dict(), "output_mb": round(size / 2**20, 1), "stats": stats}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="magnetic_tile/ and neu_seg/")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "region_datasets", help="built datasets go here")
    parser.add_argument("--num-proc", type=int, default=2, help="generator processes per build (default: both cores)")
    parser.add_argument("--agreement-sample", type=int, default=300, help="masks compared against full resolution")
    parser.add_argument("--results", type=Path, default=RESULTS / "region_datasets.json", help="JSON written here")
    args = parser.parse_args(argv)

    lines = [{"measure": "machine", "machine": machine()}]
    print(json.dumps(lines[-1]), flush=True)
    steps = [
        lambda: split_only(args.data / "neu_seg", 1),
        lambda: split_only(args.data / "neu_seg", 2),
        lambda: agreement("neu_seg/train", [m for image in read_masks_by_type(args.data / "neu_seg", "train")
                                            for m in image.values()], args.agreement_sample),
        lambda: agreement("magnetic_tile/test", read_mvtec_masks(args.data / "magnetic_tile"), 10_000),
        lambda: build(args.data, args.out, "magnetic_tile", args.num_proc),
        lambda: build(args.data, args.out, "neu_seg", args.num_proc),
    ]
    for step in steps:
        lines.append(step())
        summary = {k: v for k, v in lines[-1].items() if k != "stats"}
        print(json.dumps(summary), flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(lines, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
