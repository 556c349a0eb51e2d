"""A fake Hugging Face Hub for offline tests: the routes the real `huggingface_hub` 2.x client and transformers'
`from_pretrained` call to publish and download a small model repo, served from memory on 127.0.0.1.

Routes (checked against huggingface_hub 2.4: hf_api.py, _commit_api.py, file_download.py):
  GET  /api/whoami-v2                              who the token belongs to (role from `token_role`)
  POST /api/repos/create                           409 when the repo exists (create_repo(exist_ok=True) accepts it)
  GET  /api/models/{repo}[/revision/{rev}]         repo info: id, sha, private, siblings
  POST /api/models/{repo}/preupload/{rev}          every file is uploadMode "regular" (no LFS), with its git oid
  POST /api/models/{repo}/commit/{rev}             NDJSON: header + base64 "file" lines (+ "deletedFile")
  GET  /api/models/{repo}/tree/{rev}[/{path}]      one page, no pagination
  HEAD|GET /{repo}/resolve/{rev}/{path}            ETag (git sha1), X-Repo-Commit, Content-Length
  POST /api/validate-yaml                          the card's YAML header must parse to a mapping

Auth: a request carrying `Authorization: Bearer X` with X != the server's token gets 401, as on the Hub; without
a token, reads of public repos work and everything else gets 401. Creating a repo outside the token owner's
namespace gets 403. Set `fail_commits = True` to answer commits
with HTTP 500 (nothing is stored), `commits` records every commit that was stored.

NOT covered: LFS/Xet uploads and downloads (large files), Range requests, pagination, real token scopes
(fine-grained tokens, orgs), gated repos, branches other than "main", pull requests, datasets and spaces,
rate limits, and the many response fields the client does not need.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, urlsplit

import yaml

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
ROUTES = [  # (method, pattern, handler name); the first match wins
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("GET", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]


def git_oid(content: bytes) -> str:
    """The git blob sha1 the Hub uses as a regular file's ETag and oid."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    private: bool
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit oid -> {path: content}
    main: str = ""

    def resolve(self, rev: str) -> str | None:
        rev = unquote(rev)
        return self.main if rev == "main" else rev if rev in self.snapshots else None


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.commit = status, code, commit


class FakeHub(ThreadingHTTPServer):
    """`with FakeHub(token="hf_x") as hub:` serves on `hub.url` until the block ends."""

    daemon_threads = True

    def __init__(self, token: str, user: str = "user"):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token, self.user = token, user
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.repos: dict[str, Repo] = {}
        self.commits: list[dict] = []  # {"repo", "oid", "summary", "paths"} of each stored commit
        self.requests: list[str] = []  # "METHOD path status", for debugging a failing test
        self.fail_commits = False
        self.token_role = "write"  # what whoami reports; "read" for a read-only token
        self.lock = threading.Lock()

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo.snapshots[repo.resolve(rev)])

    # --- handlers: (request, match) -> (status, JSON body or bytes, extra headers) ---

    def whoami(self, request, match):
        self._authenticate(request)
        access_token = {"displayName": "tests", "role": self.token_role}
        return (
            200,
            {
                "type": "user",
                "name": self.user,
                "fullname": "Test User",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": access_token},
            },
            {},
        )

    def create_repo(self, request, match):
        self._authenticate(request)
        payload = request.json()
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        if repo_id.split("/")[0] != self.user:
            raise HttpError(
                403, f"You don't have the rights to create a model under the namespace {repo_id.split('/')[0]!r}"
            )
        with self.lock:
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, {}
            # huggingface_hub 2.x sends "visibility"; older clients sent "private".
            private = payload.get("visibility", "private" if payload.get("private") else "public") != "public"
            repo = self.repos[repo_id] = Repo(private=private)
            # A new Hub repo starts with one commit holding .gitattributes.
            self._store_commit(
                repo_id,
                repo,
                {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs\n"},
                "initial commit",
                record=False,
            )
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}, {}

    def validate_yaml(self, request, match):
        self._authenticate(request)
        content = request.json()["content"]
        header = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        try:
            metadata = yaml.safe_load(header.group(1)) if header else {}
        except yaml.YAMLError as error:
            return 400, {"errors": [{"message": f"Invalid YAML: {error}"}], "warnings": []}, {}
        if not isinstance(metadata, dict):
            return 400, {"errors": [{"message": "The YAML header must be a mapping"}], "warnings": []}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def preupload(self, request, match):
        repo, oid = self._repo_and_commit(request, match, write=True)
        snapshot = repo.snapshots[oid]
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_oid(snapshot[f["path"]]) if f["path"] in snapshot else None,
            }
            for f in request.json()["files"]
        ]
        return 200, {"files": files, "commitOid": oid}, {}

    def commit(self, request, match):
        repo, parent = self._repo_and_commit(request, match, write=True)
        if self.fail_commits:
            raise HttpError(500, "Internal Error - We're working hard to fix this as soon as possible!")
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        snapshot, summary = dict(repo.snapshots[parent]), ""
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                summary = value["summary"]
            elif key == "file":
                snapshot[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                snapshot.pop(value["path"], None)
            else:
                raise HttpError(400, f"This fake Hub does not support {key!r} (LFS/Xet) commit lines")
        with self.lock:
            oid = self._store_commit(match["repo"], repo, snapshot, summary)
        return (
            200,
            {"commitUrl": f"{self.url}/{match['repo']}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None},
            {},
        )

    def tree(self, request, match):
        repo, oid = self._repo_and_commit(request, match)
        prefix = (unquote(match["path"]).strip("/") + "/") if match["path"] else ""
        recursive = request.query.get("recursive", "").lower() == "true"
        entries, folders = [], set()
        for path, content in sorted(repo.snapshots[oid].items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            entries.append({"type": "file", "oid": git_oid(content), "size": len(content), "path": path})
        if prefix and not entries and not folders:
            raise HttpError(404, f"{prefix} does not exist", "EntryNotFound", oid)
        entries += [
            {"type": "directory", "oid": git_oid(name.encode()), "size": 0, "path": name} for name in sorted(folders)
        ]
        return 200, entries, {}

    def repo_info(self, request, match):
        repo, oid = self._repo_and_commit(request, match)
        siblings = [{"rfilename": path} for path in sorted(repo.snapshots[oid])]
        return (
            200,
            {
                "id": match["repo"],
                "modelId": match["repo"],
                "sha": oid,
                "private": repo.private,
                "siblings": siblings,
                "tags": [],
                "downloads": 0,
                "likes": 0,
            },
            {},
        )

    def resolve(self, request, match):
        repo, oid = self._repo_and_commit(request, match)
        path = unquote(match["path"])
        content = repo.snapshots[oid].get(path)
        if content is None:
            raise HttpError(404, f"Entry not found: {path}", "EntryNotFound", oid)
        headers = {"ETag": f'"{git_oid(content)}"', "X-Repo-Commit": oid, "Content-Type": "application/octet-stream"}
        return 200, content, headers

    # --- helpers ---

    def _authenticate(self, request, required: bool = True) -> None:
        sent = request.headers.get("Authorization")
        if sent is None and not required:
            return
        if sent != f"Bearer {self.token}":
            raise HttpError(401, "Invalid credentials in Authorization header")

    def _repo_and_commit(self, request, match, write: bool = False) -> tuple[Repo, str]:
        repo = self.repos.get(match["repo"])
        self._authenticate(request, required=write or (repo is not None and repo.private))
        if repo is None:
            raise HttpError(404, "Repository not found", "RepoNotFound")
        oid = repo.resolve(match["rev"] or "main")
        if oid is None:
            raise HttpError(404, f"Invalid rev id: {match['rev']}", "RevisionNotFound")
        return repo, oid

    def _store_commit(self, repo_id: str, repo: Repo, snapshot: dict, summary: str, record: bool = True) -> str:
        oid = hashlib.sha1(f"{repo_id} {repo.main} {summary} {time.time_ns()}".encode()).hexdigest()
        repo.snapshots[oid], repo.main = snapshot, oid
        if record:
            self.commits.append({"repo": repo_id, "oid": oid, "summary": summary, "paths": sorted(snapshot)})
        return oid


class _Request:
    def __init__(self, handler: BaseHTTPRequestHandler):
        parts = urlsplit(handler.path)
        self.path, self.headers = parts.path, handler.headers
        self.query = dict(parse_qsl(parts.query))
        length = int(handler.headers.get("Content-Length") or 0)
        self.body = handler.rfile.read(length) if length else b""

    def json(self):
        return json.loads(self.body or b"{}")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every response sets Content-Length

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def log_message(self, format, *args):  # the test output stays quiet; FakeHub.requests keeps the trace
        pass

    def _dispatch(self, method: str) -> None:
        hub: FakeHub = self.server
        request = _Request(self)
        try:
            status, body, headers = self._route(hub, method, request)
        except HttpError as error:
            headers = {"X-Error-Message": str(error)}
            headers.update({"X-Error-Code": error.code} if error.code else {})
            headers.update({"X-Repo-Commit": error.commit} if error.commit else {})
            status, body = error.status, {"error": str(error)}
        hub.requests.append(f"{method} {request.path} {status}")
        self._respond(method, status, body, headers)

    def _route(self, hub: FakeHub, method: str, request: _Request):
        for route_method, pattern, name in ROUTES:
            match = re.fullmatch(pattern, request.path)
            if route_method == method and match:
                return getattr(hub, name)(request, match)
        raise HttpError(404, f"The fake Hub has no route for {method} {request.path}")

    def _respond(self, method: str, status: int, body, headers: dict) -> None:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        headers = {"Content-Type": "application/json", **headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)
