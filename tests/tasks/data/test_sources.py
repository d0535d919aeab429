"""Data sources that change: listing, fetching only what changed, merging many files, and
every way a new file can be bad (each a one-line error naming the file)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tasks.config import DataConfig
from tasks.data.features import DataError
from tasks.data.feed import make_feed
from tasks.data.sources import SourceError, list_source
from tasks.download import download, take_snapshot
from tests.conftest import TRAIN_CSV


@pytest.fixture(scope="module")
def feed(tmp_path_factory) -> Path:
    """The Kaggle training rows as monthly files up to 2006-06 (a small growing source)."""
    out = tmp_path_factory.mktemp("feed") / "sales"
    make_feed(TRAIN_CSV, out, until="2006-06")
    return out


def _copy(feed: Path, dest: Path) -> Path:
    shutil.copytree(feed, dest)
    return dest


def _config(tmp_path: Path, train: str, **kw) -> DataConfig:
    return DataConfig(url=str(TRAIN_CSV.parent), train=train,
                      cache_dir=str(tmp_path / "cache"), **kw)



def data_version_by_hand(folder) -> str:
    """The recipe in docs/storage.md, computed here: the first 8 hex digits of the SHA-256 of the
    files' sorted [name, SHA-1] pairs as compact JSON."""
    import hashlib
    import json

    pairs = sorted([p.name, hashlib.sha1(p.read_bytes()).hexdigest()]
                   for p in Path(folder).iterdir() if p.suffix in (".csv", ".parquet"))
    return hashlib.sha256(json.dumps(pairs, separators=(",", ":")).encode()).hexdigest()[:8]

def test_feed_months_hold_exactly_the_training_rows(tmp_path):
    written = make_feed(TRAIN_CSV, tmp_path / "all")
    assert sum(written.values()) == 1460 and min(written) == "2006-01"
    assert max(written) == "2010-07"
    header, *lines = TRAIN_CSV.read_text().splitlines()
    months = [p.read_text().splitlines() for p in sorted((tmp_path / "all").glob("*.csv"))]
    assert all(m[0] == header for m in months)  # each month: the header, then its lines
    assert sorted(line for m in months for line in m[1:]) == sorted(lines)
    with pytest.raises(DataError, match="'2008-13' is not a month"):
        make_feed(TRAIN_CSV, tmp_path / "x", until="2008-13")


def test_a_directory_a_glob_a_file_and_a_file_url_list_in_name_order(feed):
    names = [f.name for f in list_source(str(feed))]
    assert names == sorted(names) and names[0] == "2006-01.csv" and len(names) == 6
    assert [f.name for f in list_source(str(feed / "2006-0[12].csv"))] == [
        "2006-01.csv", "2006-02.csv"]
    assert [f.name for f in list_source((feed / "2006-03.csv").as_uri())] == ["2006-03.csv"]


def test_http_directory_and_glob_are_listed_from_the_index_page(feed, serve_dir):
    server = serve_dir(feed.parent)
    listed = list_source(server.url + "sales/")
    assert [f.name for f in listed] == sorted(p.name for p in feed.iterdir())
    assert listed[0].location == server.url + "sales/2006-01.csv"
    assert [f.name for f in list_source(server.url + "sales/2006-0[45].csv")] == [
        "2006-04.csv", "2006-05.csv"]


@pytest.mark.parametrize(("source", "words"), [
    ("/no/such/dir", "does not exist"),
    ("nosuch://bucket/x.csv", "unsupported data source nosuch://bucket/x.csv: .*no file "
     "system for 'nosuch://'"),
])
def test_a_bad_source_is_one_line(source, words):
    with pytest.raises(SourceError, match=words):
        list_source(source)


def test_an_empty_directory_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(SourceError, match="no CSV or Parquet files in"):
        list_source(str(tmp_path))


def test_same_bytes_same_version_new_file_new_version_and_nothing_copied_twice(feed, tmp_path):
    src = _copy(feed, tmp_path / "src")
    cfg = _config(tmp_path, str(src))
    first = take_snapshot(cfg)
    cached = Path(first.train[0].path)
    stamp = cached.stat().st_mtime_ns
    again = take_snapshot(cfg)
    assert again == first and again.data_version == first.data_version
    assert cached.stat().st_mtime_ns == stamp  # unchanged size/mtime: not copied again
    assert first.data_version == data_version_by_hand(src)
    shutil.copy(TRAIN_CSV.parent / "kaggle_house_pred_test.csv", src / "zz-new.csv")
    assert take_snapshot(cfg).data_version != first.data_version


def test_a_removed_file_changes_the_version_and_is_logged(feed, tmp_path):
    src = _copy(feed, tmp_path / "src")
    cfg = _config(tmp_path, str(src))
    first = take_snapshot(cfg)
    (src / "2006-03.csv").unlink()
    logs = []
    after = take_snapshot(cfg, log=logs.append)
    assert after.data_version != first.data_version
    assert any("removed from" in line and "2006-03.csv" in line for line in logs)


def test_unchanged_http_files_are_not_downloaded_again(feed, serve_dir, tmp_path):
    server = serve_dir(feed.parent)
    cfg = _config(tmp_path, server.url + "sales/")
    first = take_snapshot(cfg)
    bodies = sum(server.bodies[f"sales/{f.name}"] for f in first.train)
    assert bodies == len(first.train)
    second = take_snapshot(cfg)
    assert second == first
    # asked again (conditional GET, answered 304), but no body sent
    assert sum(server.bodies[f"sales/{f.name}"] for f in first.train) == bodies
    assert server.requests["sales/2006-01.csv"] == 2


def _merged(tmp_path: Path, src: Path, on_duplicate: str = "error"):
    cfg = _config(tmp_path, str(src), on_duplicate=on_duplicate)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return download(take_snapshot(cfg), on_duplicate, out), out


def test_many_files_are_concatenated_in_name_order(feed, tmp_path):
    metrics, out = _merged(tmp_path, feed)
    rows = pd.read_csv(out / "train.csv")
    expected = pd.concat([pd.read_csv(p) for p in sorted(feed.glob("*.csv"))],
                         ignore_index=True)
    pd.testing.assert_frame_equal(rows, expected, check_dtype=False)
    assert metrics["rows"]["train"] == len(expected)
    assert list(metrics["files"]["train"]) == sorted(p.name for p in feed.glob("*.csv"))


def _break(src: Path, how: str) -> str:
    """Make one new file bad in the way ``how`` says; returns the file's name."""
    name = "2006-07.csv"
    good = (src / "2006-06.csv").read_text()
    header, *rows = good.splitlines(keepends=True)
    frame = pd.read_csv(src / "2006-06.csv")
    target = src / name
    if how == "empty":
        target.write_bytes(b"")
    elif how == "truncated":
        body = header + "".join(rows)
        target.write_text(body[: len(body) - 40])  # cut off mid-row
    elif how == "binary":
        target.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    elif how == "parquet-garbage":
        name = "2006-07.parquet"
        (src / name).write_text("Id,SalePrice\n1,2\n")
    elif how == "missing-column":
        frame.drop(columns=["LotArea"]).assign(Id=frame["Id"] + 5000).to_csv(target, index=False)
    elif how == "extra-column":
        frame.assign(Id=frame["Id"] + 5000, Pool2=1).to_csv(target, index=False)
    elif how == "renamed-column":
        frame.rename(columns={"LotArea": "Lot_Area"}).assign(Id=frame["Id"] + 5000).to_csv(
            target, index=False)
    elif how == "numeric-to-text":
        frame.assign(Id=frame["Id"] + 5000, LotArea="large").to_csv(target, index=False)
    return name


@pytest.mark.parametrize(("how", "words"), [
    ("empty", "is empty"),
    ("truncated", "fields, the header has"),
    ("binary", "is not a CSV file"),
    ("parquet-garbage", "is not a readable Parquet file"),
    ("missing-column", "missing LotArea"),
    ("extra-column", "extra Pool2"),
    ("renamed-column", "missing LotArea; extra Lot_Area"),
    ("numeric-to-text", "column LotArea is numeric in the other files but has 'large'"),
])
def test_a_bad_new_file_is_a_one_line_error_naming_it(feed, tmp_path, how, words):
    src = _copy(feed, tmp_path / "src")
    name = _break(src, how)
    with pytest.raises(DataError) as err:
        _merged(tmp_path, src)
    msg = str(err.value)
    assert name in msg and words in msg and "\n" not in msg, msg


def test_the_same_id_in_two_files_names_both_unless_the_later_wins(feed, tmp_path):
    src = _copy(feed, tmp_path / "src")
    fix = pd.read_csv(src / "2006-02.csv").head(2).assign(SalePrice=123456)
    fix.to_csv(src / "2006-99-corrections.csv", index=False)
    with pytest.raises(DataError) as err:
        _merged(tmp_path, src)
    msg = str(err.value)
    assert "2006-02.csv" in msg and "2006-99-corrections.csv" in msg and "2 shared" in msg
    assert 'on_duplicate = "last"' in msg
    _, out = _merged(tmp_path, src, on_duplicate="last")
    rows = pd.read_csv(out / "train.csv").set_index("Id")
    assert rows.index.is_unique
    assert (rows.loc[fix["Id"], "SalePrice"] == 123456).all()


def test_parquet_and_csv_files_mix(feed, tmp_path):
    src = _copy(feed, tmp_path / "src")
    frame = pd.read_csv(src / "2006-06.csv")
    os.remove(src / "2006-06.csv")
    frame.to_parquet(src / "2006-06.parquet", index=False)
    _, out = _merged(tmp_path, src)
    assert len(pd.read_csv(out / "train.csv")) == sum(
        len(pd.read_csv(p)) for p in feed.glob("*.csv"))


def test_pinned_sha1_of_a_source_file_is_verified(feed, tmp_path):
    from tasks.download import DownloadError, sha1_file

    good = sha1_file(feed / "2006-01.csv")
    assert take_snapshot(_config(tmp_path, str(feed), sha1={"2006-01.csv": good})).train
    with pytest.raises(DownloadError, match="2006-02.csv .* expected 0{40}"):
        take_snapshot(_config(tmp_path / "other", str(feed), sha1={"2006-02.csv": "0" * 40}))


def test_a_bucket_source_lists_fetches_only_what_changed_and_versions_like_a_folder(
        feed, s3, tmp_path):
    bucket = s3.bucket()
    fs = s3.fs()
    for p in sorted(feed.iterdir()):
        fs.put_file(str(p), f"{bucket}/sales/{p.name}")
    fs.pipe(f"{bucket}/sales/notes.txt", b"not data")
    source = f"s3://{bucket}/sales/"
    assert [f.name for f in list_source(source)] == sorted(p.name for p in feed.iterdir())
    assert [f.name for f in list_source(f"s3://{bucket}/sales/2006-0[12].csv")] == [
        "2006-01.csv", "2006-02.csv"]
    assert [f.location for f in list_source(f"s3://{bucket}/sales/2006-03.csv")] == [
        f"s3://{bucket}/sales/2006-03.csv"]
    with pytest.raises(SourceError, match="does not exist"):
        list_source(f"s3://{bucket}/nothing.csv")

    cfg = _config(tmp_path, source)
    first = take_snapshot(cfg)
    # the same bytes as the folder: the same data version
    assert first.data_version == take_snapshot(_config(tmp_path / "f", str(feed))).data_version
    cached = Path(first.train[0].path)
    stamp = cached.stat().st_mtime_ns
    assert take_snapshot(cfg) == first
    assert cached.stat().st_mtime_ns == stamp  # its ETag unchanged: not downloaded again
    fs.pipe(f"{bucket}/sales/2006-01.csv", cached.read_bytes() + cached.read_bytes()[-200:])
    assert take_snapshot(cfg).data_version != first.data_version
