"""What every training script shares: flags, the Accelerator, the scheduler, the loop, checkpoints, logging
and the push. Each script states only what differs: its data, its model and its loss.

Checkpoints are Accelerate states under `<output-dir>/checkpoints/checkpoint_<n>` (model, optimizer,
scheduler, RNG, and the step counter registered here), so `--resume latest` continues with the same
step count, optimizer state and data order. `--report-to tensorboard` sends the loss and learning rate to
`<output-dir>/logs/<script>/` through Accelerate's trackers. `--push-to-hub <repo>` pushes the saved
artifact with its model card (defectclip.sharing), deleting remote files the new version no longer has.
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
REPORT_TO = ("none", "tensorboard")  # trackers the pinned requirements install
LOGS_DIR = "logs"


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
    group.add_argument("--push-to-hub", default=None, metavar="REPO",
                       help="push the final artifact with its model card to this Hub repo ('org/name')")
    group.add_argument("--hub-token", default=None, help="Hub token for --push-to-hub (default: HF_TOKEN or the login)")
    group.add_argument("--report-to", choices=REPORT_TO, default="none",
                       help=f"tracker for loss and learning rate; tensorboard writes <output-dir>/{LOGS_DIR}/")


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


def make_accelerator(args: argparse.Namespace, name: str) -> tuple[Accelerator, Progress]:
    """The Accelerator with checkpointing, accumulation and (with --report-to) a tracker named `name`."""
    project = ProjectConfiguration(
        project_dir=str(args.output_dir),
        logging_dir=str(Path(args.output_dir) / LOGS_DIR),
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
        log_with=None if args.report_to == "none" else args.report_to,
    )
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    if args.report_to != "none":
        accelerator.init_trackers(name, config=tracker_config(args))
    return accelerator, progress


def tracker_config(args: argparse.Namespace) -> dict:
    """The run's flags as hyperparameters: TensorBoard takes only numbers, strings and booleans."""
    plain = (int, float, str, bool)
    return {key: value if isinstance(value, plain) else str(value) for key, value in vars(args).items()
            if value is not None and key != "hub_token"}


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


# --------------------------------------------------------------------------------------------------
# the scheduler


SCHEDULES = ("cosine", "constant", "linear", "multistep")


def make_scheduler(name: str, optimizer, total: int, num_processes: int, warmup: int = 0,
                   milestones: tuple[float, ...] = (), gamma: float = 0.1):
    """transformers' schedule `name` over this run's optimizer steps, or the step decay `multistep`
    (x `gamma` at each fraction in `milestones` of the run), which transformers lacks.

    A prepared scheduler is stepped once per process per optimizer step (Accelerate's default without
    split_batches), so every horizon is counted in those steps: total x num_processes, for every script.
    """
    from transformers import get_scheduler

    horizon, warmup = max(1, total * num_processes), warmup * num_processes
    if name == "multistep":
        steps = sorted({max(1, int(f * horizon)) for f in milestones})
        return torch.optim.lr_scheduler.LambdaLR(optimizer, step_decay(steps, gamma))
    if name not in SCHEDULES:
        raise SystemExit(f"Unknown learning-rate schedule {name!r}; use one of {SCHEDULES}.")
    if name == "constant":
        name = "constant_with_warmup" if warmup else "constant"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=horizon)


def step_decay(milestones: list[int], gamma: float) -> Callable[[int], float]:
    """A plain function (LambdaLR saves none in its state), so a resume follows this run's milestones."""
    def factor(step: int) -> float:
        return gamma ** sum(step >= m for m in milestones)
    return factor


# --------------------------------------------------------------------------------------------------
# the loop


def train_loop(accelerator: Accelerator, progress: Progress, model, optimizer, scheduler, batches: Iterator,
               compute_loss: Callable[[object, int], torch.Tensor], args: argparse.Namespace, last_step: int,
               desc: str) -> list[float]:
    """Optimizer steps until `last_step`, `args.gradient_accumulation_steps` micro-batches each.

    `compute_loss(batch, step)` is what a script adds. The losses stay on the device and are read back
    once per logging window and once at the end (each read is a device synchronisation); the return value
    is the mean loss of every optimizer step run here, averaged over processes.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=last_step, initial=progress.step, desc=desc, disable=not accelerator.is_local_main_process)
    micro: list[torch.Tensor] = []
    steps: list[torch.Tensor] = []
    while progress.step < last_step:
        with accelerator.accumulate(model):
            loss = compute_loss(next(batches), progress.step)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        micro.append(loss.detach().float())
        if not accelerator.sync_gradients:
            continue
        progress.step += 1
        steps.append(torch.stack(micro).mean())
        micro = []
        bar.update(1)
        if progress.step % args.log_every == 0 or progress.step == last_step:
            log_window(accelerator, progress, args, steps, scheduler, bar)
        maybe_checkpoint(accelerator, progress, args, last_step)
    bar.close()
    if not steps:
        return []
    return accelerator.reduce(torch.stack(steps), reduction="mean").tolist()


def log_window(accelerator: Accelerator, progress: Progress, args, steps: list[torch.Tensor], scheduler, bar) -> None:
    """The mean loss of the steps since the last log, to the progress bar and the trackers."""
    window = steps[-((progress.step - 1) % args.log_every) - 1:]
    loss = accelerator.reduce(torch.stack(window).mean(), reduction="mean").item()
    bar.set_postfix(loss=f"{loss:.4f}")
    accelerator.log({"loss": loss, "lr": scheduler.get_last_lr()[-1]}, step=progress.step)


# --------------------------------------------------------------------------------------------------
# the end


def push_trained(artifact, args: argparse.Namespace, accelerator: Accelerator, *, training_data: tuple = (),
                 datasets: tuple[str, ...] = ()) -> None:
    """With --push-to-hub, push `artifact` through its export (files + model card); main process only.

    The card names what the run knows: the known sources it trained on and Hub datasets it read.
    """
    if not args.push_to_hub or not accelerator.is_main_process:
        return
    from defectclip.sharing import CardInfo

    card = CardInfo(repo_id=args.push_to_hub, training_data=tuple(training_data), datasets=tuple(datasets))
    artifact.push_to_hub(args.push_to_hub, card=card, token=args.hub_token, echo=accelerator.print)


def known_sources(folders) -> tuple[str, ...]:
    """The names of known sources (defectclip.region_dataset.KNOWN_SOURCES) among the training folders."""
    from defectclip.region_dataset import KNOWN_SOURCES

    names = {Path(folder).resolve().name for folder in folders}
    names |= {Path(folder).resolve().parent.name for folder in folders}  # a category folder of a known root
    return tuple(sorted(names & set(KNOWN_SOURCES)))
