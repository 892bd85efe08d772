"""How often the app's "unlike the training data" warning fires: on the model's own object and on another.

The rule (demo/handlers.py, UNFAMILIAR_AREA_FRACTION): warn when at least half of the image scores above the
model's threshold. It is a rule, not a tuned number: a defect is by definition a minority of a surface.
This measures it with the embedded default's magnetic-tile model on
  - magnetic_tile test images (good and defective): the warning should be rare (a false alarm),
  - neu_seg test images (steel strip, another object): the warning should be common.
Prints JSON lines and writes benchmarks/results/app_warning.json. Usage:
  python benchmarks/bench_app_warning.py [--models demo/default] [--limit N] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "app_warning.json"


def image_sets(limit: int | None) -> dict[str, list[Path]]:
    tile = DATA / "magnetic_tile" / "test"
    sets = {
        "magnetic_tile test good": sorted((tile / "good").glob("*.png")),
        "magnetic_tile test defective": sorted(p for d in tile.iterdir() if d.name != "good" for p in d.glob("*.png")),
        "neu_seg test (steel strip)": sorted((DATA / "neu_seg" / "images" / "test").glob("*.jpg")),
    }
    return {name: paths[:limit] if limit else paths for name, paths in sets.items()}


def warning_rate(pipeline, model: str, paths: list[Path]) -> dict:
    from demo.handlers import unfamiliar_warning

    warned, fractions = 0, []
    for path in paths:
        result = pipeline.score(np.asarray(Image.open(path).convert("RGB")), model)
        fractions.append(float(np.mean(result.anomaly_map >= result.threshold)))
        warned += bool(unfamiliar_warning(result, "magnetic tile"))
    return {"images": len(paths), "warned": warned, "rate": round(warned / max(len(paths), 1), 4),
            "area_above_threshold_median": round(float(np.median(fractions)), 3),
            "area_above_threshold_p90": round(float(np.quantile(fractions, 0.9)), 3)}


def main(argv=None) -> int:
    from defectclip.pipeline import InspectionPipeline
    from demo.models import EMBEDDED_DEFAULT

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=EMBEDDED_DEFAULT, help="pipeline folder to load")
    parser.add_argument("--limit", type=int, default=None, help="at most this many images per set (a subset)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipeline = InspectionPipeline.from_pretrained(args.models)
    model = pipeline.model_names[0]
    results = {"model": model, "rule": "warn when >= 50% of the image scores above the model's threshold",
               "subset": args.limit is not None, "sets": {}}
    start = time.perf_counter()
    for name, paths in image_sets(args.limit).items():
        results["sets"][name] = warning_rate(pipeline, model, paths)
        print(json.dumps({name: results["sets"][name]}), flush=True)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
