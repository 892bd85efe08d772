"""Few-shot plus self-similarity: does the training-free map help a bank of 1-16 references? (a lead for #15)

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/probe_few_shot_self_similarity.py    # ~8 min, one thread

Full magnetic tile test set (709 images). Self-similarity: the product's map (defectclip.scoring.self_similarity,
320 px, mirror images). Few-shot: `fit_few_shot` at 224 px with the draws of eval_few_shot.py (k references
drawn with seed 1000 k + draw, exposure matching). "plus_self": the two maps, each standardised over the pixels of
the test images being scored (no labels), added; image score = the map's maximum as few-shot's own. Maps at half
resolution (every second row and column) to keep 2 x 709 maps in memory. Not built into few-shot: its threshold
would have to be placed on the blended scores, and the balanced-accuracy ratio measured again.
Writes benchmarks/results/few_shot_self_similarity_probe.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_backbones import machine_description  # noqa: E402  (benchmarks/ is not a package)
from eval_clip_ada_transfer import SHARED, as_array  # noqa: E402
from probe_self_similarity import standardised  # noqa: E402

from defectclip.data import MVTecDataset, load_image  # noqa: E402
from defectclip.io import write_json_atomic  # noqa: E402
from defectclip.metrics import image_auroc, pixel_auroc  # noqa: E402
from defectclip.scoring.few_shot import as_uint8_rgb, fit_few_shot  # noqa: E402
from defectclip.scoring.self_similarity import SelfSimilarity  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "few_shot_self_similarity_probe.json"
KS, DRAWS = (1, 4, 16), (0, 1)


def scores(maps, masks, labels) -> dict:
    return {"image_auroc": round(image_auroc(labels, [m.max() for m in maps]), 4), "pixel_auroc": round(pixel_auroc(masks, maps), 4)}


def main(self_size: int = 320) -> dict:
    torch.set_num_threads(1)
    root = SHARED / "magnetic_tile"
    test = MVTecDataset(root, "test")
    samples = [test[i] for i in range(len(test))]
    images = [as_array(s) for s in samples]
    masks, labels = [s.mask.numpy()[::2, ::2] for s in samples], [int(s.label) for s in samples]
    started = time.perf_counter()
    similarity = SelfSimilarity("offline:efficientnet_lite0", self_size, mirrors=True)
    self_maps = [similarity.map(image)[::2, ::2] for image in images]
    report = {"machine": machine_description(), "subset": False, "test_images": len(images), "self_similarity_size": self_size,
              "self_similarity_alone": scores(self_maps, masks, labels), "runs": {}}
    self_z = standardised(self_maps)
    train_paths = [ref.image_path for ref in MVTecDataset(root, "train").refs]
    for k in KS:
        for draw in DRAWS:
            rng = np.random.default_rng(1000 * k + draw)  # eval_few_shot.py's draws
            chosen = sorted(rng.choice(len(train_paths), size=k, replace=False).tolist())
            references = [as_uint8_rgb(load_image(train_paths[i])) for i in chosen]
            scorer, _ = fit_few_shot(references, "offline:efficientnet_lite0", image_size=224, seed=draw)
            few_maps = [r.anomaly_map[::2, ::2] for r in scorer.predict(images)]
            blended = [a + b for a, b in zip(standardised(few_maps), self_z)]
            row = {"few_shot": scores(few_maps, masks, labels), "plus_self": scores(blended, masks, labels)}
            report["runs"][f"k{k}_draw{draw}"] = row
            print(json.dumps({f"k{k}_draw{draw}": row}), flush=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(OUT if self_size == 320 else OUT.with_name(f"{OUT.stem}_{self_size}px.json"), report)
    return report


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 320)
