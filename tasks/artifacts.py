"""Versioned, atomically written stage artifacts: ``<root>/<stage>/<version>/manifest.json``.

A version directory only ever appears by ``os.rename`` of a finished temporary directory whose
manifest (written last) lists the SHA-256 of every file. So a directory without a manifest, or
whose files no longer match it, was never complete or was damaged later: it is not used, and
the next build replaces it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
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

from pydantic import BaseModel, ConfigDict

MANIFEST = "manifest.json"
_TMP_PREFIX = ".tmp-"


class ArtifactError(RuntimeError):
    """A stage artifact is missing, incomplete or damaged."""


class ArtifactRef(BaseModel):
    """The small reference stages hand each other instead of data."""

    model_config = ConfigDict(frozen=True)

    root: str
    stage: str
    version: str

    @property
    def path(self) -> Path:
        return Path(self.root) / self.stage / self.version

    def file(self, name: str) -> Path:
        return self.path / name

    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.path)


def sha256_file(path: Path, chunk: int = 1 << 20, opener=None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", opener=opener) as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: Path, opener=None) -> dict[str, Any]:
    try:
        with open(path / MANIFEST if opener is None else MANIFEST, opener=opener) as fh:
            return json.loads(fh.read())
    except FileNotFoundError:
        raise ArtifactError(f"no manifest in {path}: the artifact is incomplete") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"unreadable manifest in {path}: {exc}") from None


def verify(path: Path, attempts: int = 3) -> list[str]:
    """Problems with the artifact at ``path`` (empty when it is complete and intact). Read
    through one handle on the directory, so a version replaced meanwhile (swapped in whole,
    see ``_publish``) is checked as one version, never half old and half new; when the one
    checked was replaced (and is being removed) while it was read, the new one is checked."""
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
        for name, expected in manifest.get("files", {}).items():
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
    return not verify(ref.path)


def require(ref: ArtifactRef) -> ArtifactRef:
    """Return ``ref`` if its artifact is intact, else raise a one-line ArtifactError."""
    problems = verify(ref.path)
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
    return f"{_TMP_PREFIX}{name}-{_HOST}~{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _abandoned(tmp: Path) -> bool:
    """Whether ``tmp``'s owner is gone: a dead process of this host (a bare pid: a name from
    before hosts were recorded), or, of another host, older than the lease."""
    try:
        owner = tmp.name.rsplit("-", 2)[1]
    except IndexError:
        return False
    host, _, pid = owner.rpartition("~")
    if host in ("", _HOST):
        try:
            return not _pid_alive(int(pid))
        except ValueError:
            return False
    with contextlib.suppress(OSError):
        return time.time() - tmp.lstat().st_mtime > TMP_LEASE_S
    return False


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
    ref = ArtifactRef(root=str(Path(root).resolve()), stage=stage, version=version)
    if is_complete(ref) and not force:
        return ref
    stage_dir = ref.path.parent
    stage_dir.mkdir(parents=True, exist_ok=True)
    remove_abandoned(stage_dir)
    tmp = stage_dir / tmp_name(version)
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
    """Point ``<root>/<stage>/LATEST`` at ``ref`` (atomic replace)."""
    pointer = latest_pointer(ref.root, ref.stage)
    tmp = pointer.with_name(tmp_name("LATEST"))
    tmp.write_text(ref.version + "\n")
    os.replace(tmp, pointer)


BY_NAME = "by-name"


def link_name(ref: ArtifactRef, name: str) -> None:
    """``<root>/by-name/<stage>/<name>``: a relative symlink to ``ref``'s folder, so a person
    finds a candidate's latest built artifact without opening every manifest (outside the
    stage's folder, which holds versions only; replaced atomically; skipped where the file
    system has no symlinks)."""
    alias_dir = Path(ref.root) / BY_NAME / ref.stage
    with contextlib.suppress(OSError):
        alias_dir.mkdir(parents=True, exist_ok=True)
        tmp = alias_dir / tmp_name(name)
        tmp.symlink_to(Path("..") / ".." / ref.stage / ref.version)
        os.replace(tmp, alias_dir / name)


def resolve(root: str | Path, stage: str, version: str | None = None) -> ArtifactRef:
    """The ref for ``version`` of ``stage`` (LATEST when None; ``production``: the production
    model, for select), checked to be intact."""
    root = Path(root).resolve()
    if version == "production":
        current = read_production(root)
        if current is None:
            raise ArtifactError(f"no production model under {root}: run 'houseprice run' "
                                "(its first healthy model is promoted) or pass --model VERSION")
        version = current["model"]
    if version in (None, "latest"):
        pointer = latest_pointer(root, stage)
        if not pointer.is_file():
            raise ArtifactError(
                f"no {stage} artifact under {root}: run 'houseprice run' first "
                "or pass --artifacts"
            )
        version = pointer.read_text().strip()
    elif not (root / stage / version).is_dir():
        version = _match_version(root, stage, version)
    return require(ArtifactRef(root=str(root), stage=stage, version=version))


def _match_version(root: Path, stage: str, given: str) -> str:
    """The one existing version of ``stage`` that starts with ``given`` (a prefix, as with
    git); else a one-line error that lists what there is."""
    import difflib

    stage_dir = root / stage
    versions = sorted(p.name for p in stage_dir.iterdir()
                      if p.is_dir() and not p.name.startswith(".")) if stage_dir.is_dir() else []
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


# The production model: one pointer file per artifact root (``production/CURRENT``, replaced
# atomically), an append-only history of every decision (``production/history.jsonl``), and a
# lock that serializes whoever reads-compares-writes them (gates of concurrent runs, the
# ``promote`` and ``rollback`` commands).
PRODUCTION = "production"


def production_dir(root: str | Path) -> Path:
    return Path(root) / PRODUCTION


def read_production(root: str | Path) -> dict[str, Any] | None:
    """The production pointer (model version, predictions version, data version, when), or
    None before the first promotion."""
    path = production_dir(root) / "CURRENT"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"unreadable production pointer {path}: {exc}; restore it with "
                            "'houseprice promote VERSION'") from None


@contextlib.contextmanager
def production_lock(root: str | Path):
    """An exclusive lock on the root's production pointer and history (blocks until free)."""
    import fcntl

    folder = production_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_history(root: str | Path) -> list[dict[str, Any]]:
    path = production_dir(root) / "history.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record(root: str | Path, entry: dict[str, Any], promote: bool) -> None:
    """Append ``entry`` to the history and, if ``promote``, make its model production (the
    pointer is replaced atomically, after the history line is written). Hold the lock."""
    entry = {"time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **entry,
             "promoted": promote}
    folder = production_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "history.jsonl", "a") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    if promote:
        write_json(folder / "CURRENT", {k: entry.get(k) for k in (
            "model", "predictions", "data_version", "time", "reason")})
