"""Stage 1, download: fetch the raw CSVs into a verified cache, then into a versioned artifact."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from prefect import get_run_logger, task

from tasks.artifacts import ArtifactRef
from tasks.config import DataConfig, RemoteFile
from tasks.stage import build_stage, one_line, stage_task_options

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
    if parsed.scheme and len(parsed.scheme) > 1:
        raise DownloadError(
            f"unsupported data URL scheme '{parsed.scheme}' in {base}; "
            "use http(s)://, file:// or a directory"
        )
    path = Path(base).expanduser() / name
    return str(path), path


def _fetch_once(location: str, local: Path | None, dest: Path, timeout_s: float) -> None:
    if local is not None:
        if not local.is_file():
            raise FileNotFoundError(f"no such file {local}")
        shutil.copyfile(local, dest)
        return
    with urllib.request.urlopen(location, timeout=timeout_s) as resp, open(dest, "wb") as out:
        expected = resp.headers.get("Content-Length")
        received = 0
        while block := resp.read(1 << 16):
            out.write(block)
            received += len(block)
    if expected is not None and received != int(expected):
        raise ConnectionError(f"body cut off after {received} of {expected} bytes")


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


def fetch(
    file: RemoteFile,
    base_url: str,
    cache_dir: Path,
    *,
    timeout_s: float = 30.0,
    retries: int = 3,
    backoff_s: float = 1.0,
    log=print,
) -> Path:
    """Return ``cache_dir/file.name`` with a verified SHA-1, fetching it only if needed.

    Transient failures are retried with exponential backoff; a hash mismatch is not (the
    source serves the wrong bytes) and leaves nothing in the cache.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / file.name
    if target.is_file():
        if sha1_file(target) == file.sha1:
            return target
        log(f"cached {target} does not match its SHA-1; fetching it again")
        target.unlink()
    location, local = _source(base_url, file.name)
    tmp = cache_dir / f".{file.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
    try:
        for attempt in range(retries + 1):
            try:
                _fetch_once(location, local, tmp, timeout_s)
                break
            except urllib.error.HTTPError as exc:
                # A 4xx other than 408/429 will not get better by asking again.
                if 400 <= exc.code < 500 and exc.code not in (408, 429) or attempt == retries:
                    raise DownloadError(
                        f"could not download {location}: {_describe(exc)}; check --data-url"
                    ) from None
                cause = exc
            except FileNotFoundError as exc:
                raise DownloadError(
                    f"could not read {location}: {_describe(exc)}; check --data-url"
                ) from None
            except (OSError, ConnectionError, http.client.HTTPException) as exc:
                # HTTPException: e.g. IncompleteRead, a body cut off mid-way.
                if attempt == retries:
                    raise DownloadError(
                        f"could not download {location} after {retries + 1} attempts: "
                        f"{_describe(exc)}; check the network or use a mirror (--data-url)"
                    ) from None
                cause = exc
            delay = backoff_s * 2**attempt
            log(f"fetching {location} failed ({_describe(cause)}); retry in {delay:.1f}s")
            time.sleep(delay)
        actual = sha1_file(tmp)
        if actual != file.sha1:
            raise DownloadError(
                f"{file.name} from {location} has SHA-1 {actual}, expected {file.sha1}; "
                "the source serves different bytes: check --data-url"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def download(data: DataConfig, out_dir: Path, log=print) -> dict[str, object]:
    """Fetch every registry file (verified) into ``out_dir``; return their SHA-1s."""
    cache = Path(data.cache_dir)
    for role, file in data.files.items():
        cached = fetch(
            file, data.url, cache,
            timeout_s=data.timeout_s, retries=data.retries, backoff_s=data.backoff_s, log=log,
        )
        shutil.copyfile(cached, out_dir / f"{role}.csv")
    return {"sha1": {role: f.sha1 for role, f in data.files.items()}, "source": data.url}


@task(**stage_task_options(STAGE))
def download_task(data: DataConfig, root: str, force: bool = False) -> ArtifactRef:
    """Fetch the train/test CSVs (SHA-1 verified) into a download artifact."""
    logger = get_run_logger()
    return build_stage(STAGE, root, {"data": data},
                       lambda out: download(data, out, log=logger.warning), force=force)
