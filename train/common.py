"""What every training script shares: common flags, the Accelerator, checkpoints and resume.

Checkpoints are Accelerate states under `<output-dir>/checkpoints/checkpoint_<n>` (model, optimizer,
scheduler, RNG, and the step counter registered here), so `--resume latest` continues with the same
step count, optimizer state and data order.
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

MIXED_PRECISION = ("no", "fp16", "bf16")


def add_common_args(parser: argparse.ArgumentParser, *, batch_size: int, lr: float) -> None:
    """Flags every script has, with each script's own defaults for batch size and learning rate."""
    group = parser.add_argument_group("training loop")
    group.add_argument("--output-dir", type=Path, required=True, help="folder for checkpoints and the final artifact")
    group.add_argument("--batch-size", type=int, default=batch_size, help="images per device per step")
    group.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    group.add_argument("--epochs", type=int, default=10, help="passes over the data (ignored when --max-steps is set)")
    group.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    group.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per optimizer step")
    group.add_argument("--mixed-precision", choices=MIXED_PRECISION, default="no", help="autocast precision")
    group.add_argument("--checkpointing-steps", type=int, default=500, help="save a resumable state every N steps")
    group.add_argument("--checkpoints-total-limit", type=int, default=3, help="keep at most this many checkpoints")
    group.add_argument("--resume", default=None, help="'latest' or a checkpoint folder to continue from")
    group.add_argument("--seed", type=int, default=0, help="seed for weights, data order and synthesis")
    group.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    group.add_argument("--log-every", type=int, default=10, help="log the loss every N steps")
    group.add_argument("--push-to-hub", default=None, metavar="REPO", help="push the final artifact to this Hub repo")


def check_common_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "epochs", "gradient_accumulation_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise SystemExit(f"--max-steps must be at least 1, got {args.max_steps}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Progress:
    """The step counter, saved inside every checkpoint so a resumed run knows where it was."""

    step: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def make_accelerator(args: argparse.Namespace) -> tuple[Accelerator, Progress]:
    project = ProjectConfiguration(
        project_dir=str(args.output_dir),
        automatic_checkpoint_naming=True,
        total_limit=args.checkpoints_total_limit,
    )
    # sync_with_dataloader=False: Accelerate would otherwise force an optimizer step at every epoch end,
    # which shifts the micro-batch count a resumed run uses to find its place in the data.
    accumulation = GradientAccumulationPlugin(num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_plugin=accumulation,
        project_config=project,
    )
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    return accelerator, progress


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def find_checkpoint(output_dir: Path, resume: str) -> Path:
    """'latest' -> the newest checkpoint_<n> under output_dir; anything else must be a folder."""
    if resume != "latest":
        folder = Path(resume)
        if not folder.is_dir():
            raise SystemExit(f"--resume {resume}: no such checkpoint folder.")
        return folder
    found = sorted(checkpoint_dir(output_dir).glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[-1]))
    if not found:
        raise SystemExit(f"--resume latest: no checkpoint under {checkpoint_dir(output_dir)}; start without --resume.")
    return found[-1]


def resume_if_asked(accelerator: Accelerator, args: argparse.Namespace) -> None:
    """Load model, optimizer, scheduler, RNG and step counter from a checkpoint."""
    if not args.resume:
        return
    folder = find_checkpoint(args.output_dir, args.resume)
    accelerator.load_state(str(folder))
    # Accelerate numbers new checkpoints after the one loaded, so later saves never overwrite it.
    accelerator.project_configuration.iteration = int(folder.name.split("_")[-1]) + 1
    accelerator.print(f"resumed from {folder}")


def total_steps(args: argparse.Namespace, batches_per_epoch: int) -> int:
    if args.max_steps is not None:
        return args.max_steps
    return max(1, math.ceil(args.epochs * batches_per_epoch / args.gradient_accumulation_steps))


def batches_from(
    loader,
    accelerator: Accelerator,
    start_batch: int,
    generator: torch.Generator | None = None,
    on_epoch: Callable[[int], None] | None = None,
    seed: int = 0,
) -> Iterator:
    """Endless batches in a reproducible order, starting at micro-batch `start_batch`.

    `generator` is the one given to the DataLoader's shuffling: each epoch reseeds it from the epoch
    number, so after a resume the same batches come in the same order and the ones already trained on
    are skipped. `on_epoch(epoch)` runs before each epoch's iterator is made, so a sampler (it runs in
    the main process) can learn the true epoch number, which also holds after a resume.
    """
    per_epoch = len(loader)
    if per_epoch == 0:
        raise SystemExit("The training data yields no batch: add images or lower --batch-size.")
    epoch, skip = divmod(start_batch, per_epoch)
    while True:
        if generator is not None:
            generator.manual_seed(1_000_003 * epoch + 7_919 * seed + 17)  # differs by --seed and by epoch
        if on_epoch is not None:
            on_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        yield from epoch_loader
        epoch, skip = epoch + 1, 0


def maybe_checkpoint(accelerator: Accelerator, progress: Progress, args: argparse.Namespace, last_step: int) -> None:
    if progress.step % args.checkpointing_steps == 0 or progress.step == last_step:
        accelerator.save_state()


def log_loss(accelerator: Accelerator, progress: Progress, args, loss: float, bar=None) -> None:
    if bar is not None:
        bar.set_postfix(loss=f"{loss:.4f}")
    if progress.step % args.log_every == 0:
        accelerator.log({"loss": loss}, step=progress.step)
