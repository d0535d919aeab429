"""Where artifacts live: a local folder, or an object store behind an fsspec URL
(``s3://bucket/prefix``, ``gs://...``), one interface, chosen by the root's scheme.

Both keep the same layout (``<root>/<stage>/<version>/manifest.json`` beside pointers such as
``<stage>/LATEST`` and ``production/CURRENT``) and the same rule: a version is complete only
when its manifest, written last with every file's SHA-256, is there and matches.

- ``LocalStore``: a version appears by renaming a finished temporary folder (swapped in
  atomically over an old one when rebuilt).
- ``ObjectStore``: objects cannot be renamed, so a version's files are uploaded under an
  attempt prefix of their own (``<version>/data-<host>~<pid>-<nonce>/``) and the manifest,
  naming that prefix, is put last: one PUT, atomic. It is put only if absent (``If-None-Match:
  *``), so of two writers racing on one version the first manifest wins and the loser deletes
  its own files; nobody ever overwrites files a manifest names, so no version is torn. A
  forced rebuild puts its manifest over the old one and only then deletes the old files. Stages
  read a version through a local copy (``HOUSEPRICE_CACHE``, default ``~/.cache/houseprice``),
  downloaded once, hash-checked against the manifest, and re-checked against the store's
  object ETags on every use (one LIST), so an object overwritten in the bucket is noticed.

Both offer the same small set of operations, which is all ``tasks.storage.artifacts`` speaks: small
objects (``read_bytes``, ``write_bytes``, ``append``, ``children``), versions (``versions``,
``read_manifest``, ``verify``, ``staging`` then ``publish``, ``version_dir``, ``alias``), an
exclusive ``lock`` and a ``check`` of the store itself. ``open_store(root)`` chooses one, once
per root, from its spelling: a path or ``file://`` URL is a ``LocalStore``, any other URL an
``ObjectStore``.

Credentials and endpoint come from the standard AWS variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for MinIO or another S3-compatible store), as
fsspec and botocore read them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

MANIFEST = "manifest.json"
LOCK_LEASE_S = 120.0  # a lock object older than this was left by a writer that died


class StoreError(RuntimeError):
    """The artifact store cannot be used (missing bucket, refused credentials, unreachable)."""


def is_url(root: str | Path) -> bool:
    text = str(root)
    return "://" in text and not text.startswith("file://")


def canonical(root: str | Path) -> str:
    """One spelling per root: an absolute path for a folder (``file://`` URLs included), the
    URL without a trailing slash for an object store."""
    text = str(root)
    if text.startswith("file://"):
        import urllib.parse
        import urllib.request

        text = urllib.request.url2pathname(urllib.parse.urlparse(text).path)
    if is_url(text):
        return text.rstrip("/")
    return str(Path(text).expanduser().resolve())


def root_key(root: str | Path) -> str:
    """8 hex digits naming an artifact root in cache keys (a copied root is another key)."""
    return hashlib.sha256(canonical(root).encode()).hexdigest()[:8]


# A name a manifest, pointer or record hands in (a version, an attempt prefix, a file inside
# a version): relative, no empty, '.' or '..' part, no backslash or NUL. Checked before it
# becomes a key or a local path, so a planted manifest cannot reach outside its root or
# this machine's cache.
_SAFE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.~=+@-]*")


def safe_relative(name: object) -> bool:
    """Whether ``name`` is a relative path that stays inside the folder it is joined to."""
    return isinstance(name, str) and bool(name) and all(
        _SAFE_PART.fullmatch(part) for part in name.split("/"))


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (resolved, links followed) lies inside ``folder``."""
    return path.resolve().is_relative_to(folder.resolve())


def cache_home() -> Path:
    return Path(os.environ.get("HOUSEPRICE_CACHE") or Path.home() / ".cache" / "houseprice")


def local_cache(root: str) -> Path:
    """This machine's folder for copies of (and temporary files for) ``root``'s objects."""
    return cache_home() / "stores" / hashlib.sha256(root.encode()).hexdigest()[:12]


def sha256_file(path: Path, chunk: int = 1 << 20, opener=None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", opener=opener) as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --- who owns a temporary -----------------------------------------------------------------

# A temporary file or directory is named ``.tmp-<name>-<host>~<pid>-<nonce>`` (an object
# store's attempt prefix ``data-<host>~<pid>-<nonce>``): its owner is a process on a host, so
# a process on another host sharing the storage never takes a live writer's work for a dead
# one's; those are left for a lease (their age) to expire.
TMP_PREFIX = ".tmp-"
_HOST = socket.gethostname().replace("-", "_").replace("~", "_") or "host"
TMP_LEASE_S = 6 * 3600


def owner() -> str:
    """This process on this host, and a nonce: ``<host>~<pid>-<nonce>``."""
    return f"{_HOST}~{os.getpid()}-{uuid.uuid4().hex[:8]}"


def tmp_name(name: str) -> str:
    """A temporary name for ``name`` owned by this process on this host."""
    return f"{TMP_PREFIX}{name}-{owner()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_gone(name: str, age: Callable[[], float]) -> bool:
    """Whether the owner of ``name`` (``...-<host>~<pid>-<nonce>``) is gone: a dead process
    of this host (a bare pid: a name from before hosts were recorded), or, of another host,
    older (``age()`` seconds) than the lease."""
    try:
        who = name.rsplit("-", 2)[1]
    except IndexError:
        return False
    host, _, pid = who.rpartition("~")
    if host in ("", _HOST):
        try:
            return not _pid_alive(int(pid))
        except ValueError:
            return False
    with contextlib.suppress(OSError):
        return age() > TMP_LEASE_S
    return False


def _fresh_folder(parent: Path, name: str) -> Path:
    """``parent/name``, made new, after sweeping ``parent`` of abandoned temporaries."""
    parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(parent)
    (parent / name).mkdir()
    return parent / name


def remove_abandoned(folder: Path) -> None:
    """Remove every abandoned temporary entry of ``folder`` (any version's, LATEST's,
    a name alias's), not only those of the version being built."""
    for tmp in folder.glob(f"{TMP_PREFIX}*"):
        if owner_gone(tmp.name, lambda tmp=tmp: time.time() - tmp.lstat().st_mtime):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


# Per protocol: fail fast on an unreachable store (botocore's default retries take a while),
# and never answer a listing from fsspec's cache (another process may have written since).
_OPTIONS: dict[str, dict[str, Any]] = {
    "s3": {"config_kwargs": {"connect_timeout": 5, "read_timeout": 60,
                             "retries": {"max_attempts": 3, "mode": "standard"}}},
}


def filesystem(url: str, quick: bool = False):
    """The fsspec file system for ``url`` and the path inside it; ``quick``: a separate one
    that gives up after two tries (s3fs alone retries 5 times, each with botocore's own
    retries: about 12 s to say an endpoint is down)."""
    import fsspec

    protocol = url.split("://", 1)[0]
    options = dict(_OPTIONS.get(protocol, {}))
    if quick and protocol == "s3":
        options["config_kwargs"] = {**options["config_kwargs"],
                                    "retries": {"max_attempts": 2, "mode": "standard"}}
    try:
        fs = fsspec.filesystem(protocol, use_listings_cache=False,
                               skip_instance_cache=quick, **options)
        if quick and hasattr(fs, "retries"):
            fs.retries = 2
    except (ImportError, ValueError) as exc:
        raise StoreError(f"artifact store {url}: no file system for '{protocol}://' "
                         f"({exc}); use a path, s3:// (installed) or install its fsspec "
                         "package") from None
    return fs, fs._strip_protocol(url)


def describe(exc: BaseException, url: str, what: str = "artifact store",
             option: str = "--artifacts") -> str:
    """One line saying what is wrong with the ``what`` at ``url`` (given by ``option``) and
    what to do."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    name = type(exc).__name__
    if isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text or "does not exist" in text:
        return (f"{what} {url}: the bucket does not exist ({text}); create it or fix "
                f"{option}")
    if isinstance(exc, PermissionError) or any(w in text for w in (
            "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "credentials",
            "Forbidden")):
        return (f"{what} {url}: access refused ({text}); check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or the profile) for this bucket")
    return (f"{what} {url} is unreachable ({name}: {text}); check AWS_ENDPOINT_URL "
            "and the network")


class Store(Protocol):
    """What ``tasks.storage.artifacts`` may ask of a store; ``parts`` are path parts under the root,
    each checked by the caller (``safe_relative``) when it came from outside."""

    root: str
    remote: bool

    def read_bytes(self, *parts: str) -> bytes | None: ...
    def write_bytes(self, data: bytes, *parts: str, create: bool = False) -> bool: ...
    def append(self, data: bytes, *parts: str) -> None: ...
    def children(self, *parts: str, folders: bool = False) -> list[str]: ...
    def versions(self, stage: str) -> list[str]: ...
    def read_manifest(self, stage: str, version: str) -> dict[str, Any] | None: ...
    def verify(self, stage: str, version: str, attempts: int = 20
               ) -> tuple[list[str], Path | None]: ...
    def version_dir(self, stage: str, version: str) -> Path: ...
    def staging(self, stage: str, name: str) -> Path: ...
    def publish(self, tmp: Path, stage: str, version: str, manifest: dict[str, Any],
                replace: bool, owner: str) -> None: ...
    def alias(self, stage: str, version: str, name: str) -> None: ...
    def lock(self, *parts: str) -> contextlib.AbstractContextManager[None]: ...
    def check(self) -> None: ...


BY_NAME = "by-name"


class LocalStore:
    """Artifacts in a folder: a version appears by renaming its finished temporary folder."""

    remote = False

    def __init__(self, root: str):
        self.root = root
        self.base = Path(root)

    def path(self, *parts: str) -> Path:
        return self.base.joinpath(*parts)

    # -- plain objects ---------------------------------------------------------------------
    def read_bytes(self, *parts: str) -> bytes | None:
        try:
            return self.path(*parts).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def write_bytes(self, data: bytes, *parts: str, create: bool = False) -> bool:
        """Replace one file atomically (temp file, then rename); ``create``: only if absent,
        False when it was there already."""
        path = self.path(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        if create:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return True
        tmp = path.with_name(tmp_name(path.name))
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def append(self, data: bytes, *parts: str) -> None:
        """Append ``data`` (a line) durably, on a line of its own after a torn one."""
        path = self.path(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell():
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    def children(self, *parts: str, folders: bool = False) -> list[str]:
        folder = self.path(*parts)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if not folders or p.is_dir())

    def check(self) -> None:
        """A folder is created on first use: nothing to check before."""

    # -- versions --------------------------------------------------------------------------
    def versions(self, stage: str) -> list[str]:
        return [n for n in self.children(stage, folders=True) if not n.startswith(".")]

    def read_manifest(self, stage: str, version: str) -> dict[str, Any] | None:
        data = self.read_bytes(stage, version, MANIFEST)
        return None if data is None else json.loads(data)

    def version_dir(self, stage: str, version: str) -> Path:
        return self.path(stage, version)

    def verify(self, stage: str, version: str, attempts: int = 20
               ) -> tuple[list[str], Path | None]:
        path = self.path(stage, version)
        problems = verify_dir(path, attempts)
        return problems, None if problems else path

    def staging(self, stage: str, name: str) -> Path:
        """A temporary folder beside the versions, renamed into place when complete; those
        left by dead processes are removed."""
        return _fresh_folder(self.path(stage), name)

    def publish(self, tmp: Path, stage: str, version: str, manifest: dict[str, Any],
                replace: bool, owner: str) -> None:
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _publish(tmp, self.path(stage, version), replace=replace)

    def alias(self, stage: str, version: str, name: str) -> None:
        """``<root>/by-name/<stage>/<name>``: a relative symlink to the version's folder,
        replaced atomically; skipped where the file system has no symlinks."""
        alias_dir = self.path(BY_NAME, stage)
        with contextlib.suppress(OSError):
            alias_dir.mkdir(parents=True, exist_ok=True)
            tmp = alias_dir / tmp_name(name)
            tmp.symlink_to(Path("..") / ".." / stage / version)
            os.replace(tmp, alias_dir / name)

    @contextlib.contextmanager
    def lock(self, *parts: str) -> Iterator[None]:
        """Exclusive, blocking: a file lock (released by the kernel if the holder dies)."""
        import fcntl

        path = self.path(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def read_manifest_at(path: Path, opener=None) -> dict[str, Any]:
    """A version folder's manifest; StoreError (one line) when missing or unreadable."""
    try:
        with open(path / MANIFEST if opener is None else MANIFEST, opener=opener) as fh:
            return json.loads(fh.read())
    except FileNotFoundError:
        raise StoreError(f"no manifest in {path}: the artifact is incomplete") from None
    except json.JSONDecodeError as exc:
        raise StoreError(f"unreadable manifest in {path}: {exc}") from None


def verify_dir(path: Path, attempts: int = 20) -> list[str]:
    """Problems with the version folder ``path`` (empty when complete and intact). Read
    through one handle on the folder, so a version replaced meanwhile (swapped in whole, see
    ``_publish``) is checked as one version, never half old and half new; when the one
    checked was replaced while it was read, the new one is checked (again while rebuilds keep
    swapping: each swap means a newer complete version is there; ``attempts`` bounds it)."""
    while True:
        problems, replaced = _verify_dir_once(path)
        attempts -= 1
        if not problems or not replaced or attempts == 0:
            return problems


def _verify_dir_once(path: Path) -> tuple[list[str], bool]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return [f"{path} does not exist"], False
    try:
        def opener(name: str, flags: int) -> int:
            return os.open(name, flags, dir_fd=fd)

        problems = []
        try:
            manifest = read_manifest_at(path, opener)
        except StoreError as exc:
            manifest, problems = {}, [str(exc)]
        files = manifest.get("files", {}) if isinstance(manifest, dict) else None
        if not isinstance(files, dict):
            files, problems = {}, [f"unreadable manifest in {path}: no files listed"]
        for name, expected in files.items():
            if not safe_relative(name):
                problems.append(f"manifest in {path} names {name!r}, a path outside its "
                                "version")
                continue
            try:
                if sha256_file(name, opener=opener) != expected:
                    problems.append(f"{path / name} does not match its manifest hash")
            except (FileNotFoundError, IsADirectoryError):
                problems.append(f"{path / name} is missing")
        try:
            replaced = os.stat(path).st_ino != os.fstat(fd).st_ino
        except FileNotFoundError:
            replaced = False
        return problems, replaced
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path, replace: bool = False) -> None:
    """Move a finished ``tmp`` into place. Replacing an old version (a damaged one, or any
    with ``replace``), the new one goes in first: the two are swapped in one atomic step
    (Linux ``renameat2(RENAME_EXCHANGE)``), so a reader always finds a complete version and
    a crash at any point leaves one; only then is the old one removed. Where the system has
    no such swap, the old one is moved aside, the new one renamed in, and only then the old
    one deleted."""
    if final.exists():
        if not replace and not verify_dir(final):
            return  # another process finished the same version first: keep theirs
        if _exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old version
            return
        trash = final.parent / tmp_name(f"{final.name}.replaced")
        with contextlib.suppress(FileNotFoundError):
            final.rename(trash)
        try:
            tmp.rename(final)
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        tmp.rename(final)
    except OSError:
        # Lost a race with a concurrent writer of the same version: theirs is as good.
        if verify_dir(final):
            raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2  # noqa: N806 - the kernel's names
    return fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


class ObjectStore:
    """Artifacts in an object store (any fsspec URL), read through a local verified copy."""

    remote = True

    def __init__(self, root: str):
        self.root = root
        self.fs, self.base = filesystem(root)
        self.cache = local_cache(root)
        self._swept: set[str] = set()
        # Local copies this process has verified (a version's content never changes under
        # its name except by a forced rebuild, which drops the entry).
        self._copies: dict[tuple[str, str], Path] = {}

    # -- plain objects ---------------------------------------------------------------------
    def key(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def read_bytes(self, *parts: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.key(*parts))
        except FileNotFoundError:
            return None

    def write_bytes(self, data: bytes, *parts: str, create: bool = False) -> bool:
        """Put one object (one PUT: readers see all of it or the old one). ``create``: only if
        absent; False when it was there already."""
        path = self.key(*parts)
        if not create:
            self.fs.pipe_file(path, data)
            return True
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError):  # a file system without conditional PUT
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, data)
        return True

    def delete(self, *parts: str, recursive: bool = False) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.key(*parts), recursive=recursive)

    def append(self, data: bytes, *parts: str) -> None:
        """No appends in an object store: the object is rewritten (hold the lock), ``data``
        on a line of its own after a torn one."""
        old = self.read_bytes(*parts) or b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        self.write_bytes(old + data, *parts)

    def alias(self, stage: str, version: str, name: str) -> None:
        """Object stores have no links: a candidate's version is found by its manifest."""

    def version_dir(self, stage: str, version: str) -> Path:
        """This machine's copy of the version, downloaded and checked against the manifest
        on first use; StoreError (its first problem) when it is not usable."""
        key = (stage, version)
        if key not in self._copies:
            problems, local = self.verify(stage, version)
            if problems:
                raise StoreError(problems[0])
            self._copies[key] = local
        return self._copies[key]

    def children(self, *parts: str, folders: bool = False) -> list[str]:
        """Names directly under ``parts`` (objects and prefixes)."""
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1]
                          for p in self.fs.ls(self.key(*parts), detail=False, refresh=True))
        except FileNotFoundError:
            return []

    def check(self) -> None:
        """Raise a one-line StoreError unless the store answers and its bucket exists."""
        bucket = self.base.split("/", 1)[0]
        fs, _ = filesystem(self.root, quick=True)
        try:
            fs.ls(bucket, refresh=True)  # its top level only (a delimiter listing)
        except FileNotFoundError:
            raise StoreError(describe(FileNotFoundError(f"no bucket '{bucket}'"),
                                      self.root)) from None
        except Exception as exc:  # noqa: BLE001 - botocore's errors are many
            raise StoreError(describe(exc, self.root)) from None

    # -- versions --------------------------------------------------------------------------
    def read_manifest(self, stage: str, version: str) -> dict[str, Any] | None:
        data = self.read_bytes(stage, version, MANIFEST)
        if data is None:
            return None
        return json.loads(data)

    def versions(self, stage: str) -> list[str]:
        return [n for n in self.children(stage) if not n.startswith(".") and n != "LATEST"]

    def local_dir(self, stage: str, version: str, manifest: dict[str, Any]) -> Path:
        return self.cache / stage / version / manifest.get("prefix", "")

    def verify(self, stage: str, version: str, attempts: int = 20) -> tuple[list[str], Path | None]:
        """(problems, local copy). Every file the manifest names is compared by ETag with
        the copy last verified here; files that differ (or are new here) are downloaded and
        hashed. A version replaced while it was read (a forced rebuild) is read again."""
        while True:
            problems, local, replaced = self._verify_once(stage, version)
            attempts -= 1
            if not problems or not replaced or attempts == 0:
                return problems, local

    def _verify_once(self, stage, version) -> tuple[list[str], Path | None, bool]:
        where = f"{self.root}/{stage}/{version}"
        raw = self.read_bytes(stage, version, MANIFEST)
        if raw is None:
            return [f"no manifest in {where}: the artifact is incomplete"], None, False
        try:
            manifest = json.loads(raw)
        except json.JSONDecodeError as exc:
            return [f"unreadable manifest in {where}: {exc}"], None, False
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
            return [f"unreadable manifest in {where}: not a JSON object of files"], None, False
        prefix = manifest.get("prefix", "")
        unsafe = [n for n in (stage, version, *([prefix] if prefix else []),
                              *manifest.get("files", {})) if not safe_relative(n)]
        if unsafe:
            return [f"manifest in {where} names {unsafe[0]!r}, a path outside its version; "
                    "the artifact is not used"], None, False
        local = self.local_dir(stage, version, manifest)
        if not inside(local, self.cache):
            return [f"manifest in {where} points outside the local cache"], None, False
        local.mkdir(parents=True, exist_ok=True)
        remote = self.key(stage, version, prefix)
        try:
            listing = {p["name"][len(remote) + 1:]: str(p.get("ETag") or p.get("size"))
                       for p in self.fs.find(remote, detail=True, refresh=True).values()}
        except FileNotFoundError:
            listing = {}
        seen_file = local / ".etags.json"
        try:
            seen = json.loads(seen_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            seen = {}
        problems = []
        for name, expected in manifest.get("files", {}).items():
            if name not in listing:
                problems.append(f"{where}/{name} is missing")
                continue
            copy = local / name
            if not inside(copy, local):  # a link planted in the cache
                problems.append(f"{where}/{name} leads outside the local cache")
                continue
            if seen.get(name) == listing[name] and copy.is_file():
                continue
            copy.parent.mkdir(parents=True, exist_ok=True)
            tmp = copy.with_name(f".{copy.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
            try:
                self.fs.get_file(f"{remote}/{name}", str(tmp))
                if sha256_file(tmp) != expected:
                    problems.append(f"{where}/{name} does not match its manifest hash")
                    continue
                os.replace(tmp, copy)
                seen[name] = listing[name]
            except FileNotFoundError:
                problems.append(f"{where}/{name} is missing")
            finally:
                tmp.unlink(missing_ok=True)
        if problems:
            return problems, None, self.read_bytes(stage, version, MANIFEST) != raw
        _write_atomic(seen_file, json.dumps(seen).encode())
        if not (local / MANIFEST).is_file():
            _write_atomic(local / MANIFEST, raw)
        return [], local, False

    def staging(self, stage: str, name: str) -> Path:
        """A local folder to build a version in (its files are uploaded from there); those
        left by dead processes are removed."""
        return _fresh_folder(self.cache / ".staging", name)

    def publish(self, tmp: Path, stage: str, version: str, manifest: dict[str, Any],
                replace: bool, owner: str) -> None:
        """Upload ``tmp``'s files under a fresh attempt prefix, then the manifest naming it."""
        prefix = f"data-{owner}"
        self._copies.pop((stage, version), None)
        self._sweep(stage)
        for path in sorted(tmp.rglob("*")):
            if path.is_file() and path.name != MANIFEST:
                self.fs.put_file(str(path), self.key(stage, version, prefix,
                                                     path.relative_to(tmp).as_posix()))
        data = json.dumps({**manifest, "prefix": prefix}, indent=2, sort_keys=True).encode()
        old = None
        if not replace and self.write_bytes(data, stage, version, MANIFEST, create=True):
            pass  # the first manifest of this version: nothing to replace
        elif not replace and not self.verify(stage, version)[0]:
            # another writer finished the same version first: keep theirs, drop ours
            self.delete(stage, version, prefix, recursive=True)
            return
        else:  # forced, or the version there is damaged: ours goes in, then theirs goes
            old = self.read_manifest_quiet(stage, version)
            self.write_bytes(data, stage, version, MANIFEST)
        if old and old.get("prefix") and old["prefix"] != prefix:
            self.delete(stage, version, old["prefix"], recursive=True)
        self._remove_abandoned(stage, version, keep=prefix)

    def _sweep(self, stage: str) -> None:
        """Once per stage and process: remove the attempt prefixes, of any version, that no
        manifest names and whose writer is gone (a crash before its manifest went in)."""
        if stage in self._swept:
            return
        self._swept.add(stage)
        base = self.key(stage)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return
        manifests, attempts = set(), {}
        for path, info in found.items():
            parts = path[len(base) + 1:].split("/")
            if parts[1:] == [MANIFEST]:
                manifests.add(parts[0])
            elif len(parts) > 2 and parts[1].startswith("data-"):
                stamp = info.get("LastModified")
                attempts.setdefault((parts[0], parts[1]), []).append(
                    stamp.timestamp() if stamp is not None else time.time())
        for (version, name), stamps in attempts.items():
            if version in manifests and (
                    self.read_manifest_quiet(stage, version) or {}).get("prefix") == name:
                continue
            self._drop_if_gone(stage, version, name, lambda s=stamps: time.time() - max(s))

    def _drop_if_gone(self, stage: str, version: str, name: str, age) -> None:
        if owner_gone(name, age):
            self.delete(stage, version, name, recursive=True)

    def read_manifest_quiet(self, stage: str, version: str) -> dict[str, Any] | None:
        try:
            return self.read_manifest(stage, version)
        except json.JSONDecodeError:
            return None

    def _remove_abandoned(self, stage: str, version: str, keep: str) -> None:
        """Attempt prefixes of ``version`` no manifest names, whose writer is gone."""
        for name in self.children(stage, version):
            if name.startswith("data-") and name != keep:
                def age(name=name) -> float:
                    found = self.fs.find(self.key(stage, version, name), detail=True)
                    times = [p.get("LastModified") for p in found.values()]
                    times = [t.timestamp() for t in times if t is not None]
                    return time.time() - max(times) if times else float("inf")

                self._drop_if_gone(stage, version, name, age)

    # -- the production lock ---------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, *parts: str):
        """Exclusive: an object created only if absent; one older than the lease is a dead
        holder's and is taken over."""
        token = json.dumps({"owner": uuid.uuid4().hex, "time": time.time()}).encode()
        while not self.write_bytes(token, *parts, create=True):
            held = self.read_bytes(*parts)
            try:
                since = json.loads(held)["time"] if held else time.time()
            except (ValueError, KeyError, TypeError):
                since = 0.0
            if time.time() - since > LOCK_LEASE_S:
                self.delete(*parts)
                continue
            time.sleep(0.2)
        try:
            yield
        finally:
            if self.read_bytes(*parts) == token:
                self.delete(*parts)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@functools.cache
def store_at(root: str) -> Store:
    """The store of a root already spelled canonically (an ``ArtifactRef``'s): no path
    resolution per call."""
    return ObjectStore(root) if is_url(root) else LocalStore(root)


def open_store(root: str | Path) -> Store:
    """The store of ``root``, chosen once per root from its spelling (see the module)."""
    return store_at(canonical(root))


def check(root: str | Path) -> None:
    """Fail early, in one line, if ``root`` is a store that cannot be used."""
    open_store(root).check()
