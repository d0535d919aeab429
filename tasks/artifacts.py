"""Versioned, atomically written stage artifacts: ``<root>/<stage>/<version>/manifest.json``.

A version directory only ever appears by ``os.rename`` of a finished temporary directory whose
manifest (written last) lists the SHA-256 of every file. So a directory without a manifest, or
whose files no longer match it, was never complete or was damaged later: it is not used, and
the next build replaces it.

The root may also be an object store URL (``s3://bucket/prefix``): the same functions then
go through ``tasks.store.ObjectStore`` (files first, manifest last, one conditional PUT), and
a reference's ``path`` is a verified local copy. Stages never know which.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from tasks.store import (
    MANIFEST,
    StoreError,
    canonical,
    is_url,
    object_store,
    safe_relative,
    sha256_file,
)

_TMP_PREFIX = ".tmp-"


class ArtifactError(RuntimeError):
    """A stage artifact is missing, incomplete or damaged."""


class ArtifactRef(BaseModel):
    """The small reference stages hand each other instead of data."""

    model_config = ConfigDict(frozen=True)

    root: str
    stage: str
    version: str

    @field_validator("root", mode="before")
    @classmethod
    def _canonical(cls, root: str | Path) -> str:
        return canonical(root)  # one spelling per root: a folder's absolute path, or a URL

    @field_validator("stage", "version")
    @classmethod
    def _one_name(cls, name: str) -> str:
        # Versions come from pointers, histories, records and the command line: one plain
        # name each, never a path that leaves the root.
        if not safe_relative(name) or "/" in name:
            raise ValueError(f"{name!r} is not a stage or version name")
        return name

    @property
    def remote(self) -> bool:
        return is_url(self.root)

    @property
    def location(self) -> str:
        """Where the version lives, as a person would look for it (a folder or a URL)."""
        return f"{self.root}/{self.stage}/{self.version}"

    @property
    def path(self) -> Path:
        """The version's folder: the folder itself under a local root; under an object store,
        this machine's copy, downloaded and checked against the manifest on first use."""
        if not self.remote:
            return Path(self.root) / self.stage / self.version
        key = (self.root, self.stage, self.version)
        if key not in _LOCAL_COPIES:
            problems, local = _store(self.root).verify(self.stage, self.version)
            if problems:
                raise ArtifactError(f"artifact {self.stage}/{self.version} is not usable "
                                    f"({problems[0]}); rerun the pipeline to rebuild it")
            _LOCAL_COPIES[key] = local
        return _LOCAL_COPIES[key]

    def file(self, name: str) -> Path:
        return self.path / name

    def manifest(self) -> dict[str, Any]:
        if not self.remote:
            return read_manifest(self.path)
        try:
            manifest = _store(self.root).read_manifest(self.stage, self.version)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"unreadable manifest of {self.root}/{self.stage}/"
                                f"{self.version}: {exc}") from None
        if manifest is None:
            raise ArtifactError(f"no manifest in {self.root}/{self.stage}/{self.version}: "
                                "the artifact is incomplete")
        return manifest


# Local copies of object-store versions this process has verified (a version's content never
# changes under its name except by a forced rebuild, which drops the entry).
_LOCAL_COPIES: dict[tuple[str, str, str], Path] = {}


def _store(root: str):
    try:
        return object_store(root)
    except StoreError as exc:
        raise ArtifactError(str(exc)) from None


def read_manifest(path: Path, opener=None) -> dict[str, Any]:
    try:
        with open(path / MANIFEST if opener is None else MANIFEST, opener=opener) as fh:
            return json.loads(fh.read())
    except FileNotFoundError:
        raise ArtifactError(f"no manifest in {path}: the artifact is incomplete") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"unreadable manifest in {path}: {exc}") from None


def verify(path: Path | ArtifactRef, attempts: int = 20) -> list[str]:
    """Problems with the artifact at ``path`` (empty when it is complete and intact). Read
    through one handle on the directory, so a version replaced meanwhile (swapped in whole,
    see ``_publish``) is checked as one version, never half old and half new; when the one
    checked was replaced (and is being removed) while it was read, the new one is checked
    (again and again while rebuilds keep swapping: each swap means a newer complete version
    is there; ``attempts`` bounds it)."""
    if isinstance(path, ArtifactRef):
        if path.remote:
            return _store(path.root).verify(path.stage, path.version, attempts)[0]
        path = path.path
    while True:
        problems, replaced = _verify_once(path)
        attempts -= 1
        if not problems or not replaced or attempts == 0:
            return problems


def _verify_once(path: Path) -> tuple[list[str], bool]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return [f"{path} does not exist"], False
    try:
        def opener(name: str, flags: int) -> int:
            return os.open(name, flags, dir_fd=fd)

        problems = []
        try:
            manifest = read_manifest(path, opener)
        except ArtifactError as exc:
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


def is_complete(ref: ArtifactRef) -> bool:
    return not verify(ref)


def require(ref: ArtifactRef) -> ArtifactRef:
    """Return ``ref`` if its artifact is intact, else raise a one-line ArtifactError."""
    problems = verify(ref)
    if problems:
        raise ArtifactError(
            f"artifact {ref.stage}/{ref.version} is not usable ({problems[0]}); "
            "rerun the pipeline to rebuild it"
        )
    return ref


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# A temporary file or directory is named ``.tmp-<name>-<host>~<pid>-<nonce>``: its owner is a
# process on a host, so a process on another host sharing the storage never takes a live
# writer's work for a dead one's; those are left for a lease (their age) to expire.
_HOST = socket.gethostname().replace("-", "_").replace("~", "_") or "host"
TMP_LEASE_S = 6 * 3600


def tmp_name(name: str) -> str:
    """A temporary name for ``name`` owned by this process on this host."""
    return f"{_TMP_PREFIX}{name}-{owner()}"


def owner() -> str:
    """This process on this host, and a nonce: ``<host>~<pid>-<nonce>``."""
    return f"{_HOST}~{os.getpid()}-{uuid.uuid4().hex[:8]}"


def owner_gone(name: str, age: Callable[[], float]) -> bool:
    """Whether the owner of ``name`` (``...-<host>~<pid>-<nonce>``) is gone: a dead process
    of this host (a bare pid: a name from before hosts were recorded), or, of another host,
    older (``age()`` seconds) than the lease."""
    try:
        owner = name.rsplit("-", 2)[1]
    except IndexError:
        return False
    host, _, pid = owner.rpartition("~")
    if host in ("", _HOST):
        try:
            return not _pid_alive(int(pid))
        except ValueError:
            return False
    with contextlib.suppress(OSError):
        return age() > TMP_LEASE_S
    return False


def _abandoned(tmp: Path) -> bool:
    return owner_gone(tmp.name, lambda: time.time() - tmp.lstat().st_mtime)


def remove_abandoned(folder: Path) -> None:
    """Remove every abandoned temporary entry of ``folder`` (any version's, LATEST's,
    a name alias's), not only those of the version being built."""
    for tmp in folder.glob(f"{_TMP_PREFIX}*"):
        if _abandoned(tmp):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def build(
    root: str | Path,
    stage: str,
    version: str,
    write: Callable[[Path], dict[str, Any] | None],
    *,
    parameters: dict[str, Any],
    upstream: dict[str, Any],
    code_version: str,
    force: bool = False,
) -> ArtifactRef:
    """Build ``<root>/<stage>/<version>`` by calling ``write(tmp_dir)`` unless it is complete.

    ``write`` fills the directory and may return metrics for the manifest. Any exception
    removes the temporary directory and leaves existing versions untouched.
    """
    ref = ArtifactRef(root=str(root), stage=stage, version=version)
    if is_complete(ref) and not force:
        return ref
    me = owner()
    if ref.remote:
        tmp = _store(ref.root).staging(f"{_TMP_PREFIX}{version}-{me}")
    else:
        stage_dir = ref.path.parent
        stage_dir.mkdir(parents=True, exist_ok=True)
        remove_abandoned(stage_dir)
        tmp = stage_dir / f"{_TMP_PREFIX}{version}-{me}"
        tmp.mkdir()
    try:
        metrics = write(tmp) or {}
        files = {
            p.relative_to(tmp).as_posix(): sha256_file(p)
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        manifest = {
            "stage": stage,
            "version": version,
            "parameters": parameters,
            "upstream": upstream,
            "code_version": code_version,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "files": files,
            "metrics": metrics,
        }
        if ref.remote:
            _LOCAL_COPIES.pop((ref.root, stage, version), None)
            _store(ref.root).publish(tmp, stage, version, manifest, replace=force, owner=me)
        else:
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            _publish(tmp, ref.path, replace=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return require(ref)


def _publish(tmp: Path, final: Path, replace: bool = False) -> None:
    """Move a finished ``tmp`` into place. Replacing an old version (a damaged one, or any
    with ``replace``), the new one goes in first: the two are swapped in one atomic step
    (Linux ``renameat2(RENAME_EXCHANGE)``), so a reader always finds a complete version and
    a crash at any point leaves one; only then is the old one removed. Where the system has
    no such swap, the old one is moved aside, the new one renamed in, and only then the old
    one deleted."""
    if final.exists():
        if not replace and not verify(final):
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
        if verify(final):
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


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file, then rename): a reader never sees half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def latest_pointer(root: str | Path, stage: str) -> Path:
    return Path(root) / stage / "LATEST"


def set_latest(ref: ArtifactRef) -> None:
    """Point ``<root>/<stage>/LATEST`` at ``ref`` (atomic replace; one PUT in a store)."""
    if ref.remote:
        _store(ref.root).write_bytes((ref.version + "\n").encode(), ref.stage, "LATEST")
        return
    pointer = latest_pointer(ref.root, ref.stage)
    tmp = pointer.with_name(tmp_name("LATEST"))
    tmp.write_text(ref.version + "\n")
    os.replace(tmp, pointer)


BY_NAME = "by-name"


def link_name(ref: ArtifactRef, name: str) -> None:
    """``<root>/by-name/<stage>/<name>``: a relative symlink to ``ref``'s folder, so a person
    finds a candidate's latest built artifact without opening every manifest (outside the
    stage's folder, which holds versions only; replaced atomically; skipped where the file
    system has no symlinks, and in object stores, which have none)."""
    if ref.remote:
        return
    alias_dir = Path(ref.root) / BY_NAME / ref.stage
    with contextlib.suppress(OSError):
        alias_dir.mkdir(parents=True, exist_ok=True)
        tmp = alias_dir / tmp_name(name)
        tmp.symlink_to(Path("..") / ".." / ref.stage / ref.version)
        os.replace(tmp, alias_dir / name)


def resolve(root: str | Path, stage: str, version: str | None = None) -> ArtifactRef:
    """The ref for ``version`` of ``stage`` (LATEST when None; ``production``: the production
    model, for select), checked to be intact."""
    root = canonical(root)
    if version == "production":
        current = read_production(root)
        if current is None:
            raise ArtifactError(f"no production model under {root}: run 'houseprice run' "
                                "(its first healthy model is promoted) or pass --model VERSION")
        version = current["model"]
    if version in (None, "latest"):
        pointer = read_text(root, stage, "LATEST")
        if pointer is None:
            raise ArtifactError(
                f"no {stage} artifact under {root}: run 'houseprice run' first "
                "or pass --artifacts"
            )
        version = pointer.strip()
        if not safe_relative(version) or "/" in version:
            raise ArtifactError(f"{root}/{stage}/LATEST names {version[:40]!r}, not a "
                                "version; run 'houseprice check' and 'houseprice run'")
    elif version not in list_versions(root, stage):
        version = _match_version(root, stage, version)
    return require(ArtifactRef(root=root, stage=stage, version=version))


def read_text(root: str, *parts: str) -> str | None:
    """A small object of the root (a pointer), or None if there is none."""
    if is_url(root):
        data = _store(canonical(root)).read_bytes(*parts)
        return None if data is None else data.decode()
    try:
        return Path(root, *parts).read_text()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def list_versions(root: str, stage: str) -> list[str]:
    """The version names of ``stage`` (complete or not), sorted."""
    if is_url(root):
        return _store(canonical(root)).versions(stage)
    stage_dir = Path(root) / stage
    return sorted(p.name for p in stage_dir.iterdir()
                  if p.is_dir() and not p.name.startswith(".")) if stage_dir.is_dir() else []


def manifests(root: str, stage: str) -> list[tuple[ArtifactRef, dict[str, Any]]]:
    """(ref, manifest) of every intact version of ``stage``."""
    found = []
    for version in list_versions(root, stage):
        ref = ArtifactRef(root=root, stage=stage, version=version)
        if verify(ref):
            continue
        with contextlib.suppress(ArtifactError):
            found.append((ref, ref.manifest()))
    return found


def _match_version(root: str, stage: str, given: str) -> str:
    """The one existing version of ``stage`` that starts with ``given`` (a prefix, as with
    git); else a one-line error that lists what there is."""
    import difflib

    versions = list_versions(root, stage)
    matches = [v for v in versions if v.startswith(given)] if given else []
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ArtifactError(f"{stage} version '{given}' is ambiguous under {root}: it starts "
                            f"{', '.join(matches)}; give more characters")
    if not versions:
        raise ArtifactError(f"no {stage} artifact under {root}: run 'houseprice run' first "
                            "or pass --artifacts")
    near = difflib.get_close_matches(given, versions, n=3, cutoff=0.0)
    raise ArtifactError(f"no {stage} version '{given}' under {root}; nearest: "
                        f"{', '.join(near)} ('houseprice models' lists them all)")


# The production model. One truth: the append-only history of every decision
# (``production/history.jsonl``) is the log, and production is what replaying it gives, a
# stack (a promotion pushes its model, a rollback pops one). ``production/CURRENT`` is that
# replay's top, written after the history line, for people and scripts to read; a crash
# between the two leaves a stale CURRENT that readers never trust (``read_production``
# replays the history) and ``houseprice check`` reports. A lock serializes whoever
# reads-compares-writes them (gates of concurrent runs, ``promote`` and ``rollback``).
PRODUCTION = "production"
_CURRENT_FIELDS = ("model", "predictions", "data_version", "time", "reason")


def production_dir(root: str | Path) -> Path:
    return Path(root) / PRODUCTION


def production_stack(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The models that were production, oldest first, as the history's replay leaves them:
    each promotion pushes its model (unless it is on top already), each rollback pops the top
    one. The last item is production (as the CURRENT pointer holds it)."""
    stack: list[dict[str, Any]] = []
    for entry in history:
        if entry.get("action") == "rollback":
            if stack:
                stack.pop()
            if stack and stack[-1]["model"] == entry.get("model"):
                stack[-1] = {**stack[-1], "time": entry.get("time"),
                             "reason": entry.get("reason")}
        elif entry.get("promoted") and isinstance(entry.get("model"), str):
            current = {k: entry.get(k) for k in _CURRENT_FIELDS}
            if stack and stack[-1]["model"] == entry["model"]:
                stack[-1] = current
            else:
                stack.append(current)
    return stack


def read_production(root: str | Path) -> dict[str, Any] | None:
    """The production pointer (model version, predictions version, data version, when), or
    None before the first promotion: the history's replay; a root whose history is empty
    (made before there was one) falls back to its CURRENT file."""
    stack = production_stack(read_history(root))
    if stack:
        return stack[-1]
    path = f"{canonical(root)}/{PRODUCTION}/CURRENT"
    text = read_text(root, PRODUCTION, "CURRENT")
    if text is None:
        return None
    try:
        current = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"unreadable production pointer {path}: {exc}; restore it with "
                            "'houseprice promote VERSION'") from None
    if not isinstance(current, dict) or not isinstance(current.get("model"), str):
        raise ArtifactError(f"unreadable production pointer {path}: no model named; "
                            "restore it with 'houseprice promote VERSION'")
    return current


def read_pointer(root: str | Path) -> dict[str, Any] | None:
    """The CURRENT file as written (None if absent or unreadable): what ``check`` compares
    with the history's replay."""
    text = read_text(root, PRODUCTION, "CURRENT")
    try:
        current = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        return None
    return current if isinstance(current, dict) else None


@contextlib.contextmanager
def production_lock(root: str | Path):
    """An exclusive lock on the root's production pointer and history (blocks until free):
    a file lock, or in an object store a lock object (see ``ObjectStore.lock``)."""
    import fcntl

    if is_url(root):
        with _store(canonical(root)).lock(PRODUCTION, ".lock"):
            yield
        return

    folder = production_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_history(root: str | Path, problems: list[str] | None = None) -> list[dict[str, Any]]:
    """The history's entries. A line that is not a JSON object (a torn append: a crash
    mid-write) is no decision: skipped, and named in ``problems`` when given."""
    text = read_text(root, PRODUCTION, "history.jsonl") or ""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if isinstance(entry, dict):
            entries.append(entry)
        elif problems is not None:
            problems.append(f"{canonical(root)}/{PRODUCTION}/history.jsonl line {number} "
                            "is not a JSON object (a torn write?): ignored")
    return entries


def record(root: str | Path, entry: dict[str, Any], promote: bool) -> None:
    """Append ``entry`` to the history (the commit) and, if ``promote``, rewrite CURRENT from
    the history's replay. Hold the lock."""
    entry = {"time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **entry,
             "promoted": promote}
    line = json.dumps(entry, sort_keys=True) + "\n"
    if is_url(root):  # no appends in an object store: the lock holder rewrites the history
        store = _store(canonical(root))
        old = store.read_bytes(PRODUCTION, "history.jsonl") or b""
        if old and not old.endswith(b"\n"):
            old += b"\n"  # after a torn line, not glued to it
        store.write_bytes(old + line.encode(), PRODUCTION, "history.jsonl")
    else:
        folder = production_dir(root)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "history.jsonl", "a+b") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell():
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
            fh.write(line.encode())
            fh.flush()
            os.fsync(fh.fileno())
    if promote or entry.get("action") == "rollback":
        write_pointer(root)


def write_pointer(root: str | Path) -> None:
    """Rewrite CURRENT as the history's replay has it (hold the lock)."""
    stack = production_stack(read_history(root))
    if not stack:
        return
    data = json.dumps(stack[-1], indent=2, sort_keys=True)
    if is_url(root):
        _store(canonical(root)).write_bytes(data.encode(), PRODUCTION, "CURRENT")
    else:
        write_json(production_dir(root) / "CURRENT", stack[-1])
