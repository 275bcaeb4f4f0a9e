"""Test helpers for downloads: a local HTTP server and files in real dataset formats.

`LocalServer` serves byte strings from 127.0.0.1 with the behaviours real
hosts show: Range requests (206), servers that ignore Range, transfers cut
off halfway, transient 503s, 404 and basic auth. `refused_url()` names a port
where nothing listens. `write_medmnist_npz` writes a tiny npz with the keys,
dtypes and shapes of the official MedMNIST files.

Use in a test module: `from fixtures_http import http_server  # noqa: F401`.
"""

from __future__ import annotations

import base64
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest


@dataclass
class Served:
    body: bytes
    ignore_range: bool = False   # answer 200 with the whole body even to a Range request
    cut_first: int = 0           # this many responses stop halfway and drop the connection
    fail_first: int = 0          # this many responses are 503
    status: int | None = None    # always answer this error status
    auth: tuple[str, str] | None = None
    requests: list[dict[str, str]] = field(default_factory=list)  # headers of each request


class LocalServer:
    """A threaded HTTP server on 127.0.0.1 with a table of paths -> `Served`."""

    def __init__(self):
        self.files: dict[str, Served] = {}
        self.log: list[str] = []  # request paths, in order
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.log.append(self.path)
                served = (server.files.get(self.path)
                          or server.files.get(self.path.split("?")[0]))
                if served is None:
                    return self._plain(404, b"not found")
                served.requests.append(dict(self.headers))
                if served.auth and not self._authorised(served.auth):
                    return self._plain(401, b"credentials needed",
                                       {"WWW-Authenticate": 'Basic realm="test"'})
                if served.status:
                    return self._plain(served.status, b"refused")
                if served.fail_first:
                    served.fail_first -= 1
                    return self._plain(503, b"try later")
                body, status, extra = served.body, 200, {}
                wanted = self.headers.get("Range")
                if wanted and not served.ignore_range:
                    start = int(wanted.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        return self._plain(416, b"", {"Content-Range": f"bytes */{len(body)}"})
                    status = 206
                    extra["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
                    body = body[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                if served.cut_first:
                    served.cut_first -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def _authorised(self, auth: tuple[str, str]) -> bool:
                token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
                return self.headers.get("Authorization") == f"Basic {token}"

            def _plain(self, status: int, body: bytes, headers: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep test output quiet
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def serve(self, path: str, body: bytes, **behaviour) -> str:
        """Serve `body` at `path` (with or without a query string); return its URL."""
        self.files[path] = Served(body, **behaviour)
        return self.base_url + path

    def __enter__(self) -> "LocalServer":
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def http_server():
    with LocalServer() as server:
        yield server


def refused_url(path: str = "/file.bin") -> str:
    """A URL on 127.0.0.1 at a port that was free a moment ago: connecting is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


def write_medmnist_npz(path: str | Path, n_classes: int = 2, size: int = 28,
                       channels: int = 1, per_split: dict[str, int] | None = None,
                       seed: int = 0) -> Path:
    """A tiny file in the official MedMNIST layout.

    Keys `{train,val,test}_images` (uint8, `(N, size, size)` or `(N, size, size, 3)`)
    and `{train,val,test}_labels` (uint8, `(N, 1)`), as `np.savez_compressed`
    writes them. Every class appears in every split.
    """
    per_split = per_split or {"train": 8, "val": 4, "test": 4}
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in per_split.items():
        shape = (count, size, size) if channels == 1 else (count, size, size, 3)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % n_classes).astype(np.uint8)[:, None]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path
