"""Does the region describer read the region? Per-object tests on held-out data (issue #13's targets).

Usage:
    python benchmarks/eval_describer.py --model outputs/describer_both/model \
        --dataset outputs/magnetic_tile_regions outputs/neu_seg_regions \
        [--split test] [--mixed-images 150] [--limit N] [--output benchmarks/results/describer_regions.json]

For each object (one split-mask caption dataset each; only its `--split` images are used, so every
source image is disjoint from training), with the object's own candidate captions:
- defect_region_top1: every real region of the split; top-1 caption right? By region count of its image
  (1 / 2 / 3 / 4+) and by type, with a confusion matrix.
- mixed_type_top1: images holding regions of 2-4 different types, made by Poisson-blending regions of
  held-out images into one held-out canvas of the same object (a defect-free image where the split has
  them, else a held-out image whose own regions are kept), each away from every other region and, by
  default (`--placement anchored`), at the place it had in its own image: a region that touched a border
  touches the same border (a break stays on the part's edge); `--placement random` puts it anywhere.
- swap_consistency: for every pair of regions of different types in one mixed image, both clicks are
  answered correctly (hence differently).
- normal_area_no_defect: regions on clean surface (shapes of real regions and click-sized disks, away
  from every defect, and on defect-free images) answered with the object's no-defect caption.
- small_region_top1: defect_region_top1 again with each image placed in one cell of a 4 x 4 mosaic of
  other held-out images of the object, so each region is 1/16 as large relative to the image.
- click_disk_top1 (not a target): each real region clicked as the app does when no predicted region is
  near the click, i.e. a 16 px disk around the region's central pixel.
- probe_* beside each: the mask-blind probe, the same describer shown the whole image as the region,
  so its answer cannot depend on the click (what a describer that reads only the image can do).
Top-level keys hold the minimum over the objects; per-object numbers are under `by_object`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from machine import cpu_model, write_result

from defectclip.alphaclip import AlphaDescriber
from defectclip.data.regions import clear_area
from defectclip.data.transplant import transplant_region
from defectclip.region_dataset import RegionRecord, ShapeBank, iter_region_records

MOSAIC = 4
MAX_MIXED_TYPES = 4
TARGET_KEYS = ("mixed_type_top1", "probe_top1", "swap_consistency", "normal_area_no_defect", "defect_region_top1",
               "small_region_top1")


def machine() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core CPU dev machine, {cpu_model()}, {torch.get_num_threads()} torch thread(s), {device}"


# ------------------------------------------------------------------------------------------- counting


class Tally:
    """Right / total counts under named groups, and a confusion matrix (truth -> prediction -> count)."""

    def __init__(self):
        self.right, self.total = defaultdict(int), defaultdict(int)
        self.confusion: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, truth: str, predicted: str, *groups: str) -> None:
        for group in ("all", *groups):
            self.total[group] += 1
            self.right[group] += int(truth == predicted)
        self.confusion[truth][predicted] += 1

    def accuracy(self, group: str = "all") -> float | None:
        return round(self.right[group] / self.total[group], 4) if self.total[group] else None

    def table(self) -> dict:
        return {g: {"top1": self.accuracy(g), "right": self.right[g], "count": self.total[g]} for g in sorted(self.total)}

    def matrix(self) -> dict:
        return {truth: dict(sorted(row.items())) for truth, row in sorted(self.confusion.items())}


def regions_bucket(count: int) -> str:
    return str(count) if count < 4 else "4+"


class Reader:
    """The describer and its mask-blind probe on one object's candidates; type names instead of captions."""

    def __init__(self, describer: AlphaDescriber, object_name: str):
        self.describer = describer
        self.candidates = describer.candidates_for(object_name)
        self.no_defect = describer.no_defect_caption(object_name)

    def top1(self, image: torch.Tensor, masks: np.ndarray) -> list[str]:
        """The top caption of each region (N x H x W masks) of one image."""
        images = image[None].expand(len(masks), -1, -1, -1)
        embeddings = self.describer.embed_regions(images, masks)
        best = self.describer.caption_probabilities(embeddings, self.candidates).argmax(dim=-1)
        return [self.candidates[i] for i in best.tolist()]

    def probe_top1(self, image: torch.Tensor, count: int) -> list[str]:
        """Mask-blind: the whole image is the region, so every region of the image gets the same answer."""
        whole = np.ones((1, *image.shape[-2:]), bool)
        return self.top1(image, whole) * count


# ------------------------------------------------------------------------------------------- test sets


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0


def mixed_images(records: list[RegionRecord], goods: list[RegionRecord], count: int, seed: int,
                 placement: str = "anchored"):
    """`count` mixed-type images: (image tensor, masks, captions), regions of 2-4 types, all held out.

    Canvas: a defect-free held-out image if there are any, else a held-out image with its own regions
    (kept, and counted). Regions of types not yet in the image are blended in, each at least
    NORMAL_CLEARANCE_PX from every region already there: with `placement` "anchored" at the place it had
    in its own image (touching the same borders, else at the same relative position; slid along its
    borders when taken), "random" anywhere.
    """
    rng = np.random.default_rng([seed, 13])
    by_type: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for r_index, record in enumerate(records):
        for m_index, caption in enumerate(record.captions):
            by_type[caption].append((r_index, m_index))
    types = sorted(by_type)
    if len(types) < 2:
        raise SystemExit(f"Mixed-type images need regions of at least 2 types; the split has {types}.")
    made = []
    while len(made) < count:
        canvas_record = goods[int(rng.integers(len(goods)))] if goods else records[int(rng.integers(len(records)))]
        image = to_uint8(canvas_record.image)
        masks, captions = list(canvas_record.masks), list(canvas_record.captions)
        wanted = int(rng.integers(2, min(MAX_MIXED_TYPES, len(types)) + 1))
        for caption in rng.permutation([t for t in types if t not in captions]):
            if len(set(captions)) >= wanted:
                break
            r_index, m_index = by_type[caption][int(rng.integers(len(by_type[caption])))]
            source = records[r_index]
            if source is canvas_record:
                continue
            defects = np.stack(masks).any(axis=0) if masks else np.zeros(image.shape[:2], bool)
            try:
                placed = transplant_region(to_uint8(source.image), source.masks[m_index], image, caption,
                                           seed=rng, allowed=clear_area(defects), anchor=placement == "anchored")
            except ValueError:  # too large for this canvas, or no clear place left: try another type
                continue
            image, masks, captions = placed.image, masks + [placed.mask], captions + [str(caption)]
        if len(set(captions)) >= 2:
            made.append((to_tensor(image), np.stack(masks), captions))
    return made


def mosaic(record: RegionRecord, others: list[RegionRecord], rng: np.random.Generator):
    """`record` in a random cell of a 4 x 4 mosaic of other images (resized to its size); its masks moved there."""
    from defectclip.data.transforms import resize

    channels, height, width = record.image.shape
    cell = int(rng.integers(MOSAIC * MOSAIC))
    canvas = torch.zeros(channels, height * MOSAIC, width * MOSAIC)
    for index in range(MOSAIC * MOSAIC):
        row, col = divmod(index, MOSAIC)
        tile = record.image if index == cell else resize(others[int(rng.integers(len(others)))].image, (height, width))
        canvas[:, row * height:(row + 1) * height, col * width:(col + 1) * width] = tile
    row, col = divmod(cell, MOSAIC)
    masks = np.zeros((len(record.masks), height * MOSAIC, width * MOSAIC), bool)
    masks[:, row * height:(row + 1) * height, col * width:(col + 1) * width] = record.masks
    return canvas, masks


# ------------------------------------------------------------------------------------------- one object


def click_disks(masks: np.ndarray) -> np.ndarray:
    """What the app describes when a click on a defect is not near any predicted region: a disk of the
    app's radius around the click, here at the region's pixel nearest its centroid."""
    from defectclip.regions_ui import DEFAULT_DISK_RADIUS, disk_mask

    disks = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        nearest = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
        disks.append(disk_mask(mask.shape, int(xs[nearest]), int(ys[nearest]), DEFAULT_DISK_RADIUS))
    return np.stack(disks)


def evaluate_object(reader: Reader, records: list[RegionRecord], goods: list[RegionRecord], args) -> dict:
    real, real_probe, small, clicks = Tally(), Tally(), Tally(), Tally()
    normal, normal_probe = Tally(), Tally()
    rng = np.random.default_rng([args.seed, 17])
    bank = ShapeBank(seed=args.seed)
    for record in records:
        bank.add(record)
    mosaic_sources = goods or records
    for record in records:
        bucket = regions_bucket(len(record.masks))
        for truth, predicted in zip(record.captions, reader.top1(record.image, record.masks)):
            real.add(truth, predicted, bucket)
        for truth, predicted in zip(record.captions, reader.probe_top1(record.image, len(record.masks))):
            real_probe.add(truth, predicted, bucket)
        for truth, predicted in zip(record.captions, reader.top1(record.image, click_disks(record.masks))):
            clicks.add(truth, predicted, bucket)
        image, masks = mosaic(record, [r for r in mosaic_sources if r is not record], rng)
        for truth, predicted in zip(record.captions, reader.top1(image, masks)):
            small.add(truth, predicted, bucket)
    if reader.no_defect is not None:
        for record in records + goods:
            regions = bank.normal_regions(record, args.normal_per_image)
            if regions:
                for predicted in reader.top1(record.image, np.stack(regions)):
                    normal.add(reader.no_defect, predicted)
                for predicted in reader.probe_top1(record.image, len(regions)):
                    normal_probe.add(reader.no_defect, predicted)
    mixed = evaluate_mixed(reader, mixed_images(records, goods, args.mixed_images, args.seed, args.placement))
    return {
        "mixed_type_top1": mixed["top1"].accuracy(), "probe_top1": mixed["probe"].accuracy(),
        "swap_consistency": mixed["swap"].accuracy(), "probe_swap_consistency": mixed["probe_swap"].accuracy(),
        "normal_area_no_defect": normal.accuracy(), "probe_normal_area_no_defect": normal_probe.accuracy(),
        "defect_region_top1": real.accuracy(), "probe_defect_region_top1": real_probe.accuracy(),
        "small_region_top1": small.accuracy(), "click_disk_top1": clicks.accuracy(),
        "small_region_drop_points": round(100 * (real.accuracy() - small.accuracy()), 2),
        "counts": {"test_images_with_regions": len(records), "test_regions": real.total["all"],
                   "defect_free_images": len(goods), "normal_regions": normal.total["all"],
                   "mixed_images": args.mixed_images, "mixed_regions": mixed["top1"].total["all"],
                   "swap_pairs": mixed["swap"].total["all"]},
        "defect_region_by_count": real.table(), "probe_defect_region_by_count": real_probe.table(),
        "mixed_type_by_count": mixed["top1"].table(), "small_region_by_count": small.table(),
        "confusion_defect_regions": real.matrix(), "confusion_mixed_type": mixed["top1"].matrix(),
        "confusion_normal_areas": normal.matrix(), "confusion_click_disks": clicks.matrix(),
    }


def evaluate_mixed(reader: Reader, images) -> dict[str, Tally]:
    tallies = {name: Tally() for name in ("top1", "probe", "swap", "probe_swap")}
    for image, masks, captions in images:
        bucket = regions_bucket(len(masks))
        predicted = reader.top1(image, masks)
        probe = reader.probe_top1(image, len(masks))
        for truth, guess, blind in zip(captions, predicted, probe):
            tallies["top1"].add(truth, guess, bucket)
            tallies["probe"].add(truth, blind, bucket)
        for name, answers in (("swap", predicted), ("probe_swap", probe)):
            for i in range(len(captions)):
                for j in range(i + 1, len(captions)):
                    if captions[i] != captions[j]:
                        both = answers[i] == captions[i] and answers[j] == captions[j]
                        tallies[name].add("both right", "both right" if both else "not both")
    return tallies


# ------------------------------------------------------------------------------------------- main


def load_split(dataset: Path, split: str, limit: int | None) -> tuple[str, list[RegionRecord], list[RegionRecord]]:
    records, goods = [], []
    for record in iter_region_records(dataset, split, include_normal=True):
        (records if len(record.masks) else goods).append(record)
    if not records:
        raise SystemExit(f"{dataset} has no regions in its {split!r} split.")
    if limit is not None:  # evenly spaced, so every defect type stays in a smoke run
        records = records[:: max(1, len(records) // limit)][:limit]
        goods = goods[:: max(1, len(goods) // limit)][:limit] if goods else goods
    return records[0].object, records, goods


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="describer folder (or a training --output-dir)")
    parser.add_argument("--dataset", type=Path, nargs="+", required=True, help="split-mask caption dataset folder(s), one per object")
    parser.add_argument("--split", default="test", help="held-out split to measure")
    parser.add_argument("--mixed-images", type=int, default=150, help="mixed-type images built per object")
    parser.add_argument("--placement", choices=("anchored", "random"), default="anchored",
                        help="where a mixed image's blended regions land: 'anchored' at the place each had in its own "
                             "image (on the same borders), 'random' anywhere")
    parser.add_argument("--normal-per-image", type=int, default=1, help="normal regions drawn per held-out image")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mixed images, mosaics and normal regions")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images of each split (smoke runs; labelled)")
    parser.add_argument("--flip-average", choices=("model", "on", "off"), default="model",
                        help="embed each region as the mean over the four flips of its view ('on'), from one view "
                             "('off'), or as the model's config says ('model')")
    parser.add_argument("--quarter-turn-average", choices=("model", "on", "off"), default="model",
                        help="also average each view turned by 90 degrees ('on'), not ('off'), or as the model's "
                             "config says ('model')")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--output", type=Path, default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def summary(by_object: dict[str, dict]) -> dict:
    """Each target key: the minimum over the objects (None where an object lacks it)."""
    out = {}
    for key in TARGET_KEYS:
        values = [scores[key] for scores in by_object.values()]
        out[key] = None if any(v is None for v in values) else min(values)
    out["mixed_minus_probe_points"] = min(round(100 * (s["mixed_type_top1"] - s["probe_top1"]), 2) for s in by_object.values())
    out["small_region_drop_points"] = max(s["small_region_drop_points"] for s in by_object.values())
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    describer = AlphaDescriber.from_pretrained(args.model).eval()
    if args.flip_average != "model":
        describer.config["flip_average"] = args.flip_average == "on"
    if args.quarter_turn_average != "model":
        describer.config["quarter_turn_average"] = args.quarter_turn_average == "on"
    by_object = {}
    for dataset in args.dataset:
        object_started = time.perf_counter()
        object_name, records, goods = load_split(dataset, args.split, args.limit)
        scores = evaluate_object(Reader(describer, object_name), records, goods, args)
        scores.update(dataset=str(dataset), seconds=round(time.perf_counter() - object_started, 1))
        print(json.dumps({"bench": "describer_regions", "object": object_name,
                          **{k: scores[k] for k in (*TARGET_KEYS, "small_region_drop_points", "click_disk_top1", "counts")}}), flush=True)
        by_object[object_name] = scores
    training = describer.config.get("training", {})
    result = {"bench": "describer_regions", **summary(by_object), "by_object": by_object,
              "model": str(args.model), "split": args.split, "subset": args.limit is not None,
              "mixed_placement": args.placement, "flip_average": describer.flip_average,
              "quarter_turn_average": describer.quarter_turn_average,
              "view": describer.config.get("view"), "image_size": list(describer.image.preprocess.size),
              "training_steps": training.get("max_steps"), "training": training,
              "seconds": round(time.perf_counter() - started, 1), "machine": machine()}
    print(json.dumps({k: v for k, v in result.items() if k != "by_object"}), flush=True)
    if args.output is not None:
        write_result(args.output, result)
    return result


if __name__ == "__main__":
    main()
