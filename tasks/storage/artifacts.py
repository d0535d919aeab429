"""Versioned, atomically written stage artifacts: ``<root>/<stage>/<version>/manifest.json``.

A version only ever appears complete: its manifest (written last) lists the SHA-256 of every
file, so a version without a manifest, or whose files no longer match it, was never complete
or was damaged later: it is not used, and the next build replaces it. The root is a folder or
an object store URL (``s3://bucket/prefix``); this module speaks only the store interface of
``tasks.storage.store`` (``open_store(root)``), which decides how each operation is done
there, and a reference's ``path`` is the version's folder or a verified local copy. Stages
never know which.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from tasks.storage.store import (
    BY_NAME,
    MANIFEST,
    TMP_PREFIX,
    Store,
    StoreError,
    canonical,
    open_store,
    owner,
    read_manifest_at,
    safe_relative,
    sha256_file,
    store_at,
    verify_dir,
)

__all__ = ["BY_NAME", "MANIFEST", "ArtifactError", "ArtifactRef"]


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
    def store(self) -> Store:
        try:
            return store_at(self.root)  # the root is canonical already (see _canonical)
        except StoreError as exc:
            raise ArtifactError(str(exc)) from None

    @property
    def remote(self) -> bool:
        return self.store.remote

    @property
    def location(self) -> str:
        """Where the version lives, as a person would look for it (a folder or a URL)."""
        return f"{self.root}/{self.stage}/{self.version}"

    @property
    def path(self) -> Path:
        """The version's folder: the folder itself under a local root; under an object store,
        this machine's copy, downloaded and checked against the manifest on first use."""
        try:
            return self.store.version_dir(self.stage, self.version)
        except StoreError as exc:
            raise ArtifactError(f"artifact {self.stage}/{self.version} is not usable "
                                f"({exc}); rerun the pipeline to rebuild it") from None

    def file(self, name: str) -> Path:
        return self.path / name

    def manifest(self) -> dict[str, Any]:
        try:
            manifest = self.store.read_manifest(self.stage, self.version)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"unreadable manifest in {self.location}: {exc}") from None
        if manifest is None:
            raise ArtifactError(f"no manifest in {self.location}: the artifact is incomplete")
        return manifest


def store_of(root: str | Path) -> Store:
    """``root``'s store; a store that cannot be opened is an ArtifactError (one line)."""
    try:
        return open_store(root)
    except StoreError as exc:
        raise ArtifactError(str(exc)) from None


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a version folder (a local one, or a verified copy)."""
    try:
        return read_manifest_at(path)
    except StoreError as exc:
        raise ArtifactError(str(exc)) from None


def verify(path: Path | ArtifactRef, attempts: int = 20) -> list[str]:
    """Problems with the artifact (empty when it is complete and intact): a reference, or a
    local version folder."""
    if isinstance(path, ArtifactRef):
        return path.store.verify(path.stage, path.version, attempts)[0]
    return verify_dir(path, attempts)


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
    tmp = ref.store.staging(stage, f"{TMP_PREFIX}{version}-{me}")
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
        ref.store.publish(tmp, stage, version, manifest, replace=force, owner=me)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return require(ref)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file, then rename): a reader never sees half of it."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically, as ``write_json``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def set_latest(ref: ArtifactRef) -> None:
    """Point ``<root>/<stage>/LATEST`` at ``ref`` (atomic replace; one PUT in a store)."""
    ref.store.write_bytes((ref.version + "\n").encode(), ref.stage, "LATEST")


def link_name(ref: ArtifactRef, name: str) -> None:
    """``<root>/by-name/<stage>/<name>`` names ``ref``'s version, so a person finds a
    candidate's latest built artifact without opening every manifest (a symlink in a folder,
    outside the stage's folder, which holds versions only; nothing in an object store, which
    has no links)."""
    ref.store.alias(ref.stage, ref.version, name)


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


def read_text(root: str | Path, *parts: str) -> str | None:
    """A small object of the root (a pointer), or None if there is none."""
    data = store_of(root).read_bytes(*parts)
    return None if data is None else data.decode()


def list_versions(root: str | Path, stage: str) -> list[str]:
    """The version names of ``stage`` (complete or not), sorted."""
    return store_of(root).versions(stage)


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
    with store_of(root).lock(PRODUCTION, ".lock"):
        yield


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
    store_of(root).append(line.encode(), PRODUCTION, "history.jsonl")
    if promote or entry.get("action") == "rollback":
        write_pointer(root)


def write_pointer(root: str | Path) -> None:
    """Rewrite CURRENT as the history's replay has it (hold the lock)."""
    stack = production_stack(read_history(root))
    if not stack:
        return
    data = json.dumps(stack[-1], indent=2, sort_keys=True)
    store_of(root).write_bytes(data.encode(), PRODUCTION, "CURRENT")
