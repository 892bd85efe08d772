"""TAB: the losses, the model's save/load round trip, and the pretraining script end to end (tiny towers)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import write_mvtec_category
from fake_hub import fake_hub  # noqa: F401  (registers the fixture)
from safetensors.torch import load_file, save_file

from defectclip.tab import (
    HEAD_WEIGHTS,
    MAX_LOGIT_SCALE,
    EpochShuffle,
    SyntheticPairs,
    TABBackbone,
    TABConfig,
    TABError,
    check_loss,
    joint_loss,
    paper_loss,
    state_loss,
    tab_loss,
)
from defectclip.towers import build_vision_tower
from train.tab_pretrain import main, parse_args

TINY = ["--vision", "tiny:cnn", "--text", "tiny:text"]


@pytest.fixture(scope="module")
def two_categories(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tab_data")
    write_mvtec_category(root, "widget")
    write_mvtec_category(root, "gadget_box", defects=("crack",), seed=1)
    return root


def run(data: Path, output: Path, *flags: str) -> dict:
    return main(["--data", str(data), "--output-dir", str(output), *TINY, *flags])


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    weights = load_file(str(folder / "model.safetensors"))
    weights.update({f"head.{k}": v for k, v in load_file(str(folder / HEAD_WEIGHTS)).items()})
    return weights


# --------------------------------------------------------------------------------------------------
# losses


def test_paper_loss_refuses_a_single_category(two_categories, tmp_path):
    with pytest.raises(TABError, match="identically zero"):
        check_loss("paper", 1)
    with pytest.raises(TABError, match="joint"):
        paper_loss(torch.zeros(4, 2), torch.zeros(2, dtype=torch.long), 1)
    with pytest.raises(SystemExit, match="identically zero"):
        run(two_categories / "widget", tmp_path / "out", "--loss", "paper", "--max-steps", "1")
    assert not (tmp_path / "out").exists()  # refused before any work


def test_losses_on_hand_made_logits():
    # One pair of object 0 out of K = 2. Columns: normal(obj 0), normal(obj 1), abnormal(obj 0), abnormal(obj 1).
    logits = torch.tensor([[2.0, 0.0, 1.0, 0.0],   # the normal image
                           [0.0, 1.0, 3.0, 0.0]])  # its synthetic anomaly
    labels = torch.tensor([0])
    paper = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-3.0))) / 2
    assert paper_loss(logits, labels, 2).item() == pytest.approx(paper, rel=1e-6)
    normal_row = math.log(math.exp(2) + 1 + math.exp(1) + 1) - 2
    anomaly_row = math.log(1 + math.exp(1) + math.exp(3) + 1) - 3
    assert joint_loss(logits, labels, 2).item() == pytest.approx((normal_row + anomaly_row) / 2, rel=1e-6)
    # Equal logits: the joint loss is log(2K) whatever the labels; the paper loss log(K).
    flat = torch.zeros(4, 6)
    assert tab_loss("joint", flat, torch.tensor([0, 2]), 3).item() == pytest.approx(math.log(6))
    assert tab_loss("paper", flat, torch.tensor([0, 2]), 3).item() == pytest.approx(math.log(3))
    with pytest.raises(TABError, match="shape"):
        joint_loss(torch.zeros(3, 4), labels, 2)


def test_state_loss_only_compares_the_own_objects_two_vectors():
    logits = torch.tensor([[2.0, 9.0, 1.0, 9.0],   # normal image of object 0; object 1's columns are huge
                           [0.0, 9.0, 3.0, 9.0]])  # its synthetic anomaly
    labels = torch.tensor([0])
    normal_row = math.log(math.exp(2) + math.exp(1)) - 2
    anomaly_row = math.log(1 + math.exp(3)) - 3
    assert state_loss(logits, labels, 2).item() == pytest.approx((normal_row + anomaly_row) / 2, rel=1e-6)
    # Another object's columns never matter: the object is not what this loss asks for.
    other = logits.clone()
    other[:, [1, 3]] = torch.tensor([[-5.0, 4.0], [7.0, -2.0]])
    assert state_loss(other, labels, 2).item() == pytest.approx(state_loss(logits, labels, 2).item())
    # With one object it is the joint loss (the binary choice the embedded trunk was trained with).
    one = torch.randn(6, 2)
    assert state_loss(one, torch.zeros(3, dtype=torch.long), 1).item() == pytest.approx(
        joint_loss(one, torch.zeros(3, dtype=torch.long), 1).item(), rel=1e-6)
    assert tab_loss("state", torch.zeros(4, 6), torch.tensor([0, 2]), 3).item() == pytest.approx(math.log(2))


def test_with_one_category_the_paper_loss_would_learn_nothing():
    """Why K = 1 is refused: a softmax over one entry is 1, whatever the logits."""
    logits = torch.randn(8, 1, requires_grad=True)
    loss = F.cross_entropy(logits, torch.zeros(8, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


# --------------------------------------------------------------------------------------------------
# the model and its artifact


def tiny_model(objects=("widget", "gadget box")) -> TABBackbone:
    return TABBackbone.build(TABConfig(vision="tiny:cnn", text="tiny:text", objects=list(objects), text_dim=32))


def moved_off_init(model: TABBackbone) -> TABBackbone:
    """A few optimizer steps in train mode, so weights and BatchNorm statistics are no longer the init's."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 64, 64)).square().sum().backward()
        optimizer.step()
    return model.eval()


def test_logit_scale_starts_at_clip_temperature_and_is_clamped():
    model = tiny_model()
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(MAX_LOGIT_SCALE + 3)
    assert model.scale().item() == pytest.approx(100.0, rel=1e-5)
    embeddings, logits = model(torch.randn(2, 3, 64, 64), F.normalize(torch.randn(4, 32), dim=-1))
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert logits.shape == (2, 4) and logits.abs().max() <= 100.0 + 1e-3


def test_saved_trunk_reloads_to_identical_features(tmp_path):
    model = moved_off_init(tiny_model())
    folder = model.save_pretrained(tmp_path / "tab", step=3)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected_maps = model.trunk.forward_features(images)
        expected_embeddings = model(images)

        tower = build_vision_tower(f"local-dir:{folder}")
        for name, feature_map in tower.forward_features(images).items():
            assert torch.equal(feature_map, expected_maps[name]), name
        assert tower.preprocess == model.preprocess

        timm_model = timm.create_model(f"local-dir:{folder}", pretrained=True, features_only=True).eval()
        assert torch.equal(timm_model(images)[-1], expected_maps["layer4"])

        reloaded = TABBackbone.from_pretrained(folder)
        assert torch.equal(reloaded(images), expected_embeddings)
    assert reloaded.config.step == 3 and reloaded.config.objects == ["widget", "gadget box"]


def test_from_pretrained_is_strict_about_head_keys(tmp_path):
    folder = tiny_model().save_pretrained(tmp_path / "tab")
    head = load_file(str(folder / HEAD_WEIGHTS))
    save_file({**head, "projection.extra": torch.zeros(1)}, str(folder / HEAD_WEIGHTS))
    with pytest.raises(TABError, match=r"unexpected \['projection.extra'\]"):
        TABBackbone.from_pretrained(folder)
    save_file({k: v for k, v in head.items() if k != "logit_scale"}, str(folder / HEAD_WEIGHTS))
    with pytest.raises(TABError, match=r"missing \['logit_scale'\]"):
        TABBackbone.from_pretrained(folder)
    config = json.loads((folder / "tab_config.json").read_text())
    (folder / "tab_config.json").write_text(json.dumps({**config, "surprise": 1}))
    with pytest.raises(TABError, match="unknown keys"):
        TABBackbone.from_pretrained(folder)


def test_pairs_are_seeded_by_seed_index_and_epoch(two_categories):
    paths = sorted((two_categories / "widget" / "train" / "good").glob("*.png"))
    pairs = SyntheticPairs(paths, [0] * len(paths), 64, "nsa", seed=5)
    first = pairs[1]
    assert first["normal"].shape == first["anomalous"].shape == (3, 64, 64)
    assert first["normal"].dtype == torch.uint8 and first["label"].item() == 0
    assert not torch.equal(first["normal"], first["anomalous"])
    assert torch.equal(pairs[1]["anomalous"], first["anomalous"])
    next_epoch = pairs[1 + len(pairs)]  # keys carry the epoch: epoch * len + index
    assert torch.equal(next_epoch["anomalous"], pairs.pair(1, epoch=1)["anomalous"])
    assert torch.equal(next_epoch["normal"], first["normal"])
    assert not torch.equal(next_epoch["anomalous"], first["anomalous"])


def test_epoch_shuffle_reproduces_its_order_from_the_generator():
    generator = torch.Generator()
    sampler = EpochShuffle(5, generator)
    generator.manual_seed(3)
    first = list(sampler)
    sampler.use_epoch(2)
    generator.manual_seed(3)
    assert sorted(first) == [0, 1, 2, 3, 4]
    assert list(sampler) == [10 + key for key in first]


# --------------------------------------------------------------------------------------------------
# the script


def test_thirty_steps_lower_the_loss_and_write_the_artifact(two_categories, tmp_path):
    output = tmp_path / "run"
    # The tiny tower is random: its BatchNorm statistics describe nothing yet, so let them adapt.
    metrics = run(two_categories, output, "--max-steps", "30", "--batch-size", "4", "--optimizer", "adamw",
                  "--lr", "3e-3", "--log-every", "1", "--checkpointing-steps", "100", "--no-freeze-bn")
    losses = [loss for _, loss in metrics["loss_history"]]
    assert len(losses) == 30 and metrics["steps"] == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses
    assert metrics["images_per_second"] > 0
    for name in ("config.json", "model.safetensors", "projection.safetensors", "tab_config.json", "metrics.json"):
        assert (output / name).is_file(), name
    assert json.loads((output / "metrics.json").read_text())["final_loss"] == pytest.approx(losses[-1])
    model = TABBackbone.from_pretrained(output)
    assert model.config.objects == ["gadget box", "widget"] and model.config.step == 30
    assert model.config.loss == "joint" and model.config.image_size == 64


def test_interrupted_run_resumes_to_the_same_weights(two_categories, tmp_path, monkeypatch):
    # Batch 2 of 8 images: 4 batches per epoch, so step 6 resumes in the middle of epoch 1.
    flags = ["--batch-size", "2", "--lr-schedule", "constant", "--lr", "0.05", "--log-every", "1"]
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    run(two_categories, interrupted, *flags, "--max-steps", "6", "--checkpointing-steps", "3")
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["checkpoint_0", "checkpoint_1"]
    epochs = []
    use_epoch = EpochShuffle.use_epoch
    monkeypatch.setattr(EpochShuffle, "use_epoch", lambda self, epoch: (epochs.append(epoch), use_epoch(self, epoch)))
    resumed = run(two_categories, interrupted, *flags, "--max-steps", "10", "--checkpointing-steps", "3",
                  "--resume", "latest")
    assert epochs == [1, 2]  # the synthesis sees the true epoch, not a counter restarted by the resume
    assert resumed["steps"] == 10 and resumed["micro_batches_this_run"] == 4
    # The history covers the whole run: steps 1-6 come back from the checkpoint, 7-10 are this run's.
    assert [step for step, _ in resumed["loss_history"]] == list(range(1, 11))
    whole = run(two_categories, straight, *flags, "--max-steps", "10", "--checkpointing-steps", "100")
    assert whole["loss_history"] == resumed["loss_history"]
    resumed_weights, straight_weights = tensors_of(interrupted), tensors_of(straight)
    assert resumed_weights.keys() == straight_weights.keys()
    for key, value in straight_weights.items():
        assert torch.equal(resumed_weights[key], value), key


def test_freeze_bn_keeps_running_statistics_while_the_trunk_still_learns(two_categories, tmp_path):
    flags = ["--max-steps", "3", "--batch-size", "2", "--lr", "0.05", "--checkpointing-steps", "100"]
    before = build_vision_tower("tiny:cnn").model.state_dict()
    assert run(two_categories, tmp_path / "frozen", *flags)["freeze_bn"]  # the default
    run(two_categories, tmp_path / "drifting", *flags, "--no-freeze-bn")
    frozen, drifting = tensors_of(tmp_path / "frozen"), tensors_of(tmp_path / "drifting")
    statistics = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert statistics
    for key in statistics:
        assert torch.equal(frozen[key], before[key]), key
    assert any(not torch.equal(drifting[key], before[key]) for key in statistics)
    learned = [k for k in before if k.endswith("conv1.weight") or k.endswith("bn1.weight")]
    assert any(not torch.equal(frozen[key], before[key]) for key in learned)


def test_persistent_workers_see_each_epoch_like_the_main_process(two_categories, tmp_path):
    # 6 steps of 2 pairs over 8 images cross into epoch 1 inside the same persistent worker.
    flags = ["--batch-size", "2", "--max-steps", "6"]
    run(two_categories, tmp_path / "inline", *flags, "--num-workers", "0")
    run(two_categories, tmp_path / "worker", *flags, "--num-workers", "1")
    inline, worker = tensors_of(tmp_path / "inline"), tensors_of(tmp_path / "worker")
    assert all(torch.equal(inline[key], worker[key]) for key in inline)


def test_default_towers_fail_fast_offline_naming_the_offline_ones(two_categories, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: the Hub is unreachable
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    base = ["--data", str(two_categories), "--output-dir", str(tmp_path / "out"), "--max-steps", "1"]
    with pytest.raises(SystemExit, match="offline:minilm"):
        main(base)
    with pytest.raises(SystemExit, match="offline:efficientnet_lite0"):
        main([*base, "--text", "tiny:text"])


def test_a_fresh_run_into_a_checkpointed_folder_is_refused(tmp_path):
    (tmp_path / "out" / "checkpoints" / "checkpoint_0").mkdir(parents=True)
    with pytest.raises(SystemExit, match="--resume latest"):
        parse_args(["--data", str(tmp_path), "--output-dir", str(tmp_path / "out")])


def test_push_sends_the_artifact_and_its_card_without_checkpoints_or_run_files(two_categories, tmp_path, fake_hub):  # noqa: F811
    from huggingface_hub import HfApi

    HfApi().create_repo("defectclip/tab-tiny")
    fake_hub.commit_files("defectclip/tab-tiny", {"metrics.json": b"{}"})  # left by an older push
    run(two_categories, tmp_path / "out", "--max-steps", "2", "--batch-size", "4",
        "--push-to-hub", "defectclip/tab-tiny")
    files = set(fake_hub.repo_files("defectclip/tab-tiny"))
    assert {"config.json", "model.safetensors", "projection.safetensors", "tab_config.json", "README.md"} <= files
    assert "metrics.json" not in files  # the stale file is deleted by the push
    assert not any(name.startswith("checkpoints") for name in files)
