"""Reference-free without training: is a patch unlike the rest of its own image? And does that prior help
CLIP-ADA on an object it was not trained on (issue #15's cross-object targets)?

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/probe_self_similarity.py \
        --clip-ada "magnetic tile=runs/clip_ada_transfer/magnetic_tile/model" \
        --clip-ada "steel strip=runs/clip_ada_transfer/steel_strip/model"      # ~10 min, one thread

Self-similarity map: every patch of the image (ImageNet EfficientNet-Lite0, PatchCore's layers, 224 px by default; `--image-size`) is
compared with the image's own patches outside a quarter of the grid around it (the few-shot single-reference
hold-out, `few_shot.Holdout`), and its distance to the nearest one is its score; the image score is the map's
maximum. Nothing is trained and no normal image is needed, so it transfers by construction. With `--clip-ada
"OBJECT=FOLDER"` (a CLIP-ADA trained on OBJECT, e.g. by eval_clip_ada_transfer.py) the model is also scored
on the *other* object, alone and averaged with the self-similarity map (the image score then the mean map's maximum; each map standardised over the pixels
of the test images being scored, no labels; CLIP-ADA's probability as a logit). Full test sets of magnetic
tile (709 images) and steel strip (840). Writes benchmarks/results/self_similarity_probe.json (a lead).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_backbones import machine_description  # noqa: E402  (benchmarks/ is not a package)
from eval_clip_ada_transfer import OBJECTS, SHARED, as_array  # noqa: E402

from defectclip.clip_ada import ClipADA  # noqa: E402
from defectclip.data import IndexMaskDataset, MVTecDataset  # noqa: E402
from defectclip.io import write_json_atomic  # noqa: E402
from defectclip.metrics import image_auroc, pixel_auroc  # noqa: E402
from defectclip.scoring.self_similarity import SelfSimilarity  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "self_similarity_probe.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=SHARED, help="folder holding magnetic_tile/ and neu_seg/")
    parser.add_argument("--clip-ada", action="append", default=[], metavar="OBJECT=FOLDER",
                        help="a CLIP-ADA model trained on OBJECT ('magnetic tile' or 'steel strip'); repeatable")
    parser.add_argument("--image-size", type=int, default=224,
                        help="self-similarity input side (224: the numbers of session 16; the product uses 320)")
    parser.add_argument("--mirrors", action="store_true",
                        help="also match each patch in the image's mirror images (the product does; session 16 did not)")
    parser.add_argument("--out", type=Path, default=OUT)
    return parser.parse_args(argv)


def test_samples(root: Path, name: str):
    """(image, mask, label) of every test image of one object."""
    dataset = MVTecDataset(root, "test") if name == "magnetic tile" else IndexMaskDataset(root, "test")
    for index in range(len(dataset)):
        sample = dataset[index]
        yield as_array(sample), sample.mask.numpy(), int(sample.label)


def standardised(maps: list[np.ndarray]) -> list[np.ndarray]:
    """Maps in standard deviations of all their pixels (every 17th pixel sampled: the mean and spread only)."""
    values = np.concatenate([m.ravel()[::17] for m in maps]).astype(np.float64)
    mean, std = values.mean(), values.std()
    return [((m - mean) / std).astype(np.float32) for m in maps]


def logit(maps: list[np.ndarray]) -> list[np.ndarray]:
    return [np.log(np.clip(m, 1e-4, 1 - 1e-4) / (1 - np.clip(m, 1e-4, 1 - 1e-4))).astype(np.float32) for m in maps]


def metrics(name: str, maps, masks, labels, scores=None) -> dict:
    """Pixel AUROC; image AUROC of `scores` (default: each map's maximum) on magnetic tile."""
    out = {"pixel_auroc": round(pixel_auroc(masks, maps), 4)}
    if name == "magnetic tile":  # every steel strip test image is defective: no image AUROC there
        out["image_auroc"] = round(image_auroc(labels, [m.max() for m in maps] if scores is None else scores), 4)
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    models = dict(spec.split("=", 1) for spec in args.clip_ada)
    similarity = SelfSimilarity("offline:efficientnet_lite0", image_size=args.image_size, mirrors=args.mirrors)
    report = {"machine": machine_description(), "subset": False, "seeds": "none (nothing random)", "objects": {}}
    for name, folder in OBJECTS.items():
        started = time.perf_counter()
        others = {trained: ClipADA.from_pretrained(path) for trained, path in models.items() if trained != name}
        self_maps, masks, labels = [], [], []
        clip_maps, clip_scores = {t: [] for t in others}, {t: [] for t in others}
        for image, mask, label in test_samples(args.data_root / folder, name):
            self_maps.append(similarity.map(image))
            for trained, model in others.items():
                result = model.predict([image])[0]
                clip_maps[trained].append(result.anomaly_map.astype(np.float32))
                clip_scores[trained].append(result.score)  # CLIP-ADA's own image score
            masks.append(mask), labels.append(label)
        row = {"test_images": len(masks), "self_similarity": metrics(name, self_maps, masks, labels)}
        for trained, maps in clip_maps.items():
            combined = [a + b for a, b in zip(standardised(self_maps), standardised(logit(maps)))]
            row[f"clip_ada_trained_on_{trained}"] = metrics(name, maps, masks, labels, clip_scores[trained])
            row[f"clip_ada_trained_on_{trained}_plus_self_similarity"] = metrics(name, combined, masks, labels)
        row["seconds"] = round(time.perf_counter() - started, 1)
        report["objects"][name] = row
        print(json.dumps({name: row}), flush=True)
    write_json_atomic(args.out, report)
    return report


if __name__ == "__main__":
    main()
