"""How scoring runs the frozen tower: BatchNorm folded into the convolutions (the same features as the
tower itself), the bfloat16 / float16 copies, the copy following the tower's weights, and the
scorer-level switch (`inference=`), including a save / load round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import BLOB
from defectclip.scoring import PaDiM, PatchCore, ScoringError
from defectclip.scoring.inference import (
    FusedConv2d,
    conv_bn_pairs,
    folded_copy,
    fp16_kernels_available,
    inference_tower,
    resolve_inference,
)
from defectclip.towers import build_vision_tower


@pytest.fixture(scope="module")
def trained_bn_cnn():
    """The tiny CNN with BatchNorm statistics and affine parameters far from the identity, as a
    trained network has them (a fresh BatchNorm folds to nothing, which would prove nothing)."""
    tower = build_vision_tower("tiny:cnn")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in tower.model.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(size, generator=generator) * 2 + 0.2)
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(size, generator=generator) * 0.3)
    return tower.eval()


def test_the_folded_copy_gives_the_towers_features_and_leaves_the_tower_alone(trained_bn_cnn):
    tower = trained_bn_cnn
    before = {name: t.clone() for name, t in tower.state_dict().items()}
    folded = folded_copy(tower)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tower.forward_features(x)
        got = folded.forward_features(x)
    for name in expected:
        scale = float(expected[name].abs().max())
        assert torch.allclose(got[name], expected[name], atol=1e-4 * scale, rtol=1e-4), name
    # every BatchNorm of the ResNet follows a convolution: none is left in the copy
    assert len(conv_bn_pairs(tower)) == sum(isinstance(m, nn.BatchNorm2d) for m in tower.model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.model.modules())
    assert all(torch.equal(before[name], t) for name, t in tower.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in tower.model.modules())


def test_efficientnet_convolution_bn_relu6_fold_and_fuse_to_the_same_features():
    tower = build_vision_tower("offline:efficientnet_lite0")
    layers = ["blocks.2", "blocks.4"]
    folded = folded_copy(tower, layers)
    fused = [m for m in folded.model.modules() if isinstance(m, FusedConv2d)]
    if fused:  # oneDNN's fused kernel is there: conv + BatchNorm + ReLU6 became one module each
        assert {m.activation for m in fused} == {"hardtanh", "none"}
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = tower.forward_features(x, layers)
        got = folded.forward_features(x, layers)
        low = folded_copy(tower, layers, torch.bfloat16).forward_features(x.bfloat16(), layers)
    for name in layers:
        norm = float(expected[name].norm())
        assert float((got[name] - expected[name]).norm()) < 1e-5 * norm
        # bfloat16 keeps 8 bits of mantissa: a few per cent after a dozen layers, not more
        assert float((low[name].float() - expected[name]).norm()) < 0.06 * norm


def test_the_shared_copy_is_rebuilt_when_the_towers_weights_change():
    tower = build_vision_tower("tiny:cnn")
    first = inference_tower(tower, "folded", ["layer2"])
    assert inference_tower(tower, "folded", ["layer2"]) is first  # built once, shared
    assert inference_tower(tower, "exact") is tower
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tower.model.conv1.weight.mul_(2.0)  # what an optimizer step does: an in-place change
        rebuilt = inference_tower(tower, "folded", ["layer2"])
        assert rebuilt is not first
        expected = tower.forward_features(x, ["layer2"])["layer2"]
        assert torch.allclose(rebuilt.forward_features(x, ["layer2"])["layer2"], expected, atol=1e-4)


def test_auto_picks_by_device_and_method_and_bad_modes_are_refused(tiny_cnn):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_inference("auto", gpu) == "exact"
    assert resolve_inference("auto", cpu, bf16_allowed=False) == "folded"
    assert resolve_inference("auto", cpu) in ("bf16", "folded")  # bf16 only with AMX tiles
    if fp16_kernels_available(cpu):
        assert resolve_inference("fp16", cpu) == "fp16"
    else:  # this CPU has no float16 convolutions: refused up front, not a oneDNN error at the first image
        with pytest.raises(ScoringError, match="use inference='bf16' or 'folded'"):
            resolve_inference("fp16", cpu)
    assert resolve_inference("fp16", gpu) == "fp16"
    assert PaDiM(tiny_cnn, device="cpu").inference_mode == "folded"  # not measured in bfloat16
    with pytest.raises(ScoringError, match="inference must be one of"):
        PatchCore(tiny_cnn, device="cpu", inference="int8")
    model = PatchCore(tiny_cnn, device="cpu")
    with pytest.raises(ScoringError, match="inference must be one of"):
        model.inference = "fast"


@pytest.mark.parametrize("mode", ["folded", "fp16", "bf16"])
def test_every_mode_scores_a_defect_above_a_normal_image(mode, normal_images, blob_image):
    if mode == "fp16" and not fp16_kernels_available(torch.device("cpu")):
        with pytest.raises(ScoringError, match="float16 convolutions"):
            PatchCore("offline:efficientnet_lite0", image_size=64, device="cpu", inference=mode)
        return
    model = PatchCore("offline:efficientnet_lite0", image_size=64, coreset_ratio=0.5, device="cpu",
                      inference=mode).fit(normal_images[:5])
    assert model.inference_mode == mode
    normal, defect = model.predict([normal_images[5], blob_image])
    assert defect.score > 1.5 * normal.score
    row, col = np.unravel_index(np.argmax(defect.anomaly_map), defect.anomaly_map.shape)
    assert BLOB[0].start - 2 <= row < BLOB[0].stop + 2 and BLOB[1].start - 2 <= col < BLOB[1].stop + 2


def test_bf16_scores_stay_close_to_the_exact_path(normal_images, blob_image):
    tower = build_vision_tower("offline:efficientnet_lite0")
    scores = {}
    for mode in ("exact", "folded", "bf16"):
        model = PatchCore(tower, image_size=64, coreset_ratio=0.5, device="cpu", inference=mode, search="exact")
        scores[mode] = [r.score for r in model.fit(normal_images[:5]).predict([normal_images[5], blob_image])]
    assert scores["folded"] == pytest.approx(scores["exact"], rel=1e-4)
    assert scores["bf16"] == pytest.approx(scores["exact"], rel=0.1)


def test_a_saved_scorer_reloads_to_the_same_scores(normal_images, blob_image, tmp_path):
    model = PatchCore("offline:efficientnet_lite0", image_size=64, coreset_ratio=0.5, device="cpu").fit(normal_images[:5])
    before = model.predict([normal_images[5], blob_image])
    loaded = PatchCore.from_pretrained(model.save_pretrained(tmp_path / "model"), device="cpu")
    assert loaded.inference == "auto" and loaded.inference_mode == model.inference_mode
    after = loaded.predict([normal_images[5], blob_image])
    for a, b in zip(before, after):
        assert a.score == b.score
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    loaded.inference = "exact"  # the switch works after loading too, and agrees to bf16 precision
    exact = loaded.predict([normal_images[5], blob_image])
    assert [r.score for r in exact] == pytest.approx([r.score for r in before], rel=0.1)


def test_folding_a_tower_in_training_mode_leaves_its_statistics_and_mode_alone():
    tower = build_vision_tower("tiny:cnn").train()
    tower.model.layer1.eval()  # modes may differ between modules: each is kept
    before = {name: t.clone() for name, t in tower.state_dict().items()}
    folded = folded_copy(tower)
    assert tower.training and tower.model.training and not tower.model.layer1.training
    assert not folded.training
    assert all(torch.equal(before[name], t) for name, t in tower.state_dict().items())
