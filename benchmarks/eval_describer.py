"""Top-1 caption accuracy of the AlphaCLIP region describer (the paper's Tables 4 and 5).

Usage: python benchmarks/eval_describer.py --model outputs/describer_neu_seg --dataset outputs/neu_seg_regions
       [--split test] [--variants tuned untuned probe] [--limit N] [--output results.json]

For every region of the split, the describer ranks the object's candidate captions (the set stored
with the dataset) and the top one is right when it equals the region's caption. Accuracy is reported
overall, by the number of regions in the image (1, 2, 3+: Table 4; and 2+ together), by object
(Table 5) and by defect type. Variants of the same saved model:
- tuned: as trained (alpha conv, LoRA, projection);
- untuned: the base towers only: alpha conv zero, no LoRA, base RGB conv, projection at its seeded
  initial value (the zero-shot baseline; for CNN towers, whose projection is learned, this is chance);
- probe: untuned but with the trained projection: a mask-blind linear probe on the base features.
One JSON line per variant, with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch

from defectclip.alphaclip import AlphaDescriber
from defectclip.region_dataset import iter_region_records, read_dataset_candidates

VARIANTS = ("tuned", "untuned", "probe")


def machine() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {device}"


def load_variant(model: Path, variant: str) -> AlphaDescriber:
    if variant == "tuned":
        return AlphaDescriber.from_pretrained(model)
    return AlphaDescriber.from_pretrained(model, untuned=True, keep_head=variant == "probe")


def regions_bucket(count: int) -> str:
    return str(count) if count < 3 else "3+"


class Tally:
    """Right / total counts under named groups."""

    def __init__(self):
        self.right = defaultdict(int)
        self.total = defaultdict(int)

    def add(self, group: str, correct: bool) -> None:
        self.total[group] += 1
        self.right[group] += int(correct)

    def table(self) -> dict[str, dict]:
        return {g: {"accuracy": round(100.0 * self.right[g] / self.total[g], 2), "right": self.right[g], "count": self.total[g]}
                for g in sorted(self.total)}


def predict_record(describer: AlphaDescriber, record, candidates: list[str], device) -> list[str]:
    """The top caption for every region of one image (all its regions in one batch)."""
    count = len(record.masks)
    images = record.image[None].expand(count, -1, -1, -1)
    embeddings = describer.embed_regions(images.to(device), record.masks)
    best = describer.caption_probabilities(embeddings, candidates).argmax(dim=-1)
    return [candidates[i] for i in best.tolist()]


def evaluate(describer: AlphaDescriber, dataset: Path, split: str, candidates: dict[str, list[str]], limit: int | None, device) -> dict:
    overall, by_regions, by_object, by_defect = Tally(), Tally(), Tally(), Tally()
    multi = Tally()  # regions of images holding 2 or more regions: the case the mask must decide
    for index, record in enumerate(iter_region_records(dataset, split)):
        if limit is not None and index >= limit:
            break
        predictions = predict_record(describer, record, candidates[record.object], device)
        bucket = regions_bucket(len(record.masks))
        for predicted, truth, defect in zip(predictions, record.captions, record.defects):
            correct = predicted == truth
            overall.add("all", correct)
            by_regions.add(bucket, correct)
            by_object.add(record.object, correct)
            by_defect.add(defect, correct)
            if len(record.masks) >= 2:
                multi.add("2+", correct)
    return {"overall": overall.table()["all"], "by_regions": by_regions.table(),
            "multi_region": multi.table().get("2+"), "by_object": by_object.table(), "by_defect": by_defect.table()}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="describer folder (or a training --output-dir)")
    parser.add_argument("--dataset", type=Path, required=True, help="split-mask caption dataset folder")
    parser.add_argument("--split", default="test", help="split to measure")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="which variants to measure")
    parser.add_argument("--limit", type=int, default=None, help="measure only the first N images (smoke runs)")
    parser.add_argument("--output", type=Path, default=None, help="also write all results to this JSON file")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    candidates = read_dataset_candidates(args.dataset)
    results = []
    for variant in args.variants:
        describer = load_variant(args.model, variant).to(device).eval()
        started = time.perf_counter()
        scores = evaluate(describer, args.dataset, args.split, candidates, args.limit, device)
        result = {"bench": "describer", "variant": variant, "model": str(args.model), "dataset": str(args.dataset),
                  "split": args.split, "vision": describer.config["vision"], "text": describer.config["text"],
                  "image_size": list(describer.image.preprocess.size), **scores,
                  "seconds": round(time.perf_counter() - started, 1), "machine": machine()}
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
