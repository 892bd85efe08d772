"""Anomaly scorers on frozen vision towers: PatchCore and PaDiM (DESIGN.md "scoring/").

Both follow one interface: `fit(normal images or a dataset)`, `calibrate(val images, labels)`,
`predict(images) -> list[AnomalyResult]`, `save_pretrained(folder)` / `Class.from_pretrained(folder or org/repo)`;
`FeatureScorer.from_pretrained` loads either, by the saved `model_type`.
"""

from .common import FeatureScorer, ScoringError, calibrate_threshold, default_layers, gaussian_blur, load_config
from .padim import PaDiM
from .plan import MAX_IMAGE_PIXELS, InputPlan, parse_plan
from .patchcore import PatchCore, greedy_k_center, nearest_neighbours, select_coreset

SCORERS = {"patchcore": PatchCore, "padim": PaDiM}


__all__ = [
    "FeatureScorer", "InputPlan", "MAX_IMAGE_PIXELS", "PaDiM", "PatchCore", "SCORERS", "ScoringError",
    "calibrate_threshold", "default_layers", "gaussian_blur", "greedy_k_center", "nearest_neighbours", "parse_plan",
    "select_coreset",
]
