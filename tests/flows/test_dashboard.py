"""The dashboard as a person meets it: a run without PREFECT_API_URL uses the kept local
server (API, dashboard and services), prints its flow run's link, and that link opens the
run with its stages in a real browser (Debian's Chromium, driven by Playwright).

Screenshots go to ``HOUSEPRICE_SCREENSHOTS`` (default ``.pytest-screenshots/`` in the
repository), kept whether the test passes or fails, so a failure can be looked at."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flows.commands.server import dashboard_url, run_link, stop_kept_api
from tests.conftest import REPO, write_config

CHROMIUM = os.environ.get("HOUSEPRICE_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("HOUSEPRICE_SCREENSHOTS", REPO / ".pytest-screenshots"))
STAGES = ("download", "preprocess", "tensorize", "train[ridge]", "select", "predict")


def _cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _serve(*args: str, env: dict[str, str]) -> tuple[subprocess.Popen, list[str]]:
    """``houseprice serve *args`` started, and its lines up to the one saying how to stop."""
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", *args], env=env,
                            cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[str] = []
    while not any(line.startswith("houseprice: Ctrl-C stops serving") for line in lines):
        line = proc.stdout.readline()
        if not line:
            proc.kill()
            raise AssertionError("serve ended early: " + "".join(lines)[-2000:])
        lines.append(line)
    return proc, lines


def _browser():
    """Playwright's Chromium: Debian's binary (no browser download is reachable here)."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install it with 'apt-get install -y "
                    "chromium' (.ci/run does) or set HOUSEPRICE_CHROMIUM to its path")
    from playwright.sync_api import sync_playwright

    return sync_playwright()


@pytest.fixture(scope="module")
def kept_env(tmp_path_factory):
    """The environment of a user with no Prefect server of their own: a fresh Prefect home,
    the local server kept between runs (started by the first command that needs it)."""
    home = tmp_path_factory.mktemp("kept") / "prefect"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), HOUSEPRICE_API_KEEP_S="300")
    yield env
    stop_kept_api(home)


def test_the_printed_link_opens_the_run_with_its_stages(kept_env, data_server, tmp_path):
    config = write_config(tmp_path / "ridge.json", candidates=[
        {"name": "ridge", "kind": "ridge", "alpha": 10.0}], search=[])
    proc = _cli("run", "--config", str(config), "--data-url", data_server.url, "--artifacts",
                str(tmp_path / "arts"), "--data-dir", str(tmp_path / "cache"), env=kept_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = proc.stdout.splitlines()[0]
    base = re.search(r"dashboard (http://127\.0\.0\.1:\d+)\)", first)
    assert base, first
    link = re.search(r"^houseprice: flow run ([0-9a-f-]{36}): (\S+)$", proc.stdout, re.M)
    assert link, proc.stdout[:2000]
    run_id, url = link.groups()
    assert url == f"{base[1]}/runs/flow-run/{run_id}"

    status = _cli("server", "status", env=kept_env, timeout=60)
    assert status.returncode == 0 and f"dashboard {base[1]}," in status.stdout, status.stdout
    shown = _cli("dashboard", "--no-open", env=kept_env, timeout=60)
    assert shown.stdout.strip() == f"houseprice: the Prefect dashboard: {base[1]}"

    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = SHOTS / "flow-run.png"
    with _browser() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url, wait_until="networkidle", timeout=90_000)
            # The run's page: its name as the title, then its task runs in the graph and log.
            page.get_by_text("Finished in state", exact=False).first.wait_for(timeout=60_000)
            page.screenshot(path=str(shot))
            title, text = page.title(), page.inner_text("body")
            # The run's own artifacts: the result table, model card, curves, promotion.
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("house-price-metrics").first.wait_for(timeout=30_000)
            page.screenshot(path=str(SHOTS / "flow-run-artifacts.png"))
            artifacts = page.inner_text("body")
        finally:
            browser.close()
    assert title.startswith("Flow Run: data "), (title, shot)
    assert "Completed" in text, shot
    for stage in STAGES:
        assert stage in text, (stage, shot)
    for key in ("house-price-metrics", "house-price-model-card", "house-price-promotion"):
        assert key in artifacts, (key, SHOTS / "flow-run-artifacts.png")

    stop = _cli("server", "stop", env=kept_env, timeout=60)
    assert stop.returncode == 0 and "stopped 1 local Prefect server" in stop.stdout
    after = _cli("server", "status", env=kept_env, timeout=60)
    assert after.returncode == 1 and "no local Prefect server runs" in after.stdout


def test_dashboard_refuses_a_temporary_api_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), HOUSEPRICE_API_KEEP_S="0")
    proc = _cli("dashboard", "--no-open", env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "houseprice: error: HOUSEPRICE_API_KEEP_S=0: runs use a temporary Prefect API with no "
        "dashboard; unset HOUSEPRICE_API_KEEP_S to keep a local server with its dashboard")
    assert not list((tmp_path / "prefect").glob("houseprice-api-*.json"))  # none started


def test_dashboard_of_a_users_own_server_is_its_ui(prefect_server, tmp_path):
    env = {**os.environ, "PREFECT_API_URL": prefect_server,
           "PREFECT_HOME": str(tmp_path / "prefect")}
    proc = _cli("dashboard", "--no-open", env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"houseprice: the Prefect dashboard: "
                                   f"{dashboard_url(prefect_server)}")


def test_run_link_names_the_server_the_run_uses(monkeypatch):
    run = "31370e11-e836-4d89-9be5-f189a25c7e27"
    kept = "http://127.0.0.1:4321/api"
    monkeypatch.setenv("PREFECT_API_URL", kept)
    monkeypatch.setenv("HOUSEPRICE_EPHEMERAL_API", kept)
    monkeypatch.setenv("HOUSEPRICE_KEPT_API", kept)
    assert run_link(run) == f"http://127.0.0.1:4321/runs/flow-run/{run}"
    # The run's own temporary server has no dashboard, and is gone after the run.
    monkeypatch.delenv("HOUSEPRICE_KEPT_API")
    assert run_link(run) is None
    assert run_link("") is None
    monkeypatch.delenv("PREFECT_API_URL")
    assert run_link(run) is None


def test_a_server_status_without_a_server_exits_1(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    proc = _cli("server", "status", env=env, timeout=60)
    assert proc.returncode == 1
    assert proc.stdout.strip() == (
        f"houseprice: no local Prefect server runs for {tmp_path / 'prefect'}; 'houseprice "
        "dashboard' or a run starts one")


def test_serve_works_out_of_the_box_its_schedule_runs_and_ctrl_c_stops_it(
        kept_env, data_server, tmp_path):
    """No PREFECT_API_URL: serve registers the deployment on the local server and prints its
    next run and its page; the server's scheduler starts a run on time, which prints the
    stage lines and result table as ``houseprice run`` does; Ctrl-C stops serving."""
    import signal
    import time

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    config = write_config(tmp_path / "ridge.json", candidates=[
        {"name": "ridge", "kind": "ridge", "alpha": 10.0}], search=[],
        artifacts_dir=str(tmp_path / "arts"),
        data={"url": data_server.url, "cache_dir": str(tmp_path / "cache")})
    proc, lines = _serve("--interval", "20", "--name", "every-20s", "--config", str(config),
                         env=kept_env)
    try:
        api = re.search(r"on (http://127\.0\.0\.1:\d+/api), every 20 s", lines[0])
        assert api, lines
        # (Prefect's own log lines may come between ours.)
        (line,) = [x for x in lines if x.startswith("houseprice: house-price/every-20s: ")]
        shown = re.fullmatch(
            r"houseprice: house-price/every-20s: next run (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC; "
            r"(http://127\.0\.0\.1:\d+)/deployments/deployment/([0-9a-f-]{36})\n", line)
        assert shown and shown[2] == dashboard_url(api[1]), lines
        with temporary_settings({PREFECT_API_URL: api[1]}), get_client(
                sync_client=True) as client:
            deployment = client.read_deployment_by_name("house-price/every-20s")
            assert str(deployment.id) == shown[3]
            run = _first_scheduled_run(client, deployment.id)
            # No second run while this one finishes: pausing deletes the later ones.
            client.pause_deployment(deployment.id)
            deadline = time.monotonic() + 300
            while not (run := client.read_flow_run(run.id)).state.is_final():
                assert time.monotonic() < deadline, run.state
                time.sleep(1)
            assert run.state.is_completed(), run.state.message
            assert run.auto_scheduled and run.created_by.type == "SCHEDULE"  # not by hand
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        stopping = time.monotonic()
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"serve stopped {time.monotonic() - stopping:.1f} s after Ctrl-C")
    assert proc.returncode == 0, out[-2000:]
    assert out.strip().splitlines()[-1].startswith("houseprice: stopped serving")
    # The served run's own lines, as the run command prints them.
    for stage in ("download", "preprocess", "tensorize", "select", "predict"):
        assert re.search(rf"^houseprice: {stage} · Completed in [\d.]+ s$", out, re.M), out
    assert "out-of-fold log RMSE, best first" in out and re.search(
        r"^  ridge \*\s+0\.1\d+", out, re.M), out
    assert re.search(r"^houseprice: selected ridge \(5-fold out-of-fold log RMSE 0\.1\d+", out,
                     re.M), out


def _first_scheduled_run(client, deployment_id, timeout: float = 180.0):
    """The deployment's first run made by the scheduler, once it has started."""
    import time

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=1)
        if runs and runs[0].state.type.value not in ("SCHEDULED", "PENDING"):
            return runs[0]
        time.sleep(1)
    raise AssertionError(f"no scheduled run started in {timeout:.0f} s")


def retry_in_browser(url: str, shots: Path) -> None:
    """Open a failed run's page and press the dashboard's Retry (and confirm it when the
    dashboard asks); screenshots before and after go to ``shots``-*.png."""
    shots.parent.mkdir(parents=True, exist_ok=True)
    with _browser() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url, wait_until="networkidle", timeout=90_000)
            retry = page.get_by_role("button", name="Retry")
            retry.first.wait_for(timeout=60_000)
            page.screenshot(path=f"{shots}-before.png")
            retry.first.click()
            confirm = page.get_by_role("dialog").get_by_role("button", name="Retry")
            try:
                confirm.first.wait_for(timeout=5_000)
                confirm.first.click()
            except Exception:  # noqa: BLE001 - no confirmation asked: the click was the retry
                pass
            page.wait_for_timeout(2_000)
            page.screenshot(path=f"{shots}-after.png")
        finally:
            browser.close()


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


def test_drift_retrains_through_the_automation_and_failures_and_promotions_notify(
        kept_env, data_server, tmp_path):
    """Served with a webhook, on the local server: the first training run promotes (a
    notification); a scored file that drifts emits the event, the automation runs the
    training deployment, and the gate decides on that run (its record read back); a failed
    run notifies the webhook."""
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
    proc, lines = _serve("--flow", "both", "--inbox", str(inbox), "--drift-threshold", "0.3",
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
    proc = _cli(*command, "--webhook", "hooks.example.com/x", env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "houseprice: error: webhook 'hooks.example.com/x' is not an http(s) URL: give the "
        "endpoint's URL (a Slack or Teams incoming webhook, or any HTTP endpoint)")
    assert not list((tmp_path / "prefect").glob("houseprice-api-*.json"))  # none started
