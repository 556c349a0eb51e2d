"""A fake Hugging Face Hub for offline tests: the routes the real `huggingface_hub` 2.x client and transformers'
`from_pretrained` call to publish and download a small model repo, and the ones `HfFileSystem` (`hf://`) calls to
list, stat and read (in Range requests) the files of a model or dataset repo, served from memory on 127.0.0.1.

Routes (checked against huggingface_hub 2.4: hf_api.py, _commit_api.py, file_download.py, hf_file_system.py);
{kind} is `models` or `datasets`:
  GET  /api/whoami-v2                              who the token belongs to (role from `token_role`)
  POST /api/repos/create                           409 when the repo exists (create_repo(exist_ok=True) accepts it);
                                                   `"type": "dataset"` makes a dataset repo
  GET  /api/{kind}/{repo}[/revision/{rev}]         repo info: id, sha, private, siblings
  POST /api/{kind}/{repo}/preupload/{rev}          every file is uploadMode "regular" (no LFS), with its git oid
  POST /api/{kind}/{repo}/commit/{rev}             NDJSON: header + base64 "file" lines (+ "deletedFile")
  GET  /api/{kind}/{repo}/tree/{rev}[/{path}]      one page, no pagination; `recursive=true` lists the folders too,
                                                   `expand=true` adds each entry's lastCommit; a missing folder 404s
                                                   with EntryNotFound (HfFileSystem then looks for a file)
  POST /api/{kind}/{repo}/paths-info/{rev}         form (or JSON) `paths` (repeated), `expand`: the entries that
                                                   exist, files and folders, as the tree lists them
  HEAD|GET /{repo}/resolve/{rev}/{path}            a model's file; ETag (git sha1), X-Repo-Commit, Content-Length,
  HEAD|GET /datasets/{repo}/resolve/{rev}/{path}   a dataset's; both answer `Range: bytes=a-b` / `a-` / `-n` with
                                                   206 and Content-Range (416 past the end), Accept-Ranges: bytes
  POST /api/validate-yaml                          the card's YAML header must parse to a mapping

A revision is "main" or a commit oid. Auth: a request carrying `Authorization: Bearer X` with X != the server's
token gets 401, as on the Hub; without a token, reads of public repos work and everything else gets 401. Creating a
repo outside the token owner's namespace gets 403. Set `fail_commits = True` to answer commits with HTTP 500 (nothing
is stored), `commits` records every commit that was stored, `downloads` every resolve GET (its range and the body
bytes sent; `sent_bytes()` sums them). `add_repo()` makes a repo holding given files in one commit, without HTTP.

NOT covered: LFS/Xet uploads and downloads (large files), pagination, multi-range requests (`bytes=0-1,5-6`),
real token scopes (fine-grained tokens, orgs), gated repos, branches and tags other than "main", pull requests
(refs/pr/N), spaces and buckets, redirects to a CDN, rate limits, and the many response fields the client does not
need.
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
from urllib.parse import parse_qs, parse_qsl, unquote, urlsplit

import yaml

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
KIND = r"(?P<kind>models|datasets)"  # the API's plural; a model's resolve URL has none
ROUTES = [  # (method, pattern, handler name); the first match wins
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", rf"/api/{KIND}/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/{KIND}/{REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", rf"/api/{KIND}/{REPO}/paths-info/(?P<rev>[^/]+)", "paths_info"),
    ("GET", rf"/api/{KIND}/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("GET", rf"/api/{KIND}/{REPO}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("HEAD", rf"/(?P<kind>datasets)/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("GET", rf"/(?P<kind>datasets)/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]
KINDS = {"model": "models", "dataset": "datasets"}  # repo_type -> the API's plural


def git_oid(content: bytes) -> str:
    """The git blob sha1 the Hub uses as a regular file's ETag and oid."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    private: bool
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit oid -> {path: content}
    main: str = ""
    parents: dict[str, str] = field(default_factory=dict)  # commit oid -> its parent's ("" for the first)
    summaries: dict[str, tuple[str, str]] = field(default_factory=dict)  # commit oid -> (title, ISO date)

    def last_commit(self, oid: str, path: str) -> dict:
        """The Hub's `lastCommit` of `path` (a file or folder) at commit `oid`: the newest commit that changed it."""

        def state(commit: str) -> dict:
            return {name: content for name, content in self.snapshots[commit].items() if is_under(name, path)}

        while self.parents.get(oid) and state(self.parents[oid]) == state(oid):
            oid = self.parents[oid]
        title, date = self.summaries[oid]
        return {"id": oid, "title": title, "date": date}

    def resolve(self, rev: str) -> str | None:
        rev = unquote(rev)
        return self.main if rev == "main" else rev if rev in self.snapshots else None


def is_under(name: str, path: str) -> bool:
    """`name` is the file `path` or a file in the folder `path`."""
    return name == path or name.startswith(path + "/")


def byte_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a `Range: bytes=...` header over `size` bytes; None for a header to ignore (not one
    range of bytes: HTTP then sends the whole file). A range that starts past the end is a 416."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not match or match.groups() == ("", ""):
        return None
    start, end = match.groups()
    if not start:  # the last `end` bytes
        return max(size - int(end), 0), size - 1
    first, last = int(start), min(int(end), size - 1) if end else size - 1
    if end and int(end) < first:
        return None
    if first >= size:
        raise HttpError(416, "Requested Range Not Satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return first, last


class HttpError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        commit: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.commit, self.headers = status, code, commit, headers or {}


class FakeHub(ThreadingHTTPServer):
    """`with FakeHub(token="hf_x") as hub:` serves on `hub.url` until the block ends."""

    daemon_threads = True

    def __init__(self, token: str, user: str = "user"):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token, self.user = token, user
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.repos: dict[str, Repo] = {}  # model repos by id
        self.datasets: dict[str, Repo] = {}  # dataset repos by id
        self.commits: list[dict] = []  # {"repo", "repo_type", "oid", "summary", "paths"} of each stored commit
        self.downloads: list[dict] = []  # {"repo", "repo_type", "path", "range": (first, last) | None, "bytes"}
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

    def files(self, repo_id: str, rev: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        repo = self._repos(KINDS[repo_type])[repo_id]
        return dict(repo.snapshots[repo.resolve(rev)])

    def add_repo(self, repo_id: str, files: dict[str, bytes], repo_type: str = "dataset", private: bool = False) -> str:
        """A new repo holding `files` (and .gitattributes) in one commit, made in memory; its commit oid."""
        with self.lock:
            repos = self._repos(KINDS[repo_type])
            if repo_id in repos:
                raise ValueError(f"{repo_type} repo {repo_id} exists")
            repo = repos[repo_id] = Repo(private=private)
            files = {".gitattributes": b"*.tar filter=lfs diff=lfs merge=lfs\n", **files}
            return self._store_commit(repo_id, repo, files, f"Add {len(files)} files", repo_type=repo_type)

    def sent_bytes(self, path_prefix: str = "") -> int:
        """Body bytes that resolve GETs sent of the files whose paths start with `path_prefix`."""
        with self.lock:
            return sum(entry["bytes"] for entry in self.downloads if entry["path"].startswith(path_prefix))

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
        repo_type = payload.get("type") or "model"
        if repo_type not in KINDS:
            raise HttpError(400, f"This fake Hub has no {repo_type} repos")
        if repo_id.split("/")[0] != self.user:
            raise HttpError(
                403, f"You don't have the rights to create a {repo_type} under the namespace {repo_id.split('/')[0]!r}"
            )
        url = f"{self.url}/{repo_id}" if repo_type == "model" else f"{self.url}/{KINDS[repo_type]}/{repo_id}"
        with self.lock:
            repos = self._repos(KINDS[repo_type])
            if repo_id in repos:
                return 409, {"error": f"You already created this {repo_type} repo", "url": url}, {}
            # huggingface_hub 2.x sends "visibility"; older clients sent "private".
            private = payload.get("visibility", "private" if payload.get("private") else "public") != "public"
            repo = repos[repo_id] = Repo(private=private)
            # A new Hub repo starts with one commit holding .gitattributes.
            self._store_commit(
                repo_id,
                repo,
                {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs\n"},
                "initial commit",
                record=False,
            )
        return 200, {"url": url, "name": repo_id}, {}

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
        repo_type = "dataset" if match["kind"] == "datasets" else "model"
        with self.lock:
            oid = self._store_commit(match["repo"], repo, snapshot, summary, repo_type=repo_type)
        url = f"{self.url}/{'' if repo_type == 'model' else 'datasets/'}{match['repo']}/commit/{oid}"
        return 200, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None}, {}

    def tree(self, request, match):
        repo, oid = self._repo_and_commit(request, match)
        prefix = (unquote(match["path"]).strip("/") + "/") if match["path"] else ""
        recursive = request.query.get("recursive", "").lower() == "true"
        expand = request.query.get("expand", "").lower() == "true"
        entries, folders = [], set()
        for path in sorted(repo.snapshots[oid]):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            if len(parts) > 1 and not recursive:
                folders.add(prefix + parts[0])
                continue
            folders.update(prefix + "/".join(parts[:depth]) for depth in range(1, len(parts)))
            entries.append(self._entry(repo, oid, path, expand))
        if prefix and not entries and not folders:
            raise HttpError(404, f"{prefix} does not exist", "EntryNotFound", oid)
        entries += [self._entry(repo, oid, name, expand) for name in sorted(folders)]
        return 200, entries, {}

    def paths_info(self, request, match):
        repo, oid = self._repo_and_commit(request, match)
        if request.headers.get("Content-Type", "").startswith("application/json"):
            payload = request.json()
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(request.body.decode())
            paths, expand = form.get("paths", []), form.get("expand", [""])[0].lower() == "true"
        snapshot = repo.snapshots[oid]
        found = [path.strip("/") for path in paths if any(is_under(name, path.strip("/")) for name in snapshot)]
        return 200, [self._entry(repo, oid, path, expand) for path in found], {}

    def repo_info(self, request, match):
        repo, oid = self._repo_and_commit(request, match)
        siblings = [{"rfilename": path} for path in sorted(repo.snapshots[oid])]
        info = {
            "id": match["repo"],
            "author": match["repo"].split("/")[0],
            "sha": oid,
            "private": repo.private,
            "siblings": siblings,
            "tags": [],
            "downloads": 0,
            "likes": 0,
        }
        return 200, ({"modelId": match["repo"], **info} if match["kind"] == "models" else info), {}

    def resolve(self, request, match):
        repo, oid = self._repo_and_commit(request, match)
        path = unquote(match["path"])
        content = repo.snapshots[oid].get(path)
        if content is None:
            raise HttpError(404, f"Entry not found: {path}", "EntryNotFound", oid)
        headers = {
            "ETag": f'"{git_oid(content)}"',
            "X-Repo-Commit": oid,
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        ranged = byte_range(request.headers["Range"], len(content)) if request.headers.get("Range") else None
        status, body = 200, content
        if ranged is not None:
            first, last = ranged
            status, body = 206, content[first : last + 1]
            headers["Content-Range"] = f"bytes {first}-{last}/{len(content)}"
        if request.method == "GET":
            with self.lock:
                self.downloads.append(
                    {
                        "repo": match["repo"],
                        "repo_type": "dataset" if match.groupdict().get("kind") == "datasets" else "model",
                        "path": path,
                        "range": ranged,
                        "bytes": len(body),
                    }
                )
        return status, body, headers

    # --- helpers ---

    def _authenticate(self, request, required: bool = True) -> None:
        sent = request.headers.get("Authorization")
        if sent is None and not required:
            return
        if sent != f"Bearer {self.token}":
            raise HttpError(401, "Invalid credentials in Authorization header")

    def _repos(self, kind: str | None) -> dict[str, Repo]:
        return self.datasets if kind == "datasets" else self.repos

    def _entry(self, repo: Repo, oid: str, path: str, expand: bool) -> dict:
        """A tree / paths-info entry: a file, or a folder (any path some file is under)."""
        content = repo.snapshots[oid].get(path)
        if content is None:
            entry = {"type": "directory", "oid": git_oid(path.encode()), "size": 0, "path": path}
        else:
            entry = {"type": "file", "oid": git_oid(content), "size": len(content), "path": path}
        return {**entry, "lastCommit": repo.last_commit(oid, path)} if expand else entry

    def _repo_and_commit(self, request, match, write: bool = False) -> tuple[Repo, str]:
        repo = self._repos(match.groupdict().get("kind")).get(match["repo"])
        self._authenticate(request, required=write or (repo is not None and repo.private))
        if repo is None:
            raise HttpError(404, "Repository not found", "RepoNotFound")
        oid = repo.resolve(match["rev"] or "main")
        if oid is None:
            raise HttpError(404, f"Invalid rev id: {match['rev']}", "RevisionNotFound")
        return repo, oid

    def _store_commit(
        self, repo_id: str, repo: Repo, snapshot: dict, summary: str, record: bool = True, repo_type: str = "model"
    ) -> str:
        oid = hashlib.sha1(f"{repo_type} {repo_id} {repo.main} {summary} {time.time_ns()}".encode()).hexdigest()
        date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        repo.parents[oid], repo.summaries[oid] = repo.main, (summary, date)
        repo.snapshots[oid], repo.main = snapshot, oid
        if record:
            self.commits.append(
                {"repo": repo_id, "repo_type": repo_type, "oid": oid, "summary": summary, "paths": sorted(snapshot)}
            )
        return oid


class _Request:
    def __init__(self, handler: BaseHTTPRequestHandler):
        parts = urlsplit(handler.path)
        self.method, self.path, self.headers = handler.command, parts.path, handler.headers
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
            headers = {"X-Error-Message": str(error), **error.headers}
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
