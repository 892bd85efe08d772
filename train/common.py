"""What every training script shares: flags, the Accelerator, the scheduler, the loop, checkpoints, logging
and the push. Each script states only what differs: its data, its model and its loss.

Checkpoints live under `<output-dir>/checkpoints/checkpoint_<n>` (models, optimizers, schedulers, the
gradient scaler, RNG states, the step counter and the loss history), so `--resume latest` continues
with the same step count, optimizer state and data order. They are written by `train.checkpoints`,
not Accelerate's `save_state`: safetensors + JSON only, so resuming never unpickles anything, and
each checkpoint appears under its name only once it is complete.
`--report-to tensorboard` sends the loss and learning rate to `<output-dir>/logs/<script>/` through
Accelerate's trackers. `--push-to-hub <repo>` pushes the saved artifact with its model card
(defectclip.sharing), deleting remote files the new version no longer has.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

from train import checkpoints as ckpt

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
    """The step counter and the logged losses, saved (as JSON) in every checkpoint, so a resumed run
    knows where it was and its metrics cover the whole run, even one resumed at its last step."""

    step: int = 0
    loss_history: list = field(default_factory=list)  # [[step, loss], ...] as logged

    def state_dict(self) -> dict:
        return {"step": self.step, "loss_history": [[int(s), float(v)] for s, v in self.loss_history]}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.loss_history = [[int(s), float(v)] for s, v in state.get("loss_history", [])]


def make_accelerator(args: argparse.Namespace, name: str) -> tuple[Accelerator, Progress]:
    """The Accelerator with accumulation and (with --report-to) a tracker named `name`."""
    project = ProjectConfiguration(project_dir=str(args.output_dir), logging_dir=str(Path(args.output_dir) / LOGS_DIR),
                                   total_limit=args.checkpoints_total_limit)
    # sync_with_dataloader=False: Accelerate would otherwise force an optimizer step at every epoch end,
    # which shifts the micro-batch count a resumed run uses to find its place in the data.
    accumulation = GradientAccumulationPlugin(num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_plugin=accumulation,
        project_config=project,
        log_with=None if args.report_to == "none" else args.report_to,
    )
    # The Progress is not registered with Accelerate: its save_state would pickle it and its load_state
    # would unpickle it (weights_only=False). It travels in the checkpoint's state.json instead.
    if args.report_to != "none":
        accelerator.init_trackers(name, config=tracker_config(args))
    return accelerator, Progress()


def tracker_config(args: argparse.Namespace) -> dict:
    """The run's flags as hyperparameters: TensorBoard takes only numbers, strings and booleans."""
    plain = (int, float, str, bool)
    return {key: value if isinstance(value, plain) else str(value) for key, value in vars(args).items()
            if value is not None}


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def find_checkpoint(output_dir: Path, resume: str, say: Callable[[str], None] = print) -> Path:
    """'latest' -> the newest complete checkpoint_<n> under output_dir; anything else must be a complete one.

    Incomplete folders (a run killed while writing, a copy that lost files, Accelerate's pickle
    format) are named and skipped, never loaded.
    """
    if resume != "latest":
        folder = Path(resume)
        if not folder.is_dir() and (checkpoint_dir(output_dir) / resume).is_dir():
            folder = checkpoint_dir(output_dir) / resume  # `--resume checkpoint_2` names one of this run's
        if not folder.is_dir():
            raise SystemExit(f"--resume {resume}: no such checkpoint folder.")
        if ckpt.read_manifest(folder) is None:
            raise SystemExit(f"--resume {resume}: {ckpt.incomplete_message(folder)}")
        return folder
    root = checkpoint_dir(output_dir)
    for folder in reversed(ckpt.named_checkpoints(root)):
        if ckpt.is_complete(folder):
            return folder
        say(f"skipping {folder}: {ckpt.incomplete_message(folder)}")
    raise SystemExit(f"--resume latest: no complete checkpoint under {root}; start without --resume.")


def save_checkpoint(accelerator: Accelerator, progress: Progress, output_dir: Path, keep: int | None) -> Path:
    """Write checkpoint_<n> (n one past every existing number) via a staging folder and one rename,
    then delete complete checkpoints beyond `keep`, oldest first."""
    root = checkpoint_dir(output_dir)
    index = ckpt.next_index(root)
    staging, target = ckpt.staging_for(root, index), root / f"checkpoint_{index}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while writing this number
        staging.mkdir()
    accelerator.wait_for_everyone()
    ckpt.write_rng(staging, accelerator.process_index)  # every process has its own generators
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        models = [accelerator.unwrap_model(m) for m in accelerator._models]  # what save_state would save
        extra = {"progress": progress.state_dict(), "accelerator_step": int(accelerator.step),
                 "process_count": accelerator.num_processes}
        ckpt.write_checkpoint(staging, models, accelerator._optimizers, accelerator._schedulers,
                              accelerator.scaler, extra)
        ckpt.publish(staging, target)
        ckpt.rotate(root, keep)
    accelerator.wait_for_everyone()
    return target


def load_checkpoint(accelerator: Accelerator, progress: Progress, folder: Path) -> None:
    """Restore models, optimizers, schedulers, scaler, RNG and progress from safetensors + JSON only."""
    state, _ = ckpt.read_checkpoint(folder)
    counts = {"models": (len(accelerator._models), len([n for n in state["files"] if n.startswith("model")])),
              "optimizers": (len(accelerator._optimizers), len(state["optimizers"])),
              "schedulers": (len(accelerator._schedulers), len(state["schedulers"]))}
    for what, (have, saved) in counts.items():
        if have != saved:
            raise ckpt.CheckpointError(f"{folder} holds {saved} {what}, this run has {have}: it belongs to another script.")
    ckpt.load_models(folder, [accelerator.unwrap_model(m) for m in accelerator._models])
    try:
        for optimizer, saved in zip(accelerator._optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(accelerator._schedulers, state["schedulers"]):
            scheduler.load_state_dict(saved)
        if accelerator.scaler is not None and state["scaler"] is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        rng = ckpt.read_rng(folder, accelerator.process_index)
        if rng is not None:
            ckpt.set_rng_state(rng)
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise ckpt.CheckpointError(f"{folder} does not fit this run's optimizer, scheduler or RNG: {err}") from err
    progress.load_state_dict(state["progress"])
    accelerator.step = int(state["accelerator_step"])


def resume_if_asked(accelerator: Accelerator, args: argparse.Namespace, progress: Progress) -> None:
    """Load model, optimizer, scheduler, RNG, step counter and loss history from a checkpoint."""
    if not args.resume:
        return
    folder = find_checkpoint(args.output_dir, args.resume, accelerator.print)
    load_checkpoint(accelerator, progress, folder)
    accelerator.print(f"resumed from {folder} at step {progress.step}")


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
    """Every --checkpointing-steps, and always at the last step, so the final save can be redone
    from a checkpoint if the run is killed while writing the artifact."""
    if progress.step % args.checkpointing_steps == 0 or progress.step == last_step:
        save_checkpoint(accelerator, progress, args.output_dir, args.checkpoints_total_limit)


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

    `compute_loss(batch, step)` is what a script adds. Each step's loss stays on the device until a log
    or a checkpoint moves the pending ones into the run's history (one device read for all of them:
    each read is a synchronisation). Returns the losses of the steps run here, averaged over processes.
    """
    from tqdm.auto import tqdm

    first_step = progress.step
    bar = tqdm(total=last_step, initial=progress.step, desc=desc, disable=not accelerator.is_local_main_process)
    micro: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []
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
        pending.append(torch.stack(micro).mean())
        micro = []
        bar.update(1)
        after_step(accelerator, progress, args, pending, scheduler, bar, last_step)
    bar.close()
    return [loss for step, loss in progress.loss_history if step > first_step]


def after_step(accelerator: Accelerator, progress: Progress, args, pending: list[torch.Tensor], scheduler, bar,
               last_step: int) -> None:
    """Log every --log-every steps, checkpoint every --checkpointing-steps (and both at the last step)."""
    logging = progress.step % args.log_every == 0 or progress.step == last_step
    if logging or progress.step % args.checkpointing_steps == 0 or progress.step == last_step:
        record_losses(accelerator, progress, pending)
    if logging:
        log_window(accelerator, progress, args, scheduler, bar)
    maybe_checkpoint(accelerator, progress, args, last_step)


def record_losses(accelerator: Accelerator, progress: Progress, pending: list[torch.Tensor]) -> None:
    """Move the pending per-step losses (on the device) into the history a checkpoint saves."""
    if not pending:
        return
    values = accelerator.reduce(torch.stack(pending), reduction="mean").tolist()
    first = progress.step - len(values) + 1
    progress.loss_history.extend([first + i, float(value)] for i, value in enumerate(values))
    pending.clear()


def log_window(accelerator: Accelerator, progress: Progress, args, scheduler, bar) -> None:
    """The mean loss of the steps since the last log, to the progress bar and the trackers."""
    since = progress.step - ((progress.step - 1) % args.log_every)
    window = [loss for step, loss in progress.loss_history if step >= since]
    if not window:
        return
    loss = sum(window) / len(window)
    bar.set_postfix(loss=f"{loss:.4f}")
    accelerator.log({"loss": loss, "lr": scheduler.get_last_lr()[-1]}, step=progress.step)


def loss_values(progress: Progress) -> list[float]:
    return [loss for _, loss in progress.loss_history]


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
    # The token comes from HF_TOKEN or the saved login: one on the command line would be visible in `ps`.
    artifact.push_to_hub(args.push_to_hub, card=card, echo=accelerator.print)


def known_sources(folders) -> tuple[str, ...]:
    """The names of known sources (defectclip.region_dataset.KNOWN_SOURCES) among the training folders."""
    from defectclip.region_dataset import KNOWN_SOURCES

    names = {Path(folder).resolve().name for folder in folders}
    names |= {Path(folder).resolve().parent.name for folder in folders}  # a category folder of a known root
    return tuple(sorted(names & set(KNOWN_SOURCES)))
