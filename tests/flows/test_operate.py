"""Operating the pipeline against a real ``prefect server``: a served, scheduled deployment,
a run triggered on it, Prefect's retry of a failed run, and the dashboard's artifacts."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.settings import PREFECT_API_URL, temporary_settings

from tasks.report import CURVES_KEY, METRICS_KEY, MODEL_CARD_KEY
from tests.conftest import write_config

DEPLOYMENT = "house-price/ci-schedule"
# Quick candidates for the tests of rerunning: the stages' states, not the models, are checked.
LINEAR = {"candidates": [{"name": "lasso", "kind": "lasso", "alpha": 5e-4, "max_iter": 2000},
                         {"name": "ridge", "kind": "ridge", "alpha": 10.0}], "search": []}


def houseprice(args, api, **kw):
    env = {**os.environ, "PREFECT_API_URL": api}
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


@pytest.fixture(scope="module")
def served(prefect_server, data_server, tmp_path_factory):
    """``houseprice serve --cron`` in a subprocess; yields (api url, config dict)."""
    tmp = tmp_path_factory.mktemp("served")
    config = write_config(tmp / "config.json", artifacts_dir=str(tmp / "artifacts"),
                          data={"url": data_server.url, "cache_dir": str(tmp / "cache")},
                          train={"n_splits": 3})
    proc = houseprice(["serve", "--cron", "0 3 * * *", "--name", "ci-schedule",
                       "--config", str(config), "--epochs", "3"], prefect_server)
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        deadline = time.monotonic() + 90
        while True:
            with get_client(sync_client=True) as client:
                try:
                    client.read_deployment_by_name(DEPLOYMENT)
                    break
                except Exception:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        out = proc.stdout.read() if proc.poll() is not None else ""
                        os.killpg(proc.pid, signal.SIGKILL)
                        pytest.fail(f"serve did not register the deployment: {out[-2000:]}")
            time.sleep(0.5)
        yield prefect_server, json.loads(config.read_text())
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _task_states(client, flow_run_id, attempt: int) -> dict[str, list[str]]:
    """Stage -> states of the task runs of one attempt (run count) of a flow run."""
    runs = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    out: dict[str, list[str]] = {}
    for r in runs:
        if r.flow_run_run_count == attempt:
            out.setdefault(r.name.split("[")[0], []).append(r.state.name)
    return out


def test_serve_registers_the_cron_schedule_and_a_triggered_run_completes(served):
    from prefect.deployments import run_deployment

    api, _ = served
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
        assert deployment.parameter_openapi_schema["properties"]["config"]  # editable
        started = time.monotonic()
        flow_run = run_deployment(DEPLOYMENT, timeout=300, poll_interval=1)
        elapsed = time.monotonic() - started
        assert flow_run.state.is_completed(), flow_run.state.message
        print(f"scheduled deployment run, trigger to Completed: {elapsed:.1f} s")
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
        by_key = {a.key: a for a in artifacts if a.key}
        assert {METRICS_KEY, MODEL_CARD_KEY, CURVES_KEY} <= set(by_key)
        assert by_key[METRICS_KEY].type == "table"
        assert "# Selected model:" in by_key[MODEL_CARD_KEY].data
        assert "data:image/png;base64," in by_key[CURVES_KEY].data
        progress = [a for a in artifacts if a.type == "progress"]
        assert progress and all(float(a.data) == 100.0 for a in progress)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[flow_run.id])), limit=200)  # this run's: a busy server holds many
        fold_lines = [log.message for log in logs
                      if ": fold " in log.message and "valid log RMSE" in log.message]
        assert len(fold_lines) >= 3  # one line per finished fold


def test_failed_run_retried_with_houseprice_rerun_skips_completed_stages(served, tmp_path):
    from prefect.deployments import run_deployment

    api, config = served
    root = tmp_path / "artifacts"
    root.mkdir()
    blocker = root / "train"
    blocker.write_text("a file where the train stage keeps its versions")  # the fault
    params = {"config": {**config, **LINEAR, "artifacts_dir": str(root)}}
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        failed = run_deployment(DEPLOYMENT, parameters=params, timeout=300, poll_interval=1)
        assert failed.state.is_failed()
        assert "stage 'train' failed" in failed.state.message
        blocker.unlink()  # the fault is fixed
        proc = houseprice(["rerun", str(failed.id), "--timeout", "300"], api)
        out, _ = proc.communicate(timeout=360)
        assert proc.returncode == 0, out[-2000:]
        assert f"flow run {failed.id} completed" in out
        run = client.read_flow_run(failed.id)
        assert run.state.is_completed() and run.run_count == 2
        states = _task_states(client, failed.id, attempt=2)
        for stage in ("download", "preprocess", "tensorize"):
            assert states[stage] == ["Cached"], (stage, states)
        for stage in ("train", "select", "predict"):
            assert set(states[stage]) == {"Completed"}, (stage, states)


def test_rerun_of_unknown_or_bad_id_is_one_clear_line(prefect_server):
    proc = houseprice(["rerun", str(uuid.uuid4())], prefect_server)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "no flow run" in out.strip().splitlines()[-1]
    proc = houseprice(["rerun", "not-an-id"], prefect_server)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "is not a flow run id" in out.strip().splitlines()[-1]


def test_serve_without_a_server_says_how_to_start_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "serve", "--cron", "0 3 * * *"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("houseprice: error: scheduling needs a Prefect server that "
                           "outlives this command, and HOUSEPRICE_API_KEEP_S=0 asks for a "
                           "temporary one: unset HOUSEPRICE_API_KEEP_S")
    assert "prefect server start" in line


def test_prefect_yaml_deploys_both_flows():
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text())
    train, score = spec["deployments"]
    assert train["entrypoint"] == "flows/pipeline.py:house_price_pipeline"
    assert score["entrypoint"] == "flows/inbox.py:house_price_score"
    for dep in (train, score):
        assert dep["work_pool"]["name"] and dep["schedules"][0]["cron"]
    from flows.inbox import house_price_score
    from flows.pipeline import house_price_pipeline  # the entrypoints resolve
    from tasks.config import ScoreConfig

    assert house_price_pipeline.name == "house-price"
    assert house_price_score.name == "house-price-score"
    assert ScoreConfig.model_validate(score["parameters"]["config"]).model == "production"


def test_failed_cli_run_says_how_to_retry_and_rerun_completes_it_in_place(
        prefect_server, data_server, tmp_path):
    root = tmp_path / "artifacts"
    root.mkdir()
    (root / "train").write_text("a file where the train stage keeps its versions")
    config = write_config(tmp_path / "c.json", train={"n_splits": 3}, **LINEAR)
    args = ["run", "--config", str(config), "--artifacts", str(root),
            "--data-url", data_server.url, "--data-dir", str(tmp_path / "cache")]
    proc = houseprice(args, prefect_server)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1
    line = [x for x in out.splitlines() if x.startswith("houseprice: error")][-1]
    assert "stage 'train' failed" in line and "houseprice rerun " in line
    run_id = re.search(r"'houseprice rerun ([0-9a-f-]{36})'", line).group(1)
    (root / "train").unlink()  # fixed
    proc = houseprice(["rerun", run_id], prefect_server)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    assert f"flow run {run_id} completed" in out
    with temporary_settings({PREFECT_API_URL: prefect_server}), \
            get_client(sync_client=True) as client:
        run = client.read_flow_run(uuid.UUID(run_id))
        assert run.state.is_completed() and run.run_count == 2
        states = _task_states(client, run.id, attempt=2)
    for stage in ("download", "preprocess", "tensorize"):
        assert states[stage] == ["Cached"], (stage, states)
    assert set(states["train"]) == {"Completed"} and states["predict"] == ["Completed"]


def test_serve_both_flows_on_an_interval_registers_two_deployments(prefect_server, tmp_path):
    from datetime import timedelta

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = write_config(tmp_path / "c.json", artifacts_dir=str(tmp_path / "artifacts"))
    missing = houseprice(["serve", "--flow", "both", "--interval", "3600", "--config",
                          str(config)], prefect_server)
    out, _ = missing.communicate(timeout=60)
    assert missing.returncode == 1
    assert "serving the scoring flow needs --inbox SOURCE" in out.strip().splitlines()[-1]
    proc = houseprice(["serve", "--flow", "both", "--interval", "3600", "--name", "ci-both",
                       "--inbox", str(inbox), "--config", str(config)], prefect_server)
    names = ["house-price/ci-both", "house-price-score/ci-both"]
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server}), \
                get_client(sync_client=True) as client:
            deadline = time.monotonic() + 90
            while True:
                try:
                    deployments = [client.read_deployment_by_name(n) for n in names]
                    break
                except Exception:
                    assert proc.poll() is None and time.monotonic() < deadline, \
                        proc.stdout.read() if proc.poll() is not None else "timed out"
                    time.sleep(0.5)
        for d in deployments:
            assert [s.schedule.interval for s in d.schedules] == [timedelta(seconds=3600)]
        score = deployments[1].parameters["config"]
        assert score["inbox"] == str(inbox) and score["model"] == "production"
        assert score["artifacts_dir"] == str(tmp_path / "artifacts")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        # Deleted with their scheduled runs: the server is shared with other tests.
        with temporary_settings({PREFECT_API_URL: prefect_server}), \
                get_client(sync_client=True) as client:
            for name in names:
                with contextlib.suppress(Exception):
                    client.delete_deployment(client.read_deployment_by_name(name).id)
    assert (f"houseprice: serving deployment(s) {', '.join(names)} on {prefect_server}, "
            "every 3600 s") in out
