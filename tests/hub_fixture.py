"""A tiny Hugging Face Hub on 127.0.0.1: enough of its HTTP API for `huggingface_hub.snapshot_download`.

    with FakeHub() as hub:
        shas = hub.add_repo("org/tiny", {"main": {"config.json": b"{}"}})
        snapshot_download("org/tiny", endpoint=hub.endpoint)

Serves what huggingface_hub 2.x requests (see its hf_api.py and file_download.py):
  GET  /api/models/{repo}/revision/{rev}   -> {"id", "sha", "siblings"}        (repo_info)
  GET  /api/models/{repo}/tree/{sha}       -> [{"type", "path", "size", "oid", "lfs"?}]  (list_repo_tree)
  HEAD /{repo}/resolve/{rev}/{path}        -> X-Repo-Commit, ETag, Content-Length  (file metadata)
  GET  /{repo}/resolve/{rev}/{path}        -> the bytes
Errors carry the hub's `X-Error-Code` header (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo), which
huggingface_hub turns into its exception classes. Every request is recorded in `hub.requests`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?P<rest>/.*)?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


@dataclass
class FakeRepo:
    revisions: dict[str, str]  # branch or tag -> commit sha
    commits: dict[str, dict[str, bytes]]  # commit sha -> {path: content}
    token: str | None = None  # when set the repo is gated: requests must send "Bearer <token>"
    broken: bool = False  # when set every request answers 500 (hub down)


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    valid_tokens: set[str] | None = None  # when set, any other "Bearer <token>" gets 401 invalid credentials

    def add_repo(self, repo_id: str, files_by_revision: dict[str, dict[str, bytes]], *, token: str | None = None,
                 broken: bool = False) -> dict[str, str]:
        """Add a repo; returns {revision name: commit sha}."""
        revisions, commits = {}, {}
        for name, files in files_by_revision.items():
            sha = hashlib.sha1(repr((repo_id, name, sorted(files.items()))).encode()).hexdigest()
            revisions[name], commits[sha] = sha, dict(files)
        self.repos[repo_id] = FakeRepo(revisions, commits, token, broken)
        return revisions

    def downloads(self) -> list[str]:
        """Repo paths of the files fetched with GET (not HEAD), in request order."""
        return [unquote(m["path"]) for r in self.requests if r.method == "GET"
                and (m := _RESOLVE.match(urlsplit(r.path).path))]

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub._handle(self, "GET")

            def do_HEAD(self):
                hub._handle(self, "HEAD")

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- request handling ------------------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        auth = h.headers.get("Authorization")
        self.requests.append(Request(method, h.path, auth))
        path = urlsplit(h.path).path
        match = _API.match(path) or _RESOLVE.match(path)
        if match is None:
            return _send(h, 404, {"error": "not found"})
        if self.valid_tokens is not None and auth and auth.removeprefix("Bearer ") not in self.valid_tokens:
            return _send(h, 401, {"error": "Invalid credentials in Authorization header"},
                         error_message="Invalid credentials in Authorization header")
        repo = self.repos.get(match["repo"])
        if repo is None:
            return _send(h, 404, {"error": "Repository not found"}, error_code="RepoNotFound")
        if repo.broken:
            return _send(h, 500, {"error": "Internal Error"})
        if repo.token is not None and auth != f"Bearer {repo.token}":
            return _send(h, 401, {"error": "Access to this model is restricted."}, error_code="GatedRepo",
                         error_message="Access to this model is restricted.")
        rev = unquote(match["rev"])
        sha = repo.revisions.get(rev, rev if rev in repo.commits else None)
        if sha is None:
            return _send(h, 404, {"error": f"Invalid rev id: {rev}"}, error_code="RevisionNotFound")
        files = repo.commits[sha]

        kind = match.groupdict().get("kind")
        if kind == "revision":
            return _send(h, 200, {"id": match["repo"], "sha": sha, "private": False,
                                  "siblings": [{"rfilename": p} for p in sorted(files)]})
        if kind == "tree":  # recursive listing; this fake answers in a single page
            return _send(h, 200, [_tree_entry(p, data) for p, data in sorted(files.items())])

        filename = unquote(match["path"])
        if filename not in files:
            return _send(h, 404, {"error": "Entry not found"}, error_code="EntryNotFound",
                         headers={"X-Repo-Commit": sha})
        data = files[filename]
        etag = _tree_entry(filename, data).get("lfs", {}).get("oid") or _git_blob_sha(data)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
        _send(h, 200, data, headers=headers, body=(method == "GET"))


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _tree_entry(path: str, data: bytes) -> dict:
    entry = {"type": "file", "path": path, "size": len(data), "oid": _git_blob_sha(data)}
    if path.endswith((".safetensors", ".bin")):  # stored with git-lfs on the real hub
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


def _send(h: BaseHTTPRequestHandler, status: int, payload, *, error_code: str | None = None,
          error_message: str | None = None, headers: dict | None = None, body: bool = True) -> None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    h.send_response(status)
    if not isinstance(payload, bytes):
        h.send_header("Content-Type", "application/json")
    if error_code:
        h.send_header("X-Error-Code", error_code)
    if error_message:
        h.send_header("X-Error-Message", error_message)
    for key, value in (headers or {}).items():
        h.send_header(key, value)
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    if body and h.command != "HEAD":
        h.wfile.write(data)
