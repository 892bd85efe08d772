"""Does a wider smoothing of the anomaly maps lift pixel AUROC (magnetic tile's uneven areas)?

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/probe_map_smoothing.py patchcore   # or padim; ~4 min

One fit (ImageNet EfficientNet-Lite0, 256 px, photometric "match", seed 0) on the full magnetic tile from
../shared/data; its test maps blurred again with sigma 0 / 4 / 8 / 16 px (at the 256 px scale) and scored:
pixel AUROC, AUPRO, image AUROC of the map maximum, and pixel AUROC on the uneven and good images alone.
Results: benchmarks/results/map_smoothing_probe.json (a lead for issue #14's pixel target, not a setting).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_ensemble import load_category  # noqa: E402  (benchmarks/ is not a package)

from defectclip.metrics import aupro, image_auroc, pixel_auroc  # noqa: E402
from defectclip.scoring import PaDiM, PatchCore  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "magnetic_tile"
EXTRA_SIGMAS = (0, 4, 8, 16)  # px at the 256 px model scale


def fitted_scorer(method: str, train: list[np.ndarray]):
    if method == "patchcore":
        model = PatchCore("offline:efficientnet_lite0", image_size=256, coreset_ratio=0.01, seed=0, device="cpu",
                          photometric="match")
    else:
        model = PaDiM("offline:efficientnet_lite0", image_size=256, seed=0, device="cpu", photometric="match")
    return model.fit(train)


def blurred(maps: list[np.ndarray], sigma: float) -> list[np.ndarray]:
    """Each map blurred again, sigma given at the 256 px scale and scaled to the map's own size."""
    if sigma == 0:
        return maps
    return [ndimage.gaussian_filter(m, sigma * max(m.shape) / 256) for m in maps]


def scores(maps, masks, labels, kinds, sigma: float) -> dict:
    uneven = [i for i, kind in enumerate(kinds) if kind in ("uneven", "good")]
    return {
        "extra_sigma_px_at_256": sigma,
        "pixel_auroc": round(pixel_auroc(masks, maps), 4),
        "aupro": round(aupro(masks, maps), 4),
        "image_auroc_map_max": round(image_auroc(labels, [m.max() for m in maps]), 4),
        "uneven_and_good_pixel_auroc": round(pixel_auroc([masks[i] for i in uneven], [maps[i] for i in uneven]), 4),
    }


def main(method: str) -> None:
    torch.set_num_threads(1)
    train, images, masks, labels, kinds = load_category(DATA)
    maps = [result.anomaly_map for result in fitted_scorer(method, train).predict(images)]
    for sigma in EXTRA_SIGMAS:
        print(json.dumps({"method": method, **scores(blurred(maps, sigma), masks, labels, kinds, sigma)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "patchcore")
