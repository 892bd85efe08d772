"""A PatchCore + PaDiM ensemble on one MVTec-layout category: does combining the two scorers lift the full-data numbers?

    python benchmarks/ensemble_probe.py --data ../shared/data/magnetic_tile \
        --patchcore-tower local-dir:demo/default/tab_backbone --padim-tower offline:efficientnet_lite0 \
        --image-size 256 --out benchmarks/results/ensemble_probe_256.json

Both members are fitted on 90 % of train/good; the other 10 % (every tenth image) are held-out normals
on which each member's image scores and map values get a mean and a standard deviation. The ensemble's
image score and map are the mean of the two members' z-scores, so neither scale dominates and nothing
is read from the test set. Prints and writes each member's and the ensemble's image AUROC, pixel
AUROC and AUPRO on the full test set, and the ensemble's per-defect-type numbers. A probe: the
ensemble is not a saved scorer type yet.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_backbones import machine_description  # noqa: E402  (benchmarks/ is not a package)

from defectclip.data import MVTecDataset, load_image_array, load_mask  # noqa: E402
from defectclip.io import write_json_atomic  # noqa: E402
from defectclip.metrics import evaluate, evaluate_by_defect_type  # noqa: E402
from defectclip.scoring import PaDiM, PatchCore  # noqa: E402

METRICS = ("image_auroc", "pixel_auroc", "aupro")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="an MVTec AD category folder with masks")
    parser.add_argument("--patchcore-tower", default="offline:efficientnet_lite0")
    parser.add_argument("--padim-tower", default="offline:efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--max-bank-size", type=int, default=0, help="PatchCore bank cap (0: the library default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/ensemble_probe.json", help="result file (default under runs/, ignored by git)")
    return parser.parse_args(argv)


@dataclass
class Scored:
    """What `evaluate` reads: an image score and a map."""

    score: float
    anomaly_map: np.ndarray


def standardised(model, held_out: list, test: list) -> tuple[list[Scored], list]:
    """The model's test results as z-scores of its own held-out normal scores and map values."""
    normal = model.predict(held_out)
    scores = np.array([r.score for r in normal])
    pixels = np.concatenate([r.anomaly_map.ravel() for r in normal])
    results = model.predict(test)
    z = [Scored(float((r.score - scores.mean()) / scores.std()), (r.anomaly_map - pixels.mean()) / pixels.std())
         for r in results]
    return z, results


def defect_mask(ref, size: tuple[int, int]) -> np.ndarray:
    """The union of an image's defect masks, read from the files alone (the image is already loaded)."""
    union = np.zeros(size, bool)
    for path in ref.mask_paths.values():
        union |= load_mask(path)
    return union


def percent(metrics: dict) -> dict:
    return {k: round(100 * metrics[k], 2) for k in METRICS}


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    train = [load_image_array(r.image_path) for r in MVTecDataset(args.data, "train").refs]
    fit = [x for i, x in enumerate(train) if i % 10]
    held_out = train[::10]
    test = MVTecDataset(args.data, "test")
    images = [load_image_array(r.image_path) for r in test.refs]
    masks = [defect_mask(ref, image.shape[:2]) for ref, image in zip(test.refs, images)]
    labels, kinds = [int(ref.defect != "good") for ref in test.refs], [ref.defect for ref in test.refs]
    members = {
        "patchcore": PatchCore(args.patchcore_tower, image_size=args.image_size, coreset_ratio=args.coreset_ratio,
                               max_bank_size=args.max_bank_size or None, seed=args.seed, device="cpu"),
        "padim": PaDiM(args.padim_tower, image_size=args.image_size, seed=args.seed, device="cpu"),
    }
    report: dict = {"machine": machine_description(), "args": vars(args), "fit_images": len(fit),
                    "held_out_normals": len(held_out), "test_images": len(images)}
    standard = {}
    for name, model in members.items():
        start = time.perf_counter()
        standard[name], results = standardised(model.fit(fit), held_out, images)
        report[name] = {**percent(evaluate(results, masks, labels)), "seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps({name: report[name]}), flush=True)
    ensemble = [Scored((a.score + b.score) / 2, (a.anomaly_map + b.anomaly_map) / 2)
                for a, b in zip(standard["patchcore"], standard["padim"])]
    report["ensemble"] = percent(evaluate(ensemble, masks, labels))
    report["ensemble_by_defect_type"] = {k: percent(v) for k, v in evaluate_by_defect_type(ensemble, masks, kinds).items()}
    report["wall_s"] = round(time.perf_counter() - wall, 1)
    print(json.dumps({"ensemble": report["ensemble"], "wall_s": report["wall_s"]}), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, report)
    return report


if __name__ == "__main__":
    main()
