"""Fine-tune the AlphaCLIP region describer with PEFT LoRA and a supervised contrastive loss.

One training example is one region of a split-mask caption dataset (`python -m hub.datasets build`):
the image, the region's mask as the alpha channel, and the region's caption. The recipe is the
paper's (Table 3): LoRA r = 64, alpha = 64, dropout 0.1 on the image tower; the alpha convolution at
1e-4 and the RGB convolution at 1e-6; AdamW with betas (0.9, 0.999) and weight decay 1e-4; random
horizontal and vertical flips of image and mask together; batch 64. The text tower is frozen and
every caption is embedded once.

    python -m train.alphaclip_lora --dataset outputs/neu_seg_regions --output-dir outputs/describer_neu_seg

writes `<output-dir>/model` or `--model-dir` (load with `AlphaDescriber.from_pretrained(<folder>)`; the
training output dir works too), checkpoints
under `<output-dir>/checkpoints`, and with `--export-merged` a LoRA-merged copy in `<output-dir>/merged`.
"""

from __future__ import annotations

import argparse
from functools import partial
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from defectclip.alphaclip import (
    ALPHA_MEAN,
    ALPHA_STD,
    DEFAULT_TEMPERATURE,
    AlphaDescriber,
)
from defectclip.region_dataset import RegionTable, load_region_table, read_dataset_candidates
from defectclip.data.transforms import normalize
from defectclip.towers import OFFLINE_TEXT, OFFLINE_VISION
if __package__ in (None, ""):  # run by path (`accelerate launch train/x.py`): make the repo's `train` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train import common  # noqa: E402

MODEL_SUBDIR = "model"
MERGED_SUBDIR = "merged"


# --------------------------------------------------------------------------------------------------
# arguments


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.alphaclip_lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True,
                        help="split-mask caption dataset: a folder (python -m hub.datasets build, or a downloaded "
                             "copy) or a Hub dataset repo id 'org/name'")
    parser.add_argument("--dataset-revision", default=None, help="branch, tag or commit of a Hub --dataset")
    parser.add_argument("--train-split", default="train", help="dataset split to train on")
    parser.add_argument("--vision", default=OFFLINE_VISION, help="vision tower spec (defectclip.towers)")
    parser.add_argument("--text", default=OFFLINE_TEXT, help="text tower spec; frozen, captions embedded once")
    parser.add_argument("--image-size", type=int, default=None,
                        help="square input size in pixels for CNN towers (default: the tower's own); ViTs keep theirs")
    parser.add_argument("--lora-r", type=int, default=64, help="LoRA rank (paper: 64)")
    parser.add_argument("--lora-alpha", type=int, default=64, help="LoRA scaling alpha (paper: 64)")
    parser.add_argument("--lora-dropout", type=float, default=0.1, help="dropout on the LoRA input (paper: 0.1)")
    parser.add_argument("--lora-targets", default=None, metavar="REGEX",
                        help="keep only LoRA targets whose module name matches (default: every attention/MLP "
                             "linear of a ViT, every non-grouped conv of a CNN)")
    parser.add_argument("--alpha-lr", type=float, default=1e-4, help="learning rate of the alpha convolution (paper: 1e-4)")
    parser.add_argument("--rgb-lr", type=float, default=1e-6, help="learning rate of the RGB input convolution (paper: 1e-6)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (paper: 1e-4)")
    parser.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up steps before the cosine decay")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help="supervised contrastive temperature; also used for the saved model's probabilities")
    parser.add_argument("--flip-prob", type=float, default=0.5,
                        help="probability of each of the horizontal and vertical flips (image and mask together)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help=f"where the trained describer folder goes (default: <output-dir>/{MODEL_SUBDIR})")
    parser.add_argument("--export-merged", action="store_true", help=f"also write a LoRA-merged model to <output-dir>/{MERGED_SUBDIR}")
    common.add_common_args(parser, batch_size=64, lr=1e-4)
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    common.check_common_args(args)
    if args.lora_r < 1 or args.lora_alpha < 1:
        raise SystemExit("--lora-r and --lora-alpha must be at least 1")
    if not 0.0 <= args.lora_dropout < 1.0 or not 0.0 <= args.flip_prob <= 1.0:
        raise SystemExit("--lora-dropout must be in [0, 1) and --flip-prob in [0, 1]")
    if args.temperature <= 0:
        raise SystemExit("--temperature must be positive")
    if args.image_size is not None and args.image_size < 16:
        raise SystemExit("--image-size must be at least 16")
    if not Path(args.dataset).expanduser().is_dir() and not is_repo_id(args.dataset):
        raise SystemExit(f"--dataset {args.dataset}: no such folder, and not a Hub repo id ('org/name'); build one "
                         "with `python -m hub.datasets build`.")


def is_repo_id(text: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return text.count("/") == 1


# --------------------------------------------------------------------------------------------------
# the loss


def supervised_contrastive_loss(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                                labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """The paper's Eq. 5 (Khosla et al.'s SupCon, image anchors against the batch's captions).

    Row i compares image region i with the caption of every region in the batch; the positives P(i)
    are the regions whose caption equals i's. The loss averages -log softmax over P(i), then over
    anchors. Unlike single-modality SupCon, the anchor's own column is kept in the denominator and
    in P(i): there it is the image itself, here it is the region's own caption, its truest positive.
    """
    logits = image_embeddings @ text_embeddings.T / temperature
    log_probability = logits - logits.logsumexp(dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]).to(log_probability.dtype)
    per_anchor = -(log_probability * positives).sum(dim=1) / positives.sum(dim=1)
    return per_anchor.mean()


# --------------------------------------------------------------------------------------------------
# data


class RegionDataset(Dataset):
    """Regions of a RegionTable as (image uint8 3 x H x W, mask coverage uint8 H x W, caption index)."""

    def __init__(self, table: RegionTable):
        self.table = table

    def __len__(self) -> int:
        return len(self.table.region_image)

    def __getitem__(self, index: int):
        table = self.table
        return table.images[table.region_image[index]], table.coverage[index], table.caption_index[index]


def make_loader(table: RegionTable, args: argparse.Namespace) -> tuple[DataLoader, torch.Generator]:
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(RegionDataset(table), batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.num_workers, generator=generator)
    return loader, generator


def random_flips(pixels: torch.Tensor, alpha: torch.Tensor, probability: float, generator: torch.Generator):
    """Flip each sample horizontally and/or vertically, image and alpha map together.

    The coin flips come from a generator seeded by the step number, so a resumed run sees exactly
    the augmentations an uninterrupted one would.
    """
    count = pixels.shape[0]
    for dim in (-1, -2):
        chosen = (torch.rand(count, generator=generator) < probability).to(pixels.device)[:, None, None, None]
        pixels = torch.where(chosen, pixels.flip(dim), pixels)
        alpha = torch.where(chosen, alpha.flip(dim), alpha)
    return pixels, alpha


def batch_inputs(batch, describer: AlphaDescriber, args, step: int):
    """uint8 images and coverage masks -> normalised pixels and alpha maps, flipped."""
    images, coverage, labels = batch
    pixels = normalize(images.float() / 255.0, describer.image.preprocess)
    alpha = ((coverage.float() / 255.0)[:, None] - ALPHA_MEAN) / ALPHA_STD
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    pixels, alpha = random_flips(pixels, alpha, args.flip_prob, generator)
    return pixels, alpha, labels


# --------------------------------------------------------------------------------------------------
# model and optimizer


def build_describer(args: argparse.Namespace, candidates: dict[str, list[str]]) -> AlphaDescriber:
    describer = AlphaDescriber.build(args.vision, args.text, args.image_size, args.seed, args.temperature, candidates)
    describer.attach_adapter(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets)
    return describer


def parameter_groups(describer: AlphaDescriber, args: argparse.Namespace) -> list[dict]:
    """Three learning rates: alpha conv, RGB conv, and everything else trainable (LoRA, projection)."""
    stem = describer.image.stem
    alpha_ids = {id(p) for p in stem.alpha.parameters()}
    rgb_ids = {id(p) for p in stem.rgb.parameters()}
    rest = [p for p in describer.image.parameters() if p.requires_grad and id(p) not in alpha_ids | rgb_ids]
    return [
        {"params": list(stem.alpha.parameters()), "lr": args.alpha_lr, "name": "alpha_conv"},
        {"params": list(stem.rgb.parameters()), "lr": args.rgb_lr, "name": "rgb_conv"},
        {"params": rest, "lr": args.lr, "name": "lora_and_projection"},
    ]


def make_optimizer(describer: AlphaDescriber, args: argparse.Namespace) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameter_groups(describer, args), betas=(0.9, 0.999), weight_decay=args.weight_decay)


# --------------------------------------------------------------------------------------------------
# the loop: train.common's, with the supervised contrastive loss


def region_loss(batch, step: int, describer: AlphaDescriber, image_tower, caption_bank, args) -> torch.Tensor:
    pixels, alpha, labels = batch_inputs(batch, describer, args, step)
    embeddings = image_tower(pixels, alpha)
    return supervised_contrastive_loss(embeddings, caption_bank[labels], labels, args.temperature)


def training_record(args: argparse.Namespace) -> dict:
    """The recipe, saved in describer_config.json so a model folder says how it was made."""
    keys = ("dataset", "train_split", "max_steps", "epochs", "batch_size", "gradient_accumulation_steps", "lr",
            "alpha_lr", "rgb_lr", "weight_decay", "warmup_steps", "flip_prob", "lora_targets", "seed", "mixed_precision")
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items() if key in keys}


def hub_datasets(args: argparse.Namespace) -> tuple[str, ...]:
    """The Hub dataset the run read, for the card's `datasets:` (a local folder names none)."""
    return () if Path(args.dataset).expanduser().is_dir() else (args.dataset,)


def save_artifacts(describer: AlphaDescriber, args: argparse.Namespace, accelerator) -> Path:
    """The adapter folder, and with --export-merged the merged one, written by the main process only."""
    folder = args.model_dir or args.output_dir / MODEL_SUBDIR
    describer.config["training"] = training_record(args)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        describer.save_pretrained(folder)
        if args.export_merged:
            describer.save_pretrained(args.output_dir / MERGED_SUBDIR, merged=True)
    return folder


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.seed_everything(args.seed)
    accelerator, progress = common.make_accelerator(args, "alphaclip_lora")
    candidates = read_dataset_candidates(args.dataset, args.dataset_revision)
    describer = build_describer(args, candidates)
    table = load_region_table(args.dataset, args.train_split, describer.image.preprocess, args.dataset_revision)
    caption_bank = describer.embed_captions(table.captions).to(accelerator.device)
    loader, generator = make_loader(table, args)
    last_step = common.total_steps(args, len(loader))
    optimizer = make_optimizer(describer, args)
    scheduler = common.make_scheduler("cosine", optimizer, last_step, accelerator.num_processes, warmup=args.warmup_steps)
    image_tower, optimizer, loader, scheduler = accelerator.prepare(describer.image, optimizer, loader, scheduler)
    common.resume_if_asked(accelerator, args, progress)
    started = time.perf_counter()
    batches = common.batches_from(loader, accelerator, progress.step * args.gradient_accumulation_steps, generator, seed=args.seed)
    image_tower.train()
    losses = common.train_loop(accelerator, progress, image_tower, optimizer, scheduler, batches,
                        partial(region_loss, describer=describer, image_tower=image_tower, caption_bank=caption_bank,
                                args=args),
                        args, last_step, "alphaclip-lora")
    image_tower.eval()
    folder = save_artifacts(describer, args, accelerator)
    common.push_trained(describer, args, accelerator, datasets=hub_datasets(args))
    summary = {"steps": progress.step, "regions": len(table.region_image), "seconds": round(time.perf_counter() - started, 1),
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None, "model": str(folder)}
    accelerator.print(summary)
    accelerator.end_training()
    # The in-memory describer comes back too, so callers (tests, notebooks) can compare it with a reload.
    return {**summary, "losses": losses, "describer": describer}


if __name__ == "__main__":
    main(sys.argv[1:])
