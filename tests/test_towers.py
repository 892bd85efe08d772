"""Towers: one spec string -> a working tower, offline weights that really are pretrained."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from skimage import data as skdata

from defectclip.data import array_to_tensor, build_transform
from defectclip.towers import (
    HubUnreachableError,
    TowerError,
    build_text_tower,
    build_vision_tower,
    map_state_dict_in_order,
)


@pytest.fixture(scope="module")
def efficientnet():
    return build_vision_tower("offline:efficientnet_lite0")


@pytest.fixture(scope="module")
def minilm():
    return build_text_tower("offline:minilm")


@pytest.mark.parametrize("image_fn, imagenet_class", [(skdata.chelsea, 285), (skdata.coffee, 967)])
def test_offline_efficientnet_classifies_imagenet_photos(efficientnet, image_fn, imagenet_class):
    image = build_transform(efficientnet.preprocess)(array_to_tensor(image_fn()))
    with torch.no_grad():
        logits = efficientnet.classify(image[None])
    assert logits.argmax(-1).item() == imagenet_class


def test_offline_minilm_ranks_related_sentences_closer(minilm):
    query, related, unrelated = minilm.encode(["a scratch on a metal surface", "scratched metal", "a photo of a dog"])
    assert float(query @ related) > float(query @ unrelated) + 0.2
    assert minilm.dim == 384


@pytest.mark.parametrize("spec", ["tiny:cnn", "tiny:vit", "tiny:clip"])
def test_tiny_vision_towers_build_fast_and_expose_the_interface(spec):
    build_vision_tower(spec)  # first build pays for imports
    start = time.perf_counter()
    tower = build_vision_tower(spec)
    assert time.perf_counter() - start < 1.0
    images = torch.rand(2, 3, *tower.preprocess.size)
    pooled = tower(images)
    assert pooled.shape == (2, tower.num_features)
    maps = tower.forward_features(images)
    assert list(maps) == tower.stage_names
    for name, feature_map in maps.items():
        stage = tower.stages[name]
        assert feature_map.shape[:2] == (2, stage.channels)
        assert feature_map.shape[-1] == tower.preprocess.size[1] // stage.reduction
    assert isinstance(tower.first_conv, torch.nn.Conv2d) and tower.first_conv.in_channels == 3


def test_tiny_towers_are_deterministic():
    images = torch.rand(1, 3, 64, 64)
    a, b = build_vision_tower("tiny:cnn"), build_vision_tower("tiny:cnn")
    assert torch.equal(a(images), b(images))


def test_forward_features_of_requested_stages_only(efficientnet):
    maps = efficientnet.forward_features(torch.rand(1, 3, 128, 128), stages=["blocks.2", "blocks.4"])
    assert {k: tuple(v.shape) for k, v in maps.items()} == {"blocks.2": (1, 40, 16, 16), "blocks.4": (1, 112, 8, 8)}
    with pytest.raises(TowerError, match="Unknown stages"):
        efficientnet.forward_features(torch.rand(1, 3, 64, 64), stages=["layer9"])


@pytest.mark.parametrize("spec", ["tiny:text", "tiny:clip"])
def test_text_towers_give_normalised_embeddings_and_accept_embeddings(spec):
    tower = build_text_tower(spec)
    texts = ["a photo of a flawless tile", "a photo of a damaged tile"]
    embeddings = tower.encode(texts)
    assert embeddings.shape == (2, tower.dim)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-5)
    tokens = tower.tokenize(texts)
    # Feeding the token embeddings back in must reproduce encode(): CLIP-ADA relies on this path.
    via_embeddings = tower.encode_tokens(tokens, inputs_embeds=tower.token_embedding(tokens.input_ids))
    assert torch.allclose(via_embeddings, embeddings, atol=1e-5)


def test_network_spec_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(HubUnreachableError, match="offline:efficientnet_lite0"):
        build_vision_tower("timm:resnet18")
    with pytest.raises(HubUnreachableError, match="offline:minilm"):
        build_text_tower("hf-hub:sentence-transformers/all-MiniLM-L6-v2")
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("spec", ["nonsense", "tiny:banana", "warp:drive"])
def test_unknown_specs_name_the_valid_ones(spec):
    with pytest.raises(TowerError, match="tiny:cnn|<kind>:<name>"):
        build_vision_tower(spec)


def test_timm_tower_saves_and_reloads_from_local_dir(tmp_path):
    tower = build_vision_tower("tiny:cnn")
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(0.01)  # make it differ from a fresh random build
    tower.save_pretrained(tmp_path / "trunk")
    reloaded = build_vision_tower(f"local-dir:{tmp_path / 'trunk'}")
    images = torch.rand(2, 3, 64, 64)
    tower.eval()
    with torch.no_grad():
        assert torch.equal(tower(images), reloaded(images))
    assert reloaded.preprocess == tower.preprocess


def test_state_dict_mapping_rejects_a_wrong_shape():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    with pytest.raises(TowerError, match="does not fit"):
        map_state_dict_in_order({"a": torch.zeros(3, 3), "b": torch.zeros(3)}, model)
