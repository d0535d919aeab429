from __future__ import annotations

import hashlib
import shutil

import pandas as pd
import pytest

from tasks.config import DataConfig, RemoteFile
from tasks.download import DownloadError, download, fetch, sha1_file, take_snapshot
from tests.conftest import refused_port

TRAIN = RemoteFile(name="kaggle_house_pred_train.csv",
                   sha1="585e9cc93e70b39160e7921475f9bcd7d31219ce")


def test_fetches_over_http_and_verifies(data_server, tmp_path):
    path = fetch(TRAIN, data_server.url, tmp_path / "cache", backoff_s=0)
    assert sha1_file(path) == TRAIN.sha1
    assert path.parent == tmp_path / "cache"
    # no temp files left; beside the file only its hidden validators record
    assert sorted(p.name for p in path.parent.iterdir()) == [f".{TRAIN.name}.meta.json",
                                                            TRAIN.name]


def test_verified_cached_file_is_not_fetched_again(data_server, tmp_path):
    before = data_server.requests[TRAIN.name]
    fetch(TRAIN, data_server.url, tmp_path, backoff_s=0)
    fetch(TRAIN, data_server.url, tmp_path, backoff_s=0)
    assert data_server.requests[TRAIN.name] == before + 1


def test_corrupted_cache_is_fetched_again(data_server, tmp_path):
    fetch(TRAIN, data_server.url, tmp_path, backoff_s=0)
    (tmp_path / TRAIN.name).write_text("damaged")
    before = data_server.requests[TRAIN.name]
    path = fetch(TRAIN, data_server.url, tmp_path, backoff_s=0)
    assert sha1_file(path) == TRAIN.sha1
    assert data_server.requests[TRAIN.name] == before + 1


def test_hash_mismatch_names_file_and_hashes_and_caches_nothing(real_data, serve_dir, tmp_path):
    bad_dir = tmp_path / "mirror"
    bad_dir.mkdir()
    content = (real_data / TRAIN.name).read_bytes() + b"extra row\n"
    (bad_dir / TRAIN.name).write_bytes(content)
    server = serve_dir(bad_dir)
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as err:
        fetch(TRAIN, server.url, cache, backoff_s=0)
    msg = str(err.value)
    assert "\n" not in msg
    assert TRAIN.name in msg and TRAIN.sha1 in msg
    assert hashlib.sha1(content).hexdigest() in msg
    assert list(cache.iterdir()) == []


def test_local_directory_and_file_url(real_data, tmp_path):
    a = fetch(TRAIN, str(real_data), tmp_path / "a")
    b = fetch(TRAIN, real_data.as_uri(), tmp_path / "b")
    assert sha1_file(a) == sha1_file(b) == TRAIN.sha1


def test_http_404_fails_fast_with_url(data_server, tmp_path):
    missing = RemoteFile(name="no-such-file.csv", sha1="0" * 40)
    with pytest.raises(DownloadError, match=r"no-such-file\.csv: HTTP 404"):
        fetch(missing, data_server.url, tmp_path, retries=3, backoff_s=0)
    assert data_server.requests["no-such-file.csv"] == 1  # a 404 is not retried


def test_connection_refused_is_retried_then_reported(tmp_path):
    logs = []
    with refused_port() as port, pytest.raises(DownloadError, match="after 3 attempts") as err:
        fetch(TRAIN, f"http://127.0.0.1:{port}/", tmp_path, retries=2, backoff_s=0,
              log=logs.append)
    assert f"127.0.0.1:{port}/{TRAIN.name}" in str(err.value)
    assert len(logs) == 2 and all("retry in" in line for line in logs)


def test_download_copies_both_files(real_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cfg = DataConfig(url=str(real_data), cache_dir=str(tmp_path / "cache"))
    snapshot = take_snapshot(cfg)
    metrics = download(snapshot, "error", out)
    assert sorted(p.name for p in out.iterdir()) == ["test.csv", "train.csv"]
    assert metrics["files"]["train"] == {TRAIN.name: TRAIN.sha1}
    assert (out / "train.csv").read_bytes() == (real_data / TRAIN.name).read_bytes()
    assert metrics["rows"] == {"train": 1460, "test": 1459}
    shutil.rmtree(out)


class _Flaky:
    """A loopback server that answers 500 (or stalls) ``failures`` times, then the file."""

    def __init__(self, body: bytes, failures: int, mode: str):
        import http.server
        import threading
        import time

        state = {"n": 0}
        self.state = state

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                state["n"] += 1
                if state["n"] <= failures:
                    if mode == "stall":
                        time.sleep(1.5)
                        return
                    if mode == "cut":  # promise the whole body, send half, hang up
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        self.connection.shutdown(2)
                        return
                    self.send_error(500, "boom")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("mode", ["500", "stall", "cut"])
def test_transient_failures_are_retried_with_backoff(real_data, tmp_path, mode):
    server = _Flaky((real_data / TRAIN.name).read_bytes(), failures=2, mode=mode)
    logs = []
    try:
        path = fetch(TRAIN, server.url, tmp_path, timeout_s=0.5, retries=2, backoff_s=0.1,
                     log=logs.append)
    finally:
        server.close()
    assert sha1_file(path) == TRAIN.sha1
    assert server.state["n"] == 3
    assert len(logs) == 2 and all("retry in" in line for line in logs)
    assert {"500": "HTTP 500", "stall": "timed out", "cut": "cut off"}[mode] in logs[0]
    delays = [float(line.split("retry in ")[1].rstrip("s")) for line in logs]
    assert delays[1] == 2 * delays[0]  # exponential backoff


def test_body_cut_off_every_time_ends_in_one_line_and_caches_nothing(real_data, tmp_path):
    server = _Flaky((real_data / TRAIN.name).read_bytes(), failures=99, mode="cut")
    try:
        with pytest.raises(DownloadError) as err:
            fetch(TRAIN, server.url, tmp_path, retries=1, backoff_s=0)
    finally:
        server.close()
    msg = str(err.value)
    assert msg.startswith(f"could not download {server.url}{TRAIN.name} after 2 attempts")
    assert "cut off" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []


def test_persistent_500_ends_in_one_line_naming_url(real_data, tmp_path):
    server = _Flaky(b"", failures=99, mode="500")
    try:
        with pytest.raises(DownloadError) as err:
            fetch(TRAIN, server.url, tmp_path, retries=1, backoff_s=0)
    finally:
        server.close()
    assert str(err.value).startswith(f"could not download {server.url}{TRAIN.name}: HTTP 500")
    assert server.state["n"] == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("appends", [1, 5])
def test_rows_appended_during_a_copy_are_fetched(tmp_path, monkeypatch, appends):
    """A writer appends to a local source while it is being copied: the copy is read again
    (up to 3 times); a writer faster than that leaves a stat that makes the next fetch bring
    the rest, never a half copy taken for current."""
    import os

    from tasks import download
    from tasks.data.sources import Located
    from tasks.download import fetch_file

    source = tmp_path / "rows.csv"
    source.write_text("Id,SalePrice\n1,100\n")
    real, calls = download._fetch_once, []

    def copy_then_append(*args, **kwargs):
        got = real(*args, **kwargs)
        calls.append(1)
        if len(calls) <= appends:
            with source.open("a") as fh:
                fh.write(f"{len(calls) + 1},200\n")
            st = source.stat()
            os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        return got

    monkeypatch.setattr(download, "_fetch_once", copy_then_append)
    cache = tmp_path / "cache" / "rows.csv"
    located = Located(name="rows.csv", location=str(source), local=source)
    fetch_file(located, cache, log=lambda _: None)
    if appends == 1:
        assert cache.read_text() == source.read_text() and len(calls) == 2
    monkeypatch.setattr(download, "_fetch_once", real)
    fetch_file(located, cache, log=lambda _: None)
    assert cache.read_text() == source.read_text()
    assert cache.read_text().count("\n") == 2 + min(appends, 3)


def _source_file(path):
    from tasks.download import SourceFile

    return SourceFile(name=path.name, sha1=sha1_file(path), path=str(path))


@pytest.mark.parametrize(("content", "words"), [
    ("Id,Price\n1,caf\xe9\n".encode("latin-1"), "is not a UTF-8 CSV file; export it as CSV"),
    (b'Id,Price\n1,"10\n', "is not a valid CSV file"),
    (b"Key,Price\n1,10\n", "has no Id column"),
    (b"Id,Price\n1,10,7\n", "line 2 has 3 fields, the header has 2"),
])
def test_a_file_that_is_no_usable_csv_is_one_line_naming_it(tmp_path, content, words):
    from tasks.data.features import DataError
    from tasks.download import merge

    bad = tmp_path / "2009-01.csv"
    bad.write_bytes(content)
    with pytest.raises(DataError) as err:
        merge((_source_file(bad),), "error", tmp_path / "out.csv")
    assert str(err.value).startswith("2009-01.csv ") and words in str(err.value)
    assert len(str(err.value).splitlines()) == 1 and not (tmp_path / "out.csv").exists()


def test_a_cached_file_changed_after_its_fetch_is_not_merged(real_data, tmp_path):
    from tasks.download import Snapshot

    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    shutil.copyfile(real_data / "kaggle_house_pred_train.csv", train)
    shutil.copyfile(real_data / "kaggle_house_pred_test.csv", test)
    snapshot = Snapshot(train=(_source_file(train),), test=(_source_file(test),))
    with open(train, "a") as fh:  # a row appended in the cache after the snapshot
        fh.write("9999" + ",1" * 80 + "\n")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DownloadError, match=f"cached {train} changed after it was fetched; "
                                            "run again"):
        download(snapshot, "error", out)
    assert list(out.iterdir()) == []


def test_an_id_written_two_ways_in_two_files_is_one_id(tmp_path):
    """Files are read a batch at a time and their Ids compared as numbers however written:
    7 in a Parquet file, "007.0" in a CSV file are the same sale."""
    from tasks.data.features import DataError
    from tasks.download import merge

    pd.DataFrame({"Id": [5, 7], "Price": [1.0, 2.0]}).to_parquet(tmp_path / "a.parquet")
    (tmp_path / "b.csv").write_text('Id,Price\n"007.0",3\n9,4\n')
    files = (_source_file(tmp_path / "a.parquet"), _source_file(tmp_path / "b.csv"))
    with pytest.raises(DataError, match=r"Id 7 is in both a.parquet and b.csv \(1 shared"):
        merge(files, "error", tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()
    assert merge(files, "last", tmp_path / "out.csv", log=lambda _: None) == 3
    rows = pd.read_csv(tmp_path / "out.csv")
    assert rows["Price"].tolist() == [1.0, 3.0, 4.0] and rows["Id"].tolist() == [5, 7, 9]
