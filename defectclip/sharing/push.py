"""Push an artifact folder (model, dataset or Space) to the Hugging Face Hub as one commit.

The folder is only ever read. A README.md on the Hub that someone edited after defectclip last pushed it is
kept unless `force=True` (see `_remote_readme_state` for how "edited" is decided). Network failures
(connection errors, 5xx, 429) and a lost race with a concurrent commit are retried with exponential backoff.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import DefectclipError

REPO_TYPES = ("model", "dataset", "space")
ORG_ENV_VAR = "DEFECTCLIP_ORG"
DEFAULT_ORG = "defectclip"
README = "README.md"
KEPT_REMOTE_FILES = frozenset({".gitattributes", README})
SPACE_SDK = "gradio"
# Written into the description of every commit that carries our README; see `_remote_readme_state`.
README_MARKER = "defectclip-readme-sha1"
_README_MARKER_RE = re.compile(rf"^{README_MARKER}: ([0-9a-f]{{40}})$", re.MULTILINE)

# Never part of an artifact: version control, Python caches, and the metadata folder huggingface_hub writes
# into a `local_dir` download (pushing it back would publish stale download state).
_IGNORED_DIR_NAMES = frozenset({".git", "__pycache__", ".ipynb_checkpoints"})
_IGNORED_PREFIXES = (".cache/huggingface/",)
_IGNORED_SUFFIXES = (".pyc",)


class FolderError(DefectclipError):
    """The folder to push is missing, not a folder, or holds nothing to push."""


@dataclasses.dataclass(frozen=True)
class LocalFile:
    path_in_repo: str
    local_path: Path
    size: int


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """`attempts` tries in all; the wait after try n is base_delay * 2**(n-1), capped at max_delay."""

    attempts: int = 5
    base_delay: float = 1.0
    max_delay: float = 30.0

    def delay(self, failed_attempt: int) -> float:
        return min(self.base_delay * 2 ** (failed_attempt - 1), self.max_delay)


@dataclasses.dataclass(frozen=True)
class PushResult:
    repo_id: str
    repo_type: str
    files: list[LocalFile]
    dry_run: bool
    commit_oid: str | None = None
    commit_url: str | None = None
    readme_kept: bool = False  # True when the remote README.md was left as it was (edited on the Hub)


# ------------------------------------------------------------------------------------------ local side


def resolve_repo_id(repo: str) -> str:
    """`name` -> `<org>/name`, with the org from $DEFECTCLIP_ORG (default `defectclip`); `ns/name` unchanged."""
    from huggingface_hub.utils import validate_repo_id

    repo_id = repo if "/" in repo else f"{os.environ.get(ORG_ENV_VAR) or DEFAULT_ORG}/{repo}"
    validate_repo_id(repo_id)
    return repo_id


def _is_ignored(path_in_repo: str) -> bool:
    parts = path_in_repo.split("/")
    return (
        any(part in _IGNORED_DIR_NAMES for part in parts[:-1])
        or path_in_repo.startswith(_IGNORED_PREFIXES)
        or path_in_repo.endswith(_IGNORED_SUFFIXES)
    )


def list_folder_files(folder: str | Path) -> list[LocalFile]:
    """The files a push would upload, sorted by path; raises FolderError when there is nothing to push."""
    folder = Path(folder)
    if not folder.exists():
        raise FolderError(f"Folder to push does not exist: {folder}")
    if not folder.is_dir():
        raise FolderError(f"Not a folder: {folder}")
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        path_in_repo = path.relative_to(folder).as_posix()
        if not _is_ignored(path_in_repo):
            files.append(LocalFile(path_in_repo, path, path.stat().st_size))
    if not files:
        raise FolderError(f"Folder to push is empty (nothing but ignored files): {folder}")
    return files


def describe_files(files: list[LocalFile]) -> list[str]:
    """One line per file, size right-aligned, then a total: what --dry-run prints."""
    lines = [f"{f.size:>14,d}  {f.path_in_repo}" for f in files]
    lines.append(f"{sum(f.size for f in files):>14,d}  total, {len(files)} file(s)")
    return lines


# ----------------------------------------------------------------------------------------- remote side


def _git_blob_sha1(path: Path) -> str:
    from huggingface_hub.utils.sha import git_hash

    return git_hash(path.read_bytes())


def _remote_readme_state(api, repo_id: str, repo_type: str, head: str, local_sha1: str) -> str:
    """How the README.md on the Hub relates to ours: "absent", "same", "ours" (safe to replace) or "edited".

    Every commit that carries our README records the README's git blob id in its description
    (`defectclip-readme-sha1: <sha1>`). The README on the Hub is ours to replace only when its blob id equals
    the one recorded in the newest such commit, i.e. nobody changed it since we pushed it. We chose the commit
    history over a marker file in the repo because it adds nothing to the artifact, and over comparing with our
    previous local README because the Hub, not the local machine, knows what was last published. The blob id
    comes from `paths-info` (the Hub's own git id for the file), so the check downloads nothing. A README with
    no record (written by someone else, or history squashed) counts as "edited": we never overwrite a README we
    cannot prove is ours.
    """
    infos = api.get_paths_info(repo_id, [README], repo_type=repo_type, revision=head)
    remote = next((info for info in infos if info.path == README and hasattr(info, "blob_id")), None)
    if remote is None:
        return "absent"
    if remote.blob_id == local_sha1:
        return "same"
    for commit in api.list_repo_commits(repo_id, repo_type=repo_type, revision=head):
        recorded = _README_MARKER_RE.search(f"{commit.title}\n{commit.message}")
        if recorded:
            return "ours" if recorded.group(1) == remote.blob_id else "edited"
    return "edited"


def remote_readme_is_ours(repo_id: str, repo_type: str, token: str | None = None, endpoint: str | None = None) -> bool:
    """True when the repo has no README.md, or the one defectclip last pushed and nobody edited since: a push
    that lets another tool rewrite the README first (DatasetDict.push_to_hub adds its dataset_info) asks this
    beforehand, and may then replace that README with its own card without overriding a person's edit."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    api = HfApi(endpoint=endpoint, token=token, library_name="defectclip")
    try:
        head = api.repo_info(repo_id, repo_type=repo_type).sha
    except RepositoryNotFoundError:
        return True
    return _remote_readme_state(api, repo_id, repo_type, head, local_sha1="") in ("absent", "ours")


def _commit_text(repo_type: str, files: list[LocalFile], readme_sha1: str | None, message: str | None):
    title = message or f"Push {repo_type} with defectclip ({len(files)} file(s))"
    description = f"{README_MARKER}: {readme_sha1}" if readme_sha1 else ""
    return title, description


def stale_remote_files(api, repo_id: str, repo_type: str, head: str, local: set[str]) -> list[str]:
    """Files on the Hub that the new version does not have (an old metrics.json, a renamed shard): a push that
    kept them would publish an artifact that never existed locally. `.gitattributes` and README.md (decided
    apart) stay."""
    remote = api.list_repo_files(repo_id, repo_type=repo_type, revision=head)
    return sorted(path for path in remote if path not in local and path not in KEPT_REMOTE_FILES)


def _push_once(api, folder_files: list[LocalFile], repo_id: str, repo_type: str, *, force: bool,
               private: bool | None, commit_message: str | None, echo: Callable[[str], None],
               delete_stale: bool = False) -> PushResult:
    """Create the repo if needed, decide about README.md, and make one commit. Safe to call again on failure."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True,
                    space_sdk=SPACE_SDK if repo_type == "space" else None)
    head = api.repo_info(repo_id, repo_type=repo_type).sha

    local_readme = next((f for f in folder_files if f.path_in_repo == README), None)
    readme_sha1 = _git_blob_sha1(local_readme.local_path) if local_readme else None
    keep_remote_readme = False
    if local_readme is not None:
        state = _remote_readme_state(api, repo_id, repo_type, head, readme_sha1)
        keep_remote_readme = state == "edited" and not force
    if keep_remote_readme:
        echo(f"Kept the README.md on the Hub for {repo_type} {repo_id}: it changed since defectclip last pushed "
             "it (or defectclip never did). The other files are pushed; use --force to replace the README too.")
    to_upload = [f for f in folder_files if not (keep_remote_readme and f.path_in_repo == README)]

    title, description = _commit_text(repo_type, to_upload, None if keep_remote_readme else readme_sha1,
                                      commit_message)
    # Fresh operations on every attempt: huggingface_hub mutates them while committing.
    operations = [CommitOperationAdd(f.path_in_repo, str(f.local_path)) for f in to_upload]
    if delete_stale:
        stale = stale_remote_files(api, repo_id, repo_type, head, {f.path_in_repo for f in folder_files})
        operations += [CommitOperationDelete(path) for path in stale]
        if stale:
            echo(f"Deleting {len(stale)} file(s) the new version no longer has: {', '.join(stale)}")
    # parent_commit makes the Hub refuse the commit if someone committed after our README check.
    info = api.create_commit(repo_id, operations, commit_message=title, commit_description=description,
                             repo_type=repo_type, parent_commit=head)
    return PushResult(repo_id, repo_type, folder_files, dry_run=False, commit_oid=info.oid,
                      commit_url=info.commit_url, readme_kept=keep_remote_readme)


# ---------------------------------------------------------------------------------------------- retries


def is_retryable(error: BaseException) -> bool:
    """Transient: no connection or a dropped one, the Hub overloaded or failing, or a concurrent commit."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import httpx

    if isinstance(error, httpx.TransportError):
        return True
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        # 412: our parent_commit is stale; the next attempt re-reads the head and re-checks README.md.
        return status >= 500 or status in (412, 429)
    return False


def with_retries(operation: Callable[[], PushResult], policy: RetryPolicy, echo: Callable[[str], None],
                 sleep: Callable[[float], None] = time.sleep) -> PushResult:
    for attempt in range(1, policy.attempts + 1):
        try:
            return operation()
        except Exception as error:
            if attempt == policy.attempts or not is_retryable(error):
                raise
            delay = policy.delay(attempt)
            echo(f"Push attempt {attempt}/{policy.attempts} failed ({type(error).__name__}: "
                 f"{str(error).splitlines()[0] if str(error) else ''}); retrying in {delay:.2f}s")
            sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")


# ------------------------------------------------------------------------------------------------ entry


def push_folder(
    folder: str | Path,
    repo_id: str,
    repo_type: str = "model",
    *,
    dry_run: bool = False,
    force: bool = False,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    delete_stale: bool = True,
    retry: RetryPolicy = RetryPolicy(),
    echo: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> PushResult:
    """Upload every file of `folder` to `repo_id` (created if missing) in one commit.

    `repo_id` without a namespace goes to $DEFECTCLIP_ORG (default `defectclip`). `dry_run` lists the files
    through `echo` and makes no network call. A README.md edited on the Hub is kept unless `force`.
    `private` applies when the repo is created; `token` and `endpoint` default to huggingface_hub's own
    (HF_TOKEN / the saved login, HF_ENDPOINT). `delete_stale` (default) deletes, in the same commit, remote files the
    folder does not have (a README.md kept as edited on the Hub stays).
    """
    if repo_type not in REPO_TYPES:
        raise ValueError(f"repo_type must be one of {REPO_TYPES}, got {repo_type!r}")
    files = list_folder_files(folder)
    repo_id = resolve_repo_id(repo_id)
    if dry_run:
        echo(f"Dry run: would push {len(files)} file(s) from {folder} to {repo_type} {repo_id}")
        for line in describe_files(files):
            echo(line)
        return PushResult(repo_id, repo_type, files, dry_run=True)

    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token, library_name="defectclip")
    result = with_retries(
        lambda: _push_once(api, files, repo_id, repo_type, force=force, private=private,
                           commit_message=commit_message, echo=echo, delete_stale=delete_stale),
        retry, echo, sleep,
    )
    pushed = len(files) - (1 if result.readme_kept else 0)
    echo(f"Pushed {pushed} file(s) to {repo_type} {repo_id}: {result.commit_url}")
    return result
