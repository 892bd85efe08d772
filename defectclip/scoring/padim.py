"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework", ICPR 2021).

fit: at every patch position, a Gaussian over a seeded random subset of `d` feature channels (mean
and covariance + epsilon I over the normal images), stored with the covariance already inverted.
predict: the Mahalanobis distance of each test patch to its position's Gaussian -> patch map ->
upsampled, smoothed (sigma = 4 px) -> image score = the map's maximum.

PaDiM models each position separately, so it suits aligned images (a part always at the same place);
PatchCore's position-free memory bank suits textures and unaligned parts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..towers import OFFLINE_VISION, VisionTower
from ..errors import ArtifactError
from ..schema import Config, check_tensor
from .base import FeatureScorer
from .errors import ScoringError
from .maps import DEFAULT_SIGMA
from .photometric import Photometric
from .plan import InputPlan

DEFAULT_D = 100
DEFAULT_EPSILON = 0.01


def random_channels(num_channels: int, d: int | None, seed: int) -> torch.Tensor:
    """A seeded random subset of `d` channels (sorted); PaDiM found it as good as PCA and far cheaper."""
    if d is None:
        d = min(DEFAULT_D, num_channels)
    if not 1 <= d <= num_channels:
        raise ScoringError(f"d must be between 1 and the {num_channels} channels of the chosen layers, got {d}.")
    order = torch.randperm(num_channels, generator=torch.Generator().manual_seed(seed))
    return order[:d].sort().values


class GaussianAccumulator:
    """Running per-position sums for the mean and covariance, in float64 so that the
    sum-of-squares formula does not lose the covariance to cancellation."""

    def __init__(self):
        self.count = 0
        self.total: torch.Tensor | None = None  # P x d
        self.outer: torch.Tensor | None = None  # P x d x d

    def add(self, patches: torch.Tensor) -> None:
        """patches: N x P x d."""
        patches = patches.double()
        if self.total is None:
            self.total = torch.zeros(patches.shape[1:], dtype=torch.float64, device=patches.device)
            self.outer = torch.zeros(*patches.shape[1:], patches.shape[2], dtype=torch.float64, device=patches.device)
        self.count += patches.shape[0]
        self.total += patches.sum(0)
        self.outer += torch.einsum("npd,npe->pde", patches, patches)

    def mean_and_precision(self, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count == 0:
            raise ScoringError("The normal (training) set is empty: fit needs at least one defect-free image.")
        mean = self.total / self.count
        scatter = self.outer - self.count * torch.einsum("pd,pe->pde", mean, mean)
        covariance = scatter / max(self.count - 1, 1)
        # epsilon I keeps the covariance invertible with fewer images than channels (and
        # regularises rarely varying channels), as in the paper.
        covariance += epsilon * torch.eye(mean.shape[1], dtype=torch.float64, device=mean.device)
        # contiguous, as the loaded copy will be, so predictions before and after save are bit-identical
        return mean.float().contiguous(), batched_inverse(covariance).float().contiguous()


def batched_inverse(matrices: torch.Tensor) -> torch.Tensor:
    """Invert a batch of small matrices with one CPU thread.

    torch splits the batch over its threads and each LAPACK call may start threads of its own; on a
    busy 2-core machine that nesting made 256 inversions of 56 x 56 take 6 s instead of 0.07 s.
    """
    if matrices.device.type != "cpu":
        return torch.linalg.inv(matrices)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.inv(matrices)
    finally:
        torch.set_num_threads(threads)


def mahalanobis(patches: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """patches N x P x d, mean P x d, precision P x d x d -> N x P distances."""
    delta = patches - mean
    weighted = torch.einsum("npd,pde->npe", delta, precision)
    return (weighted * delta).sum(-1).clamp_min(0).sqrt()


class PaDiM(FeatureScorer):
    """PaDiM anomaly scorer (same interface as PatchCore: fit, calibrate, predict, save, load)."""

    model_type = "padim"
    default_reductions = (4, 8, 16)
    local_average = False
    method_config_keys = {"d", "epsilon", "feature_dim", "grid"}
    state_keys = {"mean", "precision", "channels"}
    constructor_keys = ("d", "epsilon")

    def __init__(
        self,
        tower: str | VisionTower = OFFLINE_VISION,
        layers: Sequence[str] | None = None,
        image_size: int | Sequence[int] | None = None,
        d: int | None = None, epsilon: float = DEFAULT_EPSILON,  # PaDiM's own: kept channels, covariance floor
        sigma: float = DEFAULT_SIGMA,
        seed: int = 0,
        device: str | torch.device | None = "auto",
        batch_size: int = 16,
        plan: InputPlan | str | None = None,
        inference: str = "auto",
        photometric: Photometric | str | dict | None = None,
    ):
        super().__init__(tower, layers, image_size, sigma, seed, device, batch_size, plan, inference, photometric)
        total_channels = sum(self.tower.stages[name].channels for name in self.layers)
        random_channels(total_channels, d, seed)  # validates d before any feature is extracted
        if epsilon <= 0:
            raise ScoringError(f"epsilon must be positive, got {epsilon}.")
        self.requested_d = d
        self.epsilon = float(epsilon)
        self.channels: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.precision: torch.Tensor | None = None
        self.feature_dim: int | None = None
        self.grid: tuple[int, int] | None = None

    @property
    def is_fitted(self) -> bool:
        return self.mean is not None

    @property
    def d(self) -> int | None:
        return None if self.channels is None else int(self.channels.numel())

    def _fit_batches(self, batches: Iterator[torch.Tensor]) -> None:
        accumulator = GaussianAccumulator()
        for embedding in batches:
            if self.channels is None or self.feature_dim != embedding.shape[1]:
                self.feature_dim = int(embedding.shape[1])
                self.channels = random_channels(self.feature_dim, self.requested_d, self.seed).to(self.device)
            self.grid = (int(embedding.shape[2]), int(embedding.shape[3]))
            accumulator.add(self._positions(embedding))
        self.mean, self.precision = accumulator.mean_and_precision(self.epsilon)

    def _positions(self, embedding: torch.Tensor) -> torch.Tensor:
        """N x C x h x w -> N x (h w) x d on the chosen channels."""
        selected = embedding.index_select(1, self.channels)
        return selected.flatten(2).transpose(1, 2)

    def _score_patches(self, embedding: torch.Tensor) -> tuple[torch.Tensor, None]:
        batch, _, height, width = embedding.shape
        if (height, width) != tuple(self.grid):
            raise ScoringError(f"Feature grid {height} x {width} differs from the fitted {self.grid}.")
        distances = mahalanobis(self._positions(embedding), self.mean, self.precision)
        return distances.view(batch, height, width), None

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "precision": self.precision, "channels": self.channels}

    def _set_state(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], source: Path) -> None:
        config_path = source.parent / "config.json"
        if config["feature_dim"] != self.tower_feature_dim():
            raise ArtifactError(
                f"{config_path}: feature_dim {config['feature_dim']} does not match the {self.tower_feature_dim()} "
                f"channels of layers {self.layers} of {self.tower.spec}."
            )
        if config["d"] > config["feature_dim"]:
            raise ArtifactError(f"{config_path}: d {config['d']} exceeds feature_dim {config['feature_dim']}.")
        positions, d = config["grid"][0] * config["grid"][1], config["d"]
        mean = check_tensor(tensors["mean"], "mean", source, (positions, d))
        precision = check_tensor(tensors["precision"], "precision", source, (positions, d, d))
        channels = check_tensor(tensors["channels"], "channels", source, (d,), floating=False)
        if channels.is_floating_point() or channels.dtype == torch.bool:
            raise ArtifactError(f"{source}: tensor 'channels' must hold integer channel indices, got {channels.dtype}.")
        channels = channels.long()
        if int(channels.min()) < 0 or int(channels.max()) >= config["feature_dim"] or channels.unique().numel() != d:
            raise ArtifactError(f"{source}: 'channels' must be {d} distinct indices below feature_dim {config['feature_dim']}.")
        self.mean = mean.float().to(self.device).contiguous()
        self.precision = precision.float().to(self.device).contiguous()
        self.channels = channels.to(self.device)
        self.feature_dim = config["feature_dim"]
        self.grid = tuple(config["grid"])
        grid = self.fitted_grid()
        if grid != self.grid:
            raise ArtifactError(f"{config_path}: grid {list(self.grid)} differs from the {list(grid)} patches "
                                f"that {self.tower.spec} gives at size {list(self.preprocess.size)}.")

    def fitted_grid(self) -> tuple[int, int]:
        """The patch grid the tower gives at the model size (one forward pass on a blank image)."""
        with torch.no_grad():
            blank = torch.zeros(1, 3, *self.preprocess.size, device=self.device)
            height, width = self.features.embed(blank).shape[-2:]
        return int(height), int(width)

    @classmethod
    def _check_method_config(cls, config: Config) -> None:
        config.number("d", 1, None, integer=True)
        config.number("epsilon", 0.0, None, low_open=True)
        config.number("feature_dim", 1, None, integer=True)
        config.numbers("grid", 2, 1, None, integer=True)

    def _method_config(self) -> dict[str, Any]:
        return {"d": self.d, "epsilon": self.epsilon, "feature_dim": self.feature_dim, "grid": list(self.grid)}
