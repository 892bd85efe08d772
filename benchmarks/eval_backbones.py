"""Backbones x methods x seeds on MVTec-layout categories: a table like the TAB paper's Tables 1-2.

    python benchmarks/eval_backbones.py --data /path/to/mvtec_or_category \
        --towers offline:efficientnet_lite0 local-dir:runs/tab --methods patchcore padim --seeds 0 1 2

For every (tower, method, category, seed) it fits on the category's train/good images, predicts
the test images and computes image AUROC, pixel AUROC, AUPRO and F1-max, overall and per defect
type (that type's images against every normal one); each run prints one JSON line. At the end it
prints and writes `<out>.json` (every run + the summary) and `<out>.md`: per method and metric, one
row per backbone, one column per category and the mean, as mean +- std over seeds in percent, then
one per-defect-type table per (method, backbone, category).

`--max-train` / `--max-test` cap the images per category (evenly spaced over the sorted file list,
test caps keep the normal/defective proportion), so that a CPU run finishes in minutes; the same
images are used for every backbone, method and seed. Without caps it is the full data set:

    python benchmarks/eval_backbones.py --data ../shared/data/magnetic_tile --image-size 256 \
        --towers offline:efficientnet_lite0 local-dir:demo/default/tab_backbone --coreset-ratio 0.01

Features are extracted once per (tower, method) and reused for every seed: a seed only changes
PatchCore's coreset start and projection and PaDiM's channel subset, not the features.

Test sets without ground-truth masks (image labels from the folder names only) get image metrics;
pixel AUROC and AUPRO are then reported as null. Results go to `--out` (default `runs/`, which git
ignores): results of private data do not land in the repository unless asked for.
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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers next to this script, also when imported by path
from machine import cpu_model  # noqa: E402

from defectclip.data import MVTecDataset, find_mvtec_categories  # noqa: E402
from defectclip.io import write_json_atomic  # noqa: E402
from defectclip.metrics import evaluate, evaluate_by_defect_type  # noqa: E402
from defectclip.scoring import SCORERS  # noqa: E402
from defectclip.scoring.patchcore import DEFAULT_MAX_BANK_SIZE  # noqa: E402
from defectclip.towers import build_vision_tower  # noqa: E402

METRICS = ("image_auroc", "pixel_auroc", "aupro")
METRIC_TITLES = {"image_auroc": "Image AUROC (%)", "pixel_auroc": "Pixel AUROC (%)", "aupro": "AUPRO (%, FPR <= 0.3)"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="an MVTec AD category folder or a folder of categories")
    parser.add_argument("--categories", nargs="*", default=None, help="categories to evaluate (default: all found)")
    parser.add_argument("--towers", nargs="+", default=["offline:efficientnet_lite0"], help="vision tower specs, one table row each")
    parser.add_argument("--methods", nargs="+", default=["patchcore", "padim"], choices=sorted(SCORERS), help="scoring methods")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="seeds (coreset start and projection, PaDiM channels)")
    parser.add_argument("--image-size", type=int, default=None, help="model input size (square), pixels (default: 224, or the tile size with a tiles plan)")
    parser.add_argument("--plan", default="resize", help="input plan: 'resize' or 'tiles:<tile>[:<overlap>]' (native-resolution tiles)")
    parser.add_argument("--photometric", default="none", choices=["none", "match"],
                        help="'match': every image brought to the training images' median brightness and contrast")
    parser.add_argument("--max-train", type=int, default=None, help="cap on train/good images per category")
    parser.add_argument("--max-test", type=int, default=None, help="cap on test images per category")
    parser.add_argument("--coreset-ratio", type=float, default=0.1, help="PatchCore memory bank fraction")
    parser.add_argument("--max-bank-size", type=int, default=DEFAULT_MAX_BANK_SIZE,
                        help="PatchCore's cap on the memory bank (the library default; 0 = no cap)")
    parser.add_argument("--padim-d", type=int, default=None, help="PaDiM channels kept (default: min(100, available))")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the project's benchmark setting)")
    parser.add_argument("--out", default="runs/eval_backbones", help="output prefix for .json and .md (default under runs/, ignored by git)")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# data


def evenly_spaced(count: int, cap: int | None) -> list[int]:
    """`cap` indices spread evenly over range(count) (all of them without a cap)."""
    if cap is None or cap >= count:
        return list(range(count))
    return sorted({int(i) for i in np.linspace(0, count - 1, cap).round()})


def capped_test_indices(labels: Sequence[int], cap: int | None) -> list[int]:
    """Cap the test set, keeping its normal/defective proportion (and at least one of each)."""
    labels = np.asarray(labels)
    if cap is None or cap >= len(labels):
        return list(range(len(labels)))
    normal, defective = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    n_normal = min(len(normal), max(1, round(cap * len(normal) / len(labels))))
    n_defective = min(len(defective), max(1, cap - n_normal))
    picks = [normal[i] for i in evenly_spaced(len(normal), n_normal)]
    picks += [defective[i] for i in evenly_spaced(len(defective), n_defective)]
    return sorted(int(i) for i in picks)


@dataclass
class TestSet:
    images: list[torch.Tensor]
    masks: list[np.ndarray] | None  # None: the set has image labels only
    labels: list[int]
    defects: list[str]  # each image's defect type ("good" for normal ones), for the per-type breakdown


def load_category(root: Path, category: str, max_train: int | None, max_test: int | None):
    """(train subset, test set held in memory) for one category; masks only if every defect has one."""
    train = MVTecDataset(root, "train", categories=[category])
    train = torch.utils.data.Subset(train, evenly_spaced(len(train), max_train))
    test = MVTecDataset(root, "test", categories=[category], require_masks=False)
    samples = [test[i] for i in capped_test_indices(test.labels, max_test)]
    masks = [s.mask.numpy() for s in samples] if test.has_all_masks else None
    return train, TestSet([s.image for s in samples], masks, [s.label for s in samples], [s.defect for s in samples])


# --------------------------------------------------------------------------------------------------
# runs


def method_kwargs(method: str, args: argparse.Namespace) -> dict:
    if method == "patchcore":
        return {"coreset_ratio": args.coreset_ratio, "max_bank_size": args.max_bank_size or None}
    return {"d": args.padim_d}


def build_model(tower, method: str, seed: int, args: argparse.Namespace, photometric=None):
    image_size = args.image_size if args.image_size is not None or args.plan != "resize" else 224
    return SCORERS[method](
        tower, image_size=image_size, seed=seed, device=args.device, batch_size=args.batch_size,
        plan=args.plan, photometric=photometric or args.photometric, **method_kwargs(method, args),
    )


def half(batches) -> list:
    """Cached features in float16: half the memory (PaDiM's stride-4 maps of a full test set take
    gigabytes in float32); the scorers compute in float32 again."""
    for batch in batches:
        batch.embedding = batch.embedding.half()
    return batches


def run_method(tower, method: str, train, test: TestSet, args: argparse.Namespace) -> list[dict]:
    """Every seed of one (tower, method): features extracted once, each seed fitted and scored on them."""
    extractor = build_model(tower, method, args.seeds[0], args)
    start = time.perf_counter()
    extractor.fit_photometric(train)  # learnt from the normal images, as fit() would, before any feature
    train_features = half(list(extractor.embed(train)))
    embed_train_s = time.perf_counter() - start
    start = time.perf_counter()
    test_features = half(list(extractor.embed(test.images)))
    embed_test_ms = 1000 * (time.perf_counter() - start) / len(test.images)
    rows = []
    for seed in args.seeds:
        model = build_model(tower, method, seed, args, photometric=extractor.photometric)
        start = time.perf_counter()
        model.fit_embedded(train_features, len(train))
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        results = model.predict_embedded(test_features)
        score_ms = 1000 * (time.perf_counter() - start) / len(test.images)
        metrics = evaluate(results, test.masks, test.labels)
        by_defect = defect_type_metrics(results, test)
        rows.append({
            "seed": seed,
            **{k: metrics.get(k) for k in (*METRICS, "f1_max")},
            # Comparable with earlier runs: fit = feature extraction + fitting, predict = extraction + scoring.
            "fit_s": embed_train_s + fit_s,
            "predict_ms_per_image": embed_test_ms + score_ms,
            "layers": model.layers,
            "plan": model.plan.describe(),
            "image_size": list(model.preprocess.size),
            "num_train": len(train),
            "num_test": len(test.images),
            "by_defect": by_defect,
        })
    return rows


def defect_type_metrics(results, test: TestSet) -> dict | None:
    """{defect type: its metrics on the normal images plus its own}; None without normal test images
    or with a single defect type (the pooled numbers say it all then)."""
    kinds = set(test.defects) - {"good"}
    if "good" not in test.defects or len(kinds) < 2:
        return None
    return {kind: {k: cell.get(k) for k in (*METRICS, "images")}
            for kind, cell in evaluate_by_defect_type(results, test.masks, test.defects).items()}


def run_all(args: argparse.Namespace) -> list[dict]:
    root = Path(args.data)
    categories = args.categories or [folder.name for folder in find_mvtec_categories(root)]
    # A category folder given directly is its own root's only category.
    data_root = root.parent if find_mvtec_categories(root) == [root] else root
    runs = []
    for category in categories:
        train, test = load_category(data_root, category, args.max_train, args.max_test)
        if test.masks is None:
            print(f"{category}: some anomalous test images have no mask; reporting image metrics only", file=sys.stderr)
        for spec in args.towers:
            tower = build_vision_tower(spec)
            for method in args.methods:
                for result in run_method(tower, method, train, test, args):
                    row = {"tower": spec, "method": method, "category": category, **result}
                    print(json.dumps(row), flush=True)
                    runs.append(row)
    return runs


# --------------------------------------------------------------------------------------------------
# summary


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return float(statistics.fmean(values)), float(statistics.pstdev(values)) if len(values) > 1 else 0.0


def summarise(runs: list[dict]) -> dict:
    """{method: {tower: {category | 'mean': {metric: [mean, std]}}}}; 'mean' averages categories per seed."""
    summary: dict = {}
    keys = (*METRICS, "fit_s", "predict_ms_per_image")
    for method in dict.fromkeys(r["method"] for r in runs):
        for tower in dict.fromkeys(r["tower"] for r in runs):
            rows = [r for r in runs if r["method"] == method and r["tower"] == tower]
            if not rows:
                continue
            cells = {}
            for category in dict.fromkeys(r["category"] for r in rows):
                mine = [r for r in rows if r["category"] == category]
                cells[category] = {k: mean_std([r[k] for r in mine]) for k in keys if mine[0][k] is not None}
            seeds = sorted({r["seed"] for r in rows})
            per_seed = {
                k: [statistics.fmean(r[k] for r in rows if r["seed"] == s) for s in seeds]
                for k in keys if all(r[k] is not None for r in rows)
            }
            cells["mean"] = {k: mean_std(v) for k, v in per_seed.items()}
            summary.setdefault(method, {})[tower] = cells
    return summary


def defect_type_summary(runs: list[dict]) -> dict:
    """{method: {tower: {category: {defect type: {metric: [mean, std] over seeds}, "images": n}}}}."""
    table: dict = {}
    for row in runs:
        for kind, cell in (row.get("by_defect") or {}).items():
            slot = table.setdefault(row["method"], {}).setdefault(row["tower"], {}).setdefault(row["category"], {})
            slot.setdefault(kind, {"images": cell["images"], "values": []})["values"].append(cell)
    for towers in table.values():
        for categories in towers.values():
            for kinds in categories.values():
                for kind, slot in kinds.items():
                    values = slot.pop("values")
                    slot.update({k: mean_std([v[k] for v in values]) for k in METRICS if values[0][k] is not None})
    return table


def defect_type_tables(by_type: dict, seeds: Sequence[int]) -> str:
    lines = []
    with_std = len(seeds) > 1
    for method, towers in by_type.items():
        for tower, categories in towers.items():
            for category, kinds in categories.items():
                lines += [f"### {method}, `{tower}`, {category}: per defect type (its images + every normal image)", "",
                          "| defect type | images | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " |",
                          "|---" * (len(METRICS) + 2) + "|"]
                for kind, cell in kinds.items():
                    values = [percent(cell.get(m), with_std) for m in METRICS]
                    lines.append(f"| {kind} | {cell['images']} | " + " | ".join(values) + " |")
                lines.append("")
    return "\n".join(lines) + ("\n" if lines else "")


def headline(summary: dict) -> dict:
    """{method: {tower: {metric: mean, metric_std: std}}} over seeds, categories averaged; pixel
    metrics are null for sets without masks. The shape of benchmarks/results/full_magnetic_tile.json."""
    table: dict = {}
    for method, towers in summary.items():
        for tower, cells in towers.items():
            row = {}
            for metric in METRICS:
                mean, std = cells["mean"].get(metric, (None, None))
                row[metric], row[f"{metric}_std"] = mean, std
            table.setdefault(method, {})[tower] = row
    return table


def percent(cell: Sequence[float] | None, with_std: bool) -> str:
    if cell is None:
        return "n/a (no masks)"
    mean, std = cell
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if with_std else f"{100 * mean:.2f}"


def markdown_tables(summary: dict, seeds: Sequence[int]) -> str:
    lines = []
    with_std = len(seeds) > 1
    for method, towers in summary.items():
        categories = [c for c in next(iter(towers.values())) if c != "mean"]
        for metric in METRICS:
            lines += [f"### {method}: {METRIC_TITLES[metric]}", ""]
            lines.append("| backbone | " + " | ".join(categories + ["mean"]) + " |")
            lines.append("|---" * (len(categories) + 2) + "|")
            for tower, cells in towers.items():
                values = [percent(cells[c].get(metric), with_std) for c in categories + ["mean"]]
                lines.append(f"| `{tower}` | " + " | ".join(values) + " |")
            lines.append("")
        lines += [f"### {method}: time", "", "| backbone | fit (s, mean over categories) | predict (ms / image) |", "|---|---|---|"]
        for tower, cells in towers.items():
            fit, predict = cells["mean"]["fit_s"][0], cells["mean"]["predict_ms_per_image"][0]
            lines.append(f"| `{tower}` | {fit:.1f} | {predict:.0f} |")
        lines.append("")
    if with_std:
        lines.append(f"Mean ± standard deviation over seeds {list(seeds)}.")
    return "\n".join(lines) + "\n"


def machine_description() -> str:
    """E.g. '2-core CPU dev machine, Intel(R) Xeon(R) Processor, one torch thread'."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    threads = torch.get_num_threads()
    thread_text = "one torch thread" if threads == 1 else f"{threads} torch threads"
    return f"{os.cpu_count()}-core CPU dev machine, {cpu_model()}, {thread_text}, torch {torch.__version__}"


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    runs = run_all(args)
    wall_s = time.perf_counter() - start
    summary = summarise(runs)
    report = {
        "args": vars(args), "machine": machine_description(), "wall_s": wall_s,
        "results": headline(summary), "runs": runs, "summary": summary, "by_defect_type": defect_type_summary(runs),
    }
    print(json.dumps({"wall_s": round(wall_s, 1)}), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out.with_suffix(".json"), report)
    tables = markdown_tables(summary, args.seeds) + defect_type_tables(report["by_defect_type"], args.seeds)
    out.with_suffix(".md").write_text(f"<!-- generated by benchmarks/eval_backbones.py -->\n\n{tables}")
    print(tables)
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
