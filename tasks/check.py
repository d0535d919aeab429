"""``houseprice check``: the artifact store's fsck. Every version's manifest and file hashes,
every LATEST pointer, the production pointer against the history's replay, Prefect's cache
records, and temporaries left by writers that are gone; local folders and object stores
alike. Read-only: it reports, it repairs nothing."""

from __future__ import annotations

import time
from pathlib import Path

from tasks.storage.artifacts import (
    BY_NAME,
    PRODUCTION,
    ArtifactError,
    ArtifactRef,
    list_versions,
    production_stack,
    read_history,
    read_pointer,
    read_text,
    store_of,
    verify,
)
from tasks.storage.store import TMP_PREFIX, LocalStore, canonical, owner_gone, safe_relative

# Top-level entries of a root that are not stages.
_NOT_STAGES = {PRODUCTION, BY_NAME, "logs", "submissions"}
RECORDS = ".prefect-results"


def check_root(root: str | Path) -> tuple[list[str], dict[str, int]]:
    """(problems, one line each; counts of what was checked)."""
    root = canonical(root)
    if not store_of(root).remote and not Path(root).is_dir():
        raise ArtifactError(f"no artifact root at {root}: pass --artifacts DIR|URL")
    problems: list[str] = []
    counts = {"stages": 0, "versions": 0, "records": 0}
    for stage in _stages(root):
        counts["stages"] += 1
        versions = list_versions(root, stage)
        for version in versions:
            if not safe_relative(version) or "/" in version:
                problems.append(f"{root}/{stage}/{version!r}: not a version name")
                continue
            counts["versions"] += 1
            found = verify(ArtifactRef(root=root, stage=stage, version=version))
            problems += [f"{stage}/{version}: {p}" for p in found[:1]]
        pointer = read_text(root, stage, "LATEST")
        if pointer is not None:
            latest = pointer.strip()
            if latest not in versions:
                problems.append(f"{root}/{stage}/LATEST names {latest[:40]!r}, which is not "
                                f"a {stage} version")
        problems += _temporaries(root, stage)
    problems += _production(root)
    problems += _records(root, counts)
    return problems, counts


def _stages(root: str) -> list[str]:
    names = store_of(root).children(folders=True)
    return [n for n in names if not n.startswith(".") and n not in _NOT_STAGES]


def _temporaries(root: str, stage: str) -> list[str]:
    """Temporary folders and attempt prefixes whose writer is gone (a live writer's are
    work in progress, not problems)."""
    found = []
    store = store_of(root)
    if not isinstance(store, LocalStore):
        for version in store.versions(stage):
            named = (store.read_manifest_quiet(stage, version) or {}).get("prefix")
            for name in store.children(stage, version):
                if name.startswith("data-") and name != named and owner_gone(
                        name, lambda v=version, n=name: _age(store, stage, v, n)):
                    found.append(f"{root}/{stage}/{version}/{name}: an abandoned upload "
                                 "(no manifest names it)")
        return found
    for tmp in sorted(store.path(stage).glob(f"{TMP_PREFIX}*")):
        if owner_gone(tmp.name, lambda tmp=tmp: time.time() - tmp.lstat().st_mtime):
            found.append(f"{tmp}: an abandoned temporary (its writer is gone)")
    return found


def _age(store, stage: str, version: str, name: str) -> float:
    """Seconds since the newest object under an attempt prefix was written."""
    found = store.fs.find(store.key(stage, version, name), detail=True)
    stamps = [p["LastModified"].timestamp() for p in found.values() if p.get("LastModified")]
    return time.time() - max(stamps) if stamps else float("inf")


def _production(root: str) -> list[str]:
    problems: list[str] = []
    history = read_history(root, problems)
    stack = production_stack(history)
    pointer = read_pointer(root)
    text = read_text(root, PRODUCTION, "CURRENT")
    where = f"{root}/{PRODUCTION}/CURRENT"
    if text is not None and pointer is None:
        problems.append(f"{where} is not a JSON object (torn?)")
    if stack:
        model = stack[-1]["model"]
        if pointer is not None and pointer.get("model") != model:
            problems.append(f"{where} names {pointer.get('model')} but the history makes "
                            f"{model} production (a write interrupted between them)")
        elif text is None:
            problems.append(f"{where} is missing; the history makes {model} production")
        if not safe_relative(model) or "/" in model:
            problems.append(f"the history names {model[:40]!r} as production: not a version")
        elif verify(ArtifactRef(root=root, stage="select", version=model)):
            problems.append(f"production model select/{model} is missing or damaged")
    elif pointer is not None:
        problems.append(f"{where} names {pointer.get('model')} but the history records no "
                        "promotion")
    return problems


def _records(root: str, counts: dict[str, int]) -> list[str]:
    """Prefect's cache records that are not a plain-JSON reference of their key."""
    from tasks.storage.records import UntrustedRecord, is_cache_key, rebuilt_record

    problems = []
    store = store_of(root)
    for name in store.children(RECORDS):
        # Other records (a failed task's exception, keyed at random) are never looked up
        # as cache hits, and are refused too should anything read them.
        if not is_cache_key(name):
            continue
        counts["records"] += 1
        try:
            rebuilt_record(name, store.read_bytes(RECORDS, name) or b"")
        except UntrustedRecord as exc:
            problems.append(f"{root}/{RECORDS}/{name}: {exc} (never loaded: a cache miss)")
    return problems

