"""Few-shot PatchCore: a bank from 1-16 normal references and a threshold from those references alone.

A visitor with a new product has a handful of good images and no labelled defects, so the usual
calibrations (F1 on labelled validation images, a quantile of many normal scores) are unavailable.
The threshold is placed instead between two score distributions made from the references themselves:

- normal: each reference scored against the bank of the *other* references (leave-one-out), plus
  augmented copies of the references (flips, a small crop-and-zoom, a brightness change) until there
  are `MIN_SAMPLES` scores; with a single reference there are no others, so the reference and its
  augmented copies are scored against its own bank with every patch's neighbourhood left out (another
  region of the part stands in for another part; see `Holdout`);
- defective: NSA and CutPaste synthetic defects (defectclip.synth) made from the references, scored
  the same leave-one-out way, so both sides look like "a new image of the product".

The threshold is the equal-error point of Gaussians fitted to the two sets: the score at which a
normal image is as many of its standard deviations above the normal mean as a defective one is below
the defective mean. That is the point a balanced-accuracy criterion asks for (equal false-alarm and
miss rates), and it moves with the spread of each side rather than sitting at an arbitrary margin.

By default the bank's map is blended with the image's self-similarity map (scoring/blend.py: a few
references miss much of how good parts vary; the image's own surface does not), the blend's statistics
taken from the references' held-out maps, and both score sets above are blended scores.

Cost: one feature pass per reference, per augmented copy and per synthetic image; leave-one-out is
cheap because each query's nearest distance is kept per reference block, so removing a reference (or
an outlier) is a minimum over the remaining columns, never a refit. The blend adds one self-similarity
map per threshold sample, 16 of them (three feature passes each: the image and its two mirror images).

Identical references (same decoded pixels) are merged and reported; outlier references (a blank
image, or one whose leave-one-out score is far above the others', e.g. another object) are left out
of the bank and reported, never silently absorbed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..synth import cutpaste, nsa
from ..towers import VisionTower
from ..data import image_to_tensor as as_image_tensor
from .blend import MapBlend
from .errors import ScoringError
from .maps import patch_scores_to_maps
from .patchcore import PatchCore, flatten_patches

MAX_REFERENCES = 16
# Few-shot scoring brings images to the references' exposure by default: benchmarks/results/few_shot.md
DEFAULT_PHOTOMETRIC = "match"
# At least this many normal and this many synthetic-defect scores go into the threshold: fewer make
# the fitted spreads meaningless, more cost a feature pass each (the 16-reference build has 3 s).
MIN_SAMPLES = 8
# A reference whose pixels vary by less than this (gray levels, 0-255) shows no product at all.
BLANK_STD = 2.0
# A reference scoring more than this many times the median leave-one-out score of the references is
# unlike the rest (another object, another view). Median-based, so at most half can be flagged.
OUTLIER_FACTOR = 2.0
MIN_FOR_OUTLIERS = 3  # with two references neither can be called the odd one out
# With one reference, a patch is not compared with the reference's patches within this fraction of the
# grid's longer side around its own position: more than augment's largest shift (15 %). On magnetic tile
# (k = 1, 10 draws) 0.15 / 0.25 / 0.35 gave balanced-accuracy ratios 0.925 / 0.938 / 0.940.
SELF_EXCLUSION = 0.25
# The blend's self-similarity map: its input side, and its exposure left as it is (the reference-free mode's
# map at 224 px rather than 320, to keep the 16-reference build within 3 s: every normal and synthetic
# sample of the threshold needs a map). Matching it to the references' exposure as the bank does, and
# reusing the bank's patches, was measured worse (benchmarks/results/few_shot.md, session 18).
SELF_SIMILARITY_SIZE = 224


class FewShotError(ScoringError):
    """Few-shot references that cannot make a model; the message says what to provide instead."""


def check_reference_count(count: int) -> None:
    """Raise before anything is decoded when the number of references is outside 1-16."""
    if not 1 <= count <= MAX_REFERENCES:
        raise FewShotError(
            f"Few-shot needs 1 to {MAX_REFERENCES} normal reference images of the product, got {count}. "
            + ("Add at least one defect-free image." if count < 1 else f"Keep the {MAX_REFERENCES} most typical ones.")
        )


def content_digest(image: np.ndarray) -> str:
    """sha256 of an image's decoded pixels and shape: the same picture saved twice hashes the same."""
    array = np.ascontiguousarray(image)
    digest = hashlib.sha256(str(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass
class FewShotReport:
    """What a few-shot build did with the references it was given (indices into that list)."""

    given: int
    used: list[int]
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # (index, identical to index)
    outliers: list[tuple[int, str]] = field(default_factory=list)  # (index, why)
    normal_scores: list[float] = field(default_factory=list)
    defect_scores: list[float] = field(default_factory=list)
    threshold: float = float("nan")
    rule: str = ""
    blended: bool = False  # maps (and the threshold's scores) blended with each image's self-similarity

    def messages(self) -> list[str]:
        """Readable lines for the user: merges, outliers and how the threshold was set."""
        lines = [f"Reference {i + 1} is identical to reference {j + 1}: used once." for i, j in self.duplicates]
        lines += [f"Reference {i + 1} left out: {why}." for i, why in self.outliers]
        lines.append(
            f"Bank of {len(self.used)} reference(s); threshold {self.threshold:.3f} ({self.rule}) from "
            f"{len(self.normal_scores)} normal and {len(self.defect_scores)} synthetic-defect scores"
            + ("; maps blended with each image's self-similarity." if self.blended else ".")
        )
        return lines


# --------------------------------------------------------------------------------------------------
# the build


def fit_few_shot(
    images: Sequence[Any],
    tower: str | VisionTower,
    image_size: int | Sequence[int] | None = None,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    photometric: str = DEFAULT_PHOTOMETRIC,
    self_similarity: bool = True,
) -> tuple[PatchCore, FewShotReport]:
    """A PatchCore bank of every patch of the usable references, and its threshold (see module doc).

    `photometric="match"` (the default) brings every image, references and scored ones alike, to the
    references' median brightness and contrast (scoring/photometric.py): a few references cover few
    exposures. `self_similarity` (the default) blends every map with the image's self-similarity map."""
    check_reference_count(len(images))
    arrays = [as_uint8_rgb(image) for image in images]
    # Every reference patch is kept (no coreset, no cap): a few images give too few patches to thin out.
    scorer = PatchCore(tower, image_size=image_size, coreset_ratio=1.0, max_bank_size=None, seed=seed, device=device,
                       photometric=photometric)
    report = FewShotReport(given=len(arrays), used=[])
    candidates = _drop_duplicates(arrays, report)
    candidates = _drop_blank(arrays, candidates, report)
    if not candidates:
        raise FewShotError("Every reference image is blank (a single flat colour); upload photos of the product.")
    scorer.fit_photometric([arrays[i] for i in candidates])  # a median: an outlier reference moves it little
    blocks = embed_patches(scorer, [arrays[i] for i in candidates])
    # Every reference against every reference block, once: the outlier check and the normal scores
    # both read it, each leaving the reference's own block out.
    cross = [block_distances(block, blocks) for block in blocks]
    kept = _drop_outliers(scorer, cross, candidates, report)
    report.used = [candidates[i] for i in kept]
    if len(kept) < len(candidates) and scorer.photometric.mode != "none":
        # The odd reference moved the exposure target: learn it again without it, and embed the kept
        # references again under it (a second pass only when a reference was left out).
        scorer.fit_photometric([arrays[i] for i in report.used])
        blocks = embed_patches(scorer, [arrays[i] for i in report.used])
        cross = [block_distances(block, blocks) for block in blocks]
    else:
        blocks = [blocks[i] for i in kept]
        cross = [cross[i][:, kept] for i in kept]
    references = [arrays[i] for i in report.used]
    holdout = Holdout.of(scorer, blocks, cross)
    rng = np.random.default_rng(seed)
    normal = normal_samples(scorer, references, holdout, rng)
    defective = synthetic_defect_samples(scorer, references, holdout, rng)
    if self_similarity:
        report.normal_scores, report.defect_scores = blended_scores(scorer, evenly_spaced(normal, MIN_SAMPLES), defective)
        report.blended = True
    else:
        report.normal_scores = [sample.score(scorer) for sample in normal]
        report.defect_scores = [sample.score(scorer) for sample in defective]
    report.threshold, report.rule = place_threshold(report.normal_scores, report.defect_scores)
    scorer.memory_bank = torch.cat(blocks).contiguous()
    scorer.coreset_radius = 0.0
    scorer.num_train_images = len(blocks)
    scorer.threshold, scorer.calibration = report.threshold, f"few-shot: {report.rule}"
    return scorer, report


def blended_scores(scorer: PatchCore, normal: list["HeldOut"], defective: list["HeldOut"]) -> tuple[list[float], list[float]]:
    """Set `scorer.self_similarity` from the normal samples' held-out and self-similarity maps, and
    return both sets' blended image scores (what predict will give such images)."""
    from .self_similarity import SelfSimilarity  # it builds on this module

    similarity = SelfSimilarity(scorer.tower, SELF_SIMILARITY_SIZE, mirrors=True, device=scorer.device)
    normal_maps = [sample.map(scorer) for sample in normal]
    normal_self = [similarity.map(sample.image) for sample in normal]
    blend = MapBlend.fitted(similarity.image_size, similarity.mirrors, normal_maps, normal_self)
    scorer.self_similarity, scorer._similarity = blend, similarity
    normal_scores = [float(blend.blend(m, own).max()) for m, own in zip(normal_maps, normal_self)]
    defect_scores = [float(scorer.blended_map(sample.map(scorer), sample.image).max()) for sample in defective]
    return normal_scores, defect_scores


def evenly_spaced(items: list, count: int) -> list:
    """At most `count` of `items`, spread over the list. The blended scores are made for MIN_SAMPLES normal
    samples, not for every one of up to 16 references: each costs a self-similarity map, and the 24 maps
    of a 16-reference build took it over its 3 s (benchmarks/results/few_shot.md, session 18)."""
    if len(items) <= count:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def as_uint8_rgb(image: Any) -> np.ndarray:
    """Any image the scorers accept -> H x W x 3 uint8 (what hashing and synthesis work on)."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image
    tensor = as_image_tensor(image)
    return (tensor.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def _drop_duplicates(arrays: list[np.ndarray], report: FewShotReport) -> list[int]:
    first_seen: dict[str, int] = {}
    unique = []
    for index, array in enumerate(arrays):
        digest = content_digest(array)
        if digest in first_seen:
            report.duplicates.append((index, first_seen[digest]))
        else:
            first_seen[digest] = index
            unique.append(index)
    return unique


def _drop_blank(arrays: list[np.ndarray], candidates: list[int], report: FewShotReport) -> list[int]:
    kept = []
    for index in candidates:
        if float(arrays[index].std()) < BLANK_STD:
            report.outliers.append((index, "blank image (a single flat colour), not the product"))
        else:
            kept.append(index)
    return kept


def _drop_outliers(scorer: PatchCore, cross: list[torch.Tensor], candidates: list[int], report: FewShotReport) -> list[int]:
    """Indices (into `cross`) of the references kept after the leave-one-out outlier check."""
    if len(cross) < MIN_FOR_OUTLIERS:
        return list(range(len(cross)))
    scores = np.array([image_score(scorer, distances, own=i) for i, distances in enumerate(cross)])
    typical = float(np.median(scores))
    kept = []
    for i, score in enumerate(scores):
        if score > OUTLIER_FACTOR * typical:
            report.outliers.append((
                candidates[i],
                f"unlike the other references (score {score:.2f} against them, typical {typical:.2f}): "
                "another object or view?",
            ))
        else:
            kept.append(i)
    return kept


# --------------------------------------------------------------------------------------------------
# features and leave-one-out scores


@torch.no_grad()
def embed_patches(scorer: PatchCore, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
    """One feature pass per image: each image's patches as a (h w) x C block."""
    blocks = []
    for start in range(0, len(images), scorer.batch_size):
        batch = [as_image_tensor(image) for image in images[start : start + scorer.batch_size]]
        affines = [scorer.photometric.affine(image) for image in batch]
        # the exact tower, as PatchCore.fit uses: the bank and its threshold do not depend on the machine
        embedding = scorer.features.embed(scorer.features.model_input(batch, scorer.device, affines=affines), exact=True)
        patches = flatten_patches(embedding).view(len(batch), -1, embedding.shape[1])
        blocks.extend(patches.unbind(0))
    return blocks


def block_distances(queries: torch.Tensor, blocks: Sequence[torch.Tensor],
                    excluded: torch.Tensor | None = None) -> torch.Tensor:
    """P x B: each query patch's distance to its nearest patch in each reference block; `excluded` (one
    block only, P x P) marks the block patches each query patch may not match.

    Kept per block so that any reference can be left out afterwards by a minimum over the rest. Each
    block costs one matrix product, |q - b|^2 = |q|^2 + |b|^2 - 2 q.b, and a minimum: one image's
    block of products stays in the cache (one product against the whole bank was measured 1.5x
    slower, an argmin plus an exact recomputation 2x slower than the plain minimum). The expanded
    form's rounding is ~1e-5 of |q||b|, far below the spread of the scores the threshold is set from.
    """
    query_sq = queries.pow(2).sum(1, keepdim=True)
    nearest = []
    for block in blocks:
        squared = torch.addmm(block.pow(2).sum(1), queries, block.T, beta=1.0, alpha=-2.0)
        if excluded is not None:
            squared = squared.masked_fill_(excluded, torch.inf)
        nearest.append(squared.amin(dim=1))
    return (torch.stack(nearest, dim=1) + query_sq).clamp_min_(0).sqrt_()


def image_score(scorer: PatchCore, distances: torch.Tensor, own: int | None = None) -> float:
    """The image score PatchCore's predict gives (maximum of the smoothed map at model size) for a
    query whose P x B block distances are given, leaving reference block `own` out of the bank."""
    return nearest_score(scorer, nearest_without(distances, own))


def nearest_score(scorer: PatchCore, nearest: torch.Tensor) -> float:
    """One image's per-patch nearest distances (P) -> the maximum of its smoothed map at model size."""
    return float(patch_map(scorer, nearest, tuple(scorer.preprocess.size)).max())


def nearest_without(distances: torch.Tensor, own: int | None) -> torch.Tensor:
    """P x B block distances -> each patch's nearest distance with block `own` left out (None, or a
    single block: nothing to leave out)."""
    if own is not None and distances.shape[1] > 1:
        distances = distances.clone()
        distances[:, own] = torch.inf
    return distances.min(dim=1).values


def patch_map(scorer: PatchCore, nearest: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """One image's per-patch scores (P, model-size grid) -> its smoothed map at `size`, as PatchCore makes it."""
    grid = nearest.view(1, *patch_grid(scorer, nearest.numel()))
    return patch_scores_to_maps(grid, tuple(scorer.preprocess.size), [size], scorer.sigma,
                                scorer.features.centre_offset())[0]


def patch_grid(scorer: PatchCore, count: int) -> tuple[int, int]:
    """The h x w patch grid of one image at the model input size."""
    stride = min(scorer.tower.stages[name].reduction for name in scorer.layers)
    height, width = scorer.preprocess.size
    grid = (-(-height // stride), -(-width // stride))
    if grid[0] * grid[1] != count:  # towers that pad differently: trust the feature count
        side = int(round(count**0.5))
        grid = (side, count // side)
    return grid


@dataclass
class Holdout:
    """Which bank entries a query made from reference i must not see, so that it is scored like an
    image the bank has never seen.

    With two or more references the bank blocks are the references and a query from reference i
    leaves block i out. With one reference, another region of the part stands in for another part:
    each query patch is compared with every reference patch except those within `SELF_EXCLUSION` of
    the grid around its own position, so no patch meets its own pixels (queries are the reference and
    unflipped copies of it, whose content moves by at most 15 % of the side) while the rest of the bank,
    borders included, stays available as it will be for a new image.
    """

    blocks: list[torch.Tensor]
    cross: list[torch.Tensor]  # reference i against every block: P x B
    excluded: torch.Tensor | None = None  # one reference: P x P, True where a patch must not match

    @classmethod
    def of(cls, scorer: PatchCore, blocks: list[torch.Tensor], cross: list[torch.Tensor]) -> "Holdout":
        if len(blocks) > 1:
            return cls(blocks, cross)
        return cls(blocks, cross, neighbourhood(patch_grid(scorer, blocks[0].shape[0])))

    @property
    def single(self) -> bool:
        return self.excluded is not None

    def distances(self, query: torch.Tensor) -> torch.Tensor:
        """P x 1 (one reference: nearest allowed patch) or P x B (nearest patch per reference block)."""
        return block_distances(query, self.blocks, self.excluded)

    def sample(self, image: np.ndarray, query: torch.Tensor, reference: int) -> "HeldOut":
        """`image` (its patches `query`, made from reference `reference`) scored without its reference."""
        return HeldOut.of(image, self.distances(query), None if self.single else reference)


@dataclass
class HeldOut:
    """An image made from a reference (the reference itself, an augmented or a synthetic-defect copy) and
    each of its patches' distance to the bank with that reference left out: what a new image would get."""

    image: np.ndarray
    nearest: torch.Tensor  # P

    @classmethod
    def of(cls, image: np.ndarray, distances: torch.Tensor, own: int | None) -> "HeldOut":
        return cls(image, nearest_without(distances, own))

    def score(self, scorer: PatchCore) -> float:
        """The image score PatchCore's predict gives (maximum of the smoothed map at model size)."""
        return nearest_score(scorer, self.nearest)

    def map(self, scorer: PatchCore) -> np.ndarray:
        """The map predict gives, at the image's own size."""
        return patch_map(scorer, self.nearest, self.image.shape[:2])


def neighbourhood(grid: tuple[int, int]) -> torch.Tensor:
    """P x P: True where two patches of an h x w grid lie within SELF_EXCLUSION of the longer side (on a
    grid of a few patches, less: every patch must keep patches it may match)."""
    height, width = grid
    longer = max(height, width)
    radius = min(max(1, round(SELF_EXCLUSION * longer)), max(0, longer // 2 - 1))
    rows, cols = torch.arange(height * width) // width, torch.arange(height * width) % width
    return ((rows[:, None] - rows[None, :]).abs() <= radius) & ((cols[:, None] - cols[None, :]).abs() <= radius)


def normal_samples(scorer: PatchCore, references: list[np.ndarray], holdout: Holdout,
                   rng: np.random.Generator) -> list[HeldOut]:
    """The references held out, then augmented copies of them, MIN_SAMPLES at least."""
    if holdout.single:
        samples = [holdout.sample(references[0], holdout.blocks[0], 0)]
    else:
        samples = [HeldOut.of(references[i], distances, i) for i, distances in enumerate(holdout.cross)]
    sources = [i % len(references) for i in range(max(0, MIN_SAMPLES - len(samples)))]
    # One reference is held out by position, which a flip would scramble.
    images = [augment(references[i], rng, flips=not holdout.single) for i in sources]
    augmented = embed_patches(scorer, images)
    return samples + [holdout.sample(image, query, i) for image, query, i in zip(images, augmented, sources)]


def synthetic_defect_samples(scorer: PatchCore, references: list[np.ndarray], holdout: Holdout,
                             rng: np.random.Generator) -> list[HeldOut]:
    """NSA and CutPaste defects made from the references, held out (MIN_SAMPLES)."""
    sources = [i % len(references) for i in range(MIN_SAMPLES)]
    images = [_synthetic_defect(references, i, n, rng) for n, i in enumerate(sources)]
    embedded = embed_patches(scorer, images)
    return [holdout.sample(image, query, i) for image, query, i in zip(images, embedded, sources)]


def synthetic_copies(references: Sequence[Any], seed: int = 0, count: int = MIN_SAMPLES) -> list[np.ndarray]:
    """`count` NSA / CutPaste defective images made from normal references (for any scorer)."""
    arrays = [as_uint8_rgb(image) for image in references]
    rng = np.random.default_rng(seed)
    return [_synthetic_defect(arrays, n % len(arrays), n, rng) for n in range(count)]


def _synthetic_defect(references: list[np.ndarray], i: int, n: int, rng: np.random.Generator) -> np.ndarray:
    if len(references) > 1:
        # A reference with a patch of another one blended in (the NSA recipe).
        base, donor = references[i], references[(i + 1) % len(references)]
    else:
        # One reference: the defects go onto augmented copies, as its normal scores do, with the
        # patch cut from yet another copy.
        base, donor = augment(references[i], rng, flips=False), augment(references[i], rng)
    method = nsa if n % 2 == 0 else cutpaste  # alternate blended and hard-edged patches
    return method(base, donor, rng)[0]


def augment(image: np.ndarray, rng: np.random.Generator, flips: bool = True) -> np.ndarray:
    """Another plausible photo of the same good part: a flip, a 85-95 % crop zoomed back, and light
    that falls off across the part (a gain ramp of 0.9-1.1 from one side to the other). A ramp rather
    than one gain: exposure matching (photometric "match") undoes a uniform gain, not uneven light."""
    height, width = image.shape[:2]
    flip = int(rng.integers(0, 4)) if flips else 0
    out = image[::-1] if flip & 1 else image
    out = out[:, ::-1] if flip & 2 else out
    scale = rng.uniform(0.85, 0.95)
    crop_h, crop_w = max(1, int(height * scale)), max(1, int(width * scale))
    top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
    crop = np.ascontiguousarray(out[top : top + crop_h, left : left + crop_w])
    zoomed = np.asarray(Image.fromarray(crop).resize((width, height), Image.BILINEAR), dtype=np.float32)
    start, end = rng.uniform(0.9, 1.1, size=2)
    horizontal = bool(rng.integers(0, 2))
    ramp = np.linspace(start, end, width if horizontal else height, dtype=np.float32)
    gain = ramp[None, :, None] if horizontal else ramp[:, None, None]
    return np.clip(zoomed * gain, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# the threshold


def place_threshold(normal: Sequence[float], defective: Sequence[float]) -> tuple[float, str]:
    """The equal-error point between Gaussians fitted to the two score sets (see module doc).

    When the synthetic defects score no higher than the normal samples on average they behaved as
    normal images (a pasted patch of good texture can look like good texture): both sets are then
    pooled as normal evidence and the threshold is one standard deviation above their mean, and the
    rule says so. (Measured on magnetic tile, 120-image test subset, 5 draws of k = 1, 2, 4: pooling
    gave the best worst draw among the fallbacks tried, 0.87 of the best balanced accuracy, where
    "highest normal score + 1 sd" fell to 0.77.)
    """
    normal, defective = np.asarray(normal, np.float64), np.asarray(defective, np.float64)
    if normal.size == 0 or defective.size == 0:
        raise FewShotError("The threshold needs both normal and synthetic-defect scores.")
    mean_n, mean_d = normal.mean(), defective.mean()
    if mean_d <= mean_n:
        pooled = np.concatenate([normal, defective])
        return float(pooled.mean() + pooled.std()), "synthetic defects scored as normal: pooled mean + 1 sd"
    # A floor on the spreads keeps a set of identical scores from pinning the threshold to itself.
    floor = 1e-3 * max(abs(mean_n), abs(mean_d), 1e-6)
    std_n, std_d = max(normal.std(), floor), max(defective.std(), floor)
    return float((mean_n * std_d + mean_d * std_n) / (std_n + std_d)), "equal-error point, normal vs synthetic"
