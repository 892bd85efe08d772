"""Small defects on large images: the resize plan against native-resolution tiles, side by side.

    python benchmarks/small_defects.py --data ../shared/data/magnetic_tile \
        --out benchmarks/results/small_defects.json

The large images are built from the development data, not drawn:
- every large image is a mosaic of `grid` x `grid` normal tiles of the category, each resized to
  `cell` px (1024 x 1024 px by default); train mosaics use train/good tiles (by default as many
  mosaics as those tiles fill: the full training data), test mosaics the held-out test/good tiles;
- half of the test mosaics get one REAL defect region (a connected component of a ground-truth
  mask, cut with its own pixels from a test image) transplanted at its native scale with Poisson
  blending (`defectclip.data.transplant`), kept only if it covers at most `--max-defect-fraction`
  (0.5 %) of the large image.

The same PatchCore (same trunk, layers, coreset ratio and seeds) is then fitted and scored twice:
`resize` (the whole mosaic to `--image-size`, today's default) and `tiles` (windows of
`--image-size` px at native resolution, overlapping by an eighth). Features are extracted once per
plan and reused for every seed; the seed changes the coreset. Each line printed is JSON; the
result file holds per-plan image AUROC, pixel AUROC and AUPRO (mean and std over seeds), the
defect sizes, and the predict cost per megapixel on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_backbones import machine_description  # noqa: E402  (benchmarks/ is not a package)

from defectclip.data import MVTecDataset, array_to_tensor, load_image_array, load_mask  # noqa: E402
from defectclip.data.transplant import transplant_region  # noqa: E402
from defectclip.io import write_json_atomic  # noqa: E402
from defectclip.metrics import evaluate  # noqa: E402
from defectclip.scoring import PatchCore  # noqa: E402
from defectclip.towers import build_vision_tower  # noqa: E402

MIN_DEFECT_PIXELS = 16  # smaller components are mask noise (single stray pixels), not defects


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="an MVTec AD category folder (normal tiles + masked defects)")
    parser.add_argument("--tower", default="offline:efficientnet_lite0", help="vision tower spec")
    parser.add_argument("--grid", type=int, default=4, help="normal tiles per side of a large image")
    parser.add_argument("--cell", type=int, default=256, help="side of one normal tile in the mosaic, px")
    parser.add_argument("--train", type=int, default=0,
                        help="normal large images to fit on (0: as many as the train tiles would fill, 635 // 16 = 39 "
                             "for magnetic tile; each mosaic draws its tiles at random)")
    parser.add_argument("--test", type=int, default=100, help="large test images, half of them with a defect")
    parser.add_argument("--max-defect-fraction", type=float, default=0.005, help="largest defect area / image area")
    parser.add_argument("--image-size", type=int, default=256, help="resize plan: model size; tiles plan: tile size")
    parser.add_argument("--coreset-ratio", type=float, default=0.01, help="PatchCore memory bank fraction")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="coreset seeds")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the mosaics and defect placement")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="runs/small_defects.json", help="result file (default under runs/, ignored by git)")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# the large images


@dataclass
class LargeImage:
    image: np.ndarray  # H x W x 3 uint8
    mask: np.ndarray  # H x W bool
    defect: str


def mosaic(paths: Sequence[Path], grid: int, cell: int) -> np.ndarray:
    rows = []
    for r in range(grid):
        row = [cv2.resize(load_image_array(p), (cell, cell), interpolation=cv2.INTER_AREA) for p in paths[r * grid : (r + 1) * grid]]
        rows.append(np.concatenate(row, axis=1))
    return np.concatenate(rows, axis=0)


def defect_regions(dataset: MVTecDataset, max_pixels: int) -> list[tuple[Path, np.ndarray, str]]:
    """Every connected defect component of the test masks small enough for the benchmark."""
    regions = []
    for ref in dataset.refs:
        for defect, mask_path in ref.mask_paths.items():
            count, labels = cv2.connectedComponents(load_mask(mask_path).astype(np.uint8), connectivity=8)
            for label in range(1, count):
                component = labels == label
                if MIN_DEFECT_PIXELS <= component.sum() <= max_pixels:
                    regions.append((ref.image_path, component, defect))
    return regions


def build_images(args: argparse.Namespace) -> tuple[list[LargeImage], list[LargeImage]]:
    rng = np.random.default_rng(args.data_seed)
    per_image = args.grid * args.grid
    train_paths = [r.image_path for r in MVTecDataset(args.data, "train").refs]
    test_set = MVTecDataset(args.data, "test")
    good_paths = [r.image_path for r in test_set.refs if r.defect == "good"]
    train_count = args.train or len(train_paths) // per_image
    for name, paths, count in (("train/good", train_paths, train_count), ("test/good", good_paths, args.test)):
        if len(paths) < per_image:
            raise SystemExit(f"{name} has {len(paths)} tiles; one {args.grid} x {args.grid} mosaic needs {per_image}.")
    side = args.grid * args.cell
    regions = defect_regions(test_set, int(args.max_defect_fraction * side * side))
    train = [LargeImage(mosaic(rng.choice(train_paths, per_image, replace=False), args.grid, args.cell),
                        np.zeros((side, side), bool), "good") for _ in range(train_count)]
    test = []
    for index in range(args.test):
        image = mosaic(rng.choice(good_paths, per_image, replace=False), args.grid, args.cell)
        if index % 2 == 0:
            test.append(LargeImage(image, np.zeros((side, side), bool), "good"))
            continue
        source, region, defect = regions[int(rng.integers(len(regions)))]
        placed = transplant_region(load_image_array(source), region, image, defect, seed=rng)
        test.append(LargeImage(placed.image, placed.mask, defect))
    return train, test


# --------------------------------------------------------------------------------------------------
# scoring


def run_plan(tower, plan: str, train: list[LargeImage], test: list[LargeImage], args) -> list[dict]:
    def model(seed: int) -> PatchCore:
        return PatchCore(tower, image_size=args.image_size, plan=plan, coreset_ratio=args.coreset_ratio,
                         seed=seed, device="cpu", batch_size=8)

    extractor = model(args.seeds[0])
    train_features = list(extractor.embed([array_to_tensor(x.image) for x in train]))
    test_images = [array_to_tensor(x.image) for x in test]
    start = time.perf_counter()
    test_features = list(extractor.embed(test_images))
    embed_s = time.perf_counter() - start
    megapixels = sum(im.shape[-2] * im.shape[-1] for im in test_images) / 1e6
    rows = []
    for seed in args.seeds:
        scorer = model(seed).fit_embedded(train_features, len(train))
        start = time.perf_counter()
        results = scorer.predict_embedded(test_features)
        score_s = time.perf_counter() - start
        metrics = evaluate(results, [x.mask for x in test], [int(x.defect != "good") for x in test])
        row = {
            "plan": plan, "seed": seed, **{k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro")},
            "predict_s_per_megapixel": (embed_s + score_s) / megapixels,
            "windows_per_image": len(scorer.plan.windows(*test_images[0].shape[-2:])),
            "bank_size": int(scorer.memory_bank.shape[0]),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def summary(rows: list[dict]) -> dict:
    out = {}
    for key in ("image_auroc", "pixel_auroc", "aupro", "predict_s_per_megapixel"):
        values = [r[key] for r in rows]
        out[key] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
    out["windows_per_image"] = rows[0]["windows_per_image"]
    return out


def defect_stats(test: list[LargeImage]) -> dict:
    fractions = [float(x.mask.mean()) for x in test if x.defect != "good"]
    return {
        "defective_images": len(fractions),
        "normal_images": len(test) - len(fractions),
        "defect_fraction_percent": {"min": 100 * min(fractions), "median": 100 * float(np.median(fractions)), "max": 100 * max(fractions)},
        "defect_types": sorted({x.defect for x in test if x.defect != "good"}),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    train, test = build_images(args)
    print(json.dumps({"built": len(train) + len(test), **defect_stats(test)}), flush=True)
    tower = build_vision_tower(args.tower)
    tile_plan = f"tiles:{args.image_size}:{args.image_size // 8}"
    runs = {name: run_plan(tower, plan, train, test, args) for name, plan in (("resize", "resize"), ("tiles", tile_plan))}
    report = {
        "machine": machine_description(),
        "note": "CPU shared with other jobs while measuring: times are upper bounds",
        "args": vars(args),
        "image_size_px": [args.grid * args.cell] * 2,
        "train_images": len(train),
        **defect_stats(test),
        "resize": summary(runs["resize"]),
        "tiles": {"plan": tile_plan, **summary(runs["tiles"])},
        "runs": runs["resize"] + runs["tiles"],
        "wall_s": time.perf_counter() - wall,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, report)
    print(json.dumps({k: report[k] for k in ("resize", "tiles", "wall_s")}), flush=True)
    return report


if __name__ == "__main__":
    main()
