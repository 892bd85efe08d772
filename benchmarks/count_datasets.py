"""Read the development datasets with defectclip's readers and print their counts as JSON lines.

Checks the counts that ../shared/data/README.md states, so a reader bug shows up as a mismatch.
Usage: python benchmarks/count_datasets.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from defectclip.data import IndexMaskDataset, MVTecDataset

EXPECTED_MAGNETIC_TILE = {
    ("train", "good"): 635, ("test", "good"): 317, ("test", "blowhole"): 115, ("test", "break"): 85,
    ("test", "crack"): 57, ("test", "fray"): 32, ("test", "uneven"): 103,
}
EXPECTED_NEU_SEG = {"train": 3630, "test": 840}


def count_magnetic_tile(root: Path) -> tuple[dict, bool]:
    counts = Counter()
    for split in ("train", "test"):
        for ref in MVTecDataset(root, split).refs:
            counts[(split, ref.defect)] += 1
    return {f"{split}/{defect}": n for (split, defect), n in sorted(counts.items())}, counts == Counter(EXPECTED_MAGNETIC_TILE)


def count_neu_seg(root: Path, check_masks: bool) -> tuple[dict, bool]:
    result, ok = {}, True
    for split in ("train", "test"):
        dataset = IndexMaskDataset(root, split)
        result[split] = len(dataset)
        ok &= len(dataset) == EXPECTED_NEU_SEG[split]
        if check_masks:
            types = Counter(len(dataset[i].masks) for i in range(len(dataset)))
            result[f"{split}_types_per_image"] = dict(sorted(types.items()))
    return result, ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data",
                        help="folder holding magnetic_tile/ and neu_seg/")
    parser.add_argument("--read-masks", action="store_true", help="also read every neu_seg mask (slower)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    tile, tile_ok = count_magnetic_tile(args.data / "magnetic_tile")
    print(json.dumps({"dataset": "magnetic_tile", "counts": tile, "matches_readme": tile_ok}))
    steel, steel_ok = count_neu_seg(args.data / "neu_seg", args.read_masks)
    print(json.dumps({"dataset": "neu_seg", "counts": steel, "matches_readme": steel_ok}))
    print(json.dumps({"seconds": round(time.perf_counter() - start, 2)}))
    return 0 if tile_ok and steel_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
