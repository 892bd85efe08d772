"""Throughput of TAB pretraining: is the synthesis keeping the accelerator busy?

Three timings on the same batches, each printed as one JSON line (images = normal + synthetic):
  data_only    the DataLoader alone: decode, resize, NSA/CutPaste/Perlin synthesis (workers parallelise it)
  whole_step   data + forward + loss + backward + optimizer step, as in train/tab_pretrain.py
  model_alone  forward + loss + backward + optimizer step on the whole_step batches, already on the device
and a summary line with whole_step / model_alone (the target on an H100 is >= 0.7: synthesis in the
workers should hide behind the model).

    python benchmarks/bench_tab_throughput.py --data ../shared/data/magnetic_tile \\
        --vision offline:efficientnet_lite0 --text offline:minilm --image-size 224 --batch-size 32 --num-workers 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from defectclip.data import MVTecDataset
from defectclip.prompts import class_text_vectors
from defectclip.tab import LOSSES, SYNTHESES, SyntheticPairs, TABBackbone, TABConfig, pair_loss
from defectclip.towers import build_text_tower

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, nargs="+", default=[DEFAULT_DATA], help="MVTec-layout roots (train/good)")
    parser.add_argument("--vision", default="offline:efficientnet_lite0", help="vision trunk spec")
    parser.add_argument("--text", default="offline:minilm", help="text tower spec (used once, for the class vectors)")
    parser.add_argument("--synthesis", choices=SYNTHESES, default="nsa", help="anomaly synthesis")
    parser.add_argument("--loss", choices=LOSSES, default="joint", help="TAB loss")
    parser.add_argument("--image-size", type=int, default=224, help="square training size")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step (2x images through the model)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, cuDNN autotune, workers)")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--data-only", action="store_true",
                        help="time only the data pipeline (how many workers a fast accelerator needs)")
    return parser.parse_args(argv)


def build(args):
    refs = [ref for root in args.data for ref in MVTecDataset(root, "train").refs]
    objects = sorted({ref.object for ref in refs})
    labels = [objects.index(ref.object) for ref in refs]
    normal, abnormal = class_text_vectors(build_text_tower(args.text), objects)
    text_vectors = torch.cat([normal, abnormal]).to(args.device)
    config = TABConfig(vision=args.vision, text=args.text, objects=objects, text_dim=normal.shape[1],
                       loss=args.loss, image_size=args.image_size, synthesis=args.synthesis)
    model = TABBackbone.build(config).to(args.device).train()
    dataset = SyntheticPairs([r.image_path for r in refs], labels, args.image_size, args.synthesis, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.num_workers, pin_memory=args.device.startswith("cuda"),
                                         persistent_workers=args.num_workers > 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return model, loader, optimizer, text_vectors


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def endless(loader):
    while True:
        yield from loader


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(model, optimizer, batch, text_vectors, args) -> None:
    loss = pair_loss(model, batch, text_vectors, args.loss, model.preprocess)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(steps: int, device: str, step) -> float:
    synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    synchronize(device)
    return time.perf_counter() - start


def report(mode: str, seconds: float, args, extra=None) -> dict:
    images = 2 * args.batch_size * args.steps
    line = {"bench": "tab_throughput", "mode": mode, "images_per_second": round(images / seconds, 2),
            "seconds": round(seconds, 3), "steps": args.steps, "batch_pairs": args.batch_size,
            "image_size": args.image_size, "vision": args.vision, "synthesis": args.synthesis,
            "num_workers": args.num_workers, "device": args.device, "torch_threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), **(extra or {})}
    print(json.dumps(line), flush=True)
    return line


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, loader, optimizer, text_vectors = build(args)
    batches = endless(loader)
    # Data first: timed after the model warm-up, it would drain batches the workers prefetched meanwhile.
    for _ in range(max(1, args.num_workers)):
        next(batches)  # starts the workers
    data_seconds = timed(args.steps, "cpu", lambda i: next(batches))
    if args.data_only:
        return [report("data_only", data_seconds, args)]
    for _ in range(args.warmup):  # warms the allocator (and cuDNN autotuning) before the model timings
        train_step(model, optimizer, to_device(next(batches), args.device), text_vectors, args)
    kept: list[dict] = []

    def whole(i):
        kept.append(to_device(next(batches), args.device))
        train_step(model, optimizer, kept[-1], text_vectors, args)

    whole_seconds = timed(args.steps, args.device, whole)
    model_seconds = timed(args.steps, args.device, lambda i: train_step(model, optimizer, kept[i], text_vectors, args))
    lines = [report("data_only", data_seconds, args), report("whole_step", whole_seconds, args),
             report("model_alone", model_seconds, args)]
    ratio = model_seconds / whole_seconds
    lines.append(report("summary", whole_seconds, args, {"whole_over_model_alone": round(ratio, 3), "target": 0.7}))
    return lines


if __name__ == "__main__":
    main()
