"""Prefect cache records are untrusted input: only a plain-JSON reference of this project is
ever handed to Prefect's deserializer; anything else is a miss and runs no code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
from prefect.serializers import JSONSerializer, PickleSerializer

from tasks.storage.artifacts import ArtifactRef
from tasks.storage.records import SafeLocalFileSystem, UntrustedRecord, safe_record
from tasks.storage.store import root_key

VERSION = "0123456789abcdef"


class Touch:
    """Unpickling it creates ``path``: the code a planted pickle record would run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def key_for(root: str, stage: str = "preprocess", version: str = VERSION) -> str:
    return f"houseprice-{stage}-{version}-{root_key(root)}"


def genuine(root: str, stage: str = "preprocess", version: str = VERSION) -> bytes:
    ref = ArtifactRef(root=root, stage=stage, version=version)
    record = ResultRecord(metadata=ResultRecordMetadata(serializer=JSONSerializer(),
                                                        storage_key=key_for(root)), result=ref)
    return record.serialize()


def pickle_record(marker: Path) -> bytes:
    return ResultRecord(metadata=ResultRecordMetadata(serializer=PickleSerializer()),
                        result=Touch(marker)).serialize()


def foreign_class_record(module: str) -> bytes:
    body = json.loads(genuine("/r").decode())
    body["result"] = json.dumps({"__class__": f"{module}.Thing", "data": {}})
    return json.dumps(body).encode()


def planted_module(folder: Path, marker: Path) -> str:
    """A module on sys.path whose import creates ``marker`` (what a foreign __class__ would
    import)."""
    name = f"houseprice_planted_{abs(hash(str(folder))) % 10**8}"
    (folder / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').close()\nThing = dict\n")
    return name


def test_a_genuine_record_is_read_back_as_its_reference(tmp_path):
    root = str(tmp_path)
    out = ResultRecord.deserialize(safe_record(key_for(root), genuine(root)))
    assert out.result == ArtifactRef(root=root, stage="preprocess", version=VERSION)


def test_a_pickle_record_is_a_miss_and_runs_nothing(tmp_path, caplog):
    marker = tmp_path / "pwned"
    with pytest.raises(UntrustedRecord, match="serializer 'pickle'"):
        safe_record(key_for("/r"), pickle_record(marker))
    assert not marker.exists()
    assert "ignoring Prefect cache record houseprice-preprocess" in caplog.text


def test_a_foreign_class_is_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    monkeypatch.syspath_prepend(str(tmp_path))
    module = planted_module(tmp_path, marker)
    with pytest.raises(UntrustedRecord, match="not tasks.storage.artifacts.ArtifactRef"):
        safe_record(key_for("/r"), foreign_class_record(module))
    assert not marker.exists()


@pytest.mark.parametrize("change", [
    lambda r: r["metadata"]["serializer"].update(object_decoder="os.system"),
    lambda r: r.update(result=json.dumps({"__class__": "tasks.storage.artifacts.ArtifactRef",
                                          "data": {"root": "/r", "stage": "train",
                                                   "version": VERSION}})),
    lambda r: r.update(result=json.dumps({"__class__": "tasks.storage.artifacts.ArtifactRef",
                                          "data": {"root": "/elsewhere", "stage":
                                                   "preprocess", "version": VERSION}})),
    lambda r: r.update(result="[1, 2]"),
    lambda r: r.pop("metadata"),
])
def test_a_record_that_is_not_exactly_its_keys_reference_is_a_miss(change):
    body = json.loads(genuine("/r").decode())
    change(body)
    with pytest.raises(UntrustedRecord):
        safe_record(key_for("/r"), json.dumps(body).encode())


def test_not_json_and_foreign_keys_are_misses():
    with pytest.raises(UntrustedRecord, match="not JSON"):
        safe_record(key_for("/r"), b"\x80\x04garbage")
    with pytest.raises(UntrustedRecord, match="not a houseprice cache key"):
        safe_record("some-other-key", genuine("/r"))


def test_the_storage_block_checks_every_read(tmp_path):
    marker = tmp_path / "pwned"
    block = SafeLocalFileSystem(basepath=str(tmp_path / "records"))
    key = key_for("/r")
    block.write_path(key, pickle_record(marker))
    with pytest.raises(UntrustedRecord):
        block.read_path(key)
    assert not marker.exists()


def test_a_group_record_is_its_members_references():
    """A stacked group's record holds its members' references; its key is a digest of
    their versions, so a record naming other members is a miss."""
    import hashlib

    root = "/r"
    versions = ["0123456789abcdef", "fedcba9876543210"]
    digest = hashlib.sha256(json.dumps(versions).encode()).hexdigest()[:16]
    refs = [ArtifactRef(root=root, stage="train", version=v) for v in versions]
    key = f"houseprice-train-group-{digest}-{root_key(root)}"
    record = ResultRecord(metadata=ResultRecordMetadata(serializer=JSONSerializer()),
                          result=refs).serialize()
    assert ResultRecord.deserialize(safe_record(key, record)).result == refs
    other = ResultRecord(metadata=ResultRecordMetadata(serializer=JSONSerializer()),
                         result=refs[:1]).serialize()
    with pytest.raises(UntrustedRecord, match="other artifacts than its key"):
        safe_record(key, other)
