"""Test helpers for downloads: a local HTTP server and files in real dataset formats.

`LocalServer` serves byte strings from 127.0.0.1 with the behaviours real
hosts show: Range requests (206), servers that ignore Range, transfers cut
off halfway, transient 503s, 404 and basic auth; and hostile ones: a server
that trickles the body a byte at a time, one that stalls after some bytes,
one that takes the request and never answers. `refused_url()` names a port
where nothing listens. `write_medmnist_npz` writes a tiny npz with the keys,
dtypes and shapes of the official MedMNIST files.

Hostile archives, as bytes to serve or write: `symlink_chain_zip` /
`symlink_chain_tar` (links that each climb one more level, then a file written
through them) and `zip_bomb` (zeros that deflate about 230:1).

Use in a test module: `from fixtures_http import http_server  # noqa: F401`.
"""

from __future__ import annotations

import base64
import functools
import io
import socket
import stat
import tarfile
import threading
import zipfile
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
    trickle_s: float = 0.0       # send the body one byte at a time, this many seconds apart
    stall_after: int | None = None  # send the headers and this many bytes, then go silent
    silent: bool = False         # take the request and never answer
    requests: list[dict[str, str]] = field(default_factory=list)  # headers of each request


class LocalServer:
    """A threaded HTTP server on 127.0.0.1 with a table of paths -> `Served`."""

    def __init__(self):
        self.files: dict[str, Served] = {}
        self.log: list[str] = []  # request paths, in order
        self.closing = threading.Event()  # wakes stalled handlers when the server stops
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
                if served.silent:
                    server.closing.wait()
                    return
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
                if served.trickle_s or served.stall_after is not None:
                    return self._hostile(served, body)
                if served.cut_first:
                    served.cut_first -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def _hostile(self, served: Served, body: bytes):
                try:
                    if served.stall_after is not None:
                        self.wfile.write(body[:served.stall_after])
                        self.wfile.flush()
                        server.closing.wait()
                        return
                    for index in range(len(body)):
                        if server.closing.wait(served.trickle_s):
                            return
                        self.wfile.write(body[index:index + 1])
                        self.wfile.flush()
                except OSError:  # the client gave up and closed the connection
                    pass
                finally:
                    self.close_connection = True

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
        self.closing.set()
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


# --- hostile archives ---------------------------------------------------------------------

def symlink_chain(levels: int = 4) -> list[tuple[str, str]]:
    """(name, link target) of links that climb `levels` folders above the target folder,
    each of which looks harmless on its own: `c/up0 -> ..` lands at the top,
    `c/up0/up1 -> ..` therefore one level above it, and so on. A file written at
    `chain_path(levels, then)` lands `levels` folders above the target folder."""
    names = ["c", "up0"]
    links = [("c/up0", "..")]
    for level in range(1, levels + 1):
        names.append(f"up{level}")
        links.append(("/".join(names), ".."))
    return links


def chain_path(levels: int = 4, then: str = "escaped.txt") -> str:
    return "/".join(["c", *(f"up{level}" for level in range(levels + 1)), then])


def symlink_chain_zip(levels: int = 4, then: str = "escaped.txt",
                      data: bytes = b"written through the links\n") -> bytes:
    """A zip whose links (Unix mode S_IFLNK, as `zip --symlinks` stores them) climb
    `levels` folders, then a file written through them."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("readme.txt", "a harmless first member\n")
        for name, target in symlink_chain(levels):
            info = zipfile.ZipInfo(name)
            info.create_system = 3  # Unix, so the mode bits count
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
        zf.writestr(chain_path(levels, then), data)
    return buffer.getvalue()


def symlink_chain_tar(levels: int = 4, then: str = "escaped.txt",
                      data: bytes = b"written through the links\n", mode: str = "w:gz") -> bytes:
    """The same chain as a tar archive (symbolic link members, then a file)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, target in symlink_chain(levels):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
        info = tarfile.TarInfo(chain_path(levels, then))
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@functools.lru_cache(maxsize=4)
def zip_bomb(unpacked_mib: int = 100) -> bytes:
    """A zip of one member, `unpacked_mib` MiB of zeros, deflated at level 1: about
    230:1 (100 MiB in 458 kB); built once per size."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("labels.csv", "file,label\n")
        zf.writestr("zeros.bin", bytes(unpacked_mib << 20))
    return buffer.getvalue()
