"""Stage 1, download: fetch the sources' files into a cache (only what changed), then merge
them into a versioned artifact.

Two tasks: ``fetch`` lists the sources and brings changed files into the cache every run (it
cannot know what changed without asking), and returns a small snapshot, each file's name and
SHA-1; ``download`` is cached on that snapshot, so an unchanged source comes back Cached and
so does every stage after it.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import http.client
import json
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.config import DataConfig, RemoteFile, data_version
from tasks.data.features import ID, DataError
from tasks.data.rawcsv import TEXT, Scan, batches, guess_types, read_all
from tasks.data.sources import Located, SourceError, list_source
from tasks.frozen import Frozen
from tasks.stage import build_stage, failing_as, one_line, stage_task_options
from tasks.storage.artifacts import ArtifactRef, read_production, write_json

STAGE = "download"


class DownloadError(RuntimeError):
    """A raw file could not be fetched or did not match its hash."""


def sha1_file(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _source(base: str, name: str) -> tuple[str, Path | None]:
    """(display location, local path or None for http) of ``name`` under ``base``."""
    parsed = urllib.parse.urlparse(base)
    if parsed.scheme in ("http", "https"):
        return urllib.parse.urljoin(base.rstrip("/") + "/", name), None
    if parsed.scheme == "file":
        path = Path(urllib.request.url2pathname(parsed.path)) / name
        return str(path), path
    if parsed.scheme and len(parsed.scheme) > 1:  # an object store (s3://...), by fsspec
        return base.rstrip("/") + "/" + name, None
    path = Path(base).expanduser() / name
    return str(path), path


_NOT_MODIFIED = "not-modified"


def _fetch_once(location: str, local: Path | None, dest: Path, timeout_s: float,
                validators: dict[str, str] | None = None) -> dict[str, str] | str:
    """Copy or download ``location`` to ``dest``; return the source's validators (ETag,
    Last-Modified) or ``_NOT_MODIFIED`` when a conditional request says it has not changed."""
    if local is not None:
        if not local.is_file():
            raise FileNotFoundError(f"no such file {local}")
        shutil.copyfile(local, dest)
        return {}
    if not location.startswith(("http://", "https://")):
        return _fetch_object(location, dest, validators)
    headers = {}
    if validators and validators.get("etag"):
        headers["If-None-Match"] = validators["etag"]
    if validators and validators.get("last_modified"):
        headers["If-Modified-Since"] = validators["last_modified"]
    request = urllib.request.Request(location, headers=headers)
    try:
        resp = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 304:
            return _NOT_MODIFIED
        raise
    with resp, open(dest, "wb") as out:
        expected = resp.headers.get("Content-Length")
        received = 0
        while block := resp.read(1 << 16):
            out.write(block)
            received += len(block)
        got = {"etag": resp.headers.get("ETag") or "",
               "last_modified": resp.headers.get("Last-Modified") or ""}
    if expected is not None and received != int(expected):
        raise ConnectionError(f"body cut off after {received} of {expected} bytes")
    return got


def _fetch_object(location: str, dest: Path,
                  validators: dict[str, str] | None) -> dict[str, str] | str:
    """An object-store file: its ETag serves as the validator (one HEAD when unchanged)."""
    from tasks.storage.store import StoreError, filesystem

    try:
        fs, path = filesystem(location)
    except StoreError as exc:
        raise DownloadError(f"unsupported data URL {location}: {exc}") from None
    etag = str(fs.info(path).get("ETag") or "")
    if validators and etag and validators.get("etag") == etag:
        return _NOT_MODIFIED
    fs.get_file(path, str(dest))
    return {"etag": etag, "last_modified": ""}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"connection failed ({exc.reason})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, http.client.IncompleteRead):
        return f"body cut off after {len(exc.partial)} bytes"
    return one_line(exc)


def _with_retries(attempt_once, location: str, retries: int, backoff_s: float, log):
    """``attempt_once()`` with exponential backoff on transient failures; a 4xx (other than
    408/429) or a missing local file fails at once. Errors are one-line DownloadErrors."""
    for attempt in range(retries + 1):
        try:
            return attempt_once()
        except urllib.error.HTTPError as exc:
            # A 4xx other than 408/429 will not get better by asking again.
            if 400 <= exc.code < 500 and exc.code not in (408, 429) or attempt == retries:
                raise DownloadError(
                    f"could not download {location}: {_describe(exc)}; check the source URL"
                ) from None
            cause = exc
        except FileNotFoundError as exc:
            raise DownloadError(
                f"could not read {location}: {_describe(exc)}; check the source path"
            ) from None
        except (OSError, ConnectionError, http.client.HTTPException) as exc:
            # HTTPException: e.g. IncompleteRead, a body cut off mid-way.
            if attempt == retries:
                raise DownloadError(
                    f"could not download {location} after {retries + 1} attempts: "
                    f"{_describe(exc)}; check the network or use a mirror"
                ) from None
            cause = exc
        delay = backoff_s * 2**attempt
        log(f"fetching {location} failed ({_describe(cause)}); retry in {delay:.1f}s")
        time.sleep(delay)
    raise AssertionError("unreachable")


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


_STABLE_TRIES = 3  # copies of a local source that a writer keeps changing


def _meta_path(cache_path: Path) -> Path:
    return cache_path.with_name(f".{cache_path.name}.meta.json")


def fetch_file(located: Located, cache_path: Path, *, sha1: str | None = None,
               timeout_s: float = 30.0, retries: int = 3, backoff_s: float = 1.0,
               force: bool = False, log=print) -> str:
    """Bring ``located`` into ``cache_path`` unless the cached copy is known current; return
    its SHA-1. Known current: a pinned ``sha1`` the cached bytes match; an unchanged size and
    mtime of a local source; or an HTTP source answering 304 to a conditional request
    (ETag / Last-Modified). A hash mismatch with the pin is not retried and caches nothing.
    """
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    meta_file = _meta_path(cache_path)
    meta: dict | None = None
    if cache_path.is_file() and meta_file.is_file():
        with contextlib.suppress(ValueError, OSError):
            meta = json.loads(meta_file.read_text())
        if meta is not None and meta.get("cache_stat") != _stat(cache_path):
            meta = None  # the cached copy changed since we wrote it
    if not force and cache_path.is_file():
        if sha1 is not None:
            if (meta or {}).get("sha1") == sha1 or sha1_file(cache_path) == sha1:
                return sha1
            log(f"cached {cache_path} does not match its SHA-1; fetching it again")
            meta = None
        elif meta is not None and located.local is not None and (
                meta.get("source_stat") == _stat(located.local)):
            return meta["sha1"]
    tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    validators = (meta or {}).get("validators") if located.local is None and not force else None
    try:
        # A local source's size and mtime are read before it is copied, and again after: a
        # writer appending meanwhile means the copy is read again (a few times), and what is
        # recorded is never newer than what was copied, so the next fetch brings the rest.
        for _ in range(_STABLE_TRIES):
            source_stat = _stat(located.local) if located.local is not None else None
            got = _with_retries(
                lambda: _fetch_once(located.location, located.local, tmp, timeout_s,
                                    validators),
                located.location, retries, backoff_s, log)
            if source_stat is None or _stat(located.local) == source_stat:
                break
        if got == _NOT_MODIFIED and meta is not None:
            return meta["sha1"]
        if got == _NOT_MODIFIED:  # no cached copy to fall back on: ask unconditionally
            got = _with_retries(
                lambda: _fetch_once(located.location, located.local, tmp, timeout_s),
                located.location, retries, backoff_s, log)
        actual = sha1_file(tmp)
        if sha1 is not None and actual != sha1:
            raise DownloadError(
                f"{located.name} from {located.location} has SHA-1 {actual}, expected {sha1}; "
                "the source serves different bytes: check the source or its pinned SHA-1"
            )
        os.replace(tmp, cache_path)
        write_json(meta_file, {"sha1": actual, "location": located.location,
                               "validators": got if isinstance(got, dict) else {},
                               "source_stat": source_stat, "cache_stat": _stat(cache_path)})
    finally:
        tmp.unlink(missing_ok=True)
    return actual


def fetch(file: RemoteFile, base_url: str, cache_dir: Path, *, timeout_s: float = 30.0,
          retries: int = 3, backoff_s: float = 1.0, log=print) -> Path:
    """Return ``cache_dir/file.name`` with a verified SHA-1, fetching it only if needed.

    Transient failures are retried with exponential backoff; a hash mismatch is not (the
    source serves the wrong bytes) and leaves nothing in the cache.
    """
    location, local = _source(base_url, file.name)
    target = Path(cache_dir) / file.name
    fetch_file(Located(file.name, location, local), target, sha1=file.sha1,
               timeout_s=timeout_s, retries=retries, backoff_s=backoff_s, log=log)
    return target


class SourceFile(Frozen):
    """One fetched file: its name and SHA-1 define it; ``path`` is where this machine's cache
    holds it."""

    _unversioned = frozenset({"path"})

    name: str
    sha1: str
    path: str


class Snapshot(Frozen):
    """What the sources hold now, in name order: the download stage's only input (besides
    ``on_duplicate``), so the same bytes give the same version and anything new a new one."""

    train: tuple[SourceFile, ...]
    test: tuple[SourceFile, ...]

    @property
    def data_version(self) -> str:
        """The training data's version: the hash of its sorted (name, SHA-1) list."""
        return data_version((f.name, f.sha1) for f in self.train)


def _role_sources(data: DataConfig, role: str) -> tuple[str, list[Located], dict[str, str]]:
    """(source text, its files, pinned SHA-1 by name) of ``role``: the configured source,
    or the registry's Kaggle file under ``data.url`` (pinned by the registry)."""
    source = getattr(data, role)
    if source is None:
        file = data.files[role]
        location, local = _source(data.url, file.name)
        return location, [Located(file.name, location, local)], {file.name: file.sha1}
    try:
        return source, list_source(source, data.timeout_s), dict(data.sha1)
    except SourceError as exc:
        raise DownloadError(str(exc)) from None


def fetch_source(source: str, files: list[Located], folder: Path, memo: Path,
                 pins: dict[str, str], data: DataConfig, force: bool = False,
                 log=print) -> tuple[SourceFile, ...]:
    """Bring every file of ``source`` into ``folder`` (only what changed); log files added or
    removed since the last listing (remembered in ``memo``)."""
    _log_listing_change(memo, source, [f.name for f in files], log)
    return tuple(
        SourceFile(name=f.name, path=str(folder / f.name), sha1=fetch_file(
            f, folder / f.name, sha1=pins.get(f.name), timeout_s=data.timeout_s,
            retries=data.retries, backoff_s=data.backoff_s, force=force, log=log))
        for f in files
    )


def source_folder(cache: Path, source: str) -> tuple[Path, Path]:
    """(folder for its files, memo of its last listing) of a source in the cache: each
    source its own folder, so two sources with a file of the same name do not evict each
    other."""
    key = hashlib.sha256(source.encode()).hexdigest()[:12]
    return cache / "sources" / key, cache / f".listing-{key}.json"


def take_snapshot(data: DataConfig, force: bool = False, log=print) -> Snapshot:
    """List every source and bring each file into the cache (only what changed); the
    snapshot of what they hold now."""
    cache = Path(data.cache_dir)
    out: dict[str, tuple[SourceFile, ...]] = {}
    for role in ("train", "test"):
        source, files, pins = _role_sources(data, role)
        folder, memo = source_folder(cache, source)
        if getattr(data, role) is None:
            folder = cache  # the registry's files keep their plain cache path
        out[role] = fetch_source(source, files, folder, memo, pins, data, force, log)
    return Snapshot(train=out["train"], test=out["test"])


def _log_listing_change(memo: Path, source: str, names: list[str], log) -> None:
    try:
        before = json.loads(memo.read_text())
    except (OSError, ValueError):
        before = None
    if before is not None:
        gone = sorted(set(before) - set(names))
        new = sorted(set(names) - set(before))
        if gone:
            log(f"{len(gone)} file(s) removed from {source} since the last run: "
                f"{', '.join(gone[:10])}; the data version changes")
        if new:
            log(f"{len(new)} new file(s) in {source}: {', '.join(new[:10])}")
    memo.parent.mkdir(parents=True, exist_ok=True)
    write_json(memo, names)


@dataclass
class _Rows:
    """One source file, read once a batch at a time (``tasks.data.rawcsv``): its columns,
    which of them are numbers and where each text value first is (``Scan``), and its Ids
    (``_id_keys``), without holding its rows."""

    name: str
    path: Path
    columns: list[str]
    scan: Scan
    ids: np.ndarray  # int64, or text where an Id is no whole number


def _csv_shape(path: Path, name: str) -> None:
    """A CSV file pyarrow could not parse: a DataError naming the first line whose number
    of fields is not the header's (a file cut off mid-row), or the file when none is."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None) or []
            for row in reader:
                if row and len(row) != len(header):
                    raise DataError(
                        f"{name} line {reader.line_num} has {len(row)} fields, the header "
                        f"has {len(header)}: the file is cut off or malformed; fix or "
                        "re-export it")
    except UnicodeDecodeError:
        raise DataError(f"{name} is not a UTF-8 CSV file; export it as CSV") from None
    except csv.Error as exc:
        raise DataError(f"{name} is not a valid CSV file ({one_line(exc)})") from None


def _parquet_batches(path: Path, name: str) -> tuple[dict[str, pa.DataType], Any]:
    """A Parquet file's types as ``Scan`` wants them (numbers float64, the rest text) and
    its batches so typed; a DataError naming it when it is not Parquet."""
    try:
        file = pq.ParquetFile(path)
        schema = file.schema_arrow
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds
        raise DataError(f"{name} is not a readable Parquet file ({one_line(exc)})") from None
    types = {f.name: pa.string() if f.name == ID else pa.float64()
             if pa.types.is_integer(f.type) or pa.types.is_floating(f.type) else TEXT
             for f in schema}

    def batches():
        lo = 0
        for batch in file.iter_batches(batch_size=65_536):
            table = pa.Table.from_batches([batch])
            table = pa.table({c: table.column(c).cast(t if t != TEXT else pa.string())
                              for c, t in types.items()})
            yield lo, table
            lo += table.num_rows
    return types, batches


def _id_keys(ids: pa.ChunkedArray) -> np.ndarray:
    """Ids as keys: int64 when each is a whole number however written ("7", "7.0" and
    "007" are 7), text otherwise: the same Id in two files is the same key."""
    if ids.null_count == 0:
        try:
            return np.asarray(ids.cast(pa.int64()), dtype=np.int64)  # plain digits: fast
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    text = pd.Series(ids.to_pandas(), dtype="string").str.strip()
    number = pd.to_numeric(text, errors="coerce")
    whole = text.str.fullmatch(r"[+-]?\d{1,18}(\.0*)?").fillna(False).to_numpy(bool)
    if whole.all():
        return number.to_numpy().astype(np.int64)
    return np.array([str(int(v)) if w else t for t, v, w in zip(
        text.fillna("").tolist(), number.tolist(), whole, strict=True)], dtype=object)


class _RowsScan(Scan):
    """A ``Scan`` of a source file that also keeps its Ids (as ``_id_keys``)."""

    def __init__(self, name: str, types: dict[str, pa.DataType]):
        super().__init__(name, types, training=False)
        self.keys: list[np.ndarray] = []

    def add(self, lo: int, rows: pa.Table) -> None:
        super().add(lo, rows)
        if ID in rows.column_names:
            self.keys.append(_id_keys(rows.column(ID)))


def _read_rows(path: Path, name: str) -> _Rows:
    """One source file read through, or a one-line DataError naming it: empty, not CSV or
    Parquet, or a row with more or fewer fields than the header (a file cut off mid-row)."""
    if path.stat().st_size == 0:
        raise DataError(f"{name} is empty: expected a header line and rows")
    if name.lower().endswith((".parquet", ".pq")):
        types, batches = _parquet_batches(path, name)
        state = _RowsScan(name, types)
        for lo, table in batches():
            state.add(lo, table)
    else:
        head = path.open("rb").read(4096)
        if b"\x00" in head or head.startswith(b"PAR1"):
            raise DataError(f"{name} is not a CSV file (binary content); export it as CSV")
        with path.open("rb") as fh:  # a field's quotes come in pairs ("" inside one too)
            quotes = sum(chunk.count(b'"') for chunk in iter(lambda: fh.read(1 << 24), b""))
        if quotes % 2:
            raise DataError(f"{name} is not a valid CSV file (a quoted field is never "
                            "closed); fix or re-export it")
        try:
            state, _ = read_all(path, name, guess_types(path, name),
                                lambda types: _RowsScan(name, types))
        except DataError:
            _csv_shape(path, name)  # the line that is wrong, when one is
            raise
    state.finish()
    if ID not in state.types:
        raise DataError(f"{name} has no {ID} column")
    kinds = {k.dtype for k in state.keys}
    ids = (np.zeros(0, np.int64) if not state.keys else np.concatenate(state.keys)
           if len(kinds) == 1 else np.concatenate([k.astype(str).astype(object)
                                                   for k in state.keys]))
    return _Rows(name, path, list(state.types), state, ids)


def _check_alike(files: list[_Rows]) -> None:
    """Every file must have the first file's columns, and no text where another file has
    numbers (a numeric column turned text)."""
    first = files[0]
    for f in files[1:]:
        missing = [c for c in first.columns if c not in f.columns]
        extra = [c for c in f.columns if c not in first.columns]
        if missing or extra:
            parts = ([f"missing {', '.join(missing[:5])}"] if missing else []) + (
                [f"extra {', '.join(extra[:5])}"] if extra else [])
            raise DataError(f"{f.name} has other columns than {first.name} "
                            f"({'; '.join(parts)}); every file of a source needs the same "
                            "columns")
    numeric = {c for f in files for c in f.scan.numeric if f.scan.present.get(c)}
    for f in files:
        for col in sorted(numeric - set(f.scan.numeric)):
            values = f.scan.text.get(col)
            if col == ID or values is None or not values.count:
                continue
            parsed, _ = values.numbers()
            word, (row, _) = min(((w, values.first[w]) for w, v in zip(
                values.count, parsed, strict=True) if np.isnan(v)), key=lambda x: x[1][0])
            raise DataError(f"{f.name}: column {col} is numeric in the other files but has "
                            f"{word!r} (row {row + 1}); fix that value")


def _keep_last(files: list[_Rows], on_duplicate: str, log) -> list[np.ndarray]:
    """Which rows of each file to keep. The same Id in two files is an error naming both,
    unless ``on_duplicate='last'``: then the later file's row wins (corrections)."""
    if len({f.ids.dtype for f in files}) > 1:  # Ids that are text somewhere: compare text
        for f in files:
            f.ids = f.ids.astype(str).astype(object)
    seen = pd.Series([], dtype="int64", index=pd.Index(files[0].ids[:0]))  # Id -> file
    for i, f in enumerate(files):
        ids = pd.Index(f.ids).unique()
        clash = ids[ids.isin(seen.index)]
        if len(clash) and on_duplicate == "error":
            other = int(seen[clash[0]])
            shared = int((seen[clash] == other).sum())
            raise DataError(
                f"{ID} {clash[0]} is in both {files[other].name} and {f.name} ({shared} "
                "shared Id(s)); remove the repeats, or set data.on_duplicate = \"last\" to "
                "let the later file win (corrections)")
        seen = pd.concat([seen[~seen.index.isin(ids)], pd.Series(i, index=ids)])
    keep = []
    for i, f in enumerate(files):
        mask = (seen.reindex(pd.Index(f.ids)).to_numpy() == i)
        if not mask.all():
            log(f"{int((~mask).sum())} row(s) of {f.name} replaced by a later file's row "
                "with the same Id")
        keep.append(mask)
    return keep


def merge(files: tuple[SourceFile, ...], on_duplicate: str, dest: Path, log=print) -> int:
    """Every file's rows, in name order, checked alike, into ``dest`` (CSV), a batch at a
    time; a single CSV is copied byte for byte (bump ``stage.STAGE_FORMATS['download']``
    when this changes what it writes). Returns the number of rows."""
    rows = [_read_rows(Path(f.path), f.name) for f in files]
    _check_alike(rows)
    keep = _keep_last(rows, on_duplicate, log)
    if len(files) == 1 and files[0].name.lower().endswith(".csv"):
        shutil.copyfile(files[0].path, dest)
        return rows[0].scan.n
    columns = rows[0].columns
    # Every value as the text it was written as (numbers are not reformatted), missing
    # values as empty fields.
    schema = pa.schema([(c, pa.string()) for c in columns])
    total = 0
    with pcsv.CSVWriter(dest, schema) as out:
        for f, mask in zip(rows, keep, strict=True):
            if f.name.lower().endswith((".parquet", ".pq")):
                _, parts = _parquet_batches(f.path, f.name)
                parts = parts()
            else:
                parts = batches(f.path, f.name, dict.fromkeys(f.columns, pa.string()))
            for lo, table in parts:
                table = pa.table({c: table.column(c).cast(pa.string()) for c in columns})
                take = mask[lo:lo + table.num_rows]
                table = table if take.all() else table.filter(pa.array(take))
                out.write_table(table.cast(schema))
                total += table.num_rows
    return total


def download(snapshot: Snapshot, on_duplicate: str, out_dir: Path, log=print
             ) -> dict[str, object]:
    """The snapshot's files, merged per role into ``train.csv`` and ``test.csv``; returns
    the data version, each file's SHA-1 and the row counts."""
    for role in ("train", "test"):
        for f in getattr(snapshot, role):
            if sha1_file(Path(f.path)) != f.sha1:  # changed in the cache since the snapshot
                raise DownloadError(f"cached {f.path} changed after it was fetched; run again")
    rows = {role: merge(getattr(snapshot, role), on_duplicate, out_dir / f"{role}.csv", log)
            for role in ("train", "test")}
    return {
        "data_version": snapshot.data_version,
        "files": {role: {f.name: f.sha1 for f in getattr(snapshot, role)}
                  for role in ("train", "test")},
        "rows": rows,
    }


@task(name="fetch", task_run_name="fetch", cache_policy=NO_CACHE)
def fetch_task(data: DataConfig, root: str, force: bool = False) -> Snapshot:
    """List the sources and fetch what changed (the first half of the download stage)."""
    logger = get_run_logger()
    with failing_as(STAGE):
        snapshot = take_snapshot(data, force=force, log=logger.warning)
    production = read_production(root)
    if production is not None and production.get("data_version") == snapshot.data_version:
        logger.info(f"no new data: the training files are those of the production model "
                    f"{production['model']} (data {snapshot.data_version})")
    else:
        logger.info(f"data {snapshot.data_version}: {len(snapshot.train)} training file(s), "
                    f"{len(snapshot.test)} file(s) to predict")
    return snapshot


@task(**stage_task_options(STAGE))
def download_task(snapshot: Snapshot, on_duplicate: str, root: str,
                  force: bool = False) -> ArtifactRef:
    """Merge the snapshot's files (checked alike, duplicates resolved) into a download
    artifact: ``train.csv``, ``test.csv``."""
    logger = get_run_logger()
    inputs = {"snapshot": snapshot, "on_duplicate": on_duplicate}
    return build_stage(STAGE, root, inputs,
                       lambda out: download(snapshot, on_duplicate, out, log=logger.warning),
                       force=force)
