"""Production is the replay of its history: rollback walks back the promotions, and a crash
between the history line and the CURRENT pointer never leaves two truths."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.data.features import DataError
from tasks.promote import rollback
from tasks.storage import artifacts
from tasks.storage.artifacts import (
    ArtifactError,
    production_lock,
    read_history,
    read_pointer,
    read_production,
    record,
)


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


def _scored(root, name, ids, pred, logy, oof=True):
    """A select artifact holding out-of-fold predictions of rows ``ids`` (or none)."""
    import pandas as pd

    def write(out):
        (out / "model.pt").write_text("m")
        if oof:
            pd.DataFrame({"Id": ids, "pred_log_price": pred, "log_price": logy}).to_parquet(
                out / "oof.parquet")

    artifacts.build(root, "select", name, write, parameters={}, upstream={}, code_version="c")
    return artifacts.ArtifactRef(root=root, stage="select", version=name)


@pytest.fixture
def duel(tmp_path):
    """A champion and a challenger scored on the same 200 rows (no new rows), the
    challenger's errors half the champion's; their log RMSEs computed here by hand."""
    import numpy as np

    rng = np.random.default_rng(3)
    ids, logy = np.arange(200), 12 + rng.normal(0, 0.4, 200)
    noise = rng.normal(0, 0.1, 200)
    root = str(tmp_path)
    champion = _scored(root, "aaaa", ids, logy + noise, logy)
    challenger = _scored(root, "bbbb", ids, logy + noise / 2, logy)
    by_hand = float(np.sqrt(np.mean(noise ** 2)))
    return root, champion, challenger, by_hand


def test_the_gate_promotes_a_better_challenger_on_the_rows_both_were_scored_on(duel):
    from tasks.promote import compare

    root, champion, challenger, by_hand = duel
    d = compare(challenger, champion, challenger, min_improvement=0.0)
    assert d.promote and d.basis == "shared rows" and d.rows == 200
    assert d.champion_log_rmse == pytest.approx(by_hand)
    assert d.challenger_log_rmse == pytest.approx(by_hand / 2)
    assert "better" in d.reason and d.champion == "aaaa"
    back = compare(champion, challenger, champion, min_improvement=0.0)  # roles swapped
    assert not back.promote and back.reason.endswith(": worse")


def test_min_improvement_holds_back_a_challenger_better_by_less(duel):
    from tasks.promote import compare

    root, champion, challenger, by_hand = duel
    gain = by_hand / 2
    assert compare(challenger, champion, challenger, gain * 0.9).promote
    held = compare(challenger, champion, challenger, gain * 1.1)
    assert not held.promote and "not better enough (needs an improvement of" in held.reason


def test_an_unusable_champion_is_replaced(duel):
    import numpy as np

    from tasks.promote import compare

    root, _, challenger, _ = duel
    broken = _scored(root, "cccc", np.arange(3), None, None, oof=False)  # no predictions kept
    d = compare(challenger, broken, challenger, min_improvement=0.0)
    assert d.promote and d.basis == "champion unusable" and "cccc is not usable" in d.reason


def test_the_champion_is_scored_on_rows_picked_from_the_file_in_order(trained):
    """The gate's rows are picked from the training file a batch at a time: the champion's
    predictions of them, in the order asked, are its predictions of the same rows read
    whole; an Id the file lacks is one line."""
    from tasks.data.features import read_csv
    from tasks.inference.batch import load_model
    from tasks.promote import _champion_predictions
    from tasks.select import lineage
    from tasks.storage.artifacts import ArtifactRef, resolve

    cfg, result = trained
    champion = resolve(cfg.artifacts_dir, "select", result["model_version"])
    (raw,) = lineage(champion)["download"]
    raw = ArtifactRef(root=cfg.artifacts_dir, stage="download", version=raw)
    frame = read_csv(raw.file("train.csv"))
    ids = frame["Id"].to_numpy()[[-1, 2, 40, 0, 7]]
    got = _champion_predictions(champion, raw, ids)
    want = load_model(champion).predict_frame(frame.set_index("Id").loc[ids].reset_index())[0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(DataError, match="train.csv has no row with Id 987654321, which the "
                                        "challenger was scored on; rerun from download"):
        _champion_predictions(champion, raw, np.array([ids[0], 987654321]))
