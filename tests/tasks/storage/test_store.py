"""The artifact store on a real S3 protocol server (moto, loopback): the same rules as the
local folder (manifest last, hashes checked), without renames."""

from __future__ import annotations

import json
import os
import threading

import pytest

from tasks.storage import artifacts, store
from tasks.storage.artifacts import ArtifactError, ArtifactRef, build, resolve, set_latest, verify
from tasks.storage.store import StoreError, check


def _build(root, version="v1", payload="hello", calls=None, force=False, before_commit=None):
    def write(out):
        if calls is not None:
            calls.append(out)
        (out / "data.txt").write_text(payload)
        (out / "sub").mkdir()
        (out / "sub" / "more.txt").write_text(payload * 2)
        if before_commit is not None:
            before_commit()
        return {"payload": payload}

    return build(root, "stage", version, write, parameters={"p": 1}, upstream={},
                 code_version="c", force=force)


def _objects(s3, root: str) -> list[str]:
    base = root.removeprefix("s3://")
    return sorted(p[len(base) + 1:] for p in s3.fs().find(base))


def _manifest(s3, root: str, version="v1") -> dict:
    return json.loads(s3.fs().cat(f"{root.removeprefix('s3://')}/stage/{version}/manifest.json"))


def test_a_version_is_its_files_then_the_manifest_naming_them(s3):
    root = f"s3://{s3.bucket()}/hp"
    ref = _build(root)
    manifest = _manifest(s3, root)
    prefix = manifest["prefix"]
    assert _objects(s3, root) == [f"stage/v1/{prefix}/data.txt", f"stage/v1/{prefix}/sub/more.txt",
                                  "stage/v1/manifest.json"]
    assert set(manifest["files"]) == {"data.txt", "sub/more.txt"}
    assert verify(ref) == [] and ref.root == root
    # stages read a local copy, checked against the manifest
    assert ref.file("data.txt").read_text() == "hello"
    assert (ref.path / "sub" / "more.txt").read_text() == "hellohello"
    assert ref.manifest()["metrics"] == {"payload": "hello"}
    calls = []
    _build(root, calls=calls)
    assert calls == []  # complete: reused, not rewritten
    set_latest(ref)
    assert s3.fs().cat(f"{root[5:]}/stage/LATEST") == b"v1\n"
    assert resolve(root, "stage").version == "v1" and resolve(root, "stage", "v").version == "v1"


def test_missing_manifest_or_overwritten_object_is_rebuilt_not_used(s3):
    root = f"s3://{s3.bucket()}/hp"
    ref = _build(root)
    prefix = _manifest(s3, root)["prefix"]
    s3.fs().pipe(f"{root[5:]}/stage/v1/{prefix}/data.txt", b"tampered")
    assert "data.txt does not match its manifest hash" in verify(ref)[0]
    with pytest.raises(ArtifactError, match="not usable"):
        artifacts.require(ref)
    calls = []
    rebuilt = _build(root, calls=calls)
    assert len(calls) == 1 and verify(rebuilt) == []
    assert rebuilt.file("data.txt").read_text() == "hello"
    new_prefix = _manifest(s3, root)["prefix"]
    assert new_prefix != prefix and not any(prefix in o for o in _objects(s3, root))

    s3.fs().rm(f"{root[5:]}/stage/v1/manifest.json")
    assert "no manifest" in verify(rebuilt)[0]
    calls = []
    _build(root, calls=calls)
    assert len(calls) == 1 and verify(rebuilt) == []


def test_two_writers_racing_on_one_version_leave_one_intact_version(s3):
    root = f"s3://{s3.bucket()}/hp"
    both_uploading = threading.Barrier(2)
    results = {}

    def writer(payload):
        results[payload] = _build(root, payload=payload,
                                  before_commit=lambda: both_uploading.wait(timeout=30))

    threads = [threading.Thread(target=writer, args=(p,)) for p in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    manifest = _manifest(s3, root)
    winner = manifest["metrics"]["payload"]
    ref = results[winner]
    assert verify(ref) == []
    assert ref.file("data.txt").read_text() == winner
    # the loser's files are gone: only the manifest's prefix remains
    assert {o.split("/")[2] for o in _objects(s3, root) if o.count("/") > 2} == {
        manifest["prefix"]}


def test_a_forced_rebuild_puts_the_new_version_in_before_removing_the_old(s3):
    root = f"s3://{s3.bucket()}/hp"
    ref = _build(root, payload="old")
    old_prefix = _manifest(s3, root)["prefix"]
    seen = []

    def read_during_rebuild():
        seen.append(verify(ref))  # the old version is still there, whole
        seen.append(s3.fs().cat(f"{root[5:]}/stage/v1/{old_prefix}/data.txt"))

    _build(root, payload="new", force=True, before_commit=read_during_rebuild)
    assert seen == [[], b"old"]
    assert ref.file("data.txt").read_text() == "new"
    assert not any(old_prefix in o for o in _objects(s3, root))


def test_production_pointer_history_and_lock_live_in_the_bucket(s3):
    root = f"s3://{s3.bucket()}/hp"
    with artifacts.production_lock(root):
        artifacts.record(root, {"action": "gate", "model": "m1"}, promote=True)
        artifacts.record(root, {"action": "gate", "model": "m2"}, promote=False)
    assert artifacts.read_production(root)["model"] == "m1"
    assert [e["model"] for e in artifacts.read_history(root)] == ["m1", "m2"]
    assert "production/.lock" not in _objects(s3, root)  # released

    order = []

    def holder(name):
        with artifacts.production_lock(root):
            order.append(f"{name} in")
            threading.Event().wait(0.3)
            order.append(f"{name} out")

    threads = [threading.Thread(target=holder, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])


@pytest.mark.parametrize("left", ["old", "torn"])
def test_a_lock_left_by_a_dead_holder_is_taken_over_a_live_one_waited_for(s3, left):
    import json
    import time

    from tasks.storage.store import LOCK_LEASE_S, open_store

    root = f"s3://{s3.bucket()}/hp"
    store = open_store(root)
    # A holder that died over a lease ago (or left a torn lock object): taken over at once.
    stale = (json.dumps({"owner": "dead", "time": time.time() - LOCK_LEASE_S - 5}).encode()
             if left == "old" else b'{"owner": "de')
    assert store.write_bytes(stale, "production", ".lock", create=True)
    started = time.monotonic()
    with artifacts.production_lock(root):
        assert store.read_bytes("production", ".lock") != stale
    assert time.monotonic() - started < 5
    assert "production/.lock" not in _objects(s3, root)
    # A live holder's lock: waited for until released.
    live = json.dumps({"owner": "alive", "time": time.time()}).encode()
    assert store.write_bytes(live, "production", ".lock", create=True)
    release = threading.Timer(1.0, lambda: store.delete("production", ".lock"))
    release.start()
    started = time.monotonic()
    with artifacts.production_lock(root):
        waited = time.monotonic() - started
    release.join()
    assert waited >= 0.9


def test_abandoned_attempts_of_dead_writers_are_swept_a_live_or_leased_one_kept(s3):
    root = f"s3://{s3.bucket()}/hp"
    dead = f"data-{store._HOST}~999999999-deadbeef"
    live = f"data-{store._HOST}~{os.getpid()}-0badcafe"  # this process: alive
    other_host = "data-elsewhere~999999999-12345678"  # within its lease
    for version, name in (("v1", dead), ("v7", dead), ("v8", live), ("v9", other_host)):
        s3.fs().pipe(f"{root[5:]}/stage/{version}/{name}/data.txt", b"half")
    store.open_store(root)._swept.clear()
    _build(root)
    left = _objects(s3, root)
    assert not any(dead in o for o in left)  # of this version and of one never rebuilt
    assert any(live in o for o in left) and any(other_host in o for o in left)


@pytest.mark.parametrize(("root", "env", "words"), [
    ("s3://no-such-bucket/hp", {}, "the bucket does not exist"),
    ("s3://{bucket}/hp", {"AWS_SECRET_ACCESS_KEY": "wrong"}, "access refused .*check "
     "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
    ("s3://{bucket}/hp", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "is unreachable .*check "
     "AWS_ENDPOINT_URL"),
])
def test_an_unusable_store_is_one_line(s3, monkeypatch, root, env, words):
    from tasks.storage import store

    bucket = s3.bucket()
    root = root.format(bucket=bucket)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    store.store_at.cache_clear()
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    try:
        with pytest.raises(StoreError, match=words) as info:
            check(root)
    finally:
        store.store_at.cache_clear()
        fsspec.filesystem("s3").clear_instance_cache()
    assert "\n" not in str(info.value)
    assert _objects(s3, f"s3://{bucket}") == []  # nothing written


def test_a_local_root_and_a_file_url_are_one_root(tmp_path):
    ref = _build(f"file://{tmp_path}")
    assert ref.root == str(tmp_path) and ref.file("data.txt").read_text() == "hello"
    assert ArtifactRef(root=str(tmp_path / "x" / ".."), stage="s", version="v").root == str(
        tmp_path)


@pytest.mark.parametrize("scheme", ["s3", "memory"])
@pytest.mark.parametrize("where", ["prefix", "file"])
def test_a_manifest_naming_paths_outside_the_cache_writes_nothing_there(
        s3, tmp_path, scheme, where):
    """A planted manifest whose prefix or file name climbs out of the version: the version
    is refused in one line and nothing is written outside this machine's cache."""
    import hashlib

    from tasks.storage.store import filesystem

    root = f"s3://{s3.bucket()}/hp" if scheme == "s3" else f"memory://trav-{where}-{id(tmp_path)}"
    fs, base = filesystem(root)
    target = tmp_path / "site-packages"
    climb = "../" * 12 + str(target).lstrip("/")
    prefix, name = (climb, "evil.pth") if where == "prefix" else ("data-x", f"{climb}/evil.pth")
    payload = b"import os; os.system('touch pwned')\n"
    fs.pipe_file(f"{base}/stage/v9/manifest.json", json.dumps({
        "prefix": prefix, "files": {name: hashlib.sha256(payload).hexdigest()}}).encode())
    fs.pipe_file(f"{base}/stage/v9/{prefix}/{name}", payload)
    with pytest.raises(ArtifactError, match="a path outside its version"):
        resolve(root, "stage", "v9")
    assert not (target / "evil.pth").exists() and not target.exists()


def test_a_pointer_naming_a_path_is_refused(tmp_path):
    (tmp_path / "select").mkdir()
    (tmp_path / "select" / "LATEST").write_text("../../etc\n")
    with pytest.raises(ArtifactError, match="not a version"):
        resolve(tmp_path, "select")
    with pytest.raises(ValueError, match="not a stage or version name"):
        ArtifactRef(root=tmp_path, stage="select", version="../x")
