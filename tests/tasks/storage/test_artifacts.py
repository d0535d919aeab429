from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tasks.storage import artifacts, store
from tasks.storage.artifacts import ArtifactError, ArtifactRef, build, resolve, set_latest, verify


def _build(root, version="v1", payload="hello", calls=None):
    def write(out):
        if calls is not None:
            calls.append(out)
        (out / "data.txt").write_text(payload)
        return {"score": 1.0}

    return build(root, "stage", version, write, parameters={"p": 1}, upstream={},
                 code_version="c")


def test_build_writes_manifest_with_hashes(tmp_path):
    ref = _build(tmp_path)
    manifest = json.loads((ref.path / "manifest.json").read_text())
    assert manifest["stage"] == "stage" and manifest["version"] == "v1"
    assert manifest["metrics"] == {"score": 1.0}
    assert manifest["parameters"] == {"p": 1}
    assert set(manifest["files"]) == {"data.txt"}
    assert verify(ref.path) == []


def test_complete_version_is_reused_not_rewritten(tmp_path):
    calls = []
    _build(tmp_path, calls=calls)
    _build(tmp_path, calls=calls)
    assert len(calls) == 1


def test_failed_write_leaves_nothing_and_keeps_other_versions(tmp_path):
    good = _build(tmp_path, "good")

    def boom(out):
        (out / "half.txt").write_text("partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        build(tmp_path, "stage", "bad", boom, parameters={}, upstream={}, code_version="c")
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == ["good"]
    assert verify(good.path) == []


def test_damaged_version_is_detected_and_rebuilt(tmp_path):
    ref = _build(tmp_path)
    (ref.path / "data.txt").write_text("tampered")
    assert "does not match" in verify(ref.path)[0]
    with pytest.raises(ArtifactError, match="not usable"):
        artifacts.require(ref)
    calls = []
    _build(tmp_path, calls=calls)
    assert len(calls) == 1 and (ref.path / "data.txt").read_text() == "hello"


def test_version_without_manifest_is_incomplete(tmp_path):
    (tmp_path / "stage" / "v1").mkdir(parents=True)
    (tmp_path / "stage" / "v1" / "data.txt").write_text("looks done")
    assert not artifacts.is_complete(ArtifactRef(root=str(tmp_path), stage="stage", version="v1"))
    calls = []
    _build(tmp_path, calls=calls)
    assert len(calls) == 1


def test_killed_writer_leaves_no_complete_looking_version(tmp_path):
    code = f"""
import os, signal
from tasks.storage.artifacts import build
def write(out):
    (out / "data.txt").write_text("x")
    os.kill(os.getpid(), signal.SIGKILL)
build({str(tmp_path)!r}, "stage", "v1", write, parameters={{}}, upstream={{}}, code_version="c")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.getcwd())
    assert proc.returncode == -9
    assert not (tmp_path / "stage" / "v1").exists()
    calls = []
    _build(tmp_path, calls=calls)  # the next run cleans up and rebuilds
    assert len(calls) == 1
    assert [p.name for p in (tmp_path / "stage").iterdir()] == ["v1"]


def test_latest_pointer_resolves_and_is_checked(tmp_path):
    ref = _build(tmp_path)
    with pytest.raises(ArtifactError, match="run 'houseprice run' first"):
        resolve(tmp_path, "stage")
    set_latest(ref)
    assert resolve(tmp_path, "stage") == ref
    assert resolve(tmp_path, "stage", "v1") == ref
    assert resolve(tmp_path, "stage", "v") == ref  # a unique prefix
    with pytest.raises(ArtifactError, match="no stage version 'nope' under .*; nearest: v1"):
        resolve(tmp_path, "stage", "nope")


def test_a_prefix_of_two_versions_is_ambiguous_and_names_both(tmp_path):
    _build(tmp_path, "ab12cd")
    _build(tmp_path, "ab34ef")
    with pytest.raises(ArtifactError, match="stage version 'ab' is ambiguous under .*: it "
                                            "starts ab12cd, ab34ef; give more characters"):
        resolve(tmp_path, "stage", "ab")
    assert resolve(tmp_path, "stage", "ab3").version == "ab34ef"


def test_a_candidates_artifact_is_found_by_name_and_the_alias_is_no_version(tmp_path):
    from tasks.storage.artifacts import link_name

    refs = []
    for version in ("a" * 16, "b" * 16):
        ref = build(str(tmp_path), "train", version, lambda out: (out / "x").write_text("1")
                    and None, parameters={}, upstream={}, code_version="c")
        refs.append(ref)
        link_name(ref, "lasso")
    alias = tmp_path / "by-name" / "train" / "lasso"
    assert alias.is_symlink() and os.readlink(alias) == os.path.join("..", "..", "train", "b" * 16)
    assert (alias / "x").read_text() == "1"  # the latest one built, through the link
    assert not [p for p in alias.parent.iterdir() if p.name != "lasso"]  # no temporaries
    assert resolve(tmp_path, "train", "b").version == "b" * 16  # a prefix still resolves
    with pytest.raises(ArtifactError, match="nearest") as err:
        resolve(tmp_path, "train", "zzz")
    assert "by-name" not in str(err.value)
    # the stage's folder holds versions only
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["a" * 16, "b" * 16]


def test_a_forced_rebuild_never_leaves_readers_without_the_version(tmp_path):
    """The new version goes in before the old one is removed (an atomic swap): a reader
    checking the version all through 30 forced rebuilds never finds it missing or torn."""
    import threading

    ref = _build(tmp_path, payload="v0")
    failures, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            problems = verify(ref.path)
            if problems:
                failures.append(problems[0])

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(30):
            build(tmp_path, "stage", "v1", lambda out, i=i: (out / "data.txt").write_text(
                f"v{i + 1}") and None, parameters={"p": 1}, upstream={}, code_version="c",
                force=True)
    finally:
        stop.set()
        reader.join()
    assert failures == []
    assert (ref.path / "data.txt").read_text() == "v30"
    assert [p.name for p in (tmp_path / "stage").iterdir()] == ["v1"]  # the old ones removed


def test_leftovers_are_cleaned_by_owner_host_and_pid_or_lease(tmp_path):
    """Temporary entries of any version (and LATEST's) whose owner died on this host are
    removed; another host's are kept (it may be writing) until older than the lease."""
    stage = tmp_path / "stage"
    stage.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    host = store._HOST
    mine_dead = stage / f".tmp-oldversion-{host}~{dead}-0000aaaa"
    mine_dead.mkdir()
    latest_dead = stage / f".tmp-LATEST-{host}~{dead}-0000bbbb"
    latest_dead.write_text("x\n")
    legacy_dead = stage / f".tmp-v9-{dead}-0000cccc"  # a name from before hosts were recorded
    legacy_dead.mkdir()
    other = stage / ".tmp-v2-otherhost~1-0000dddd"
    other.mkdir()
    _build(tmp_path)
    left = sorted(p.name for p in stage.iterdir())
    assert left == [other.name, "v1"]
    old = os.stat(other).st_mtime - store.TMP_LEASE_S - 60
    os.utime(other, (old, old))
    _build(tmp_path, version="v3")
    assert sorted(p.name for p in stage.iterdir()) == ["v1", "v3"]
