"""Keeping what the ImageNet start knows while TAB pretrains: three measured ways, and a rule to pick.

A TAB trunk is only used through its feature maps (PatchCore, PaDiM), on products it never saw, so
pretraining must not trade general features for one texture. Three ways to hold the trunk near its
start, each switchable in train/tab_pretrain.py:
- `freeze_early_stages`: the stem and the first stages do not train at all (`--freeze-stages`);
- `FeatureDistillation`: an extra loss, the relative squared distance of the trunk's stage maps to
  those of a frozen copy of its start (`--distill-weight`);
- `interpolate_state`: after training, weights (1 - alpha) * start + alpha * tuned (WiSE-FT,
  Wortsman et al. 2022), with alpha picked by `choose_alpha` on a validation set of real defects that
  no test set is part of (`--wise-alphas`, `--validation`), on the worst gain over the validated
  scorers (`--validation-methods`, `worst_method_gain`). alpha = 0 is the start itself, so the picked
  trunk is at least as good as the start on that validation set, in every validated scorer.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import DefectclipError
from .towers import VisionTower


class TransferError(DefectclipError):
    """An anti-forgetting setting that cannot work on this trunk; the message says what to change."""


# --------------------------------------------------------------------------------------------------
# frozen early stages


def early_stage_parameters(trunk: VisionTower, stages: int) -> list[tuple[str, nn.Parameter]]:
    """Parameters computed before the end of the trunk's `stages`-th feature stage (stem included).

    timm registers modules in forward order, so every module listed up to the stage's module (and its
    children) is upstream of it; a stage may be a parameter-free activation, which this also covers.
    """
    names = trunk.stage_names
    if not 0 <= stages <= len(names):
        raise TransferError(f"--freeze-stages must be between 0 and {len(names)} for {trunk.spec} "
                            f"(its stages are {names}); got {stages}.")
    if stages == 0:
        return []
    stage = names[stages - 1]
    order = {name: i for i, (name, _) in enumerate(trunk.model.named_modules())}
    last = max(i for name, i in order.items() if name == stage or name.startswith(stage + "."))
    return [(name, param) for name, param in trunk.model.named_parameters()
            if order[name.rsplit(".", 1)[0] if "." in name else ""] <= last]


def freeze_early_stages(trunk: VisionTower, stages: int) -> int:
    """Stop gradients to the stem and the first `stages` stages; returns how many tensors froze."""
    frozen = early_stage_parameters(trunk, stages)
    for _, param in frozen:
        param.requires_grad_(False)
    return len(frozen)


# --------------------------------------------------------------------------------------------------
# feature distillation towards the start


@contextlib.contextmanager
def captured_stages(trunk: VisionTower, names: Sequence[str]):
    """Inside the block, every forward pass through `trunk` leaves its stage outputs in the yielded dict."""
    captured: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(_module, _inputs, output):
            captured[name] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [trunk.model.get_submodule(name).register_forward_hook(hook_for(name)) for name in names]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def distilled_stages(trunk: VisionTower) -> list[str]:
    """Every stage but the deepest: the maps PatchCore and PaDiM read; the last one may move freely,
    since the text alignment acts through it."""
    names = trunk.stage_names
    return names[:-1] if len(names) > 1 else names


class FeatureDistillation:
    """Mean over stages of ||f - f_start||^2 / ||f_start||^2 against a frozen copy of the start trunk.

    Relative, so stages of different scales weigh alike and the weight means the same for any trunk.
    The teacher is no part of the trained model (no parameters, no checkpoint entries): it is the
    trunk's spec built again, so a resumed run gets the same one; it stays in eval mode, so its
    BatchNorm statistics never move.
    """

    def __init__(self, start: VisionTower, stages: Sequence[str] | None = None):
        self.teacher = copy.deepcopy(start).eval()
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        self.stages = list(stages) if stages is not None else distilled_stages(start)

    def to(self, device) -> "FeatureDistillation":
        self.teacher.to(device)
        return self

    def target(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.teacher.forward_features(images, self.stages)

    def loss(self, student: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        target = self.target(images)
        terms = [F.mse_loss(student[name].float(), target[name].float()) / target[name].float().pow(2).mean().clamp_min(1e-8)
                 for name in self.stages]
        return torch.stack(terms).mean()


# --------------------------------------------------------------------------------------------------
# weight averaging with the start


def interpolate_state(start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * start + alpha * tuned for floating tensors (BatchNorm counters are taken from `tuned`)."""
    if not 0.0 <= alpha <= 1.0:
        raise TransferError(f"alpha must be in [0, 1] (0 = the start, 1 = the tuned trunk); got {alpha}.")
    if set(start) != set(tuned):
        missing, extra = sorted(set(start) - set(tuned)), sorted(set(tuned) - set(start))
        raise TransferError(f"The two trunks differ in their weights (only in start: {missing[:5]}, only in "
                            f"tuned: {extra[:5]}); interpolate trunks of one architecture.")
    mixed = {}
    for key, value in tuned.items():
        base = start[key].to(value.device)
        mixed[key] = torch.lerp(base.float(), value.float(), alpha).to(value.dtype) if value.is_floating_point() else value.clone()
    return mixed


def interpolated_trunk(start: VisionTower, tuned: VisionTower, alpha: float) -> VisionTower:
    """A copy of `tuned` carrying the interpolated weights."""
    trunk = copy.deepcopy(tuned)
    trunk.load_state_dict(interpolate_state(start.state_dict(), tuned.state_dict(), alpha))
    return trunk.eval()


# --------------------------------------------------------------------------------------------------
# the rule that picks alpha


@dataclass
class ValidationSet:
    """Normal images to fit on, held-out normal images and images with real defects: arrays H x W x 3 uint8."""

    fit: list[np.ndarray]
    normal: list[np.ndarray]
    defective: list[np.ndarray]
    name: str = "validation"


VALIDATION_METHODS = ("patchcore", "padim")


def validation_auroc(trunk: VisionTower, data: ValidationSet, image_size: int, seed: int = 0,
                     method: str = "patchcore") -> float:
    """Image AUROC of one of the scorers users run on this trunk (PatchCore or PaDiM), fitted on `data.fit`."""
    from .metrics import image_auroc
    from .scoring import PaDiM, PatchCore

    if method not in VALIDATION_METHODS:
        raise TransferError(f"Unknown validation method {method!r}; use one of {VALIDATION_METHODS}.")
    if method == "patchcore":
        scorer = PatchCore(trunk, image_size=image_size, coreset_ratio=0.1, seed=seed, device="cpu")
    else:
        scorer = PaDiM(trunk, image_size=image_size, seed=seed, device="cpu")
    scorer.fit(data.fit)
    scores = [r.score for r in scorer.predict(data.normal + data.defective)]
    labels = [0] * len(data.normal) + [1] * len(data.defective)
    return float(image_auroc(labels, scores))


def worst_method_gain(aurocs: dict[str, dict[float, float]]) -> dict[float, float]:
    """For every alpha, the smallest gain over the start (alpha = 0) among the validated methods.

    A trunk is kept only for what it does in every scorer it will be used in: an alpha that helps
    PatchCore but costs PaDiM counts by its PaDiM loss. With one method this is its AUROC shifted by a
    constant, so `choose_alpha` picks the same alpha as on the AUROCs themselves.
    """
    if not aurocs:
        raise TransferError("No validation method was run.")
    alphas = set.intersection(*(set(values) for values in aurocs.values()))
    if 0.0 not in alphas:
        raise TransferError("Every validated method needs alpha = 0 (the start) to measure gains against.")
    return {alpha: min(values[alpha] - values[0.0] for values in aurocs.values()) for alpha in sorted(alphas)}


def choose_alpha(aurocs: dict[float, float], tolerance: float) -> float:
    """The smallest alpha whose validation AUROC is within `tolerance` of the best one.

    Smallest: a validation set of a few hundred images cannot tell apart AUROCs closer than about its
    own noise, and when in doubt the trunk nearer its start is the one that hurts no unseen object.
    """
    if not aurocs:
        raise TransferError("No alpha was validated.")
    best = max(aurocs.values())
    return min(alpha for alpha, value in aurocs.items() if value >= best - tolerance)
