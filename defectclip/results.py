"""The one result type every scorer returns (DESIGN.md "Results")."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class AnomalyResult:
    """score: image-level anomaly score; anomaly_map: H x W float32 at the input image's size;
    threshold: the model's calibrated decision threshold; mask: anomaly_map >= threshold."""

    score: float
    anomaly_map: np.ndarray
    threshold: float
    mask: np.ndarray

    @property
    def is_anomalous(self) -> bool:
        return self.score >= self.threshold

    @classmethod
    def from_map(cls, anomaly_map: np.ndarray, score: float, threshold: float) -> "AnomalyResult":
        anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
        return cls(float(score), anomaly_map, float(threshold), anomaly_map >= threshold)
