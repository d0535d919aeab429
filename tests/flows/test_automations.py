"""Automations on the kept local server, as a user installs them with ``houseprice serve
--webhook``: a drift event retrains through the training deployment and the gate decides; a
failed run and a promotion notify a loopback webhook; the dashboard's Retry completes a
failed run with its finished stages Cached."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess

import pytest

from tests.conftest import write_config
from tests.flows.kept import SHOTS, cli, retry_in_browser, serve


class Receiver:
    """A loopback HTTP endpoint that keeps the JSON bodies POSTed to it (the webhook)."""

    def __init__(self) -> None:
        import http.server
        import json
        import threading

        bodies = self.bodies = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                size = int(self.headers.get("Content-Length") or 0)
                bodies.append(json.loads(self.rfile.read(size) or b"{}"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait_for(self, text: str, timeout: float = 90.0) -> dict:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for body in list(self.bodies):
                if text in body.get("subject", ""):
                    return body
            time.sleep(0.5)
        raise AssertionError(f"no notification with {text!r} in {timeout:.0f} s: {self.bodies}")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.serial
def test_drift_retrains_through_the_automation_and_failures_and_promotions_notify(
        kept_env, data_server, tmp_path):
    """Served with a webhook, on the local server: the first training run promotes (a
    notification); a scored file that drifts emits the event, the automation runs the
    training deployment, and the gate decides on that run (its record read back); a failed
    run notifies the webhook, and its retry from the dashboard completes; a promotion by
    hand notifies too."""
    import json
    import signal
    import time

    import pandas as pd
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.deployments import run_deployment
    from prefect.events.filters import EventFilter, EventNameFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.automations import FAILED, PROMOTED, RETRAIN
    from tasks.storage.artifacts import read_history
    from tests.conftest import TRAIN_CSV

    root = tmp_path / "arts"
    config = write_config(tmp_path / "ridge.json", candidates=[
        {"name": "ridge", "kind": "ridge", "alpha": 10.0}], search=[], artifacts_dir=str(root),
        data={"url": data_server.url, "cache_dir": str(tmp_path / "cache")})
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    listings = pd.read_csv(TRAIN_CSV).drop(columns="SalePrice").head(60)
    listings["GrLivArea"] *= 10  # far out of the training range: drift
    listings.to_csv(inbox / "listings.csv", index=False)
    hook = Receiver()
    proc, lines = serve("--flow", "both", "--inbox", str(inbox), "--drift-threshold", "0.3",
                         "--cron", "0 3 * * *", "--name", "auto", "--config", str(config),
                         "--webhook", hook.url, env=kept_env)
    try:
        installed = [line for line in lines if line.startswith("houseprice: automation ")]
        assert len(installed) == 3 and all(
            line.startswith(f"houseprice: automation {name}: ")
            for line, name in zip(installed, (RETRAIN, FAILED, PROMOTED), strict=True)), lines
        api = re.search(r"on (http://127\.0\.0\.1:\d+/api)", lines[0])[1]
        with temporary_settings({PREFECT_API_URL: api}), get_client(
                sync_client=True) as client:
            first = run_deployment("house-price/auto", timeout=300, poll_interval=1)
            assert first.state.is_completed(), first.state.message
            promoted = hook.wait_for("promoted")
            assert read_history(str(root))[-1]["model"] in promoted["subject"]

            scored = run_deployment("house-price-score/auto", timeout=300, poll_interval=1)
            assert scored.state.is_completed(), scored.state.message
            deadline = time.monotonic() + 60
            while True:  # events are persisted by a service, shortly after
                events = client.read_events(filter=EventFilter(
                    event=EventNameFilter(name=["houseprice.drift.detected"])), limit=10).events
                if events or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert [e.payload["file"] for e in events] == ["listings.csv"]
            train_id = client.read_deployment_by_name("house-price/auto").id
            deadline = time.monotonic() + 120
            while True:  # the automation's run of the training deployment, to its end
                runs = [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(
                    id=DeploymentFilterId(any_=[train_id]))) if r.id != first.id
                    and r.state and not r.state.is_scheduled()]
                if runs and runs[0].state.is_final():
                    break
                assert time.monotonic() < deadline, f"no retrain run: {runs}"
                time.sleep(1)
            (retrain,) = runs
            assert retrain.state.is_completed(), retrain.state.message
            gate = [e for e in read_history(str(root)) if e.get("action") == "gate"
                    and e.get("flow_run_id") == str(retrain.id)]
            assert len(gate) == 1 and gate[0]["promote"] is False  # same data: no new model
            assert "no new data" in gate[0]["reason"]

            (root / "train").rename(root / "train-away")
            (root / "train").write_text("a file where the train stage keeps its versions")
            # Another penalty: a candidate not trained yet, whose stage the fault stops.
            params = client.read_deployment_by_name("house-price/auto").parameters
            params["config"]["candidates"][0]["alpha"] = 20.0
            failed = run_deployment("house-price/auto", parameters=params, timeout=300,
                                    poll_interval=1)
            assert failed.state.is_failed()
            note = hook.wait_for("Failed")
            assert failed.name in note["subject"] and "stage 'train' failed" in note["body"]
            assert f"/runs/flow-run/{failed.id}" in note["body"]

            # The fault fixed, the dashboard's Retry: the served runner runs it again, and
            # the stages that had completed come back Cached.
            (root / "train").unlink()
            (root / "train-away").rename(root / "train")
            page_url = re.search(r"(http://\S+/runs/flow-run/\S+)", note["body"])[1]
            retry_in_browser(page_url, SHOTS / "retry")
            deadline = time.monotonic() + 180
            while not (run := client.read_flow_run(failed.id)).state.is_final() or \
                    run.run_count < 2:
                assert time.monotonic() < deadline, f"the retry did not end: {run.state}"
                time.sleep(1)
            assert run.state.is_completed(), run.state.message
            states = {}
            for r in client.read_task_runs(flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[failed.id]))):
                if r.flow_run_run_count == 2:
                    states.setdefault(r.name.split("[")[0], set()).add(r.state.name)
            for stage in ("download", "preprocess", "tensorize"):
                assert states[stage] == {"Cached"}, states
            assert states["train"] == {"Completed"}, states

            # A promotion by hand notifies too: the event goes to the kept local server.
            from tasks.promote import list_models

            other = next(m["version"] for m in list_models(str(root)) if not m["production"])
            told = len([b for b in hook.bodies if "promoted" in b.get("subject", "")])
            by_hand = cli("promote", other, "--artifacts", str(root), env=kept_env)
            assert by_hand.returncode == 0, by_hand.stderr
            assert by_hand.stdout.strip() == (
                f"houseprice: {other} is production (promoted by hand); "
                f"houseprice.model.promoted sent to {api}")
            deadline = time.monotonic() + 90
            while len(news := [b for b in hook.bodies
                               if "promoted" in b.get("subject", "")]) == told:
                assert time.monotonic() < deadline, hook.bodies
                time.sleep(0.5)
            assert news[-1]["subject"] == f"houseprice: model {other} promoted"
            assert "promoted by hand" in news[-1]["body"]
    finally:
        hook.close()
        proc.send_signal(signal.SIGINT)  # serving stops (checked in the test above)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=120)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert json.dumps(hook.bodies)  # every body was JSON


@pytest.mark.parametrize("command", [["automations"], ["serve", "--cron", "0 3 * * *"]])
def test_a_webhook_that_is_not_http_is_one_line_before_any_server(command, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), HOUSEPRICE_API_KEEP_S="300")
    proc = cli(*command, "--webhook", "hooks.example.com/x", env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "houseprice: error: webhook 'hooks.example.com/x' is not an http(s) URL: give the "
        "endpoint's URL (a Slack or Teams incoming webhook, or any HTTP endpoint)")
    assert not list((tmp_path / "prefect").glob("houseprice-api-*.json"))  # none started
