"""The living-data loop against a real ``prefect server``: a monthly feed replayed run by run,
the promotion gate's decisions, the production pointer and its history, and the scoring
deployment (Cached rescoring, a drift event read back from the server's events API)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from tasks.artifacts import ArtifactError, read_history, read_production
from tasks.feed import make_feed
from tasks.promote import promote_by_hand, rollback
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
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(
            any_=[flow_name])), sort=FlowRunSort.START_TIME_DESC, limit=1)
    return run


@pytest.fixture(scope="module")
def replay(prefect_server, tmp_path_factory):
    """``houseprice run`` on a monthly feed, as a user runs it, against the real server:
    returns (exit code, last line, task states by stage, the flow run)."""
    tmp = tmp_path_factory.mktemp("living")
    feed, root = tmp / "sales", tmp / "artifacts"

    def run(overrides=FAST):
        config = tmp / "config.json"
        config.write_text(json.dumps(overrides))
        env = {**os.environ, "PREFECT_API_URL": prefect_server,
               "HOUSEPRICE_DATA_DIR": str(tmp / "cache")}
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--train",
             str(feed), "--data-url", str(TRAIN_CSV.parent), "--artifacts", str(root)],
            env=env, capture_output=True, text=True, timeout=300)
        with temporary_settings({PREFECT_API_URL: prefect_server}):
            flow_run = _latest_run("house-price")
            states = task_states(flow_run.id)
        # The summary is stdout's last line; an error, stderr's.
        lines = (proc.stdout if proc.returncode == 0 else proc.stderr).strip().splitlines()
        return proc.returncode, lines[-1] if lines else "", states, flow_run

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
    assert flow_run.name == f"data {first['data_version'][:8]} · config " + \
        flow_run.name.rsplit(" ", 1)[1]

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
    better = decision["challenger_log_rmse"] <= decision["champion_log_rmse"]
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


def test_promote_rollback_and_their_errors(replay):
    from tasks.promote import list_models

    _, _, root = replay
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


def test_racing_promotions_leave_one_history_and_a_whole_pointer(trained):
    """Threads promoting two models at once while a reader reads the pointer: every read
    is whole JSON naming one of them, and the history has one line per promotion."""
    cfg, result = trained
    root = cfg.artifacts_dir
    version = result["model_version"]
    before = len(read_history(root))
    errors, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                current = read_production(root)
                assert current is None or current["model"] == version
            except Exception as exc:  # noqa: BLE001 - any torn read is the failure
                errors.append(exc)

    def writer():
        for _ in range(10):
            promote_by_hand(root, version, reason="race")

    threads = [threading.Thread(target=reader)] + [threading.Thread(target=writer)
                                                   for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    assert not errors
    lines = (Path(root) / "production" / "history.jsonl").read_text().splitlines()
    assert len(lines) == before + 30 and all(json.loads(line)["model"] for line in lines)


def _serve_score(api: str, inbox: Path, root: Path, cache: Path, log):
    env = {**os.environ, "PREFECT_API_URL": api, "HOUSEPRICE_DATA_DIR": str(cache)}
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--flow", "score", "--inbox", str(inbox),
         "--artifacts", str(root), "--name", "ci-score", "--drift-threshold", "0.3"],
        env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_scoring_deployment_scores_caches_and_raises_drift_events(replay, prefect_server,
                                                                 tmp_path):
    from prefect.deployments import run_deployment
    from prefect.events.filters import EventFilter, EventNameFilter

    _, _, root = replay
    assert read_production(root) is not None  # the replay promoted a model
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
            return task_states(run.id)

        first = score_once()
        assert first["score"] == ["Completed"]
        assert _latest_run("house-price-score").name == "inbox inbox · model production"
        assert score_once()["score"] == ["Cached"]  # same file, same model
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
