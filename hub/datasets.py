"""Build split-mask caption datasets (the paper's multi-modal IAD datasets) and push them to the Hub.

    python -m hub.datasets build <source> <out_dir> [--eps 5] [--min-samples 5] [--min-area 16]
        [--max-points 1000] [--val-fraction 0.1] [--test-fraction 0.3] [--seed 0] [--transplant N]
        [--include-normal] [--overwrite]
    python -m hub.datasets push <out_dir> <repo> [--dry-run]

`build` reads an MVTec-layout or index-mask source (see DESIGN.md "Data"), splits every defect mask
into regions with DBSCAN (`defectclip.data.regions`), captions each region, and saves a
`datasets.DatasetDict` (train / validation / test) with `save_to_disk`, plus `candidates.json` (the
caption candidates per object), `stats.json` and a dataset card (README.md).

Splits:
- index-mask sources: the source's test split is `test`; `validation` is a seeded `--val-fraction` of
  the source's train split, `train` the rest.
- MVTec sources: the train split holds only normal images, so the defective images of the source's
  test split are divided, per (object, defect type) and seeded, into `--test-fraction` for `test`,
  `--val-fraction` for `validation` and the rest for `train`: there must be regions to train on.
Normal images (no regions) are left out unless `--include-normal`. `--transplant N` adds N training
images made by Poisson-blending a region of a training image into a normal training image of the same
object (`defectclip.data.transplant`); it needs normal images in the source's train split.

Records are produced one image at a time by a generator (`Dataset.from_generator`) with PNG-encoded
masks and the source's own image bytes, so memory stays bounded whatever the source size.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from defectclip.captions import candidate_captions
from defectclip.data import GOOD, DataError, IndexMaskDataset, SampleRef, load_image_array, open_dataset
from defectclip.data.regions import (
    DEFAULT_EPS,
    DEFAULT_MAX_POINTS,
    DEFAULT_MIN_AREA,
    DEFAULT_MIN_SAMPLES,
    SampleRegions,
    split_sample_regions,
)
from defectclip.data.transplant import transplant_region
from defectclip.region_dataset import (
    CANDIDATES_FILE,
    SPLITS,
    STATS_FILE,
    SourceInfo,
    label_decoders,
    png_bytes,
    record_features,
    region_record,
    source_info,
)

CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "cards" / "dataset_card.md.j2"
PARQUET_SHARD_BYTES = 400 * 1024 * 1024  # the Hub's dataset viewer prefers shards below ~500 MB
TRANSPLANT_PREFIX = "transplant:"
LICENSE_FILE = "LICENSE.md"  # the card's license_link points here
DATASET_DICT_FILE = "dataset_dict.json"
EXTRA_FILES = ("README.md", CANDIDATES_FILE, STATS_FILE, LICENSE_FILE)  # pushed beside the Parquet shards
TRANSPLANT_CANVASES = 5  # normal images tried per transplanted defect before giving up


# ------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class RegionParams:
    """The `split_regions` parameters, recorded in the card."""

    eps: float = DEFAULT_EPS
    min_samples: int = DEFAULT_MIN_SAMPLES
    min_area: int = DEFAULT_MIN_AREA
    max_points: int = DEFAULT_MAX_POINTS
    seed: int = 0


@dataclass(frozen=True)
class BuildConfig:
    source: Path
    out_dir: Path
    regions: RegionParams = RegionParams()
    val_fraction: float = 0.1
    test_fraction: float = 0.3  # MVTec sources only
    seed: int = 0
    transplant: int = 0
    include_normal: bool = False
    overwrite: bool = False
    num_proc: int = 1
    repo_id: str = ""  # shown in the card's loading snippet; default <org>/<out_dir name>

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise ValueError("--val-fraction and --test-fraction must be in [0, 1).")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("--val-fraction + --test-fraction must leave something for train (sum < 1).")
        if self.transplant < 0 or self.num_proc < 1:
            raise ValueError("--transplant must be >= 0 and --num-proc >= 1.")


@dataclass
class Job:
    """One output record to produce: a source image, or a transplant of a region of `ref` into the first
    of `targets` (normal images, in random order) large enough to hold it."""

    index: int  # position in its split's plan; names the generator shard's stats file
    source_split: str
    ref: SampleRef
    targets: tuple[SampleRef, ...] = ()
    seed: int = 0

    @property
    def is_transplant(self) -> bool:
        return bool(self.targets)


# ------------------------------------------------------------------------------------------- planning


def _is_normal(ref: SampleRef) -> bool:
    return ref.defect == GOOD


def _seeded_order(items: list, seed: int, salt: str) -> list:
    """The same shuffle for the same seed, salt and items, whatever else is in the source."""
    digest = int(hashlib.sha1(salt.encode()).hexdigest()[:8], 16)
    order = np.random.default_rng([seed, digest]).permutation(len(items))
    return [items[i] for i in order]


def _cut(items: list, fractions: dict[str, float], seed: int, salt: str) -> dict[str, list]:
    """Shuffle `items` (seeded) and cut round(n * fraction) for each named part; the rest goes to 'train'.
    Each part keeps the source's order (sorted file names), so records are easy to find."""
    shuffled = _seeded_order(items, seed, salt)
    parts, start = {}, 0
    for name, fraction in fractions.items():
        count = round(len(items) * fraction)
        parts[name] = shuffled[start : start + count]
        start += count
    parts["train"] = shuffled[start:]
    position = {id(item): i for i, item in enumerate(items)}
    return {name: sorted(part, key=lambda item: position[id(item)]) for name, part in parts.items()}


def _plan_index_mask(config: BuildConfig) -> dict[str, list[tuple[str, SampleRef]]]:
    source = str(config.source)
    train_refs = [r for r in _dataset(source, "train").refs if config.include_normal or not _is_normal(r)]
    test_refs = [r for r in _dataset(source, "test").refs if config.include_normal or not _is_normal(r)]
    parts = _cut(train_refs, {"validation": config.val_fraction}, config.seed, "validation")
    return {
        "train": [("train", r) for r in parts["train"]],
        "validation": [("train", r) for r in parts["validation"]],
        "test": [("test", r) for r in test_refs],
    }


def _plan_mvtec(config: BuildConfig) -> dict[str, list[tuple[str, SampleRef]]]:
    """Defective test images, divided per (object, defect type) so every type reaches every split."""
    plan: dict[str, list[tuple[str, SampleRef]]] = {split: [] for split in SPLITS}
    groups: dict[tuple[str, str], list[SampleRef]] = defaultdict(list)
    for ref in _dataset(str(config.source), "test").refs:
        if not _is_normal(ref):
            groups[(ref.object, ref.defect)].append(ref)
        elif config.include_normal:
            plan["test"].append(("test", ref))
    fractions = {"test": config.test_fraction, "validation": config.val_fraction}
    for (object_name, defect), refs in sorted(groups.items()):
        for split, part in _cut(refs, fractions, config.seed, f"{object_name}/{defect}").items():
            plan[split].extend(("test", r) for r in part)
    if config.include_normal:
        normals = _cut(_dataset(str(config.source), "train").refs, {"validation": config.val_fraction},
                       config.seed, "normal")
        for split in ("train", "validation"):
            plan[split].extend(("train", r) for r in normals[split])
    return plan


def _transplant_targets(config: BuildConfig, held_out: set[Path]) -> dict[str, list[SampleRef]]:
    """Normal images of the source's train split, by object, except those the plan put in validation or
    test (`held_out`): the canvases for transplanted defects."""
    targets: dict[str, list[SampleRef]] = defaultdict(list)
    for ref in _dataset(str(config.source), "train").refs:
        if _is_normal(ref) and ref.image_path not in held_out:  # index masks: images without a mask file
            targets[ref.object].append(ref)
    return targets


def _plan_transplants(config: BuildConfig, plan: dict[str, list[tuple[str, SampleRef]]]) -> list[Job]:
    """`config.transplant` jobs: a random defective training image (its region is chosen when the job
    runs) into a random normal training image of the same object."""
    held_out = {ref.image_path for split in ("validation", "test") for _, ref in plan[split]}
    targets = _transplant_targets(config, held_out)
    sources = [(split, ref) for split, ref in plan["train"] if not _is_normal(ref) and targets.get(ref.object)]
    if not sources:
        raise DataError(
            f"--transplant needs normal images in the train split of {config.source} for the objects of its "
            "defective training images; there are none."
        )
    rng = np.random.default_rng([config.seed, 7])
    jobs = []
    for _ in range(config.transplant):
        split, ref = sources[int(rng.integers(len(sources)))]
        canvas = targets[ref.object]
        # Several canvases per job: sizes vary (magnetic tiles are 100-630 px wide) and a large region
        # may not fit the first one.
        picks = rng.permutation(len(canvas))[:TRANSPLANT_CANVASES]
        jobs.append(Job(0, split, ref, tuple(canvas[i] for i in picks), seed=int(rng.integers(2**31))))
    return jobs


def plan_build(config: BuildConfig) -> dict[str, list[Job]]:
    """Which source image goes to which split (no pixels read)."""
    is_index = isinstance(_dataset(str(config.source), "train"), IndexMaskDataset)
    plan = _plan_index_mask(config) if is_index else _plan_mvtec(config)
    jobs = {split: [Job(0, source_split, ref) for source_split, ref in plan[split]] for split in SPLITS}
    if config.transplant:
        jobs["train"].extend(_plan_transplants(config, plan))
    for split_jobs in jobs.values():
        for index, job in enumerate(split_jobs):
            job.index = index
    return jobs


def split_method(config: BuildConfig) -> str:
    """How the splits were made, in a sentence for the card."""
    if isinstance(_dataset(str(config.source), "train"), IndexMaskDataset):
        return (f"`test` is the source's test split; `validation` is a seeded {config.val_fraction:.0%} of the "
                f"source's train split (seed {config.seed}) and `train` the rest.")
    return (f"The source follows the MVTec AD layout, whose train split holds only normal images, so its "
            f"defective test images were divided per (object, defect type), seeded (seed {config.seed}): "
            f"{config.test_fraction:.0%} to `test`, {config.val_fraction:.0%} to `validation`, the rest to `train`.")


# ------------------------------------------------------------------------------------------- records


@lru_cache(maxsize=8)
def _dataset(root: str, split: str):
    """One reader per (source, split) per process: listing a folder once, not once per image."""
    return open_dataset(root, split)


class ShardStats:
    """What the records themselves cannot tell: dropped regions, skipped images, subsampled masks."""

    def __init__(self) -> None:
        self.dropped_by_type: Counter = Counter()
        self.skipped_without_regions = 0
        self.failed_transplants = 0
        self.masks = 0
        self.subsampled_masks = 0
        self.max_eps_used = 0.0

    def split(self, masks: dict, params: RegionParams) -> SampleRegions:
        """Split one image's masks, each type on its own, and count what happened."""
        result = split_sample_regions(masks, **dataclasses.asdict(params))
        for defect, split in result.splits.items():
            self.dropped_by_type[defect] += split.dropped
            self.masks += 1
            self.subsampled_masks += split.stride > 1
            self.max_eps_used = max(self.max_eps_used, split.eps_used)
        return result

    def to_dict(self) -> dict:
        return {"dropped_by_type": dict(self.dropped_by_type), "skipped_without_regions": self.skipped_without_regions,
                "failed_transplants": self.failed_transplants,
                "masks": self.masks, "subsampled_masks": self.subsampled_masks, "max_eps_used": self.max_eps_used}


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.name


def _real_record(job: Job, root: Path, params: RegionParams, include_normal: bool, stats: ShardStats) -> dict | None:
    sample = _dataset(str(root), job.source_split).load(job.ref)
    regions = stats.split({d: m.numpy() for d, m in sample.masks.items()}, params)
    if not regions and not (include_normal and sample.label == 0):
        stats.skipped_without_regions += 1
        return None
    return {
        "image": {"bytes": job.ref.image_path.read_bytes(), "path": job.ref.image_path.name},
        "object": sample.object,
        "regions": [region_record(defect, sample.object, region) for defect, region in regions],
        "source": _relative(job.ref.image_path, root),
        "dropped_regions": regions.total_dropped,
    }


def _transplant_record(job: Job, root: Path, params: RegionParams, stats: ShardStats) -> dict | None:
    sample = _dataset(str(root), job.source_split).load(job.ref)
    # Its regions were counted with its own record already; a scratch ShardStats keeps them out of the totals.
    regions = ShardStats().split({d: m.numpy() for d, m in sample.masks.items()}, params)
    if not regions:
        stats.failed_transplants += 1
        return None
    rng = np.random.default_rng(job.seed)
    defect, region = regions[int(rng.integers(len(regions)))]
    source_image = load_image_array(job.ref.image_path)
    for canvas in job.targets:
        try:
            placed = transplant_region(source_image, region, load_image_array(canvas.image_path), defect, seed=rng)
            break
        except ValueError:  # the region does not fit this canvas (e.g. a large break on a narrow tile)
            continue
    else:
        stats.failed_transplants += 1
        return None
    source, target = _relative(job.ref.image_path, root), _relative(canvas.image_path, root)
    return {
        "image": {"bytes": png_bytes(placed.image), "path": f"transplant_{job.index:06d}.png"},
        "object": sample.object,
        "regions": [region_record(defect, sample.object, placed.mask)],
        "source": f"{TRANSPLANT_PREFIX}{source} -> {target}",
        "dropped_regions": 0,
    }


def generate_records(jobs: list[Job], root: str, params: dict, include_normal: bool, stats_dir: str, split: str):
    """The generator behind `Dataset.from_generator`: one record per job, stats written when done.

    Arguments are plain values (lists are sharded across processes when num_proc > 1); each shard
    writes its own stats file, named after its first job, because shards may run in other processes.
    """
    import torch

    # The readers turn each image into a small float tensor; with several intra-op threads on a busy
    # CPU that conversion took 40 ms instead of 2 ms per image (threads spin-waiting on each other).
    # One thread is plenty for 200 x 200 images; the caller's setting is restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        region_params = RegionParams(**params)
        stats = ShardStats()
        for job in jobs:
            if job.is_transplant:
                record = _transplant_record(job, Path(root), region_params, stats)
            else:
                record = _real_record(job, Path(root), region_params, include_normal, stats)
            if record is not None:
                yield record
        if jobs:
            Path(stats_dir, f"{split}-{jobs[0].index:07d}.json").write_text(json.dumps(stats.to_dict()))
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- statistics


def _merge_shard_stats(stats_dir: Path, split: str) -> dict:
    merged = {"dropped_by_type": Counter(), "skipped_without_regions": 0, "failed_transplants": 0, "masks": 0,
              "subsampled_masks": 0, "max_eps_used": 0.0}
    for path in sorted(stats_dir.glob(f"{split}-*.json")):
        shard = json.loads(path.read_text())
        merged["dropped_by_type"].update(shard["dropped_by_type"])
        for key in ("skipped_without_regions", "failed_transplants", "masks", "subsampled_masks"):
            merged[key] += shard[key]
        merged["max_eps_used"] = max(merged["max_eps_used"], shard["max_eps_used"])
    merged["dropped_by_type"] = dict(sorted(merged["dropped_by_type"].items()))
    merged["dropped_regions"] = sum(merged["dropped_by_type"].values())
    return merged


def regions_bucket(count: int) -> str:
    """The paper's Table 2 rows: 1, 2, 3, 4+ regions per image (0 for normal images)."""
    return "4+" if count >= 4 else str(count)


def split_statistics(dataset) -> dict:
    """Counts read from the Arrow columns, without decoding an image."""
    import pyarrow.compute as pc

    table = dataset.data
    object_name, defect_name = label_decoders(dataset)
    objects = [object_name(i) for i in table.column("object").to_pylist()]
    per_image = pc.list_value_length(table.column("regions")).to_pylist()
    # Chunk by chunk: flattening is zero-copy there, while combining chunks would copy every mask's bytes.
    defects = [defect_name(d) for chunk in table.column("regions").chunks
               for d in chunk.flatten().field("defect").to_pylist()]
    region_objects = [obj for obj, n in zip(objects, per_image) for _ in range(n)]
    return {
        "images": len(objects),
        "regions": int(sum(per_image)),
        "transplanted": sum(s.startswith(TRANSPLANT_PREFIX) for s in table.column("source").to_pylist()),
        "images_by_object": dict(sorted(Counter(objects).items())),
        "regions_by_object": dict(sorted(Counter(region_objects).items())),
        "regions_by_defect": dict(sorted(Counter(defects).items())),
        "images_by_region_count": dict(sorted(Counter(regions_bucket(n) for n in per_image).items())),
    }


def _table(rows: list[str], columns: list[str], value) -> dict:
    """{'header': [...], 'rows': [[label, v1, ..., total]], 'total': [...]} for the card's Markdown tables."""
    body = [[row] + [value(row, c) for c in columns] + [sum(value(row, c) for c in columns)] for row in rows]
    totals = ["Total"] + [sum(r[i + 1] for r in body) for i in range(len(columns) + 1)]
    return {"header": [""] + list(columns) + ["Total"], "rows": body, "total": totals}


def card_tables(stats: dict) -> dict:
    splits = [s for s in SPLITS if s in stats["splits"]]
    per = stats["splits"]
    objects = sorted({o for s in splits for o in per[s]["images_by_object"]})
    defects = sorted({d for s in splits for d in per[s]["regions_by_defect"]})
    buckets = sorted({b for s in splits for b in per[s]["images_by_region_count"]}, key=lambda b: int(b.rstrip("+")))
    return {
        "images_by_object": _table(objects, splits, lambda r, c: per[c]["images_by_object"].get(r, 0)),
        "regions_by_object": _table(objects, splits, lambda r, c: per[c]["regions_by_object"].get(r, 0)),
        "images_by_region_count": _table(buckets, splits, lambda r, c: per[c]["images_by_region_count"].get(r, 0)),
        "regions_by_defect": _table(defects, splits, lambda r, c: per[c]["regions_by_defect"].get(r, 0)),
    }


# ------------------------------------------------------------------------------------------- card


def default_repo_id(out_dir: Path) -> str:
    from defectclip.sharing.push import resolve_repo_id

    return resolve_repo_id(out_dir.resolve().name.replace("_", "-"))


def size_category(count: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if count < limit:
            return label
    return "n>1M"


def render_card(stats: dict, candidates: dict[str, list[str]], config: BuildConfig, info: SourceInfo):
    """The dataset card (README.md) from cards/dataset_card.md.j2 via huggingface_hub's DatasetCard."""
    from huggingface_hub import DatasetCard, DatasetCardData

    repo_id = config.repo_id or default_repo_id(config.out_dir)
    pretty_name = f"defectclip split-mask captions: {', '.join(sorted(candidates))}"
    licence_block = ({"license_name": info.license_name, "license_link": info.license_link}
                     if info.license_id == "other" else {})
    card_data = DatasetCardData(
        license=info.license_id,
        **licence_block,
        pretty_name=pretty_name,
        size_categories=size_category(sum(s["images"] for s in stats["splits"].values())),
        task_categories=["image-to-text", "image-segmentation"],
        tags=["industrial-anomaly-detection", "defect-detection", "region-captioning", "defectclip"],
        # The build folder's own Arrow files, so `load_dataset(<folder>)` reads it as built; a push replaces
        # them with its Parquet shards (DatasetDict.push_to_hub writes the configs on the Hub).
        configs=[{"config_name": "default",
                  "data_files": [{"split": s, "path": f"{s}/data-*.arrow"}
                                 for s, counts in stats["splits"].items() if counts["images"]]}],
    )
    return DatasetCard.from_template(
        card_data, template_path=str(CARD_TEMPLATE), pretty_name=pretty_name, repo_id=repo_id,
        source=info, stats=stats, tables=card_tables(stats), candidates=candidates,
        params=stats["region_params"], split_method=split_method(config), config=config,
        out_dir_name=config.out_dir.name,
    )


# ------------------------------------------------------------------------------------------- build


def candidates_by_object(config: BuildConfig) -> dict[str, list[str]]:
    """Every defect type the source names, per object, as canonical captions (the describer's choices)."""
    return {obj: candidate_captions(obj, names) for obj, names in defect_types_by_object(config).items()}


def build_features(config: BuildConfig):
    """The records' features, with the source's objects and defect types as the ClassLabel names."""
    types = defect_types_by_object(config)
    return record_features(list(types), [name for names in types.values() for name in names])


def defect_types_by_object(config: BuildConfig) -> dict[str, list[str]]:
    """Every defect type the source names, per object, in the source's order."""
    types: dict[str, list[str]] = defaultdict(list)
    for split in ("train", "test"):
        dataset = _dataset(str(config.source), split)
        for ref in dataset.refs:
            names = list(dataset.classes.values()) if isinstance(dataset, IndexMaskDataset) else [ref.defect]
            for name in names:
                if name != GOOD and name not in types[ref.object]:
                    types[ref.object].append(name)
    return dict(sorted(types.items()))


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise DataError(f"{out_dir} exists and is not empty; pass --overwrite to replace a dataset built there.")
        if not (out_dir / "dataset_dict.json").is_file():
            raise DataError(f"{out_dir} does not look like a dataset built by this tool (no dataset_dict.json); "
                            "refusing to delete it. Choose another folder.")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def _empty_split(split: str, features):
    from datasets import Dataset

    return Dataset.from_dict({name: [] for name in features}, features=features, split=split)


def _build_split(split: str, jobs: list[Job], config: BuildConfig, cache_dir: Path, stats_dir: Path, features):
    from datasets import Dataset

    if not jobs:  # e.g. --val-fraction 0
        return _empty_split(split, features)
    params = dataclasses.asdict(config.regions)
    # A fresh cache folder per build, so a build always runs the generator (the stats files come from it)
    # and never reuses another build's Arrow files.
    fingerprint = hashlib.sha1(json.dumps([split, len(jobs), str(config), time.time()]).encode()).hexdigest()
    try:
        return Dataset.from_generator(
            generate_records, features=features, cache_dir=str(cache_dir), split=split,
            gen_kwargs={"jobs": jobs, "root": str(config.source), "params": params,
                        "include_normal": config.include_normal, "stats_dir": str(stats_dir), "split": split},
            num_proc=config.num_proc if config.num_proc > 1 and len(jobs) >= config.num_proc else None,
            fingerprint=fingerprint,
        )
    except ValueError as error:
        # Every image of the split was left out (no region survived): `datasets` refuses to read an
        # empty generator's split back, but an empty split is a valid outcome here.
        if "corresponds to no data" not in str(error):
            raise
        return _empty_split(split, features)


def build_dataset(config: BuildConfig, info: SourceInfo | None = None) -> dict:
    """Build, save and describe the dataset; returns the statistics written to stats.json."""
    from datasets import DatasetDict, load_from_disk

    started = time.perf_counter()
    info = info or source_info(config.source)
    _dataset.cache_clear()
    plan = plan_build(config)
    candidates = candidates_by_object(config)
    _prepare_out_dir(config.out_dir, config.overwrite)
    with tempfile.TemporaryDirectory(prefix="defectclip-build-", dir=config.out_dir.parent) as work:
        cache_dir, stats_dir = Path(work, "cache"), Path(work, "stats")
        stats_dir.mkdir()
        features = build_features(config)
        built = DatasetDict({split: _build_split(split, plan[split], config, cache_dir, stats_dir, features)
                             for split in SPLITS})
        # An empty split needs one (empty) shard written explicitly, or load_from_disk finds no table.
        built.save_to_disk(str(config.out_dir), num_shards={s: 1 for s, d in built.items() if len(d) == 0})
        shard_stats = {split: _merge_shard_stats(stats_dir, split) for split in SPLITS}
        del built  # its Arrow files live in the temporary folder
    saved = load_from_disk(str(config.out_dir))
    stats = {
        "source": str(config.source),
        "region_params": dataclasses.asdict(config.regions),
        "val_fraction": config.val_fraction, "test_fraction": config.test_fraction, "seed": config.seed,
        "transplant": config.transplant, "transplant_canvases": TRANSPLANT_CANVASES,
        "include_normal": config.include_normal,
        "splits": {split: {**split_statistics(saved[split]), **shard_stats[split]} for split in SPLITS},
    }
    stats["dropped_regions"] = sum(s["dropped_regions"] for s in stats["splits"].values())
    for key in ("skipped_without_regions", "failed_transplants", "masks", "subsampled_masks"):
        stats[key] = sum(s[key] for s in stats["splits"].values())
    stats["build_seconds"] = round(time.perf_counter() - started, 2)
    (config.out_dir / CANDIDATES_FILE).write_text(json.dumps(candidates, indent=2) + "\n")
    (config.out_dir / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    (config.out_dir / LICENSE_FILE).write_text(info.license_text())
    render_card(stats, candidates, config, info).save(str(config.out_dir / "README.md"))
    return stats


# ------------------------------------------------------------------------------------------- push


def push_dataset(out_dir: str | Path, repo_id: str, *, dry_run: bool = False, force: bool = False,
                 private: bool | None = None, token: str | None = None, echo=print):
    """Push a built dataset: `DatasetDict.push_to_hub` writes the Parquet shards (data/<split>-*.parquet, empty
    splits left out), the card's `configs` and `dataset_info`; then one commit adds the card with that
    metadata, candidates.json, stats.json and LICENSE.md. A README.md edited on the Hub is kept unless `force`.
    """
    from datasets import DatasetDict, load_from_disk

    from defectclip.sharing.push import push_folder, remote_readme_is_ours, resolve_repo_id

    out_dir, repo_id = Path(out_dir), resolve_repo_id(repo_id)
    if not (out_dir / DATASET_DICT_FILE).is_file():
        raise DataError(f"{out_dir} is not a built dataset (no {DATASET_DICT_FILE}); run `build` first.")
    saved = load_from_disk(str(out_dir))
    splits = DatasetDict({split: data for split, data in saved.items() if len(data)})
    if dry_run:
        echo(f"Dry run: would push splits {', '.join(f'{s} ({len(d)} rows)' for s, d in splits.items())} and "
             f"{', '.join(EXTRA_FILES)} from {out_dir} to dataset {repo_id}")
        return None
    replace_readme = force or remote_readme_is_ours(repo_id, "dataset", token)
    splits.push_to_hub(repo_id, private=private, token=token, max_shard_size=PARQUET_SHARD_BYTES,
                       commit_message=f"Upload {len(splits)} split(s) with defectclip")
    with tempfile.TemporaryDirectory(prefix="defectclip-push-") as staging:
        for name in EXTRA_FILES:
            if (out_dir / name).is_file():
                shutil.copy2(out_dir / name, Path(staging) / name)
        merge_hub_metadata(Path(staging) / "README.md", repo_id, token)
        return push_folder(staging, repo_id, "dataset", force=replace_readme, private=private, token=token,
                           delete_stale=False, echo=echo)


def merge_hub_metadata(readme: Path, repo_id: str, token: str | None) -> None:
    """Our card, with the `configs` and `dataset_info` that DatasetDict.push_to_hub just wrote on the Hub."""
    from huggingface_hub import DatasetCard

    if not readme.is_file():
        return
    remote = DatasetCard.load(repo_id, repo_type="dataset", token=token).data
    card = DatasetCard.load(readme)
    for key in ("configs", "dataset_info"):
        if remote.get(key) is not None:
            card.data[key] = remote.get(key)
    card.save(str(readme))


# ------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hub.datasets", description="split-mask caption datasets")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = commands.add_parser("build", help="build a dataset folder from an MVTec-layout or index-mask source")
    build.add_argument("source", type=Path, help="source folder (MVTec AD layout, or index masks with classes.json)")
    build.add_argument("out_dir", type=Path, help="output folder (save_to_disk layout + README.md + candidates.json)")
    build.add_argument("--eps", type=float, default=DEFAULT_EPS, help="DBSCAN radius in pixels (default %(default)s)")
    build.add_argument("--min-samples", type=int, default=DEFAULT_MIN_SAMPLES,
                       help="foreground pixels within eps that make a core pixel (default %(default)s)")
    build.add_argument("--min-area", type=int, default=DEFAULT_MIN_AREA,
                       help="drop regions with fewer pixels (default %(default)s)")
    build.add_argument("--max-points", type=int, default=DEFAULT_MAX_POINTS,
                       help="most pixels clustered per mask; larger masks are subsampled (default %(default)s)")
    build.add_argument("--val-fraction", type=float, default=0.1, help="validation share (default %(default)s)")
    build.add_argument("--test-fraction", type=float, default=0.3,
                       help="MVTec sources only: test share of the defective images (default %(default)s)")
    build.add_argument("--seed", type=int, default=0, help="seed of the splits, subsampling and transplants")
    build.add_argument("--transplant", type=int, default=0, metavar="N",
                       help="add N transplanted-defect images to train (needs normal train images)")
    build.add_argument("--include-normal", action="store_true", help="keep images without regions")
    build.add_argument("--overwrite", action="store_true", help="replace a dataset already built in out_dir")
    build.add_argument("--num-proc", type=int, default=1, help="processes generating records (default %(default)s)")
    build.add_argument("--repo-id", default="", help="repo id shown in the card's loading snippet")
    build.add_argument("--source-name", default=None, help="name of the underlying data (known sources have one)")
    build.add_argument("--license", default=None, help="licence of the underlying data, as the card states it")
    build.add_argument("--citation", default=None, help="citation of the underlying data")
    build.add_argument("--source-url", default=None, help="where the underlying data is published")
    build.set_defaults(handler=_run_build)

    push = commands.add_parser("push", help="upload a built dataset to the Hub: Parquet shards (DatasetDict.push_to_hub), "
                               "then the card, candidates, stats and licence")
    push.add_argument("out_dir", type=Path, help="a folder written by `build`")
    push.add_argument("repo", help="'<namespace>/<name>', or '<name>' for $DEFECTCLIP_ORG")
    push.add_argument("--dry-run", action="store_true", help="list the files; touch no network")
    push.add_argument("--force", action="store_true", help="replace a README.md edited on the Hub")
    push.add_argument("--private", action="store_true", help="create the repo private")
    from hub.tokens import add_token_argument

    add_token_argument(push)
    push.set_defaults(handler=_run_push)
    return parser


def _run_build(args: argparse.Namespace) -> int:
    config = BuildConfig(
        source=args.source, out_dir=args.out_dir,
        regions=RegionParams(args.eps, args.min_samples, args.min_area, args.max_points, args.seed),
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
        transplant=args.transplant, include_normal=args.include_normal, overwrite=args.overwrite,
        num_proc=args.num_proc, repo_id=args.repo_id,
    )
    info = source_info(args.source, args.source_name, args.license, args.citation, args.source_url)
    stats = build_dataset(config, info)
    summary = {split: {k: s[k] for k in ("images", "regions", "dropped_regions")} for split, s in stats["splits"].items()}
    print(json.dumps({"out_dir": str(args.out_dir), "seconds": stats["build_seconds"], "splits": summary}))
    return 0


def _run_push(args: argparse.Namespace) -> int:
    push_dataset(args.out_dir, args.repo, dry_run=args.dry_run, force=args.force,
                 private=True if args.private else None, token=args.token)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
