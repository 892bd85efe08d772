"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

fit: locally averaged mid-level patch features of every normal image -> a memory bank, thinned to
`coreset_ratio` of its size (at most `max_bank_size` entries) by greedy k-center selection on a
random projection.
predict: each test patch's distance to its nearest bank entry -> patch map -> upsampled, smoothed
(sigma = 4 px) -> image score = the map's maximum, or the paper's reweighted score (`reweight=True`).

The two costly steps are written for a CPU as much as for a GPU:
- the k-center selection costs one matrix-vector product per selected point (squared norms computed
  once, a running minimum kept in place). On a large training set (hundreds of thousands of patches)
  it runs in two stages so that each product reads numbers that sit in the cache: k-center within
  cache-sized chunks keeps a few candidates per final entry, then k-center over the candidates;
- the nearest-neighbour search is one matrix product per block of queries x bank entries whose
  result is already the squared distance. Where the CPU multiplies bfloat16 matrices in hardware
  (AMX), the product runs in bfloat16 with float32 accumulation (5,000 entries: ~3 instead of ~14 ms
  an image on one thread; distances 0.07 % off on average, image AUROC within 0.02 point of the exact
  search on the full magnetic tile), otherwise in float32. On such CPUs a small C kernel
  (scoring/native, built on first use) does the same products and keeps only each query's minimum,
  never writing the score matrix: about half the time again, and float32 distances between the
  bfloat16-rounded vectors (0.005 % off instead of 0.07 %).
The backbone itself runs as `inference` says (see inference.py): on such CPUs a BatchNorm-folded
bfloat16 copy of the tower scores images; fit always extracts with the exact float32 tower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..towers import OFFLINE_VISION, VisionTower
from ..errors import ArtifactError
from ..schema import Config, check_tensor
from .base import FeatureScorer, resolve_device
from .errors import ScoringError
from .inference import bf16_kernels_available
from .maps import DEFAULT_SIGMA
from . import native
from .photometric import Photometric
from .plan import InputPlan

DEFAULT_CORESET_RATIO = 0.1
DEFAULT_MAX_BANK_SIZE = 5000
DEFAULT_PROJECTION_DIM = 128
DEFAULT_NUM_NEIGHBORS = 9
# One block of the nearest-neighbour search holds query_chunk x bank_chunk scores: 4M floats (16 MB)
# keeps it near the cache while keeping the number of ops per image small (each op has a fixed cost,
# large on a busy CPU where every multi-threaded op waits for its slowest thread).
BLOCK_ELEMENTS = 1 << 22
BANK_CHUNK = 4096
SEARCH_MODES = ("auto", "exact", "bf16", "amx")
CPU_BATCH_SIZE = 8
GPU_BATCH_SIZE = 32


# --------------------------------------------------------------------------------------------------
# coreset selection


@dataclass
class Coreset:
    """Indices of the selected points, in selection order, and the covering radius they reach:
    every point lies within `radius` of a selected one (in the space the selection ran in)."""

    indices: torch.Tensor
    radius: float


def coreset_size(num_points: int, ratio: float, max_size: int | None = None) -> int:
    """`ratio` of the points, at most `max_size` of them (None = no cap), at least one."""
    if not 0 < ratio <= 1:
        raise ScoringError(f"coreset_ratio must be in (0, 1], got {ratio}.")
    if max_size is not None and max_size < 1:
        raise ScoringError(f"max_bank_size must be at least 1 (or None for no cap), got {max_size}.")
    count = int(num_points * ratio)
    if max_size is not None:
        count = min(count, max_size)
    return max(1, min(num_points, count))


def random_projection(features: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Gaussian Johnson-Lindenstrauss projection to `dim` dimensions (unchanged if already that small).

    Distances between patches are kept up to a small distortion, which is all the k-center selection
    needs, while each of its steps reads fewer numbers.
    """
    if dim <= 0 or features.shape[1] <= dim:
        return features
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(features.shape[1], dim, generator=generator) / math.sqrt(dim)
    return features @ matrix.to(features.device, features.dtype)


def greedy_k_center(points: torch.Tensor, count: int, start: int = 0) -> Coreset:
    """Gonzalez' greedy k-center: repeatedly add the point farthest from all centers chosen so far.

    Each step costs one matrix-vector product over the points plus one in-place minimum: with the
    points stored as [x, 1] and the center as [-2c, |c|^2], `addmv(|x|^2, [x, 1], [-2c, |c|^2])` is
    |x - c|^2 for every point at once. The product reads the N x d points once per step, which is
    what bounds the time on a CPU (an elementwise |x - c| reads and writes them three times, and
    every extra pass over N numbers is one more multi-threaded op to synchronise). A per-point
    triangle-inequality pruning was measured and lost: on real patch features most points stay
    candidates for most steps, and gathering them costs more than the product.
    """
    num_points, dim = points.shape
    if not 1 <= count <= num_points:
        raise ScoringError(f"Cannot select {count} centers from {num_points} points.")
    # Stored as (d + 1) x N and used through its transpose: BLAS's transposed matrix-vector kernel
    # then streams each row once in order, measured 3-5x faster on a CPU than the N x (d + 1) layout
    # (e.g. 0.41 vs 1.9 ms per step for 23,520 points, one thread).
    ones = torch.ones(num_points, 1, device=points.device, dtype=points.dtype)
    augmented = torch.cat([points, ones], dim=1).T.contiguous().T
    squared_norms = points.pow(2).sum(1)
    center = torch.empty(dim + 1, device=points.device, dtype=points.dtype)
    min_sq, scratch = torch.empty_like(squared_norms), torch.empty_like(squared_norms)
    selected = torch.empty(count, dtype=torch.long, device=points.device)
    new = torch.tensor(start, device=points.device)
    for step in range(count):
        selected[step] = new
        torch.mul(points[new], -2.0, out=center[:dim])
        center[dim] = squared_norms[new]
        if step == 0:
            torch.addmv(squared_norms, augmented, center, out=min_sq)
        else:
            torch.minimum(min_sq, torch.addmv(squared_norms, augmented, center, out=scratch), out=min_sq)
        min_sq[new] = 0.0  # rounding could leave a tiny positive value and pick the point again
        new = torch.argmax(min_sq)
    return Coreset(selected, float(min_sq.max().clamp_min(0).sqrt()))


# Two-stage selection (see select_coreset): candidates kept per final entry, points per chunk, and the
# dimension the chunks are projected to. 4,096 points x 33 floats = 0.5 MB sits in one core's L2 cache,
# so every step of a chunk's selection reads cached numbers instead of RAM, and a chunk's cost grows
# with its size squared (stage one took 6.4 s CPU with 12,544-point chunks, 1.8 s with 3,136).
# Measured on the full magnetic tile (497,840 patches -> 5,000 entries, one thread): one-stage greedy
# takes 101 s of CPU. The candidate count is the largest of 8 / 16 / 32 per entry whose selection
# stays within half of the 60 s fit budget for a full category (31 s; 8 took 8 s, 16 took 14 s): more
# candidates leave the final greedy step more to choose from, and it moved image AUROC from
# 89.46 to 90.15, pixel AUROC from 77.87 to 78.65 and AUPRO from 64.60 to 65.05 (3 seeds, each seed
# better; one-stage greedy, seed 0: 91.17). benchmarks/results/patchcore_speed.md.
CANDIDATES_PER_ENTRY = 32
CHUNK_POINTS = 4096
CHUNK_PROJECTION_DIM = 32


def select_coreset(
    features: torch.Tensor,
    ratio: float,
    projection_dim: int = DEFAULT_PROJECTION_DIM,
    seed: int = 0,
    max_size: int | None = None,
) -> Coreset:
    """Pick `ratio` of the patch features (at most `max_size`) by greedy k-center on a seeded random
    projection.

    With many more points than CANDIDATES_PER_ENTRY x the requested count, the selection runs in two
    stages: greedy k-center within each cache-sized chunk keeps CANDIDATES_PER_ENTRY x count
    candidates in all (spread over the chunks by size), then greedy k-center over the candidates picks
    the final entries. One-stage greedy reads every point once per selected entry, from memory once
    the points outgrow the cache (5,000 steps x 250 MB for a full MVTec category); each stage here
    works on cached blocks. Every point is then within the chunk radius of a candidate and every
    candidate within the final radius of an entry; `radius` is their sum (each measured in its own
    projection, so an estimate of the covering radius rather than a bound). Measured on real patch
    features the two-stage coverage matches the one-stage selection's (see benchmarks/results).
    """
    num_points = features.shape[0]
    count = coreset_size(num_points, ratio, max_size)
    if count == num_points:
        return Coreset(torch.arange(count, device=features.device), 0.0)
    generator = torch.Generator().manual_seed(seed)
    if num_points < 2 * CANDIDATES_PER_ENTRY * count or num_points <= CHUNK_POINTS:
        projected = random_projection(features, projection_dim, seed).contiguous()
        start = int(torch.randint(num_points, (1,), generator=generator))
        return greedy_k_center(projected, count, start)
    candidates, chunk_radius = chunked_candidates(features, CANDIDATES_PER_ENTRY * count, seed, generator)
    projected = random_projection(features[candidates], projection_dim, seed).contiguous()
    start = int(torch.randint(candidates.numel(), (1,), generator=generator))
    final = greedy_k_center(projected, count, start)
    return Coreset(candidates[final.indices], final.radius + chunk_radius)


def chunked_candidates(
    features: torch.Tensor, total: int, seed: int, generator: torch.Generator
) -> tuple[torch.Tensor, float]:
    """About `total` indices chosen by greedy k-center within consecutive CHUNK_POINTS-point chunks
    (each chunk keeps its share, at least one), and the largest radius any chunk reached.

    The chunks are projected to CHUNK_PROJECTION_DIM dimensions: this stage only has to keep good
    candidates, and the final selection then measures distances on a finer projection.
    """
    num_points = features.shape[0]
    projected = random_projection(features, CHUNK_PROJECTION_DIM, seed + 1)
    chosen, radius = [], 0.0
    for begin in range(0, num_points, CHUNK_POINTS):
        chunk = projected[begin : begin + CHUNK_POINTS].contiguous()
        keep = min(chunk.shape[0], max(1, round(chunk.shape[0] * total / num_points)))
        start = int(torch.randint(chunk.shape[0], (1,), generator=generator))
        selection = greedy_k_center(chunk, keep, start)
        chosen.append(selection.indices + begin)
        radius = max(radius, selection.radius)
    return torch.cat(chosen), radius


# --------------------------------------------------------------------------------------------------
# nearest-neighbour search


def nearest_neighbours(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    bank_chunk: int = BANK_CHUNK,
    block_elements: int = BLOCK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances and indices of each query's `k` nearest bank rows, nearest first.

    Memory is bounded by one block of `block_elements` scores (bank_chunk bank rows x as many queries
    as fill the block) whatever the sizes. Within a block the ranking uses |b|^2 - 2 q.b (|q|^2 is the same for every b of a query), which one matrix product
    computes; the reported distances are then recomputed exactly from the chosen rows, so the
    expanded form's rounding error never reaches the scores.
    """
    if bank.shape[0] == 0:
        raise ScoringError("The memory bank is empty.")
    k = min(k, bank.shape[0])
    bank_chunk = min(bank_chunk, bank.shape[0])
    query_chunk = max(1, block_elements // bank_chunk)
    bank_sq = bank.pow(2).sum(1)
    indices = torch.cat([
        _nearest_in_chunks(queries[start : start + query_chunk], bank, bank_sq, k, bank_chunk)
        for start in range(0, queries.shape[0], query_chunk)
    ]) if queries.shape[0] else torch.empty(0, k, dtype=torch.long, device=queries.device)
    distances = torch.linalg.vector_norm(queries[:, None, :] - bank[indices], dim=2)
    if k == 1:
        return distances, indices
    # Re-sort by the exact distances (the expanded form may swap near-ties).
    distances, order = distances.sort(dim=1)
    return distances, indices.gather(1, order)


def _nearest_in_chunks(
    queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor, k: int, bank_chunk: int
) -> torch.Tensor:
    best_val = torch.full((queries.shape[0], 0), math.inf, device=queries.device, dtype=queries.dtype)
    best_idx = torch.empty((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    for start in range(0, bank.shape[0], bank_chunk):
        block = bank[start : start + bank_chunk]
        scores = torch.addmm(bank_sq[start : start + bank_chunk], queries, block.T, beta=1.0, alpha=-2.0)
        if k == 1:
            val, idx = scores.min(dim=1, keepdim=True)
        else:
            val, idx = scores.topk(min(k, block.shape[0]), dim=1, largest=False)
        best_val, best_idx = _merge_best(best_val, best_idx, val, idx + start, k)
    return best_idx


def _merge_best(best_val, best_idx, val, idx, k):
    if best_val.shape[1] == 0:
        return val, idx
    if k == 1:
        better = val < best_val
        return torch.where(better, val, best_val), torch.where(better, idx, best_idx)
    values = torch.cat([best_val, val], dim=1)
    order = values.topk(k, dim=1, largest=False).indices
    return values.gather(1, order), torch.cat([best_idx, idx], dim=1).gather(1, order)


# --------------------------------------------------------------------------------------------------
# low-precision nearest-neighbour distances

# The bfloat16 search multiplies bank chunks of LOW_BANK_CHUNK rows by query chunks of this many rows.
# Measured on a 2 MB-L2 AMX CPU (one thread, 784 queries x 5,000 bank rows, inside predict): one
# product over the whole bank (8,192 x 1,024 bf16 scores at most, 16 MB) beat 1,024- and 512-row
# bank blocks (2.2-2.8 vs 2.8-3.3 ms): oneDNN's AMX kernel blocks for cache itself.
LOW_QUERY_CHUNK = 1024
LOW_BANK_CHUNK = 8192
# Row width is padded with zeros to a multiple of this: AMX multiplies bfloat16 in 32-wide tiles of
# the inner dimension, and a ragged width (152 features + 4 norm columns = 156) took 2.1 ms where 160
# took 1.2 ms for the same 784 x 5,000 product. Zero columns add nothing to any product.
LOW_ROW_ALIGN = 32


def bf16_matmul_is_fast(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run in hardware here: Intel AMX tiles on a CPU.

    Without them a CPU emulates bfloat16 and the float32 search is faster. GPUs keep the exact
    float32 search, which is not their bottleneck.
    """
    return bf16_kernels_available(device)


def _split_bf16(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values ~ high + low, both bfloat16: together they keep about 16 bits of each float32."""
    high = values.to(torch.bfloat16)
    return high, (values - high.float()).to(torch.bfloat16)


def _rows_with_norms(vectors: torch.Tensor, scale: float, norms_first: bool) -> torch.Tensor:
    """bfloat16 rows [scale v~, 1, 1, |v~|^2 high, |v~|^2 low, 0...] (or the norms before the ones),
    v~ = v in bfloat16, zero-padded to a multiple of LOW_ROW_ALIGN columns.

    The squared norm is that of the rounded vector, so the product of a bank row and a query row is
    exactly |q~ - b~|^2 up to float32 accumulation; it is carried in two parts because it is ~4x
    larger than the squared distances (about 2,000 vs 500 on ImageNet CNN features) and one bfloat16
    (8 bits) would lose the distance in its rounding.
    """
    count, dim = vectors.shape
    width = -(-(dim + 4) // LOW_ROW_ALIGN) * LOW_ROW_ALIGN
    rows = torch.zeros(count, width, dtype=torch.bfloat16, device=vectors.device)
    features, extra = rows[:, :dim], rows[:, dim : dim + 4]
    features.copy_(vectors)  # the rounding to bfloat16
    high, low = _split_bf16(features.float().pow_(2).sum(1))
    if scale != 1.0:
        features.mul_(scale)  # x -2 is exact in bfloat16
    norm_columns = (0, 1) if norms_first else (2, 3)
    one_columns = (2, 3) if norms_first else (0, 1)
    extra[:, norm_columns[0]], extra[:, norm_columns[1]] = high, low
    extra[:, one_columns[0]], extra[:, one_columns[1]] = 1.0, 1.0
    return rows


def bf16_bank(bank: torch.Tensor) -> torch.Tensor:
    """The bank as bfloat16 rows [-2 b~, |b~|^2 (high), |b~|^2 (low), 1, 1, 0...]: times a query row
    [q~, 1, 1, |q~|^2 (high), |q~|^2 (low), 0...] this is |b~|^2 - 2 q~.b~ + |q~|^2 = |q~ - b~|^2."""
    return _rows_with_norms(bank.float(), -2.0, norms_first=True)


def nearest_distances_bf16(queries: torch.Tensor, prepared_bank: torch.Tensor) -> torch.Tensor:
    """Each query's Euclidean distance to its nearest bank row, from bfloat16 products.

    `prepared_bank` comes from bf16_bank. The distance is the one between the bfloat16-rounded query
    and bank row (8-bit mantissa: each moves by at most 0.4 % of its norm, so a distance moves by at
    most 0.4 % of the two norms, typically far less) with float32 accumulation, rounded to bfloat16
    on output (0.2 % of the squared distance). Measured on magnetic-tile patch features: 0.07 % mean
    relative error, image AUROC within 0.02 point over 3 seeds (benchmarks/results/patchcore_speed.md).
    A query equal to a bank row is at distance ~0.
    Only the minimum is kept per block, and it is taken on the bfloat16 bits read as int16: for
    non-negative floats the two orders agree, and the int16 reduction is vectorised where the
    bfloat16 one is not (0.34 vs 1.5 ms for 784 x 5,000 scores, one thread). A squared distance that
    rounding made negative reads as a negative int16, so it still wins, and it is clamped to 0.
    """
    if prepared_bank.shape[0] == 0:
        raise ScoringError("The memory bank is empty.")
    out = []
    for begin in range(0, queries.shape[0], LOW_QUERY_CHUNK):
        rows = _rows_with_norms(queries[begin : begin + LOW_QUERY_CHUNK].float(), 1.0, norms_first=False)
        best = None
        for start in range(0, prepared_bank.shape[0], LOW_BANK_CHUNK):
            # bank rows x queries, not the transpose: the query rows (784 x 160 bf16, 250 KB) then
            # stay in L2 while the bank streams through once, where queries x bank re-read the whole
            # bank per block of queries. Measured inside predict, right after the backbone has
            # flushed the caches: 2.2-2.8 vs 3.6-4.3 ms for 784 queries x 5,000 rows, one thread.
            scores = prepared_bank[start : start + LOW_BANK_CHUNK] @ rows.T
            nearest = scores.view(torch.int16).amin(dim=0)
            best = nearest if best is None else torch.minimum(best, nearest, out=best)
        out.append(best.view(torch.bfloat16).float().clamp_min_(0.0).sqrt_())
    return torch.cat(out) if out else torch.empty(0, device=queries.device)


def reweighted_image_scores(
    patches: torch.Tensor, distances: torch.Tensor, neighbours: torch.Tensor, bank: torch.Tensor, num_neighbors: int
) -> torch.Tensor:
    """The PatchCore paper's image score (eq. 7): the largest patch distance s*, scaled down when the
    bank entry m* it matched sits in a dense part of the bank (an ordinary patch), i.e.
    s = (1 - exp|m_test - m*| / sum over the b neighbours m of m* of exp|m_test - m|) * s*.

    patches: N x P x C, distances / neighbours: N x P (nearest bank row of every patch).
    """
    rows = torch.arange(patches.shape[0], device=patches.device)
    worst = distances.argmax(dim=1)
    worst_patch = patches[rows, worst]
    matched = bank[neighbours[rows, worst]]
    _, support = nearest_neighbours(matched, bank, k=num_neighbors)  # support[:, 0] is m* itself
    support_dist = torch.linalg.vector_norm(worst_patch[:, None, :] - bank[support], dim=2)
    weight = 1.0 - torch.softmax(support_dist, dim=1)[:, 0]
    return weight * distances[rows, worst]


# --------------------------------------------------------------------------------------------------
# the scorer


class PatchCore(FeatureScorer):
    """PatchCore anomaly scorer.

    >>> model = PatchCore("offline:efficientnet_lite0", image_size=256).fit(normal_images)
    >>> model.memory_bank.shape                        # 10 % of the patches, at most 5,000
    >>> model.calibrate(val_images, val_labels)
    >>> results = model.predict(test_images)          # list of AnomalyResult
    >>> model.save_pretrained("runs/patchcore-tile"); PatchCore.from_pretrained("runs/patchcore-tile")
    """

    model_type = "patchcore"
    default_reductions = (8, 16)
    local_average = True
    method_config_keys = {
        "coreset_ratio", "max_bank_size", "projection_dim", "reweight", "num_neighbors", "bank_size", "feature_dim",
        "coreset_radius",
    }
    state_keys = {"memory_bank"}
    constructor_keys = ("coreset_ratio", "max_bank_size", "projection_dim", "reweight", "num_neighbors")
    bf16_features = True  # measured: benchmarks/results/vs_anomalib_full.md (image AUROC vs the exact path)

    def __init__(
        self,
        tower: str | VisionTower = OFFLINE_VISION,
        layers: Sequence[str] | None = None,
        image_size: int | Sequence[int] | None = None,
        coreset_ratio: float = DEFAULT_CORESET_RATIO,
        max_bank_size: int | None = DEFAULT_MAX_BANK_SIZE,
        projection_dim: int = DEFAULT_PROJECTION_DIM,
        sigma: float = DEFAULT_SIGMA,
        reweight: bool = False,
        num_neighbors: int = DEFAULT_NUM_NEIGHBORS,
        seed: int = 0,
        device: str | torch.device | None = "auto",
        batch_size: int | None = None,
        search: str = "auto",
        plan: InputPlan | str | None = None,
        inference: str = "auto",
        photometric: Photometric | str | dict | None = None,
    ):
        """`max_bank_size` caps the bank (None = `coreset_ratio` alone decides); `batch_size` None =
        CPU_BATCH_SIZE on a CPU, GPU_BATCH_SIZE on a GPU; `search`: "exact" (float32), "bf16" (bfloat16
        torch products), "amx" (the C kernel of scoring/native) or "auto" (where the CPU multiplies
        bfloat16 in hardware, see bf16_matmul_is_fast: amx if it builds here, else bf16);
        `inference`: how the frozen tower runs, see FeatureScorer ("auto": bfloat16 on such CPUs)."""
        if batch_size is None:
            batch_size = CPU_BATCH_SIZE if resolve_device(device).type == "cpu" else GPU_BATCH_SIZE
        super().__init__(tower, layers, image_size, sigma, seed, device, batch_size, plan, inference, photometric)
        coreset_size(1, coreset_ratio, max_bank_size)  # validates now rather than after feature extraction
        if num_neighbors < 1:
            raise ScoringError(f"num_neighbors must be at least 1, got {num_neighbors}.")
        if search not in SEARCH_MODES:
            raise ScoringError(f"search must be one of {SEARCH_MODES}, got {search!r}.")
        self.coreset_ratio = float(coreset_ratio)
        self.max_bank_size = None if max_bank_size is None else int(max_bank_size)
        self.search = search
        self._prepared_bank: tuple[torch.Tensor, str, torch.Tensor] | None = None
        self.projection_dim = int(projection_dim)
        self.reweight = bool(reweight)
        self.num_neighbors = int(num_neighbors)
        self.memory_bank: torch.Tensor | None = None
        self.coreset_radius: float | None = None

    @property
    def is_fitted(self) -> bool:
        return self.memory_bank is not None

    def _fit_batches(self, batches: Iterator[torch.Tensor]) -> None:
        patches = torch.cat([flatten_patches(embedding) for embedding in batches])
        coreset = select_coreset(patches, self.coreset_ratio, self.projection_dim, self.seed, self.max_bank_size)
        self.memory_bank = patches[coreset.indices].contiguous()
        self.coreset_radius = coreset.radius

    def _score_patches(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, _, height, width = embedding.shape
        patches = flatten_patches(embedding)
        search = self.search_kernel
        if not self.reweight and search == "amx":
            return native.nearest_distances(patches, self._prepared("amx")).view(batch, height, width), None
        if not self.reweight and search == "bf16":
            return nearest_distances_bf16(patches, self._prepared("bf16")).view(batch, height, width), None
        distances, neighbours = nearest_neighbours(patches, self.memory_bank)
        distances, neighbours = distances[:, 0].view(batch, -1), neighbours[:, 0].view(batch, -1)
        image_scores = None
        if self.reweight:
            image_scores = reweighted_image_scores(
                patches.view(batch, height * width, -1), distances, neighbours, self.memory_bank, self.num_neighbors
            )
        return distances.view(batch, height, width), image_scores

    @property
    def search_kernel(self) -> str:
        """How predict searches the bank here: "amx" (the C kernel of scoring/native, on CPUs with AMX
        where it builds), "bf16" (bfloat16 torch products, on AMX CPUs without it) or "exact" (float32)."""
        if self.search == "auto":
            if not bf16_matmul_is_fast(self.device):
                return "exact"
            return "amx" if native.available()[0] else "bf16"
        if self.search == "amx" and self.device.type != "cpu":
            raise ScoringError(f"search='amx' runs on a CPU; this model is on {self.device}. Use search='auto'.")
        if self.search == "amx" and not native.available()[0]:
            raise ScoringError(f"search='amx' needs the AMX search kernel, which is unavailable here: "
                               f"{native.available()[1]}. Use search='auto'.")
        return self.search

    @property
    def uses_bf16_search(self) -> bool:
        """Whether the search rounds features to bfloat16 (either low-precision kernel)."""
        return self.search_kernel in ("amx", "bf16")

    def _prepared(self, kernel: str) -> torch.Tensor:
        """The bank in the layout `kernel` reads, built on first use and again whenever `memory_bank`
        is another tensor (after fit, load or an assignment)."""
        if self._prepared_bank is None or self._prepared_bank[0] is not self.memory_bank or self._prepared_bank[1] != kernel:
            layout = native.prepare_bank(self.memory_bank) if kernel == "amx" else bf16_bank(self.memory_bank)
            self._prepared_bank = (self.memory_bank, kernel, layout)
        return self._prepared_bank[2]

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {"memory_bank": self.memory_bank}

    def _set_state(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], source: Path) -> None:
        if config["feature_dim"] != self.tower_feature_dim():
            raise ArtifactError(
                f"{source.parent / 'config.json'}: feature_dim {config['feature_dim']} does not match the "
                f"{self.tower_feature_dim()} channels of layers {self.layers} of {self.tower.spec}."
            )
        bank = check_tensor(tensors["memory_bank"], "memory_bank", source, (config["bank_size"], config["feature_dim"]))
        self.memory_bank = bank.float().to(self.device).contiguous()
        self.coreset_radius = config["coreset_radius"]

    @classmethod
    def _check_method_config(cls, config: Config) -> None:
        config.number("coreset_ratio", 0.0, 1.0, low_open=True)
        config.number("max_bank_size", 1, None, integer=True, optional=True)
        config.number("projection_dim", 0, None, integer=True)
        config.boolean("reweight")
        config.number("num_neighbors", 1, None, integer=True)
        config.number("bank_size", 1, None, integer=True)
        config.number("feature_dim", 1, None, integer=True)
        config.number("coreset_radius", 0.0, None, optional=True)

    def _method_config(self) -> dict[str, Any]:
        return {
            "coreset_ratio": self.coreset_ratio,
            "max_bank_size": self.max_bank_size,
            "projection_dim": self.projection_dim,
            "reweight": self.reweight,
            "num_neighbors": self.num_neighbors,
            "bank_size": int(self.memory_bank.shape[0]),
            "feature_dim": int(self.memory_bank.shape[1]),
            "coreset_radius": self.coreset_radius,
        }



def flatten_patches(embedding: torch.Tensor) -> torch.Tensor:
    """N x C x h x w -> (N h w) x C, patches of one image contiguous and in raster order."""
    return embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1]).contiguous()
