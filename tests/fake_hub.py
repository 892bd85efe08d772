"""A small in-memory Hugging Face Hub on 127.0.0.1, for tests that push and pull through the real clients.

It speaks the subset of the Hub HTTP API that `huggingface_hub`, `datasets` and `timm` use: create and delete
repos (models, datasets, Spaces), preupload + NDJSON commits (regular files as base64; files matching the
repo's `.gitattributes` LFS patterns through the git-LFS batch API, as on the Hub; never Xet), repo info with
siblings and sha, tree listings, paths-info, refs, branches, commit history, and `resolve` (HEAD, GET, Range).
State lives in memory; every commit stores a full snapshot, so any old revision stays readable.

Usage in a test module (or import the fixture once in `tests/conftest.py`):

    from fake_hub import fake_hub  # noqa: F401  (registers the pytest fixture)

    def test_push(fake_hub):
        HfApi().create_repo("defectclip/x")          # goes to fake_hub.url
        fake_hub.repo_files("defectclip/x")          # {path: bytes} at main

While the fixture (or `running_fake_hub()`) is active the clients point at the fake Hub: the endpoint-derived
constants of huggingface_hub and datasets are patched, the token is the fake Hub's, caches live in a temporary
folder, and the shared HTTP client refuses any host other than the loopback one, so a test can never reach
the internet through huggingface_hub, datasets or timm.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import os
import re
import socket
import tempfile
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

REPO_TYPES = ("model", "dataset", "space")
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost"})
DEFAULT_USER = "fake-user"
DEFAULT_TOKEN = "hf_fake_hub_test_token"
DEFAULT_ORGS = ("defectclip",)
# Like the real Hub, every new repo starts with a commit holding a `.gitattributes` that sends binary formats to
# LFS: snapshots then look like real ones (a test comparing a pushed folder with a download must expect this
# extra file, as on huggingface.co), and files matching these patterns go through the LFS upload protocol.
_LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.gz", "*.h5", "*.joblib", "*.msgpack", "*.npy", "*.npz",
    "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.safetensors", "*.tar",
    "*.tflite", "*.tgz", "*.xz", "*.zip", "*.zst", "*.png", "*.jpg", "*.jpeg", "*.webp", "*tfevents*",
)
INITIAL_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in _LFS_PATTERNS).encode()


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's `oid` and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(content: bytes) -> bytes:
    """The git-LFS pointer file git stores in place of an LFS file; its blob id is the file's git `oid`."""
    sha256 = hashlib.sha256(content).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(content)}\n".encode()


def _lfs_patterns(files: dict) -> list[str]:
    lines = files.get(".gitattributes", b"").decode("utf-8", "replace").splitlines()
    return [line.split()[0] for line in lines if "filter=lfs" in line.split()[1:]]


def _tracked_by_lfs(path: str, patterns: list[str]) -> bool:
    """gitattributes matching, simplified: a pattern without a slash matches the file name at any depth."""
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(path if "/" in pattern else name, pattern) for pattern in patterns)


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class HubError(Exception):
    """An HTTP error answered the way the Hub does: status, `X-Error-Code` header and a JSON `error` body."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


# ----------------------------------------------------------------------------------------------- repo state


@dataclasses.dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    date: str
    files: dict  # path -> bytes: the full tree at this commit (snapshots share the bytes objects)
    lfs: frozenset = frozenset()  # paths stored as LFS objects (git holds a pointer file for them)

    def oid_of(self, path: str) -> str:
        """The file's git blob id: of its content, or of its LFS pointer."""
        content = self.files[path]
        return git_blob_sha1(lfs_pointer(content) if path in self.lfs else content)

    def etag_of(self, path: str) -> str:
        """What `resolve` answers as ETag: the git blob id, or the sha256 for LFS files (as the Hub does)."""
        return hashlib.sha256(self.files[path]).hexdigest() if path in self.lfs else self.oid_of(path)

    @property
    def message(self) -> str:
        return f"{self.title}\n\n{self.description}" if self.description else self.title


@dataclasses.dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    sdk: str | None
    created_at: str
    branches: dict = dataclasses.field(default_factory=dict)  # name -> commit oid
    tags: dict = dataclasses.field(default_factory=dict)  # name -> commit oid
    commits: dict = dataclasses.field(default_factory=dict)  # oid -> Commit
    hardware: str | None = None  # a Space's requested hardware (create_repo's `hardware` or POST .../hardware)

    def add_commit(self, branch: str, title: str, description: str, files: dict, lfs=frozenset()) -> Commit:
        parent = self.branches.get(branch)
        # A commit id hashes its parent, message and tree like git does, so ids are deterministic and unique.
        tree = sorted((path, git_blob_sha1(content), path in lfs) for path, content in files.items())
        digest = json.dumps([self.repo_type, self.repo_id, parent, title, description, tree]).encode()
        commit = Commit(hashlib.sha1(digest).hexdigest(), parent, title, description, _utc_now(), dict(files),
                        frozenset(lfs))
        self.commits[commit.oid] = commit
        self.branches[branch] = commit.oid
        return commit

    def resolve(self, revision: str) -> Commit:
        """Branch, tag, full commit id or an unambiguous commit-id prefix of 7+ characters."""
        oid = self.branches.get(revision) or self.tags.get(revision)
        if oid is None and re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [known for known in self.commits if known.startswith(revision)]
            oid = matches[0] if len(matches) == 1 else None
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]

    def history(self, commit: Commit) -> Iterator[Commit]:
        while commit is not None:
            yield commit
            commit = self.commits.get(commit.parent) if commit.parent else None


def _folder_paths(files: dict) -> set[str]:
    return {str(parent) for path in files for parent in Path(path).parents if str(parent) != "."}


def _last_commit_touching(repo: Repo, commit: Commit, path: str) -> Commit:
    """Newest commit, walking back from `commit`, after which `path` (file or folder) never changed."""
    def content(c: Commit):
        return {p: git_blob_sha1(b) for p, b in c.files.items() if p == path or p.startswith(path + "/")}

    current, newest = content(commit), commit
    for older in list(repo.history(commit))[1:]:
        if content(older) != current:
            break
        newest = older
    return newest


def _card_data(files: dict) -> dict | None:
    """The YAML front matter of README.md, which the Hub exposes as `cardData`."""
    readme = files.get("README.md")
    if readme is None:
        return None
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", readme.decode("utf-8", "replace"), re.DOTALL)
    if not match:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------------------- the Hub


@dataclasses.dataclass
class RecordedRequest:
    method: str
    path: str
    status: int = 0


@dataclasses.dataclass
class FailureRule:
    """Answer matching requests with `status` (or drop the connection when status is None) `remaining` times."""

    method: str
    path_regex: str
    status: int | None
    remaining: int
    headers: dict


@dataclasses.dataclass
class RequestHook:
    """Call `callback(hub)` before handling the next `remaining` matching requests (e.g. a concurrent edit)."""

    method: str
    path_regex: str
    callback: object
    remaining: int


class FakeHub:
    """The Hub's state and its HTTP API. Start it with `start()` or use `running_fake_hub()` / the fixture."""

    def __init__(self, username: str = DEFAULT_USER, token: str = DEFAULT_TOKEN, orgs=DEFAULT_ORGS):
        self.username, self.token, self.orgs = username, token, tuple(orgs)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, shared by all repos like a blob store
        self.requests: list[RecordedRequest] = []
        self.unhandled: list[RecordedRequest] = []
        self._failures: list[FailureRule] = []
        self._hooks: list[RequestHook] = []
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # -- lifecycle ----------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("The fake Hub is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        self._server = _Server(("127.0.0.1", 0), _Handler, hub=self)
        # A short poll interval keeps stop() (which waits for the serve loop to notice) fast.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        # Keep-alive connections park handler threads in a blocking read: closing the sockets ends them now.
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = self._thread = None

    # -- test helpers -------------------------------------------------------------------------------------

    def fail_requests(self, method: str, path_regex: str, *, status: int | None = 503, times: int = 1,
                      headers: dict | None = None) -> None:
        """Make the next `times` requests matching `method` and `path_regex` fail with `status`.

        `status=None` closes the connection without answering (a network failure for the client).
        """
        with self._lock:
            self._failures.append(FailureRule(method.upper(), path_regex, status, times, headers or {}))

    def before_request(self, method: str, path_regex: str, callback, *, times: int = 1) -> None:
        """Run `callback(hub)` just before the next `times` matching requests are handled.

        Simulates something happening on the Hub between two client calls, such as a README edited in the web
        UI (`lambda hub: hub.commit_files(...)`) after a client read the head and before it commits.
        """
        with self._lock:
            self._hooks.append(RequestHook(method.upper(), path_regex, callback, times))

    def commit_files(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model", *,
                     title: str = "Update files via the web UI", description: str = "",
                     branch: str = "main", delete: tuple[str, ...] = ()) -> Commit:
        """Commit directly into the Hub's state, as an edit in the web UI would: no HTTP, no token."""
        with self._lock:
            repo = self.repo(repo_id, repo_type)
            head = repo.resolve(branch)
            patterns = _lfs_patterns({**head.files, **files})
            tree = {path: content for path, content in head.files.items() if path not in delete}
            tree.update(files)
            lfs = {p for p in tree
                   if (p in files and _tracked_by_lfs(p, patterns)) or (p not in files and p in head.lfs)}
            return repo.add_commit(branch, title, description, tree, lfs)

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        with self._lock:
            return self.repos[(repo_type, repo_id)]

    def repo_files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            return dict(self.repo(repo_id, repo_type).resolve(revision).files)

    def commits(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list[Commit]:
        """Newest first, like `HfApi.list_repo_commits`."""
        with self._lock:
            repo = self.repo(repo_id, repo_type)
            return list(repo.history(repo.resolve(revision)))

    def request_count(self, method: str | None = None, path_regex: str = "") -> int:
        with self._lock:
            return sum(
                1 for r in self.requests
                if (method is None or r.method == method.upper()) and re.search(path_regex, r.path)
            )

    def subprocess_env(self, cache_root: str | Path) -> dict[str, str]:
        """Environment variables that point a child process's huggingface_hub at this Hub.

        Only environment variables reach a child process: the loopback guard of `running_fake_hub()` does not.
        `datasets` in a child process would still try its dataset-viewer host, so keep child processes to
        huggingface_hub calls.
        """
        cache_root = Path(cache_root)
        return {
            "HF_ENDPOINT": self.url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_DATASETS_OFFLINE": "0",
            "HF_TOKEN": self.token,
            "HF_HOME": str(cache_root / "hf_home"),
            "HF_HUB_CACHE": str(cache_root / "hub"),
            "HF_DATASETS_CACHE": str(cache_root / "datasets"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_UPDATE_DOWNLOAD_COUNTS": "0",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    # -- request bookkeeping (called by the handler) ------------------------------------------------------

    def _record(self, method: str, path: str) -> RecordedRequest:
        record = RecordedRequest(method, path)
        with self._lock:
            self.requests.append(record)
        return record

    def _run_hooks(self, method: str, path: str) -> None:
        with self._lock:
            due = [hook for hook in self._hooks
                   if hook.remaining > 0 and hook.method == method and re.search(hook.path_regex, path)]
            for hook in due:
                hook.remaining -= 1
        for hook in due:
            hook.callback(self)

    def _injected_failure(self, method: str, path: str) -> FailureRule | None:
        with self._lock:
            for rule in self._failures:
                if rule.remaining > 0 and rule.method == method and re.search(rule.path_regex, path):
                    rule.remaining -= 1
                    return rule
        return None

    def _authorized(self, authorization: str | None) -> bool:
        return authorization == f"Bearer {self.token}"

    def _repo_url(self, base_url: str, repo: Repo) -> str:
        return f"{base_url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _get_repo(self, repo_type: str, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authorized):
            # The Hub hides private repos from strangers behind the same answer as missing ones.
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _require_write(self, authorized: bool, namespace: str) -> None:
        if not authorized:
            raise HubError(401, "Invalid credentials in Authorization header")
        if namespace not in (self.username, *self.orgs):
            raise HubError(403, f"You don't have the rights to create a repo under the namespace {namespace!r}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client can never block the test process at exit

    def __init__(self, address, handler, hub: FakeHub):
        self.hub = hub
        super().__init__(address, handler)


# ------------------------------------------------------------------------------------------ the HTTP layer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the clients' connection pools expect
    # Headers and body leave in two writes: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms per request.
    disable_nagle_algorithm = True
    timeout = 30  # an idle keep-alive connection frees its thread eventually even without stop()
    server: _Server

    # Silence the default per-request stderr logging: the hub keeps its own request log.
    def log_message(self, format, *args):  # noqa: A002
        pass

    def setup(self):
        super().setup()
        with self.server.hub._lock:
            self.server.hub._connections.add(self.connection)

    def finish(self):
        with contextlib.suppress(OSError):
            super().finish()
        with self.server.hub._lock:
            self.server.hub._connections.discard(self.connection)

    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    # -- plumbing -----------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        record = hub._record(self.command, split.path)
        # _send stamps the status before the answer leaves, so a test reading it after the client returns
        # never sees a request that was answered but not yet recorded.
        self._current_record = record
        body = self._read_body()
        hub._run_hooks(self.command, split.path)
        rule = hub._injected_failure(self.command, split.path)
        if rule is not None and rule.status is None:
            record.status = -1
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # the client sees the connection drop, no answer
            return
        if rule is not None:
            record.status = rule.status
            self._send_json(rule.status, {"error": "injected failure"}, rule.headers)
            return
        try:
            handled = _route(self, hub, split.path, parse_qs(split.query), body)
        except HubError as error:
            headers = {"X-Error-Message": error.message, **error.headers}
            if error.code:
                headers["X-Error-Code"] = error.code
            record.status = error.status
            self._send_json(error.status, {"error": error.message}, headers)
            return
        if handled is None:
            with hub._lock:
                hub.unhandled.append(record)
            record.status = 404
            self._send_json(404, {"error": f"fake hub: no route for {self.command} {split.path}"})
            return
        record.status = handled

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked_body()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _read_chunked_body(self) -> bytes:
        chunks = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                self.rfile.readline()
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

    @property
    def base_url(self) -> str:
        return self.server.hub.url

    @property
    def authorized(self) -> bool:
        return self.server.hub._authorized(self.headers.get("Authorization"))

    def _send(self, status: int, body: bytes, headers: dict) -> None:
        self._current_record.status = status
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, str(value))
        # HEAD answers carry the length of the body a GET would get, without the body.
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, payload, headers: dict | None = None) -> int:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})
        return status


# ----------------------------------------------------------------------------------------------- the routes

_API_REPO = re.compile(r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)(?:/(.*))?$")
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")
_LFS_BATCH = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)\.git/info/lfs/objects/batch$")
_LFS_OBJECT = re.compile(r"^/fake-lfs/([0-9a-f]{64})(/verify)?$")
_PLURAL_TO_TYPE = {"models": "model", "datasets": "dataset", "spaces": "space"}


def _route(handler: _Handler, hub: FakeHub, path: str, query: dict, body: bytes) -> int | None:
    """Answer the request; returns the status sent, or None when no route matches."""
    method = handler.command
    if path == "/api/whoami-v2" and method == "GET":
        return _whoami(handler, hub)
    if path == "/api/validate-yaml" and method == "POST":
        return _validate_yaml(handler, body)
    if path == "/api/repos/create" and method == "POST":
        return _create_repo(handler, hub, json.loads(body))
    if path == "/api/repos/delete" and method == "DELETE":
        return _delete_repo(handler, hub, json.loads(body))
    if match := _API_REPO.match(path):
        repo_type = _PLURAL_TO_TYPE[match.group(1)]
        repo_id = f"{unquote(match.group(2))}/{unquote(match.group(3))}"
        return _repo_api(handler, hub, repo_type, repo_id, match.group(4) or "", query, body)
    if (match := _LFS_BATCH.match(path)) and method == "POST":
        repo_type = {"datasets": "dataset", "spaces": "space"}.get(match.group(1), "model")
        return _lfs_batch(handler, hub, repo_type, f"{match.group(2)}/{match.group(3)}", json.loads(body))
    if match := _LFS_OBJECT.match(path):
        return _lfs_object(handler, hub, match.group(1), verify=bool(match.group(2)), body=body)
    if (match := _RESOLVE.match(path)) and method in ("GET", "HEAD"):
        repo_type = {"datasets": "dataset", "spaces": "space"}.get(match.group(1), "model")
        repo_id = f"{unquote(match.group(2))}/{unquote(match.group(3))}"
        return _resolve(handler, hub, repo_type, repo_id, unquote(match.group(4)), unquote(match.group(5)))
    return None


def _repo_api(handler, hub, repo_type, repo_id, rest, query, body) -> int | None:
    """`/api/{type}s/{namespace}/{name}/...`: the action is the first segment of `rest`."""
    action, _, tail = rest.partition("/")
    method = handler.command
    with hub._lock:
        repo = hub._get_repo(repo_type, repo_id, handler.authorized)
        if action == "" and method == "GET":
            return _repo_info(handler, hub, repo, repo.resolve("main"), query)
        if action == "revision" and method == "GET":
            return _repo_info(handler, hub, repo, repo.resolve(unquote(tail)), query)
        if action == "tree" and method == "GET":
            revision, _, subpath = tail.partition("/")
            return _tree(handler, repo, repo.resolve(unquote(revision)), unquote(subpath), query)
        if action == "paths-info" and method == "POST":
            return _paths_info(handler, repo, repo.resolve(unquote(tail)), body)
        if action == "preupload" and method == "POST":
            return _preupload(handler, hub, repo, unquote(tail), json.loads(body))
        if action == "commit" and method == "POST":
            return _commit(handler, hub, repo, unquote(tail), query, body)
        if action == "commits" and method == "GET":
            return _list_commits(handler, repo, repo.resolve(unquote(tail)))
        if action == "refs" and method == "GET":
            return _refs(handler, repo)
        if action == "hardware" and method == "POST" and repo_type == "space":
            hub._require_write(handler.authorized, repo_id.split("/")[0])
            repo.hardware = json.loads(body)["flavor"]
            return handler._send_json(200, _space_runtime(repo))
        if action == "branch" and method in ("POST", "DELETE"):
            return _branch(handler, hub, repo, unquote(tail), body)
    return None


def _whoami(handler, hub) -> int:
    if not handler.authorized:
        raise HubError(401, "Invalid credentials in Authorization header")
    orgs = [{"name": org, "type": "org", "roleInOrg": "write"} for org in hub.orgs]
    payload = {"type": "user", "name": hub.username, "fullname": hub.username, "orgs": orgs,
               "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}}}
    return handler._send_json(200, payload)


def _validate_yaml(handler, body) -> int:
    """Reject README front matter that is not a YAML mapping, as the Hub does before accepting a commit."""
    content = json.loads(body).get("content", "")
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
    if match:
        try:
            data = yaml.safe_load(match.group(1))
        except yaml.YAMLError as error:
            return handler._send_json(400, {"errors": [{"message": f"Invalid YAML: {error}"}], "warnings": []})
        if data is not None and not isinstance(data, dict):
            return handler._send_json(400, {"errors": [{"message": "Metadata must be a mapping"}], "warnings": []})
    return handler._send_json(200, {"errors": [], "warnings": []})


def _create_repo(handler, hub, payload) -> int:
    repo_type = payload.get("type") or "model"
    if repo_type not in REPO_TYPES:
        raise HubError(400, f"Invalid repo type {repo_type!r}")
    namespace = payload.get("organization") or hub.username
    hub._require_write(handler.authorized, namespace)
    repo_id = f"{namespace}/{payload['name']}"
    if repo_type == "space" and payload.get("sdk") not in ("gradio", "streamlit", "docker", "static"):
        raise HubError(400, "A Space needs an sdk")
    private = payload.get("visibility") == "private" or bool(payload.get("private"))
    with hub._lock:
        if (repo_type, repo_id) in hub.repos:
            url = hub._repo_url(handler.base_url, hub.repos[(repo_type, repo_id)])
            return handler._send_json(409, {"error": f"You already created this {repo_type} repo", "url": url})
        repo = Repo(repo_type, repo_id, private, payload.get("sdk"), _utc_now(), hardware=payload.get("hardware"))
        repo.add_commit("main", "initial commit", "", {".gitattributes": INITIAL_GITATTRIBUTES})
        hub.repos[(repo_type, repo_id)] = repo
        return handler._send_json(200, {"url": hub._repo_url(handler.base_url, repo), "name": repo_id, "id": repo_id})


def _delete_repo(handler, hub, payload) -> int:
    repo_type = payload.get("type") or "model"
    namespace = payload.get("organization") or hub.username
    hub._require_write(handler.authorized, namespace)
    with hub._lock:
        if hub.repos.pop((repo_type, f"{namespace}/{payload['name']}"), None) is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
    return handler._send_json(200, {})


def _repo_info(handler, hub, repo: Repo, commit: Commit, query) -> int:
    with_blobs = query.get("blobs", ["false"])[0].lower() == "true"
    siblings = []
    for path in sorted(commit.files):
        sibling = {"rfilename": path}
        if with_blobs:
            sibling.update(size=len(commit.files[path]), blobId=commit.oid_of(path))
            if path in commit.lfs:
                lfs = _lfs_info(commit.files[path])
                sibling["lfs"] = {"size": lfs["size"], "sha256": lfs["oid"], "pointerSize": lfs["pointerSize"]}
        siblings.append(sibling)
    card = _card_data(commit.files)
    payload = {
        "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
        "id": repo.repo_id,
        "author": repo.repo_id.split("/")[0],
        "sha": commit.oid,
        "lastModified": commit.date,
        "createdAt": repo.created_at,
        "private": repo.private,
        "disabled": False,
        "gated": False,
        "downloads": 0,
        "likes": 0,
        "tags": list((card or {}).get("tags") or []),
        "cardData": card,
        "siblings": siblings,
    }
    if repo.repo_type == "model" and card and card.get("library_name"):
        payload["library_name"] = card["library_name"]
    if repo.repo_type == "space":
        payload.update(sdk=repo.sdk, subdomain=repo.repo_id.replace("/", "-"), runtime=_space_runtime(repo))
    return handler._send_json(200, payload)


def _space_runtime(repo: Repo) -> dict:
    return {"stage": "NO_APP_FILE", "hardware": {"current": None, "requested": repo.hardware}}


def _lfs_info(content: bytes) -> dict:
    return {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": len(lfs_pointer(content))}


def _entry(repo: Repo, commit: Commit, path: str, expand: bool) -> dict:
    """One tree / paths-info item: a file or a folder."""
    if path in commit.files:
        item = {"type": "file", "path": path, "size": len(commit.files[path]), "oid": commit.oid_of(path)}
        if path in commit.lfs:
            item["lfs"] = _lfs_info(commit.files[path])
    else:
        children = sorted((p, commit.oid_of(p)) for p in commit.files if p.startswith(path + "/"))
        item = {"type": "directory", "path": path, "oid": hashlib.sha1(json.dumps(children).encode()).hexdigest()}
    if expand:
        last = _last_commit_touching(repo, commit, path)
        item["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
    return item


def _tree(handler, repo: Repo, commit: Commit, subpath: str, query) -> int:
    recursive = query.get("recursive", ["false"])[0].lower() == "true"
    expand = query.get("expand", ["false"])[0].lower() == "true"
    subpath = subpath.strip("/")
    folders = _folder_paths(commit.files)
    if subpath and subpath not in folders:
        raise HubError(404, f"{subpath} does not exist on {commit.oid}", "EntryNotFound")
    prefix = f"{subpath}/" if subpath else ""
    paths = sorted(p for p in set(commit.files) | folders if p.startswith(prefix))
    if not recursive:
        paths = [p for p in paths if "/" not in p[len(prefix):]]
    # Folders before files at each level, as the Hub lists them; one page, so no Link header.
    paths.sort(key=lambda p: (p not in folders, p))
    return handler._send_json(200, [_entry(repo, commit, p, expand) for p in paths])


def _paths_info(handler, repo: Repo, commit: Commit, body: bytes) -> int:
    form = parse_qs(body.decode())
    expand = form.get("expand", ["false"])[0].lower() == "true"
    known = set(commit.files) | _folder_paths(commit.files)
    paths = [p.strip("/") for p in form.get("paths", [])]
    return handler._send_json(200, [_entry(repo, commit, p, expand) for p in paths if p in known])


def _preupload(handler, hub, repo: Repo, revision: str, payload) -> int:
    hub._require_write(handler.authorized, repo.repo_id.split("/")[0])
    head = repo.resolve(revision) if revision in repo.branches else None
    patterns = _lfs_patterns(head.files) if head else list(_LFS_PATTERNS)
    files = []
    for item in payload.get("files", []):
        path = item["path"]
        # Binary formats named in .gitattributes go to LFS (never Xet: the clients run with Xet disabled).
        mode = "lfs" if _tracked_by_lfs(path, patterns) else "regular"
        # The oid lets the client skip unchanged files; it compares sha256 for LFS and git sha1 otherwise.
        oid = None
        if head is not None and path in head.files:
            oid = hashlib.sha256(head.files[path]).hexdigest() if mode == "lfs" else git_blob_sha1(head.files[path])
        files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
    return handler._send_json(200, {"files": files, "commitOid": head.oid if head else None})


def _commit(handler, hub, repo: Repo, branch: str, query, body: bytes) -> int:
    hub._require_write(handler.authorized, repo.repo_id.split("/")[0])
    if query.get("create_pr", ["0"])[0] == "1":
        raise HubError(501, "The fake Hub does not implement pull requests")
    if branch not in repo.branches:
        raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    header = next((line["value"] for line in lines if line["key"] == "header"), None)
    if header is None or not header.get("summary"):
        raise HubError(400, "A commit needs a header line with a summary")
    head = repo.branches[branch]
    if header.get("parentCommit") and header["parentCommit"] != head:
        raise HubError(412, "A commit has happened since. Please refresh and try again.")
    files, lfs = dict(repo.commits[head].files), set(repo.commits[head].lfs)
    for line in lines:
        _apply_operation(hub, files, lfs, line["key"], line["value"])
    commit = repo.add_commit(branch, header["summary"], header.get("description", ""), files, lfs & set(files))
    url = f"{hub._repo_url(handler.base_url, repo)}/commit/{commit.oid}"
    return handler._send_json(200, {"success": True, "commitOid": commit.oid, "commitUrl": url,
                                    "pullRequestUrl": None})


def _apply_operation(hub: FakeHub, files: dict, lfs: set, key: str, value: dict) -> None:
    if key == "header":
        return
    if key == "file":
        if value.get("encoding", "base64") != "base64":
            raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
        files[value["path"]] = base64.b64decode(value["content"])
        lfs.discard(value["path"])
    elif key == "lfsFile":
        content = hub.lfs_objects.get(value["oid"])
        if content is None:
            raise HubError(400, f"Your push was rejected: LFS object {value['oid']} was never uploaded")
        files[value["path"]] = content
        lfs.add(value["path"])
    elif key == "deletedFile":
        if files.pop(value["path"], None) is None:
            raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
    elif key == "deletedFolder":
        prefix = value["path"].rstrip("/") + "/"
        for path in [p for p in files if p.startswith(prefix)]:
            del files[path]
    else:
        raise HubError(400, f"Unknown commit operation {key!r}")


def _list_commits(handler, repo: Repo, commit: Commit) -> int:
    items = [
        {"id": c.oid, "title": c.title, "message": c.message, "date": c.date,
         "authors": [{"user": repo.repo_id.split("/")[0]}]}
        for c in repo.history(commit)
    ]
    return handler._send_json(200, items)


def _refs(handler, repo: Repo) -> int:
    def ref(kind: str, name: str, oid: str) -> dict:
        return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}

    return handler._send_json(200, {
        "branches": [ref("heads", name, oid) for name, oid in sorted(repo.branches.items())],
        "tags": [ref("tags", name, oid) for name, oid in sorted(repo.tags.items())],
        "converts": [],
        "pullRequests": [],
    })


def _branch(handler, hub, repo: Repo, branch: str, body: bytes) -> int:
    hub._require_write(handler.authorized, repo.repo_id.split("/")[0])
    if handler.command == "DELETE":
        if branch == "main" or repo.branches.pop(branch, None) is None:
            raise HubError(400 if branch == "main" else 404, f"Cannot delete branch {branch}")
        return handler._send_json(200, {})
    if branch in repo.branches:
        raise HubError(409, f"Branch {branch} already exists")
    start = (json.loads(body) if body else {}).get("startingPoint") or "main"
    repo.branches[branch] = repo.resolve(start).oid
    return handler._send_json(200, {})


def _resolve(handler, hub, repo_type, repo_id, revision, path) -> int:
    with hub._lock:
        repo = hub._get_repo(repo_type, repo_id, handler.authorized)
        commit = repo.resolve(revision)
    content = commit.files.get(path)
    commit_header = {"X-Repo-Commit": commit.oid}
    if content is None:
        raise HubError(404, "Entry not found", "EntryNotFound", commit_header)
    headers = {**commit_header, "ETag": f'"{commit.etag_of(path)}"', "Accept-Ranges": "bytes",
               "Content-Type": "application/octet-stream"}
    if path in commit.lfs:
        # The Hub names an LFS file's sha256 and size in these headers (on its CDN redirect); we serve in place.
        headers.update({"X-Linked-Etag": f'"{commit.etag_of(path)}"', "X-Linked-Size": str(len(content))})
    byte_range = _parse_range(handler.headers.get("Range"), len(content))
    if byte_range is None:
        handler._send(200, content, headers)
        return 200
    start, end = byte_range
    if start >= len(content):
        handler._send(416, b"", {**headers, "Content-Range": f"bytes */{len(content)}"})
        return 416
    headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
    handler._send(206, content[start:end + 1], headers)
    return 206


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """`bytes=a-b`, `bytes=a-` or `bytes=-n` as an inclusive (start, end); None means the whole file."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":
        return max(size - int(last), 0), size - 1
    return int(first), min(int(last), size - 1) if last else size - 1


def _lfs_batch(handler, hub, repo_type, repo_id, payload) -> int:
    """Git-LFS batch API, "basic" transfer: one PUT per missing object, then a verify call."""
    with hub._lock:
        hub._get_repo(repo_type, repo_id, handler.authorized)
        hub._require_write(handler.authorized, repo_id.split("/")[0])
        objects = []
        for item in payload.get("objects", []):
            answer = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in hub.lfs_objects:  # already stored objects need no upload, as on the Hub
                href = f"{handler.base_url}/fake-lfs/{item['oid']}"
                answer["actions"] = {"upload": {"href": href}, "verify": {"href": f"{href}/verify"}}
            objects.append(answer)
    return handler._send_json(200, {"transfer": "basic", "objects": objects},
                              {"Content-Type": "application/vnd.git-lfs+json"})


def _lfs_object(handler, hub, oid: str, verify: bool, body: bytes) -> int | None:
    """The storage behind the batch API's hrefs: PUT stores an object whose sha256 must match its name."""
    if handler.command == "PUT" and not verify:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "Uploaded content does not match its sha256")
        with hub._lock:
            hub.lfs_objects[oid] = body
        return handler._send_json(200, {})
    if handler.command == "POST" and verify:
        with hub._lock:
            stored = hub.lfs_objects.get(oid)
        if stored is None or len(stored) != json.loads(body).get("size"):
            raise HubError(404, f"LFS object {oid} is missing or incomplete")
        return handler._send_json(200, {})
    return None


# ------------------------------------------------------------------------------ pointing the clients at it


class _AttributePatcher:
    """Sets module attributes and restores them in reverse order (pytest's monkeypatch, without pytest)."""

    def __init__(self):
        self._undo: list[tuple[object, str, object]] = []

    def set(self, target, name: str, value) -> None:
        self._undo.append((target, name, getattr(target, name)))
        setattr(target, name, value)

    def set_env(self, name: str, value: str | None) -> None:
        self._undo.append((os.environ, name, os.environ.get(name)))
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    def undo(self) -> None:
        for target, name, old in reversed(self._undo):
            if target is os.environ:
                if old is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = old
            else:
                setattr(target, name, old)
        self._undo.clear()


def _loopback_only_client() -> "httpx2.Client":
    """huggingface_hub's default shared client, plus a hook that refuses any non-loopback host before connecting."""
    import httpx2
    from huggingface_hub.utils._http import hf_request_event_hook

    def refuse_non_loopback(request: httpx2.Request) -> None:
        if request.url.host not in LOOPBACK_HOSTS:
            raise httpx2.ConnectError(f"fake hub: refusing to contact non-loopback host {request.url.host!r}",
                                      request=request)

    # trust_env=False: a proxy from the environment would carry even loopback traffic off the machine.
    return httpx2.Client(event_hooks={"request": [refuse_non_loopback, hf_request_event_hook]},
                         follow_redirects=True, timeout=None, trust_env=False)


def _point_huggingface_hub_at(patcher: _AttributePatcher, hub: FakeHub, cache_root: Path) -> None:
    """Every huggingface_hub setting read from the environment at import time and derived from the endpoint."""
    import huggingface_hub
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    patcher.set(constants, "ENDPOINT", hub.url)
    patcher.set(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    patcher.set(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {urlsplit(hub.url).hostname})
    patcher.set(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(hub.url)})
    # `huggingface_hub.model_info` & co. are bound methods of an HfApi created at import: its endpoint is frozen.
    patcher.set(hf_api.api, "endpoint", hub.url)
    patcher.set(constants, "HF_HUB_DISABLE_XET", True)
    patcher.set(constants, "HF_HUB_OFFLINE", False)
    # Telemetry off also stops the user-agent code from fetching the agent registry from the endpoint.
    patcher.set(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    patcher.set(constants, "HF_HOME", str(cache_root / "hf_home"))
    patcher.set(constants, "HF_HUB_CACHE", str(cache_root / "hub"))
    patcher.set(constants, "HF_ASSETS_CACHE", str(cache_root / "assets"))
    patcher.set(constants, "HF_XET_CACHE", str(cache_root / "xet"))
    patcher.set(constants, "HF_TOKEN_PATH", str(cache_root / "hf_home" / "token"))
    patcher.set(constants, "HF_STORED_TOKENS_PATH", str(cache_root / "hf_home" / "stored_tokens"))
    patcher.set(constants, "AGENT_HARNESSES_PATH", str(cache_root / "hf_home" / "agent_harnesses.json"))
    patcher.set_env("HF_TOKEN", hub.token)
    patcher.set_env("HUGGING_FACE_HUB_TOKEN", None)
    patcher.set_env("HF_OIDC_RESOURCE", None)  # an OIDC exchange would call the endpoint for a token
    patcher.set_env("HF_ENDPOINT", hub.url)  # for code that reads the variable itself
    patcher.set_env("HF_HUB_DISABLE_XET", "1")
    patcher.set(_http, "_GLOBAL_CLIENT_FACTORY", _loopback_only_client)
    _http.close_session()  # the next call builds a client from the guarded factory
    huggingface_hub.HfFileSystem.clear_instance_cache()


def _point_datasets_at(patcher: _AttributePatcher, hub: FakeHub, cache_root: Path) -> None:
    import datasets.config as config

    patcher.set(config, "HF_ENDPOINT", hub.url)
    patcher.set(config, "HUB_DATASETS_URL", hub.url + "/datasets/{repo_id}/resolve/{revision}/{path}")
    patcher.set(config, "HF_HUB_OFFLINE", False)
    patcher.set(config, "HF_DATASETS_OFFLINE", False)
    # The download counter pings S3 and the parquet-export lookup a `datasets-server.` host: neither is ours.
    patcher.set(config, "HF_UPDATE_DOWNLOAD_COUNTS", False)
    patcher.set(config, "USE_PARQUET_EXPORT", False)
    patcher.set(config, "HF_DATASETS_CACHE", cache_root / "datasets")
    patcher.set(config, "DOWNLOADED_DATASETS_PATH", cache_root / "datasets" / "downloads")
    patcher.set(config, "EXTRACTED_DATASETS_PATH", cache_root / "datasets" / "downloads" / "extracted")
    patcher.set(config, "HF_MODULES_CACHE", cache_root / "modules")


@contextlib.contextmanager
def running_fake_hub(cache_root: str | Path | None = None, **hub_kwargs) -> Iterator[FakeHub]:
    """Start a fake Hub, point huggingface_hub / datasets / timm at it, and undo everything on exit."""
    hub = FakeHub(**hub_kwargs).start()
    patcher = _AttributePatcher()
    with contextlib.ExitStack() as stack:
        if cache_root is None:
            cache_root = stack.enter_context(tempfile.TemporaryDirectory(prefix="fake-hub-"))
        cache_root = Path(cache_root)
        stack.callback(hub.stop)
        stack.callback(patcher.undo)
        stack.callback(_forget_clients)
        _point_huggingface_hub_at(patcher, hub, cache_root)
        _point_datasets_at(patcher, hub, cache_root)
        yield hub


def _forget_clients() -> None:
    """Drop pooled connections and cached filesystems that still point at the stopped Hub."""
    import huggingface_hub
    from huggingface_hub.utils import _http

    _http.close_session()
    huggingface_hub.HfFileSystem.clear_instance_cache()


@pytest.fixture
def fake_hub(tmp_path) -> Iterator[FakeHub]:
    """A running fake Hub that huggingface_hub, datasets and timm talk to for the duration of one test."""
    with running_fake_hub(tmp_path / "fake_hub_cache") as hub:
        yield hub
