"""Production is the replay of its history: rollback walks back the promotions, and a crash
between the history line and the CURRENT pointer never leaves two truths."""

from __future__ import annotations

import json

import pytest

from tasks import artifacts
from tasks.artifacts import (
    ArtifactError,
    production_lock,
    read_history,
    read_pointer,
    read_production,
    record,
)
from tasks.promote import rollback


def _models(root, *names):
    for name in names:
        artifacts.build(root, "select", name, lambda out: (out / "model.pt").write_text("m"),
                        parameters={}, upstream={}, code_version="c")


def _promote(root, model):
    with production_lock(root):
        record(root, {"action": "promote", "model": model, "reason": "by hand"}, promote=True)


def test_rollback_walks_back_through_the_promotions_then_says_nothing_earlier(tmp_path):
    root = str(tmp_path)
    _models(root, "aaaa", "bbbb", "cccc")
    for model in ("aaaa", "bbbb", "cccc"):
        _promote(root, model)
    assert rollback(root)["model"] == "bbbb" and read_production(root)["model"] == "bbbb"
    assert rollback(root)["model"] == "aaaa" and read_production(root)["model"] == "aaaa"
    with pytest.raises(ArtifactError, match="aaaa is the first model promoted .* nothing "
                                            "earlier"):
        rollback(root)
    assert read_pointer(root)["model"] == "aaaa"
    assert [e["model"] for e in read_history(root)] == ["aaaa", "bbbb", "cccc", "bbbb", "aaaa"]
    _promote(root, "cccc")  # a new promotion goes on top of what is left
    assert rollback(root)["model"] == "aaaa"


def test_a_crash_between_history_and_pointer_leaves_one_truth(tmp_path, monkeypatch):
    """The history line is the commit: a crash before CURRENT is rewritten leaves CURRENT
    stale, but production (and rollback) is what the history says."""
    root = str(tmp_path)
    _models(root, "aaaa", "bbbb", "cccc")
    _promote(root, "aaaa")
    _promote(root, "bbbb")

    def crash(_root):
        raise OSError("No space left on device")

    monkeypatch.setattr(artifacts, "write_pointer", crash)
    with pytest.raises(OSError):
        _promote(root, "cccc")
    monkeypatch.undo()
    assert read_pointer(root)["model"] == "bbbb"  # stale file ...
    assert read_production(root)["model"] == "cccc"  # ... never trusted
    back = rollback(root)
    assert back["model"] == "bbbb" and back["reason"] == "rolled back from cccc"
    assert read_pointer(root)["model"] == read_production(root)["model"] == "bbbb"


def test_a_torn_history_line_is_no_decision_and_the_next_append_is_whole(tmp_path):
    root = str(tmp_path)
    _models(root, "aaaa", "bbbb")
    _promote(root, "aaaa")
    history = tmp_path / "production" / "history.jsonl"
    with history.open("a") as fh:
        fh.write('{"action": "promote", "model": "bbbb", "promo')  # killed mid-append
    problems: list[str] = []
    assert [e["model"] for e in read_history(root, problems)] == ["aaaa"]
    assert "line 2 is not a JSON object" in problems[0]
    assert read_production(root)["model"] == "aaaa"
    _promote(root, "bbbb")
    lines = history.read_text().splitlines()
    assert json.loads(lines[-1])["model"] == "bbbb"
    assert read_production(root)["model"] == "bbbb"
