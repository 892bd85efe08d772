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
from defectclip.alphaclip import CONTEXT_SCALE, MIN_SIDE_PX
from defectclip.captions import no_defect_caption
from defectclip.region_dataset import (PLACEMENTS, RegionTable, ViewTable, add_region_views, concat_region_tables,
                                       load_region_table,
                                       read_dataset_candidates)
from defectclip.data.transforms import normalize
from defectclip.towers import OFFLINE_TEXT, OFFLINE_VISION
if __package__ in (None, ""):  # run by path (`accelerate launch train/x.py`): make the repo's `train` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train import common  # noqa: E402

VIEWS = ("crop", "whole")
LOSSES = ("candidates", "supcon")
MODEL_SUBDIR = "model"
MERGED_SUBDIR = "merged"


# --------------------------------------------------------------------------------------------------
# arguments


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.alphaclip_lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, nargs="+",
                        help="split-mask caption dataset(s): folders (python -m hub.datasets build, or downloaded "
                             "copies) or Hub dataset repo ids 'org/name'; several train one describer for all their objects")
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
    parser.add_argument("--rot90-prob", type=float, default=0.0,
                        help="probability of a quarter turn (either way) of image and mask together; defects have no "
                             "orientation of their own, and a few training regions of a type show only one")
    parser.add_argument("--photometric", type=float, default=0.0,
                        help="strength J of a random per-view contrast gain in [1 - J, 1 + J] about the view's mean and "
                             "brightness shift in [-J/2, J/2] (pixels in [0, 1]): faint or washed-out regions and bright "
                             "parts are seen in training; 0 leaves the pixels as they are")
    parser.add_argument("--view", choices=VIEWS, default="crop",
                        help="what the tower sees of a region: 'crop' (a square crop around it with context, see "
                             "defectclip.alphaclip.view) or 'whole' (the whole image, the original recipe)")
    parser.add_argument("--view-context", type=float, default=CONTEXT_SCALE,
                        help="crop side / the region box's longer side (--view crop)")
    parser.add_argument("--view-min-side", type=int, default=MIN_SIDE_PX,
                        help="smallest crop side in image pixels, so tiny regions keep context (--view crop)")
    parser.add_argument("--normal-regions", type=int, default=1,
                        help="normal regions drawn per training image (away from its defects, shapes of real regions), "
                             "captioned 'no defect: ...'; 0 trains without a no-defect answer")
    parser.add_argument("--max-normal-images", type=int, default=None,
                        help="at most this many defect-free images per dataset give normal regions (default: as many as "
                             "its defective images)")
    parser.add_argument("--mixed", action="store_true",
                        help="also train on a mixed-type copy of each image: regions of other types from earlier "
                             "training images Poisson-blended in away from its own (defectclip.data.transplant)")
    parser.add_argument("--mixed-copies", type=int, nargs="+", default=[1],
                        help="mixed-type copies per training image with --mixed, each with other blended regions; "
                             "one number for every --dataset, or one per dataset in their order (a small object "
                             "can get more copies without multiplying a large one's views in memory)")
    parser.add_argument("--flip-average", action=argparse.BooleanOptionalAction, default=True,
                        help="the saved describer embeds a region as the mean over the four flips of its view "
                             "(training flips at random, so each is a view it knows); --no-flip-average: one view")
    parser.add_argument("--quarter-turn-average", action=argparse.BooleanOptionalAction, default=False,
                        help="the saved describer also averages each view turned by 90 degrees (all eight turns and "
                             "mirrors with --flip-average; needs --rot90-prob > 0, so that turned views are ones it "
                             "knows). Off by default: twice the tower passes per region for about one point")
    parser.add_argument("--mixed-placement", choices=PLACEMENTS, default="anchored",
                        help="where --mixed puts a blended region: 'anchored' at the place it had in its own image "
                             "(on the same borders: a break stays on the edge), 'random' anywhere")
    parser.add_argument("--surround", type=float, default=0.0,
                        help="probability that an image is seen inside a 3 x 3 mosaic of other training images, so "
                             "crops past its border see surface rather than black")
    parser.add_argument("--loose", action="store_true",
                        help="also train on a loosely drawn copy of each defect region (a click disk on it, or the "
                             "mask grown), as the app's clicks and predicted regions are")
    parser.add_argument("--loose-twins", action="store_true",
                        help="with --loose: each loose copy also gets a normal twin of the same outline elsewhere on "
                             "its image, so an outline (a click disk) says nothing of defect or not")
    parser.add_argument("--loss", choices=LOSSES, default="candidates",
                        help="'candidates': cross-entropy over the region's own object's captions (what the app ranks); "
                             "'supcon': the paper's supervised contrastive loss over the batch's captions")
    parser.add_argument("--balance-objects", type=float, default=0.0,
                        help="repeat the regions of smaller objects (max count / count) ** this times per epoch: "
                             "0 keeps the data as is, 1 gives every object as many regions as the largest")
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
    if not 0.0 <= args.lora_dropout < 1.0 or not 0.0 <= args.flip_prob <= 1.0 or not 0.0 <= args.rot90_prob <= 1.0:
        raise SystemExit("--lora-dropout must be in [0, 1), --flip-prob and --rot90-prob in [0, 1]")
    if not 0.0 <= args.photometric < 1.0:
        raise SystemExit("--photometric must be in [0, 1): it is the largest relative change of contrast")
    if args.temperature <= 0:
        raise SystemExit("--temperature must be positive")
    if args.image_size is not None and args.image_size < 16:
        raise SystemExit("--image-size must be at least 16")
    if not 0.0 <= args.surround <= 1.0:
        raise SystemExit("--surround must be in [0, 1]")
    if args.loose_twins and not (args.loose and args.normal_regions):
        raise SystemExit("--loose-twins gives --loose copies normal twins: it needs --loose and --normal-regions > 0")
    if args.quarter_turn_average and args.rot90_prob == 0:
        raise SystemExit("--quarter-turn-average averages views turned by 90 degrees: train on them with --rot90-prob > 0")
    if args.normal_regions < 0 or args.balance_objects < 0:
        raise SystemExit("--normal-regions and --balance-objects must be 0 or more")
    if min(args.mixed_copies) < 1:
        raise SystemExit("--mixed-copies must be at least 1 (leave out --mixed to train without mixed copies)")
    if len(args.mixed_copies) not in (1, len(args.dataset)):
        raise SystemExit(f"--mixed-copies takes one number or one per --dataset ({len(args.dataset)}), "
                         f"got {len(args.mixed_copies)}")
    if args.view_context < 1.0 or args.view_min_side < 1:
        raise SystemExit("--view-context must be at least 1 and --view-min-side at least 1 px")
    for dataset in args.dataset:
        if not Path(dataset).expanduser().is_dir() and not is_repo_id(dataset):
            raise SystemExit(f"--dataset {dataset}: no such folder, and not a Hub repo id ('org/name'); build one "
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


def candidate_cross_entropy(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, labels: torch.Tensor,
                            caption_object: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of each region's caption among the captions of its own object only.

    `text_embeddings` holds every caption of the training data (C x D), `labels` each region's caption
    index and `caption_object` the object index of each caption. This is the decision the app makes
    (rank one object's candidates, no-defect caption included), so the loss trains exactly that; other
    objects' captions are masked out, as the app never offers them.
    """
    logits = image_embeddings @ text_embeddings.T / temperature
    same_object = caption_object[labels][:, None] == caption_object[None, :]
    return torch.nn.functional.cross_entropy(logits.masked_fill(~same_object, float("-inf")), labels)


# --------------------------------------------------------------------------------------------------
# data


class RegionDataset(Dataset):
    """Regions of a RegionTable as (image uint8 3 x H x W, mask coverage uint8 H x W, caption index).

    `order` lists the regions of one epoch (a region may appear several times, see `balanced_order`).
    """

    def __init__(self, table: RegionTable, order: list[int] | None = None):
        self.table = table
        self.order = order if order is not None else list(range(len(table.region_image)))

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int):
        table, index = self.table, self.order[index]
        return table.images[table.region_image[index]], table.coverage[index], table.caption_index[index]


def balanced_order(region_object: list[str], power: float) -> list[int]:
    """Region indices for one epoch, each object's regions repeated round((largest / count) ** power) times.

    With two objects of 12,000 and 750 regions, the small one would be one batch in sixteen; repeating
    it keeps its captions learned without dropping any of the large one's regions.
    """
    counts: dict[str, int] = {}
    for name in region_object:
        counts[name] = counts.get(name, 0) + 1
    largest = max(counts.values())
    repeats = {name: max(1, round((largest / count) ** power)) for name, count in counts.items()}
    return [i for i, name in enumerate(region_object) for _ in range(repeats[name])]


def make_loader(table: RegionTable, args: argparse.Namespace) -> tuple[DataLoader, torch.Generator]:
    generator = torch.Generator().manual_seed(args.seed)
    order = balanced_order(table.region_object, args.balance_objects) if table.region_object else None
    loader = DataLoader(RegionDataset(table, order), batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.num_workers, generator=generator)
    return loader, generator


def training_candidates(args: argparse.Namespace) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Every dataset's candidate captions by object, plus each object's no-defect caption when trained with one."""
    candidates: dict[str, list[str]] = {}
    for dataset in args.dataset:
        for name, captions in read_dataset_candidates(dataset, args.dataset_revision).items():
            candidates.setdefault(name, [])
            candidates[name] += [c for c in captions if c not in candidates[name]]
    no_defect = {name: no_defect_caption(name) for name in candidates} if args.normal_regions else {}
    for name, text in no_defect.items():
        candidates[name].append(text)
    return candidates, no_defect


def load_training_table(describer: AlphaDescriber, args: argparse.Namespace, no_defect: dict[str, str]) -> RegionTable:
    """The training regions of every dataset, as the describer sees them (its own view function)."""
    if args.view == "whole" and not no_defect and not args.mixed and not args.surround and not args.loose:
        tables = [load_region_table(d, args.train_split, describer.image.preprocess, args.dataset_revision)
                  for d in args.dataset]
    else:
        # one table for every dataset: each view is concatenated once (the views of two objects at 160 px
        # are many GB; concatenating per dataset and then again doubled the peak)
        table = ViewTable()
        for index, dataset in enumerate(args.dataset):
            add_region_views(table, dataset, args.train_split, describer.region_inputs, no_defect, args.normal_regions,
                             args.max_normal_images, args.seed, args.dataset_revision, mixed_copies_of(args, index),
                             args.surround, args.loose, args.mixed_placement, args.loose_twins)
        return table.finish()
    return tables[0] if len(tables) == 1 else concat_region_tables(tables)


def mixed_copies_of(args: argparse.Namespace, dataset_index: int) -> int:
    """Mixed-type copies per training image of the `dataset_index`-th --dataset (0 without --mixed)."""
    if not args.mixed:
        return 0
    return args.mixed_copies[0] if len(args.mixed_copies) == 1 else args.mixed_copies[dataset_index]


def caption_objects(table: RegionTable) -> torch.Tensor:
    """The object index of each caption of the table (a caption names one object)."""
    names: dict[str, int] = {}
    owner = [0] * len(table.captions)
    for caption_id, name in zip(table.caption_index.tolist(), table.region_object):
        owner[caption_id] = names.setdefault(name, len(names))
    return torch.tensor(owner)


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


def random_quarter_turns(pixels: torch.Tensor, alpha: torch.Tensor, probability: float,
                         generator: torch.Generator):
    """Turn each chosen sample by 90 degrees, clockwise or not at random, image and alpha map together."""
    if probability == 0.0:
        return pixels, alpha
    if pixels.shape[-1] != pixels.shape[-2]:
        raise SystemExit(f"--rot90-prob needs square views; this tower's input is {tuple(pixels.shape[-2:])}.")
    count = pixels.shape[0]
    chosen = (torch.rand(count, generator=generator) < probability).to(pixels.device)[:, None, None, None]
    clockwise = (torch.rand(count, generator=generator) < 0.5).to(pixels.device)[:, None, None, None]

    def turned(batch: torch.Tensor) -> torch.Tensor:
        quarter = torch.where(clockwise, torch.rot90(batch, -1, dims=(-2, -1)), torch.rot90(batch, 1, dims=(-2, -1)))
        return torch.where(chosen, quarter, batch)

    return turned(pixels), turned(alpha)


def random_photometric(views: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """[0, 1] views with a random contrast gain about each view's mean and a brightness shift, clipped to [0, 1]."""
    if strength == 0.0:
        return views
    count = views.shape[0]
    gain = 1.0 + strength * (2.0 * torch.rand(count, generator=generator) - 1.0)
    shift = strength * (torch.rand(count, generator=generator) - 0.5)
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    changed = (views - mean) * gain[:, None, None, None] + mean + shift[:, None, None, None]
    return changed.clamp(0.0, 1.0)


def batch_inputs(batch, describer: AlphaDescriber, args, step: int):
    """uint8 images and coverage masks -> normalised pixels and alpha maps, augmented.

    The augmentations draw from a generator seeded by the step number, so a resumed run sees exactly
    the ones an uninterrupted run would.
    """
    images, coverage, labels = batch
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    views = random_photometric(images.float() / 255.0, args.photometric, generator)
    pixels = normalize(views, describer.image.preprocess)
    alpha = ((coverage.float() / 255.0)[:, None] - ALPHA_MEAN) / ALPHA_STD
    pixels, alpha = random_flips(pixels, alpha, args.flip_prob, generator)
    pixels, alpha = random_quarter_turns(pixels, alpha, args.rot90_prob, generator)
    return pixels, alpha, labels


# --------------------------------------------------------------------------------------------------
# model and optimizer


def build_describer(args: argparse.Namespace, candidates: dict[str, list[str]],
                    no_defect: dict[str, str] | None = None) -> AlphaDescriber:
    view = {"context": args.view_context, "min_side": args.view_min_side} if args.view == "crop" else None
    describer = AlphaDescriber.build(args.vision, args.text, args.image_size, args.seed, args.temperature, candidates,
                                     view=view, no_defect=no_defect, flip_average=args.flip_average,
                                     quarter_turn_average=args.quarter_turn_average)
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


def region_loss(batch, step: int, describer: AlphaDescriber, image_tower, caption_bank, caption_object, args) -> torch.Tensor:
    pixels, alpha, labels = batch_inputs(batch, describer, args, step)
    embeddings = image_tower(pixels, alpha)
    if args.loss == "candidates":
        return candidate_cross_entropy(embeddings, caption_bank, labels, caption_object.to(labels.device), args.temperature)
    return supervised_contrastive_loss(embeddings, caption_bank[labels], labels, args.temperature)


def training_record(args: argparse.Namespace) -> dict:
    """The recipe, saved in describer_config.json so a model folder says how it was made."""
    keys = ("dataset", "train_split", "max_steps", "epochs", "batch_size", "gradient_accumulation_steps", "lr",
            "alpha_lr", "rgb_lr", "weight_decay", "warmup_steps", "flip_prob", "rot90_prob", "photometric", "lora_targets", "seed", "mixed_precision",
            "view", "normal_regions", "max_normal_images", "loss", "balance_objects", "image_size", "mixed", "mixed_copies", "mixed_placement",
            "surround", "loose", "loose_twins", "flip_average", "quarter_turn_average")
    record = {key: [str(v) for v in value] if isinstance(value, list) else str(value) if isinstance(value, Path) else value
              for key, value in vars(args).items() if key in keys}
    # one number as before (one for every dataset), else one per dataset
    copies = args.mixed_copies
    record["mixed_copies"] = copies[0] if len(copies) == 1 else list(copies)
    return record


def hub_datasets(args: argparse.Namespace) -> tuple[str, ...]:
    """The Hub dataset the run read, for the card's `datasets:` (a local folder names none)."""
    return tuple(d for d in args.dataset if not Path(d).expanduser().is_dir())


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
    candidates, no_defect = training_candidates(args)
    describer = build_describer(args, candidates, no_defect)
    table = load_training_table(describer, args, no_defect)
    caption_bank = describer.embed_captions(table.captions).to(accelerator.device)
    caption_object = caption_objects(table)
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
                                caption_object=caption_object, args=args),
                        args, last_step, "alphaclip-lora")
    image_tower.eval()
    folder = save_artifacts(describer, args, accelerator)
    common.push_trained(describer, args, accelerator, datasets=hub_datasets(args))
    summary = {"steps": progress.step, "regions": len(table.region_image), "epoch_regions": len(loader.dataset), "seconds": round(time.perf_counter() - started, 1),
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None, "model": str(folder)}
    accelerator.print(summary)
    accelerator.end_training()
    # The in-memory describer comes back too, so callers (tests, notebooks) can compare it with a reload.
    return {**summary, "losses": losses, "describer": describer}


if __name__ == "__main__":
    main(sys.argv[1:])
