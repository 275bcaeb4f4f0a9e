"""Downloads against a local HTTP server: resume, verify, fail clearly."""

import hashlib
import logging

import pytest

from fixtures_http import refused_url
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
    with pytest.raises(DownloadError, match="check the URL"):
        download_file("htp://example.org/x.bin", tmp_path / "x.bin", SHA256, policy=FAST)
