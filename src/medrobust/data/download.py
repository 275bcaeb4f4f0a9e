"""Verified, resumable HTTP downloads.

A file is streamed to `<name>.part` beside its final path and renamed into
place only after its checksum matches, so nothing half-downloaded or corrupt
ever sits at the final path. The `.part` file survives failures and later
runs: the next attempt asks the server for the rest with an HTTP Range
request, and starts over when the server ignores Range.

A transfer times out when no byte arrives for `timeout_s` (a stall), or when
its average rate over the last `rate_window_s` falls below `min_rate_bytes_s`
(a trickle, which a read timeout alone never catches). The body is read with
`read1`, which returns whatever has arrived, so the rate is checked as bytes
come in rather than once a large block has filled. Every failure names the URL
(without credentials or query) and the cause in words.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3.exceptions

from medrobust.config import config_from_mapping
from medrobust.data.archives import GB, ArchiveLimits
from medrobust.errors import ConfigError, InputError, MedrobustError, check_choice
from medrobust.logs import get_logger
from medrobust.progress import progress

log = get_logger(__name__)

ALGORITHMS = ("sha256", "md5")
# worth another try: the server or the network may recover
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_BLOCK = 1 << 16  # small enough that a broken transfer loses little of what arrived


class DownloadError(MedrobustError):
    """A download failed for good: HTTP error, unreachable host, retries spent."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ChecksumMismatch(DownloadError, InputError):
    """The bytes arrived but are not the file the config names.

    `url`, `name` (the file name) and `digests` (`sha256` and `md5` of what
    arrived) let a caller say how to pin the file that did arrive.
    """

    def __init__(self, message: str, status: int | None = None, *, url: str | None = None,
                 name: str | None = None, digests: Mapping[str, str] | None = None):
        super().__init__(message, status)
        self.url, self.name, self.digests = url, name, dict(digests or {})


class _Retry(Exception):
    """One attempt failed in a way another attempt may fix."""


@dataclass(frozen=True)
class Checksum:
    algorithm: str  # one of ALGORITHMS
    hexdigest: str

    def __post_init__(self):
        check_choice("checksum algorithm", self.algorithm, ALGORITHMS)
        size = hashlib.new(self.algorithm).digest_size * 2
        digest = self.hexdigest
        if not isinstance(digest, str) or len(digest) != size or not _is_hex(digest):
            raise ConfigError(f"{self.algorithm} checksum must be {size} hex digits, "
                              f"not {digest!r}")
        object.__setattr__(self, "hexdigest", digest.lower())

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any], section: str) -> "Checksum | None":
        """The `sha256:` or `md5:` of a config entry; None when it has neither."""
        given = [name for name in ALGORITHMS if entry.get(name) is not None]
        if len(given) > 1:
            raise ConfigError(f"{section}: give one checksum, not {' and '.join(given)}")
        if not given:
            return None
        try:
            return cls(given[0], entry[given[0]])
        except ConfigError as error:
            raise ConfigError(f"{section}: {error}") from None

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hexdigest}"


@dataclass(frozen=True)
class RetryPolicy:
    """A source's `download:` settings: how hard to try, when to give up, what to unpack.

    `attempts` tries, waiting `backoff_s`, then twice that, ... A transfer is
    timed out after `timeout_s` without a byte, or when it averages less than
    `min_rate_bytes_s` over `rate_window_s`. An archive may unpack to at most
    `max_unpacked_gb`, and to at most `max_compression_ratio` times its size.
    """

    attempts: int = 5
    backoff_s: float = 2.0
    max_backoff_s: float = 60.0
    timeout_s: float = 60.0           # for connecting, and the longest silence while reading
    min_rate_bytes_s: float = 1024.0  # 0: no minimum rate
    rate_window_s: float = 60.0
    max_unpacked_gb: float = ArchiveLimits.max_bytes / GB
    max_compression_ratio: float = ArchiveLimits.max_ratio

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> "RetryPolicy":
        policy = config_from_mapping(cls, mapping or {}, "source.download")
        if not isinstance(policy.attempts, int) or policy.attempts < 1:
            raise ConfigError(f"source.download.attempts must be an integer >= 1, "
                              f"not {policy.attempts!r}")
        for name in ("backoff_s", "max_backoff_s", "timeout_s", "min_rate_bytes_s"):
            value = getattr(policy, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"source.download.{name} must be a number >= 0, not {value!r}")
        for name in ("rate_window_s", "max_unpacked_gb", "max_compression_ratio"):
            value = getattr(policy, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"source.download.{name} must be a number > 0, not {value!r}")
        return policy

    @property
    def archive_limits(self) -> ArchiveLimits:
        return ArchiveLimits(max_bytes=int(self.max_unpacked_gb * GB),
                             max_ratio=float(self.max_compression_ratio))

    def wait_before(self, attempt: int) -> float:
        """Seconds to wait before `attempt` (2, 3, ...): exponential backoff."""
        return min(self.backoff_s * 2 ** (attempt - 2), self.max_backoff_s)


@dataclass(frozen=True)
class Downloaded:
    path: Path
    sha256: str                      # of the file at `path`, for manifests and provenance
    verified: Checksum | None        # the checksum it matched; None if none was given


def download_file(url: str, dest: str | os.PathLike, checksum: Checksum | None, *,
                  auth: tuple[str, str] | None = None, policy: RetryPolicy = RetryPolicy(),
                  session: requests.Session | None = None) -> Downloaded:
    """Fetch `url` to `dest` and return it once verified against `checksum`.

    `checksum=None` accepts whatever complete file the server sends; callers
    allow that only where the user opted in or verify the content themselves.
    A file already at `dest` that matches is kept without a request. `auth`
    (user, password) goes to the server only; it never reaches a log line or
    message.
    """
    dest = Path(dest)
    shown = public_url(url)
    if dest.is_file():
        digests = _digests(dest, checksum)
        if checksum is None or digests[checksum.algorithm] == checksum.hexdigest:
            log.info("%s: already present%s", dest, f", {checksum} verified" if checksum else "")
            return Downloaded(dest, digests["sha256"], checksum)
        log.warning("%s: does not match %s; downloading it again", dest, checksum)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    session = session or requests.Session()
    resumed = _fetch(session, url, partial, auth, policy, dest.name, shown)
    digests = _digests(partial, checksum)
    if resumed and checksum is not None and digests[checksum.algorithm] != checksum.hexdigest:
        # the partial file may be from another version of the file, or another URL with the
        # same name: its bytes then spoil the whole, so fetch it once more from the start
        log.warning("%s: the file resumed from %s does not match %s; downloading it from "
                    "the start", shown, partial, checksum)
        partial.unlink()
        _fetch(session, url, partial, auth, policy, dest.name, shown)
        digests = _digests(partial, checksum)
    if checksum is not None and digests[checksum.algorithm] != checksum.hexdigest:
        if "md5" not in digests:  # for advice on pinning the file that did arrive
            digests["md5"] = _digests(partial, Checksum("md5", "0" * 32))["md5"]
        partial.unlink()
        raise ChecksumMismatch(
            f"{shown}: the downloaded file has {checksum.algorithm} "
            f"{digests[checksum.algorithm]}, not the expected {checksum.hexdigest}; nothing "
            f"was kept at {dest}. Check the URL, and the checksum pinned in the config or "
            f"published with the dataset.", url=shown, name=dest.name, digests=digests)
    os.replace(partial, dest)
    log.info("%s: downloaded%s", dest, f", {checksum} verified" if checksum else
             f" without a checksum to verify (its sha256 is {digests['sha256']})")
    return Downloaded(dest, digests["sha256"], checksum)


def _fetch(session: requests.Session, url: str, partial: Path, auth: tuple[str, str] | None,
           policy: RetryPolicy, name: str, shown: str) -> bool:
    """`_transfer` with `policy`'s retries; DownloadError when they are spent. Returns
    whether the file still begins with bytes of a `.part` that was there before."""
    kept = _size(partial)  # of those bytes, how many are still at the file's start
    for attempt in range(1, policy.attempts + 1):
        if attempt > 1:
            time.sleep(policy.wait_before(attempt))
        kept = min(kept, _size(partial))  # a failed attempt may have dropped the partial
        try:
            if _transfer(session, url, partial, auth, policy, name):
                kept = 0
            return kept > 0
        except _Retry as reason:
            if attempt == policy.attempts:
                raise DownloadError(f"could not download {shown}: {reason} "
                                    f"(gave up after {policy.attempts} attempt"
                                    f"{'s' if policy.attempts > 1 else ''})") from None
            log.warning("%s: %s (attempt %d of %d); retrying in %.3g s", shown, reason,
                        attempt, policy.attempts, policy.wait_before(attempt + 1))


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _transfer(session: requests.Session, url: str, partial: Path,
              auth: tuple[str, str] | None, policy: RetryPolicy, name: str) -> bool:
    """Bring `partial` up to the whole file, resuming what it holds; raise _Retry. Returns
    whether it started over from byte 0 (the server ignored the resume request)."""
    offset = _size(partial)
    # identity: byte ranges and Content-Length must count the file's own bytes
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    received = 0  # in this attempt
    try:
        with session.get(url, headers=headers, auth=auth, stream=True,
                         timeout=policy.timeout_s) as response:
            total = _start_writing(response, partial, offset)
            if total is None:
                return False  # the partial file was already complete
            restarted = partial.stat().st_size < offset
            offset = partial.stat().st_size
            meter = _RateMeter(policy.min_rate_bytes_s, policy.rate_window_s)
            with open(partial, "ab") as handle, progress(
                    total=total, initial=offset, desc=name, unit="B", unit_scale=True,
                    unit_divisor=1024) as bar:
                for block in _body(response):
                    handle.write(block)
                    received += len(block)
                    bar.update(len(block))
                    meter.add(len(block))
    except (requests.ConnectionError, requests.Timeout) as error:  # connecting, asking
        raise _Retry(_network_reason(error, policy.timeout_s, url)) from None
    except (urllib3.exceptions.HTTPError,
            requests.exceptions.ChunkedEncodingError) as error:  # reading the body
        raise _Retry(_body_reason(error, policy.timeout_s, received)) from None
    except requests.RequestException as error:  # a malformed URL: no retry will help
        raise DownloadError(f"cannot fetch {public_url(url)!r}: {_request_reason(error)}; "
                            f"check the URL") from None
    except OSError as error:  # requests' errors are OSErrors too, hence this order
        raise DownloadError(f"cannot write {partial}: {error.strerror or error}") from None
    size = partial.stat().st_size
    if total and size != total:
        if size > total:
            partial.unlink()
        raise _Retry(f"the transfer stopped after {size} of {total} bytes")
    return restarted


def _body(response: requests.Response) -> Iterator[bytes]:
    """The body as it arrives. `read1` returns what one read brings instead of
    waiting for a whole block, which a trickling server would take hours to fill."""
    read1 = getattr(response.raw, "read1", None)
    if read1 is None:  # urllib3 < 2.1: whole blocks only
        yield from response.iter_content(_BLOCK)
        return
    while block := read1(_BLOCK):
        yield block


class _RateMeter:
    """Raises _Retry once the average rate over the last `window` s is below `minimum`."""

    def __init__(self, minimum: float, window: float):
        self.minimum, self.window = minimum, window
        self.start = time.monotonic()
        self.count = 0
        self.samples: deque[tuple[float, int]] = deque([(self.start, 0)])

    def add(self, size: int) -> None:
        self.count += size
        now = time.monotonic()
        self.samples.append((now, self.count))
        # keep one sample at or before the window's start, to measure from
        while len(self.samples) > 1 and self.samples[1][0] <= now - self.window:
            self.samples.popleft()
        if self.minimum <= 0 or now - self.start < self.window:
            return
        since, count = self.samples[0]
        rate = (self.count - count) / max(now - since, 1e-9)
        if rate < self.minimum:
            raise _Retry(f"timed out after {now - self.start:.3g} s ({rate:.3g} bytes/s over "
                         f"the last {now - since:.3g} s, below the minimum "
                         f"{self.minimum:g} bytes/s)")


def _start_writing(response: requests.Response, partial: Path, offset: int) -> int | None:
    """Check the response and prepare `partial` for appending; return the total size.

    None means nothing is left to fetch; 0 means the size is unknown.
    """
    status = response.status_code
    if status == 416 and offset:
        if _content_range(response.headers.get("Content-Range"))[1] == offset:
            return None
        partial.unlink()
        raise _Retry("the server refused to resume from the partial file; starting over")
    if status in RETRY_STATUSES:
        raise _Retry(f"HTTP {status} {response.reason}")
    if status >= 400:
        raise DownloadError(_http_error(status, response.reason, public_url(response.url)),
                            status=status)
    if status == 206:
        start, total = _content_range(response.headers.get("Content-Range"))
        if start != offset:
            partial.unlink()
            raise _Retry(f"the server resumed at byte {start}, not {offset}; starting over")
        return total or 0
    if offset:
        log.info("%s: the server ignored the resume request; starting over",
                 public_url(response.url))
    partial.write_bytes(b"")
    return int(response.headers.get("Content-Length") or 0)


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of `bytes 10-99/100` or `bytes */100`."""
    if not header or not header.startswith("bytes "):
        return None, None
    span, _, total = header[6:].partition("/")
    first = span.split("-")[0]
    return (int(first) if first.isdigit() else None,
            int(total) if total.isdigit() else None)


def _http_error(status: int, reason: str, url: str) -> str:
    hint = {
        401: "the server wants credentials, or rejected the ones given",
        403: "the server refuses access to it",
        404: "there is no such file on the server; check the URL",
        410: "the server says the file is gone for good; look for a mirror",
    }.get(status, "the server refused the request")
    return f"could not download {url}: HTTP {status} {reason}: {hint}"


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and all it wraps: causes, contexts, urllib3's `reason`, exception args."""
    found: list[BaseException] = []
    todo: list[Any] = [error]
    while todo and len(found) < 32:
        current = todo.pop(0)
        if not isinstance(current, BaseException) or any(current is seen for seen in found):
            continue
        found.append(current)
        todo += [getattr(current, "reason", None), current.__cause__, current.__context__,
                 *getattr(current, "args", ())]
    return found


def _first(causes: list[BaseException], *types: type) -> Any:
    return next((cause for cause in causes if isinstance(cause, types)), None)


def _network_reason(error: BaseException, timeout: float, url: str) -> str:
    """Why connecting or asking failed, in words (no credentials, no query)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    address = f"{host}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
    causes = _causes(error)
    lookup = _first(causes, socket.gaierror)
    if lookup is not None or _first(causes, urllib3.exceptions.NameResolutionError):
        detail = f" ({lookup.strerror})" if lookup is not None and lookup.strerror else ""
        return f"DNS lookup failed: the host name {host} could not be resolved{detail}"
    if _first(causes, ConnectionRefusedError):
        return f"connection refused by {address} (nothing listens at that address and port)"
    if _first(causes, ConnectionResetError):
        return f"{address} reset the connection"
    certificate = _first(causes, ssl.SSLCertVerificationError)
    if certificate is not None:
        return (f"the TLS certificate of {host} could not be verified "
                f"({certificate.verify_message or certificate.reason})")
    tls = _first(causes, ssl.SSLError)
    if tls is not None or _first(causes, requests.exceptions.SSLError):
        detail = f" ({tls.reason or tls.strerror})" if tls is not None else ""
        return f"the TLS (https) handshake with {host} failed{detail}"
    # NewConnectionError (refused, unreachable, DNS) subclasses ConnectTimeoutError in
    # urllib3, hence the causes above first and a socket timeout required here
    if _first(causes, requests.ConnectTimeout) and _first(causes, TimeoutError):
        return f"could not connect to {address} within {timeout:g} s"
    if _first(causes, requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError):
        return f"no data for {timeout:g} s (the server took the request but sent no answer)"
    if _first(causes, requests.exceptions.ProxyError, urllib3.exceptions.ProxyError):
        return "the HTTP proxy refused or failed the connection (see HTTPS_PROXY / HTTP_PROXY)"
    if _first(causes, requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError):
        return f"the connection to {address} broke off"
    system = next((cause for cause in causes if isinstance(cause, OSError)
                   and not isinstance(cause, requests.RequestException) and cause.strerror),
                  None)
    if system is not None:  # e.g. "network is unreachable", "no route to host"
        return f"{system.strerror[:1].lower()}{system.strerror[1:]} ({address})"
    return f"network error ({type(error).__name__}) talking to {address}"


def _body_reason(error: BaseException, timeout: float, received: int) -> str:
    """Why reading the body failed after `received` bytes of this attempt, in words."""
    causes = _causes(error)
    if _first(causes, urllib3.exceptions.ReadTimeoutError, socket.timeout):
        return f"no data for {timeout:g} s (the server went silent after {received} bytes)"
    if _first(causes, urllib3.exceptions.SSLError, ssl.SSLError):
        return f"the TLS (https) connection broke after {received} bytes"
    if _first(causes, urllib3.exceptions.DecodeError):
        return "the server's compressed answer could not be decoded"
    detail = " (reset by the server)" if _first(causes, ConnectionResetError) else ""
    return f"the connection broke off after {received} bytes{detail}"


def _request_reason(error: requests.RequestException) -> str:
    """Why a request could not even be made, in words."""
    if isinstance(error, requests.TooManyRedirects):
        return "the server redirected too many times"
    if isinstance(error, requests.exceptions.MissingSchema):
        return "the URL has no http:// or https://"
    if isinstance(error, requests.exceptions.InvalidSchema):
        return "only http:// and https:// URLs can be downloaded"
    if isinstance(error, (requests.exceptions.InvalidURL, requests.exceptions.URLRequired)):
        return "the URL is malformed"
    return type(error).__name__


def public_url(url: str) -> str:
    """`url` without user info or query, which may hold credentials or signed tokens."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _digests(path: Path, checksum: Checksum | None) -> dict[str, str]:
    """sha256 and the checksum's algorithm in one pass over the file."""
    names = {"sha256"} | ({checksum.algorithm} if checksum else set())
    hashers = {name: hashlib.new(name) for name in names}
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            for hasher in hashers.values():
                hasher.update(block)
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True
