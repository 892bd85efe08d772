"""Anomaly scorers on frozen vision towers: PatchCore and PaDiM (DESIGN.md "scoring/").

Both follow one interface: `fit(normal images or a dataset)`, `calibrate(val images, labels)`,
`predict(images) -> list[AnomalyResult]`, `save_pretrained(folder)` / `Class.from_pretrained(folder or org/repo)`;
`FeatureScorer.from_pretrained` loads either, by the saved `model_type`.

Each method (patchcore.py, padim.py) is only its model of normal patches; the harness around it is
split by idea, as anomalib splits its torch models from their harness: plan.py (input plans: resize
or tiles), inputs.py (image input), features.py (patch features), maps.py (anomaly maps),
thresholds.py (calibration), base.py (the shared FeatureScorer and its artifact folder), errors.py
(ScoringError). ensemble.py averages several fitted scorers' standardised maps (`Ensemble`);
`load_scorer` loads whichever of the three a folder holds.
"""

from .base import FeatureScorer, load_config
from .errors import ScoringError
from .ensemble import Ensemble, load_scorer
from .features import default_layers
from .maps import gaussian_blur
from .padim import PaDiM
from .patchcore import PatchCore, greedy_k_center, nearest_neighbours, select_coreset
from .photometric import Photometric, parse_photometric
from .plan import MAX_IMAGE_PIXELS, InputPlan, parse_plan
from .thresholds import calibrate_threshold

SCORERS = {"patchcore": PatchCore, "padim": PaDiM}


__all__ = [
    "Ensemble", "FeatureScorer", "InputPlan", "MAX_IMAGE_PIXELS", "PaDiM", "PatchCore", "Photometric", "SCORERS",
    "ScoringError", "calibrate_threshold", "default_layers", "gaussian_blur", "greedy_k_center", "load_config",
    "load_scorer", "nearest_neighbours", "parse_photometric", "parse_plan", "select_coreset",
]
