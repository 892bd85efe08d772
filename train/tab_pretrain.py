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
import copy
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from defectclip.data import DataError
from defectclip.io import write_json_atomic
from defectclip.prompts import PROMPT_LEVELS, PromptSettings, class_text_vectors
from defectclip.tab import (
    HEADS, LOSSES, SYNTHESES, EpochShuffle, SyntheticPairs, TABBackbone, TABConfig, TABError, check_loss, pair_loss,
    to_model_input,
)
from defectclip.tab_sources import SourceError, collect_sources, is_index_mask_root, steel_validation
from defectclip.tab_transfer import (
    VALIDATION_METHODS, FeatureDistillation, TransferError, ValidationSet, captured_stages, choose_alpha,
    freeze_early_stages, interpolated_trunk, validation_auroc, worst_method_gain,
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
                     help="MVTec-layout roots or category folders (<category>/train/good is read), and index-mask "
                          "roots (classes.json: mask-free crops of images/train)")
    tab.add_argument("--textures", type=int, default=0,
                     help="generated defect-free textures per kind (grain, brushed stripes, weave), each kind an object")
    tab.add_argument("--exclude-object", nargs="*", default=[], metavar="NAME",
                     help="objects left out (the leave-one-out run), e.g. 'magnetic tile'")
    tab.add_argument("--max-images-per-object", type=int, default=None,
                     help="cap per object (evenly spaced), so a large data set does not dominate the loss")
    tab.add_argument("--vision", default="timm:resnet18",
                     help="vision trunk spec (timm CNN); offline: offline:efficientnet_lite0, tests: tiny:cnn")
    tab.add_argument("--text", default="open_clip:ViT-B-16/laion400m_e32",
                     help="frozen text tower spec; offline: offline:minilm, tests: tiny:text")
    tab.add_argument("--synthesis", choices=SYNTHESES, default="nsa", help="how the anomalous twin of each image is made")
    tab.add_argument("--loss", choices=LOSSES, default="joint",
                     help="joint: all 2K (object, state) vectors; paper: TAB Eq. 6 (needs >= 2 categories); "
                          "state: normal vs abnormal of the image's own object only")
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
    add_transfer_args(parser)
    common.add_common_args(parser, batch_size=32, lr=0.01)
    args = parser.parse_args(argv)
    common.check_common_args(args)
    if args.image_size is not None and args.image_size < 32:
        raise SystemExit(f"--image-size must be at least 32 pixels, got {args.image_size}")
    check_transfer_args(args)
    check_fresh_output(args)
    return args


def add_transfer_args(parser: argparse.ArgumentParser) -> None:
    """Ways to keep what the ImageNet start knows (defectclip.tab_transfer); all off by default."""
    keep = parser.add_argument_group("keeping the start's features")
    keep.add_argument("--freeze-stages", type=int, default=0,
                      help="freeze the stem and this many of the trunk's first feature stages (0: train all)")
    keep.add_argument("--distill-weight", type=float, default=0.0,
                      help="weight of the feature-distillation term towards the frozen start trunk (0: off)")
    keep.add_argument("--wise-alphas", type=float, nargs="*", default=[],
                      help="after training, save (1-a)*start + a*tuned for the a in this list (0 is always "
                           "added) with the best --validation AUROC; the smallest a within --wise-tolerance of it")
    keep.add_argument("--wise-tolerance", type=float, default=0.01,
                      help="AUROC margin within which the smaller alpha (nearer the start) is preferred")
    keep.add_argument("--validation", type=Path, default=None,
                      help="index-mask root whose *test* split gives the real-defect validation crops for --wise-alphas")
    keep.add_argument("--validation-count", type=int, default=60,
                      help="validation crops per group (fit normals, held-out normals, defects)")
    keep.add_argument("--validation-size", type=int, default=224, help="scorer input size for the validation")
    keep.add_argument("--validation-methods", nargs="+", choices=VALIDATION_METHODS, default=["patchcore"],
                      help="scorers the validation fits on each alpha's trunk; alpha is chosen on the smallest "
                           "gain over the start among them (patchcore padim: a trunk must help both)")


def check_transfer_args(args: argparse.Namespace) -> None:
    if args.textures < 0 or args.freeze_stages < 0 or args.distill_weight < 0:
        raise SystemExit("--textures, --freeze-stages and --distill-weight must not be negative.")
    if any(not 0.0 <= a <= 1.0 for a in args.wise_alphas):
        raise SystemExit(f"--wise-alphas must lie in [0, 1] (0 = the start, 1 = the tuned trunk); got {args.wise_alphas}")
    if args.wise_alphas and args.validation is None:
        raise SystemExit("--wise-alphas needs --validation <index-mask root> (e.g. neu_seg): alpha is chosen on "
                         "its held-out real defects, never on a test set.")
    if args.validation is not None and not is_index_mask_root(args.validation):
        raise SystemExit(f"--validation {args.validation}: not an index-mask root (no classes.json there).")


def check_fresh_output(args: argparse.Namespace) -> None:
    """A new run into a folder that holds checkpoints would fail at its first save; say so at once."""
    if not args.resume and any(common.checkpoint_dir(args.output_dir).glob("checkpoint_*")):
        raise SystemExit(f"{common.checkpoint_dir(args.output_dir)} already holds checkpoints: pass --resume latest to "
                         "continue that run, or choose another --output-dir.")


# --------------------------------------------------------------------------------------------------
# building


def list_training_images(args: argparse.Namespace) -> tuple[list, list[int], list[str]]:
    """Defect-free sources of every root and generated texture, their object index, and the object names."""
    try:
        sources = collect_sources(args.data, args.textures, args.exclude_object, args.max_images_per_object, args.seed)
    except (DataError, SourceError) as err:
        raise SystemExit(f"--data: {err}") from err
    objects = sorted({source.object for source in sources})
    index = {name: i for i, name in enumerate(objects)}
    return sources, [index[source.object] for source in sources], objects


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
                           prompts=PromptSettings(args.prompts).to_dict(), recipe=recipe_of(args))
        model = TABBackbone.build(config, trunk)
        freeze_early_stages(model.trunk, args.freeze_stages)
        return model
    except (TowerError, TABError, TransferError) as err:
        raise SystemExit(f"--vision: {err}") from err


def recipe_of(args: argparse.Namespace) -> dict:
    """The data and anti-forgetting settings, kept in tab_config.json (a WiSE choice is added at the end)."""
    return {"data": [Path(root).name for root in args.data], "textures_per_kind": args.textures,
            "excluded_objects": list(args.exclude_object), "max_images_per_object": args.max_images_per_object,
            "freeze_stages": args.freeze_stages, "distill_weight": args.distill_weight, "freeze_bn": args.freeze_bn,
            "lr": args.lr, "optimizer": args.optimizer}


def build_distillation(args: argparse.Namespace, device) -> FeatureDistillation | None:
    """The frozen start trunk to distil towards: the --vision spec built again (the same weights on resume)."""
    if args.distill_weight <= 0:
        return None
    return FeatureDistillation(build_vision_tower(args.vision)).to(device)


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
    distillation = build_distillation(args, accelerator.device)
    common.train_loop(accelerator, progress, model, optimizer, scheduler, batches,
                      lambda batch, step: step_loss(model, batch, text_vectors, args, preprocess, distillation),
                      args, total, "TAB")
    return batches.count, time.perf_counter() - started


def step_loss(model, batch: dict, text_vectors: torch.Tensor, args, preprocess,
              distillation: FeatureDistillation | None) -> torch.Tensor:
    """TAB's loss of one batch, plus the weighted distillation term when it is on."""
    if distillation is None:
        return pair_loss(model, batch, text_vectors, args.loss, preprocess)
    trunk = common_unwrap(model).trunk
    with captured_stages(trunk, distillation.stages) as student:
        loss = pair_loss(model, batch, text_vectors, args.loss, preprocess)
    images = to_model_input(torch.cat([batch["normal"], batch["anomalous"]]), preprocess)
    return loss + args.distill_weight * distillation.loss(student, images)


def common_unwrap(model):
    """The TABBackbone inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


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


def load_validation(args: argparse.Namespace) -> ValidationSet:
    fit, normal, defective = steel_validation(args.validation, args.validation_count, seed=args.seed)
    return ValidationSet(*([c.load() for c in group] for group in (fit, normal, defective)), name=args.validation.name)


def average_with_start(model: TABBackbone, args: argparse.Namespace, say=print) -> TABBackbone:
    """WiSE: the trunk (1-a)*start + a*tuned, a chosen by choose_alpha on held-out real defects.

    The tuned weights stay in the checkpoints, so a resume redoes this choice identically.
    """
    start = build_vision_tower(args.vision)
    tuned = copy.deepcopy(model.trunk).cpu().eval()
    data = load_validation(args)
    methods = list(dict.fromkeys(args.validation_methods))
    aurocs = {method: {} for method in methods}
    for alpha in sorted({0.0, *args.wise_alphas}):
        trunk = interpolated_trunk(start, tuned, alpha)
        for method in methods:
            aurocs[method][alpha] = validation_auroc(trunk, data, args.validation_size, args.seed, method)
        said = ", ".join(f"{method} {aurocs[method][alpha]:.4f}" for method in methods)
        say(f"WiSE alpha {alpha:.2f}: validation image AUROC {said} ({data.name})")
    alpha = choose_alpha(worst_method_gain(aurocs), args.wise_tolerance)
    averaged = copy.deepcopy(model).cpu()
    averaged.trunk = interpolated_trunk(start, tuned, alpha)
    averaged.trunk.preprocess = tuned.preprocess
    as_text = {method: {f"{a:.2f}": round(v, 4) for a, v in values.items()} for method, values in aurocs.items()}
    averaged.config.recipe = {**averaged.config.recipe, "wise": {
        "alpha": alpha, "tolerance": args.wise_tolerance, "validation": data.name,
        # the first method's numbers keep their old key (model cards read it); all of them by method
        "validation_auroc": as_text[methods[0]], "validation_methods": methods, "validation_auroc_by_method": as_text,
        "validation_images": {"fit": len(data.fit), "normal": len(data.normal), "defective": len(data.defective)}}}
    say(f"WiSE: kept alpha {alpha:.2f}")
    return averaged


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
    paths, labels, objects = list_training_images(args)
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
        final = accelerator.unwrap_model(model)
        if args.wise_alphas:
            final = average_with_start(final, args, accelerator.print)
            metrics["wise"] = final.config.recipe["wise"]
        save_artifact(final, args.output_dir, metrics, progress.step)
    common.push_trained(accelerator.unwrap_model(model), args, accelerator, training_data=common.known_sources(args.data))
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
