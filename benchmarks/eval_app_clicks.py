"""How often the app names a defect right when a user clicks on it (the product path, not the region masks).

Usage:
    python benchmarks/eval_app_clicks.py --regions outputs/magnetic_tile_regions [--models demo/default] \
        [--split test] [--inference default|exact] [--output benchmarks/results/app_clicks.json]

`eval_describer.py` hands the describer each region's true mask. A user of the app has no mask: the app
scores the upload, and a click selects the predicted region under (or near) it, else a disk around it
(`InspectionPipeline.describe_click`: a predicted region is flagged by the scorer, so it is named among
the defect types only; "no defect" is a possible answer for a disk). Here every held-out image of the split
is scored as an upload, each of its regions is clicked at its pixel nearest the region's centroid (the point
`scripts/make_examples.py` uses), and each image once at its clean point (farthest from every defect and the
border). Reported: top-1 per defect type and over all regions, the defect clicks answered "no defect", the
clean clicks answered "no defect", and the defect clicks split by what the click selected (a predicted
region or a disk).
`--inference exact` scores with the exact float32 path (a GPU's, or a CPU without AMX).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from make_examples import clean_point, point_on, to_uint8  # noqa: E402  (the examples' own click points)

from defectclip.captions import NO_DEFECT  # noqa: E402
from defectclip.region_dataset import iter_region_records  # noqa: E402
from eval_describer import machine  # noqa: E402
from machine import write_result  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regions", type=Path, required=True, help="split-mask caption dataset of one object")
    parser.add_argument("--models", type=Path, default=ROOT / "demo" / "default", help="the app's models folder")
    parser.add_argument("--split", default="test", help="held-out split whose images are uploaded")
    parser.add_argument("--inference", choices=("default", "exact"), default="default",
                        help="the scorer's path: this CPU's default, or exact float32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--output", type=Path, default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def top_answer(pipeline, session, xy) -> tuple[str, str]:
    """The app's top caption at a click, and what the click selected: a predicted region or a disk.

    The pipeline call the app's click handler makes (`demo.handlers.describe_point`), without its drawing.
    """
    _region, index, ranked = pipeline.describe_click(session.image, session.result, *xy, session.object_name,
                                                     session.threshold)
    return ranked[0][0], "disk" if index is None else "predicted_region"


def click_image(pipeline, model: str, image: np.ndarray, points: list[tuple[int, int]]) -> list[tuple[str, str]]:
    """The app's (top caption, selection) at each point of one uploaded image."""
    from PIL import Image

    from demo import handlers

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "upload.png"
        Image.fromarray(image).save(path)
        session = handlers.Session()
        handlers.score_upload(pipeline, session, str(path), model)
        return [top_answer(pipeline, session, xy) for xy in points]


def main(argv=None) -> dict:
    from defectclip.pipeline import InspectionPipeline

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    pipeline = InspectionPipeline.from_pretrained(args.models)
    model = pipeline.model_names[0]
    if args.inference == "exact":
        pipeline.model(model).scorer.inference = "exact"
    right, total, said_none = Counter(), Counter(), Counter()
    selection_right, selection_total = Counter(), Counter()
    clean_right = clean_total = 0
    for record in iter_region_records(args.regions, args.split, include_normal=True):
        image = to_uint8(record)
        defects = record.masks.any(axis=0) if len(record.masks) else np.zeros(image.shape[:2], bool)
        points = [point_on(mask) for mask in record.masks] + [clean_point(defects)]
        *defect_answers, (clean_answer, _) = click_image(pipeline, model, image, points)
        for defect, caption, (answer, selection) in zip(record.defects, record.captions, defect_answers):
            total[defect] += 1
            right[defect] += answer == caption
            said_none[defect] += answer.startswith(NO_DEFECT)
            selection_total[selection] += 1
            selection_right[selection] += answer == caption
        clean_right += clean_answer.startswith(NO_DEFECT)
        clean_total += 1
    regions = sum(total.values())
    if not regions:
        raise SystemExit(f"{args.regions} has no regions in its {args.split!r} split.")
    result = {
        "bench": "app_clicks", "object": record.object, "models": str(args.models), "split": args.split,
        "inference": args.inference, "defect_click_top1": round(sum(right.values()) / regions, 4),
        "defect_click_answered_no_defect": round(sum(said_none.values()) / regions, 4),
        "clean_click_no_defect": round(clean_right / clean_total, 4),
        "by_type": {t: {"right": right[t], "no_defect": said_none[t], "regions": total[t]} for t in sorted(total)},
        "by_selection": {k: {"right": selection_right[k], "regions": selection_total[k]} for k in sorted(selection_total)},
        "counts": {"images": clean_total, "regions": regions},
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
    }
    print(json.dumps(result), flush=True)
    if args.output is not None:
        write_result(args.output, result)
    return result


if __name__ == "__main__":
    main()
