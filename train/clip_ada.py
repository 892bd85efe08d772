"""Train CLIP-ADA (learnable prompt + projections + refinement) on normal images with synthetic anomalies.

One model for every category given (the paper's unified setting): all `train/good` images of all `--data`
folders form one training set; about half of them get a synthetic anomaly (Perlin by default, as the
paper's DRAEM-style synthesis; NSA or CutPaste selectable) whose mask is the target. A `--data` folder in
the index-mask layout (images/, masks/, classes.json: defect images with their masks, e.g. steel strip)
adds its train images with their real defect masks as targets, unchanged.

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
from dataclasses import asdict, dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from defectclip.clip_ada import DEFAULT_TEMPLATE, DEFAULT_TOWER, FLIP_VIEWS, ClipADA, ClipADAConfig, clip_ada_loss
from defectclip.data import (
    DataError, IndexMaskDataset, MVTecDataset, Preprocess, array_to_tensor, load_image, load_index_mask, normalize, resize,
)
from defectclip.io import write_json_atomic
from defectclip.synth import SYNTHESES, synthesize
from defectclip.synth.textures import TEXTURE_KINDS, make_texture
if __package__ in (None, ""):  # run by path (`accelerate launch train/x.py`): make the repo's `train` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train import common  # noqa: E402

ARTIFACT_DIR = "model"
METRICS_FILE = "metrics.json"
# The paper multiplies the learning rate by 0.2 at epochs 400 and 700 of 800: at these fractions of training.
LR_MILESTONES = (0.5, 0.875)
LR_DECAY = 0.2
# Images the self-similarity blend's pixel statistics are taken from (at least): on magnetic tile 32 and
# 128 train images gave means within 0.1 and spreads within 3 % of each other (session 17).
BLEND_IMAGES = 32


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
    model.add_argument("--flip-views", type=int, choices=FLIP_VIEWS, default=1,
                       help="inference: average each map over this many mirror images of the input (1: the image; "
                            "2: + left-right; 4: + top-bottom and both; 8: those four transposed). Steadier maps, one head pass per view; the "
                            "blend and the threshold are fitted on the averaged maps")
    data = parser.add_argument_group("data")
    data.add_argument("--data", nargs="+", type=Path, required=True,
                      help="MVTec-layout roots or category folders (train/good is used), or index-mask folders "
                           "(images/train with their masks: real defects as targets)")
    data.add_argument("--synthesis", choices=sorted(SYNTHESES), default="perlin", help="synthetic anomaly method")
    data.add_argument("--anomaly-prob", type=float, default=0.5, help="fraction of training images given an anomaly")
    data.add_argument("--real-anomaly-prob", type=float, default=0.0,
                      help="fraction of real-defect images (index-mask folders) also given a synthetic anomaly: the "
                           "target is then both masks, so the head learns 'foreign to this surface', not only the "
                           "object's own defect types")
    data.add_argument("--textures", type=int, default=0,
                      help="add this many generated defect-free textures (grain, brushed stripes, weave; "
                           "defectclip.synth.textures) as normal images that get synthetic anomalies; they never "
                           "calibrate the threshold")
    loss = parser.add_argument_group("loss and calibration")
    loss.add_argument("--refine-weight", type=float, default=1.0, help="lambda: weight of the refined steps' BCE")
    loss.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay on projection weights")
    loss.add_argument("--calibration-images", type=int, default=64, help="train/good images for the threshold (0: keep 0.5)")
    loss.add_argument("--threshold-quantile", type=float, default=0.99, help="quantile of normal scores used as threshold")
    loss.add_argument("--self-similarity", action="store_true",
                      help="blend every map with the training-free self-similarity map (how unlike the rest of its "
                           "own image and its mirror images each patch is; defectclip.scoring.self_similarity): "
                           "better on objects the model was not trained on (benchmarks/results/clip_ada_transfer.md), "
                           "slower per image")
    loss.add_argument("--self-similarity-size", type=int, default=None,
                      help="model input side of the self-similarity map (default 320: "
                           "defectclip.scoring.self_similarity.DEFAULT_IMAGE_SIZE; its cost grows with the fourth power)")
    loss.add_argument("--threshold-rule", choices=("synthetic", "quantile"), default="synthetic",
                      help="synthetic: between the calibration images' scores and synthetic defects made from them "
                           "(as few-shot sets its own); quantile: --threshold-quantile of the normal scores")
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
    if not 0.0 <= args.real_anomaly_prob <= 1.0:
        raise SystemExit(f"--real-anomaly-prob must be in [0, 1], got {args.real_anomaly_prob}")
    if args.self_similarity_size is not None and args.self_similarity_size < 32:
        raise SystemExit(f"--self-similarity-size must be at least 32, got {args.self_similarity_size}")
    if args.textures < 0:
        raise SystemExit(f"--textures must be 0 or more, got {args.textures}")
    if args.n_ctx < 1:
        raise SystemExit(f"--n-ctx must be at least 1, got {args.n_ctx}")
    if args.image_size is not None and args.image_size < 16:
        raise SystemExit(f"--image-size must be at least 16 (the synthesis minimum), got {args.image_size}")
    if not 0.0 < args.threshold_quantile <= 1.0:
        raise SystemExit(f"--threshold-quantile must be in (0, 1], got {args.threshold_quantile}")


# --------------------------------------------------------------------------------------------------
# data


def is_index_mask_root(root: Path) -> bool:
    return (Path(root) / "classes.json").is_file()


def list_normal_images(roots: list[Path]) -> list[Path]:
    """Every train/good image of every MVTec-layout root or category folder, in a stable order."""
    paths = [ref.image_path for root in roots if not is_index_mask_root(root)
             for ref in MVTecDataset(root, "train").refs]
    return paths


@dataclass(frozen=True)
class GeneratedTexture:
    """A training image made on the fly by defectclip.synth.textures: nothing to read from disk."""

    kind: str
    seed: int


def generated_textures(count: int) -> list[GeneratedTexture]:
    """`count` textures, the kinds taken in turn, each with its own seed."""
    return [GeneratedTexture(TEXTURE_KINDS[i % len(TEXTURE_KINDS)], i) for i in range(count)]


@lru_cache(maxsize=None)
def texture_pixels(texture: GeneratedTexture, side: int) -> np.ndarray:
    """A generated texture's pixels, made once per process: make_texture is a pure function of (kind, side,
    seed) whose fractal noise would otherwise be drawn again every epoch (300 at 224 px: 45 MB)."""
    pixels = make_texture(texture.kind, side, texture.seed)
    pixels.flags.writeable = False  # shared by every later read
    return pixels


def list_training_items(roots: list[Path], textures: int = 0) -> list[tuple[Path | GeneratedTexture, Path | None]]:
    """(image, index mask or None) for every training image: train/good images (None: they get a synthetic
    anomaly or stay normal), the train images of index-mask folders with their real defect masks, and
    `textures` generated textures (normal, like train/good)."""
    items = [(path, None) for path in list_normal_images(roots)]
    for root in roots:
        if is_index_mask_root(root):
            items += [(ref.image_path, ref.index_mask_path) for ref in IndexMaskDataset(root, "train").refs]
    items += [(texture, None) for texture in generated_textures(textures)]
    if len(items) < 2:
        raise DataError(f"CLIP-ADA needs at least 2 training images (a second one feeds the synthesis); found {len(items)}.")
    return items


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

    def __init__(self, paths: list, preprocess: Preprocess, synthesis: str, anomaly_prob: float, seed: int,
                 real_anomaly_prob: float = 0.0):
        # Each entry is an image path or GeneratedTexture (normal), or (either, index mask path or None).
        items = [entry if isinstance(entry, tuple) else (entry, None) for entry in paths]
        self.paths, self.masks = [image for image, _ in items], [mask for _, mask in items]
        self.preprocess = preprocess
        self.synthesis, self.anomaly_prob, self.seed = synthesis, anomaly_prob, seed
        self.real_anomaly_prob = real_anomaly_prob

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> np.ndarray:
        """H x W x 3 uint8 at the model size, resized the way inference resizes."""
        source = self.paths[index]
        if isinstance(source, GeneratedTexture):
            pixels = texture_pixels(source, max(self.preprocess.size))
            image = resize(array_to_tensor(pixels), self.preprocess.size, self.preprocess.interpolation)
        else:
            image = resize(load_image(source), self.preprocess.size, self.preprocess.interpolation)
        return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, epoch_token = key if isinstance(key, tuple) else (key, 0)
        rng = np.random.default_rng([self.seed, index, epoch_token])
        image = self.read(index)
        if self.masks[index] is not None:  # a real defect image: its own mask is the target
            mask = self.real_mask(index).numpy()
            if rng.random() < self.real_anomaly_prob:
                image, synthetic = synthesize(self.synthesis, image, self.other_image(index, rng), rng)
                mask = mask | synthetic
            return {"image": normalize(array_to_tensor(image), self.preprocess), "mask": torch.from_numpy(mask)}
        mask = np.zeros(image.shape[:2], dtype=bool)
        if rng.random() < self.anomaly_prob:
            image, mask = synthesize(self.synthesis, image, self.other_image(index, rng), rng)
        return {"image": normalize(array_to_tensor(image), self.preprocess), "mask": torch.from_numpy(mask)}

    def real_mask(self, index: int) -> torch.Tensor:
        """The index mask's defect pixels (any class), at the model size (nearest neighbour keeps it binary)."""
        mask = torch.from_numpy(load_index_mask(self.masks[index]) > 0).float()[None, None]
        size = tuple(self.preprocess.size)
        return torch.nn.functional.interpolate(mask, size=size, mode="nearest")[0, 0].bool()

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
        flip_views=args.flip_views,
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


def fit_blend(model: ClipADA, product_images: list[Path], count: int = BLEND_IMAGES, image_size: int | None = None):
    """The self-similarity blend, its scale from `count` of the training object's images spread over the list,
    defective ones too (no label is read). The threshold is to be placed again afterwards."""
    return model.fit_self_similarity(calibration_images(product_images, count), image_size)


def loss_summary(losses: list[float]) -> dict:
    if not losses:
        return {}
    tail = losses[-max(1, len(losses) // 10) :]
    return {"first_loss": losses[0], "final_loss": losses[-1], "final_loss_mean_last_10pct": float(np.mean(tail))}


def finish(accelerator, model, paths: list[Path], args, progress, losses: list[float], seconds: float,
           train_images: int | None = None, product_images: list[Path] | None = None) -> dict:
    """Calibrate the threshold, save the artifact and metrics.json (main process), optionally push."""
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model)
    metrics = {
        "steps": progress.step,
        "steps_this_run": len(losses),
        "train_images": train_images if train_images is not None else len(paths),
        "trainable_parameters": model.num_trainable_parameters(),
        "train_seconds": seconds,
        "train_images_per_second": len(losses) * args.batch_size * args.gradient_accumulation_steps / max(seconds, 1e-9),
        **loss_summary(common.loss_values(progress)),  # the whole run's, also after a resume
    }
    if accelerator.is_main_process:
        if args.self_similarity:
            blend = fit_blend(model, product_images or paths, max(args.calibration_images, BLEND_IMAGES),
                              args.self_similarity_size)
            metrics["self_similarity"] = asdict(blend)
        normals = calibration_images(paths, args.calibration_images)
        if args.threshold_rule == "synthetic" and normals:
            metrics["threshold_rule"] = model.calibrate_synthetic(normals, seed=args.seed)
            metrics["threshold"] = model.threshold
        else:  # the quantile rule, or no normal image to calibrate on (it then stays at 0.5)
            metrics["threshold"] = model.calibrate_threshold(normals, args.threshold_quantile)
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
    items = list_training_items(args.data, args.textures)
    # the product's own normal images calibrate the threshold (generated textures are not the product)
    paths = [image for image, mask in items if mask is None and not isinstance(image, GeneratedTexture)]
    dataset = SyntheticAnomalies(items, model.preprocess, args.synthesis, args.anomaly_prob, args.seed,
                                 args.real_anomaly_prob)
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
    product_images = [image for image, _ in items if not isinstance(image, GeneratedTexture)]
    metrics = finish(accelerator, model, paths, args, progress, losses, time.perf_counter() - started, len(items),
                     product_images)
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()
