"""The split-mask caption dataset format: schema, sources, candidates, records and readers, in one place.

A dataset is a `datasets.DatasetDict` (train / validation / test) of records
`{image, object, regions: [{mask, defect, caption, bbox}], source, dropped_regions}` where `object` and each
region's `defect` are `ClassLabel`s (their names are the dataset's objects and defect types), plus
`candidates.json` ({object: [candidate captions]}) and a card. `python -m hub.datasets build` writes it
(planning and the DBSCAN split live there); training and evaluation read it from any of:

- the folder `build` wrote (`save_to_disk` layout, `dataset_dict.json`),
- a folder in the Hub layout (`data/<split>-*.parquet` + candidates.json), e.g. a downloaded snapshot,
- a Hub dataset repo id (`org/name`), downloaded into the Hugging Face cache.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .data import DataError
from .data.images import image_to_tensor
from .data.regions import bounding_box, crop_to_box, disk_shape, place_normal_region, sample_normal_regions
from .data.transforms import Preprocess, resize
from .data.transplant import RegionAnchor, region_anchor
from .captions import caption
from .io import read_json

SPLITS = ("train", "validation", "test")
CANDIDATES_FILE = "candidates.json"
STATS_FILE = "stats.json"
DATASET_DICT_FILE = "dataset_dict.json"  # what marks a save_to_disk folder


# ------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class SourceInfo:
    """Where the underlying images come from, as a card states it. `license_id` is the Hub's identifier; with
    "other", `license_name` and `license_link` complete the Hub's licence block, and the link defaults to the
    LICENSE.md that a dataset export writes from `license` and `citation`."""

    name: str
    citation: str
    license: str  # the licence text shown in the card
    license_id: str = "other"
    url: str = ""
    license_name: str = "research-use-cite"
    license_link: str = "LICENSE.md"

    def license_text(self) -> str:
        """The LICENSE.md a dataset carries: the terms of the underlying images and how to cite them."""
        where = f"\n\nSource: {self.url}" if self.url else ""
        return (f"# Licence of the underlying images\n\n{self.name}: {self.license}{where}\n\n"
                f"## Citation\n\n{self.citation}\n\nThe masks, regions and captions derived here follow the "
                "same terms.\n")


# From ../shared/data/README.md; other sources pass their own with --source-name / --license / --citation.
KNOWN_SOURCES = {
    "magnetic_tile": SourceInfo(
        name="Magnetic Tile Defect dataset",
        citation='Y. Huang, C. Qiu, K. Yuan, "Surface defect saliency of magnetic tile", The Visual Computer, 2020.',
        license="Research use; please cite (public GitHub release by its authors).",
    ),
    "neu_seg": SourceInfo(
        name="NEU-Seg (hot-rolled steel strip surface defects)",
        citation='H. Dong et al., "PGA-Net: Pyramid Feature Fusion and Global Context Attention Network for '
        'Automated Surface Defect Detection", IEEE Transactions on Industrial Informatics, 2020.',
        license="Research use; please cite.",
    ),
}
UNKNOWN_SOURCE = SourceInfo(
    name="(not stated)", citation="(not stated)",
    license="Not stated: check the terms of the underlying images before sharing this dataset.",
    license_name="not-stated",
)


def source_info(source: Path, name: str | None = None, license: str | None = None,
                citation: str | None = None, url: str | None = None) -> SourceInfo:
    """The known entry for the source folder's name, with any of its fields overridden."""
    base = KNOWN_SOURCES.get(Path(source).resolve().name, UNKNOWN_SOURCE)
    overrides = {k: v for k, v in {"name": name, "license": license, "citation": citation, "url": url}.items() if v}
    return dataclasses.replace(base, **overrides)


# ------------------------------------------------------------------------------------------- schema and records


def record_features(objects: Sequence[str], defects: Sequence[str]):
    """The records' `datasets.Features`; `object` and `defect` are ClassLabels over the given names."""
    from datasets import ClassLabel, Features, Image as ImageFeature, List, Value

    region = {"mask": ImageFeature(), "defect": ClassLabel(names=sorted(set(defects))),
              "caption": Value("string"), "bbox": List(Value("int32"), length=4)}
    return Features({"image": ImageFeature(), "object": ClassLabel(names=sorted(set(objects))),
                     "regions": List(region), "source": Value("string"), "dropped_regions": Value("int32")})


def png_bytes(array: np.ndarray) -> bytes:
    """PNG-encode a bool mask (as 0/255 8-bit gray), a gray image or an RGB image (gray if its channels agree)."""
    from PIL import Image

    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.ndim == 3 and (array == array[..., :1]).all():
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def region_record(defect: str, object_name: str, region: np.ndarray) -> dict:
    return {"mask": {"bytes": png_bytes(region), "path": None}, "defect": defect,
            "caption": caption(defect, object_name), "bbox": bounding_box(region)}


def label_decoders(dataset):
    """(object decoder, defect decoder): ClassLabel integer -> name (a string column passes through)."""
    features = dataset.features

    def decoder(feature):
        return feature.int2str if hasattr(feature, "int2str") else str

    return decoder(features["object"]), decoder(features["regions"].feature["defect"])


# ------------------------------------------------------------------------------------------- readers


def open_region_dataset(source: str | Path, revision: str | None = None):
    """The DatasetDict at `source`: a `build` folder, a Hub-layout folder, or a Hub dataset repo id."""
    from datasets import load_dataset, load_from_disk

    path = Path(str(source)).expanduser()
    if (path / DATASET_DICT_FILE).is_file():
        return load_from_disk(str(path))
    if path.is_dir():
        return load_dataset(str(path))
    _require_repo_id(str(source))
    return load_dataset(str(source), revision=revision)


def _require_repo_id(text: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        raise DataError(f"{text} is neither a dataset folder on this machine nor a Hub dataset repo id "
                        "('org/name'); build one with `python -m hub.datasets build`.") from None


def open_region_split(source: str | Path, split: str, revision: str | None = None):
    dataset = open_region_dataset(source, revision)
    if split not in dataset:
        raise DataError(f"{source} has no split {split!r}; it has {sorted(dataset)}.")
    return dataset[split]


def read_dataset_candidates(source: str | Path, revision: str | None = None) -> dict[str, list[str]]:
    """{object: [candidate captions]} stored with a split-mask caption dataset (local folder or Hub repo)."""
    path = Path(str(source)).expanduser() / CANDIDATES_FILE
    if not Path(str(source)).expanduser().is_dir():
        _require_repo_id(str(source))
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(str(source), CANDIDATES_FILE, repo_type="dataset", revision=revision))
    if not path.is_file():
        raise DataError(f"{path} not found: build the dataset with `python -m hub.datasets build`, which writes it.")
    candidates = read_json(path)
    if not isinstance(candidates, dict) or not all(isinstance(v, list) and v for v in candidates.values()):
        raise DataError(f"{path} must map each object to a non-empty list of captions.")
    return {str(name): [str(c) for c in captions] for name, captions in candidates.items()}


@dataclass
class RegionRecord:
    """One image of a split-mask caption dataset with its regions, at full resolution."""

    image: torch.Tensor  # 3 x H x W float in [0, 1]
    object: str
    masks: np.ndarray  # N x H x W bool, one per region
    defects: list[str]
    captions: list[str]


def _region_mask(image) -> np.ndarray:
    """A region mask stored as an image (any mode) -> H x W bool, non-zero = inside."""
    array = np.asarray(image)
    return (array.max(axis=-1) if array.ndim == 3 else array) > 0


def iter_region_records(source: str | Path, split: str, revision: str | None = None,
                        include_normal: bool = False) -> Iterator[RegionRecord]:
    """Every image of `split` that has at least one region (and with `include_normal`, the images without
    any: datasets built with --include-normal hold them), decoded, with label names instead of integers."""
    dataset = open_region_split(source, split, revision)
    object_name, defect_name = label_decoders(dataset)
    for row in dataset:
        regions = row["regions"]
        if not regions and not include_normal:
            continue
        image = image_to_tensor(row["image"])
        masks = (np.stack([_region_mask(region["mask"]) for region in regions]) if regions
                 else np.zeros((0, *image.shape[-2:]), bool))
        yield RegionRecord(
            image=image,
            object=object_name(row["object"]),
            masks=masks,
            defects=[defect_name(region["defect"]) for region in regions],
            captions=[region["caption"] for region in regions],
        )


# The app describes a disk of this radius around a click away from every region (regions_ui); normal
# regions include such disks beside the shapes of real regions, so a click on clean surface is covered too.
CLICK_DISK_RADII = (8, 12, 16, 24)


class ShapeBank:
    """Shapes of the real regions seen so far, per object, plus click-like disks: outlines for normal regions.

    Filled while records stream past (no second pass over the images); bounded by `limit` per object.
    """

    def __init__(self, limit: int = 2000, seed: int = 0):
        self.limit = limit
        self.rng = np.random.default_rng([seed, 11])
        self.shapes: dict[str, list[np.ndarray]] = {}

    def add(self, record: RegionRecord) -> None:
        shapes = self.shapes.setdefault(record.object, [disk_shape(r) for r in CLICK_DISK_RADII])
        for mask in record.masks:
            if len(shapes) < self.limit:
                shapes.append(crop_to_box(mask))

    def normal_regions(self, record: RegionRecord, count: int) -> list[np.ndarray]:
        """Up to `count` regions of `record`'s image away from all its defects, with borrowed shapes."""
        shapes = self.shapes.get(record.object) or [disk_shape(r) for r in CLICK_DISK_RADII]
        defects = record.masks.any(axis=0) if len(record.masks) else np.zeros(record.image.shape[-2:], bool)
        return sample_normal_regions(defects, shapes, count, self.rng)


@dataclass
class RegionTable:
    """Every region of a split, resized to the model input once, for fast training.

    `images` (M x 3 x H x W uint8) holds each image once; region r is image `region_image[r]` with
    mask coverage `coverage[r]` (H x W uint8, 255 = fully inside) and caption
    `captions[caption_index[r]]`.
    """

    images: torch.Tensor
    region_image: torch.Tensor
    coverage: torch.Tensor
    caption_index: torch.Tensor
    captions: list[str]
    region_object: list[str] = field(default_factory=list)
    region_defect: list[str] = field(default_factory=list)


def _to_uint8(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor * 255.0).round().clamp(0, 255).to(torch.uint8)


# Donor regions kept per object for mixed-type training images (a bounded pool of recent ones: no
# second pass over the images), and the images kept to surround an image with others.
DONOR_POOL = 300
SURROUND_POOL = 24
DONOR_MARGIN_PX = 8
PLACEMENTS = ("anchored", "random")  # where a mixed-type copy's blended regions land


def loose_region(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A defect region as the app may hand it over: a click disk (CLICK_DISK_RADII) centred on one of its
    pixels, or the mask grown by up to half its box side (a predicted region is wider than the defect).

    Normal regions include click disks, so without these a disk would mean "no defect" by its shape alone.
    """
    from scipy import ndimage

    ys, xs = np.nonzero(mask)
    if rng.random() < 0.5:
        pick = int(rng.integers(len(xs)))
        radius = CLICK_DISK_RADII[int(rng.integers(len(CLICK_DISK_RADII)))]
        yy, xx = np.ogrid[: mask.shape[0], : mask.shape[1]]
        return (xx - xs[pick]) ** 2 + (yy - ys[pick]) ** 2 <= radius**2
    side = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
    grow = int(rng.integers(1, max(2, side // 2) + 1))
    return ndimage.distance_transform_edt(~mask) <= grow


def normal_twins(defects: np.ndarray, regions: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """For each region, the same outline placed on the image's normal surface away from every defect (`defects`:
    N x H x W); a region whose outline fits nowhere clear has no twin."""
    union = np.asarray(defects, bool).any(axis=0)
    placed = (place_normal_region(union, crop_to_box(region), rng) for region in regions)
    return [twin for twin in placed if twin is not None]


class MixAugmenter:
    """Training images the test sets also hold, made from the training split only.

    - `mixed(record)`: the record's image with 1-2 regions of other types (from earlier records of the
      same object) Poisson-blended in away from its own regions: regions of different types in one
      image, so the describer must read the mask to tell them apart. `placement` "anchored" puts each
      at the place it had in its own image (on the same borders; `defectclip.data.transplant`),
      "random" anywhere.
    - `surround(image, masks)`: the image in the centre of a 3 x 3 mosaic of other images of the
      object, so a crop that reaches past the image border sees surface instead of black (the app's
      images and a mosaic's cells do not end where a training image ended).
    """

    def __init__(self, seed: int = 0, placement: str = "anchored"):
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        self.placement = placement
        self.rng = np.random.default_rng([seed, 23])
        self.donors: dict[str, list[tuple[np.ndarray, np.ndarray, str, str, RegionAnchor | None]]] = {}
        self.images: dict[str, list[torch.Tensor]] = {}

    def add(self, record: RegionRecord) -> None:
        image = _to_uint8(record.image)
        pool = self.images.setdefault(record.object, [])
        pool.append(image)
        del pool[:-SURROUND_POOL]
        donors = self.donors.setdefault(record.object, [])
        array = image.permute(1, 2, 0).numpy()
        for mask, caption_text, defect in zip(record.masks, record.captions, record.defects):
            anchor = region_anchor(mask) if self.placement == "anchored" else None
            x0, y0, x1, y1 = bounding_box(mask)
            top, left = max(0, y0 - DONOR_MARGIN_PX), max(0, x0 - DONOR_MARGIN_PX)
            window = (slice(top, y1 + DONOR_MARGIN_PX), slice(left, x1 + DONOR_MARGIN_PX))
            donors.append((np.ascontiguousarray(array[window]), mask[window].copy(), caption_text, defect, anchor))
        del donors[:-DONOR_POOL]

    def mixed(self, record: RegionRecord) -> tuple[torch.Tensor, list[np.ndarray], list[tuple[str, str]]] | None:
        from .data.transplant import blend_regions_into

        present = set(record.captions)
        candidates = [d for d in self.donors.get(record.object, []) if d[2] not in present]
        if not candidates:
            return None
        picks, chosen_types = [], set()
        for index in self.rng.permutation(len(candidates))[:20]:
            donor = candidates[int(index)]
            if donor[2] not in chosen_types:
                picks.append(donor)
                chosen_types.add(donor[2])
            if len(picks) == int(self.rng.integers(1, 3)):
                break
        canvas = _to_uint8(record.image).permute(1, 2, 0).numpy().copy()
        labels = list(zip(record.captions, record.defects))
        image, masks, labels = blend_regions_into(canvas, list(record.masks), labels,
                                                  [(d[0], d[1], (d[2], d[3]), d[4]) for d in picks], self.rng)
        if len(masks) == len(record.masks):
            return None
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0, masks, labels

    def surround(self, object_name: str, image: torch.Tensor, masks: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        pool = self.images.get(object_name, [])
        if len(pool) < 2:
            return image, masks
        channels, height, width = image.shape
        canvas = torch.empty(channels, 3 * height, 3 * width)
        for row in range(3):
            for col in range(3):
                tile = image if (row, col) == (1, 1) else resize(
                    pool[int(self.rng.integers(len(pool)))].float() / 255.0, (height, width))
                canvas[:, row * height:(row + 1) * height, col * width:(col + 1) * width] = tile
        placed = np.zeros((len(masks), 3 * height, 3 * width), bool)
        placed[:, height:2 * height, width:2 * width] = masks
        return canvas, placed


def load_region_views(source: str | Path, split: str, region_inputs, no_defect: dict[str, str] | None = None,
                      normal_per_image: int = 1, max_normal_images: int | None = None, seed: int = 0,
                      revision: str | None = None, mixed: int = 0, surround: float = 0.0,
                      loose: bool = False, placement: str = "anchored", loose_twins: bool = False) -> RegionTable:
    """Every region of a split as the describer sees it: one view (crop and mask coverage) per region
    (`add_region_views` into a new table; see there)."""
    table = ViewTable()
    add_region_views(table, source, split, region_inputs, no_defect, normal_per_image, max_normal_images, seed,
                     revision, mixed, surround, loose, placement, loose_twins)
    return table.finish()


def add_region_views(table: "ViewTable", source: str | Path, split: str, region_inputs,
                     no_defect: dict[str, str] | None = None, normal_per_image: int = 1,
                     max_normal_images: int | None = None, seed: int = 0, revision: str | None = None,
                     mixed: int = 0, surround: float = 0.0, loose: bool = False, placement: str = "anchored",
                     loose_twins: bool = False) -> None:
    """Add every region of a split to `table` as the describer sees it: one view (crop and mask coverage) per region.

    Several datasets added to one table give the same table as `concat_region_tables` of each one's
    `load_region_views`, with half the peak memory: the views are concatenated once, not twice.

    `region_inputs(images, masks)` is the describer's own view function, so training sees exactly what
    evaluation and the app see. With `no_defect` ({object: caption}), each image also gives
    `normal_per_image` normal regions (away from its defects, shapes of real regions, see ShapeBank)
    captioned as that object's no-defect caption; images without defects (datasets built with
    --include-normal) give them too, at most `max_normal_images` such images (default: as many as the
    defective images read before them, so defect-free images never outnumber defective ones; a build
    lists defective images first). `mixed` adds, per image, that many mixed-type copies
    (MixAugmenter.mixed, each with its own donors) with all its regions and a normal one (`placement`:
    where blended regions land); `surround` is the probability that an image is seen inside a mosaic of
    others (MixAugmenter.surround). `loose` adds, per defect region, a loosely drawn copy
    with the same caption (`loose_region`: a click disk on it, or the mask grown), as the app's
    regions are. `loose_twins` gives each loose copy a normal twin of the same outline elsewhere on the
    same image (with `no_defect`): otherwise a click disk is almost always a defect in training, and a click
    on clean surface is read as one by its outline alone.
    """
    views_before = len(table.views)
    bank, augmenter = ShapeBank(seed=seed), MixAugmenter(seed, placement)
    good_images = defective_images = 0
    for record in iter_region_records(source, split, revision, include_normal=bool(no_defect)):
        bank.add(record)
        normal_caption = (no_defect or {}).get(record.object)
        is_good = len(record.masks) == 0
        defective_images += int(not is_good)
        good_cap = defective_images if max_normal_images is None else max_normal_images
        with_normals = bool(normal_caption) and (not is_good or good_images < good_cap)
        good_images += int(is_good and with_normals)
        images = [(record.image, list(record.masks), list(zip(record.captions, record.defects)))]
        if mixed and (not is_good or with_normals):
            extras = (augmenter.mixed(record) for _ in range(mixed))
            images.extend(extra for extra in extras if extra is not None)
        augmenter.add(record)
        for image, masks, labels in images:
            loose_copies = [loose_region(mask, augmenter.rng) for mask in masks[: len(labels)]] if loose else []
            masks, labels = masks + loose_copies, labels + labels[: len(loose_copies)]
            if with_normals:
                defects = np.stack(masks) if masks else np.zeros((0, *image.shape[-2:]), bool)
                normals = bank.normal_regions(RegionRecord(image, record.object, defects, [], []), normal_per_image)
                if loose_twins:
                    normals += normal_twins(defects, loose_copies, augmenter.rng)
                masks, labels = masks + normals, labels + [(normal_caption, "good")] * len(normals)
            if not masks:
                continue
            stacked = np.stack(masks)
            if surround and augmenter.rng.random() < surround:
                image, stacked = augmenter.surround(record.object, image, stacked)
            table.add(region_inputs(image[None].expand(len(stacked), -1, -1, -1), stacked), labels, record.object)
    if len(table.views) == views_before:
        raise DataError(f"Split {split!r} of {source} has no regions to train on.")


def cat_releasing(chunks: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat of `chunks` along the first axis, emptying the list as each chunk is copied, so the
    peak is the result plus one chunk, not twice the result (the training views are many GB)."""
    total = sum(len(chunk) for chunk in chunks)
    out = torch.empty((total, *chunks[0].shape[1:]), dtype=chunks[0].dtype)
    start = 0
    chunks.reverse()  # pop() from the end is cheap
    while chunks:
        chunk = chunks.pop()
        out[start:start + len(chunk)] = chunk
        start += len(chunk)
    return out


class ViewTable:
    """Collects views and labels, then becomes a RegionTable (one image per region)."""

    def __init__(self):
        self.views, self.coverage, self.caption_ids, self.objects, self.defects = [], [], [], [], []
        self.captions: dict[str, int] = {}

    def add(self, inputs: tuple[torch.Tensor, torch.Tensor], labels: list[tuple[str, str]], object_name: str) -> None:
        self.views.append(_to_uint8(inputs[0]))
        self.coverage.append(_to_uint8(inputs[1]))
        for caption_text, defect in labels:
            self.caption_ids.append(self.captions.setdefault(caption_text, len(self.captions)))
            self.objects.append(object_name)
            self.defects.append(defect)

    def finish(self) -> RegionTable:
        return RegionTable(
            images=cat_releasing(self.views), region_image=torch.arange(len(self.caption_ids)),
            coverage=cat_releasing(self.coverage), caption_index=torch.tensor(self.caption_ids),
            captions=list(self.captions), region_object=self.objects, region_defect=self.defects,
        )


def concat_region_tables(tables: Sequence[RegionTable]) -> RegionTable:
    """One table of several (e.g. one per object's dataset), captions merged by their text."""
    captions: dict[str, int] = {}
    parts = []
    for table in tables:
        remap = torch.tensor([captions.setdefault(c, len(captions)) for c in table.captions])
        parts.append(remap[table.caption_index])
    offsets = np.cumsum([0] + [len(t.images) for t in tables[:-1]])
    return RegionTable(
        images=torch.cat([t.images for t in tables]),
        region_image=torch.cat([t.region_image + int(o) for t, o in zip(tables, offsets)]),
        coverage=torch.cat([t.coverage for t in tables]), caption_index=torch.cat(parts), captions=list(captions),
        region_object=[o for t in tables for o in t.region_object], region_defect=[d for t in tables for d in t.region_defect],
    )


def load_region_table(source: str | Path, split: str, preprocess: Preprocess, revision: str | None = None) -> RegionTable:
    """Decode a split and resize images (preprocess interpolation) and masks (coverage) to the model size."""
    from .alphaclip import mask_coverage

    images, region_image, coverage, caption_ids = [], [], [], []
    captions: dict[str, int] = {}
    objects, defects = [], []
    for record in iter_region_records(source, split, revision):
        images.append(_to_uint8(resize(record.image, preprocess.size, preprocess.interpolation)))
        coverage.append(_to_uint8(mask_coverage(record.masks, preprocess.size)))
        for caption_text, defect in zip(record.captions, record.defects):
            region_image.append(len(images) - 1)
            caption_ids.append(captions.setdefault(caption_text, len(captions)))
            objects.append(record.object)
            defects.append(defect)
    if not images:
        raise DataError(f"Split {split!r} of {source} has no regions to train on.")
    return RegionTable(
        images=torch.stack(images), region_image=torch.tensor(region_image), coverage=torch.cat(coverage),
        caption_index=torch.tensor(caption_ids), captions=list(captions), region_object=objects, region_defect=defects,
    )
