"""CLIP-ADA ablations on one MVTec-layout category: refinement steps x learnable/fixed prompt.

Each setting is trained with `train/clip_ada.py` on train/good only (synthetic anomalies), then scored on the
test split: image AUROC, pixel AUROC, pixel AP (and AUPRO) -- the paper's Table 4 -- plus trainable
parameters and inference images/s -- its Table 6. Prints one JSON line per setting, writes all of them to
--results, and copies the best setting's artifact (by pixel AP) to --best-to for the app.

    python benchmarks/eval_clip_ada.py --data ../shared/data/magnetic_tile --steps 50 --test-cap 120

The defaults are sized for a CPU with offline towers; --vision / --text open_clip:ViT-B-16/laion400m_e32
reproduces the paper's backbone where the Hub and a GPU are available.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from defectclip.clip_ada import ClipADA
from defectclip.data import MVTecDataset
from defectclip.io import atomic_dir, write_json_atomic
from defectclip.metrics import evaluate
from train import clip_ada as train_clip_ada

REPO = Path(__file__).resolve().parents[1]
SETTINGS = [f"refine{r}-{p}" for p in ("fixed", "learnable") for r in (0, 1, 2)]
# EfficientNet-Lite0's middle stage (blocks.2, stride 8, 40 channels) barely beats chance here; blocks.4
# (stride 16, 112 channels) was clearly better in a refine-0 sweep (see benchmarks/results/clip_ada.md).
DEFAULT_LAYERS = {"offline:efficientnet_lite0": "blocks.4"}


@dataclass
class TestSet:
    images: list[np.ndarray]  # H x W x 3 uint8, each at its own size
    masks: list[np.ndarray]  # H x W bool
    defects: list[str]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "magnetic_tile",
                        help="an MVTec-layout category (train/good for training, test + ground_truth for scoring)")
    parser.add_argument("--vision", default="offline:efficientnet_lite0", help="vision tower spec")
    parser.add_argument("--text", default="offline:minilm", help="text tower spec")
    parser.add_argument("--layer", default=None, help="vision stage (default: blocks.4 for EfficientNet-Lite0, else the middle stage)")
    parser.add_argument("--image-size", type=int, default=224, help="square model input size")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per setting")
    parser.add_argument("--batch-size", type=int, default=8, help="training images per step")
    parser.add_argument("--lr", type=float, default=1e-2, help="learning rate (short runs need more than the paper's)")
    parser.add_argument("--synthesis", choices=("perlin", "nsa", "cutpaste"), default="perlin", help="synthetic anomalies")
    parser.add_argument("--calibration-images", type=int, default=32, help="train/good images for the threshold")
    parser.add_argument("--test-cap", type=int, default=120, help="score every k-th test image so at most this many are used (0: all)")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=SETTINGS, help="which ablation settings to run")
    parser.add_argument("--seed", type=int, default=0, help="training seed, the same for every setting")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared machine)")
    parser.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "clip_ada_bench", help="training runs go here")
    parser.add_argument("--best-to", type=Path, default=REPO / "outputs" / "clip_ada_offline", help="copy of the best artifact")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "clip_ada.json", help="JSON results file")
    args = parser.parse_args(argv)
    args.layer = args.layer or DEFAULT_LAYERS.get(args.vision)
    return args


def load_test_set(root: Path, cap: int) -> TestSet:
    """Every k-th test image in the reader's order (grouped by defect type), so types keep their proportions."""
    dataset = MVTecDataset(root, "test")
    stride = 1 if cap <= 0 else max(1, math.ceil(len(dataset) / cap))
    images, masks, defects = [], [], []
    for index in range(0, len(dataset), stride):
        sample = dataset[index]
        images.append((sample.image * 255).round().byte().permute(1, 2, 0).numpy())
        masks.append(sample.mask.numpy())
        defects.append(sample.defect)
    return TestSet(images, masks, defects)


def train_argv(args: argparse.Namespace, setting: str, output_dir: Path) -> list[str]:
    refine, prompt = setting.removeprefix("refine").split("-")
    argv = ["--data", str(args.data), "--vision", args.vision, "--text", args.text, "--image-size", str(args.image_size),
            "--refine-steps", refine, "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--synthesis", args.synthesis, "--seed", str(args.seed),
            "--calibration-images", str(args.calibration_images), "--checkpointing-steps", str(args.steps), "--checkpoints-total-limit", "1", "--output-dir", str(output_dir)]
    if args.layer:
        argv += ["--layer", args.layer]
    return argv + (["--fixed-prompt"] if prompt == "fixed" else [])


def score_setting(model: ClipADA, test: TestSet) -> dict:
    started = time.perf_counter()
    results = model.predict(test.images, batch_size=8)
    seconds = time.perf_counter() - started
    metrics = evaluate(results, test.masks)
    return {**metrics, "inference_images_per_second": len(test.images) / seconds, "inference_seconds": seconds}


def run_setting(args: argparse.Namespace, setting: str, test: TestSet) -> dict:
    output_dir = args.work_dir / setting
    started = time.perf_counter()
    train_metrics = train_clip_ada.main(train_argv(args, setting, output_dir))
    train_seconds = time.perf_counter() - started
    model = ClipADA.from_pretrained(output_dir / train_clip_ada.ARTIFACT_DIR)
    row = {
        "setting": setting,
        "refine_steps": model.refine_steps,
        "learnable_prompt": model.config.learnable_prompt,
        "trainable_parameters": model.num_trainable_parameters(),
        "train_wall_seconds": train_seconds,
        "final_train_loss": train_metrics.get("final_loss_mean_last_10pct"),
        "threshold": model.config.threshold,
        **score_setting(model, test),
    }
    return row


def copy_best(rows: list[dict], args: argparse.Namespace) -> dict:
    best = max(rows, key=lambda row: row["pixel_ap"])
    with atomic_dir(args.best_to) as staging:
        source = args.work_dir / best["setting"] / train_clip_ada.ARTIFACT_DIR
        for file in source.iterdir():
            shutil.copy2(file, staging / file.name)
    return best


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    test = load_test_set(args.data, args.test_cap)
    rows = []
    for setting in args.settings:
        rows.append(run_setting(args, setting, test))
        print(json.dumps(rows[-1]), flush=True)
    best = copy_best(rows, args)
    summary = {
        "data": str(args.data), "test_images": len(test.images), "anomalous_test_images": int(sum(m.any() for m in test.masks)),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(), "best_setting": best["setting"], "best_artifact": str(args.best_to), "rows": rows,
    }
    write_json_atomic(args.results, summary)
    print(json.dumps({"best_setting": best["setting"], "best_artifact": str(args.best_to)}), flush=True)
    return rows


if __name__ == "__main__":
    main()
