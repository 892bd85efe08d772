"""Synthetic anomalies: exact masks, determinism, layouts, and clear errors. Fixtures are made here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectclip.synth import SYNTHESES, cutpaste, nsa, perlin, perlin_noise, synthesize
from defectclip.synth.cutpaste import PatchBox
from defectclip.synth.nsa import poisson_paste
from defectclip.synth.poisson_torch import poisson_blend

METHODS = sorted(SYNTHESES)


def textured_image(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour ramps plus noise, so almost any edit changes pixel values."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 200, y / height * 200, 100 + 50 * np.sin(x / 4.0)], axis=-1)
    noisy = base + rng.normal(0, 12, size=base.shape)
    return np.clip(noisy + 20, 0, 255).astype(np.uint8)


@pytest.fixture
def image() -> np.ndarray:
    return textured_image(64, 80, seed=0)


@pytest.fixture
def other() -> np.ndarray:
    # Another size on purpose: sources and textures need not match the target.
    return textured_image(50, 70, seed=1)[..., ::-1].copy()


@pytest.fixture(autouse=True)
def single_torch_thread():
    """The torch solver runs hundreds of tiny ops per test; with several OpenMP threads on a busy 2-core
    machine each op waits on thread hand-offs (measured 10x slower), so this module uses one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("seed", range(6))
def test_mask_is_exactly_the_changed_pixels(name, seed, image, other):
    output, mask = synthesize(name, image, other, seed)
    assert mask.dtype == np.bool_ and mask.shape == image.shape[:2]
    assert mask.any(), "a synthetic anomaly must change something"
    np.testing.assert_array_equal(mask, (output != image).any(axis=-1))


@pytest.mark.parametrize("name", METHODS)
def test_same_seed_same_output_and_different_seeds_differ(name, image, other):
    first = synthesize(name, image, other, 7)
    again = synthesize(name, image, other, np.random.default_rng(7))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    others = [synthesize(name, image, other, seed)[0] for seed in (8, 9)]
    assert all(not np.array_equal(first[0], out) for out in others)


@pytest.mark.parametrize("name", METHODS)
def test_shared_generator_advances_between_calls(name, image, other):
    rng = np.random.default_rng(3)
    first, _ = synthesize(name, image, other, rng)
    second, _ = synthesize(name, image, other, rng)
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("name", METHODS)
def test_inputs_are_not_modified(name, image, other):
    image_before, other_before = image.copy(), other.copy()
    synthesize(name, image, other, 0)
    np.testing.assert_array_equal(image, image_before)
    np.testing.assert_array_equal(other, other_before)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("shape", [(64, 80, 3), (64, 80), (64, 80, 1), (16, 16, 3), (17, 300, 3)])
def test_output_has_input_shape_and_dtype(name, shape, other):
    image = textured_image(shape[0], shape[1], seed=2)
    if len(shape) == 2:
        image = image[..., 0].copy()
    elif shape[2] == 1:
        image = image[..., :1].copy()
    output, mask = synthesize(name, image, other, 0)
    assert output.shape == image.shape and output.dtype == np.uint8
    assert mask.shape == shape[:2]
    changed = output != image
    np.testing.assert_array_equal(mask, changed.any(axis=-1) if changed.ndim == 3 else changed)


@pytest.mark.parametrize("name", METHODS)
def test_gray_target_stays_gray_with_a_colour_source(name, image, other):
    gray = np.repeat(image[..., :1], 3, axis=2)
    output, mask = synthesize(name, gray, other, 1)
    assert mask.any()
    assert (output[..., 0] == output[..., 1]).all() and (output[..., 1] == output[..., 2]).all()


def test_poisson_paste_lines_the_patch_up_with_its_box():
    # Bright lines a third of the way into the patch must stay there, for odd and even sizes.
    target = np.full((64, 72, 3), 90, dtype=np.uint8)
    for height, width in [(20, 16), (21, 17), (12, 13), (31, 40)]:
        patch = np.full((height, width, 3), 90, dtype=np.uint8)
        patch[height // 3, :] = 250
        patch[:, width // 3] = 250
        box = PatchBox(top=10, left=13, height=height, width=width)
        region = poisson_paste(target, patch, box).astype(int)[..., 0]
        assert region.shape == (height, width)
        assert region.mean(axis=1).argmax() == height // 3
        assert region.mean(axis=0).argmax() == width // 3


def test_nsa_adopts_target_colour_where_cutpaste_does_not():
    # Poisson blending keeps the source's gradients but the target's level at the seam.
    target = np.full((64, 64, 3), 100, dtype=np.uint8)
    y, x = np.mgrid[0:64, 0:64]
    source = np.clip(200 + 20 * np.sin(x / 3.0) * np.cos(y / 4.0), 0, 255).astype(np.uint8)
    source = np.repeat(source[..., None], 3, axis=2)
    for seed in range(4):
        blended, blended_mask = nsa(target, source, seed)
        pasted, pasted_mask = cutpaste(target, source, seed)
        blended_shift = np.abs(blended[blended_mask].astype(int) - 100).mean()
        pasted_shift = np.abs(pasted[pasted_mask].astype(int) - 100).mean()
        assert blended_shift < 30 < 60 < pasted_shift


def test_nsa_is_repeatable_within_one_process(image, other):
    # OpenCV 5.0 writes into the mask handed to seamlessClone; a reused mask made alternate calls differ.
    outputs = [nsa(image, other, 5)[0] for _ in range(3)]
    assert all(np.array_equal(outputs[0], out) for out in outputs[1:])


def test_min_target_std_keeps_patches_off_plain_background():
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    image[:, :32] = 0  # left half is plain background
    source = textured_image(64, 64, seed=5)
    # CutPaste shares NSA's placement code and changes every pixel of its box, so the mask shows the box.
    options = dict(n_patches=(1, 1), patch_scale=(0.15, 0.2), aspect_ratio=(1.0, 1.0))
    plain_hits = sum(not cutpaste(image, source, s, **options)[1][:, 32:].any() for s in range(20))
    assert plain_hits > 0, "fixture check: without the filter some patches fall on the plain half"
    for seed in range(20):
        _, mask = cutpaste(image, source, seed, min_target_std=20.0, max_tries=50, **options)
        assert mask[:, 32:].any()


def test_patch_count_and_size_follow_the_options(image, other):
    _, mask = cutpaste(image, other, 0, n_patches=(1, 1), patch_scale=(0.25, 0.25), aspect_ratio=(1, 1))
    rows, cols = np.nonzero(mask)
    assert rows.max() - rows.min() + 1 <= 16 and cols.max() - cols.min() + 1 <= 20


def test_perlin_fills_region_with_texture_when_beta_is_zero(image, other):
    texture = np.zeros((10, 10, 3), dtype=np.uint8)  # resized to the image; black everywhere
    output, mask = perlin(image, texture, 0, beta_range=(0.0, 0.0))
    assert mask.any()
    assert (output[mask] == 0).all()
    np.testing.assert_array_equal(output[~mask], image[~mask])


def test_perlin_falls_back_to_a_small_region_when_threshold_is_unreachable(image, other):
    _, mask = perlin(image, other, 0, threshold=5.0, max_tries=2)
    assert 0 < mask.mean() <= 0.03


def test_perlin_noise_shape_range_and_determinism():
    noise = perlin_noise((37, 53), (3, 5), 0, angle=0.4)
    assert noise.shape == (37, 53) and noise.dtype == np.float32
    assert noise.std() > 0.05 and np.abs(noise).max() <= 1.0 + 1e-5
    np.testing.assert_array_equal(noise, perlin_noise((37, 53), (3, 5), 0, angle=0.4))
    assert not np.array_equal(noise, perlin_noise((37, 53), (3, 5), 1, angle=0.4))


def test_degenerate_inputs_give_an_empty_mask_not_an_error():
    flat = np.full((32, 32, 3), 77, dtype=np.uint8)
    output, mask = cutpaste(flat, flat, 0)
    assert not mask.any()
    np.testing.assert_array_equal(output, flat)


def test_registry_names_and_options_pass_through(image, other):
    assert set(SYNTHESES) == {"nsa", "cutpaste", "perlin"}
    direct = cutpaste(image, other, 2, n_patches=(2, 2))
    via_registry = synthesize("cutpaste", image, other, 2, n_patches=(2, 2))
    np.testing.assert_array_equal(direct[0], via_registry[0])


def test_unknown_name_lists_the_valid_ones(image, other):
    with pytest.raises(ValueError, match="valid names: cutpaste, nsa, perlin"):
        synthesize("draem", image, other, 0)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize(
    ("bad_image", "error", "message"),
    [
        (np.zeros((15, 64, 3), dtype=np.uint8), ValueError, "at least 16"),
        (np.zeros((64, 64, 3), dtype=np.float32), TypeError, "dtype uint8"),
        (np.zeros((64, 64, 4), dtype=np.uint8), ValueError, "alpha"),
        (np.zeros((2, 64, 64, 3), dtype=np.uint8), ValueError, "shape"),
        ([[0] * 32] * 32, TypeError, "numpy uint8 array"),
    ],
)
def test_bad_images_raise_clear_errors(name, bad_image, error, message, other):
    with pytest.raises(error, match=message):
        synthesize(name, bad_image, other, 0)


@pytest.mark.parametrize("name", ["nsa", "cutpaste"])
def test_too_small_source_is_refused(name, image):
    with pytest.raises(ValueError, match="source is 8x8"):
        synthesize(name, image, np.zeros((8, 8, 3), dtype=np.uint8), 0)


def test_tiny_texture_is_fine_for_perlin(image):
    output, mask = perlin(image, np.full((1, 1, 3), 255, dtype=np.uint8), 0)
    assert mask.any() and output.shape == image.shape


def test_bad_rng_is_refused(image, other):
    with pytest.raises(TypeError, match="rng must be"):
        nsa(image, other, rng="seed")


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        (nsa, {"n_patches": (0, 2)}, "n_patches"),
        (nsa, {"patch_scale": (0.5, 0.2)}, "patch_scale"),
        (cutpaste, {"patch_scale": (0.0, 0.2)}, "patch_scale"),
        (cutpaste, {"max_tries": 0}, "max_tries"),
        (nsa, {"min_target_std": -1.0}, "min_target_std"),
        (perlin, {"beta_range": (0.5, 1.5)}, "beta_range"),
        (perlin, {"scale_exponents": (3, 1)}, "scale_exponents"),
        (perlin, {"octaves": 0}, "octaves"),
    ],
)
def test_bad_options_raise_clear_errors(method, options, message, image, other):
    with pytest.raises(ValueError, match=message):
        method(image, other, 0, **options)


# --- batched torch Poisson blend (poisson_torch.py) -------------------------------------------------

def direct_poisson_solve(target: np.ndarray, source: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Reference: the same discrete equation as poisson_blend, solved exactly with scipy (one channel)."""
    import scipy.sparse
    import scipy.sparse.linalg

    index = -np.ones(region.shape, dtype=np.int64)
    points = np.argwhere(region)
    index[region] = np.arange(len(points))
    rhs = 4 * source[region] - sum(np.roll(source, shift, axis)[region] for shift in (1, -1) for axis in (0, 1))
    rows, cols, values = list(range(len(points))), list(range(len(points))), [4.0] * len(points)
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        neighbours = points + (dy, dx)
        inside = region[neighbours[:, 0], neighbours[:, 1]]
        rows += list(np.nonzero(inside)[0])
        cols += list(index[neighbours[inside, 0], neighbours[inside, 1]])
        values += [-1.0] * int(inside.sum())
        rhs[~inside] += target[neighbours[~inside, 0], neighbours[~inside, 1]]
    matrix = scipy.sparse.csr_matrix((values, (rows, cols)), shape=(len(points), len(points)))
    result = target.copy()
    result[region] = scipy.sparse.linalg.spsolve(matrix, rhs)
    return result


def blob_mask(height: int, width: int, centre: tuple[int, int], radius: float) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    angle = np.arctan2(y - centre[0], x - centre[1])
    return np.hypot(y - centre[0], x - centre[1]) < radius * (1 + 0.3 * np.sin(3 * angle))


def test_poisson_blend_matches_a_direct_sparse_solve():
    rng = np.random.default_rng(0)
    target = rng.uniform(0, 255, size=(2, 2, 40, 48))
    source = rng.uniform(0, 255, size=(2, 2, 40, 48))
    masks = np.stack([blob_mask(40, 48, (20, 22), 12), blob_mask(40, 48, (15, 30), 9)])
    blended = poisson_blend(torch.from_numpy(target), torch.from_numpy(source), torch.from_numpy(masks))
    assert blended.dtype == torch.float64
    for item in range(2):
        for channel in range(2):
            expected = direct_poisson_solve(target[item, channel], source[item, channel], masks[item])
            np.testing.assert_allclose(blended[item, channel].numpy(), expected, atol=1e-6)


def smooth_fixture(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    target = np.stack([60 + x, 80 + 0.8 * y, 120 + 30 * np.sin(x / 15)], axis=-1)
    source = np.stack([150 + 40 * np.sin(x / 7) * np.cos(y / 9), 100 + 30 * np.cos(x / 11), 90 + 0.5 * (x + y)], -1)
    return np.clip(target, 0, 255).astype(np.uint8), np.clip(source, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("top", "left", "height", "width"), [(20, 30, 40, 50), (10, 10, 61, 31), (5, 60, 30, 30)])
def test_poisson_blend_is_close_to_opencv_seamless_clone(top, left, height, width):
    """Tolerance: mean |difference| < 3 grey levels and max <= 14 inside the box. OpenCV erodes the
    clone mask and uses the target's gradients in that band, so the two differ by a smooth offset of a
    few levels (measured: mean 1.3-2.5, max 6-12 on this fixture); outside the box both are exact."""
    import cv2

    target, source = smooth_fixture(96, 112)
    box = np.zeros((96, 112), dtype=bool)
    box[top : top + height, left : left + width] = True
    patch = source[box].reshape(height, width, 3)
    clone_mask = np.full((height, width), 255, dtype=np.uint8)
    expected = cv2.seamlessClone(patch, target, clone_mask, (left + width // 2, top + height // 2), cv2.NORMAL_CLONE)
    # OpenCV keeps a 2-px ring of the box at the target's values; use the same region.
    region = np.zeros_like(box)
    region[top + 2 : top + height - 2, left + 2 : left + width - 2] = True
    to_batch = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None]  # noqa: E731
    # 150 conjugate-gradient steps are plenty for regions under 60 px wide (about 2 per pixel of width).
    blended = poisson_blend(to_batch(target), to_batch(source), torch.from_numpy(region)[None], iterations=150)
    result = blended[0].permute(1, 2, 0).numpy()
    assert result.dtype == np.uint8
    difference = np.abs(result.astype(int) - expected.astype(int))
    assert difference[box].mean() < 3.0 and difference.max() <= 14
    np.testing.assert_array_equal(result[~box], target[~box])


def test_poisson_blend_leaves_outside_and_image_border_unchanged():
    rng = np.random.default_rng(1)
    target = torch.from_numpy(rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8))
    source = torch.from_numpy(rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8))
    mask = torch.zeros(3, 1, 32, 32, dtype=torch.bool)
    mask[0, :, 4:20, 6:25] = True
    mask[1, :, :12, :12] = True  # touches the image border
    # item 2: empty mask, must come back untouched
    blended = poisson_blend(target, source, mask)
    assert blended.shape == target.shape and blended.dtype == torch.uint8
    interior = mask.clone()
    interior[..., 0, :] = interior[..., -1, :] = False
    interior[..., :, 0] = interior[..., :, -1] = False
    outside = ~interior.expand_as(target)
    assert torch.equal(blended[outside], target[outside])
    assert not torch.equal(blended[0], target[0]) and not torch.equal(blended[1], target[1])
    border_only = torch.zeros_like(mask)
    border_only[..., 0, :] = True  # nothing inside the image: returned unchanged
    assert torch.equal(poisson_blend(target, source, border_only), target)


def test_poisson_blend_batch_items_are_independent():
    rng = np.random.default_rng(2)
    target = torch.from_numpy(rng.uniform(0, 255, size=(3, 3, 24, 28)))
    source = torch.from_numpy(rng.uniform(0, 255, size=(3, 3, 24, 28)))
    mask = torch.from_numpy(np.stack([blob_mask(24, 28, (12, 14), r) for r in (5, 7, 9)]))
    together = poisson_blend(target, source, mask, iterations=60)
    for item in range(3):
        alone = poisson_blend(target[item : item + 1], source[item : item + 1], mask[item : item + 1], iterations=60)
        assert torch.allclose(together[item : item + 1], alone, rtol=0, atol=1e-9)


def test_poisson_blend_keeps_half_precision_dtype_and_outside_pixels():
    rng = np.random.default_rng(4)
    target = torch.from_numpy(rng.uniform(0, 255, size=(1, 3, 20, 20))).half()
    source = torch.from_numpy(rng.uniform(0, 255, size=(1, 3, 20, 20))).half()
    mask = torch.zeros(1, 20, 20, dtype=torch.bool)
    mask[0, 5:15, 5:15] = True
    blended = poisson_blend(target, source, mask, iterations=40)
    assert blended.dtype == torch.float16
    assert torch.equal(blended[..., ~mask[0]], target[..., ~mask[0]])
    assert torch.isfinite(blended).all()


def test_poisson_blend_rejects_mismatched_shapes():
    images = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ValueError, match="mask must be"):
        poisson_blend(images, images, torch.ones(2, 16, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        poisson_blend(images, images[:1], torch.ones(2, 16, 16, dtype=torch.bool))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_poisson_blend_on_gpu_matches_cpu():
    rng = np.random.default_rng(3)
    target = torch.from_numpy(rng.uniform(0, 255, size=(4, 3, 64, 64)).astype(np.float32))
    source = torch.from_numpy(rng.uniform(0, 255, size=(4, 3, 64, 64)).astype(np.float32))
    mask = torch.from_numpy(np.stack([blob_mask(64, 64, (32, 30), r) for r in (8, 12, 16, 20)]))
    on_cpu = poisson_blend(target, source, mask)
    on_gpu = poisson_blend(target.cuda(), source.cuda(), mask.cuda()).cpu()
    assert (on_gpu - on_cpu).abs().max() < 0.05
