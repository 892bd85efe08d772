"""What the reference-free mode's parts cost: one image's `ClipADA.predict`, as shipped and with a part taken out.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/bench_reference_free.py      # ~1 min, one thread

The embedded default's head (demo/default/clip_ada) as shipped (CLIP-ADA's map averaged over the image's
`flip_views` mirror images, each a pass of the head at 224 px; blended: the image and its two mirror images
through the vision tower at 320 px, then every patch against every other), the same head with one view
(blend kept), and with the blend switched off (views kept). 20 magnetic tile test images (their own sizes, up to ~600 px) and 20 steel strip test images
(200 x 200), each predicted alone as the app does, after two warm-up calls. Then the app's own upload path
(`demo.handlers.score_upload` in reference-free mode: read, score, overlay, outlines) on the 20 tile files,
against the 300 ms upload -> heatmap target of app_latency.md. Writes
benchmarks/results/reference_free_latency.json (p50 / p90 in ms, the machine named).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_backbones import machine_description  # noqa: E402  (benchmarks/ is not a package)
from eval_clip_ada_transfer import SHARED, as_array  # noqa: E402

from defectclip.clip_ada import ClipADA  # noqa: E402
from defectclip.data import IndexMaskDataset, MVTecDataset  # noqa: E402
from defectclip.io import write_json_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "results" / "reference_free_latency.json"


def sample_images(count: int = 20) -> list[np.ndarray]:
    tiles = MVTecDataset(SHARED / "magnetic_tile", "test")
    steel = IndexMaskDataset(SHARED / "neu_seg", "test")
    return ([as_array(tiles[int(i)]) for i in np.linspace(0, len(tiles) - 1, count).round()]
            + [as_array(steel[int(i)]) for i in np.linspace(0, len(steel) - 1, count).round()])


def timed(model: ClipADA, images: list[np.ndarray]) -> dict:
    model.predict(images[:2])  # warm-up: the lazily built self-similarity scorer, allocator caches
    seconds = []
    for image in images:
        started = time.perf_counter()
        model.predict([image])
        seconds.append(time.perf_counter() - started)
    return {"p50_ms": round(1000 * float(np.median(seconds)), 1), "p90_ms": round(1000 * float(np.quantile(seconds, 0.9)), 1)}


def timed_uploads(paths: list[Path]) -> dict:
    """Upload -> heatmap through the app's handler, reference-free mode, the shipped default."""
    from defectclip.pipeline import REFERENCE_FREE, InspectionPipeline
    from demo import handlers

    pipeline = InspectionPipeline.from_pretrained(ROOT / "demo" / "default")
    session = handlers.Session()
    handlers.score_upload(pipeline, session, str(paths[0]), REFERENCE_FREE, object_choice="magnetic tile")  # warm-up
    seconds = []
    for path in paths:
        started = time.perf_counter()
        handlers.score_upload(pipeline, session, str(path), REFERENCE_FREE, object_choice="magnetic tile")
        seconds.append(time.perf_counter() - started)
    return {"p50_ms": round(1000 * float(np.median(seconds)), 1), "p90_ms": round(1000 * float(np.quantile(seconds, 0.9)), 1)}


def main() -> dict:
    torch.set_num_threads(1)
    shipped = ClipADA.from_pretrained(ROOT / "demo" / "default" / "clip_ada")
    plain = copy.deepcopy(shipped)
    plain.config.self_similarity = None
    one_view = copy.deepcopy(shipped)
    one_view.config.flip_views = 1
    images = sample_images()
    report = {"machine": machine_description(), "images": len(images),
              "blend": shipped.config.self_similarity, "flip_views": shipped.config.flip_views,
              "shipped_with_blend": timed(shipped, images), "same_head_one_view": timed(one_view, images),
              "same_head_without_blend": timed(plain, images)}
    tiles = MVTecDataset(SHARED / "magnetic_tile", "test").refs
    report["app_upload_to_heatmap"] = timed_uploads([tiles[int(i)].image_path for i in np.linspace(0, len(tiles) - 1, 20).round()])
    print(json.dumps(report), flush=True)
    write_json_atomic(OUT, report)
    return report


if __name__ == "__main__":
    main()
