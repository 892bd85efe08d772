"""Reference-free: does averaging CLIP-ADA's map over mirror images of the input help? (a lead for #15)

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/probe_clip_ada_flips.py [OUT.json]   # ~18 min, one thread

The embedded default's head (demo/default/clip_ada: trained on magnetic tile and generated textures, blended
with self-similarity). Each test image's CLIP-ADA probability map is made for the image and its mirror images
(left-right; and top-bottom and both, for four views; and the four transposed, for eight: session 20), each
mirrored back, and averaged; the blend (its saved statistics, fitted on maps of the head's own `flip_views`:
not refitted here) then adds the image's self-similarity map as predict does. Full test sets: magnetic tile (709 images, its own object: image and pixel AUROC, maps at
half resolution) and steel strip (840 images, never seen: pixel AUROC). Built in since (session 20: the config's
`flip_views`, with the blend and threshold fitted on averaged maps); this probe keeps the saved blend as it is.
Writes benchmarks/results/clip_ada_flip_probe.json (session 18, one to four views, single-view blend), or OUT.json.
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

from defectclip.clip_ada import ClipADA, mirror, unmirror  # noqa: E402
from defectclip.data import IndexMaskDataset, MVTecDataset  # noqa: E402
from defectclip.io import write_json_atomic  # noqa: E402
from defectclip.metrics import image_auroc, pixel_auroc  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "demo" / "default" / "clip_ada"
OUT = Path(__file__).resolve().parent / "results" / "clip_ada_flip_probe.json"
FLIPS = {"one view": 1, "two views (left-right)": 2, "four views (all mirrors)": 4,
         "eight views (mirrors, and the same transposed)": 8}


def blended_maps(model: ClipADA, image: np.ndarray) -> dict[str, np.ndarray]:
    """The blended map of one image for each number of averaged views."""
    views = max(FLIPS.values())
    maps = model.clip_maps([mirror(image, view) for view in range(views)])
    back = [unmirror(m, view) for view, m in zip(range(views), maps)]
    own = model.similarity(model.blend.image_size, model.blend.mirrors).map(image)
    return {name: model.blend.blend(np.mean(back[:count], axis=0), own) for name, count in FLIPS.items()}


def magnetic_tile(model: ClipADA) -> dict:
    dataset = MVTecDataset(SHARED / "magnetic_tile", "test")
    maps, masks, labels = {name: [] for name in FLIPS}, [], []
    for index in range(len(dataset)):
        sample = dataset[index]
        for name, blended in blended_maps(model, as_array(sample)).items():
            maps[name].append(blended[::2, ::2])
        masks.append(sample.mask.numpy()[::2, ::2]), labels.append(int(sample.label))
    return {"test_images": len(labels), **{
        name: {"image_auroc": round(image_auroc(labels, [model.image_score(m) for m in found]), 4),
               "pixel_auroc": round(pixel_auroc(masks, found), 4)} for name, found in maps.items()}}


def steel_strip(model: ClipADA) -> dict:
    dataset = IndexMaskDataset(SHARED / "neu_seg", "test")
    maps, masks = {name: [] for name in FLIPS}, []
    for index in range(len(dataset)):
        sample = dataset[index]
        for name, blended in blended_maps(model, as_array(sample)).items():
            maps[name].append(blended)
        masks.append(sample.mask.numpy())
    return {"test_images": len(masks), **{name: {"pixel_auroc": round(pixel_auroc(masks, found), 4)}
                                          for name, found in maps.items()}}


def main() -> dict:
    torch.set_num_threads(1)
    model = ClipADA.from_pretrained(MODEL)
    model.config.flip_views = 1  # the views are averaged here; the head's own setting (8 since session 20) would repeat it
    started = time.perf_counter()
    report = {"machine": machine_description(), "subset": False, "model": "demo/default/clip_ada",
              "magnetic tile (its own object)": magnetic_tile(model), "steel strip (never seen)": steel_strip(model)}
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report), flush=True)
    write_json_atomic(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT, report)
    return report


if __name__ == "__main__":
    main()
