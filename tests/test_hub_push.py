"""defectclip.sharing.push over real HTTP: push folders to the fake Hub, read them back with the real clients."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_hub import fake_hub  # noqa: F401  (pytest fixture)
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import save_file

from hub.__main__ import main
from defectclip.sharing.push import README_MARKER, FolderError, RetryPolicy, push_folder, resolve_repo_id

FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)
REPO_ROOT = Path(__file__).resolve().parents[1]


def folder_fingerprint(folder: Path) -> str:
    """Names, bytes and modification times of everything under `folder`: any write changes it."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder).as_posix()}|{path.is_dir()}|{stat.st_mtime_ns}".encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def write_model_folder(folder: Path, readme: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"backbone": "tiny:cnn", "threshold": 0.5}))
    generator = torch.Generator().manual_seed(0)
    save_file({"proj.weight": torch.randn(4, 8, generator=generator), "proj.bias": torch.zeros(4)},
              folder / "model.safetensors")
    if readme is not None:
        (folder / "README.md").write_text(readme)
    return folder


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def quiet_push(*args, **kwargs):
    messages: list[str] = []
    kwargs.setdefault("retry", FAST_RETRY)
    result = push_folder(*args, echo=messages.append, **kwargs)
    return result, messages


# ----------------------------------------------------------------------------------------- round trips


def test_pushed_model_folder_downloads_identical_in_one_commit(fake_hub, tmp_path):
    folder = write_model_folder(tmp_path / "model", readme="---\nlicense: apache-2.0\n---\n# tiny\n")
    before = folder_fingerprint(folder)

    result, _ = quiet_push(folder, "defectclip/tiny-model", "model")
    snapshot = Path(snapshot_download("defectclip/tiny-model", cache_dir=tmp_path / "clean-cache"))

    downloaded = local_files(snapshot)
    assert downloaded.pop(".gitattributes")  # the Hub's own first commit
    assert downloaded == local_files(folder)
    assert snapshot.name == result.commit_oid
    assert [c.title for c in fake_hub.commits("defectclip/tiny-model")][1:] == ["initial commit"]
    assert folder_fingerprint(folder) == before


def test_pushed_parquet_dataset_loads_back_equal(fake_hub, tmp_path):
    import datasets

    original = datasets.Dataset.from_dict({
        "image_id": ["mt_001", "mt_002", "mt_003"],
        "caption": ["a blowhole in the magnetic tile", "a crack in the magnetic tile", "a fray in the tile"],
        "regions": [1, 2, 1],
    })
    folder = tmp_path / "captions"
    (folder / "data").mkdir(parents=True)
    original.to_parquet(folder / "data" / "train-00000-of-00001.parquet")

    quiet_push(folder, "captions", "dataset")
    loaded = datasets.load_dataset("defectclip/captions", split="train", cache_dir=str(tmp_path / "ds-cache"))

    assert loaded.to_dict() == original.to_dict()
    assert fake_hub.unhandled == []


def test_timm_model_from_the_hub_matches_the_pushed_one(fake_hub, tmp_path):
    import timm
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3, layers=(1, 1, 1, 1),
                              channels=(8, 16, 32, 64), stem_width=8).eval()
    save_for_hf(model, tmp_path / "timm-model", safe_serialization=True)

    quiet_push(tmp_path / "timm-model", "defectclip/tab-tiny-resnet", "model")
    loaded = timm.create_model("hf-hub:defectclip/tab-tiny-resnet", pretrained=True).eval()

    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_space_push_creates_a_gradio_space(fake_hub, tmp_path):
    folder = tmp_path / "space"
    folder.mkdir()
    (folder / "app.py").write_text("print('demo')\n")
    (folder / "requirements.txt").write_text("defectclip\n")

    quiet_push(folder, "defectclip/demo", "space", private=True)

    info = HfApi().space_info("defectclip/demo")
    assert info.sdk == "gradio" and info.private is True
    assert fake_hub.repo_files("defectclip/demo", "space")["app.py"] == b"print('demo')\n"


def test_ignored_files_are_not_pushed(fake_hub, tmp_path):
    folder = write_model_folder(tmp_path / "model")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "config.json.metadata").write_text("stale")

    result, _ = quiet_push(folder, "defectclip/clean", "model")

    assert [f.path_in_repo for f in result.files] == ["config.json", "model.safetensors"]
    assert set(fake_hub.repo_files("defectclip/clean")) == {".gitattributes", "config.json", "model.safetensors"}


# -------------------------------------------------------------------------------------------- retries


def test_push_survives_server_errors_with_backoff(fake_hub, tmp_path):
    folder = write_model_folder(tmp_path / "model")
    before = folder_fingerprint(folder)
    fake_hub.fail_requests("POST", r"/commit/", status=503, times=2)
    fake_hub.fail_requests("POST", r"/commit/", status=429, times=1)
    waits: list[float] = []

    result, messages = quiet_push(folder, "defectclip/flaky", "model", sleep=waits.append)

    assert waits == [0.01, 0.02, 0.04]
    assert sum("retrying" in m for m in messages) == 3
    assert fake_hub.request_count("POST", "/commit/") == 4
    assert fake_hub.repo_files("defectclip/flaky")["config.json"] == (folder / "config.json").read_bytes()
    assert result.commit_oid == fake_hub.commits("defectclip/flaky")[0].oid
    assert folder_fingerprint(folder) == before


def test_push_survives_dropped_connections(fake_hub, tmp_path):
    folder = write_model_folder(tmp_path / "model")
    fake_hub.fail_requests("POST", r"/api/repos/create", status=None, times=1)
    fake_hub.fail_requests("POST", r"/commit/", status=None, times=1)

    quiet_push(folder, "defectclip/dropped", "model", sleep=lambda _: None)

    assert "model.safetensors" in fake_hub.repo_files("defectclip/dropped")


def test_push_gives_up_after_the_last_attempt_and_leaves_the_folder_alone(fake_hub, tmp_path):
    folder = write_model_folder(tmp_path / "model")
    before = folder_fingerprint(folder)
    fake_hub.fail_requests("POST", r"/commit/", status=502, times=100)

    with pytest.raises(HfHubHTTPError):
        quiet_push(folder, "defectclip/down", "model", sleep=lambda _: None)

    assert fake_hub.request_count("POST", "/commit/") == FAST_RETRY.attempts
    assert len(fake_hub.commits("defectclip/down")) == 1
    assert folder_fingerprint(folder) == before


def test_client_errors_are_not_retried(fake_hub, tmp_path):
    folder = write_model_folder(tmp_path / "model")
    with pytest.raises(HfHubHTTPError) as error:
        quiet_push(folder, "defectclip/denied", "model", token="hf_not_the_right_one", sleep=lambda _: None)
    assert error.value.response.status_code == 401
    assert fake_hub.request_count("POST", "/api/repos/create") == 1


# --------------------------------------------------------------------------------------------- README


def test_readme_we_pushed_is_replaced_by_the_next_push(fake_hub, tmp_path):
    folder = write_model_folder(tmp_path / "model", readme="# v1\n")
    quiet_push(folder, "defectclip/card", "model")
    (folder / "README.md").write_text("# v2\n")

    result, _ = quiet_push(folder, "defectclip/card", "model")

    assert fake_hub.repo_files("defectclip/card")["README.md"] == b"# v2\n"
    assert not result.readme_kept
    assert README_MARKER in fake_hub.commits("defectclip/card")[0].message


def test_readme_edited_on_the_hub_is_kept_unless_forced(fake_hub, tmp_path):
    folder = write_model_folder(tmp_path / "model", readme="# generated card v1\n")
    quiet_push(folder, "defectclip/edited", "model")
    HfApi().upload_file(path_or_fileobj=b"# hand-written card\n", path_in_repo="README.md",
                        repo_id="defectclip/edited", commit_message="Update README.md")
    (folder / "README.md").write_text("# generated card v2\n")
    (folder / "config.json").write_text('{"threshold": 0.7}')

    kept, messages = quiet_push(folder, "defectclip/edited", "model")
    still_kept, _ = quiet_push(folder, "defectclip/edited", "model")
    files_after_kept = fake_hub.repo_files("defectclip/edited")
    forced, _ = quiet_push(folder, "defectclip/edited", "model", force=True)

    assert kept.readme_kept and still_kept.readme_kept and not forced.readme_kept
    assert any("Kept the README.md" in m and "--force" in m for m in messages)
    assert files_after_kept["README.md"] == b"# hand-written card\n"
    assert files_after_kept["config.json"] == b'{"threshold": 0.7}'
    assert fake_hub.repo_files("defectclip/edited")["README.md"] == b"# generated card v2\n"


def test_readme_we_never_wrote_is_kept(fake_hub, tmp_path):
    api = HfApi()
    api.create_repo("defectclip/foreign")
    api.upload_file(path_or_fileobj=b"# someone else's card\n", path_in_repo="README.md",
                    repo_id="defectclip/foreign")
    folder = write_model_folder(tmp_path / "model", readme="# ours\n")

    result, _ = quiet_push(folder, "defectclip/foreign", "model")

    assert result.readme_kept
    assert fake_hub.repo_files("defectclip/foreign")["README.md"] == b"# someone else's card\n"
    assert "model.safetensors" in fake_hub.repo_files("defectclip/foreign")


def test_readme_edited_between_our_check_and_our_commit_is_not_overwritten(fake_hub, tmp_path):
    folder = write_model_folder(tmp_path / "model", readme="# ours v1\n")
    quiet_push(folder, "defectclip/race", "model")
    (folder / "README.md").write_text("# ours v2\n")
    (folder / "config.json").write_text('{"threshold": 0.9}')
    # The web edit lands after push_folder read the head and checked README.md, just before its commit.
    fake_hub.before_request("POST", r"/commit/",
                            lambda hub: hub.commit_files("defectclip/race", {"README.md": b"# human\n"}))

    result, messages = quiet_push(folder, "defectclip/race", "model", sleep=lambda _: None)

    commit_statuses = [r.status for r in fake_hub.requests if r.method == "POST" and "/commit/" in r.path]
    assert commit_statuses[-2:] == [412, 200]  # stale parent refused, then a fresh check keeps the README
    assert result.readme_kept and any("Kept the README.md" in m for m in messages)
    assert fake_hub.repo_files("defectclip/race")["README.md"] == b"# human\n"
    assert fake_hub.repo_files("defectclip/race")["config.json"] == b'{"threshold": 0.9}'


# --------------------------------------------------------------------------------- folder and repo ids


def test_folder_must_exist_be_a_folder_and_hold_files(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "only-cache" / "__pycache__").mkdir(parents=True)
    (tmp_path / "only-cache" / "__pycache__" / "m.pyc").write_bytes(b"\0")
    (tmp_path / "file.txt").write_text("x")

    with pytest.raises(FolderError, match="does not exist"):
        push_folder(tmp_path / "missing", "defectclip/x", dry_run=True, echo=lambda _: None)
    with pytest.raises(FolderError, match="empty"):
        push_folder(tmp_path / "empty", "defectclip/x", dry_run=True, echo=lambda _: None)
    with pytest.raises(FolderError, match="empty"):
        push_folder(tmp_path / "only-cache", "defectclip/x", dry_run=True, echo=lambda _: None)
    with pytest.raises(FolderError, match="Not a folder"):
        push_folder(tmp_path / "file.txt", "defectclip/x", dry_run=True, echo=lambda _: None)
    with pytest.raises(ValueError, match="repo_type"):
        push_folder(tmp_path, "defectclip/x", "kernel", dry_run=True, echo=lambda _: None)


def test_repo_without_namespace_goes_to_the_org(monkeypatch):
    monkeypatch.delenv("DEFECTCLIP_ORG", raising=False)
    assert resolve_repo_id("tab-resnet18") == "defectclip/tab-resnet18"
    assert resolve_repo_id("someone/tab-resnet18") == "someone/tab-resnet18"
    monkeypatch.setenv("DEFECTCLIP_ORG", "acme")
    assert resolve_repo_id("tab-resnet18") == "acme/tab-resnet18"


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_dry_run_lists_files_and_makes_no_request(fake_hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DEFECTCLIP_ORG", "acme")
    folder = write_model_folder(tmp_path / "model", readme="# card\n")
    size = (folder / "model.safetensors").stat().st_size

    code = main(["push-model", str(folder), "tab-tiny", "--dry-run"])

    out = capsys.readouterr().out
    assert code == 0
    assert "model acme/tab-tiny" in out
    assert f"{size:,d}  model.safetensors" in out and "README.md" in out and "config.json" in out
    assert fake_hub.requests == []


def test_cli_pushes_to_the_default_org(fake_hub, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DEFECTCLIP_ORG", raising=False)
    folder = write_model_folder(tmp_path / "model")

    code = main(["push-model", str(folder), "cli-model", "--private", "--retry-delay", "0"])

    assert code == 0
    assert fake_hub.repo("defectclip/cli-model").private
    assert "Pushed 2 file(s) to model defectclip/cli-model" in capsys.readouterr().out


def test_cli_reports_errors_with_an_exit_code(fake_hub, tmp_path, capsys):
    assert main(["push-dataset", str(tmp_path / "missing"), "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    folder = write_model_folder(tmp_path / "model")
    fake_hub.fail_requests("POST", r"/commit/", status=500, times=10)
    assert main(["push-model", str(folder), "broken", "--attempts", "2", "--retry-delay", "0"]) == 1
    assert "push failed" in capsys.readouterr().err


def test_python_dash_m_hub_dry_run_in_a_subprocess(fake_hub, tmp_path):
    folder = write_model_folder(tmp_path / "model")
    env = {**os.environ, **fake_hub.subprocess_env(tmp_path / "child-cache"), "DEFECTCLIP_ORG": "acme"}

    completed = subprocess.run(
        [sys.executable, "-m", "hub", "push-space", str(folder), "demo", "--dry-run"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=True,
    )

    assert "space acme/demo" in completed.stdout and "model.safetensors" in completed.stdout
    assert fake_hub.requests == []
