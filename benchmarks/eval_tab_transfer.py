"""Does a TAB trunk transfer? Leave-one-object-out on a full data set, against its ImageNet start.

    python benchmarks/eval_tab_transfer.py --data ../shared/data/magnetic_tile \\
        --imagenet offline:efficientnet_lite0 --unseen local-dir:/work/build20/unseen \\
        --seen local-dir:/work/build20/seen --seeds 0 1 2 3 4 --out benchmarks/results/tab_transfer

Three trunks are scored by benchmarks/eval_backbones.py with the same images, settings and seeds:
the ImageNet start, TAB pretrained WITHOUT the evaluated object (`--unseen`: what a user with a new
product gets) and TAB pretrained WITH it (`--seen`). Each trunk's run is kept as
`<cache>/<name>.json` and reused when its settings match (features are extracted once per trunk and
method and shared by the seeds; see eval_backbones), so a killed benchmark resumes trunk by trunk.
`--unseen` / `--seen` take one trunk per pretraining seed: their deltas then pool every (trunk,
evaluation seed) pair, since one pretraining run can move image AUROC by points (tab_transfer.md).

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

METRICS = {"image_auroc": "image", "pixel_auroc": "pixel"}
# Settings that change the numbers: a cached run is reused only if all of them match.
SETTINGS = ("data", "categories", "methods", "seeds", "image_size", "plan", "max_train", "max_test", "coreset_ratio", "padim_d")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="an MVTec-layout category folder (the held-out object)")
    parser.add_argument("--imagenet", default="offline:efficientnet_lite0", help="the start trunk's spec")
    parser.add_argument("--unseen", nargs="+", required=True,
                        help="TAB trunk pretrained without this object (spec); several = one per pretraining seed, pooled")
    parser.add_argument("--seen", nargs="+", default=None,
                        help="TAB trunk pretrained with this object (spec; optional); several are pooled as for --unseen")
    parser.add_argument("--extra", nargs="*", default=[], metavar="NAME=SPEC",
                        help="more trunks to score against ImageNet, reported as <NAME>_delta (e.g. a run at alpha 1)")
    parser.add_argument("--candidates", nargs="*", default=[], metavar="NAME=FOLDER",
                        help="other pretraining runs compared on their validation only (their tab_config.json)")
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


def same_weights(spec: str, other: str) -> bool:
    """True when two specs build trunks with identical tensors (e.g. a WiSE choice of alpha = 0)."""
    from defectclip.towers import build_vision_tower

    mine, theirs = build_vision_tower(spec).state_dict(), build_vision_tower(other).state_dict()
    return mine.keys() == theirs.keys() and all(mine[k].shape == theirs[k].shape and bool((mine[k] == theirs[k]).all())
                                                for k in mine)


def trunk_report(spec: str, name: str, args: argparse.Namespace, imagenet: dict) -> dict:
    """A trunk whose weights are the start's, tensor for tensor, has the start's numbers: reuse them
    (and say so) instead of spending a CPU quarter-hour to measure the same features again."""
    if same_weights(spec, args.imagenet):
        print(f"{name}: {spec} has exactly the weights of {args.imagenet}; its numbers are the start's", flush=True)
        return {**imagenet, "identical_to_imagenet": True}
    return cached_run(spec, name, args)


def run_facts(spec: str) -> dict | None:
    """How a local TAB trunk was pretrained: its tab_config.json recipe and metrics.json cost."""
    if not spec.startswith("local-dir:"):
        return None
    folder = Path(spec.split(":", 1)[1])
    facts = {}
    if (folder / "tab_config.json").is_file():
        config = json.loads((folder / "tab_config.json").read_text())
        facts.update(objects=config["objects"], loss=config["loss"], synthesis=config["synthesis"],
                     image_size=config["image_size"], recipe=config.get("recipe", {}))
    if (folder / "metrics.json").is_file():
        metrics = json.loads((folder / "metrics.json").read_text())
        facts.update({k: metrics.get(k) for k in ("steps", "wall_seconds", "images_per_second", "first_loss", "final_loss")})
    return facts or None


def named(pairs: Sequence[str], flag: str) -> dict[str, str]:
    out = {}
    for text in pairs:
        name, sep, value = text.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"{flag} {text!r}: expected NAME=VALUE")
        out[name] = value
    return out


def per_seed(report: dict, method: str, metric: str) -> dict[int, float]:
    return {r["seed"]: r[metric] for r in report["runs"] if r["method"] == method and r[metric] is not None}


def paired_delta(trunk: dict, start: dict, method: str, metric: str) -> dict | None:
    """Mean and spread over seeds of (trunk - start), in AUROC points (percent)."""
    pooled = pooled_delta([trunk], start, method, metric)
    return None if pooled is None else {k: pooled[k] for k in ("mean", "std", "seeds")}


def pooled_delta(trunks: Sequence[dict], start: dict, method: str, metric: str) -> dict | None:
    """(trunk - start) over every pretraining run and every evaluation seed, in AUROC points: the
    spread then holds what the pretraining seed moves, which one trunk's evaluation seeds never show."""
    base, diffs, seeds = per_seed(start, method, metric), [], set()
    for trunk in trunks:
        mine = per_seed(trunk, method, metric)
        common = sorted(set(mine) & set(base))
        diffs += [100 * (mine[s] - base[s]) for s in common]
        seeds.update(common)
    if not diffs:
        return None
    return {"mean": round(statistics.fmean(diffs), 3), "std": round(statistics.pstdev(diffs), 3) if len(diffs) > 1 else 0.0,
            "seeds": sorted(seeds), "trunks": len(trunks), "pairs": len(diffs)}


def pooled_absolute(trunks: Sequence[dict], method: str, metric: str) -> dict | None:
    values = [v for trunk in trunks for v in per_seed(trunk, method, metric).values()]
    if not values:
        return None
    return {"mean": round(100 * statistics.fmean(values), 3),
            "std": round(100 * statistics.pstdev(values), 3) if len(values) > 1 else 0.0}


def role_members(role: str, specs: Sequence[str]) -> dict[str, str]:
    """One trunk keeps the role's name (and its cache file); several are <role>_s0, <role>_s1, ..."""
    if len(specs) == 1:
        return {role: specs[0]}
    return {f"{role}_s{i}": spec for i, spec in enumerate(specs)}


def absolute(report: dict, method: str, metric: str) -> dict | None:
    return pooled_absolute([report], method, metric)


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
    fmt = lambda c: "n/a" if c is None else f"{c['mean']:.2f} ± {c['std']:.2f}"  # noqa: E731
    sign = lambda c: "–" if c is None else f"{c['mean']:+.2f} ± {c['std']:.2f}"  # noqa: E731
    for name in result["trunks"]:
        for method in result["methods"]:
            cells = result["absolute"][name][method]
            delta = result.get(f"{name}_delta", {}).get(method, {})
            lines.append(f"| {name} (`{result['trunks'][name]}`) | {method} | {fmt(cells['image'])} | {fmt(cells['pixel'])} "
                         f"| {sign(delta.get('image'))} | {sign(delta.get('pixel'))} |")
    for role, members in result.get("pooled", {}).items():
        for method in result["methods"]:
            cells, delta = result["absolute"][role][method], result[f"{role}_delta"][method]
            lines.append(f"| **{role}** (pooled: {', '.join(members)}) | {method} | {fmt(cells['image'])} | "
                         f"{fmt(cells['pixel'])} | {sign(delta.get('image'))} | {sign(delta.get('pixel'))} |")
    lines += ["", "Δ: per-seed difference to ImageNet (same seed), mean ± standard deviation over seeds"
              + ("; a pooled row: over every (pretraining run, evaluation seed) pair." if result.get("pooled") else ".")]
    for name in result["identical_to_imagenet"]:
        lines.append(f"`{name}` has exactly the ImageNet trunk's weights (its WiSE rule chose alpha = 0): its "
                     "numbers are the start's, Δ = 0 by construction.")
    lines += ["", "Pretraining (this CPU, one torch thread):", "",
              "| trunk | objects | steps | wall (s) | images/s | WiSE alpha (validation AUROC per alpha) |", "|---|---|---|---|---|---|"]
    for name, facts in {**result["pretraining"], **result["candidates"]}.items():
        wise = facts.get("recipe", {}).get("wise", {})
        lines.append(f"| {name} | {', '.join(facts.get('objects', []))} | {facts.get('steps')} | "
                     f"{facts.get('wall_seconds') or 0:.0f} | {facts.get('images_per_second') or 0:.1f} | "
                     f"{wise.get('alpha')} ({wise.get('validation_auroc')}) |")
    lines += ["",
              "Targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in result["targets_met"].items()), ""]
    return "\n".join(lines)


def pool_roles(result: dict, reports: dict, roles: dict[str, dict[str, str]], methods: Sequence[str]) -> None:
    """A role given several trunks (pretraining seeds) is judged on all of them together."""
    for role, members in roles.items():
        if len(members) < 2:
            continue
        trunks = [reports[name] for name in members]
        result[f"{role}_delta"] = {m: {label: pooled_delta(trunks, reports["imagenet"], m, metric)
                                       for metric, label in METRICS.items()} for m in methods}
        result["absolute"][role] = {m: {label: pooled_absolute(trunks, m, metric) for metric, label in METRICS.items()}
                                    for m in methods}
        result.setdefault("pooled", {})[role] = list(members)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    roles = {"unseen": role_members("unseen", args.unseen), **({"seen": role_members("seen", args.seen)} if args.seen else {})}
    specs = {"imagenet": args.imagenet, **{name: spec for members in roles.values() for name, spec in members.items()}}
    extra = named(args.extra, "--extra")
    if clash := sorted(set(extra) & (set(specs) | set(roles))):
        raise SystemExit(f"--extra names {clash} are taken by the start or the unseen/seen trunks; rename them.")
    specs.update(extra)
    reports = {"imagenet": cached_run(args.imagenet, "imagenet", args)}
    for name, spec in list(specs.items())[1:]:
        reports[name] = trunk_report(spec, name, args, reports["imagenet"])
    first = reports["imagenet"]["runs"][0]
    result = {
        "data": args.data, "machine": reports["imagenet"]["machine"], "seeds": args.seeds, "methods": args.methods,
        "image_size": args.image_size, "plan": args.plan, "coreset_ratio": args.coreset_ratio,
        "images": f"{first['num_train']} train / {first['num_test']} test"
                  + (" (a subset)" if args.max_train or args.max_test else " (full data set)"),
        "trunks": specs,
        **{f"{name}_delta": deltas(report, reports["imagenet"], args.methods)
           for name, report in reports.items() if name != "imagenet"},
        "identical_to_imagenet": [name for name, r in reports.items() if r.get("identical_to_imagenet")],
        "pretraining": {name: run_facts(spec) for name, spec in specs.items() if run_facts(spec)},
        "candidates": {name: run_facts(f"local-dir:{folder}") for name, folder in named(args.candidates, "--candidates").items()},
        "absolute": {name: {m: {label: absolute(r, m, metric) for metric, label in METRICS.items()} for m in args.methods}
                     for name, r in reports.items()},
        "eval_wall_s": {name: round(r["wall_s"], 1) for name, r in reports.items() if not r.get("identical_to_imagenet")},
        "wall_s_this_call": round(time.perf_counter() - started, 1),
    }
    pool_roles(result, reports, roles, args.methods)
    result["targets_met"] = targets_met(result, args.methods)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out.with_suffix(".json"), result)
    out.with_suffix(".md").write_text(markdown(result))
    print(json.dumps({k: result[k] for k in ("unseen_delta", "seen_delta", "targets_met") if k in result}))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
