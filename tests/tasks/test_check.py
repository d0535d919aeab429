"""``houseprice check``: the store's fsck, on a healthy root and on each kind of damage."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from flows.cli import main
from tasks.storage import artifacts, store
from tasks.storage.artifacts import ArtifactRef, production_lock, record, set_latest


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for version in ("aaaa", "bbbb"):
        ref = artifacts.build(root, "select", version,
                              lambda out, v=version: (out / "model.pt").write_text(v),
                              parameters={}, upstream={}, code_version="c")
        set_latest(ref)
        with production_lock(root):
            record(root, {"action": "promote", "model": version}, promote=True)
    return root


def _check(root, capsys) -> tuple[int, list[str]]:
    code = main(["check", "--artifacts", str(root)])
    out = capsys.readouterr()
    return code, [line for line in (out.out + out.err).splitlines() if line]


def test_a_healthy_root_is_ok(tmp_path, capsys):
    code, lines = _check(_root(tmp_path), capsys)
    assert code == 0 and lines[-1].startswith("houseprice: check: ok: 2 versions of 1 stages")


def test_a_changed_file_is_named(tmp_path, capsys):
    root = _root(tmp_path)
    (root / "select" / "aaaa" / "model.pt").write_text("tampered")
    code, lines = _check(root, capsys)
    assert code == 1
    assert any("select/aaaa" in line and "model.pt does not match its manifest hash" in line
               for line in lines), lines


def test_a_torn_pointer_is_named(tmp_path, capsys):
    root = _root(tmp_path)
    (root / "production" / "CURRENT").write_text('{"model": "bb')
    code, lines = _check(root, capsys)
    assert code == 1 and any("CURRENT is not a JSON object" in line for line in lines), lines


def test_history_and_current_disagreeing_is_named(tmp_path, capsys):
    root = _root(tmp_path)
    artifacts.write_json(root / "production" / "CURRENT", {"model": "aaaa"})
    code, lines = _check(root, capsys)
    assert code == 1
    assert any("CURRENT names aaaa but the history makes bbbb production" in line
               for line in lines), lines


def test_a_latest_naming_no_version_is_named(tmp_path, capsys):
    root = _root(tmp_path)
    (root / "select" / "LATEST").write_text("cccc\n")
    code, lines = _check(root, capsys)
    assert code == 1 and any("LATEST names 'cccc'" in line for line in lines), lines


def test_an_abandoned_temporary_is_named_a_live_writers_is_not(tmp_path, capsys):
    root = _root(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    host = store._HOST
    (root / "select" / f".tmp-cccc-{host}~{dead.pid}-0badf00d").mkdir()
    (root / "select" / f".tmp-dddd-{host}~{os.getpid()}-0badf00d").mkdir()
    code, lines = _check(root, capsys)
    assert code == 1
    flagged = [line for line in lines if "abandoned temporary" in line]
    assert len(flagged) == 1 and ".tmp-cccc-" in flagged[0], lines


def test_a_planted_cache_record_is_named(tmp_path, capsys):
    from tests.tasks.storage.test_records import key_for, pickle_record

    root = _root(tmp_path)
    (root / ".prefect-results").mkdir()
    (root / ".prefect-results" / key_for(str(root))).write_bytes(
        pickle_record(tmp_path / "pwned"))
    code, lines = _check(root, capsys)
    assert code == 1 and any("serializer 'pickle'" in line for line in lines), lines
    assert not (tmp_path / "pwned").exists()


def test_a_missing_root_is_one_line(tmp_path, capsys):
    code, lines = _check(tmp_path / "nowhere", capsys)
    assert code == 1 and lines == [f"houseprice: error: no artifact root at "
                                   f"{tmp_path / 'nowhere'}: pass --artifacts DIR|URL"]


def test_a_bucket_is_checked_alike(s3, tmp_path, capsys):
    root = f"s3://{s3.bucket()}/hp"
    ref = artifacts.build(root, "select", "aaaa", lambda out: (out / "m").write_text("m"),
                          parameters={}, upstream={}, code_version="c")
    set_latest(ref)
    with production_lock(root):
        record(root, {"action": "promote", "model": "aaaa"}, promote=True)
    code, lines = _check(root, capsys)
    assert code == 0, lines
    prefix = ArtifactRef(root=root, stage="select", version="aaaa").manifest()["prefix"]
    s3.fs().pipe(f"{root[5:]}/select/aaaa/{prefix}/m", b"changed")
    s3.fs().pipe(f"{root[5:]}/production/CURRENT", json.dumps({"model": "zzzz"}).encode())
    code, lines = _check(root, capsys)
    assert code == 1
    assert any("does not match its manifest hash" in line for line in lines), lines
    assert any("CURRENT names zzzz" in line for line in lines), lines


@pytest.mark.parametrize("bad", ["../x", "a/b"])
def test_check_names_a_bad_version_in_the_history(tmp_path, capsys, bad):
    root = _root(tmp_path)
    with (root / "production" / "history.jsonl").open("a") as fh:
        fh.write(json.dumps({"action": "promote", "model": bad, "promoted": True}) + "\n")
    code, lines = _check(root, capsys)
    assert code == 1 and any("not a version" in line for line in lines), lines
