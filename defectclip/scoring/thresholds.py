"""Decision thresholds: F1-optimal on labelled validation images, else a quantile of normal scores."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..metrics import f1_max
from .errors import ScoringError

DEFAULT_QUANTILE = 0.99


@dataclass(frozen=True)
class Calibration:
    threshold: float
    method: str  # "f1" or "quantile:<q>"


def calibrate_threshold(scores: Sequence[float], labels: Sequence[int] | None, quantile: float) -> Calibration:
    """F1-optimal threshold when labels hold both classes, else the `quantile` of the normal scores.

    With only normal images the F1-optimal threshold is undefined; a high quantile of their scores
    then bounds the false-alarm rate on normal parts at about 1 - quantile.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not 0 < quantile <= 1:
        raise ScoringError(f"quantile must be in (0, 1], got {quantile}.")
    if labels is None:
        labels = np.zeros(len(scores), dtype=int)
    labels = np.asarray(labels).astype(int)
    if labels.shape != scores.shape:
        raise ScoringError(f"Got {len(scores)} images but {len(labels)} labels.")
    if scores.size == 0:
        raise ScoringError("calibrate needs at least one image.")
    if labels.min() == 0 and labels.max() == 1:
        _, threshold = f1_max(labels, scores)
        return Calibration(_midway_below(scores, float(threshold)), "f1")
    if labels.min() == 1:
        raise ScoringError("calibrate got only anomalous images; it needs normal images (label 0) as well.")
    return Calibration(float(np.quantile(scores[labels == 0], quantile)), f"quantile:{quantile:g}")


def _midway_below(scores: np.ndarray, threshold: float) -> float:
    """Move an F1-optimal threshold halfway down to the next lower score.

    f1_max returns a score itself, so the weakest defect it accepts sits exactly on the threshold and
    its map barely crosses it; halfway to the next score classifies the calibration set identically
    while leaving a margin, and gives defect regions a sensible extent in the map.
    """
    below = scores[scores < threshold]
    return float((below.max() + threshold) / 2) if below.size else threshold


def json_threshold(threshold: float | None) -> float | None:
    """JSON has no infinity; an uncalibrated model stores null."""
    return None if threshold is None or not math.isfinite(threshold) else float(threshold)
