"""Where data comes from: one file, a directory or a glob of CSV/Parquet files, over
http(s)://, file://, an object store (s3://, or any other fsspec URL) or a local path.
``list_source`` says which files a source holds now,
in name order; fetching them (with validators, so unchanged files are not downloaded again)
is the download stage's job.
"""

from __future__ import annotations

import fnmatch
import glob
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

SUFFIXES = (".csv", ".parquet", ".pq")


class SourceError(ValueError):
    """A data source that cannot be listed, with what to do."""


@dataclass(frozen=True)
class Located:
    """One file of a source: its name (ordering and versions use it), where to read it (a
    URL or path, for messages and requests) and, for local files, its path."""

    name: str
    location: str
    local: Path | None


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def is_data_file(name: str) -> bool:
    return name.lower().endswith(SUFFIXES) and not name.startswith(".")


def list_source(source: str, timeout_s: float = 30.0) -> list[Located]:
    """The CSV/Parquet files ``source`` names, sorted by name. A directory (or a URL ending
    in ``/``, listed from its HTML index) means every data file directly in it; a glob
    (``sales/*.csv``) the files matching it; anything else one file."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("http", "https"):
        found = _list_http(source, parsed, timeout_s)
    elif parsed.scheme == "file":
        found = _list_local(urllib.request.url2pathname(parsed.path), source)
    elif parsed.scheme and len(parsed.scheme) > 1:
        found = _list_store(source)
    else:
        found = _list_local(source, source)
    if not found:
        raise SourceError(f"no CSV or Parquet files in {source}; check the path or pattern")
    names = [f.name for f in found]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SourceError(f"{source} matches several files named {dupes[0]}; file names "
                          "order and version the data, so they must be unique")
    return sorted(found, key=lambda f: f.name)


def _list_local(text: str, source: str) -> list[Located]:
    path = Path(text).expanduser()
    if _has_glob(text):
        paths = [Path(p) for p in glob.glob(str(path))]
        return [Located(p.name, str(p), p) for p in paths if p.is_file() and is_data_file(p.name)]
    if path.is_dir():
        return [Located(p.name, str(p), p) for p in path.iterdir()
                if p.is_file() and is_data_file(p.name)]
    if path.is_file():
        return [Located(path.name, str(path), path)]
    raise SourceError(f"data source {source} does not exist; check the path")


def _list_store(source: str) -> list[Located]:
    """The files of an object-store source (a prefix ending in ``/``, a glob, or one key)."""
    from tasks.storage.store import StoreError, describe, filesystem

    try:
        fs, path = filesystem(source)
    except StoreError as exc:
        raise SourceError(f"unsupported data source {source}: {exc}; use http(s)://, "
                          "file://, s3://, a path, a directory or a glob") from None
    protocol = source.split("://", 1)[0]
    try:
        if _has_glob(path.rsplit("/", 1)[-1]):
            keys = fs.glob(path)
        elif source.endswith("/") or fs.isdir(path):
            keys = [k for k in fs.ls(path, detail=False, refresh=True) if fs.isfile(k)]
        elif fs.isfile(path):
            keys = [path]
        else:
            raise SourceError(f"data source {source} does not exist; check the bucket and key")
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - botocore's errors are many
        raise SourceError(describe(exc, source, what="data source",
                                   option="the source")) from None
    names = [(k.rsplit("/", 1)[-1], k) for k in keys]
    return [Located(n, f"{protocol}://{k}", None) for n, k in names if is_data_file(n)]


_HREF = re.compile(r"""href\s*=\s*["']([^"'#?]+)["']""", re.IGNORECASE)


def _list_http(source: str, parsed: urllib.parse.ParseResult,
               timeout_s: float) -> list[Located]:
    last = parsed.path.rsplit("/", 1)[-1]
    if not (parsed.path.endswith("/") or _has_glob(last)):
        return [Located(urllib.parse.unquote(last), source, None)]
    base = source if parsed.path.endswith("/") else source[: len(source) - len(last)]
    pattern = urllib.parse.unquote(last) if _has_glob(last) else "*"
    try:
        with urllib.request.urlopen(base, timeout=timeout_s) as resp:
            page = resp.read().decode("utf-8", "replace")
    except OSError as exc:
        raise SourceError(f"cannot list {base} ({exc}); a URL directory needs an HTML "
                          "index page, or name the files") from None
    found = {}
    for href in _HREF.findall(page):
        url = urllib.parse.urljoin(base, href)
        if not url.startswith(base):
            continue  # parent directories, other sites
        name = urllib.parse.unquote(url[len(base):])
        if "/" not in name and is_data_file(name) and fnmatch.fnmatch(name, pattern):
            found[name] = Located(name, url, None)
    return list(found.values())
