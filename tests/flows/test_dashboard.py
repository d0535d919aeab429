"""The dashboard as a person meets it: a run without PREFECT_API_URL uses the kept local
server (API, dashboard and services), prints its flow run's link, and that link opens the
run with its stages in a real browser (Debian's Chromium, driven by Playwright).
Screenshots go to ``tests.flows.kept.SHOTS``."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from flows.commands.server import dashboard_url, run_link
from tests.conftest import write_config
from tests.flows.kept import CHROMIUM, SHOTS, cli, playwright, serve

STAGES = ("download", "preprocess", "tensorize", "train[ridge]", "select", "predict")


def test_the_printed_link_opens_the_run_with_its_stages(kept_env, data_server, tmp_path):
    config = write_config(tmp_path / "ridge.json", candidates=[
        {"name": "ridge", "kind": "ridge", "alpha": 10.0}], search=[])
    proc = cli("run", "--config", str(config), "--data-url", data_server.url, "--artifacts",
                str(tmp_path / "arts"), "--data-dir", str(tmp_path / "cache"), env=kept_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = proc.stdout.splitlines()[0]
    base = re.search(r"dashboard (http://127\.0\.0\.1:\d+)\)", first)
    assert base, first
    link = re.search(r"^houseprice: flow run ([0-9a-f-]{36}): (\S+)$", proc.stdout, re.M)
    assert link, proc.stdout[:2000]
    run_id, url = link.groups()
    assert url == f"{base[1]}/runs/flow-run/{run_id}"

    status = cli("server", "status", env=kept_env, timeout=60)
    assert status.returncode == 0 and f"dashboard {base[1]}," in status.stdout, status.stdout
    shown = cli("dashboard", "--no-open", env=kept_env, timeout=60)
    assert shown.stdout.strip() == f"houseprice: the Prefect dashboard: {base[1]}"

    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = SHOTS / "flow-run.png"
    with playwright() as p:
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

    stop = cli("server", "stop", env=kept_env, timeout=60)
    assert stop.returncode == 0 and "stopped 1 local Prefect server" in stop.stdout
    after = cli("server", "status", env=kept_env, timeout=60)
    assert after.returncode == 1 and "no local Prefect server runs" in after.stdout


def test_dashboard_refuses_a_temporary_api_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), HOUSEPRICE_API_KEEP_S="0")
    proc = cli("dashboard", "--no-open", env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "houseprice: error: HOUSEPRICE_API_KEEP_S=0: runs use a temporary Prefect API with no "
        "dashboard; unset HOUSEPRICE_API_KEEP_S to keep a local server with its dashboard")
    assert not list((tmp_path / "prefect").glob("houseprice-api-*.json"))  # none started


def test_dashboard_of_a_users_own_server_is_its_ui(prefect_server, tmp_path):
    env = {**os.environ, "PREFECT_API_URL": prefect_server,
           "PREFECT_HOME": str(tmp_path / "prefect")}
    proc = cli("dashboard", "--no-open", env=env, timeout=60)
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
    proc = cli("server", "status", env=env, timeout=60)
    assert proc.returncode == 1
    assert proc.stdout.strip() == (
        f"houseprice: no local Prefect server runs for {tmp_path / 'prefect'}; 'houseprice "
        "dashboard' or a run starts one")


@pytest.mark.serial
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
    proc, lines = serve("--interval", "20", "--name", "every-20s", "--config", str(config),
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
            # On a slow machine the runner may have taken the next run before the pause:
            # Ctrl-C is asked for with no run in flight, as the docs describe it.
            _until_no_run_in_flight(client, deployment.id)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        stopping, presses = time.monotonic(), 1
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            # Prefect's graceful shutdown did not end: a second Ctrl-C stops at once.
            proc.send_signal(signal.SIGINT)
            presses = 2
            out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"serve stopped {time.monotonic() - stopping:.1f} s after the first of {presses} "
          f"Ctrl-C; its output:\n{out}")
    assert proc.returncode == 0, out[-2000:]
    assert out.strip().splitlines()[-1].startswith("houseprice: stopped serving")
    # The served run's own lines, as the run command prints them.
    for stage in ("download", "preprocess", "tensorize", "train", "select", "predict"):
        assert re.search(rf"^houseprice: {stage} · Completed in [\d.]+ s$", out, re.M), out
    assert "out-of-fold log RMSE, best first" in out and re.search(
        r"^  ridge \*\s+0\.1\d+", out, re.M), out
    assert re.search(r"^houseprice: selected ridge \(5-fold out-of-fold log RMSE 0\.1\d+", out,
                     re.M), out


def _until_no_run_in_flight(client, deployment_id, timeout: float = 300.0) -> None:
    """Wait until no run of the deployment is pending or running."""
    import time

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + timeout
    while any(r.state.type.value in ("PENDING", "RUNNING", "CANCELLING")
              for r in client.read_flow_runs(deployment_filter=DeploymentFilter(
                  id=DeploymentFilterId(any_=[deployment_id])))):
        assert time.monotonic() < deadline, "a run of the deployment did not end"
        time.sleep(1)


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
