"""The living-data loop against a real ``prefect server``: a monthly feed replayed run by run,
the promotion gate's decisions, the production pointer and its history, and the scoring
deployment (Cached rescoring, a drift event read back from the server's events API)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from tasks.data.feed import make_feed
from tasks.inference.batch import load_model
from tasks.promote import list_models, promote_by_hand, rollback
from tasks.storage.artifacts import ArtifactError, ArtifactRef, read_history, read_production
from tests.conftest import TRAIN_CSV, stop, task_states

# Quick linear candidates: the loop, not the accuracy, is under test here.
FAST = {"candidates": [{"name": "lasso", "kind": "lasso", "alpha": 5e-4, "max_iter": 2000},
                       {"name": "ridge", "kind": "ridge", "alpha": 10.0}],
        "search": [], "train": {"n_splits": 3, "repeats": 1}}
WORSE = {"candidates": [{"name": "weak", "kind": "ridge", "alpha": 1e5}], "search": [],
         "train": {"n_splits": 3, "repeats": 1}}
DIVERGING = {"candidates": [{"name": "too-hot", "kind": "linear", "optimizer": "sgd",
                             "lr": 1e6, "epochs": 3}], "search": [],
             "train": {"n_splits": 3, "repeats": 1}}


def _latest_run(flow_name: str):
    """The latest run of ``flow_name`` started from the command line: the shared server
    also holds deployments' runs, some scheduled for later."""
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterDeploymentId,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(
                is_null_=True)), sort=FlowRunSort.START_TIME_DESC, limit=1)
    return run


def _loop(tmp: Path, api: str):
    """``houseprice run`` on a monthly feed under ``tmp``, as a user runs it, against the real
    server: returns (run, feed, root); ``run`` returns (exit code, last line, task states by
    stage, the flow run)."""
    feed, root = tmp / "sales", tmp / "artifacts"

    def run(overrides=FAST):
        config = tmp / "config.json"
        config.write_text(json.dumps(overrides))
        env = {**os.environ, "PREFECT_API_URL": api, "HOUSEPRICE_DATA_DIR": str(tmp / "cache")}
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--train",
             str(feed), "--data-url", str(TRAIN_CSV.parent), "--artifacts", str(root)],
            env=env, capture_output=True, text=True, timeout=300)
        with temporary_settings({PREFECT_API_URL: api}):
            flow_run = _latest_run("house-price")
            states = task_states(flow_run.id)
        # The summary is stdout's last line; an error, stderr's.
        lines = (proc.stdout if proc.returncode == 0 else proc.stderr).strip().splitlines()
        return proc.returncode, lines[-1] if lines else "", states, flow_run

    return run, feed, root


@pytest.fixture
def replay(prefect_server, tmp_path):
    """A fresh loop: no feed, no artifacts yet."""
    return _loop(tmp_path, prefect_server)


@pytest.fixture(scope="module")
def promoted(prefect_server, tmp_path_factory):
    """A loop with two models, the first production (the second, worse, not promoted);
    tests that change production put it back."""
    run, feed, root = _loop(tmp_path_factory.mktemp("promoted"), prefect_server)
    make_feed(TRAIN_CSV, feed, until="2008-12")
    for overrides in (FAST, WORSE):
        code, line, _, _ = run(overrides)
        assert code == 0, line
    assert len(list_models(root)) == 2 and read_production(root) is not None
    return run, feed, root


def test_replay_trains_promotes_caches_and_gates_on_new_rows(replay):
    run, feed, root = replay
    months = make_feed(TRAIN_CSV, feed, until="2008-12")
    assert sum(months.values()) == 947
    code, line, states, flow_run = run()
    assert code == 0, line
    assert "promoted to production (first healthy model" in line
    first = read_production(root)
    assert first["model"] in line and first["data_version"] in line
    assert re.fullmatch(rf"data {first['data_version'][:8]} · config [0-9a-f]{{8}} · "
                        r"\S+ 0\.\d{4} · promoted", flow_run.name), flow_run.name

    # The same source again: every stage after the listing is Cached, nothing promoted.
    code, line, states, _ = run()
    assert code == 0, line
    for stage in ("download", "preprocess", "tensorize", "train", "select", "predict"):
        assert set(states[stage]) == {"Cached"}, (stage, states)
    assert "no new data" in line
    assert read_production(root) == first

    # Three more months: retrained, and the gate compares on exactly the new rows.
    more = make_feed(TRAIN_CSV, feed, since="2009-01", until="2009-03")
    code, line, states, _ = run()
    assert code == 0, line
    assert set(states["train"]) == {"Completed"}
    decision = read_history(root)[-1]
    assert decision["basis"] == "new rows" and decision["rows"] == sum(more.values()) == 41
    assert decision["champion"] == first["model"]
    # The gate's figures, computed here another way: the champion predicts the new months'
    # files through the batch path; the challenger's out-of-fold predictions of those rows.
    new_rows = pd.concat([pd.read_csv(f) for f in sorted(feed.glob("2009-0[123].csv"))])
    truth = np.log(new_rows["SalePrice"].to_numpy())
    champion = load_model(ArtifactRef(root=str(root), stage="select", version=first["model"]))
    theirs = np.sqrt(np.mean((champion.predict_frame(new_rows)[0] - truth) ** 2))
    oof = pd.read_parquet(ArtifactRef(root=str(root), stage="select",
                                      version=decision["model"]).file("oof.parquet"))
    ours_pred = oof.set_index("Id").loc[new_rows["Id"].to_numpy(), "pred_log_price"]
    ours = np.sqrt(np.mean((ours_pred.to_numpy() - truth) ** 2))
    assert decision["champion_log_rmse"] == pytest.approx(theirs, rel=1e-6)
    assert decision["challenger_log_rmse"] == pytest.approx(ours, rel=1e-6)
    better = ours <= theirs  # promote.min_improvement is 0 by default
    assert decision["promoted"] == better
    assert read_production(root)["model"] == (decision["model"] if better else first["model"])
    assert ("promoted to production" if better else "not promoted") in line

    # A config made worse on purpose: not promoted, production unchanged.
    before = read_production(root)
    code, line, _, _ = run(WORSE)
    assert code == 0, line
    worse = read_history(root)[-1]
    # Production was trained on this run's data if the retrain above was promoted (compared
    # on their shared out-of-fold rows), else on three months less (compared on those rows).
    assert not worse["promoted"] and worse["basis"] == ("shared rows" if better else "new rows")
    assert worse["challenger_log_rmse"] > worse["champion_log_rmse"]
    assert "not promoted" in line and read_production(root) == before

    # A challenger that diverged: the run fails in select; production unchanged.
    code, line, _, _ = run(DIVERGING)
    assert code == 1 and "no healthy candidate" in line
    assert read_production(root) == before

    # A bad new file: the run fails naming it, before training; production unchanged.
    (feed / "2009-04.csv").write_text((feed / "2009-03.csv").read_text()[:-30])
    code, line, states, _ = run()
    assert code == 1 and "2009-04.csv" in line, line
    assert "train" not in states and read_production(root) == before
    (feed / "2009-04.csv").unlink()

    # The history: one line per gate decision, promotions marked.
    history = read_history(root)
    assert len(history) == 4 and [h["promoted"] for h in history][:2] == [True, False]


def test_promote_rollback_and_their_errors(promoted):
    _, _, root = promoted
    current = read_production(root)["model"]
    other = next(m["version"] for m in list_models(root) if m["version"] != current)
    promote_by_hand(root, other)
    assert read_production(root)["model"] == other
    assert [m["version"] for m in list_models(root) if m["production"]] == [other]
    back = rollback(root)
    assert back["model"] == current and read_production(root)["model"] == current
    assert read_history(root)[-1]["action"] == "rollback"
    with pytest.raises(ArtifactError, match="no intact model ffff"):
        promote_by_hand(root, "ffff")


def test_rollback_without_an_earlier_production_model_says_so(tmp_path):
    with pytest.raises(ArtifactError, match="nothing to roll back"):
        rollback(str(tmp_path))


def test_racing_promotions_leave_one_history_and_a_whole_pointer(promoted):
    """Threads promoting two different models at once while a reader reads production and
    the CURRENT pointer: every read is whole and names one model with that model's own
    fields (never one model's name with the other's predictions), the history has one line
    per promotion, and production ends as the last line says."""
    from tasks.storage.artifacts import read_pointer

    _, _, root = promoted
    first = read_production(root)
    a, b = (m["version"] for m in list_models(root))
    for v in (a, b):
        promote_by_hand(root, v, reason="race")
    pairs = {e["model"]: e["predictions"] for e in read_history(root)[-2:]}
    assert set(pairs) == {a, b} and pairs[a] != pairs[b]
    before = len(read_history(root))
    errors, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                for current in (read_production(root), read_pointer(root)):
                    assert pairs[current["model"]] == current["predictions"], current
            except Exception as exc:  # noqa: BLE001 - any torn or mixed read is the failure
                errors.append(exc)

    def writer(version):
        for _ in range(8):
            promote_by_hand(root, version, reason="race")

    threads = [threading.Thread(target=reader)] + [
        threading.Thread(target=writer, args=(v,)) for v in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    assert not errors, errors[:3]
    history = read_history(root)
    assert len(history) == before + 32
    assert sorted(e["model"] for e in history[before:]) == sorted([a] * 16 + [b] * 16)
    assert read_production(root)["model"] == read_pointer(root)["model"] == history[-1]["model"]
    promote_by_hand(root, first["model"], reason="put back")


def _serve_score(api: str, inbox: Path, root: Path, cache: Path, log):
    env = {**os.environ, "PREFECT_API_URL": api, "HOUSEPRICE_DATA_DIR": str(cache)}
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--flow", "score", "--inbox", str(inbox),
         "--artifacts", str(root), "--name", "ci-score", "--drift-threshold", "0.3"],
        env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_scoring_deployment_scores_caches_and_raises_drift_events(promoted, prefect_server,
                                                                 tmp_path):
    from prefect.deployments import run_deployment
    from prefect.events.filters import EventFilter, EventNameFilter

    _, _, root = promoted
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    # Listings like the rows the model was trained on (no drift) ...
    listings = pd.read_csv(TRAIN_CSV).drop(columns="SalePrice")
    listings = listings[listings["YrSold"] == 2007].head(160)
    listings.head(100).to_csv(inbox / "listings-01.csv", index=False)
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed at the end
    proc = _serve_score(prefect_server, inbox, root, tmp_path / "cache", log)
    # Explicitly: a session fixture may have made another API current since.
    settings = temporary_settings({PREFECT_API_URL: prefect_server})
    settings.__enter__()
    try:
        deadline = time.monotonic() + 90
        with get_client(sync_client=True) as client:
            while True:
                try:
                    client.read_deployment_by_name("house-price-score/ci-score")
                    break
                except Exception:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        out = (tmp_path / "serve.log").read_text()[-2000:]
                        pytest.fail(f"serve did not register the scoring deployment: {out}")
                    time.sleep(0.5)

        def score_once():
            run = run_deployment("house-price-score/ci-score", timeout=120)
            assert run.state.is_completed(), run.state.message
            return task_states(run.id), run

        first, run = score_once()
        assert first["score"] == ["Completed"]
        with get_client(sync_client=True) as client:
            assert client.read_flow_run(run.id).name == "inbox inbox · model production"
        assert score_once()[0]["score"] == ["Cached"]  # same file, same model
        # ... and listings far out of its range: drift.
        drifting = listings.iloc[100:160].copy()
        drifting["GrLivArea"] = drifting["GrLivArea"] * 10
        drifting.to_csv(inbox / "listings-02.csv", index=False)
        (inbox / "broken.csv").write_text("Id,MSSubClass\n1")  # fails alone, named
        run = run_deployment("house-price-score/ci-score", timeout=120)
        assert run.state.is_failed() and "broken.csv" in run.state.message
        states = task_states(run.id)
        assert sorted(states["score"]) == ["Cached", "Completed", "Failed"]
        deadline = time.monotonic() + 30
        with get_client(sync_client=True) as client:
            while True:
                page = client.read_events(filter=EventFilter(
                    event=EventNameFilter(name=["houseprice.drift.detected"])), limit=50)
                files = [e.payload["file"] for e in page.events]
                if files or time.monotonic() > deadline:
                    break
                time.sleep(1)
        assert files == ["listings-02.csv"]
        event = page.events[0]
        assert event.payload["share"] > 0.3 and event.payload["rows"] == 60
    finally:
        settings.__exit__(None, None, None)
        stop(proc)
        log.close()
    shutil.rmtree(inbox)
