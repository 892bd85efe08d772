"""Choose the app's example images by a fixed rule, and write where to click on each (demo/examples/).

    python scripts/make_examples.py --regions outputs/magnetic_tile_regions [--out demo/examples]

Every example comes from the describer's held-out split (`test` of the split-mask caption dataset built
with `python -m hub.datasets build ... --include-normal`), so no example was trained on:
- per defect type, among held-out images holding exactly one region of that type, the one the shipped models
  (`--models`, the embedded default) handle, clearest first: the scorer puts it furthest above its threshold,
  and a click on the defect reads its type and a click on clean surface reads "no defect", as the app does it,
  each leading the runner-up by CLEAR_LEAD, on this CPU's default scoring path and on the exact float32 one;
- the held-out defect-free image furthest below the threshold whose clean click reads "no defect";
- one mixed-type image: that defect-free image with the region of the two most frequent held-out types'
  examples Poisson-blended in (`defectclip.data.transplant`) where they were in their own images, away from
  each other, at the first of a few placements the shipped models handle.
An example is a demonstration, so it shows a case the models get right; how often they do on held-out data is
`benchmarks/results/describer_regions.json`. A type with no such case falls back to its clearest image, said
on stderr.
`clicks.json` names, per file, the object, a point on each defect (its mask's pixel nearest the
mask's centroid) with the true type and caption, and a clean point (the pixel farthest from every
defect and from the border). The app test clicks there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from defectclip.data.transplant import transplant_region
from defectclip.region_dataset import RegionRecord, iter_region_records, open_region_split

ROOT = Path(__file__).resolve().parents[1]
CLICKS_FILE = "clicks.json"
CLEAR_LEAD = 0.15  # the right caption leads the runner-up by this much probability


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
    parser.add_argument("--models", type=Path, default=ROOT / "demo" / "default", help="the models the examples show")
    args = parser.parse_args(argv)
    split = open_region_split(args.regions, "test")
    sources = split["source"]
    records = list(iter_region_records(args.regions, "test", include_normal=True))
    check = ShippedModels(args.models)
    margins = [check.margin(to_uint8(record)) for record in records]
    chosen = pick_defect_examples(records, sources, margins, check)
    normals = normal_images(records, sources, margins)
    good = pick_normal_example(normals, records, check)
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
    clicks.update(mixed_example(records, chosen, [good] + [i for i in normals if i != good], sources, args.out, check))
    (args.out / CLICKS_FILE).write_text(json.dumps(clicks, indent=2) + "\n")
    print(json.dumps(clicks))
    return clicks


class ShippedModels:
    """The app's own path (score an upload, click a point) on the shipped models, to tell a case they get right."""

    def __init__(self, models: Path):
        from defectclip.pipeline import InspectionPipeline

        self.pipeline = InspectionPipeline.from_pretrained(models)
        self.model = self.pipeline.model_names[0]

    def margin(self, image: np.ndarray) -> float:
        """How far the scorer puts the image above its threshold (negative: below it)."""
        return float(self.pipeline.score(image, self.model).score) - self.pipeline.model(self.model).threshold

    def answers_right(self, image: np.ndarray, example: dict) -> bool:
        """Right under this CPU's default scoring path and the exact float32 one (a GPU's, or a CPU without
        AMX): the predicted region a click selects differs a little between them, and so may the answer."""
        scorer = self.pipeline.model(self.model).scorer
        default = scorer.inference
        try:
            return all(self._answers_right_with(image, example, scorer, mode) for mode in (default, "exact"))
        finally:
            scorer.inference = default

    def _answers_right_with(self, image: np.ndarray, example: dict, scorer, mode: str) -> bool:
        from PIL import Image

        from defectclip.captions import NO_DEFECT
        from demo import handlers

        scorer.inference = mode
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "example.png"
            Image.fromarray(image).save(path)
            session = handlers.Session()
            handlers.score_upload(self.pipeline, session, str(path), self.model)
            return (all(self._clear_answer(session, d["xy"]) == d["caption"] for d in example["defects"])
                    and (self._clear_answer(session, example["clean_xy"]) or "").startswith(NO_DEFECT))

    def _clear_answer(self, session, xy) -> str | None:
        """The top caption at a click, or None when it leads the runner-up by less than CLEAR_LEAD:
        a near tie could flip on another CPU's arithmetic, and an example needs a clear answer."""
        from demo import handlers

        _view, ranked = handlers.describe_point(self.pipeline, session, *xy)
        first, second = sorted(ranked.values(), reverse=True)[:2]
        return max(ranked, key=ranked.get) if first - second >= CLEAR_LEAD else None


def pick_defect_examples(records, sources, margins, check: ShippedModels) -> dict[str, int]:
    """Per defect type, the clearest flagged one-region image whose clicks read right (else the clearest)."""
    order = sorted(range(len(records)), key=lambda i: (-margins[i], sources[i]))
    clearest: dict[str, int] = {}
    chosen: dict[str, int] = {}
    for i in order:
        record = records[i]
        if len(record.masks) != 1:
            continue
        defect = record.defects[0]
        clearest.setdefault(defect, i)
        if defect in chosen or margins[i] <= 0:
            continue
        if check.answers_right(to_uint8(record), entry(record.object, list(record.masks), record.defects, record.captions)):
            chosen[defect] = i
    for defect, i in clearest.items():
        if defect not in chosen:
            print(f"No held-out {defect} image is handled right by the shipped models; using the clearest.", file=sys.stderr)
            chosen[defect] = i
    return chosen


def normal_images(records, sources, margins) -> list[int]:
    """Defect-free images, furthest below the threshold first."""
    return sorted((i for i, r in enumerate(records) if len(r.masks) == 0), key=lambda i: (margins[i], sources[i]))


def pick_normal_example(normals: list[int], records, check: ShippedModels) -> int:
    """The defect-free image furthest below the threshold whose clean click reads "no defect"."""
    for i in normals:
        image = to_uint8(records[i])
        if check.answers_right(image, {"defects": [], "clean_xy": list(clean_point(np.zeros(image.shape[:2], bool)))}):
            return i
    return normals[0]


def mixed_example(records, chosen: dict[str, int], canvases: list[int], sources, out: Path,
                  check: ShippedModels, placements: int = 8) -> dict:
    """Two chosen regions of different types blended into one defect-free image, at the first pair of types,
    canvas and placement (most frequent types first) that the shipped models handle."""
    from itertools import combinations

    from PIL import Image

    counts: dict[str, int] = {}
    for record in records:
        for defect in record.defects:
            counts[defect] = counts.get(defect, 0) + 1
    pairs = list(combinations(sorted(counts, key=lambda d: (-counts[d], d)), 2))
    tries = [(pair, canvas, seed) for pair in pairs for canvas in canvases[:3] for seed in range(placements)]
    for pair, canvas, seed in tries:
        image, example = blend_pair(records, chosen, records[canvas], pair, seed)
        if check.answers_right(image, example):
            break
    else:
        print(f"No mixed placement is handled right by the shipped models; using the last of {len(tries)}.", file=sys.stderr)
    name = f"magnetic_tile_mixed_{pair[0]}_{pair[1]}_on_{Path(sources[canvas]).stem}.png"
    Image.fromarray(image[..., 0] if (image == image[..., :1]).all() else image).save(out / name)
    return {name: example}


def blend_pair(records, chosen: dict[str, int], canvas: RegionRecord, types: tuple[str, str], seed: int):
    """The canvas with the chosen region of each type Poisson-blended in, away from each other, each at the
    place it had in its own image (a break stays on the border it broke from)."""
    rng = np.random.default_rng(seed)
    image, masks, defects, captions = to_uint8(canvas), [], [], []
    for defect in types:
        record = records[chosen[defect]]
        allowed = None if not masks else ndimage.distance_transform_edt(~np.stack(masks).any(axis=0)) > 20
        placed = transplant_region(to_uint8(record), record.masks[0], image, defect, seed=rng, allowed=allowed,
                                   anchor=True)
        image = placed.image
        masks.append(placed.mask)
        defects.append(defect)
        captions.append(record.captions[0])
    return image, entry(canvas.object, masks, defects, captions)


if __name__ == "__main__":
    main()
