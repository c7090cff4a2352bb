"""A small local HTTP server that speaks the part of the Hugging Face hub's API that downloads use.

`HF_ENDPOINT=http://127.0.0.1:PORT` points huggingface-hub at it, so `edgellm pull` runs the real
huggingface-hub code (HEAD for metadata, GET for the file, the tree API for listings) offline.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Hub:
    def __init__(self, repos: dict[str, dict[str, Path]], block_delay_s: float = 0.0) -> None:
        self.repos = repos  # repo id -> {file name in repo: local file}
        self.block_delay_s = block_delay_s  # a pause after each MiB of a file: a slow link, to kill a pull mid-way
        self.requests: list[str] = []
        self._etags: dict[Path, str] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def etag(self, path: Path) -> str:
        if path not in self._etags:
            self._etags[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        return self._etags[path]

    def __enter__(self) -> Hub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _error(self, status: int, code: str) -> None:
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Type", "application/json")
                body = json.dumps({"error": code}).encode()
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _route(self, head: bool) -> None:
                ranged = f" Range:{self.headers['Range']}" if self.headers.get("Range") else ""
                hub.requests.append(f"{self.command} {self.path}{ranged}")
                path = self.path.split("?", 1)[0]
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path):
                    return self._tree(m[1], m[2])
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path):
                    return self._info(m[1], m[2])
                if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    return self._file(m[1], m[2], m[3], head)
                self._error(404, "RepoNotFound")

            def _repo(self, repo: str, revision: str) -> dict[str, Path] | None:
                if repo not in hub.repos:
                    self._error(404, "RepoNotFound")
                    return None
                if revision not in ("main", COMMIT):
                    self._error(404, "RevisionNotFound")
                    return None
                return hub.repos[repo]

            def _tree(self, repo: str, revision: str) -> None:
                files = self._repo(repo, revision)
                if files is None:
                    return
                body = json.dumps([{"type": "file", "oid": hub.etag(p)[:40], "size": p.stat().st_size,
                                    "path": name} for name, p in files.items()]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _info(self, repo: str, revision: str) -> None:
                files = self._repo(repo, revision)
                if files is None:
                    return
                body = json.dumps({"id": repo, "sha": COMMIT, "private": False,
                                   "siblings": [{"rfilename": name} for name in files]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self, repo: str, revision: str, name: str, head: bool) -> None:
                files = self._repo(repo, revision)
                if files is None:
                    return
                if name not in files:
                    return self._error(404, "EntryNotFound")
                local = files[name]
                size = local.stat().st_size
                start = 0
                if m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")):
                    start = int(m[1])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hub.etag(local)}"')
                self.send_header("Content-Length", str(size - start))
                self.send_header("Accept-Ranges", "bytes")
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                self.end_headers()
                if head:
                    return
                with open(local, "rb") as f:
                    f.seek(start)
                    while block := f.read(1 << 20):
                        self.wfile.write(block)
                        if hub.block_delay_s:
                            time.sleep(hub.block_delay_s)

            def do_HEAD(self) -> None:
                self._route(head=True)

            def do_GET(self) -> None:
                self._route(head=False)

        return Handler
