"""Anomaly scorers on frozen vision towers: PatchCore and PaDiM (DESIGN.md "scoring/").

Both follow one interface: `fit(normal images or a dataset)`, `calibrate(val images, labels)`,
`predict(images) -> list[AnomalyResult]`, `save(folder)` / `Class.load(folder)`.
"""

from .common import FeatureScorer, ScoringError, calibrate_threshold, default_layers, gaussian_blur, load_config
from .padim import PaDiM
from .plan import MAX_IMAGE_PIXELS, InputPlan, parse_plan
from .patchcore import PatchCore, greedy_k_center, nearest_neighbours, select_coreset

SCORERS = {"patchcore": PatchCore, "padim": PaDiM}


def load_scorer(folder, **load_options) -> FeatureScorer:
    """Load a saved PatchCore or PaDiM folder, whichever it holds (options: see FeatureScorer.load)."""
    model_type = load_config(folder).get("model_type")
    if not isinstance(model_type, str) or model_type not in SCORERS:
        raise ScoringError(f"{folder} holds a {model_type!r} model; expected one of {sorted(SCORERS)}.")
    return SCORERS[model_type].load(folder, **load_options)


__all__ = [
    "FeatureScorer", "InputPlan", "MAX_IMAGE_PIXELS", "PaDiM", "PatchCore", "SCORERS", "ScoringError", "calibrate_threshold", "default_layers",
    "gaussian_blur", "greedy_k_center", "load_scorer", "nearest_neighbours", "parse_plan", "select_coreset",
]
