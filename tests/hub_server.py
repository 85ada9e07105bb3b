"""A small imitation of the Hugging Face Hub for tests (stdlib only, 127.0.0.1, random port).

It answers what `huggingface_hub` asks for (see shared/reference/env_recipe.md):

* ``HEAD``/``GET /{owner}/{name}/resolve/{revision}/{path}`` with ``X-Repo-Commit``, ``ETag`` (sha256 of the
  content), ``Content-Length`` and ``Range: bytes=N-`` answered with 206;
* ``GET /api/models/{owner}/{name}[/revision/{revision}]`` (``id``, ``sha``, ``siblings``);
* ``GET /api/models/{owner}/{name}/tree/{revision}[/{path}]`` (files with ``oid``, ``size``, ``path``);
* 404 answers carry ``X-Error-Code`` ``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``;
* private repositories answer 401 unless ``Authorization: Bearer <token>`` matches.

Repositories are kept in memory as commits (dicts of path -> bytes) with branch/tag names.
`HubServer.interrupt(path, times)` makes the next GETs of a file stop halfway, to test interrupted downloads.
Every request is recorded in `HubServer.requests` as (method, path, range header).

    with HubServer() as hub:
        commit = hub.add_commit("owner/model", {"config.json": b"{}"})
        hf_hub_download("owner/model", "config.json", endpoint=hub.url, cache_dir=tmp)
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_COMMIT_RE = re.compile(r"[0-9a-f]{40}")


class _Repo:
    def __init__(self, private_token: str | None = None):
        self.commits: dict[str, dict[str, bytes]] = {}
        self.refs: dict[str, str] = {}
        self.private_token = private_token

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        if _COMMIT_RE.fullmatch(revision) and revision in self.commits:
            return revision
        return None


class HubServer:
    """The Hub imitation; start() runs it in a daemon thread, stop() shuts it down."""

    def __init__(self):
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self._interrupts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._connections: set = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------- content
    def add_commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main",
                   private_token: str | None = None, tags: tuple[str, ...] = ()) -> str:
        """Add a commit holding exactly `files` to `repo_id` (created if needed); point `branch` and `tags` at it."""
        repo = self.repos.setdefault(repo_id, _Repo(private_token))
        if private_token is not None:
            repo.private_token = private_token
        digest = hashlib.sha1(repo_id.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        digest.update(str(len(repo.commits)).encode())
        commit = digest.hexdigest()
        repo.commits[commit] = dict(files)
        for name in (branch, *tags):
            repo.refs[name] = commit
        return commit

    def add_folder(self, repo_id: str, folder, branch: str = "main", **kwargs) -> str:
        """Add a commit holding every file under `folder` (paths relative to it)."""
        from pathlib import Path

        folder = Path(folder)
        files = {f.relative_to(folder).as_posix(): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}
        return self.add_commit(repo_id, files, branch=branch, **kwargs)

    def interrupt(self, path: str, times: int = 1) -> None:
        """Make the next `times` GETs of `path` send half the body and then drop the connection.

        huggingface_hub retries a dropped download 5 times, so times=1 exercises its resume and
        times>=6 makes the download fail.
        """
        self._interrupts[path] = times

    # ----------------------------------------------------------------------------------- serving
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop open keep-alive connections, like a server that went away."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            with self._lock:
                connections, self._connections = list(self._connections), set()
            for sock in connections:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _make_handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def setup(self):
            super().setup()
            with hub._lock:
                hub._connections.add(self.connection)

        def finish(self):
            with hub._lock:
                hub._connections.discard(self.connection)
            super().finish()

        # -------------------------------------------------------------------------- helpers
        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, str(value))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, code: str | None, message: str, head: bool, extra: dict | None = None):
            headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, json.dumps({"error": message}).encode(), headers, head)

        def _repo(self, repo_id: str, head: bool) -> _Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is not None and repo.private_token is not None:
                if self.headers.get("Authorization") != f"Bearer {repo.private_token}":
                    repo = None
            if repo is None:
                status = 401 if repo_id in hub.repos else 404
                self._error(status, "RepoNotFound", "Repository not found", head)
            return repo

        # -------------------------------------------------------------------------- routes
        def do_HEAD(self):
            self._route(head=True)

        def do_GET(self):
            self._route(head=False)

        def _route(self, head: bool):
            parts = urlsplit(self.path)
            path = unquote(parts.path)
            hub.requests.append((self.command, path, self.headers.get("Range")))
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
            if m:
                return self._model_info(m[1], m[2] or "main", head)
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
            if m:
                return self._tree(m[1], m[2], m[3] or "", head)
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/(.+?)/(.+)", path)
            if m:
                return self._resolve(m[1], m[2], m[3], head)
            self._error(404, None, f"no route for {path}", head)

        def _model_info(self, repo_id: str, revision: str, head: bool):
            repo = self._repo(repo_id, head)
            if repo is None:
                return
            commit = repo.resolve(revision)
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
            files = repo.commits[commit]
            body = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": repo.private_token is not None,
                    "siblings": [{"rfilename": name} for name in sorted(files)], "tags": [], "downloads": 0}
            self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)

        def _tree(self, repo_id: str, revision: str, prefix: str, head: bool):
            repo = self._repo(repo_id, head)
            if repo is None:
                return
            commit = repo.resolve(revision)
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
            entries = [
                {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": name}
                for name, data in sorted(repo.commits[commit].items())
                if not prefix or name.startswith(prefix.rstrip("/") + "/")
            ]
            self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, head)

        def _resolve(self, repo_id: str, revision: str, filename: str, head: bool):
            repo = self._repo(repo_id, head)
            if repo is None:
                return
            commit = repo.resolve(revision)
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
            data = repo.commits[commit].get(filename)
            if data is None:
                return self._error(404, "EntryNotFound", f"{filename} does not exist", head,
                                   {"X-Repo-Commit": commit})
            headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            start = 0
            range_header = self.headers.get("Range")
            if range_header and not head:
                m = re.fullmatch(r"bytes=(\d+)-", range_header.strip())
                start = int(m[1]) if m else 0
            status, body = 200, data
            if start > 0:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                status, body = 206, data[start:]
            if not head:
                with hub._lock:
                    cut = hub._interrupts.get(filename, 0) > 0
                    if cut:
                        hub._interrupts[filename] -= 1
                if cut:
                    return self._send_cut(status, body, headers)
            if head:  # HEAD announces the full size
                body = data
            self._send(status, body, headers, head)

        def _send_cut(self, status: int, body: bytes, headers: dict):
            """Promise the whole body, send half of it, then drop the connection."""
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True

    return Handler


if __name__ == "__main__":  # manual use: serve a folder's subfolders owner/name as one-commit repos
    import sys
    import time
    from pathlib import Path

    root = Path(sys.argv[1])
    server = HubServer()
    for repo_dir in sorted(p for p in root.glob("*/*") if p.is_dir()):
        files = {f.relative_to(repo_dir).as_posix(): f.read_bytes() for f in repo_dir.rglob("*") if f.is_file()}
        server.add_commit(f"{repo_dir.parent.name}/{repo_dir.name}", files)
    server.start()
    print(server.url, flush=True)
    while True:
        time.sleep(3600)
