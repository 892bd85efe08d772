"""defectclip PatchCore side by side with anomalib 2.x's PatchCore: same images, input layout, weights,
layers and bank size.

anomalib is not a dependency of defectclip; install it in a separate environment that also sees
defectclip's packages (nothing is added to the project's environment), e.g.

    python3.11 -m venv /work/venv-anomalib
    echo "import site; site.addsitedir('<project venv>/lib/python3.11/site-packages')" \
        > /work/venv-anomalib/lib/python3.11/site-packages/zz_defectclip.pth
    /work/venv-anomalib/bin/pip install anomalib==2.7.0
    MALLOC_MMAP_THRESHOLD_=1048576 OMP_NUM_THREADS=1 PYTHONPATH=. /work/venv-anomalib/bin/python \
        benchmarks/vs_anomalib.py --data /path/to/magnetic_tile --threads 1

What is held equal:
- images: every image is resized once (defectclip's transform, the tower's bicubic resize) and the same
  tensors go to both; both are evaluated at the model resolution against masks resized (nearest) to it;
- input layout: both libraries' backbones get channels-last batches on the CPU (defectclip converts its
  input itself; anomalib's batches are converted by this script), so neither wins by memory layout;
- weights: the offline EfficientNet-Lite0 ImageNet state dict is loaded into anomalib's timm feature
  extractor (checked: both extractors return the same feature maps);
- layers, bank size (anomalib's coreset ratio is set so that it keeps as many entries as defectclip's
  default bank), fit and predict batch size, thread count. Fits alternate between the libraries
  (A, B for even seeds, B, A for odd ones) and predicts are timed in alternating rounds, so a load change
  on a shared machine hits both alike. Times are CPU time (`time.process_time`) and wall time; on a
  shared machine CPU time is the fairer one.
What each does its own way (which is the point of the comparison): the projection and the coreset
selection, the nearest-neighbour search, the maps, and the image score (anomalib: the paper's
reweighted score with 9 neighbours; defectclip: the smoothed map's maximum, its `reweight=True` is also
reported), and how the backbone runs at predict time (defectclip: a BatchNorm-folded copy, in bfloat16
on an AMX CPU; anomalib: the float32 model). defectclip's exact float32 path (the unfolded float32
tower and the float32 search) is run on the same bank (fit always uses the exact tower), so the
change the default path makes to the image AUROC is measured per seed in the same run. Predict is
compared with the float32 backbone both libraries share and with defectclip's own backbone alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_backbones import capped_test_indices, evenly_spaced  # noqa: E402
from machine import cpu_model  # noqa: E402

from defectclip.data import MVTecDataset, build_transform, resize  # noqa: E402
from defectclip.io import write_json_atomic  # noqa: E402
from defectclip.metrics import evaluate, image_auroc  # noqa: E402
from defectclip.scoring import PatchCore  # noqa: E402
from defectclip.scoring.inference import inference_tower  # noqa: E402
from defectclip.scoring.patchcore import CPU_BATCH_SIZE, DEFAULT_CORESET_RATIO, DEFAULT_MAX_BANK_SIZE  # noqa: E402
from defectclip.towers import OFFLINE_VISION, build_vision_tower  # noqa: E402

LAYERS = ["blocks.2", "blocks.4"]
APP_BATCH = 1  # the app scores one uploaded image per call
WARM_UP_STEPS = 3  # untimed k-center steps before a projected anomalib fit's timed ones


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="one MVTec AD category folder")
    parser.add_argument("--image-size", type=int, default=224, help="model input size (square), pixels")
    parser.add_argument("--max-train", type=int, default=None, help="cap on train/good images (evenly spaced); default all")
    parser.add_argument("--max-test", type=int, default=None, help="cap on test images (proportion kept); default all")
    parser.add_argument("--coreset-ratio", type=float, default=DEFAULT_CORESET_RATIO, help="defectclip's coreset ratio")
    parser.add_argument("--max-bank-size", type=int, default=DEFAULT_MAX_BANK_SIZE,
                        help="defectclip's bank cap; anomalib's ratio is then set to reach the same bank size")
    parser.add_argument("--batch-size", type=int, default=CPU_BATCH_SIZE, help="images per forward pass in fit and bulk predict, both libraries")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds for both libraries' projections and coreset starts; one fit of each per seed")
    parser.add_argument("--anomalib-seeds", type=int, default=None,
                        help="fit anomalib for only the first N seeds (its full-data fit takes tens of minutes); default all")
    parser.add_argument("--anomalib-fit-steps", type=int, default=0,
                        help="time only this many steps of anomalib's k-center loop and project its fit from them "
                             "(every step is one identical pass over all points); its bank is then defectclip's, for "
                             "predict timing only. 0 = run its whole fit (hours on a full category with one thread)")
    parser.add_argument("--anomalib-whole-fit", default=None,
                        help="JSON of an earlier run of this script (same data, size, batch and bank) in which "
                             "anomalib's fit ran whole (--anomalib-fit-steps 0): fit_speedup is then that run's "
                             "measured ratio instead of this run's projection")
    parser.add_argument("--timing-rounds", type=int, default=5, help="alternating predict timing rounds (median kept)")
    parser.add_argument("--timing-images", type=int, default=32, help="test images per predict timing round")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="benchmarks/results/vs_anomalib_full", help="output prefix for .json and .md")
    return parser.parse_args(argv)


def machine_description() -> str:
    cores = len(__import__("os").sched_getaffinity(0))
    threads = torch.get_num_threads()
    return (f"{cores}-core CPU dev machine, {cpu_model()}, {'one torch thread' if threads == 1 else f'{threads} torch threads'}"
            f" (torch {torch.__version__})")


class Clock:
    """Wall and CPU seconds of a block: CPU time is what a shared machine cannot inflate much."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


# --------------------------------------------------------------------------------------------------
# shared inputs


def load_inputs(args, tower):
    """Train images and test images + masks, all resized once to the model size, in [0, 1]."""
    root = Path(args.data)
    transform = build_transform(tower.preprocess.with_size(args.image_size))
    train = MVTecDataset(root.parent, "train", categories=[root.name])
    train_images = [_resized(train[i].image, transform) for i in evenly_spaced(len(train), args.max_train)]
    test = MVTecDataset(root.parent, "test", categories=[root.name])
    samples = [test[i] for i in capped_test_indices(test.labels, args.max_test)]
    test_images = [_resized(s.image, transform) for s in samples]
    masks = [transform.mask(s.mask).numpy() for s in samples]
    return train_images, test_images, masks, [s.label for s in samples]


def _resized(image: torch.Tensor, transform) -> torch.Tensor:
    preprocess = transform.preprocess
    return resize(image, preprocess.size, preprocess.interpolation)


def model_batches(images: list[torch.Tensor], transform, batch_size: int):
    """Normalised channels-last batches: the layout defectclip gives its own CPU backbone."""
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(image) for image in images[start : start + batch_size]])
        yield batch.contiguous(memory_format=torch.channels_last)


def warm_up(tower, args) -> None:
    """Untimed forward passes, so one-time kernel set-up is charged to neither library."""
    with torch.no_grad():
        for batch in (1, args.batch_size):
            x = torch.zeros(batch, 3, args.image_size, args.image_size).contiguous(memory_format=torch.channels_last)
            tower.forward_features(x, LAYERS)


# --------------------------------------------------------------------------------------------------
# defectclip


def fit_defectclip(tower, train, args, seed: int, inference: str = "auto", search: str = "auto"):
    model = PatchCore(tower, layers=LAYERS, image_size=args.image_size, coreset_ratio=args.coreset_ratio,
                      max_bank_size=args.max_bank_size, seed=seed, device="cpu", batch_size=args.batch_size,
                      inference=inference, search=search)
    with Clock() as clock:
        model.fit(train)
    return model, {"fit_s": clock.wall, "fit_cpu_s": clock.cpu, "bank_size": int(model.memory_bank.shape[0])}


def evaluate_defectclip(model, test, masks, labels) -> dict:
    """Metrics with the default inference and search; the exact float32 path on the same bank (fit
    always runs the exact tower, so the bank is the exact path's own): its metrics, and the image AUROC
    of the default features with the exact search (the search's own change); the paper's reweighted
    score on the default features."""
    default_inference, default_search = model.inference, model.search
    row = {"inference": model.inference_mode, "search": model.search_kernel,
           **_metrics(model.predict(test), masks, labels)}
    model.search = "exact"
    row["image_auroc_exact_search"] = image_auroc(labels, [r.score for r in model.predict(test)])
    model.reweight = True  # the paper's image score, as anomalib computes it; maps are unchanged
    row["image_auroc_reweighted"] = image_auroc(labels, [r.score for r in model.predict(test)])
    model.reweight, model.inference = False, "exact"
    row.update({f"{key}_exact_path": value for key, value in _metrics(model.predict(test), masks, labels).items()})
    model.inference, model.search = default_inference, default_search
    # image AUROC of the default path (fast tower and search where the CPU has AMX) minus the exact path's
    row["image_auroc_delta"] = row["image_auroc"] - row["image_auroc_exact_path"]
    row["image_auroc_delta_search"] = row["image_auroc"] - row["image_auroc_exact_search"]
    return row


def _metrics(results, masks, labels) -> dict:
    metrics = evaluate(results, masks, labels)
    return {k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro")}


# --------------------------------------------------------------------------------------------------
# anomalib


def anomalib_model(tower):
    """anomalib's PatchcoreModel on timm's efficientnet_lite0 carrying our ImageNet weights."""
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(layers=LAYERS, backbone="efficientnet_lite0", pre_trained=False, num_neighbors=9)
    extractor = model.feature_extractor.feature_extractor
    missing, unexpected = extractor.load_state_dict(tower.model.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"anomalib's extractor lacks weights for {missing}")
    head_only = all(key.startswith(("conv_head", "bn2", "classifier")) for key in unexpected)
    if not head_only:
        raise RuntimeError(f"weights left unused: {unexpected}")
    return model


def check_same_features(tower, model, image_size: int) -> float:
    """Largest difference between the two extractors' feature maps on one random batch."""
    batch = torch.randn(2, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ours = tower.forward_features(batch, LAYERS)
        theirs = model.feature_extractor(batch)
    return max(float((ours[name] - theirs[name]).abs().max()) for name in LAYERS)


def fit_anomalib(tower, train, args, seed: int, bank_size: int):
    """anomalib's fit with the coreset ratio that keeps `bank_size` entries (it keeps int(N x ratio)).

    With --anomalib-fit-steps N its feature extraction and projection run whole and its k-center loop
    (KCenterGreedy.select_coreset_idxs, stepped here through its own methods) runs N steps; the fit
    time is projected as features + projection + (bank_size - 1) x the measured time per step. It then
    has no bank of its own: run_seed gives it defectclip's (same features, same size) so that its
    predict can be timed; its quality is not measured in that mode.
    """
    from anomalib.models.components.sampling.k_center_greedy import KCenterGreedy

    transform = build_transform(tower.preprocess.with_size(args.image_size))
    model = anomalib_model(tower)
    feature_gap = check_same_features(tower, model, args.image_size)
    torch.manual_seed(seed)  # the coreset's start point
    np.random.seed(seed)  # the sparse projection (drawn from numpy's global generator)
    with Clock() as features:
        model.train()
        with torch.no_grad():
            for batch in model_batches(train, transform, args.batch_size):
                model(batch)
    num_patches = sum(e.shape[0] for e in model.embedding_store)
    ratio = (bank_size + 0.5) / num_patches
    row = {"feature_max_abs_diff": feature_gap, "fit_features_cpu_s": features.cpu, "num_patches": num_patches}
    if not args.anomalib_fit_steps:
        with Clock() as coreset:
            model.subsample_embedding(ratio)
        row.update(fit_s=features.wall + coreset.wall, fit_cpu_s=features.cpu + coreset.cpu,
                   bank_size=int(model.memory_bank.shape[0]), fit_projected=False)
    else:
        sampler = KCenterGreedy(embedding=torch.vstack(model.embedding_store), sampling_ratio=ratio)
        model.embedding_store.clear()
        with Clock() as projection:
            sampler.model.fit(sampler.embedding)
            sampler.features = sampler.model.transform(sampler.embedding)
            sampler.reset_distances()
        steps = min(args.anomalib_fit_steps, sampler.coreset_size - 1 - WARM_UP_STEPS)
        idx = torch.randint(high=sampler.n_observations, size=(1,)).squeeze()
        for step in range(WARM_UP_STEPS + steps):
            if step == WARM_UP_STEPS:  # the first steps allocate; time the steady ones
                loop = Clock().__enter__()
            sampler.update_distances(cluster_center=idx)
            idx = sampler.get_new_idx()
            sampler.min_distances.scatter_(0, idx.unsqueeze(0).unsqueeze(1), 0.0)
        loop.__exit__()
        remaining = (sampler.coreset_size - 1) / steps
        row.update(fit_s=features.wall + projection.wall + loop.wall * remaining,
                   fit_cpu_s=features.cpu + projection.cpu + loop.cpu * remaining,
                   projection_cpu_s=projection.cpu, loop_steps_timed=steps, loop_cpu_s_per_step=loop.cpu / steps,
                   bank_size=sampler.coreset_size, fit_projected=True)
        del sampler
    model.eval()
    return model, row


def anomalib_predictor(model, tower, args) -> Callable:
    transform = build_transform(tower.preprocess.with_size(args.image_size))

    def predict(images, batch_size=args.batch_size):
        results = []
        with torch.no_grad():
            for batch in model_batches(images, transform, batch_size):
                output = model(batch)
                scores, maps = output.pred_score.reshape(-1).tolist(), output.anomaly_map[:, 0].numpy()
                results += [_Result(s, m) for s, m in zip(scores, maps)]
        return results

    return predict


class _Result:
    def __init__(self, score: float, anomaly_map: np.ndarray):
        self.score, self.anomaly_map = score, anomaly_map


# --------------------------------------------------------------------------------------------------
# timing


def alternating_ms(tasks: dict[str, Callable[[], object]], count: int, rounds: int) -> dict[str, dict]:
    """Median CPU and wall ms per image of each task, timed in turns (A, B, C, A, B, C, ...), so that a
    load change on a shared machine hits all of them alike."""
    times = {name: {"cpu": [], "wall": []} for name in tasks}
    for _ in range(rounds):
        for name, task in tasks.items():
            with Clock() as clock:
                task()
            times[name]["cpu"].append(1000 * clock.cpu / count)
            times[name]["wall"].append(1000 * clock.wall / count)
    return {name: {"cpu_ms": float(np.median(t["cpu"])), "wall_ms": float(np.median(t["wall"])),
                   "cpu_ms_rounds": t["cpu"]} for name, t in times.items()}


def backbone_only(tower, images, args, batch_size: int, mode: str = "exact") -> Callable[[], None]:
    """A backbone forward alone on the same images, inputs prepared outside the clock: the float32
    tower both libraries share ("exact"), or the tower as defectclip's predict runs it (`mode`)."""
    transform = build_transform(tower.preprocess.with_size(args.image_size))
    runner = inference_tower(tower, mode, LAYERS)
    dtype = next(iter(runner.parameters())).dtype
    batches = [batch.to(dtype) for batch in model_batches(images, transform, batch_size)]

    def run():
        with torch.no_grad():
            for batch in batches:
                runner.forward_features(batch, LAYERS)

    return run


def time_predicts(tower, ours: PatchCore, their_predict, images, args) -> dict:
    """Per batch size: defectclip's whole predict call, anomalib's, the shared float32 backbone alone
    and defectclip's inference backbone alone (folded, bfloat16 on an AMX CPU)."""
    timings = {}
    for batch in dict.fromkeys((APP_BATCH, args.batch_size)):
        ours.batch_size = batch
        tasks = {
            "defectclip": lambda: ours.predict(images),
            "anomalib": lambda: their_predict(images, batch),
            "backbone": backbone_only(tower, images, args, batch),
            "defectclip_backbone": backbone_only(tower, images, args, batch, ours.inference_mode),
        }
        timings[f"batch_{batch}"] = alternating_ms(tasks, len(images), args.timing_rounds)
    ours.batch_size = args.batch_size
    return timings


# --------------------------------------------------------------------------------------------------
# report


def mean_std(values: list[float]) -> list[float]:
    return [float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0]


QUALITY_KEYS = ("image_auroc", "pixel_auroc", "aupro", "fit_s", "fit_cpu_s", "image_auroc_exact_path",
                "pixel_auroc_exact_path", "aupro_exact_path", "image_auroc_exact_search", "image_auroc_reweighted",
                "image_auroc_delta", "image_auroc_delta_search")


def summarise(rows: list[dict], timings: dict, image_size: int) -> dict:
    """Per library: mean and standard deviation over seeds; then the issue's four target numbers."""
    summary = {}
    for library in dict.fromkeys(row["library"] for row in rows):
        mine = [row for row in rows if row["library"] == library]
        keys = [k for k in QUALITY_KEYS if all(k in row for row in mine)]
        summary[library] = {key: mean_std([row[key] for row in mine]) for key in keys}
        summary[library]["seeds"] = [row["seed"] for row in mine]
    ours = summary["defectclip"]
    theirs = next(stats for name, stats in summary.items() if name != "defectclip")
    app = timings[f"batch_{APP_BATCH}"]
    our_rows = [r for r in rows if r["library"] == "defectclip"]
    return {
        "per_library": summary,
        # anomalib / defectclip, CPU time: whole predict call at the app's batch, same input layout
        "predict_speedup": app["anomalib"]["cpu_ms"] / app["defectclip"]["cpu_ms"],
        # defectclip's whole predict call / its backbone forward alone (the tower as predict runs it:
        # folded, bfloat16 on an AMX CPU), same images, same run
        "predict_over_backbone": app["defectclip"]["cpu_ms"] / app["defectclip_backbone"]["cpu_ms"],
        # ... / the float32 backbone both libraries share
        "predict_over_fp32_backbone": app["defectclip"]["cpu_ms"] / app["backbone"]["cpu_ms"],
        # whole predict call, CPU ms per megapixel of model input, one image per call
        "predict_cpu_ms_per_megapixel": app["defectclip"]["cpu_ms"] / (image_size * image_size / 1e6),
        # anomalib / defectclip fit CPU time at the same bank size (means over the seeds each ran)
        "fit_speedup": theirs["fit_cpu_s"][0] / ours["fit_cpu_s"][0],
        "fit_speedup_wall": theirs["fit_s"][0] / ours["fit_s"][0],
        "fit_speedup_projected": any(row.get("fit_projected") for row in rows),
        "fit_cpu_s": ours["fit_cpu_s"][0],
        # image AUROC points, default path (inference and search) minus the exact float32 path fitted
        # with the same seed: mean, each seed, and the largest magnitude over the seeds
        "image_auroc_delta": 100 * ours["image_auroc_delta"][0],
        "image_auroc_delta_per_seed": [100 * r["image_auroc_delta"] for r in our_rows],
        "image_auroc_delta_worst": 100 * max(abs(r["image_auroc_delta"]) for r in our_rows),
        # the search alone: default search minus exact search on the same bank and features
        "image_auroc_delta_search_per_seed": [100 * r["image_auroc_delta_search"] for r in our_rows],
    }


def whole_fit_summary(path: Path, args, counts: dict, rows: list[dict]) -> dict:
    """fit_speedup from an earlier run in which anomalib's k-center loop ran to the end: its anomalib
    fits against this run's defectclip fits of the same seeds (defectclip's code may have changed
    since; anomalib's has not), checked to be comparable (same data, sizes, batch and bank)."""
    earlier = json.loads(path.read_text())
    same = {key: earlier["args"][key] == getattr(args, key) for key in ("image_size", "batch_size", "max_train", "coreset_ratio", "max_bank_size")}
    if earlier["counts"] != counts or not all(same.values()):
        raise SystemExit(f"{path} is not comparable with this run: counts {earlier['counts']} vs {counts}, "
                         f"settings equal: {same}")
    theirs = [r for r in earlier["rows"] if r["library"] != "defectclip" and not r.get("fit_projected")]
    if not theirs:
        raise SystemExit(f"{path} has no anomalib fit that ran whole (run it with --anomalib-fit-steps 0).")
    seeds = {r["seed"] for r in theirs}
    ours = [r for r in rows if r["library"] == "defectclip" and r["seed"] in seeds]
    if not ours:
        raise SystemExit(f"{path} timed anomalib for seeds {sorted(seeds)}; run at least one of them here.")
    banks = {r["bank_size"] for r in theirs + rows}
    if len(banks) != 1:
        raise SystemExit(f"{path}: bank sizes differ ({sorted(banks)}); fits are compared at one bank size.")
    their_cpu, our_cpu = np.mean([r["fit_cpu_s"] for r in theirs]), np.mean([r["fit_cpu_s"] for r in ours])
    their_wall, our_wall = np.mean([r["fit_s"] for r in theirs]), np.mean([r["fit_s"] for r in ours])
    return {
        "fit_speedup": float(their_cpu / our_cpu),
        "fit_speedup_wall": float(their_wall / our_wall),
        "fit_speedup_projected": False,
        "whole_fit": {"source": path.name, "machine": earlier["machine"], "seeds": sorted(seeds),
                      "anomalib_fit_cpu_s": float(their_cpu), "anomalib_fit_s": float(their_wall),
                      "defectclip_fit_cpu_s": float(our_cpu), "defectclip_fit_s": float(our_wall),
                      "anomalib_quality": [{k: r.get(k) for k in ("seed", "image_auroc", "pixel_auroc", "aupro")} for r in theirs],
                      "defectclip_quality": [{k: r.get(k) for k in ("seed", "image_auroc", "pixel_auroc", "aupro")} for r in ours]},
    }


def whole_fit_note(summary: dict) -> str:
    whole = summary.get("whole_fit")
    if not whole:
        return ""
    return (f"; measured with anomalib's fit run whole in `{whole['source']}` (seeds {whole['seeds']}: "
            f"{whole['anomalib_fit_cpu_s']:.0f} s vs this run's {whole['defectclip_fit_cpu_s']:.1f} s CPU); this run's "
            f"projection: {summary['fit_speedup_as_projected_here']:.1f}")


def markdown(rows: list[dict], summary: dict, timings: dict, args, counts: dict, machine: str) -> str:
    ours_row = next(row for row in rows if row["library"] == "defectclip")
    lines = [
        f"Category `{Path(args.data).name}`, {counts['train']} train / {counts['test']} test images at "
        f"{args.image_size} px, layers {LAYERS}, batch {args.batch_size}, {machine}, seeds {args.seeds}. "
        f"defectclip's default path here: tower `{ours_row['inference']}`, search `{ours_row['search']}`.",
        "",
        "| library | seed | bank | image AUROC | pixel AUROC | AUPRO | fit CPU (s) | fit wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        quality = " | ".join(f"{100 * row[k]:.2f}" if k in row else "not measured" for k in ("image_auroc", "pixel_auroc", "aupro"))
        projected = " (projected)" if row.get("fit_projected") else ""
        lines.append(f"| {row['library']} | {row['seed']} | {row['bank_size']} | {quality} | "
                     f"{row['fit_cpu_s']:.1f}{projected} | {row['fit_s']:.1f}{projected} |")
        if "image_auroc_exact_path" in row:
            exact = " | ".join(f"{100 * row[k + '_exact_path']:.2f}" for k in ("image_auroc", "pixel_auroc", "aupro"))
            lines.append(f"| defectclip, exact float32 path | {row['seed']} | {row['bank_size']} | {exact} | | |")
    lines += ["", "Predict, ms per image (median of alternating rounds; CPU / wall):", "",
              "| batch | defectclip | anomalib | float32 backbone alone | defectclip's backbone alone |",
              "|---|---|---|---|---|"]
    for name, timing in timings.items():
        cells = " | ".join(f"{timing[k]['cpu_ms']:.1f} / {timing[k]['wall_ms']:.1f}"
                           for k in ("defectclip", "anomalib", "backbone", "defectclip_backbone"))
        lines.append(f"| {name.split('_')[1]} | {cells} |")
    ours = summary["per_library"]["defectclip"]
    per_seed = ", ".join(f"{d:+.2f}" for d in summary["image_auroc_delta_per_seed"])
    search_seed = ", ".join(f"{d:+.2f}" for d in summary["image_auroc_delta_search_per_seed"])
    lines += [
        "",
        f"defectclip image AUROC: default path {100 * ours['image_auroc'][0]:.2f} ± {100 * ours['image_auroc'][1]:.2f}, "
        f"exact float32 path (unfolded float32 tower, float32 search, same bank) {100 * ours['image_auroc_exact_path'][0]:.2f} "
        f"± {100 * ours['image_auroc_exact_path'][1]:.2f}, default features with the exact search "
        f"{100 * ours['image_auroc_exact_search'][0]:.2f}, paper's reweighted score {100 * ours['image_auroc_reweighted'][0]:.2f}. "
        f"Per seed, default − exact path: {per_seed} points; the search alone: {search_seed} points.",
        "",
        "| target | measured |",
        "|---|---|",
        f"| predict_over_backbone (batch {APP_BATCH}, ≤ 1.4; over defectclip's own backbone forward) | "
        f"{summary['predict_over_backbone']:.2f} (over the float32 backbone: {summary['predict_over_fp32_backbone']:.2f}) |",
        f"| predict_speedup vs anomalib (batch {APP_BATCH}, ≥ 3) | {summary['predict_speedup']:.2f} |",
        f"| predict CPU ms per megapixel (batch {APP_BATCH}) | {summary['predict_cpu_ms_per_megapixel']:.0f} |",
        f"| fit CPU s, all train images (≤ 60) | {summary['fit_cpu_s']:.1f} |",
        f"| fit_speedup vs anomalib, CPU time (≥ 20) | {summary['fit_speedup']:.1f} (wall {summary['fit_speedup_wall']:.1f})"
        f"{'; anomalib fit PROJECTED from timed k-center steps' if summary['fit_speedup_projected'] else ''}"
        f"{whole_fit_note(summary)} |",
        f"| image_auroc_delta, default − exact float32 path (within ±0.3 every seed) | {summary['image_auroc_delta']:+.2f} "
        f"(worst seed {summary['image_auroc_delta_worst']:.2f}) |",
    ]
    return "\n".join(lines) + "\n"


def run_seed(tower, data, args, seed: int, with_anomalib: bool) -> tuple[list[dict], tuple]:
    """One fit of each library with this seed, in alternating order, then the evaluation of each."""
    train, test, masks, labels = data
    bank = expected_bank_size(len(train), args)
    order = ["defectclip", "anomalib"] if seed % 2 == 0 else ["anomalib", "defectclip"]
    fits = {}
    for library in order:
        if library == "defectclip":
            fits[library] = fit_defectclip(tower, train, args, seed)
        elif with_anomalib:
            fits[library] = fit_anomalib(tower, train, args, seed, bank)
    if "anomalib" in fits and fits["anomalib"][1]["fit_projected"]:
        fits["anomalib"][0].memory_bank = fits["defectclip"][0].memory_bank.clone()
    for library, (_, row) in fits.items():
        if row["bank_size"] != bank:
            raise RuntimeError(f"{library} kept {row['bank_size']} bank entries, expected {bank}")
    ours, our_row = fits["defectclip"]
    rows = [{"library": "defectclip", "seed": seed, **our_row, **evaluate_defectclip(ours, test, masks, labels)}]
    their_predict = None
    if with_anomalib:
        import anomalib

        model, their_row = fits["anomalib"]
        their_predict = anomalib_predictor(model, tower, args)
        quality = {} if their_row["fit_projected"] else _metrics(their_predict(test), masks, labels)
        rows.append({"library": f"anomalib {anomalib.__version__}", "seed": seed, **their_row, **quality})
    return rows, (ours, their_predict)


def expected_bank_size(num_train: int, args) -> int:
    """defectclip's bank size for this many training images, before it has fitted (one image's grid
    is the model size over stride 8, the finest requested stage)."""
    from defectclip.scoring.patchcore import coreset_size

    patches = num_train * (args.image_size // 8) ** 2
    return coreset_size(patches, args.coreset_ratio, args.max_bank_size)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tower = build_vision_tower(OFFLINE_VISION)
    data = load_inputs(args, tower)
    warm_up(tower, args)
    rows, models = [], None
    anomalib_seeds = args.seeds[: args.anomalib_seeds] if args.anomalib_seeds is not None else args.seeds
    for seed in args.seeds:
        seed_rows, seed_models = run_seed(tower, data, args, seed, seed in anomalib_seeds)
        for row in seed_rows:
            print(json.dumps(row), flush=True)
        rows += seed_rows
        models = models or seed_models
    timed = data[1][: args.timing_images]
    timings = time_predicts(tower, models[0], models[1], timed, args)
    print(json.dumps(timings), flush=True)
    summary = summarise(rows, timings, args.image_size)
    counts = {"train": len(data[0]), "test": len(data[1])}
    if args.anomalib_whole_fit:
        # this run's projection is kept beside the measured ratio, as a check on the projection
        summary["fit_speedup_as_projected_here"] = summary["fit_speedup"]
        summary.update(whole_fit_summary(Path(args.anomalib_whole_fit), args, counts, rows))
    machine = machine_description()
    report = {"args": vars(args), "machine": machine, "counts": counts, "rows": rows, "timings": timings, **summary}
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), report)
    table = markdown(rows, summary, timings, args, counts, machine)
    out.with_suffix(".md").write_text(f"<!-- generated by benchmarks/vs_anomalib.py -->\n\n{table}")
    print(table)
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
