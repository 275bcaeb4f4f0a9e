"""Verified, resumable HTTP downloads.

A file is streamed to `<name>.part` beside its final path and renamed into
place only after its checksum matches, so nothing half-downloaded or corrupt
ever sits at the final path. The `.part` file survives failures and later
runs: the next attempt asks the server for the rest with an HTTP Range
request, and starts over when the server ignores Range.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

import requests
from tqdm import tqdm

from medrobust.config import config_from_mapping
from medrobust.errors import ConfigError, InputError, MedrobustError
from medrobust.logs import get_logger

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
    """The bytes arrived but are not the file the config names."""


class _Retry(Exception):
    """One attempt failed in a way another attempt may fix."""


@dataclass(frozen=True)
class Checksum:
    algorithm: str  # one of ALGORITHMS
    hexdigest: str

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"checksum algorithm must be one of {', '.join(ALGORITHMS)}, "
                              f"not {self.algorithm!r}")
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
    """How hard to try: `attempts` tries, waiting `backoff_s`, then twice that, ..."""

    attempts: int = 5
    backoff_s: float = 2.0
    max_backoff_s: float = 60.0
    timeout_s: float = 60.0      # for connecting and between two received blocks

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> "RetryPolicy":
        policy = config_from_mapping(cls, mapping or {}, "source.download")
        if not isinstance(policy.attempts, int) or policy.attempts < 1:
            raise ConfigError(f"source.download.attempts must be an integer >= 1, "
                              f"not {policy.attempts!r}")
        for name in ("backoff_s", "max_backoff_s", "timeout_s"):
            value = getattr(policy, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"source.download.{name} must be a number >= 0, not {value!r}")
        return policy

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
    for attempt in range(1, policy.attempts + 1):
        if attempt > 1:
            time.sleep(policy.wait_before(attempt))
        try:
            _transfer(session, url, partial, auth, policy.timeout_s, dest.name)
            break
        except _Retry as reason:
            if attempt == policy.attempts:
                raise DownloadError(f"could not download {shown}: {reason} "
                                    f"(gave up after {policy.attempts} attempts)") from None
            log.warning("%s: %s (attempt %d of %d); retrying in %.3g s", shown, reason,
                        attempt, policy.attempts, policy.wait_before(attempt + 1))
    digests = _digests(partial, checksum)
    if checksum is not None and digests[checksum.algorithm] != checksum.hexdigest:
        partial.unlink()
        raise ChecksumMismatch(
            f"{shown}: the downloaded file has {checksum.algorithm} "
            f"{digests[checksum.algorithm]}, not the expected {checksum.hexdigest}; nothing "
            f"was kept at {dest}. Check the URL, and the checksum pinned in the config or "
            f"published with the dataset.")
    os.replace(partial, dest)
    log.info("%s: downloaded%s", dest, f", {checksum} verified" if checksum else
             f" without a checksum to verify (its sha256 is {digests['sha256']})")
    return Downloaded(dest, digests["sha256"], checksum)


def _transfer(session: requests.Session, url: str, partial: Path,
              auth: tuple[str, str] | None, timeout: float, name: str) -> None:
    """Bring `partial` up to the whole file, resuming what it holds; raise _Retry."""
    offset = partial.stat().st_size if partial.exists() else 0
    # identity: byte ranges and Content-Length must count the file's own bytes
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        with session.get(url, headers=headers, auth=auth, stream=True,
                         timeout=timeout) as response:
            total = _start_writing(response, partial, offset)
            if total is None:
                return  # the partial file was already complete
            offset = partial.stat().st_size
            with open(partial, "ab") as handle, tqdm(
                    total=total, initial=offset, desc=name, unit="B", unit_scale=True,
                    unit_divisor=1024, disable=None, mininterval=1.0) as bar:
                for block in response.iter_content(_BLOCK):
                    handle.write(block)
                    bar.update(len(block))
    except (requests.ConnectionError, requests.Timeout,
            requests.exceptions.ChunkedEncodingError) as error:
        raise _Retry(_network_reason(error, timeout)) from None
    except requests.RequestException as error:  # a malformed URL: no retry will help
        raise DownloadError(f"cannot fetch {public_url(url)!r}: {type(error).__name__}; "
                            f"check the URL") from None
    except OSError as error:  # requests' errors are OSErrors too, hence this order
        raise DownloadError(f"cannot write {partial}: {error.strerror or error}") from None
    size = partial.stat().st_size
    if total and size != total:
        if size > total:
            partial.unlink()
        raise _Retry(f"the transfer stopped after {size} of {total} bytes")


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


def _network_reason(error: Exception, timeout: float) -> str:
    if isinstance(error, requests.Timeout):
        return f"no answer within {timeout:g} s"
    text = str(error)
    if "Connection refused" in text:
        return "connection refused (nothing listens at that address and port)"
    if "Name or service not known" in text or "NameResolutionError" in text \
            or "getaddrinfo failed" in text:
        return "the host name could not be resolved"
    if isinstance(error, requests.exceptions.ChunkedEncodingError):
        return "the connection broke off during the transfer"
    return f"network error ({type(error).__name__})"


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
