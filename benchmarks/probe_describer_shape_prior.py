"""Does the region's shape tell the describer something it does not already read? (a probe for #13; not built in)

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/probe_describer_shape_prior.py \
        --model <describer> --dataset <regions dataset> [--split test] --out <json>     # ~5 min on magnetic tile, one thread

The describer sees each region in a crop around it, resized to the tower's input, so the region's size in
pixels is gone and its outline is all it keeps of its geometry. Here a logistic regression on seven mask
measurements that survive a mosaic (log pixel area, elongation, solidity, extent, thickness, component count,
eccentricity; no position, no border contact) is fitted on the dataset's train regions, and its probabilities
re-weigh the describer's defect captions among themselves (probability x prior^weight, renormalised to the
describer's own defect mass, so the "no defect" answer is untouched). Every test of eval_describer.py is run
for each weight on the same embeddings (computed once).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_describer  # noqa: E402  (benchmarks/ is not a package)

from defectclip.alphaclip import AlphaDescriber  # noqa: E402
from defectclip.region_dataset import iter_region_records  # noqa: E402

KEYS = ("mixed_type_top1", "swap_consistency", "normal_area_no_defect", "defect_region_top1", "small_region_top1",
        "click_disk_top1")


def shape_measurements(mask: np.ndarray) -> list[float]:
    from skimage.measure import label, regionprops

    props = regionprops(mask.astype(np.uint8))[0]
    area = float(mask.sum())
    major, minor = max(props.axis_major_length, 1.0), max(props.axis_minor_length, 1.0)
    return [np.log(area), np.log(major / minor), props.solidity, props.extent, np.log(area) / 2 - np.log(major),
            float(label(mask).max()), props.eccentricity]


def measured_regions(dataset: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(shape measurements, caption) of every real defect region of the split."""
    rows, captions = [], []
    for record in iter_region_records(dataset, split, include_normal=False):
        for mask, caption in zip(record.masks, record.captions):
            rows.append(shape_measurements(np.asarray(mask, bool))), captions.append(caption)
    return np.array(rows), np.array(captions)


def fit_shape_prior(dataset: Path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)).fit(*measured_regions(dataset, "train"))


def prior_alone_top1(prior, dataset: Path, split: str) -> float:
    """How often the shape prior by itself names the split's real defect regions (the describer not asked)."""
    rows, captions = measured_regions(dataset, split)
    return round(float(np.mean(prior.predict(rows) == captions)), 4)


class CachedProbabilities:
    """The describer's caption probabilities per (image, masks), computed once for every weight."""

    def __init__(self):
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, reader, image: torch.Tensor, masks: np.ndarray) -> np.ndarray:
        digest = hashlib.sha1(image.numpy().tobytes())
        digest.update(np.ascontiguousarray(masks).tobytes())
        key = digest.hexdigest()
        if key not in self.cache:
            embeddings = reader.describer.embed_regions(image[None].expand(len(masks), -1, -1, -1), masks)
            self.cache[key] = reader.describer.caption_probabilities(embeddings, reader.candidates).numpy()
        return self.cache[key].copy()


def fused_top1(prior, weight: float, probabilities: CachedProbabilities):
    def top1(reader, image, masks):
        found = probabilities(reader, image, masks)
        if weight > 0:
            columns = [reader.candidates.index(caption) for caption in prior.classes_]
            shape = prior.predict_proba(np.array([shape_measurements(np.asarray(m, bool)) for m in masks]))
            defect_mass = found[:, columns].sum(1, keepdims=True)
            reweighed = found[:, columns] * shape**weight
            found[:, columns] = reweighed / reweighed.sum(1, keepdims=True) * defect_mass
        return [reader.candidates[i] for i in found.argmax(1)]
    return top1


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--weights", type=float, nargs="+", default=[0, 0.5, 1, 2])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    describer = AlphaDescriber.from_pretrained(args.model).eval()
    prior = fit_shape_prior(args.dataset)
    object_name, records, goods = eval_describer.load_split(args.dataset, args.split, None)
    settings = eval_describer.parse_args(["--model", str(args.model), "--dataset", str(args.dataset)])
    probabilities = CachedProbabilities()
    report = {"bench": "describer_shape_prior", "model": str(args.model), "dataset": str(args.dataset),
              "split": args.split, "subset": False, "machine": eval_describer.machine(),
              "shape_prior_alone_defect_region_top1": prior_alone_top1(prior, args.dataset, args.split), "by_weight": {}}
    print("shape prior alone:", report["shape_prior_alone_defect_region_top1"], flush=True)
    for weight in args.weights:
        eval_describer.Reader.top1 = fused_top1(prior, weight, probabilities)
        scores = eval_describer.evaluate_object(eval_describer.Reader(describer, object_name), records, goods, settings)
        report["by_weight"][str(weight)] = {key: scores[key] for key in KEYS} | {"confusion_mixed_type": scores["confusion_mixed_type"]}
        print(weight, json.dumps({key: scores[key] for key in KEYS}), flush=True)
    eval_describer.write_result(args.out, report)
    return report


if __name__ == "__main__":
    main()
