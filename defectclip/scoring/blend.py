"""A scorer's anomaly map plus the self-similarity map, on the scorer's own scale (few-shot's blend).

A few references cover little of how good parts vary, so a few-shot bank flags much that is normal
texture it never saw; self-similarity (scoring/self_similarity.py) asks the image itself instead. The
two see different things, and their sum ranks images better than the bank alone: on the full magnetic
tile test set (5 draws), image AUROC with 1 / 4 / 16 references went from 72.1 / 76.5 / 80.9 to 77.9 / 79.7 /
81.2 (benchmarks/results/few_shot.md, session 18).

Each map is put in standard deviations of its own pixels over normal images (for few-shot: the
references scored held out, so no image of the test set and no label is read), the two are averaged with
equal weights (nothing without labelled defects could choose others), and the mean is put back on the
scorer's scale (its mean and spread): the blended map reads like the scorer's own, so a threshold placed
on blended scores, the app's slider and its legend keep working.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import numpy as np

from ..schema import MAX_MODEL_SIDE, Config


@dataclass
class MapBlend:
    """The statistics a blend needs (saved in the scorer's config.json as `self_similarity`)."""

    image_size: int  # the self-similarity map's model input side
    map_mean: float
    map_std: float
    self_mean: float
    self_std: float
    mirrors: bool = True  # the self-similarity map also looks at the image's mirror images

    def __post_init__(self) -> None:
        check_statistics(self.image_size, [self.map_mean, self.self_mean], [self.map_std, self.self_std])

    @classmethod
    def fitted(cls, image_size: int, mirrors: bool, maps: Sequence[np.ndarray],
               self_maps: Sequence[np.ndarray]) -> "MapBlend":
        """The statistics of the scorer's maps and the self-similarity maps of the same normal images."""
        own, similar = pixel_sample(maps), pixel_sample(self_maps)
        return cls(int(image_size), float(own.mean()), float(own.std()) or 1.0,
                   float(similar.mean()), float(similar.std()) or 1.0, bool(mirrors))

    def blend(self, anomaly_map: np.ndarray, self_map: np.ndarray) -> np.ndarray:
        """Two maps of one image (same size) -> the blended map, on `anomaly_map`'s scale."""
        if anomaly_map.shape != self_map.shape:
            raise ValueError(f"maps of one image differ in size: {anomaly_map.shape} and {self_map.shape}")
        return on_first_scale(anomaly_map, self.map_mean, self.map_std, self_map, self.self_mean,
                              self.self_std).astype(np.float32)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config: Config) -> "MapBlend":
        """A saved blend, every field checked (the error names the file and the field)."""
        config.only_keys(f.name for f in fields(cls))
        config.number("image_size", 32, MAX_MODEL_SIDE, integer=True)
        for key in ("map_mean", "self_mean"):
            config.number(key)
        for key in ("map_std", "self_std"):
            config.number(key, 0, low_open=True)
        config.boolean("mirrors")
        return cls(**config.data)


def check_statistics(image_size: int, means: Sequence[float], spreads: Sequence[float]) -> None:
    """A blend's numbers: finite means, finite positive spreads, a usable self-similarity input side."""
    if not all(math.isfinite(float(v)) for v in [*means, *spreads]) or min(spreads) <= 0:
        raise ValueError(f"a self-similarity blend needs finite means and positive spreads, got {[*means, *spreads]}")
    if not 32 <= int(image_size) <= MAX_MODEL_SIDE:
        raise ValueError(f"a self-similarity blend's image_size must be 32-{MAX_MODEL_SIDE}, got {image_size}")


def on_first_scale(first: np.ndarray, first_mean: float, first_std: float,
                   second: np.ndarray, second_mean: float, second_std: float) -> np.ndarray:
    """The mean of the two maps in standard deviations of each, put back on the first map's scale."""
    standard = ((first - first_mean) / first_std + (second - second_mean) / second_std) / 2
    return first_mean + first_std * standard


def pixel_sample(maps: Sequence[np.ndarray]) -> np.ndarray:
    """Every 17th pixel of every map, as one float64 vector: enough for a mean and a spread."""
    return np.concatenate([np.asarray(m, dtype=np.float64).ravel()[::17] for m in maps])
