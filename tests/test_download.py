"""Downloads against a local HTTP server: resume, verify, fail clearly."""

import hashlib
import logging
import re
import socket
import time

import pytest

from fixtures_http import (
    refused_url,
    symlink_chain_tar,
    symlink_chain_zip,
    zip_bomb,
)
from medrobust.data.archives import UnsafeArchiveError
from medrobust.data.download import (
    Checksum,
    ChecksumMismatch,
    DownloadError,
    RetryPolicy,
    download_file,
    public_url,
)
from medrobust.errors import ConfigError, MedrobustError

BODY = bytes(range(256)) * 4096  # 1 MiB, not uniform, so a misplaced byte changes the digest
SHA256 = Checksum("sha256", hashlib.sha256(BODY).hexdigest())
MD5 = Checksum("md5", hashlib.md5(BODY).hexdigest())
FAST = RetryPolicy(attempts=3, backoff_s=0.0, timeout_s=5.0)


def test_plain_download_is_verified_and_renamed(http_server, tmp_path):
    url = http_server.serve("/data.bin", BODY)
    got = download_file(url, tmp_path / "data.bin", SHA256, policy=FAST)
    assert got.path.read_bytes() == BODY
    assert got.sha256 == SHA256.hexdigest and got.verified == SHA256
    assert not (tmp_path / "data.bin.part").exists()


def test_cut_transfer_resumes_with_range_and_ends_verified(http_server, tmp_path):
    url = http_server.serve("/data.bin", BODY, cut_first=1)
    got = download_file(url, tmp_path / "data.bin", MD5, policy=FAST)
    assert got.path.read_bytes() == BODY
    first, second = http_server.files["/data.bin"].requests
    assert "Range" not in first
    resumed_at = int(second["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= len(BODY) // 2  # asked only for the rest


def test_partial_file_from_an_earlier_run_is_resumed(http_server, tmp_path):
    url = http_server.serve("/data.bin", BODY)
    (tmp_path / "data.bin.part").write_bytes(BODY[:1000])
    download_file(url, tmp_path / "data.bin", SHA256, policy=FAST)
    assert http_server.files["/data.bin"].requests[0]["Range"] == "bytes=1000-"
    assert (tmp_path / "data.bin").read_bytes() == BODY


def test_a_stale_partial_file_of_another_version_is_fetched_again_from_the_start(
        http_server, tmp_path):
    """A `.part` left by an older copy of the file (or another URL of the same name): the
    resumed whole fails the checksum, so the file is fetched once more from byte 0."""
    url = http_server.serve("/data.bin", BODY)
    (tmp_path / "data.bin.part").write_bytes(bytes(1000))  # not BODY's first 1,000 bytes
    got = download_file(url, tmp_path / "data.bin", SHA256, policy=FAST)
    assert got.path.read_bytes() == BODY and got.verified == SHA256
    first, second = http_server.files["/data.bin"].requests
    assert first["Range"] == "bytes=1000-" and "Range" not in second
    # a fresh download that fails the checksum is not fetched twice, nor is one whose
    # server ignored the resume request and so sent the whole file from byte 0
    wrong = Checksum("sha256", "0" * 64)
    with pytest.raises(ChecksumMismatch):
        download_file(http_server.serve("/other.bin", BODY), tmp_path / "other.bin", wrong,
                      policy=FAST)
    assert len(http_server.files["/other.bin"].requests) == 1
    (tmp_path / "whole.bin.part").write_bytes(bytes(1000))
    with pytest.raises(ChecksumMismatch):
        download_file(http_server.serve("/whole.bin", BODY, ignore_range=True),
                      tmp_path / "whole.bin", wrong, policy=FAST)
    assert len(http_server.files["/whole.bin"].requests) == 1


def test_server_that_ignores_range_restarts_from_zero(http_server, tmp_path):
    url = http_server.serve("/data.bin", BODY, ignore_range=True, cut_first=1)
    got = download_file(url, tmp_path / "data.bin", SHA256, policy=FAST)
    assert got.path.read_bytes() == BODY  # not the first half twice


def test_complete_partial_file_is_finished_without_refetching(http_server, tmp_path):
    url = http_server.serve("/data.bin", BODY)
    (tmp_path / "data.bin.part").write_bytes(BODY)
    download_file(url, tmp_path / "data.bin", SHA256, policy=FAST)  # server answers 416
    assert (tmp_path / "data.bin").read_bytes() == BODY


def test_transient_errors_are_retried(http_server, tmp_path):
    url = http_server.serve("/data.bin", BODY, fail_first=2)
    download_file(url, tmp_path / "data.bin", SHA256, policy=FAST)
    assert len(http_server.files["/data.bin"].requests) == 3


def test_wrong_checksum_fails_clearly_and_leaves_nothing(http_server, tmp_path):
    url = http_server.serve("/data.bin", BODY)
    wrong = Checksum("sha256", "0" * 64)
    with pytest.raises(ChecksumMismatch) as error:
        download_file(url, tmp_path / "data.bin", wrong, policy=FAST)
    message = str(error.value)
    assert SHA256.hexdigest in message and "0" * 64 in message
    assert "nothing was kept" in message
    assert not (tmp_path / "data.bin").exists()
    assert not (tmp_path / "data.bin.part").exists()  # a corrupt prefix would poison resumes


def test_existing_file_that_matches_is_not_fetched_again(http_server, tmp_path):
    url = http_server.serve("/data.bin", BODY)
    (tmp_path / "data.bin").write_bytes(BODY)
    download_file(url, tmp_path / "data.bin", SHA256, policy=FAST)
    assert http_server.log == []


def test_existing_file_that_differs_is_replaced(http_server, tmp_path):
    url = http_server.serve("/data.bin", BODY)
    (tmp_path / "data.bin").write_bytes(b"stale")
    download_file(url, tmp_path / "data.bin", SHA256, policy=FAST)
    assert (tmp_path / "data.bin").read_bytes() == BODY


def test_404_fails_at_once_with_a_clear_message(http_server, tmp_path):
    url = http_server.base_url + "/missing.bin"
    with pytest.raises(DownloadError) as error:
        download_file(url, tmp_path / "missing.bin", SHA256, policy=FAST)
    assert error.value.status == 404
    assert "HTTP 404" in str(error.value) and "/missing.bin" in str(error.value)
    assert http_server.log == ["/missing.bin"]  # a 404 is final: no retries
    assert not (tmp_path / "missing.bin").exists()


def test_refused_connection_fails_after_the_retries(tmp_path, caplog):
    url = refused_url()
    with caplog.at_level(logging.WARNING), pytest.raises(DownloadError) as error:
        download_file(url, tmp_path / "file.bin", SHA256, policy=FAST)
    message = str(error.value)
    assert "connection refused" in message and "after 3 attempts" in message
    assert isinstance(error.value, MedrobustError)
    assert sum("retrying" in record.message for record in caplog.records) == 2
    assert not (tmp_path / "file.bin").exists()


def test_retries_back_off_exponentially():
    policy = RetryPolicy(backoff_s=1.5, max_backoff_s=10)
    assert [policy.wait_before(n) for n in (2, 3, 4, 5)] == [1.5, 3.0, 6.0, 10]


def test_credentials_reach_the_server_but_no_message(http_server, tmp_path, caplog):
    url = http_server.serve("/private.bin", BODY, auth=("alice", "s3cret-key"))
    with caplog.at_level(logging.DEBUG):
        download_file(url, tmp_path / "ok.bin", SHA256, auth=("alice", "s3cret-key"),
                      policy=FAST)
        with pytest.raises(DownloadError) as error:
            download_file(url, tmp_path / "bad.bin", SHA256, auth=("alice", "wrong-key"),
                          policy=FAST)
    assert error.value.status == 401
    text = str(error.value) + caplog.text
    assert "s3cret-key" not in text and "wrong-key" not in text


def test_public_url_drops_user_info_and_query():
    assert public_url("https://bob:pw@example.org:8443/a/b.zip?token=xyz") \
        == "https://example.org:8443/a/b.zip"


def test_checksum_from_config_entries():
    assert Checksum.from_entry({"md5": "A" * 32}, "files[0]") == Checksum("md5", "a" * 32)
    assert Checksum.from_entry({"url": "x"}, "files[0]") is None
    with pytest.raises(ConfigError, match="files\\[0\\]: give one checksum"):
        Checksum.from_entry({"md5": "a" * 32, "sha256": "b" * 64}, "files[0]")
    with pytest.raises(ConfigError, match="64 hex digits"):
        Checksum.from_entry({"sha256": "abc"}, "files[0]")


def test_retry_policy_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="retries"):
        RetryPolicy.from_mapping({"retries": 3})
    assert RetryPolicy.from_mapping({"attempts": 2}).attempts == 2


def test_download_settings_defaults_and_checks():
    policy = RetryPolicy.from_mapping({})
    assert (policy.timeout_s, policy.min_rate_bytes_s, policy.rate_window_s) == (60, 1024, 60)
    assert policy.archive_limits.max_bytes == 200 * 10 ** 9
    assert policy.archive_limits.max_ratio == 100
    limits = RetryPolicy.from_mapping({"max_unpacked_gb": 1.5,
                                       "max_compression_ratio": 500}).archive_limits
    assert (limits.max_bytes, limits.max_ratio) == (1_500_000_000, 500)
    for key, value in [("rate_window_s", 0), ("max_unpacked_gb", -1),
                       ("max_compression_ratio", "high"), ("min_rate_bytes_s", -5)]:
        with pytest.raises(ConfigError, match=f"source.download.{key} must be a number"):
            RetryPolicy.from_mapping({key: value})


# --- hostile servers: trickle, stall, silence; failures in words ----------------------------

def timed_download(url, tmp_path, policy):
    start = time.monotonic()
    with pytest.raises(DownloadError) as error:
        download_file(url, tmp_path / "data.bin", SHA256, policy=policy)
    return str(error.value), time.monotonic() - start


def test_trickling_server_times_out_on_its_average_rate(http_server, tmp_path):
    # one byte every 0.05 s: never silent for the 2 s read timeout, but ~20 bytes/s
    url = http_server.serve("/slow.bin", BODY[:2000], trickle_s=0.05)
    policy = RetryPolicy(attempts=1, timeout_s=2.0, min_rate_bytes_s=200, rate_window_s=0.6)
    message, took = timed_download(url, tmp_path, policy)
    assert re.match(f"could not download {re.escape(url)}: timed out after [0-9.]+ s "
                    f"\\([0-9.]+ bytes/s", message), message
    assert "bytes/s over the last 0.6" in message
    assert "below the minimum 200 bytes/s" in message
    assert took < 3
    assert not (tmp_path / "data.bin").exists()


def test_trickle_resumes_on_the_next_attempt(http_server, tmp_path):
    url = http_server.serve("/slow.bin", BODY[:3000], trickle_s=0.02)
    policy = RetryPolicy(attempts=2, backoff_s=0, timeout_s=2.0, min_rate_bytes_s=200,
                         rate_window_s=0.3)
    message, _ = timed_download(url, tmp_path, policy)
    assert "gave up after 2 attempts" in message
    first, second = http_server.files["/slow.bin"].requests
    assert "Range" not in first and second["Range"].startswith("bytes=")  # kept what came


def test_rate_check_can_be_switched_off(http_server, tmp_path):
    body = BODY[:40]
    url = http_server.serve("/slow.bin", body, trickle_s=0.02)
    policy = RetryPolicy(attempts=1, timeout_s=2.0, min_rate_bytes_s=0, rate_window_s=0.1)
    got = download_file(url, tmp_path / "slow.bin",
                        Checksum("sha256", hashlib.sha256(body).hexdigest()), policy=policy)
    assert got.path.read_bytes() == body


def test_server_stalling_mid_transfer_times_out(http_server, tmp_path):
    url = http_server.serve("/stall.bin", BODY, stall_after=1000)
    policy = RetryPolicy(attempts=1, timeout_s=0.5)
    message, took = timed_download(url, tmp_path, policy)
    assert message == (f"could not download {url}: no data for 0.5 s (the server went silent "
                       f"after 1000 bytes) (gave up after 1 attempt)")
    assert took < 3
    assert (tmp_path / "data.bin.part").stat().st_size == 1000  # kept, to resume


def test_server_that_never_answers_times_out(http_server, tmp_path):
    url = http_server.serve("/silent.bin", BODY, silent=True)
    message, took = timed_download(url, tmp_path, RetryPolicy(attempts=1, timeout_s=0.5))
    assert message == (f"could not download {url}: no data for 0.5 s (the server took the "
                       f"request but sent no answer) (gave up after 1 attempt)")
    assert took < 3


def test_refused_connection_names_url_and_cause(tmp_path):
    url = refused_url("/x.bin")
    message, _ = timed_download(url, tmp_path, RetryPolicy(attempts=1))
    port = url.split(":")[2].split("/")[0]
    assert message == (f"could not download {url}: connection refused by 127.0.0.1:{port} "
                       f"(nothing listens at that address and port) (gave up after 1 attempt)")


def test_failed_dns_lookup_names_url_and_cause(tmp_path, monkeypatch):
    real = socket.getaddrinfo

    def lookup(host, *args, **kwargs):
        if host == "no-such-host.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    url = "https://no-such-host.invalid/data/x.zip"
    message, _ = timed_download(url + "?token=secret", tmp_path, RetryPolicy(attempts=1))
    assert message == (f"could not download {url}: DNS lookup failed: the host name "
                       f"no-such-host.invalid could not be resolved (Name or service not "
                       f"known) (gave up after 1 attempt)")


def test_checksum_mismatch_carries_what_arrived(http_server, tmp_path):
    url = http_server.serve("/data.bin", BODY)
    with pytest.raises(ChecksumMismatch) as error:
        download_file(url, tmp_path / "data.bin", Checksum("sha256", "0" * 64), policy=FAST)
    assert error.value.digests == {"sha256": SHA256.hexdigest, "md5": MD5.hexdigest}
    assert error.value.name == "data.bin" and error.value.url == url


# --- the `http` source: files by URL, then a labels table inside them ---------------

def zip_bytes(members):
    import io
    import zipfile
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def http_dataset(files, **source):
    return {"kind": "images", "classes": ["benign", "malignant"],
            "source": {"type": "http", "files": files,
                       "labels": {"table": "skin/labels.csv", "path_column": "file",
                                  "label_column": "dx", "path_template": "skin/{}",
                                  "split_column": "split"},
                       "download": {"backoff_s": 0, "attempts": 2}, **source}}


SKIN = zip_bytes({"skin/labels.csv": "file,dx,split\nx.jpg,benign,train\ny.jpg,malignant,test\n",
                  "skin/x.jpg": b"x", "skin/y.jpg": b"y"})


def test_http_source_downloads_unpacks_and_lists(http_server, tmp_path):
    from medrobust.data.manifest import read_manifest
    from medrobust.data.sources import fetch_dataset
    url = http_server.serve("/skin.zip", SKIN, cut_first=1)
    config = http_dataset([{"url": url, "sha256": hashlib.sha256(SKIN).hexdigest(),
                            "extract": True}])
    manifest = read_manifest(fetch_dataset(config, tmp_path / "skin"))
    assert manifest.table[["path", "label", "split"]].values.tolist() == [
        ["skin/x.jpg", "benign", "train"], ["skin/y.jpg", "malignant", "test"]]
    record = (tmp_path / "skin" / "downloads.json").read_text()
    assert hashlib.sha256(SKIN).hexdigest() in record
    # the verified archive stays staged outside the dataset folder, for a rerun to unpack
    assert (tmp_path / ".downloads" / "skin" / "skin.zip").is_file()
    assert not (tmp_path / "skin" / ".downloads").exists()
    before = list(http_server.log)
    fetch_dataset(config, tmp_path / "skin")                              # a second run
    assert http_server.log == before


def test_http_source_requires_a_checksum_per_file(http_server, tmp_path):
    from medrobust.data.sources import fetch_dataset
    config = http_dataset([{"url": http_server.serve("/skin.zip", SKIN), "extract": True}])
    with pytest.raises(ConfigError, match="files\\[0\\].*give its `sha256` or `md5`"):
        fetch_dataset(config, tmp_path / "skin")
    assert http_server.log == []


def test_http_source_rejects_bad_entries(tmp_path):
    from medrobust.data.sources import fetch_dataset
    for entry, fragment in [({"url": "ftp://x/y.zip", "md5": "a" * 32}, "http\\(s\\) URL"),
                            ({"url": "https://x/y.csv", "md5": "a" * 32, "extract": True},
                             "archive name"),
                            ({"url": "https://x/", "md5": "a" * 32}, "give a relative file"),
                            ({"url": "https://x/y.zip", "md5": "a" * 32, "unzip": True},
                             "unknown key\\(s\\) unzip")]:
        with pytest.raises(ConfigError, match=fragment):
            fetch_dataset(http_dataset([entry]), tmp_path / "skin")


def test_malformed_url_fails_without_retrying(tmp_path):
    with pytest.raises(DownloadError, match="only http:// and https:// URLs can be downloaded; "
                                            "check the URL"):
        download_file("htp://example.org/x.bin", tmp_path / "x.bin", SHA256, policy=FAST)


# --- the `http` source and hostile archives: nothing lands, medrobust says why -------------

def assert_nothing_landed(tmp_path, dataset="skin"):
    """The dataset folder holds nothing of the archive, and nothing escaped anywhere."""
    assert not any(path.name == "escaped.txt" for path in tmp_path.rglob("*"))
    assert sorted(p.name for p in (tmp_path / dataset).iterdir()) == []
    staging = tmp_path / ".downloads" / dataset
    assert not [p for p in staging.iterdir() if "unpacked" in p.name]


@pytest.mark.parametrize("name, body", [("chain.zip", symlink_chain_zip()),
                                        ("chain.tar.gz", symlink_chain_tar())])
def test_http_source_refuses_symlink_chains(http_server, tmp_path, name, body):
    """Four links up from the staging folder is `resources/` itself (here tmp_path)."""
    from medrobust.data.sources import fetch_dataset
    url = http_server.serve(f"/{name}", body)
    config = http_dataset([{"url": url, "sha256": hashlib.sha256(body).hexdigest(),
                            "extract": True}])
    with pytest.raises(UnsafeArchiveError) as error:
        fetch_dataset(config, tmp_path / "skin")
    message = str(error.value)
    assert str(tmp_path / ".downloads" / "skin" / name) in message
    assert "'c/up0" in message and "refusing the archive" in message
    assert_nothing_landed(tmp_path)


def test_http_source_refuses_a_zip_bomb_unless_the_limit_is_raised(http_server, tmp_path):
    from medrobust.data.sources import fetch_dataset
    bomb = zip_bomb()
    url = http_server.serve("/skin.zip", bomb)
    entry = {"url": url, "sha256": hashlib.sha256(bomb).hexdigest(), "extract": True}
    with pytest.raises(UnsafeArchiveError, match="skin.zip: would unpack .* by member "
                                                 "'zeros.bin', a compression ratio of"):
        fetch_dataset(http_dataset([entry]), tmp_path / "skin")
    assert_nothing_landed(tmp_path)
    config = http_dataset([entry])
    config["source"]["download"]["max_unpacked_gb"] = 0.01   # 10 MB: still refused
    config["source"]["download"]["max_compression_ratio"] = 1000
    with pytest.raises(UnsafeArchiveError, match="more than 10 MB \\(the limit, "
                                                 "`download.max_unpacked_gb`"):
        fetch_dataset(config, tmp_path / "skin")
    assert http_server.log == ["/skin.zip"]   # the verified archive stayed staged

