"""A PatchCore + PaDiM `Ensemble` on one MVTec-layout category, over seeds: does combining the two scorers lift the full-data numbers?

    python benchmarks/eval_ensemble.py --data ../shared/data/magnetic_tile \
        --patchcore-tower local-dir:demo/default/tab_backbone --padim-tower offline:efficientnet_lite0 \
        --image-size 384 --max-bank-size 15000 --seeds 0 1 2 3 4 --out benchmarks/results/ensemble_384.json

`defectclip.scoring.Ensemble` as a user fits it: both members on 90 % of train/good, each member's map
standardised on the other 10 % (every tenth image), the ensemble's map the mean of the standardised maps
and its image score that map's maximum; nothing is read from the test set. Prints and writes, per seed,
each member's and the ensemble's image AUROC, pixel AUROC and AUPRO on the full test set (members as fitted
inside the ensemble, i.e. on 90 % of the normal images), the ensemble's per-defect-type numbers, and the
mean and standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_backbones import machine_description  # noqa: E402  (benchmarks/ is not a package)

from defectclip.data import MVTecDataset, load_image_array, load_mask  # noqa: E402
from defectclip.io import write_json_atomic  # noqa: E402
from defectclip.metrics import evaluate, evaluate_by_defect_type  # noqa: E402
from defectclip.scoring import Ensemble, PaDiM, PatchCore  # noqa: E402

METRICS = ("image_auroc", "pixel_auroc", "aupro")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="an MVTec AD category folder with masks")
    parser.add_argument("--patchcore-tower", default="offline:efficientnet_lite0")
    parser.add_argument("--padim-tower", default="offline:efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--max-bank-size", type=int, default=0, help="PatchCore bank cap (0: the library default)")
    parser.add_argument("--photometric", default="none", choices=["none", "match"],
                        help="'match': every image brought to the training images' median brightness and contrast")
    parser.add_argument("--coarse-padim-size", type=int, default=0,
                        help="add a third member, PaDiM on --padim-tower at this smaller size (0: none; "
                             "probe_coarse_member.py)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/eval_ensemble.json", help="result file (default under runs/, ignored by git)")
    return parser.parse_args(argv)


def defect_mask(ref, size: tuple[int, int]) -> np.ndarray:
    """The union of an image's defect masks, read from the files alone (the image is already loaded)."""
    union = np.zeros(size, bool)
    for path in ref.mask_paths.values():
        union |= load_mask(path)
    return union


def load_category(root) -> tuple[list, list, list, list, list]:
    """One MVTec-layout category, decoded: train images, test images, their defect masks, labels, defect types."""
    train = [load_image_array(ref.image_path) for ref in MVTecDataset(root, "train").refs]
    test = MVTecDataset(root, "test")
    images = [load_image_array(ref.image_path) for ref in test.refs]
    masks = [defect_mask(ref, image.shape[:2]) for ref, image in zip(test.refs, images)]
    labels, kinds = [int(ref.defect != "good") for ref in test.refs], [ref.defect for ref in test.refs]
    return train, images, masks, labels, kinds


def percent(metrics: dict) -> dict:
    return {k: round(100 * metrics[k], 2) for k in METRICS}


def summary(runs: list[dict], name: str) -> dict:
    """Mean and standard deviation over seeds of one model's metrics."""
    out = {}
    for key in METRICS:
        values = [run[name][key] for run in runs]
        out[key], out[f"{key}_std"] = round(float(np.mean(values)), 2), round(float(np.std(values)), 2)
    return out


def member_names(args: argparse.Namespace) -> list[str]:
    return ["patchcore", "padim"] + (["padim_coarse"] if args.coarse_padim_size else [])


def one_seed(args: argparse.Namespace, seed: int, train: list, images: list, masks: list, labels: list, kinds: list) -> dict:
    start = time.perf_counter()
    members = [
        PatchCore(args.patchcore_tower, image_size=args.image_size, coreset_ratio=args.coreset_ratio,
                  max_bank_size=args.max_bank_size or None, seed=seed, device="cpu", photometric=args.photometric),
        PaDiM(args.padim_tower, image_size=args.image_size, seed=seed, device="cpu", photometric=args.photometric),
    ]
    if args.coarse_padim_size:
        members.append(PaDiM(args.padim_tower, image_size=args.coarse_padim_size, seed=seed, device="cpu",
                             photometric=args.photometric))
    ensemble = Ensemble(members).fit(train)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    results, per_member = ensemble.predict_with_members(images)
    predict_s = time.perf_counter() - start
    run = {"seed": seed, "fit_s": round(fit_s, 1), "predict_ms_per_image": round(1000 * predict_s / len(images), 1)}
    for name, member_results in zip(member_names(args), per_member):
        run[name] = percent(evaluate(member_results, masks, labels))
    run["ensemble"] = percent(evaluate(results, masks, labels))
    run["ensemble_by_defect_type"] = {k: percent(v) for k, v in evaluate_by_defect_type(results, masks, kinds).items()}
    return run


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    train, images, masks, labels, kinds = load_category(args.data)
    report: dict = {"machine": machine_description(), "args": vars(args), "train_images": len(train),
                    "test_images": len(images), "runs": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        report["runs"].append(one_seed(args, seed, train, images, masks, labels, kinds))
        print(json.dumps({k: v for k, v in report["runs"][-1].items() if k != "ensemble_by_defect_type"}), flush=True)
        report["summary"] = {name: summary(report["runs"], name) for name in (*member_names(args), "ensemble")}
        report["wall_s"] = round(time.perf_counter() - wall, 1)
        write_json_atomic(out, report)  # after every seed: a stopped run keeps what it measured
    print(json.dumps({"summary": report["summary"], "wall_s": report["wall_s"]}), flush=True)
    return report


if __name__ == "__main__":
    main()
