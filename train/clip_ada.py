"""Train CLIP-ADA (learnable prompt + projections + refinement) on normal images with synthetic anomalies.

One model for every category given (the paper's unified setting): all `train/good` images of all `--data`
folders form one training set; about half of them get a synthetic anomaly (Perlin by default, as the
paper's DRAEM-style synthesis; NSA or CutPaste selectable) whose mask is the target.

    python -m train.clip_ada --data /data/mvtec --output-dir runs/clip_ada
    python -m train.clip_ada --data data/magnetic_tile --vision offline:efficientnet_lite0 \
        --text offline:minilm --image-size 256 --max-steps 300 --output-dir runs/clip_ada_offline

Writes `<output-dir>/model` (the artifact: config.json + model.safetensors), `<output-dir>/metrics.json`
and resumable checkpoints under `<output-dir>/checkpoints`.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from defectclip.clip_ada import DEFAULT_TEMPLATE, DEFAULT_TOWER, ClipADA, ClipADAConfig, clip_ada_loss
from defectclip.data import DataError, MVTecDataset, Preprocess, array_to_tensor, load_image, normalize, resize
from defectclip.io import write_json_atomic
from defectclip.synth import SYNTHESES, synthesize
if __package__ in (None, ""):  # run by path (`accelerate launch train/x.py`): make the repo's `train` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train import common  # noqa: E402

ARTIFACT_DIR = "model"
METRICS_FILE = "metrics.json"
# The paper multiplies the learning rate by 0.2 at epochs 400 and 700 of 800: at these fractions of training.
LR_MILESTONES = (0.5, 0.875)
LR_DECAY = 0.2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--vision", default=DEFAULT_TOWER, help="vision tower spec (frozen), e.g. offline:efficientnet_lite0")
    model.add_argument("--text", default=DEFAULT_TOWER, help="text tower spec (frozen), e.g. offline:minilm")
    model.add_argument("--layer", default=None, help="vision stage to project (default: the tower's middle stage)")
    model.add_argument("--n-ctx", type=int, default=4, help="number of learnable context vectors in the prompt")
    model.add_argument("--template", default=DEFAULT_TEMPLATE, help="prompt template; '[ctx]' marks where the context goes")
    model.add_argument("--ctx-init", choices=("random", "word"), default="random", help="context initialisation")
    model.add_argument("--ctx-word", default="object", help="word for the fixed prompt's slot and for --ctx-init word")
    model.add_argument("--refine-steps", type=int, choices=(0, 1, 2), default=1, help="anomaly-region refinement steps")
    model.add_argument("--fixed-prompt", action="store_true", help="ablation: a fixed prompt instead of learnable context")
    model.add_argument("--fixed-scale", action="store_true", help="keep the similarity scale constant instead of learning it")
    model.add_argument("--image-size", type=int, default=None, help="square training/inference size (default: the tower's)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", nargs="+", type=Path, required=True, help="MVTec-layout roots or category folders (train/good is used)")
    data.add_argument("--synthesis", choices=sorted(SYNTHESES), default="perlin", help="synthetic anomaly method")
    data.add_argument("--anomaly-prob", type=float, default=0.5, help="fraction of training images given an anomaly")
    loss = parser.add_argument_group("loss and calibration")
    loss.add_argument("--refine-weight", type=float, default=1.0, help="lambda: weight of the refined steps' BCE")
    loss.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay on projection weights")
    loss.add_argument("--calibration-images", type=int, default=64, help="train/good images for the threshold (0: keep 0.5)")
    loss.add_argument("--threshold-quantile", type=float, default=0.99, help="quantile of normal scores used as threshold")
    common.add_common_args(parser, batch_size=16, lr=1e-3)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    common.check_common_args(args)
    if not 0.0 <= args.anomaly_prob <= 1.0:
        raise SystemExit(f"--anomaly-prob must be in [0, 1], got {args.anomaly_prob}")
    if args.n_ctx < 1:
        raise SystemExit(f"--n-ctx must be at least 1, got {args.n_ctx}")
    if args.image_size is not None and args.image_size < 16:
        raise SystemExit(f"--image-size must be at least 16 (the synthesis minimum), got {args.image_size}")
    if not 0.0 < args.threshold_quantile <= 1.0:
        raise SystemExit(f"--threshold-quantile must be in (0, 1], got {args.threshold_quantile}")


# --------------------------------------------------------------------------------------------------
# data


def list_normal_images(roots: list[Path]) -> list[Path]:
    """Every train/good image of every root or category folder, in a stable order."""
    paths = [ref.image_path for root in roots for ref in MVTecDataset(root, "train").refs]
    if len(paths) < 2:
        raise DataError(f"CLIP-ADA needs at least 2 training images (a second one feeds the synthesis); found {len(paths)}.")
    return paths


def foreign_texture(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Make another normal image look foreign, standing in for DRAEM's DTD textures (not available offline).

    A random crop is rotated, flipped and passed through one strong intensity change, so the filled region
    differs from the product's own surface in structure and in grey levels.
    """
    height, width = image.shape[:2]
    side = int(rng.uniform(0.25, 1.0) * min(height, width))
    top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
    patch = np.rot90(image[top : top + side, left : left + side], k=int(rng.integers(4)))
    patch = patch[:, ::-1] if rng.random() < 0.5 else patch
    change = rng.integers(4)
    if change == 0:  # invert
        patch = 255 - patch
    elif change == 1:  # gamma
        patch = 255.0 * (patch / 255.0) ** rng.uniform(0.3, 3.0)
    elif change == 2:  # posterize to 1-3 bits
        bits = int(rng.integers(1, 4))
        patch = (patch.astype(np.uint8) >> (8 - bits)) << (8 - bits)
    else:  # solarize
        patch = np.where(patch >= rng.uniform(64, 192), 255 - patch, patch)
    return np.ascontiguousarray(np.clip(patch, 0, 255).astype(np.uint8))


class SyntheticAnomalies(Dataset):
    """Normal images at the model's size; a seeded fraction of them carry a synthetic anomaly and its mask.

    Items are addressed as (index, epoch_token): the sampler below draws one token per epoch from the
    epoch-seeded shuffle generator, so an image gets a new anomaly every epoch, the same one after a resume,
    and a different one for another --seed.
    """

    def __init__(self, paths: list[Path], preprocess: Preprocess, synthesis: str, anomaly_prob: float, seed: int):
        self.paths, self.preprocess = paths, preprocess
        self.synthesis, self.anomaly_prob, self.seed = synthesis, anomaly_prob, seed

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> np.ndarray:
        """H x W x 3 uint8 at the model size, resized the way inference resizes."""
        image = resize(load_image(self.paths[index]), self.preprocess.size, self.preprocess.interpolation)
        return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, epoch_token = key if isinstance(key, tuple) else (key, 0)
        rng = np.random.default_rng([self.seed, index, epoch_token])
        image = self.read(index)
        mask = np.zeros(image.shape[:2], dtype=bool)
        if rng.random() < self.anomaly_prob:
            image, mask = synthesize(self.synthesis, image, self.other_image(index, rng), rng)
        return {"image": normalize(array_to_tensor(image), self.preprocess), "mask": torch.from_numpy(mask)}

    def other_image(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """A different training image: NSA/CutPaste's patch source, or Perlin's (made foreign) texture."""
        other = int(rng.integers(len(self) - 1))
        other = self.read(other + (other >= index))
        return foreign_texture(other, rng) if self.synthesis == "perlin" else other


class ShuffleWithEpochToken(Sampler):
    """A shuffled order plus one token per epoch, both drawn from `generator`.

    `train.common.batches_from` reseeds the generator from the epoch number before each epoch, so order and
    token depend only on the epoch: resumed runs see the same images with the same anomalies.
    """

    def __init__(self, size: int, generator: torch.Generator):
        self.size, self.generator = size, generator

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        token = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        for index in torch.randperm(self.size, generator=self.generator).tolist():
            yield index, token


def make_loader(dataset: SyntheticAnomalies, args: argparse.Namespace, generator: torch.Generator) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=ShuffleWithEpochToken(len(dataset), generator),
        num_workers=args.num_workers,
        drop_last=len(dataset) > args.batch_size,  # equal batches, unless the data is smaller than one batch
    )


# --------------------------------------------------------------------------------------------------
# model, optimiser, loop


def model_config(args: argparse.Namespace) -> ClipADAConfig:
    return ClipADAConfig(
        vision=args.vision, text=args.text, layer=args.layer, n_ctx=args.n_ctx, template=args.template,
        learnable_prompt=not args.fixed_prompt, ctx_init=args.ctx_init, ctx_word=args.ctx_word,
        refine_steps=args.refine_steps, image_size=args.image_size, learnable_scale=not args.fixed_scale,
    )


def make_optimizer(model: ClipADA, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW; weight decay only on projection matrices (decaying the context or the scale has no purpose)."""
    decayed = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("projections.") and p.dim() == 2]
    ids = {id(p) for p in decayed}
    others = [p for p in model.trainable_parameters() if id(p) not in ids]
    groups = [{"params": decayed, "weight_decay": args.weight_decay}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr)


def segmentation_loss(batch, step: int, model, args) -> torch.Tensor:
    return clip_ada_loss(model(batch["image"]), batch["mask"], args.refine_weight)


# --------------------------------------------------------------------------------------------------
# the end: calibrate, save, report


def calibration_images(paths: list[Path], count: int) -> list[torch.Tensor]:
    """`count` train/good images spread evenly over the list, at their own size, without synthesis."""
    if count <= 0:
        return []
    chosen = np.unique(np.linspace(0, len(paths) - 1, num=min(count, len(paths))).round().astype(int))
    return [load_image(paths[i]) for i in chosen]


def loss_summary(losses: list[float]) -> dict:
    if not losses:
        return {}
    tail = losses[-max(1, len(losses) // 10) :]
    return {"first_loss": losses[0], "final_loss": losses[-1], "final_loss_mean_last_10pct": float(np.mean(tail))}


def finish(accelerator, model, paths: list[Path], args, progress, losses: list[float], seconds: float) -> dict:
    """Calibrate the threshold, save the artifact and metrics.json (main process), optionally push."""
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model)
    metrics = {
        "steps": progress.step,
        "steps_this_run": len(losses),
        "train_images": len(paths),
        "trainable_parameters": model.num_trainable_parameters(),
        "train_seconds": seconds,
        "train_images_per_second": len(losses) * args.batch_size * args.gradient_accumulation_steps / max(seconds, 1e-9),
        **loss_summary(common.loss_values(progress)),  # the whole run's, also after a resume
    }
    if accelerator.is_main_process:
        metrics["threshold"] = model.calibrate_threshold(
            calibration_images(paths, args.calibration_images), args.threshold_quantile
        )
        metrics["scale"] = float(model.scale.detach())
        model.save_pretrained(args.output_dir / ARTIFACT_DIR)
        write_json_atomic(args.output_dir / METRICS_FILE, metrics)
    common.push_trained(model, args, accelerator, training_data=common.known_sources(args.data))
    accelerator.wait_for_everyone()
    return metrics


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    common.seed_everything(args.seed)
    accelerator, progress = common.make_accelerator(args, "clip_ada")
    model = ClipADA(model_config(args))
    paths = list_normal_images(args.data)
    dataset = SyntheticAnomalies(paths, model.preprocess, args.synthesis, args.anomaly_prob, args.seed)
    generator = torch.Generator()
    loader = make_loader(dataset, args, generator)
    optimizer = make_optimizer(model, args)
    last_step = common.total_steps(args, len(loader))
    scheduler = common.make_scheduler("multistep", optimizer, last_step, accelerator.num_processes,
                               milestones=LR_MILESTONES, gamma=LR_DECAY)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    common.resume_if_asked(accelerator, args, progress)
    started = time.perf_counter()
    batches = common.batches_from(loader, accelerator, progress.step * args.gradient_accumulation_steps, generator, seed=args.seed)
    model.train()
    losses = common.train_loop(accelerator, progress, model, optimizer, scheduler, batches,
                        partial(segmentation_loss, model=model, args=args), args, last_step, "clip-ada")
    metrics = finish(accelerator, model, paths, args, progress, losses, time.perf_counter() - started)
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()
