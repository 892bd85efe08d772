"""TAB pretraining: align a CNN trunk with frozen text vectors of normal and abnormal object states.

Every step feeds B normal images and their B synthetic-anomaly versions (NSA by default) through the
trunk and projection head and classifies the 2B embeddings against the objects' class vectors
(defectclip.prompts): `--loss joint` over all 2K (object, state) vectors, `--loss paper` as TAB's Eq. 6.

    python -m train.tab_pretrain --data /data/mvtec --output-dir outputs/tab-resnet18
    python -m train.tab_pretrain --data ../shared/data/magnetic_tile --vision offline:efficientnet_lite0 \\
        --text offline:minilm --image-size 160 --max-steps 300 --output-dir outputs/tab-lite0
    accelerate launch -m train.tab_pretrain ...            # several GPUs: the same flags

The output folder holds the artifact (see defectclip.tab: the trunk in timm's format, projection head,
tab_config.json) plus metrics.json, and `checkpoints/` for `--resume latest`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from defectclip.data import DataError, MVTecDataset
from defectclip.io import write_json_atomic
from defectclip.prompts import PROMPT_LEVELS, PromptSettings, class_text_vectors
from defectclip.tab import (
    HEADS, LOSSES, SYNTHESES, EpochShuffle, SyntheticPairs, TABBackbone, TABConfig, TABError, check_loss, pair_loss,
)
from defectclip.towers import TowerError, build_text_tower, build_vision_tower
if __package__ in (None, ""):  # run by path (`accelerate launch train/x.py`): make the repo's `train` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train import common  # noqa: E402

OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "constant")
METRICS_NAME = "metrics.json"
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adamw": 1e-2}


# --------------------------------------------------------------------------------------------------
# arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.tab_pretrain", description=__doc__.split("\n")[0])
    tab = parser.add_argument_group("TAB")
    tab.add_argument("--data", type=Path, nargs="+", required=True,
                     help="MVTec-layout roots or category folders; only <category>/train/good is read")
    tab.add_argument("--vision", default="timm:resnet18",
                     help="vision trunk spec (timm CNN); offline: offline:efficientnet_lite0, tests: tiny:cnn")
    tab.add_argument("--text", default="open_clip:ViT-B-16/laion400m_e32",
                     help="frozen text tower spec; offline: offline:minilm, tests: tiny:text")
    tab.add_argument("--synthesis", choices=SYNTHESES, default="nsa", help="how the anomalous twin of each image is made")
    tab.add_argument("--loss", choices=LOSSES, default="joint",
                     help="joint: all 2K (object, state) vectors; paper: TAB Eq. 6 (needs >= 2 categories)")
    tab.add_argument("--head", choices=HEADS, default="linear", help="projection head from trunk features to text space")
    tab.add_argument("--prompts", choices=PROMPT_LEVELS, default="industrial",
                     help="prompt set, as in TAB's Table 8 ablation (industrial = the full set)")
    tab.add_argument("--image-size", type=int, default=None, help="square training size (default: the trunk's own)")
    tab.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                     help="sgd: momentum 0.9, as TAB's official code; adamw: try --lr 1e-4")
    tab.add_argument("--weight-decay", type=float, default=None,
                     help=f"weight decay of weights (not biases, norms or the logit scale); default {DEFAULT_WEIGHT_DECAY}")
    tab.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine",
                     help="cosine: decay to 0 over the run's total steps; constant: keep --lr")
    tab.add_argument("--text-cache", type=Path, default=None, help="folder caching the class text vectors as safetensors")
    tab.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction, default=True,
                     help="keep the trunk's BatchNorm running statistics as pretrained (their scale and shift "
                          "still train). On by default: on magnetic_tile (one category, 16 images a step) the "
                          "trunk then matched or beat its ImageNet start in PatchCore and PaDiM, and fell "
                          "5-13 image-AUROC points below it without (benchmarks/results/tab.md)")
    common.add_common_args(parser, batch_size=32, lr=0.01)
    args = parser.parse_args(argv)
    common.check_common_args(args)
    if args.image_size is not None and args.image_size < 32:
        raise SystemExit(f"--image-size must be at least 32 pixels, got {args.image_size}")
    check_fresh_output(args)
    return args


def check_fresh_output(args: argparse.Namespace) -> None:
    """A new run into a folder that holds checkpoints would fail at its first save; say so at once."""
    if not args.resume and any(common.checkpoint_dir(args.output_dir).glob("checkpoint_*")):
        raise SystemExit(f"{common.checkpoint_dir(args.output_dir)} already holds checkpoints: pass --resume latest to "
                         "continue that run, or choose another --output-dir.")


# --------------------------------------------------------------------------------------------------
# building


def list_training_images(roots: list[Path]) -> tuple[list[Path], list[int], list[str]]:
    """train/good images of every category under the roots, their object index, and the object names."""
    try:
        refs = [ref for root in roots for ref in MVTecDataset(root, "train").refs]
    except DataError as err:
        raise SystemExit(f"--data: {err}") from err
    objects = sorted({ref.object for ref in refs})
    index = {name: i for i, name in enumerate(objects)}
    return [ref.image_path for ref in refs], [index[ref.object] for ref in refs], objects


def build_text_vectors(args: argparse.Namespace, objects: list[str], device) -> tuple[torch.Tensor, int]:
    """cat(normal (K, D), abnormal (K, D)) on `device`, computed there once."""
    try:
        tower = build_text_tower(args.text)
    except TowerError as err:
        raise SystemExit(f"--text: {err}") from err
    tower.to(device)
    normal, abnormal = class_text_vectors(tower, objects, PromptSettings(args.prompts), args.text_cache)
    # towers.py keeps open_clip models in a process-wide cache: park it on the CPU, not in GPU memory.
    tower.to("cpu")
    return torch.cat([normal, abnormal]).to(device), tower.dim


def build_model(args: argparse.Namespace, objects: list[str], text_dim: int) -> TABBackbone:
    try:
        trunk = build_vision_tower(args.vision)
        config = TABConfig(vision=args.vision, text=args.text, objects=objects, text_dim=text_dim, loss=args.loss,
                           head=args.head, image_size=args.image_size, synthesis=args.synthesis,
                           prompts=PromptSettings(args.prompts).to_dict())
        return TABBackbone.build(config, trunk)
    except (TowerError, TABError) as err:
        raise SystemExit(f"--vision: {err}") from err


def build_loader(dataset: SyntheticPairs, args: argparse.Namespace, generator: torch.Generator):
    """drop_last: a last batch of one pair would make BatchNorm statistics meaningless. Persistent
    workers: small datasets have short epochs, and restarting workers every epoch would starve the GPU."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=EpochShuffle(len(dataset), generator), drop_last=True,
        num_workers=args.num_workers, pin_memory=torch.cuda.is_available(), persistent_workers=args.num_workers > 0,
    )


def build_optimizer(args: argparse.Namespace, model: TABBackbone) -> torch.optim.Optimizer:
    """Weight decay on weight matrices and kernels only: decaying biases, norm scales or the logit
    scale only pulls them towards values that carry no meaning."""
    decay = args.weight_decay if args.weight_decay is not None else DEFAULT_WEIGHT_DECAY[args.optimizer]
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=args.lr)


# --------------------------------------------------------------------------------------------------
# the loop: train.common's, with TAB's loss


def run_steps(accelerator, progress, model, optimizer, scheduler, loader, sampler, text_vectors,
              args, total: int) -> tuple[int, float]:
    """Train until `total` optimizer steps; returns the micro-batches run and the seconds taken."""
    preprocess = accelerator.unwrap_model(model).preprocess
    start_batch = progress.step * args.gradient_accumulation_steps
    batches = CountingIterator(common.batches_from(loader, accelerator, start_batch, sampler.generator, on_epoch=sampler.use_epoch,
                                   seed=args.seed))
    model.train()
    if args.freeze_bn:
        freeze_batchnorm_statistics(model)
    started = time.perf_counter()
    common.train_loop(accelerator, progress, model, optimizer, scheduler, batches,
                      lambda batch, step: pair_loss(model, batch, text_vectors, args.loss, preprocess),
                      args, total, "TAB")
    return batches.count, time.perf_counter() - started


class CountingIterator:
    """An iterator that counts what it hands out (the micro-batches of this run, for the throughput)."""

    def __init__(self, iterator):
        self.iterator, self.count = iterator, 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.iterator)
        self.count += 1
        return item


def freeze_batchnorm_statistics(model: torch.nn.Module) -> int:
    """Put every BatchNorm layer in eval mode so it normalises with, and no longer updates, its
    running statistics; its affine weights still get gradients. Returns how many layers it froze."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.eval()
    return len(norms)


# --------------------------------------------------------------------------------------------------
# saving


STAGING_NAME = ".artifact.incomplete"


def save_artifact(model: TABBackbone, output_dir: Path, metrics: dict, step: int) -> None:
    """Write the artifact beside checkpoints/, each file replaced by one rename, metrics.json last.

    checkpoints/ never moves, so a kill at any moment of this save leaves `--resume latest` working:
    the final checkpoint is written before this runs, and resuming from it redoes the save.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = output_dir / STAGING_NAME
    shutil.rmtree(staging, ignore_errors=True)  # left by a run killed during its final save
    staging.mkdir()
    model._write_artifact(staging, step=step)
    write_json_atomic(staging / METRICS_NAME, metrics)
    files = sorted(staging.iterdir(), key=lambda p: (p.name == METRICS_NAME, p.name))  # metrics.json last: "done"
    for file in files:
        fsync_file(file)
        os.replace(file, output_dir / file.name)
    shutil.rmtree(staging)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def run_metrics(progress, micro_batches: int, seconds: float, args, accelerator) -> dict:
    images = micro_batches * 2 * args.batch_size * accelerator.num_processes  # normal + synthetic
    return {
        # The whole run's history, kept in the checkpoints: a run resumed at its last step still has it.
        "final_loss": progress.loss_history[-1][1] if progress.loss_history else None,
        "first_loss": progress.loss_history[0][1] if progress.loss_history else None,
        "loss_history": [list(entry) for entry in progress.loss_history],
        "steps": progress.step,
        "micro_batches_this_run": micro_batches,
        "images_per_second": images / seconds if seconds > 0 else None,
        "wall_seconds": seconds,
        "device": str(accelerator.device),
        "freeze_bn": args.freeze_bn,
        "num_processes": accelerator.num_processes,
    }


# --------------------------------------------------------------------------------------------------
# main


def prepare_training(args, accelerator):
    """Data, text vectors and model, each failing with a message that names the flag to change."""
    paths, labels, objects = list_training_images(args.data)
    try:
        check_loss(args.loss, len(objects))
    except TABError as err:
        raise SystemExit(f"--loss {args.loss}: {err}") from err
    text_vectors, text_dim = build_text_vectors(args, objects, accelerator.device)
    model = build_model(args, objects, text_dim)
    dataset = SyntheticPairs(paths, labels, model.config.image_size, args.synthesis, args.seed)
    accelerator.print(f"TAB: {len(paths)} images, objects {objects}, {args.vision} + {args.text}, "
                      f"{model.config.image_size}px, loss {args.loss}")
    return model, dataset, text_vectors


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator, progress = common.make_accelerator(args, "tab_pretrain")
    common.seed_everything(args.seed)
    model, dataset, text_vectors = prepare_training(args, accelerator)
    plain_loader = build_loader(dataset, args, torch.Generator())
    loader = accelerator.prepare(plain_loader)
    total = common.total_steps(args, len(loader))
    optimizer = build_optimizer(args, model)
    scheduler = common.make_scheduler(args.lr_schedule, optimizer, total, accelerator.num_processes)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    common.resume_if_asked(accelerator, args, progress)
    micro_batches, seconds = run_steps(accelerator, progress, model, optimizer, scheduler, loader,
                                       plain_loader.sampler, text_vectors, args, total)
    metrics = run_metrics(progress, micro_batches, seconds, args, accelerator)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_artifact(accelerator.unwrap_model(model), args.output_dir, metrics, progress.step)
    common.push_trained(accelerator.unwrap_model(model), args, accelerator, training_data=common.known_sources(args.data))
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
