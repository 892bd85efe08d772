"""PatchCore bank size against quality and cost on a full MVTec category: what the default cap rests on.

For each bank size and seed: the coreset selection's CPU time (two-stage, as `PatchCore.fit` runs it;
optionally the one-stage greedy for comparison), the image AUROC with the exact float32 search and with
the bfloat16 search on the same bank, and each search's CPU ms per image. Features are extracted once
(the same for every size), so only the selection and the search differ between rows.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/patchcore_bank_size.py \
        --data /work/shared/data/magnetic_tile --sizes 2000 3000 4000 5000 6000 8000 12000 --seeds 0 1 2 \
        --one-stage-sizes 5000
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
from vs_anomalib import LAYERS, load_inputs, machine_description  # noqa: E402

from defectclip.io import write_json_atomic  # noqa: E402
from defectclip.metrics import image_auroc  # noqa: E402
from defectclip.scoring import PatchCore  # noqa: E402
from defectclip.scoring.common import patch_scores_to_maps  # noqa: E402
from defectclip.scoring.patchcore import (  # noqa: E402
    DEFAULT_PROJECTION_DIM,
    bf16_bank,
    flatten_patches,
    greedy_k_center,
    nearest_distances_bf16,
    nearest_neighbours,
    random_projection,
    select_coreset,
)
from defectclip.towers import OFFLINE_VISION, build_vision_tower  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="one MVTec AD category folder")
    parser.add_argument("--image-size", type=int, default=224, help="model input size (square), pixels")
    parser.add_argument("--max-train", type=int, default=None, help="cap on train/good images (a smoke test); default all")
    parser.add_argument("--max-test", type=int, default=None, help="cap on test images (proportion kept); default all")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 3000, 4000, 5000, 6000, 8000, 12000], help="bank sizes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="projection and coreset-start seeds")
    parser.add_argument("--one-stage-sizes", type=int, nargs="*", default=[5000],
                        help="sizes also selected by one-stage greedy k-center (slow: ~100 s each on a full category)")
    parser.add_argument("--timing-images", type=int, default=64, help="test images the search is timed on")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="benchmarks/results/patchcore_bank_size", help="output prefix for .json and .md")
    return parser.parse_args(argv)


def extract(model: PatchCore, images: list[torch.Tensor]) -> torch.Tensor:
    """N x C x h x w features of every image, in the scorer's batches."""
    with torch.no_grad():
        return torch.cat([model.features(model.features.model_input(images[i : i + model.batch_size], model.device))
                          for i in range(0, len(images), model.batch_size)])


def image_scores(model: PatchCore, distances: torch.Tensor, grid: tuple[int, int]) -> list[float]:
    """Each image's score as PatchCore.predict computes it: the maximum of its smoothed map."""
    patch_scores = distances.view(-1, *grid)
    size = tuple(model.preprocess.size)
    maps = patch_scores_to_maps(patch_scores, size, [size] * patch_scores.shape[0], model.sigma, model.features.centre_offset())
    return [float(m.max()) for m in maps]


def one_stage(features: torch.Tensor, count: int, seed: int):
    """The selection PatchCore used before the two-stage one: greedy k-center over every point."""
    projected = random_projection(features, DEFAULT_PROJECTION_DIM, seed).contiguous()
    start = int(torch.randint(features.shape[0], (1,), generator=torch.Generator().manual_seed(seed)))
    return greedy_k_center(projected, count, start)


def search_ms(search, queries: torch.Tensor, per_image: int) -> float:
    start = time.process_time()
    for begin in range(0, queries.shape[0], per_image):
        search(queries[begin : begin + per_image])
    return 1000 * (time.process_time() - start) / (queries.shape[0] / per_image)


def measure(model, train, test, labels, grid, size, seed, method, timing_queries) -> dict:
    start = time.process_time()
    coreset = select_coreset(train, 1.0, DEFAULT_PROJECTION_DIM, seed, size) if method == "two-stage" else one_stage(train, size, seed)
    select_s = time.process_time() - start
    bank = train[coreset.indices].contiguous()
    prepared = bf16_bank(bank)
    exact = nearest_neighbours(test, bank)[0][:, 0]
    fast = nearest_distances_bf16(test, prepared)
    per_image = grid[0] * grid[1]
    return {
        "size": size, "seed": seed, "selection": method, "select_cpu_s": select_s,
        "image_auroc_exact": image_auroc(labels, image_scores(model, exact, grid)),
        "image_auroc_bf16": image_auroc(labels, image_scores(model, fast, grid)),
        "bf16_relative_error_mean": float(((fast - exact).abs() / exact.clamp_min(1e-6)).mean()),
        "exact_search_ms": search_ms(lambda q: nearest_neighbours(q, bank), timing_queries, per_image),
        "bf16_search_ms": search_ms(lambda q: nearest_distances_bf16(q, prepared), timing_queries, per_image),
    }


def summarise(rows: list[dict]) -> list[dict]:
    table = []
    for key in dict.fromkeys((r["selection"], r["size"]) for r in rows):
        mine = [r for r in rows if (r["selection"], r["size"]) == key]
        entry = {"selection": key[0], "size": key[1], "seeds": len(mine)}
        for name in ("image_auroc_exact", "image_auroc_bf16", "select_cpu_s", "exact_search_ms", "bf16_search_ms"):
            values = [r[name] for r in mine]
            entry[name] = [float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0]
        table.append(entry)
    return table


def markdown(table: list[dict], args, counts: dict, machine: str) -> str:
    lines = [
        f"Category `{Path(args.data).name}`, {counts['train']} train ({counts['patches']:,} patches) / "
        f"{counts['test']} test images at {args.image_size} px, layers {LAYERS}, {machine}, seeds {args.seeds}.",
        "",
        "| selection | bank | image AUROC, exact search | image AUROC, bf16 search | selection CPU (s) | "
        "exact search (ms / image) | bf16 search (ms / image) |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in table:
        lines.append(
            f"| {e['selection']} | {e['size']} | {100 * e['image_auroc_exact'][0]:.2f} ± {100 * e['image_auroc_exact'][1]:.2f} | "
            f"{100 * e['image_auroc_bf16'][0]:.2f} ± {100 * e['image_auroc_bf16'][1]:.2f} | {e['select_cpu_s'][0]:.1f} | "
            f"{e['exact_search_ms'][0]:.1f} | {e['bf16_search_ms'][0]:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tower = build_vision_tower(OFFLINE_VISION)
    load_args = argparse.Namespace(data=args.data, image_size=args.image_size, max_train=args.max_train, max_test=args.max_test)
    train_images, test_images, _, labels = load_inputs(load_args, tower)
    model = PatchCore(tower, layers=LAYERS, image_size=args.image_size, device="cpu")
    train_features, test_features = extract(model, train_images), extract(model, test_images)
    grid = tuple(test_features.shape[-2:])
    train, test = flatten_patches(train_features), flatten_patches(test_features)
    del train_features, test_features
    timing_queries = test[: args.timing_images * grid[0] * grid[1]]
    rows = []
    for method, sizes in (("two-stage", args.sizes), ("one-stage", args.one_stage_sizes)):
        for size in sizes:
            for seed in args.seeds:
                row = measure(model, train, test, labels, grid, size, seed, method, timing_queries)
                print(json.dumps(row), flush=True)
                rows.append(row)
    table = summarise(rows)
    counts = {"train": len(train_images), "test": len(test_images), "patches": int(train.shape[0])}
    machine = machine_description()
    report = {"args": vars(args), "machine": machine, "counts": counts, "rows": rows, "summary": table}
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), report)
    text = markdown(table, args, counts, machine)
    out.with_suffix(".md").write_text(f"<!-- generated by benchmarks/patchcore_bank_size.py -->\n\n{text}")
    print(text)
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
