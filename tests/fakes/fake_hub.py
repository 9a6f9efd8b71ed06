"""A small Hugging Face hub for tests (stdlib only): the endpoints `snapshot_download` uses, on 127.0.0.1.

  GET  /api/models/{org}/{name}/revision/{rev}        repo info: sha + siblings
  GET  /api/models/{org}/{name}/tree/{rev}[/path]      file listing (recursive), with LFS sha256/size for weights
  HEAD /{org}/{name}/resolve/{rev}/{file}              X-Repo-Commit, ETag / X-Linked-Etag, Content-Length
  GET  /{org}/{name}/resolve/{rev}/{file}              the bytes; honours `Range: bytes=N-` (resume)

Knobs per hub: `private` (repo ids that answer 401 without `Authorization: Bearer <token>`), `gated` (403 with the
gated error code), `cut_after` (file name -> byte count: the first GET of that file sends the full
Content-Length, then only that many bytes and closes the connection, like a dropped download), and `fail_get` (file
name -> HTTP status every GET of that file answers).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = ""

    def __post_init__(self) -> None:
        if not self.commit:
            h = hashlib.sha1()
            for name in sorted(self.files):
                h.update(name.encode() + hashlib.sha256(self.files[name]).digest())
            self.commit = h.hexdigest()

    def etag(self, name: str) -> str:
        data = self.files[name]
        if name.endswith(LFS_SUFFIXES):
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    private: dict[str, str] = field(default_factory=dict)  # repo id -> token that opens it
    gated: set[str] = field(default_factory=set)
    cut_after: dict[str, int] = field(default_factory=dict)
    fail_get: dict[str, int] = field(default_factory=dict)  # file name -> status code every GET of it answers
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self, port: int | None = None) -> FakeHub:
        """Listen on `port`, or on a port reserved for the test (tests/support/ports.py)."""
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

            def do_GET(self) -> None:
                hub._handle(self, head=False)

        if port is None:
            from tests.support.ports import free_port

            port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    # ------------------------------------------------------------------------------------------------ handling
    def _send(self, h: BaseHTTPRequestHandler, code: int, body: bytes = b"", headers: dict[str, str] | None = None,
              head: bool = False) -> None:
        h.send_response(code)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def _error(self, h: BaseHTTPRequestHandler, code: int, message: str, head: bool,
               error_code: str | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if error_code:
            headers["X-Error-Code"] = error_code
        self._send(h, code, json.dumps({"error": message}).encode(), headers, head)

    def _auth(self, h: BaseHTTPRequestHandler, repo_id: str, head: bool) -> bool:
        if repo_id in self.gated:
            self._error(h, 403, f"Access to model {repo_id} is restricted. You must have access to it and be "
                        "authenticated to access it. Please log in.", head, "GatedRepo")
            return False
        token = self.private.get(repo_id)
        if token is not None and h.headers.get("Authorization") != f"Bearer {token}":
            self._error(h, 401, "Invalid credentials in Authorization header", head, "RepoNotFound")
            return False
        return True

    @staticmethod
    def _sibling(repo: Repo, name: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"rfilename": name, "size": len(repo.files[name]),
                                 "blobId": hashlib.sha1(repo.files[name]).hexdigest()}
        if name.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"sha256": repo.etag(name), "size": len(repo.files[name]), "pointerSize": 134}
        return entry

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = h.path.split("?", 1)[0]
        self.requests.append(("HEAD" if head else "GET", h.path, dict(h.headers)))
        m = re.match(r"^/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?$", path)
        if m:
            repo_id, kind, _rev = m.group(1), m.group(2), m.group(3)
            if repo_id not in self.repos and repo_id not in self.private and repo_id not in self.gated:
                return self._error(h, 404, "Repository not found", head, "RepoNotFound")
            if not self._auth(h, repo_id, head):
                return None
            repo = self.repos[repo_id]
            if kind == "revision":
                body = {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": repo_id in self.private,
                        "siblings": [self._sibling(repo, n) for n in sorted(repo.files)]}
            else:
                body = []
                for n in sorted(repo.files):
                    entry: dict[str, Any] = {"type": "file", "path": n, "size": len(repo.files[n]),
                                             "oid": hashlib.sha1(repo.files[n]).hexdigest()}
                    if n.endswith(LFS_SUFFIXES):
                        entry["lfs"] = {"oid": repo.etag(n), "size": len(repo.files[n]), "pointerSize": 134}
                    body.append(entry)
            return self._send(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if not m:
            return self._error(h, 404, "not found", head)
        repo_id, _rev, fname = m.group(1), m.group(2), m.group(3)
        if repo_id not in self.repos and repo_id not in self.private and repo_id not in self.gated:
            return self._error(h, 404, "Repository not found", head, "RepoNotFound")
        if not self._auth(h, repo_id, head):
            return None
        repo = self.repos[repo_id]
        if fname not in repo.files:
            return self._error(h, 404, "Entry not found", head, "EntryNotFound")
        if not head and fname in self.fail_get:
            return self._error(h, self.fail_get[fname], "Forbidden by the test", head)
        data = repo.files[fname]
        etag = repo.etag(fname)
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if fname.endswith(LFS_SUFFIXES):
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(data))
        start = 0
        rng = re.match(r"bytes=(\d+)-", h.headers.get("Range", ""))
        if rng and not head:
            start = int(rng.group(1))
        body = data[start:]
        headers["Content-Length"] = str(len(body))
        code = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        cut = self.cut_after.pop(fname, None) if not head else None
        if cut is not None:
            h.send_response(code)
            for k, v in headers.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(body[:cut])
            h.wfile.flush()
            h.close_connection = True
            return None
        return self._send(h, code, body, headers, head)

