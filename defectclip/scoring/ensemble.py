"""An ensemble of scorers (e.g. PatchCore on one tower + PaDiM on another), saved and loaded as one model.

Members disagree in scale (a PatchCore distance, a Mahalanobis distance), so each member's map is
standardised before the maps are averaged: every `held_out_every`-th normal training image is kept out
of the members' fit, and the mean and standard deviation of each member's map values on those images turn
its map into "standard deviations above normal". The ensemble's map is the mean of the members'
standardised maps and its image score is that map's maximum, as for every other scorer, so "score >=
threshold" and "the mask is not empty" agree.

Why held-out images: a PatchCore bank holds the training patches themselves, so its maps on training
images are near zero and would understate how much normal images vary. On the full magnetic tile
(PatchCore on the TAB trunk + PaDiM on ImageNet, 384 px, 5 seeds) this rule lifted image AUROC over the
better member by 1.0 point and AUPRO over PatchCore by 6 (`benchmarks/results/ensemble.md`).

Folder: config.json (model_type "ensemble", the members' folder names, their statistics, threshold)
and one sub-folder per member, each an ordinary saved PatchCore / PaDiM.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..artifacts import Artifact
from ..errors import ArtifactError
from ..io import write_json_atomic
from ..results import AnomalyResult
from ..schema import Config
from .base import (CONFIG_NAME, FORMAT_VERSION, FeatureScorer, _is_replaceable, _require_same_keys, calibrate_model,
                   load_config)
from .errors import ScoringError
from .inputs import as_image_source, normal_subset
from .thresholds import DEFAULT_QUANTILE, json_threshold

MODEL_TYPE = "ensemble"
DEFAULT_HELD_OUT_EVERY = 10
MEMBER_PREFIX = "member_"  # the members' sub-folders: member_0_patchcore, ...
CONFIG_KEYS = {"model_type", "format_version", "members", "held_out_every", "map_mean", "map_std", "threshold",
               "calibration", "num_train_images"}


class MapStatistics:
    """Running mean and standard deviation of every value of a member's maps (float64 sums)."""

    def __init__(self):
        self.count, self.total, self.squares = 0, 0.0, 0.0

    def add(self, anomaly_map: np.ndarray) -> None:
        values = np.asarray(anomaly_map, dtype=np.float64)
        self.count += values.size
        self.total += float(values.sum())
        self.squares += float(np.square(values).sum())

    def mean_and_std(self) -> tuple[float, float]:
        mean = self.total / self.count
        return mean, math.sqrt(max(self.squares / self.count - mean * mean, 0.0))


def split_held_out(count: int, every: int) -> tuple[list[int], list[int]]:
    """(fit indices, held-out indices): every `every`-th normal image, from the first, is held out."""
    if count < 2:
        raise ScoringError(
            f"An ensemble needs at least 2 normal images (got {count}): its members are fitted on some and "
            "standardised on the others. Add defect-free images."
        )
    held_out = list(range(0, count, every))
    return [i for i in range(count) if i % every], held_out


class Ensemble(Artifact):
    """Several fitted-together scorers whose standardised maps are averaged (see the module docstring).

    `Ensemble([PatchCore(tab_tower), PaDiM("offline:efficientnet_lite0")]).fit(images)`; then `predict`,
    `calibrate`, `save_pretrained` and `Ensemble.from_pretrained` (or `load_scorer`) as for one scorer.
    """

    model_type = MODEL_TYPE

    def __init__(self, members: Sequence[FeatureScorer], held_out_every: int = DEFAULT_HELD_OUT_EVERY):
        members = list(members)
        if len(members) < 2:
            raise ScoringError(f"An ensemble needs at least two member scorers, got {len(members)}.")
        for member in members:
            if not isinstance(member, FeatureScorer):
                raise ScoringError(f"Ensemble members must be PatchCore or PaDiM scorers, got {type(member).__name__}.")
        if isinstance(held_out_every, bool) or not isinstance(held_out_every, int) or held_out_every < 2:
            raise ScoringError(f"held_out_every must be an integer of at least 2, got {held_out_every!r}.")
        self.members = members
        self.held_out_every = held_out_every
        self.map_mean: list[float] | None = None
        self.map_std: list[float] | None = None
        self.threshold: float | None = None
        self.calibration: str | None = None
        self.num_train_images = 0

    # ---- fitting and scoring

    @property
    def is_fitted(self) -> bool:
        return self.map_mean is not None and all(member.is_fitted for member in self.members)

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def fit(self, images: Any) -> "Ensemble":
        """Fit every member on the normal images but each `held_out_every`-th; standardise on those."""
        normal = normal_subset(images)
        fit_indices, held_indices = split_held_out(len(normal), self.held_out_every)
        fit_images = torch.utils.data.Subset(normal, fit_indices)
        held_out = torch.utils.data.Subset(normal, held_indices)
        means, stds = [], []
        for index, member in enumerate(self.members):
            member.fit(fit_images)
            statistics = MapStatistics()
            for result in member.predict(held_out):
                statistics.add(result.anomaly_map)
            mean, std = statistics.mean_and_std()
            if not std > 0:
                raise ScoringError(
                    f"Member {index} ({type(member).__name__}) gives the same value everywhere on the held-out "
                    "normal images, so its maps cannot be standardised; check the images or the member's settings."
                )
            means.append(mean)
            stds.append(std)
        self.map_mean, self.map_std = means, stds
        self.num_train_images = len(normal)
        self.threshold, self.calibration = None, None
        return self

    @torch.no_grad()
    def predict(self, images: Any) -> list[AnomalyResult]:
        """One AnomalyResult per image: the mean standardised map, its maximum as the score."""
        return self.predict_with_members(images)[0]

    @torch.no_grad()
    def predict_with_members(self, images: Any) -> tuple[list[AnomalyResult], list[list[AnomalyResult]]]:
        """`predict`, plus each member's own results on the same images (for comparing them)."""
        self._require_fitted()
        source = as_image_source(images)
        per_member = [member.predict(source) for member in self.members]
        threshold = math.inf if self.threshold is None else self.threshold
        results = []
        for member_results in zip(*per_member):
            combined = self.combine([result.anomaly_map for result in member_results])
            results.append(AnomalyResult.from_map(combined, float(combined.max()), threshold))
        return results, per_member

    def combine(self, maps: Sequence[np.ndarray]) -> np.ndarray:
        """The members' maps of one image -> the ensemble's map (float32)."""
        total = np.zeros(maps[0].shape, dtype=np.float64)
        for anomaly_map, mean, std in zip(maps, self.map_mean, self.map_std):
            total += (np.asarray(anomaly_map, dtype=np.float64) - mean) / std
        return (total / len(maps)).astype(np.float32)

    def calibrate(self, images: Any, labels: Sequence[int] | None = None, quantile: float = DEFAULT_QUANTILE) -> float:
        """Set the decision threshold as `FeatureScorer.calibrate` does, on the ensemble's scores."""
        return calibrate_model(self, images, labels, quantile)

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise ScoringError("This Ensemble is not fitted yet; call fit(normal_images) first.")

    # ---- what the app asks of a scorer

    @property
    def min_image_side(self) -> int:
        """The smallest image side every member can score."""
        return max(int(getattr(member.features, "min_size", 1) or 1) for member in self.members)

    # ---- saving and loading

    def member_folders(self) -> list[str]:
        return [f"{MEMBER_PREFIX}{index}_{member.model_type}" for index, member in enumerate(self.members)]

    def save_pretrained(self, folder: str | Path) -> Path:
        self._require_fitted()
        folder = Path(folder)
        if folder.exists() and not _is_replaceable(folder, MEMBER_PREFIX):
            raise ScoringError(f"{folder} exists and holds other files than a saved model; choose an empty or new folder.")
        return super().save_pretrained(folder)

    def _write_artifact(self, folder: Path, **options: Any) -> None:
        names = self.member_folders()
        for name, member in zip(names, self.members):
            (folder / name).mkdir()
            member._write_artifact(folder / name)
        write_json_atomic(folder / CONFIG_NAME, {
            "model_type": MODEL_TYPE,
            "format_version": FORMAT_VERSION,
            "members": names,
            "held_out_every": self.held_out_every,
            "map_mean": self.map_mean,
            "map_std": self.map_std,
            "threshold": json_threshold(self.threshold),
            "calibration": self.calibration,
            "num_train_images": self.num_train_images,
        })

    @classmethod
    def _read_artifact(cls, folder: Path, device: str | torch.device | None = "auto", root: str | Path | None = None,
                       allow_absolute_tower: bool = True) -> "Ensemble":
        """Read the config strictly, then each member as its own scorer (towers confined to `root`,
        by default the ensemble's folder, so a member may bundle or share a tower inside it)."""
        folder = Path(folder)
        config = load_config(folder)
        path = folder / CONFIG_NAME
        if config.get("model_type") != MODEL_TYPE:
            raise ScoringError(f"{folder} holds a {config.get('model_type')!r} model, not an ensemble.")
        if config.get("format_version") != FORMAT_VERSION:
            raise ScoringError(f"{folder} has format_version {config.get('format_version')}; this code reads {FORMAT_VERSION}.")
        _require_same_keys(set(config), CONFIG_KEYS, path)
        schema = Config(config, path)
        names = schema.strings("members")
        if len(names) < 2:
            raise ArtifactError(f"{path}: an ensemble needs at least two members, got {names!r}.")
        means = schema.numbers("map_mean", len(names))
        stds = schema.numbers("map_std", len(names), 0.0, None, low_open=True)
        members = []
        for name in names:
            if Path(name).name != name or name in ("", ".", ".."):
                raise ArtifactError(f"{path}: member folder {name!r} must be a plain folder name inside the ensemble.")
            members.append(FeatureScorer._read_artifact(folder / name, device=device, root=root or folder,
                                                        allow_absolute_tower=allow_absolute_tower))
        ensemble = cls(members, int(schema.number("held_out_every", 2, None, integer=True)))
        ensemble.map_mean, ensemble.map_std = means, stds
        ensemble.threshold = schema.number("threshold", optional=True)
        ensemble.calibration = schema.string("calibration", optional=True)
        ensemble.num_train_images = int(schema.number("num_train_images", 0, None, integer=True))
        return ensemble


def load_scorer(folder: str | Path, **options: Any) -> FeatureScorer | Ensemble:
    """A saved PatchCore, PaDiM or Ensemble folder (or Hub repo), whichever it holds."""
    from ..artifacts import resolve_artifact

    local = resolve_artifact(folder)
    if load_config(local).get("model_type") == MODEL_TYPE:
        return Ensemble.from_pretrained(folder, **options)
    return FeatureScorer.from_pretrained(folder, **options)
