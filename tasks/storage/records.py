"""Prefect's cache records, read as untrusted input.

A cache record lives in the artifact root (``<root>/.prefect-results/<key>``), so whoever can
write the root (a bucket shared by many machines) can write one. Prefect would deserialize a
record with whatever serializer its metadata names (``pickle`` runs code) and, with JSON,
import whatever class a ``__class__`` field names. So the storage blocks here hand Prefect
only records they have parsed as plain JSON and rebuilt themselves: an ``ArtifactRef`` of the
stage, version and root the key names, under Prefect's default JSON serializer. Anything else
is a cache miss (the stage runs, finds its artifact or rebuilds it, and writes a good record
over the bad one), with a warning naming the record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any

from prefect.filesystems import LocalFileSystem, RemoteFileSystem
from prefect.serializers import JSONSerializer

from tasks.storage.store import root_key

REF_CLASS = "tasks.storage.artifacts.ArtifactRef"
# houseprice-<stage>-<16 hex version>-<8 hex root key> (tasks.stage.StageVersionPolicy), and
# houseprice-train-group-<16 hex digest of its members' versions>-<root key> (a group of
# torch candidates trained as one stack: tasks.train.GroupVersionPolicy), whose result is
# the list of its members' references.
_KEY = re.compile(r"houseprice-(train-group|[a-z_]+)-([0-9a-f]{16})-([0-9a-f]{8})")
GROUP = "train-group"
_SERIALIZER = JSONSerializer().model_dump(mode="json")
log = logging.getLogger("houseprice.records")


def is_cache_key(name: str) -> bool:
    """Whether ``name`` is the key of a stage's cache record (what a cache hit reads)."""
    return _KEY.fullmatch(name) is not None


class UntrustedRecord(ValueError):
    """A cache record that is not a plain JSON reference of this project: a miss."""


def safe_record(key: str, content: bytes) -> bytes:
    """The record ``content`` stored under ``key``, rebuilt from its plain-JSON reference;
    raises UntrustedRecord (after a warning) if it is anything else."""
    try:
        return rebuilt_record(key, content)
    except UntrustedRecord as exc:
        log.warning("ignoring Prefect cache record %s: %s; the stage runs instead "
                    "and replaces it", key, exc)
        raise


def rebuilt_record(key: str, content: bytes) -> bytes:
    match = _KEY.fullmatch(key.rsplit("/", 1)[-1])
    if match is None:
        raise UntrustedRecord("not a houseprice cache key")
    try:
        record = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        raise UntrustedRecord("not JSON") from None
    if not isinstance(record, dict) or not isinstance(record.get("metadata"), dict):
        raise UntrustedRecord("no metadata")
    metadata = record["metadata"]
    serializer = metadata.get("serializer")
    if serializer != _SERIALIZER:
        kind = serializer.get("type") if isinstance(serializer, dict) else serializer
        raise UntrustedRecord(f"serializer {kind!r} is not Prefect's default JSON")
    try:
        result = json.loads(record.get("result"))
    except (TypeError, ValueError):
        raise UntrustedRecord("its result is not JSON") from None
    stage, version, root = match.groups()
    if stage == GROUP:
        if not isinstance(result, list) or not result:
            raise UntrustedRecord(f"its result is not a list of {REF_CLASS}")
        refs = [_reference(item) for item in result]
        versions = [r["version"] for r in refs]
        digest = hashlib.sha256(json.dumps(versions).encode()).hexdigest()[:16]
        if digest != version or any(r["stage"] != "train" or root_key(r["root"]) != root
                                    for r in refs):
            raise UntrustedRecord("its references name other artifacts than its key")
        body: Any = [{"__class__": REF_CLASS, "data": r} for r in refs]
    else:
        data = _reference(result)
        if (data["stage"], data["version"]) != (stage, version) or root_key(
                data["root"]) != root:
            raise UntrustedRecord("its reference names another artifact than its key")
        body = {"__class__": REF_CLASS, "data": data}
    clean: dict[str, Any] = {
        "metadata": {
            "serializer": _SERIALIZER,
            "storage_key": metadata.get("storage_key") if isinstance(
                metadata.get("storage_key"), str) else None,
            "expiration": None,
            "prefect_version": str(metadata.get("prefect_version", "")),
            "storage_block_id": None,
        },
        "result": json.dumps(body),
    }
    return json.dumps(clean).encode()


def _reference(result: Any) -> dict[str, str]:
    """The (root, stage, version) of one encoded ArtifactRef, or UntrustedRecord."""
    if not isinstance(result, dict) or result.get("__class__") != REF_CLASS:
        name = result.get("__class__") if isinstance(result, dict) else type(result).__name__
        raise UntrustedRecord(f"its result is {name!r}, not {REF_CLASS}")
    data = result.get("data")
    if not isinstance(data, dict) or set(data) != {"root", "stage", "version"} or not all(
            isinstance(v, str) for v in data.values()):
        raise UntrustedRecord("its reference is not (root, stage, version) strings")
    return dict(data)


class SafeLocalFileSystem(LocalFileSystem):
    """Prefect's local file system block whose reads pass ``safe_record`` first (a type
    of its own: never saved, it only wraps the saved ``LocalFileSystem``)."""

    _block_type_slug = "houseprice-safe-local-file-system"


    async def aread_path(self, path: str) -> bytes:
        return safe_record(path, await super().aread_path(path))

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        return safe_record(path, LocalFileSystem.read_path(self, path, _sync=True))


class SafeRemoteFileSystem(RemoteFileSystem):
    """Prefect's fsspec file system block whose reads pass ``safe_record`` first."""

    _block_type_slug = "houseprice-safe-remote-file-system"


    async def aread_path(self, path: str) -> bytes:
        return safe_record(path, await super().aread_path(path))

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        return safe_record(path, RemoteFileSystem.read_path(self, path, _sync=True))


def safe(block: LocalFileSystem | RemoteFileSystem) -> LocalFileSystem | RemoteFileSystem:
    """``block`` (saved on the API) as its reading-safe twin, keeping its document id."""
    cls = SafeRemoteFileSystem if isinstance(block, RemoteFileSystem) else SafeLocalFileSystem
    twin = cls(**block.model_dump(exclude={"block_type_slug"}))
    for attr in ("_block_document_id", "_block_document_name", "_is_anonymous"):
        if hasattr(block, attr):
            setattr(twin, attr, getattr(block, attr))
    return twin
