"""Choose the app's example images by a fixed rule, and write where to click on each (demo/examples/).

    python scripts/make_examples.py --regions outputs/magnetic_tile_regions [--out demo/examples]

Every example comes from the describer's held-out split (`test` of the split-mask caption dataset built
with `python -m hub.datasets build ... --include-normal`), so no example was trained on:
- per defect type, the first held-out image (by source name) holding exactly one region of that type;
- the first held-out defect-free image;
- one mixed-type image: that defect-free image with the region of the two most frequent held-out types'
  examples Poisson-blended in (`defectclip.data.transplant`), away from each other.
`clicks.json` names, per file, the object, a point on each defect (its mask's pixel nearest the
mask's centroid) with the true type and caption, and a clean point (the pixel farthest from every
defect and from the border). The app test clicks there.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from scipy import ndimage

from defectclip.data.transplant import transplant_region
from defectclip.region_dataset import RegionRecord, iter_region_records, open_region_split

ROOT = Path(__file__).resolve().parents[1]
CLICKS_FILE = "clicks.json"


def point_on(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the mask pixel nearest its centroid: inside the region even when it is curved."""
    ys, xs = np.nonzero(mask)
    nearest = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    return int(xs[nearest]), int(ys[nearest])


def clean_point(defects: np.ndarray) -> tuple[int, int]:
    """(x, y) farthest from every defect pixel and from the image border."""
    free = np.pad(~defects, 1, constant_values=False)
    distance = ndimage.distance_transform_edt(free)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(x), int(y)


def to_uint8(record: RegionRecord) -> np.ndarray:
    return (record.image.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)


def entry(record_object: str, masks: list[np.ndarray], defects: list[str], captions: list[str]) -> dict:
    union = np.stack(masks).any(axis=0) if masks else None
    return {"object": record_object,
            "defects": [{"type": d, "caption": c, "xy": list(point_on(m))} for m, d, c in zip(masks, defects, captions)],
            "clean_xy": list(clean_point(union)) if union is not None else None}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regions", type=Path, required=True, help="magnetic_tile split-mask dataset (--include-normal)")
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "magnetic_tile",
                        help="the dataset's source folder (the examples are its unmodified files)")
    parser.add_argument("--out", type=Path, default=ROOT / "demo" / "examples")
    args = parser.parse_args(argv)
    split = open_region_split(args.regions, "test")
    sources = split["source"]
    records = list(iter_region_records(args.regions, "test", include_normal=True))
    order = sorted(range(len(records)), key=lambda i: sources[i])
    chosen: dict[str, int] = {}
    good = None
    for i in order:
        record = records[i]
        if len(record.masks) == 0 and good is None:
            good = i
        elif len(record.masks) == 1 and record.defects[0] not in chosen:
            chosen[record.defects[0]] = i
    clicks = {}
    for old in args.out.glob("magnetic_tile_*.png"):
        old.unlink()
    for defect, i in sorted(chosen.items()):
        record, source = records[i], Path(sources[i])
        name = f"magnetic_tile_{defect}_{source.stem}.png"
        shutil.copy2(args.source / source, args.out / name)
        clicks[name] = entry(record.object, list(record.masks), record.defects, record.captions)
    canvas = records[good]
    name = f"magnetic_tile_good_{Path(sources[good]).stem}.png"
    shutil.copy2(args.source / sources[good], args.out / name)
    clicks[name] = {"object": canvas.object, "defects": [], "clean_xy": list(clean_point(np.zeros(canvas.masks.shape[1:], bool)))}
    clicks.update(mixed_example(records, chosen, canvas, sources[good], args.out))
    (args.out / CLICKS_FILE).write_text(json.dumps(clicks, indent=2) + "\n")
    print(json.dumps(clicks))
    return clicks


def mixed_example(records, chosen: dict[str, int], canvas: RegionRecord, canvas_source: str, out: Path) -> dict:
    from PIL import Image

    counts: dict[str, int] = {}
    for record in records:
        for defect in record.defects:
            counts[defect] = counts.get(defect, 0) + 1
    first, second = sorted(counts, key=lambda d: (-counts[d], d))[:2]
    rng = np.random.default_rng(0)
    image, masks, defects, captions = to_uint8(canvas), [], [], []
    for defect in (first, second):
        record = records[chosen[defect]]
        allowed = None if not masks else ndimage.distance_transform_edt(~np.stack(masks).any(axis=0)) > 20
        placed = transplant_region(to_uint8(record), record.masks[0], image, defect, seed=rng, allowed=allowed)
        image = placed.image
        masks.append(placed.mask)
        defects.append(defect)
        captions.append(record.captions[0])
    name = f"magnetic_tile_mixed_{first}_{second}_on_{Path(canvas_source).stem}.png"
    Image.fromarray(image[..., 0] if (image == image[..., :1]).all() else image).save(out / name)
    return {name: entry(canvas.object, masks, defects, captions)}


if __name__ == "__main__":
    main()
