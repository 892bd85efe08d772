"""Does a coarse member beside the fine ones lift pixel AUROC (magnetic tile's uneven areas) without the
image-AUROC loss a wider blur costs (benchmarks/probe_map_smoothing.py)?

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/probe_coarse_member.py   # ~8 min, one thread

One `Ensemble` of five members, all on the ImageNet EfficientNet-Lite0 with photometric "match", fitted as a
user fits it (90 % of train/good, each member's map standardised on the other 10 %; seed 0): PatchCore and
PaDiM at 256 px (the fine pair), PaDiM at 128 and 96 px and PatchCore at 128 px (coarse: each feature cell
covers 2-2.7x the part). Every subset of interest is then scored from the same standardised member maps
(the ensemble's rule: their mean; the image score its maximum): pixel AUROC, AUPRO, image AUROC, pixel
AUROC on uneven + good images, and, for uneven images alone, pixel AUROC inside each image (mask vs the rest
of the same image). Writes benchmarks/results/coarse_member_probe.json (a lead for issue #14, seed 0 only).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_backbones import machine_description  # noqa: E402  (benchmarks/ is not a package)
from eval_ensemble import load_category  # noqa: E402

from defectclip.io import write_json_atomic  # noqa: E402
from defectclip.metrics import aupro, image_auroc, pixel_auroc  # noqa: E402
from defectclip.scoring import Ensemble, PaDiM, PatchCore  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "magnetic_tile"
OUT = Path(__file__).resolve().parent / "results" / "coarse_member_probe.json"
TOWER = "offline:efficientnet_lite0"
MEMBERS = {  # name -> scorer; the order is the ensemble's
    "patchcore_256": lambda: PatchCore(TOWER, image_size=256, coreset_ratio=0.01, seed=0, device="cpu", photometric="match"),
    "padim_256": lambda: PaDiM(TOWER, image_size=256, seed=0, device="cpu", photometric="match"),
    "padim_128": lambda: PaDiM(TOWER, image_size=128, seed=0, device="cpu", photometric="match"),
    "patchcore_128": lambda: PatchCore(TOWER, image_size=128, coreset_ratio=0.01, seed=0, device="cpu", photometric="match"),
    "padim_96": lambda: PaDiM(TOWER, image_size=96, seed=0, device="cpu", photometric="match"),
}
SUBSETS = [
    ["patchcore_256"], ["padim_256"], ["padim_128"], ["patchcore_128"], ["padim_96"],
    ["patchcore_256", "padim_256"],
    ["patchcore_256", "padim_256", "padim_128"],
    ["patchcore_256", "padim_256", "patchcore_128"],
    ["patchcore_256", "padim_256", "padim_96"],
    ["patchcore_256", "padim_256", "padim_128", "patchcore_128"],
]


def subset_scores(maps: list[np.ndarray], masks, labels, kinds) -> dict:
    uneven_or_good = [i for i, kind in enumerate(kinds) if kind in ("uneven", "good")]
    uneven = [i for i, kind in enumerate(kinds) if kind == "uneven"]
    return {
        "image_auroc": round(image_auroc(labels, [m.max() for m in maps]), 4),
        "pixel_auroc": round(pixel_auroc(masks, maps), 4),
        "aupro": round(aupro(masks, maps), 4),
        "uneven_and_good_pixel_auroc": round(pixel_auroc([masks[i] for i in uneven_or_good], [maps[i] for i in uneven_or_good]), 4),
        "uneven_within_image_pixel_auroc": round(pixel_auroc([masks[i] for i in uneven], [maps[i] for i in uneven]), 4),
    }


def main() -> dict:
    torch.set_num_threads(1)
    train, images, masks, labels, kinds = load_category(DATA)
    names = list(MEMBERS)
    ensemble = Ensemble([MEMBERS[name]() for name in names]).fit(train)
    _, per_member = ensemble.predict_with_members(images)
    standardised = {  # the ensemble's own standardisation of each member's maps
        name: [((r.anomaly_map - mean) / std).astype(np.float32) for r in results]
        for name, results, mean, std in zip(names, per_member, ensemble.map_mean, ensemble.map_std)
    }
    rows = []
    for subset in SUBSETS:
        maps = [sum(parts) / len(parts) for parts in zip(*(standardised[name] for name in subset))]
        rows.append({"members": subset, **subset_scores(maps, masks, labels, kinds)})
        print(json.dumps(rows[-1]), flush=True)
    pixels = {kind: int(sum(m.sum() for m, k in zip(masks, kinds) if k == kind)) for kind in sorted(set(kinds) - {"good"})}
    report = {
        "machine": machine_description(), "data": "magnetic_tile, full (635 train / 709 test)", "seeds": [0], "subset": False,
        "setting": "ImageNet EfficientNet-Lite0, photometric 'match', members fitted inside one Ensemble (90 % fit / 10 % standardise)",
        "command": "OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/probe_coarse_member.py",
        "defect_pixels_by_type": pixels, "rows": rows,
    }
    write_json_atomic(OUT, report)
    return report


if __name__ == "__main__":
    main()
