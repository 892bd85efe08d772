"""The fake Hub answers huggingface_hub and datasets the way the real Hub does, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fake_hub import fake_hub, git_blob_sha1, running_fake_hub  # noqa: F401  (fake_hub is a fixture)
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    RepoFile,
    RepoFolder,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    model_info,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session, httpx

REPO = "defectclip/tiny"


def _commit(api: HfApi, files: dict[str, bytes], repo_id=REPO, repo_type="model", **kwargs):
    operations = [CommitOperationAdd(path, content) for path, content in files.items()]
    return api.create_commit(repo_id, operations, commit_message="add files", repo_type=repo_type, **kwargs)


@pytest.fixture
def api(fake_hub) -> HfApi:
    return HfApi()


def test_clients_point_at_the_fake_hub_only_while_it_runs():
    import datasets.config

    def settings():
        return constants.ENDPOINT, datasets.config.HF_ENDPOINT, os.environ.get("HF_TOKEN"), constants.HF_HUB_CACHE

    before = settings()
    with running_fake_hub() as hub:
        url = hub.url
        assert urlsplit(url).hostname == "127.0.0.1"
        assert constants.ENDPOINT == datasets.config.HF_ENDPOINT == HfApi().endpoint == model_info.__self__.endpoint
        assert os.environ["HF_TOKEN"] == hub.token
    assert settings() == before
    with pytest.raises(OSError):  # the server is gone: nothing listens on its port any more
        socket.create_connection((urlsplit(url).hostname, urlsplit(url).port), timeout=1).close()


def test_commit_then_snapshot_download_gives_the_same_bytes(fake_hub, api, tmp_path):
    api.create_repo(REPO)
    files = {"config.json": b'{"width": 8}', "weights/model.bin": bytes(range(256)) * 40, "empty.txt": b""}
    info = _commit(api, files)

    snapshot = Path(snapshot_download(REPO, cache_dir=tmp_path / "cache"))

    downloaded = {p.relative_to(snapshot).as_posix(): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()}
    assert downloaded == {**files, ".gitattributes": downloaded[".gitattributes"]}
    assert snapshot.name == info.oid == model_info(REPO).sha
    assert fake_hub.unhandled == []


def test_every_commit_gets_a_new_sha_and_history_is_listed(fake_hub, api):
    api.create_repo(REPO)
    first = _commit(api, {"a.txt": b"1"})
    second = _commit(api, {"a.txt": b"2"})

    commits = api.list_repo_commits(REPO)

    assert first.oid != second.oid
    assert [c.commit_id for c in commits[:2]] == [second.oid, first.oid]
    assert commits[-1].title == "initial commit"
    assert fake_hub.repo_files(REPO, revision=first.oid)["a.txt"] == b"1"


def test_repo_info_for_models_datasets_and_spaces(fake_hub, api):
    api.create_repo("defectclip/m")
    api.create_repo("defectclip/d", repo_type="dataset", private=True)
    api.create_repo("defectclip/s", repo_type="space", space_sdk="gradio")
    _commit(api, {"README.md": b"---\nlicense: mit\ntags: [anomaly]\n---\n# card\n"}, repo_id="defectclip/m")

    model = api.model_info("defectclip/m", files_metadata=True)
    dataset = api.dataset_info("defectclip/d")
    space = api.space_info("defectclip/s")

    readme = next(s for s in model.siblings if s.rfilename == "README.md")
    assert readme.size == 44 and readme.blob_id == git_blob_sha1(fake_hub.repo_files("defectclip/m")["README.md"])
    assert model.card_data.license == "mit" and model.tags == ["anomaly"]
    assert dataset.private is True and dataset.sha
    assert space.sdk == "gradio" and [s.rfilename for s in space.siblings] == [".gitattributes"]


def test_create_repo_twice_needs_exist_ok(api):
    api.create_repo(REPO)
    api.create_repo(REPO, exist_ok=True)
    with pytest.raises(HfHubHTTPError) as error:
        api.create_repo(REPO)
    assert error.value.response.status_code == 409


def test_tree_listing_and_paths_info(api):
    api.create_repo(REPO)
    _commit(api, {"top.txt": b"t", "a/b/deep.txt": b"d", "a/side.txt": b"s"})

    top = list(api.list_repo_tree(REPO))
    everything = list(api.list_repo_tree(REPO, recursive=True))
    inside_a = list(api.list_repo_tree(REPO, path_in_repo="a"))
    infos = api.get_paths_info(REPO, ["a/b", "top.txt", "missing.txt"])

    assert {(type(e).__name__, e.path) for e in top} == {
        ("RepoFolder", "a"), ("RepoFile", "top.txt"), ("RepoFile", ".gitattributes")}
    assert {e.path for e in everything if isinstance(e, RepoFile)} == {
        ".gitattributes", "top.txt", "a/b/deep.txt", "a/side.txt"}
    assert {e.path for e in inside_a} == {"a/b", "a/side.txt"}
    assert [(type(i), i.path) for i in infos] == [(RepoFolder, "a/b"), (RepoFile, "top.txt")]


def test_resolve_answers_head_get_and_range_like_the_hub(api):
    api.create_repo(REPO)
    content = b"0123456789" * 10
    commit = _commit(api, {"dir/data.txt": content})
    url = hf_hub_url(REPO, "dir/data.txt")

    metadata = get_hf_file_metadata(url)
    partial = get_session().get(url, headers={"Range": "bytes=5-14"})
    past_end = get_session().get(url, headers={"Range": "bytes=500-"})

    assert (metadata.commit_hash, metadata.etag, metadata.size) == (commit.oid, git_blob_sha1(content), 100)
    assert partial.status_code == 206 and partial.content == content[5:15]
    assert partial.headers["Content-Range"] == "bytes 5-14/100"
    assert past_end.status_code == 416


def test_binary_formats_go_through_lfs_like_on_the_hub(api, fake_hub, tmp_path):
    api.create_repo(REPO)
    weights = bytes(range(256)) * 8
    _commit(api, {"model.safetensors": weights, "config.json": b"{}"})

    (entry,) = api.get_paths_info(REPO, ["model.safetensors"])
    metadata = get_hf_file_metadata(hf_hub_url(REPO, "model.safetensors"))
    downloaded = Path(hf_hub_download(REPO, "model.safetensors", cache_dir=tmp_path)).read_bytes()

    assert entry.lfs is not None and entry.lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert entry.size == len(weights) and metadata.etag == entry.lfs.sha256
    assert downloaded == weights
    assert fake_hub.request_count("PUT", "^/fake-lfs/") == 1
    assert fake_hub.repo("defectclip/tiny").resolve("main").lfs == {"model.safetensors"}


def test_missing_repo_revision_and_file_raise_the_hub_errors(api, tmp_path):
    api.create_repo(REPO)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("defectclip/nope", "config.json", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, ".gitattributes", revision="v9", cache_dir=tmp_path)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "config.json", cache_dir=tmp_path)


def test_private_repo_is_hidden_without_the_token(api):
    api.create_repo(REPO, private=True)
    assert api.model_info(REPO).private is True
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(REPO, token=False)


def test_writes_need_the_token_and_a_namespace_we_belong_to(api):
    with pytest.raises(HfHubHTTPError) as anonymous:
        HfApi(token="hf_wrong").create_repo(REPO)
    with pytest.raises(HfHubHTTPError) as foreign:
        api.create_repo("someone-else/repo")
    assert anonymous.value.response.status_code == 401
    assert foreign.value.response.status_code == 403


def test_deletions_and_a_stale_parent_commit(api, fake_hub):
    api.create_repo(REPO)
    first = _commit(api, {"keep.txt": b"k", "gone.txt": b"g", "folder/x.txt": b"x", "folder/y.txt": b"y"})
    api.create_commit(REPO, [CommitOperationDelete("gone.txt"), CommitOperationDelete("folder/")],
                      commit_message="delete")

    with pytest.raises(HfHubHTTPError) as stale:
        _commit(api, {"late.txt": b"l"}, parent_commit=first.oid)

    assert set(fake_hub.repo_files(REPO)) == {".gitattributes", "keep.txt"}
    assert stale.value.response.status_code == 412


def test_invalid_readme_metadata_is_rejected_before_the_commit(api, fake_hub):
    api.create_repo(REPO)
    with pytest.raises(ValueError, match="Invalid metadata"):
        _commit(api, {"README.md": b"---\n- just\n- a list\n---\n"})
    assert fake_hub.request_count("POST", "/commit/") == 0


def test_branches_refs_and_downloads_from_a_branch(api, tmp_path):
    api.create_repo(REPO)
    main_commit = _commit(api, {"v.txt": b"main"})
    api.create_branch(REPO, branch="dev")
    api.create_commit(REPO, [CommitOperationAdd("v.txt", b"dev")], commit_message="dev", revision="dev")

    refs = api.list_repo_refs(REPO)
    on_main = Path(hf_hub_download(REPO, "v.txt", cache_dir=tmp_path)).read_bytes()
    on_dev = Path(hf_hub_download(REPO, "v.txt", revision="dev", cache_dir=tmp_path)).read_bytes()

    assert {b.name for b in refs.branches} == {"main", "dev"}
    assert (on_main, on_dev) == (b"main", b"dev")
    assert next(b for b in refs.branches if b.name == "main").target_commit == main_commit.oid


def test_injected_failures_answer_an_error_or_drop_the_connection(api, fake_hub):
    api.create_repo(REPO)
    fake_hub.fail_requests("POST", r"/commit/", status=503, times=1)
    fake_hub.fail_requests("POST", r"/commit/", status=None, times=1)

    with pytest.raises(HfHubHTTPError) as server_error:
        _commit(api, {"a.txt": b"a"})
    with pytest.raises(httpx.TransportError):
        _commit(api, {"a.txt": b"a"})
    _commit(api, {"a.txt": b"a"})

    assert server_error.value.response.status_code == 503
    assert fake_hub.repo_files(REPO)["a.txt"] == b"a"
    assert fake_hub.request_count("POST", "/commit/") == 3


def test_non_loopback_hosts_are_refused_before_any_connection(fake_hub):
    for url in ("https://huggingface.co/api/models/gpt2", "http://datasets-server.127.0.0.1/info?dataset=x"):
        with pytest.raises(httpx.ConnectError, match="non-loopback"):
            get_session().get(url)


def test_datasets_push_to_hub_and_load_dataset_round_trip(fake_hub, tmp_path):
    import datasets

    original = datasets.Dataset.from_dict({"caption": ["a scratch", "a dent", "a crack"], "label": [0, 1, 2]})
    original.push_to_hub("defectclip/captions")

    loaded = datasets.load_dataset("defectclip/captions", split="train", cache_dir=str(tmp_path / "ds"))

    assert loaded.to_dict() == original.to_dict()
    assert any(path.endswith(".parquet") for path in fake_hub.repo_files("defectclip/captions", "dataset"))
    assert fake_hub.unhandled == []


def test_request_log_records_method_path_and_status(api, fake_hub):
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("defectclip/absent")
    last = fake_hub.requests[-1]
    assert (last.method, last.path, last.status) == ("GET", "/api/models/defectclip/absent", 404)
    assert json.loads(json.dumps(fake_hub.subprocess_env(Path("/tmp"))))["HF_ENDPOINT"] == fake_hub.url
