"""Time and peak memory of every hostile-input case (issue 17), one JSON line per entry point.

Runs the corpus of tests/test_hostile_inputs.py (generated into a temporary folder) through the same
entry points and reports, per entry point: cases, outcomes, the slowest case and the largest memory
rise. The test asserts the limits (10 s, 1 GB, no silent or foreign result); this records the numbers.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_hostile_inputs.py [--out benchmarks/results/hostile_inputs.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import test_hostile_inputs as corpus  # noqa: E402  (the corpus lives with its test)
from hostile_corpus import Item, run_case  # noqa: E402
from machine import cpu_model  # noqa: E402  (benchmarks/ is on sys.path: the script is run by path)


def build_models(folder: Path):
    from conftest import textured_image
    from defectclip.pipeline import InspectionModel, InspectionPipeline
    from defectclip.scoring import PaDiM, PatchCore

    rng = np.random.default_rng(0)
    scorer = PatchCore("tiny:cnn", image_size=64, coreset_ratio=0.5, device="cpu")
    scorer.fit([textured_image(rng, (64, 64)) for _ in range(4)])
    scorer.calibrate([textured_image(rng, (64, 64)) for _ in range(3)])
    pipeline = InspectionPipeline({corpus.MODEL: InspectionModel(corpus.MODEL, corpus.OBJECT, "patchcore", scorer)},
                                  few_shot_tower="tiny:cnn", few_shot_image_size=64)
    padim = PaDiM(scorer.tower, image_size=64, device="cpu").fit([textured_image(rng, (64, 64)) for _ in range(3)])
    scorer.tower.save_pretrained(folder / "tower")
    return scorer, pipeline, scorer.save_pretrained(folder / "patchcore"), padim.save_pretrained(folder / "padim"), folder / "tower"


def file_cases(folder: Path, scorer, pipeline):
    from defectclip.data import load_image, load_image_array
    from demo.render import read_upload

    entries = {
        "load_image": load_image,
        "scorer.predict(path)": lambda path: scorer.predict(path)[0],
        "pipeline.score": lambda path: pipeline.score(load_image_array(path), corpus.MODEL),
        "app read_upload + score": lambda path: pipeline.score(read_upload(path), corpus.MODEL),
        "fit_few_shot": lambda path: pipeline.fit_few_shot([read_upload(path)], corpus.OBJECT),
    }
    for item in corpus.hostile_files(folder / "files"):
        for entry, call in entries.items():
            array_stage = entry != "load_image" and entry != "scorer.predict(path)"
            yield "files", run_case(Item(item.name, item.value, item.expect, None, item.names, array_stage), entry, call)


def array_cases(scorer, pipeline):
    from defectclip.scoring import PatchCore

    fresh = PatchCore(scorer.tower, image_size=64, coreset_ratio=1.0, device="cpu")
    entries = {
        "scorer.predict(array/tensor)": lambda x: scorer.predict(x)[0],
        "PatchCore.fit(array/tensor)": lambda x: fresh.fit(x).predict([torch.rand(3, 64, 64)])[0],
    }
    for item in corpus.hostile_arrays():
        for entry, call in entries.items():
            yield "arrays", run_case(item, entry, call)


def dataset_cases(folder: Path):
    from defectclip.data import open_dataset

    for item, split in corpus.hostile_datasets(folder / "datasets"):
        yield "datasets", run_case(item, "open_dataset + read",
                                   lambda root, split=split: [s for s in open_dataset(root, split)])


def artifact_cases(folder: Path, patchcore_dir: Path, padim_dir: Path, tower_dir: Path):
    from defectclip.pipeline import InspectionPipeline
    from defectclip.scoring import FeatureScorer

    marker, image = folder / "EXECUTED", torch.rand(3, 64, 64)
    for item in corpus.hostile_artifacts(folder / "scorers", patchcore_dir, padim_dir, marker):
        yield "artifacts", run_case(item, "load_scorer + predict", lambda f: FeatureScorer.from_pretrained(f).predict([image])[0])

    def pipeline_score(root):
        pipeline = InspectionPipeline.from_pretrained(root)
        return pipeline.score(corpus.noise(), pipeline.model_names[0])

    for item in corpus.pipeline_roots(folder / "roots", patchcore_dir, tower_dir, marker):
        yield "artifacts", run_case(item, "InspectionPipeline.from_folder + score", pipeline_score)
    for item in corpus.clip_ada_artifacts(folder / "clip_ada"):
        yield "artifacts", run_case(item, "ClipADA.load", corpus.clip_ada_load)


def summarise(results) -> list[dict]:
    groups = defaultdict(list)
    for group, outcome in results:
        groups[(group, outcome.entry)].append(outcome)
    rows = []
    for (group, entry), outcomes in groups.items():
        kinds = defaultdict(int)
        for outcome in outcomes:
            kinds[outcome.kind] += 1
        slowest = max(outcomes, key=lambda o: o.seconds)
        largest = max(outcomes, key=lambda o: o.peak_bytes)
        rows.append({
            "group": group, "entry_point": entry, "cases": len(outcomes), "outcomes": dict(kinds),
            "failed": sum(o.failed for o in outcomes),
            "max_seconds": round(slowest.seconds, 3), "slowest_case": slowest.item,
            "max_peak_mb": round(largest.peak_bytes / 2**20, 1), "largest_case": largest.item,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hostile_inputs.json",
                        help="where to write the JSON results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        folder = Path(tmp)
        scorer, pipeline, patchcore_dir, padim_dir, tower_dir = build_models(folder / "models")
        results = [*file_cases(folder, scorer, pipeline), *array_cases(scorer, pipeline),
                   *dataset_cases(folder), *artifact_cases(folder, patchcore_dir, padim_dir, tower_dir)]
    rows = summarise(results)
    for row in rows:
        print(json.dumps(row))
    items = {(group, o.item) for group, o in results}
    report = {
        "machine": f"2-core CPU dev machine, {cpu_model()}, one torch thread",
        # The machine is shared with other engineers' jobs: the load says how busy it was.
        "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],
        "items": len(items), "cases": len(results), "failed": sum(o.failed for _, o in results),
        "wall_seconds": round(time.perf_counter() - started, 1), "entry_points": rows,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "entry_points"}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
