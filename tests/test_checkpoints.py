"""Checkpoints lose nothing and never unpickle (issue 17).

- 10 SIGKILLs at chosen random points of a tiny TAB run (between steps, inside checkpoint writes,
  inside the final save), each followed by `--resume latest`: the run ends bit-identical to an
  uninterrupted one, with the same loss history in metrics.json;
- a crafted pickle in a resume directory is never executed (and nothing is unpickled at all);
- the rotation deletes only complete checkpoints; resuming an older checkpoint writes new numbers.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import write_mvtec_category
from hostile_corpus import malicious_pickle
from train import checkpoints as ckpt
from train.tab_pretrain import main

REPO = Path(__file__).resolve().parent.parent
TOTAL_STEPS = 6
FLAGS = ["--vision", "tiny:cnn", "--text", "tiny:text", "--batch-size", "2", "--lr-schedule", "constant",
         "--lr", "0.05", "--log-every", "1", "--checkpointing-steps", "1", "--checkpoints-total-limit", "2"]
ACCELERATE_PICKLES = ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin",
                      "pytorch_model.bin")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tab_data")
    write_mvtec_category(root, "widget")
    write_mvtec_category(root, "gadget_box", defects=("crack",), seed=1)
    return root


def harness(data: Path, output: Path, log: Path, phase: str = "", index: int = 0, resume: bool = False,
            steps: int = TOTAL_STEPS) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "tests" / "kill_harness.py"), str(log), phase, str(index), "--",
               "--data", str(data), "--output-dir", str(output), *FLAGS, "--max-steps", str(steps)]
    if resume:
        command += ["--resume", "latest"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def events(log: Path) -> list[tuple[str, int, str]]:
    return [tuple(json.loads(line)) for line in log.read_text().splitlines()]


def latest_step(output: Path) -> int:
    complete = ckpt.complete_checkpoints(output / "checkpoints")
    return json.loads((complete[-1] / ckpt.STATE_JSON).read_text())["progress"]["step"] if complete else 0


def artifact_tensors(output: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(output.glob("*.safetensors")):
        tensors.update({f"{path.name}:{k}": v for k, v in load_file(str(path)).items()})
    return tensors


def test_ten_sigkills_each_resume_to_a_bit_identical_run(data, tmp_path):
    reference_log = tmp_path / "reference.log"
    done = harness(data, tmp_path / "straight", reference_log)
    assert done.returncode == 0, done.stderr[-3000:]
    per_phase: dict[str, int] = {}
    for phase, count, _ in events(reference_log):
        per_phase[phase] = max(per_phase.get(phase, 0), count)
    assert per_phase["final"] >= 5 and per_phase["ckpt:2"] >= 5  # the kills below can land mid-write

    rng = np.random.default_rng(17)
    output, kills = tmp_path / "killed", []
    for attempt in range(10):
        latest = latest_step(output)
        if attempt >= 7 or latest == TOTAL_STEPS:
            phase = "final"
        else:
            # The first attempt dies after checkpoint 1 exists, so that every restart is a --resume latest.
            step = min(TOTAL_STEPS, max(latest + 1, 2) + int(rng.integers(0, 2)))  # spread over the run
            phase = f"{rng.choice(['step', 'ckpt', 'ckpt'])}:{step}"
        index = int(rng.integers(1, per_phase[phase] + 1))
        run = harness(data, output, tmp_path / f"attempt{attempt}.log", phase, index, resume=attempt > 0)
        assert run.returncode == -9, f"attempt {attempt} ({phase} #{index}) was not killed: {run.stderr[-3000:]}"
        kills.append((phase, index, latest))
        # Whatever the kill interrupted, every folder named checkpoint_<n> is complete.
        assert not ckpt.incomplete_checkpoints(output / "checkpoints"), kills
    print("kills (phase, event index, latest complete step before):", kills)
    finished = harness(data, output, tmp_path / "last.log", resume=True)
    assert finished.returncode == 0, finished.stderr[-3000:]

    phases = [phase.split(":")[0] for phase, _, _ in kills]
    assert phases.count("final") >= 3 and "ckpt" in phases, kills
    expected, resumed = artifact_tensors(tmp_path / "straight"), artifact_tensors(output)
    assert expected.keys() == resumed.keys() and expected
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), (key, kills)
    reference_metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    resumed_metrics = json.loads((output / "metrics.json").read_text())
    assert resumed_metrics["loss_history"] == reference_metrics["loss_history"]
    assert len(resumed_metrics["loss_history"]) == TOTAL_STEPS
    assert json.loads((output / "tab_config.json").read_text()) == json.loads((tmp_path / "straight" / "tab_config.json").read_text())


def run_in_process(data: Path, output: Path, steps: int, *extra: str) -> dict:
    return main(["--data", str(data), "--output-dir", str(output), *FLAGS, "--max-steps", str(steps), *extra])


def test_a_crafted_pickle_in_a_resume_directory_is_never_executed(data, tmp_path, monkeypatch):
    output, marker = tmp_path / "run", tmp_path / "EXECUTED"
    run_in_process(data, output, 2)
    good = ckpt.complete_checkpoints(output / "checkpoints")[-1]
    for name in ACCELERATE_PICKLES:  # next to a valid checkpoint: ignored
        (good / name).write_bytes(malicious_pickle(marker))
    accelerate_style = output / "checkpoints" / "checkpoint_9"  # only Accelerate's pickles: never loaded
    accelerate_style.mkdir()
    for name in ACCELERATE_PICKLES:
        (accelerate_style / name).write_bytes(malicious_pickle(marker))
    (accelerate_style / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())

    def refuse(*args, **kwargs):
        raise AssertionError("resume unpickled something")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    with pytest.raises(SystemExit, match="pickle files"):
        run_in_process(data, output, 3, "--resume", str(accelerate_style))
    metrics = run_in_process(data, output, 3, "--resume", "latest")  # skips checkpoint_9, resumes step 2
    assert metrics["steps"] == 3 and metrics["micro_batches_this_run"] == 1
    assert not marker.exists(), "a pickle in the resume directory was executed"
    assert accelerate_style.is_dir()  # not ours to delete: the rotation only removes complete checkpoints
    for folder in ckpt.complete_checkpoints(output / "checkpoints"):
        assert not list(folder.glob("*.pkl")) or folder == good, folder


def test_rotation_keeps_incomplete_folders_and_old_resumes_take_new_numbers(data, tmp_path):
    output = tmp_path / "run"
    run_in_process(data, output, 2)
    root = output / "checkpoints"
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["checkpoint_0", "checkpoint_1"]
    (root / "checkpoint_2").mkdir()  # e.g. a copy that lost its files
    (root / "checkpoint_2" / "model.safetensors").write_bytes(b"partial")
    run_in_process(data, output, 4, "--resume", "latest")
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_2", "checkpoint_3", "checkpoint_4"]
    # Resuming an older checkpoint while newer ones exist: no refusal, nothing overwritten.
    resumed = run_in_process(data, output, 5, "--resume", str(root / "checkpoint_3"))
    assert resumed["steps"] == 5
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_2", "checkpoint_5", "checkpoint_6"]


def test_resume_at_the_last_step_keeps_the_loss_history(data, tmp_path):
    output = tmp_path / "run"
    first = run_in_process(data, output, 3)
    (output / "metrics.json").unlink()  # as if the run died inside the final save
    again = run_in_process(data, output, 3, "--resume", "latest")
    assert again["micro_batches_this_run"] == 0
    assert again["loss_history"] == first["loss_history"] and len(again["loss_history"]) == 3
    assert json.loads((output / "metrics.json").read_text())["loss_history"] == first["loss_history"]
