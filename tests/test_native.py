"""The C kernels of defectclip.scoring.native: the AMX nearest-neighbour search and the one-pass model
input, and what happens where they cannot run."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from defectclip.scoring import PatchCore, native
from defectclip.scoring.errors import ScoringError

AVAILABLE, WHY = native.available()
needs_kernels = pytest.mark.skipif(not AVAILABLE, reason=f"native kernels unavailable here: {WHY}")


def patch_like(n: int, dim: int, seed: int) -> torch.Tensor:
    """Non-negative correlated vectors with norms far larger than their spread, like CNN patch features."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, dim, generator=generator)
    return (torch.randn(n, 8, generator=generator) @ basis + 2.5).clamp_min(0) + 0.3 * torch.rand(n, dim, generator=generator)


def rounded_distances(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Float64 nearest distances between the bfloat16-rounded vectors: what the kernel promises."""
    return torch.cdist(queries.to(torch.bfloat16).double(), bank.to(torch.bfloat16).double()).min(1).values


@needs_kernels
@pytest.mark.parametrize("bank_rows, queries_count, dim", [(70, 1, 37), (130, 17, 152), (1000, 300, 152), (64, 16, 30)])
def test_the_amx_search_gives_the_distance_between_rounded_vectors(bank_rows, queries_count, dim):
    # Ragged sizes: bank padding rows (to 64), a last block of fewer than 16 queries, a width that is
    # not a multiple of 32; none may change a distance.
    bank, queries = patch_like(bank_rows, dim, 0), patch_like(queries_count, dim, 1)
    got = native.nearest_distances(queries, native.prepare_bank(bank))
    expected = rounded_distances(queries, bank)
    assert got.shape == (queries_count,) and got.dtype == torch.float32
    assert float(((got.double() - expected).abs() / expected).max()) < 1e-4


@needs_kernels
def test_a_query_in_the_bank_is_at_distance_zero_and_the_last_row_can_win():
    bank = patch_like(200, 152, 2)
    typical = float(rounded_distances(patch_like(50, 152, 6), bank).median())
    # ~0 up to the 16-bit bank norm (|b|^2 ~ 4,000 here: 0.06 in d^2), far below any real distance.
    assert float(native.nearest_distances(bank[:20], native.prepare_bank(bank)).max()) < 0.05 * typical
    planted = torch.cat([bank + 50.0, bank[:1]])  # the only near row is the very last one
    assert float(native.nearest_distances(bank[:1], native.prepare_bank(planted))) < 0.05 * typical


@needs_kernels
def test_several_torch_threads_split_the_queries_without_changing_them():
    bank, queries = patch_like(300, 152, 3), patch_like(1100, 152, 4)
    prepared = native.prepare_bank(bank)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.nearest_distances(queries, prepared)
        torch.set_num_threads(3)
        several = native.nearest_distances(queries, prepared)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, several)


@needs_kernels
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_array", "cropped"])
def test_the_one_pass_model_input_is_bit_identical_to_torch(layout):
    generator = torch.Generator().manual_seed(5)
    if layout == "contiguous":
        image = torch.rand(3, 40, 56, generator=generator)
    elif layout == "channels_last_array":  # an H x W x 3 array seen as 3 x H x W, as images arrive
        image = torch.rand(40, 56, 3, generator=generator).permute(2, 0, 1)
    else:
        image = torch.rand(3, 50, 70, generator=generator)[:, 3:43, 7:63]
    scale, shift = torch.tensor([4.3, 4.4, 4.5]), torch.tensor([-2.1, -2.0, -1.8])
    got = native.normalized_channels_last([image, image.flip(-1)], scale, shift)
    expected = torch.addcmul(shift.view(1, 3, 1, 1), torch.stack([image, image.flip(-1)]), scale.view(1, 3, 1, 1))
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, expected.to(torch.bfloat16))
    with pytest.raises(ValueError, match="expected"):
        native.normalized_channels_last([image, image[:, :20]], scale, shift)


@needs_kernels
@pytest.mark.parametrize("shapes", [[(2, 40, 28, 28), (2, 112, 14, 14)], [(1, 24, 32, 32), (1, 40, 16, 16), (1, 7, 8, 8)],
                                    [(1, 17, 15, 9), (1, 33, 8, 5)], [(1, 5, 6, 6)]])
def test_native_patch_features_match_torch_pooling_upsampling_and_concatenation(shapes):
    generator = torch.Generator().manual_seed(7)
    maps = [torch.randn(*shape, generator=generator).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
            for shape in shapes]
    got = native.patch_features(maps)
    pooled = [F.avg_pool2d(m.float(), 3, stride=1, padding=1) for m in maps]
    finest = pooled[0].shape[-2:]
    expected = torch.cat([p if p.shape[-2:] == finest else F.interpolate(p, size=finest, mode="bilinear", align_corners=False)
                          for p in pooled], dim=1)
    assert got.shape == expected.shape and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="bfloat16 channels-last"):
        native.patch_features([maps[0].float()])


@needs_kernels
def test_patchcore_searches_with_the_kernel_by_default_and_follows_a_replaced_bank(tiny_cnn, normal_images, blob_image):
    # Its agreement with the exact search: test_patchcore.py::test_bf16_and_exact_search_give_the_same_verdicts.
    model = PatchCore(tiny_cnn, coreset_ratio=0.5, device="cpu").fit(normal_images[:5])
    assert model.search_kernel == "amx" and model.uses_bf16_search
    before = model.predict([blob_image])[0].score
    model.memory_bank = model.memory_bank[:1].clone()  # a far smaller bank: the blob gets farther
    assert model.predict([blob_image])[0].score > before


def test_without_the_kernels_patchcore_falls_back_and_says_why(monkeypatch, tiny_cnn, normal_images):
    monkeypatch.setattr(native, "_state", {"ok": False, "why": "no C compiler (cc) on PATH"})
    model = PatchCore(tiny_cnn, coreset_ratio=0.5, device="cpu").fit(normal_images[:4])
    assert model.search_kernel in ("bf16", "exact")
    assert np.isfinite(model.predict([normal_images[5]])[0].score)
    model.search = "amx"
    with pytest.raises(ScoringError, match="no C compiler"):
        model.predict([normal_images[5]])
    with pytest.raises(RuntimeError, match="no C compiler"):
        native.nearest_distances(normal_images[0].reshape(3, -1).T, torch.zeros(64, 32, dtype=torch.bfloat16))


def test_a_missing_or_failing_compiler_is_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setenv("DEFECTCLIP_CACHE", str(tmp_path))
    monkeypatch.setenv("DEFECTCLIP_NATIVE", "0")
    assert native._load() == (False, "switched off (DEFECTCLIP_NATIVE=0)")
    monkeypatch.delenv("DEFECTCLIP_NATIVE")
    if not native.bf16_kernels_available(torch.device("cpu")):
        assert "no AMX" in native._load()[1]
        return
    monkeypatch.setenv("CC", "no-such-compiler-here")
    assert native._load() == (False, "no C compiler (cc) on PATH")
    monkeypatch.setenv("CC", "false")  # exits 1 without a word
    ok, why = native._load()
    assert not ok and why.startswith("could not build kernels.c")
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built is left to be loaded later


def test_the_amx_search_is_refused_off_the_cpu(tiny_cnn, normal_images):
    # search="amx" names a CPU kernel: a model on another device is told so rather than failing inside.
    model = PatchCore(tiny_cnn, coreset_ratio=0.5, device="cpu", search="amx")
    model.device = torch.device("meta")
    with pytest.raises(ScoringError, match="runs on a CPU"):
        model.search_kernel


@needs_kernels
def test_the_bf16_tower_gives_the_same_features_with_and_without_the_kernels(monkeypatch, tiny_cnn, normal_images):
    from defectclip.scoring import features

    model = PatchCore(tiny_cnn, device="cpu", inference="bf16")
    runner, cpu = model.features.runner(), torch.device("cpu")
    batch = model.features.model_input(normal_images[:2], cpu, torch.bfloat16)
    maps = runner.forward_features(batch, model.features.layers)
    assert features._native_maps(maps.values())  # the kernels' path is the one taken below
    with_kernels = model.features.embed(batch, runner=runner)
    monkeypatch.setattr(native, "_state", {"ok": False, "why": "switched off for this test"})
    torch_batch = model.features.model_input(normal_images[:2], cpu, torch.bfloat16)
    assert torch.equal(torch_batch, batch)
    torch.testing.assert_close(with_kernels, model.features.embed(torch_batch, runner=runner), rtol=1e-5, atol=1e-5)
