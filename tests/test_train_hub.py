"""The three training scripts, 2 steps each with `--push-to-hub` and `--report-to tensorboard`, against the fake Hub:
each leaves a repo holding weights and a model card that validates, and a TensorBoard event file on disk. The
describer reads its split-mask caption dataset from the (fake) Hub by repo id."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_index_mask_dataset, write_mvtec_category
from fake_hub import fake_hub  # noqa: F401  (pytest fixture)
from huggingface_hub import ModelCard

from train import alphaclip_lora, clip_ada, tab_pretrain

TINY = ["--vision", "tiny:cnn", "--text", "tiny:text"]
HUB_FLAGS = ["--max-steps", "2", "--report-to", "tensorboard", "--checkpointing-steps", "100"]


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    write_mvtec_category(root, "widget")
    write_mvtec_category(root, "gadget_box", defects=("crack",), seed=1)
    return root


def assert_pushed_with_card(fake_hub, repo: str) -> ModelCard:  # noqa: F811
    files = fake_hub.repo_files(repo)
    assert any(name.endswith(".safetensors") for name in files), sorted(files)
    card = ModelCard(files["README.md"].decode())
    card.validate()  # the Hub's own metadata check (the fake Hub answers /api/validate-yaml)
    assert "defectclip" in card.data.tags
    return card


def assert_event_file(output_dir: Path, name: str) -> None:
    events = list((output_dir / "logs" / name).glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0, f"no TensorBoard event file under {output_dir / 'logs' / name}"


def logged_losses(output_dir: Path, name: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(output_dir / "logs" / name))
    accumulator.Reload()
    return [event.value for event in accumulator.Scalars("loss")]


def test_tab_pretrain_pushes_with_card_and_logs_to_tensorboard(fake_hub, mvtec, tmp_path):  # noqa: F811
    out = tmp_path / "tab"
    tab_pretrain.main(["--data", str(mvtec), "--output-dir", str(out), *TINY, "--batch-size", "2",
                       "--log-every", "1", *HUB_FLAGS, "--push-to-hub", "defectclip/tab-run"])
    assert_pushed_with_card(fake_hub, "defectclip/tab-run")
    assert {"projection.safetensors", "tab_config.json"} <= set(fake_hub.repo_files("defectclip/tab-run"))
    assert_event_file(out, "tab_pretrain")
    assert len(logged_losses(out, "tab_pretrain")) == 2


def test_clip_ada_pushes_with_card_and_logs_to_tensorboard(fake_hub, mvtec, tmp_path):  # noqa: F811
    out = tmp_path / "clip_ada"
    clip_ada.main(["--data", str(mvtec / "widget"), "--output-dir", str(out), *TINY, "--batch-size", "3",
                   "--calibration-images", "2", *HUB_FLAGS, "--push-to-hub", "defectclip/clip-ada-run"])
    assert_pushed_with_card(fake_hub, "defectclip/clip-ada-run")
    assert_event_file(out, "clip_ada")


def test_describer_trains_on_a_hub_dataset_pushes_with_card_and_logs(fake_hub, tmp_path):  # noqa: F811
    from hub.datasets import BuildConfig, build_dataset, push_dataset

    source = write_index_mask_dataset(tmp_path / "steel", n=6)
    build_dataset(BuildConfig(source=source, out_dir=tmp_path / "regions", val_fraction=0.0))
    push_dataset(tmp_path / "regions", "defectclip/steel-regions")

    out = tmp_path / "describer"
    alphaclip_lora.main(["--dataset", "defectclip/steel-regions", "--output-dir", str(out), *TINY,
                         "--batch-size", "2", "--lora-r", "2", "--lora-alpha", "2", *HUB_FLAGS,
                         "--push-to-hub", "defectclip/describer-run"])
    card = assert_pushed_with_card(fake_hub, "defectclip/describer-run")
    assert card.data.datasets == ["defectclip/steel-regions"]  # filled in from what the run read
    assert "adapter/adapter_model.safetensors" in fake_hub.repo_files("defectclip/describer-run")
    assert_event_file(out, "alphaclip_lora")


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_every_schedule_spans_the_run_whatever_the_process_count(processes):
    """Accelerate steps a prepared scheduler once per process per optimizer step: all three scripts' schedules
    (train.common.make_scheduler) count in those steps, so a run on 4 processes decays exactly like one."""
    import torch

    from train import common

    def learning_rates(name: str, **options) -> list[float]:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        scheduler = common.make_scheduler(name, optimizer, 10, processes, **options)
        rates = []
        for _ in range(10):  # optimizer steps of the run
            for _ in range(processes):
                optimizer.step()
                scheduler.step()
            rates.append(scheduler.get_last_lr()[0])
        return rates

    assert learning_rates("cosine")[-1] == pytest.approx(0.0, abs=1e-12)
    assert learning_rates("cosine", warmup=2)[1] == pytest.approx(1.0, rel=0.05)  # warm-up over by step 2
    assert learning_rates("constant") == [1.0] * 10
    multistep = learning_rates("multistep", milestones=(0.5,), gamma=0.2)
    assert multistep[:4] == [1.0] * 4 and multistep[5:] == pytest.approx([0.2] * 5)
