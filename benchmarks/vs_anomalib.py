"""defectclip PatchCore side by side with anomalib 2.x's PatchCore: same images, same weights, same layers.

anomalib is not a dependency of defectclip; install it in a separate environment that also sees
defectclip's packages, e.g.

    python3.11 -m venv /work/venv-anomalib
    echo "import site; site.addsitedir('/work/venv/lib/python3.11/site-packages')" \
        > /work/venv-anomalib/lib/python3.11/site-packages/zz_defectclip.pth
    /work/venv-anomalib/bin/pip install anomalib==2.7.0
    /work/venv-anomalib/bin/python benchmarks/vs_anomalib.py --data /path/to/magnetic_tile --max-train 50

What is held equal:
- images: every image is resized once (defectclip's transform, the tower's bicubic resize) and the same
  tensors go to both; both are evaluated at the model resolution against masks resized (nearest) to it;
- weights: the offline EfficientNet-Lite0 ImageNet state dict is loaded into anomalib's timm feature
  extractor (checked: both extractors return the same feature maps);
- layers, coreset ratio, batch size, thread count; one run each (anomalib's coreset start is seeded
  through torch's global seed).
What each does its own way (which is the point of the comparison): the random projection before the
coreset (anomalib: sparse, Johnson-Lindenstrauss eps=0.9, a few hundred dimensions; defectclip: 128),
the coreset loop, the nearest-neighbour search, and the image score (anomalib: the paper's reweighted
score with 9 neighbours; defectclip: the smoothed map's maximum, and its `reweight=True` is also reported).
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
from eval_backbones import capped_test_indices, evenly_spaced, machine_description  # noqa: E402

from defectclip.data import MVTecDataset, build_transform, resize  # noqa: E402
from defectclip.io import write_json_atomic  # noqa: E402
from defectclip.metrics import evaluate, image_auroc  # noqa: E402
from defectclip.scoring import PatchCore  # noqa: E402
from defectclip.towers import OFFLINE_VISION, build_vision_tower  # noqa: E402

LAYERS = ["blocks.2", "blocks.4"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="one MVTec AD category folder")
    parser.add_argument("--image-size", type=int, default=224, help="model input size (square), pixels")
    parser.add_argument("--max-train", type=int, default=None, help="cap on train/good images (evenly spaced)")
    parser.add_argument("--max-test", type=int, default=None, help="cap on test images (proportion kept)")
    parser.add_argument("--coreset-ratio", type=float, default=0.1, help="memory bank fraction, both libraries")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass, both libraries")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds for both libraries' projections and coreset starts; one run of each per seed "
                             "(image AUROC moves by about a point between seeds, so compare means)")
    parser.add_argument("--timing-rounds", type=int, default=3, help="alternating predict timings per library (median kept)")
    parser.add_argument("--timing-images", type=int, default=32, help="test images per predict timing round")
    parser.add_argument("--out", default="benchmarks/results/vs_anomalib", help="output prefix for .json and .md")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# shared inputs


def load_inputs(args, tower):
    """Train images and test images + masks, all resized once to the model size, in [0, 1]."""
    root = Path(args.data)
    transform = build_transform(tower.preprocess.with_size(args.image_size))
    train = MVTecDataset(root.parent, "train", categories=[root.name])
    train_images = [_resized(train[i].image, transform) for i in evenly_spaced(len(train), args.max_train)]
    test = MVTecDataset(root.parent, "test", categories=[root.name])
    samples = [test[i] for i in capped_test_indices(test.labels, args.max_test)]
    test_images = [_resized(s.image, transform) for s in samples]
    masks = [transform.mask(s.mask).numpy() for s in samples]
    return train_images, test_images, masks, [s.label for s in samples]


def _resized(image: torch.Tensor, transform) -> torch.Tensor:
    preprocess = transform.preprocess
    return resize(image, preprocess.size, preprocess.interpolation)


def normalised_batches(images: list[torch.Tensor], transform, batch_size: int):
    for start in range(0, len(images), batch_size):
        yield torch.stack([transform(image) for image in images[start : start + batch_size]])


def warm_up(tower, args) -> None:
    """One untimed forward pass, so one-time kernel set-up is charged to neither library."""
    with torch.no_grad():
        tower.forward_features(torch.zeros(args.batch_size, 3, args.image_size, args.image_size), LAYERS)


# --------------------------------------------------------------------------------------------------
# defectclip


def run_defectclip(tower, train, test, masks, labels, args, seed: int) -> dict:
    model = PatchCore(tower, layers=LAYERS, image_size=args.image_size, coreset_ratio=args.coreset_ratio,
                      seed=seed, device="cpu", batch_size=args.batch_size)
    start = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    results = model.predict(test)
    predict_ms = 1000 * (time.perf_counter() - start) / len(test)
    row = {"library": "defectclip", "seed": seed, "fit_s": fit_s, "predict_ms_first_pass": predict_ms,
           "bank_size": int(model.memory_bank.shape[0]), **_metrics(results, masks, labels)}
    model.reweight = True  # the paper's image score, as anomalib computes it; maps are unchanged
    reweighted = model.predict(test)
    row["image_auroc_reweighted"] = image_auroc(labels, [r.score for r in reweighted])
    model.reweight = False
    return row, model.predict


def _metrics(results, masks, labels) -> dict:
    metrics = evaluate(results, masks, labels)
    return {k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro")}


# --------------------------------------------------------------------------------------------------
# anomalib


def anomalib_model(tower, args):
    """anomalib's PatchcoreModel on timm's efficientnet_lite0 carrying our ImageNet weights."""
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(layers=LAYERS, backbone="efficientnet_lite0", pre_trained=False, num_neighbors=9)
    extractor = model.feature_extractor.feature_extractor
    missing, unexpected = extractor.load_state_dict(tower.model.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"anomalib's extractor lacks weights for {missing}")
    head_only = all(key.startswith(("conv_head", "bn2", "classifier")) for key in unexpected)
    if not head_only:
        raise RuntimeError(f"weights left unused: {unexpected}")
    return model


def check_same_features(tower, model, image_size: int) -> float:
    """Largest difference between the two extractors' feature maps on one random batch."""
    batch = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        ours = tower.forward_features(batch, LAYERS)
        theirs = model.feature_extractor(batch)
    return max(float((ours[name] - theirs[name]).abs().max()) for name in LAYERS)


def run_anomalib(tower, train, test, masks, labels, args, seed: int) -> dict:
    import anomalib

    transform = build_transform(tower.preprocess.with_size(args.image_size))
    model = anomalib_model(tower, args)
    feature_gap = check_same_features(tower, model, args.image_size)
    torch.manual_seed(seed)  # the coreset's start point
    np.random.seed(seed)  # the sparse projection (scikit-learn draws from numpy's global generator)
    start = time.perf_counter()
    model.train()
    with torch.no_grad():
        for batch in normalised_batches(train, transform, args.batch_size):
            model(batch)
    features_s = time.perf_counter() - start
    model.subsample_embedding(args.coreset_ratio)
    fit_s = time.perf_counter() - start
    model.eval()

    def predict(images):
        results = []
        with torch.no_grad():
            for batch in normalised_batches(images, transform, args.batch_size):
                output = model(batch)
                results += [_Result(s, m) for s, m in zip(output.pred_score.reshape(-1).tolist(), output.anomaly_map[:, 0].numpy())]
        return results

    start = time.perf_counter()
    results = predict(test)
    predict_ms = 1000 * (time.perf_counter() - start) / len(test)
    metrics = evaluate(results, masks, labels)
    row = {
        "library": f"anomalib {anomalib.__version__}", "seed": seed, "fit_s": fit_s, "fit_features_s": features_s,
        "predict_ms_first_pass": predict_ms, "bank_size": int(model.memory_bank.shape[0]),
        "feature_max_abs_diff": feature_gap, **{k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro")},
    }
    return row, predict


def alternating_predict_ms(predictors: list, images: list[torch.Tensor], rounds: int) -> list[float]:
    """Median ms / image of each predictor, timed in turns (A, B, A, B, ...), so that a load change
    on a shared machine hits both alike rather than whichever ran second."""
    times = [[] for _ in predictors]
    for _ in range(rounds):
        for i, predict in enumerate(predictors):
            start = time.perf_counter()
            predict(images)
            times[i].append(1000 * (time.perf_counter() - start) / len(images))
    return [float(np.median(t)) for t in times]


class _Result:
    def __init__(self, score: float, anomaly_map: np.ndarray):
        self.score, self.anomaly_map = score, anomaly_map


# --------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarise(rows: list[dict]) -> dict:
    """Per library: mean and standard deviation over seeds of every metric and time."""
    keys = ("image_auroc", "pixel_auroc", "aupro", "fit_s")
    summary = {}
    for library in dict.fromkeys(row["library"] for row in rows):
        mine = [row for row in rows if row["library"] == library]
        summary[library] = {key: mean_std([row[key] for row in mine]) for key in keys}
    return summary


def markdown(rows: list[dict], summary: dict, predict_ms: dict, args, counts: dict) -> str:
    lines = [
        f"Category `{Path(args.data).name}`, {counts['train']} train / {counts['test']} test images at "
        f"{args.image_size} px, layers {LAYERS}, coreset ratio {args.coreset_ratio}, batch {args.batch_size}, "
        f"{torch.get_num_threads()} CPU threads, seeds {args.seeds}.",
        "",
        "| library | seed | image AUROC | pixel AUROC | AUPRO | fit (s) | bank |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['library']} | {row['seed']} | {100 * row['image_auroc']:.2f} | {100 * row['pixel_auroc']:.2f} | "
            f"{100 * row['aupro']:.2f} | {row['fit_s']:.1f} | {row['bank_size']} |"
        )
    lines += ["", "| library | image AUROC | pixel AUROC | AUPRO | fit (s) | predict (ms / image, median of "
              "alternating rounds, first seed's models) |", "|---|---|---|---|---|---|"]
    for library, stats in summary.items():
        cells = " | ".join(f"{100 * m:.2f} ± {100 * sd:.2f}" for m, sd in (stats[k] for k in ("image_auroc", "pixel_auroc", "aupro")))
        lines.append(f"| {library} | {cells} | {stats['fit_s'][0]:.1f} | {predict_ms[library]:.0f} |")
    (ours, our_stats), (theirs, their_stats) = summary.items()
    reweighted = [row["image_auroc_reweighted"] for row in rows if row["library"] == ours]
    lines += [
        "",
        f"defectclip with the paper's reweighted image score: image AUROC {100 * np.mean(reweighted):.2f} (mean).",
        f"Speed-up: fit {their_stats['fit_s'][0] / our_stats['fit_s'][0]:.1f}x, predict "
        f"{predict_ms[theirs] / predict_ms[ours]:.1f}x.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    tower = build_vision_tower(OFFLINE_VISION)
    train, test, masks, labels = load_inputs(args, tower)
    warm_up(tower, args)
    rows, predictors = [], None
    for seed in args.seeds:
        ours, our_predict = run_defectclip(tower, train, test, masks, labels, args, seed)
        print(json.dumps(ours), flush=True)
        theirs, their_predict = run_anomalib(tower, train, test, masks, labels, args, seed)
        print(json.dumps(theirs), flush=True)
        rows += [ours, theirs]
        predictors = predictors or [our_predict, their_predict]
    timed = test[: args.timing_images]
    times = alternating_predict_ms(predictors, timed, args.timing_rounds)
    predict_ms = {rows[0]["library"]: times[0], rows[1]["library"]: times[1]}
    summary = summarise(rows)
    counts = {"train": len(train), "test": len(test)}
    report = {"args": vars(args), "machine": machine_description(), "counts": counts, "rows": rows,
              "summary": summary, "predict_ms_per_image": predict_ms}
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), report)
    table = markdown(rows, summary, predict_ms, args, counts)
    out.with_suffix(".md").write_text(f"<!-- generated by benchmarks/vs_anomalib.py -->\n\n{table}")
    print(table)
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
