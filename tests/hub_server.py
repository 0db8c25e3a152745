"""A local Hub-API-compatible test server, not the Hub.

It speaks the small part of the Hugging Face Hub HTTP protocol that ``huggingface_hub`` 2.4 (with
``HF_HUB_DISABLE_XET=1``) and ``transformers`` use to push and load a model, so the tests exercise the real client
code over real HTTP on 127.0.0.1 without any network:

- ``POST /api/repos/create``                                     create_repo (409 when it exists)
- ``POST /api/validate-yaml``                                    README.md metadata check before a commit
- ``POST /api/models/{id}/preupload/{rev}``                      per-file upload mode: "regular" or "lfs"
- ``POST /{id}.git/info/lfs/objects/batch``                      LFS batch API (basic transfer) + ``verify``
- ``PUT  /_lfs/{oid}``                                           the LFS object body (sha256 checked)
- ``POST /api/models/{id}/commit/{rev}``                         ndjson commit: file / lfsFile / deletedFile / deletedFolder
- ``GET  /api/models/{id}[/revision/{rev}]``                     model_info / repo_info (sha, private, siblings)
- ``GET  /api/models/{id}/tree/{rev}[/{path}]``                  list_repo_tree (used by snapshot_download)
- ``HEAD|GET /{id}/resolve/{rev}/{path}``                        hf_hub_download: ETag, X-Repo-Commit, Content-Length, Range

Protocol facts were read from the installed huggingface_hub source (``_commit_api.py``, ``lfs.py``,
``file_download.py``, ``hf_api.py``, ``utils/_http.py``): errors are typed by the ``X-Error-Code`` header
(``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``); regular files have a git-blob sha1 ETag, LFS files a
sha256 one. Files live in memory. ``fail_status`` makes every request answer that HTTP status (500, 401...), to test
the failure paths; ``requests`` records ``(method, path)`` of every request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# Files the test server stores as LFS objects, like the Hub's default .gitattributes (binary weights and images);
# anything over 10 MB or with a NUL byte in its first 512 bytes also goes to LFS, as the Hub does.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".png", ".jpg", ".npy", ".gz", ".zip")
LFS_MIN_SIZE = 10 * 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub uses as ETag / oid of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def etag(self) -> str:
        return hashlib.sha256(self.data).hexdigest() if self.lfs else git_blob_sha1(self.data)


@dataclass
class Repo:
    repo_id: str
    private: bool
    # commit sha -> {path: StoredFile}; branches: name -> commit sha
    commits: dict[str, dict[str, StoredFile]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    @property
    def head(self) -> str:
        return self.branches["main"]

    def sha_of(self, rev: str) -> str | None:
        sha = self.branches.get(rev, rev)
        return sha if sha in self.commits else None

    def snapshot(self, rev: str) -> dict[str, StoredFile] | None:
        sha = self.sha_of(rev)
        return None if sha is None else self.commits[sha]


class HubTestServer:
    """Start with ``with HubTestServer() as hub:``; ``hub.url`` is the endpoint to put in ``HF_ENDPOINT``."""

    def __init__(self, token: str = "hf_test_token_0123456789", user: str = "tester"):
        self.token = token
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.fail_status: int | None = None
        self.requests: list[tuple[str, str]] = []
        self.unknown_routes: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._commit_counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubTestServer:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: the OS picks a free port
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-test-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> HubTestServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers for tests ---------------------------------------------------------------------------------------
    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``rev`` as {path: bytes}."""
        snap = self.repos[repo_id].snapshot(rev)
        assert snap is not None, f"no revision {rev!r} in {repo_id}"
        return {p: f.data for p, f in snap.items()}

    def lfs_paths(self, repo_id: str) -> set[str]:
        return {p for p, f in self.repos[repo_id].snapshot("main").items() if f.lfs}

    def _new_commit_sha(self, repo_id: str) -> str:
        self._commit_counter += 1
        return hashlib.sha1(f"{repo_id}:{self._commit_counter}".encode()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hub: HubTestServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the Hub; every response carries Content-Length

    def log_message(self, format, *args):  # keep pytest output quiet
        pass

    # -- plumbing ------------------------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(
        self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, *, head: bool = False
    ):
        self.send_response(status)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        hdrs.setdefault("Content-Length", str(len(body)))
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict[str, str] | None = None, *, head: bool = False):
        self._send(status, json.dumps(obj).encode(), headers, head=head)

    def _error(self, status: int, message: str, code: str | None = None, *, head: bool = False, extra=None):
        headers = {"X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers, head=head)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.hub.token}"

    def _dispatch(self, method: str) -> None:
        body = self._read_body() if method in ("POST", "PUT") else b""
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        hub = self.hub
        with hub.lock:
            hub.requests.append((method, path))
            fail = hub.fail_status
        if fail is not None:
            msg = (
                "Invalid credentials in Authorization header"
                if fail in (401, 403)
                else "Internal Error (injected)"
            )
            return self._error(fail, msg, head=method == "HEAD")
        for pattern, meth, handler in _ROUTES:
            m = re.fullmatch(pattern, path)
            if m and meth == method.replace("HEAD", "GET"):
                return handler(self, m, query, body, method == "HEAD")
        with hub.lock:
            hub.unknown_routes.append((method, path))
        self._error(404, f"test server: no route for {method} {path}", head=method == "HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # -- repo lookup with the Hub's access rules --------------------------------------------------------------
    def _repo(self, repo_id: str, *, write: bool, head: bool = False) -> Repo | None:
        if write and not self._authorized():
            self._error(401, "Invalid credentials in Authorization header", head=head)
            return None
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            # The Hub answers the same for "missing" and "private without access", so nothing leaks.
            self._error(401 if repo else 404, "Repository not found", "RepoNotFound", head=head)
            return None
        return repo

    # -- endpoints -----------------------------------------------------------------------------------------------
    def create_repo(self, m, query, body, head):
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        payload = json.loads(body or b"{}")
        if payload.get("type", "model") != "model":
            return self._error(400, "test server: only model repos")
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": url})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            repo = Repo(repo_id, private)
            sha = self.hub._new_commit_sha(repo_id)
            # A new Hub repo holds one commit with .gitattributes.
            repo.commits[sha] = {
                ".gitattributes": StoredFile(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", False)
            }
            repo.branches["main"] = sha
            self.hub.repos[repo_id] = repo
        self._json(200, {"url": url, "name": repo_id, "id": sha})

    def validate_yaml(self, m, query, body, head):
        self._json(200, {"errors": [], "warnings": []})

    def preupload(self, m, query, body, head):
        repo = self._repo(m["repo"], write=True)
        if repo is None:
            return
        snap = repo.snapshot(m["rev"]) or {}
        files = []
        for f in json.loads(body)["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE or b"\0" in sample
            old = snap.get(f["path"])
            files.append(
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": old.etag if old else None,
                }
            )
        self._json(200, {"files": files, "commitOid": repo.head})

    def lfs_batch(self, m, query, body, head):
        if self._repo(m["repo"], write=True) is None:
            return
        objects = []
        for obj in json.loads(body)["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs_objects:
                item["actions"] = {
                    "upload": {"href": f"{self.hub.url}/_lfs/{obj['oid']}"},
                    "verify": {"href": f"{self.hub.url}/{m['repo']}.git/info/lfs/objects/verify"},
                }
            objects.append(item)
        self._json(
            200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}
        )

    def lfs_put(self, m, query, body, head):
        oid = m["oid"]
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, f"LFS object body does not match its sha256 {oid}")
        with self.hub.lock:
            self.hub.lfs_objects[oid] = body
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def lfs_verify(self, m, query, body, head):
        obj = json.loads(body)
        data = self.hub.lfs_objects.get(obj["oid"])
        if data is None or len(data) != obj["size"]:
            return self._error(404, f"LFS object {obj['oid']} missing or wrong size")
        self._json(200, {"message": "ok"})

    def commit(self, m, query, body, head):
        repo = self._repo(m["repo"], write=True)
        if repo is None:
            return
        with self.hub.lock:
            base = repo.snapshot(m["rev"])
            if base is None:
                return self._error(404, f"Invalid rev id: {m['rev']}", "RevisionNotFound")
            files = dict(base)
            summary = ""
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, val = item["key"], item["value"]
                if key == "header":
                    summary = val["summary"]
                elif key == "file":
                    files[val["path"]] = StoredFile(base64.b64decode(val["content"]), False)
                elif key == "lfsFile":
                    data = self.hub.lfs_objects.get(val["oid"])
                    if data is None:
                        return self._error(422, f"LFS object {val['oid']} was never uploaded")
                    files[val["path"]] = StoredFile(data, True)
                elif key == "deletedFile":
                    if files.pop(val["path"], None) is None:
                        return self._error(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = val["path"].rstrip("/") + "/"
                    files = {p: f for p, f in files.items() if not p.startswith(prefix)}
                else:
                    return self._error(400, f"test server: unknown commit key {key!r}")
            sha = self.hub._new_commit_sha(repo.repo_id)
            repo.commits[sha] = files
            repo.branches[m["rev"] if m["rev"] in repo.branches else "main"] = sha
            repo.messages.append(summary)
        self._json(
            200,
            {"commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{sha}", "commitOid": sha, "success": True},
        )

    def create_branch(self, m, query, body, head):
        repo = self._repo(m["repo"], write=True)
        if repo is None:
            return
        with self.hub.lock:
            branch = m["branch"]
            if branch in repo.branches:
                return self._error(409, f"Reference already exists: refs/heads/{branch}")
            start = (json.loads(body or b"{}").get("startingPoint")) or "main"
            repo.branches[branch] = repo.branches.get(start, start)
        self._json(200, {})

    def model_info(self, m, query, body, head):
        repo = self._repo(m["repo"], write=False)
        if repo is None:
            return
        rev = m["rev"] or "main"
        snap = repo.snapshot(rev)
        if snap is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        sha = repo.sha_of(rev)
        siblings = [{"rfilename": p, "size": len(f.data), "blobId": f.etag} for p, f in sorted(snap.items())]
        info = {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": sha,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "tags": [],
            "siblings": siblings,
            "lastModified": "2026-01-01T00:00:00.000Z",
            "createdAt": "2026-01-01T00:00:00.000Z",
        }
        self._json(200, info)

    def tree(self, m, query, body, head):
        repo = self._repo(m["repo"], write=False)
        if repo is None:
            return
        snap = repo.snapshot(m["rev"])
        if snap is None:
            return self._error(404, f"Invalid rev id: {m['rev']}", "RevisionNotFound")
        prefix = (m["path"] or "").strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
        entries: dict[str, dict] = {}
        for p, f in sorted(snap.items()):
            if prefix and not p.startswith(prefix + "/"):
                continue
            rest = p[len(prefix) + 1 :] if prefix else p
            # Folders on the way down are listed as "directory" entries, as the Hub does.
            segs = rest.split("/")
            for i in range(1, len(segs)):
                d = "/".join(([prefix] if prefix else []) + segs[:i])
                if recursive or i == 1:
                    entries.setdefault(
                        d, {"type": "directory", "path": d, "oid": git_blob_sha1(d.encode()), "size": 0}
                    )
            if not recursive and len(segs) > 1:
                continue
            item = {"type": "file", "path": p, "size": len(f.data), "oid": git_blob_sha1(f.data)}
            if f.lfs:
                item["lfs"] = {"oid": f.etag, "size": len(f.data), "pointerSize": 134}
            entries[p] = item
        self._json(200, list(entries.values()))

    def resolve(self, m, query, body, head):
        repo = self._repo(m["repo"], write=False, head=head)
        if repo is None:
            return
        snap = repo.snapshot(m["rev"])
        if snap is None:
            return self._error(404, f"Invalid rev id: {m['rev']}", "RevisionNotFound", head=head)
        sha = repo.sha_of(m["rev"])
        f = snap.get(m["path"])
        if f is None:
            return self._error(
                404, "Entry not found", "EntryNotFound", head=head, extra={"X-Repo-Commit": sha}
            )
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{f.etag}"',
            "X-Repo-Commit": sha,
            "Accept-Ranges": "bytes",
        }
        data = f.data
        status = 200
        rng = self.headers.get("Range")
        if rng and (rm := re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())):
            start = int(rm[1])
            end = int(rm[2]) if rm[2] else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        headers["Content-Length"] = str(len(data))
        self._send(status, data, headers, head=head)


_REPO = r"(?P<repo>[\w.\-]+/[\w.\-]+)"
_ROUTES = [
    (r"/api/repos/create", "POST", _Handler.create_repo),
    (r"/api/validate-yaml", "POST", _Handler.validate_yaml),
    (rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "POST", _Handler.preupload),
    (rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "POST", _Handler.commit),
    (rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", "POST", _Handler.create_branch),
    (rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "GET", _Handler.tree),
    (rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "GET", _Handler.model_info),
    (rf"/{_REPO}\.git/info/lfs/objects/batch", "POST", _Handler.lfs_batch),
    (rf"/{_REPO}\.git/info/lfs/objects/verify", "POST", _Handler.lfs_verify),
    (r"/_lfs/(?P<oid>[0-9a-f]{64})", "PUT", _Handler.lfs_put),
    (rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "GET", _Handler.resolve),
]
