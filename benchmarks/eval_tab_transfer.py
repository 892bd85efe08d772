"""Does a TAB trunk transfer? Leave-one-object-out on a full data set, against its ImageNet start.

    python benchmarks/eval_tab_transfer.py --data ../shared/data/magnetic_tile \\
        --imagenet offline:efficientnet_lite0 --unseen local-dir:/work/build20/unseen \\
        --seen local-dir:/work/build20/seen --seeds 0 1 2 3 4 --out benchmarks/results/tab_transfer

Three trunks are scored by benchmarks/eval_backbones.py with the same images, settings and seeds:
the ImageNet start, TAB pretrained WITHOUT the evaluated object (`--unseen`: what a user with a new
product gets) and TAB pretrained WITH it (`--seen`). Each trunk's run is kept as
`<cache>/<name>.json` and reused when its settings match (features are extracted once per trunk and
method and shared by the seeds; see eval_backbones), so a killed benchmark resumes trunk by trunk.

Writes `<out>.json`: for each of `unseen_delta` and `seen_delta`, per method, the image and pixel
AUROC difference to ImageNet, paired by seed (same coreset start / PaDiM channel draw), as mean and
standard deviation over the seeds, plus every trunk's absolute numbers and the machine; and `<out>.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: import the sibling benchmark
import eval_backbones  # noqa: E402

from defectclip.io import write_json_atomic  # noqa: E402

TRUNKS = ("imagenet", "unseen", "seen")
METRICS = {"image_auroc": "image", "pixel_auroc": "pixel"}
# Settings that change the numbers: a cached run is reused only if all of them match.
SETTINGS = ("data", "categories", "methods", "seeds", "image_size", "plan", "max_train", "max_test", "coreset_ratio", "padim_d")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="an MVTec-layout category folder (the held-out object)")
    parser.add_argument("--imagenet", default="offline:efficientnet_lite0", help="the start trunk's spec")
    parser.add_argument("--unseen", required=True, help="TAB trunk pretrained without this object (spec)")
    parser.add_argument("--seen", default=None, help="TAB trunk pretrained with this object (spec; optional)")
    parser.add_argument("--methods", nargs="+", default=["patchcore", "padim"], help="scoring methods")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="seeds")
    parser.add_argument("--image-size", type=int, default=224, help="model input size")
    parser.add_argument("--plan", default="resize", help="input plan, as eval_backbones.py")
    parser.add_argument("--coreset-ratio", type=float, default=0.01, help="PatchCore memory bank fraction")
    parser.add_argument("--max-train", type=int, default=None, help="cap on train images (a subset is labelled so)")
    parser.add_argument("--max-test", type=int, default=None, help="cap on test images (a subset is labelled so)")
    parser.add_argument("--cache", default="runs/tab_transfer", help="folder keeping each trunk's eval_backbones run")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda'")
    parser.add_argument("--out", default="runs/tab_transfer", help="output prefix for .json and .md")
    return parser.parse_args(argv)


def backbone_argv(spec: str, args: argparse.Namespace, out: Path) -> list[str]:
    argv = ["--data", args.data, "--towers", spec, "--methods", *args.methods, "--seeds", *map(str, args.seeds),
            "--image-size", str(args.image_size), "--plan", args.plan, "--coreset-ratio", str(args.coreset_ratio),
            "--threads", str(args.threads), "--device", args.device, "--out", str(out)]
    for flag, value in (("--max-train", args.max_train), ("--max-test", args.max_test)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def cached_run(spec: str, name: str, args: argparse.Namespace) -> dict:
    """eval_backbones' report for one trunk, from the cache when the same trunk and settings were run."""
    out = Path(args.cache) / name
    argv = backbone_argv(spec, args, out)
    wanted = vars(eval_backbones.parse_args(argv))
    path = out.with_suffix(".json")
    if path.is_file():
        report = json.loads(path.read_text())
        if report["args"]["towers"] == [spec] and all(report["args"].get(k) == wanted[k] for k in SETTINGS):
            print(f"{name}: reusing {path}", flush=True)
            return report
    print(f"{name}: running eval_backbones on {spec}", flush=True)
    return eval_backbones.main(argv)


def per_seed(report: dict, method: str, metric: str) -> dict[int, float]:
    return {r["seed"]: r[metric] for r in report["runs"] if r["method"] == method and r[metric] is not None}


def paired_delta(trunk: dict, start: dict, method: str, metric: str) -> dict | None:
    """Mean and spread over seeds of (trunk - start), in AUROC points (percent)."""
    mine, base = per_seed(trunk, method, metric), per_seed(start, method, metric)
    seeds = sorted(set(mine) & set(base))
    if not seeds:
        return None
    diffs = [100 * (mine[s] - base[s]) for s in seeds]
    return {"mean": round(statistics.fmean(diffs), 3),
            "std": round(statistics.pstdev(diffs), 3) if len(diffs) > 1 else 0.0, "seeds": seeds}


def absolute(report: dict, method: str, metric: str) -> dict | None:
    values = list(per_seed(report, method, metric).values())
    if not values:
        return None
    return {"mean": round(100 * statistics.fmean(values), 3),
            "std": round(100 * statistics.pstdev(values), 3) if len(values) > 1 else 0.0}


def deltas(trunk: dict, start: dict, methods: Sequence[str]) -> dict:
    return {method: {label: paired_delta(trunk, start, method, metric) for metric, label in METRICS.items()}
            for method in methods}


def targets_met(result: dict, methods: Sequence[str]) -> dict:
    """The issue's targets: unseen image and pixel deltas >= 0, seen image delta >= +1.5, per method."""
    met = {}
    for method in methods:
        unseen = result["unseen_delta"][method]
        met[f"unseen_{method}"] = all(unseen[k] is not None and unseen[k]["mean"] >= 0 for k in ("image", "pixel"))
        if "seen_delta" in result:
            seen = result["seen_delta"][method]["image"]
            met[f"seen_{method}"] = seen is not None and seen["mean"] >= 1.5
    return met


def markdown(result: dict) -> str:
    lines = ["<!-- generated by benchmarks/eval_tab_transfer.py -->", "",
             f"Held-out object: `{result['data']}` ({result['images']}), {result['image_size']} px, "
             f"seeds {result['seeds']}. Machine: {result['machine']}.", "",
             "| trunk | method | image AUROC (%) | pixel AUROC (%) | image Δ vs ImageNet | pixel Δ vs ImageNet |",
             "|---|---|---|---|---|---|"]
    for name in [t for t in TRUNKS if t in result["trunks"]]:
        for method in result["methods"]:
            cells = result["absolute"][name][method]
            delta = result.get(f"{name}_delta", {}).get(method, {})
            fmt = lambda c: "n/a" if c is None else f"{c['mean']:.2f} ± {c['std']:.2f}"  # noqa: E731
            sign = lambda c: "–" if c is None else f"{c['mean']:+.2f} ± {c['std']:.2f}"  # noqa: E731
            lines.append(f"| {name} (`{result['trunks'][name]}`) | {method} | {fmt(cells['image'])} | {fmt(cells['pixel'])} "
                         f"| {sign(delta.get('image'))} | {sign(delta.get('pixel'))} |")
    lines += ["", "Δ: per-seed difference to ImageNet (same seed), mean ± standard deviation over seeds.", "",
              "Targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in result["targets_met"].items()), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    specs = {"imagenet": args.imagenet, "unseen": args.unseen, **({"seen": args.seen} if args.seen else {})}
    reports = {name: cached_run(spec, name, args) for name, spec in specs.items()}
    first = reports["imagenet"]["runs"][0]
    result = {
        "data": args.data, "machine": reports["imagenet"]["machine"], "seeds": args.seeds, "methods": args.methods,
        "image_size": args.image_size, "plan": args.plan, "coreset_ratio": args.coreset_ratio,
        "images": f"{first['num_train']} train / {first['num_test']} test"
                  + (" (a subset)" if args.max_train or args.max_test else " (full data set)"),
        "trunks": specs,
        "unseen_delta": deltas(reports["unseen"], reports["imagenet"], args.methods),
        **({"seen_delta": deltas(reports["seen"], reports["imagenet"], args.methods)} if "seen" in reports else {}),
        "absolute": {name: {m: {label: absolute(r, m, metric) for metric, label in METRICS.items()} for m in args.methods}
                     for name, r in reports.items()},
        "eval_wall_s": {name: round(r["wall_s"], 1) for name, r in reports.items()},
        "wall_s_this_call": round(time.perf_counter() - started, 1),
    }
    result["targets_met"] = targets_met(result, args.methods)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out.with_suffix(".json"), result)
    out.with_suffix(".md").write_text(markdown(result))
    print(json.dumps({k: result[k] for k in ("unseen_delta", "seen_delta", "targets_met") if k in result}))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
