"""The local Prefect API a run uses without PREFECT_API_URL, when it is kept between runs
(``HOUSEPRICE_API_KEEP_S`` > 0, the default outside the tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.commands.server import _running_server, kept_record, stop_kept_api

# A tiny flow on the API the CLI would use: the server's start, then a flow and a task run.
FLOW = """
import os
from flows.commands.server import start_ephemeral_api
start_ephemeral_api()()
from prefect import flow, task

@task
def one():
    return 1

@flow(name="tiny")
def tiny():
    return one()

tiny()
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:  # what the server has recorded so far
    states = sorted(r.state.name for r in c.read_flow_runs()), sorted(
        r.state.name for r in c.read_task_runs())
print(states, flush=True)
print(os.environ["PREFECT_API_URL"], flush=True)
"""
START = ("import os\nfrom flows.commands.server import start_ephemeral_api\n"
         "start_ephemeral_api()()\nprint(os.environ['PREFECT_API_URL'], flush=True)\n")


@pytest.fixture(scope="module")
def created_home(tmp_path_factory) -> Path:
    """A Prefect home whose database a server has created (15-20 s here, once)."""
    home = tmp_path_factory.mktemp("created") / "prefect"
    _python(START, _env(home, "0"))
    return home


@pytest.fixture
def home(created_home, tmp_path) -> Path:
    """A Prefect home of the test's own, with that database already in it."""
    import shutil

    return Path(shutil.copytree(created_home, tmp_path / "prefect"))


def _env(home: Path, keep: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), HOUSEPRICE_API_KEEP_S=keep)
    return env


def _python(script: str, env: dict[str, str]) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()


def _record(home: Path) -> dict:
    (record,) = home.glob("houseprice-api-*.json")
    return json.loads(record.read_text())


def test_a_kept_api_serves_the_next_run_keeps_its_history_and_exits_when_idle(home):
    # Kept 8 s: the next run asks for it within about 1 s of the first's end (more on a
    # loaded machine), then it must stop once idle that long.
    env = _env(home, "8")
    try:
        *_, first = _python(FLOW, env)
        pid = _record(home)["pid"]
        assert _running_server(pid)  # the run is over; its server is not
        states, second = _python(FLOW, env)[-2:]
        assert second == first and _record(home)["pid"] == pid  # the same server, reused
        # Both runs are in its history, every task run recorded as finished: the first
        # run's end reached the server although that run exited without waiting for it.
        assert states == "(['Completed', 'Completed'], ['Completed', 'Completed'])"
        deadline = time.monotonic() + 40  # idle 8 s: it stops, and takes its record along
        while _running_server(pid):
            assert time.monotonic() < deadline, "the kept server did not stop when idle"
            time.sleep(0.2)
        assert not list(home.glob("houseprice-api-*.json"))
    finally:
        stop_kept_api(home)


def test_runs_started_together_share_one_new_kept_api_and_stop_api_stops_it(home):
    """Three runs at once, over a stale record (its server gone): one new server, shared.
    A record torn by a crash mid-write, or naming a pid that another program now has, is
    not trusted either."""
    from flows.commands.server import _read

    env = _env(home, "600")
    record, _ = _record_path(env)
    record.write_text('{"pid": 12')
    assert _read(record) is None  # torn
    assert not _running_server(os.getpid())  # alive, but not a kept server
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid names no process now
    record.write_text(json.dumps({"pid": gone.pid, "url": "http://127.0.0.1:9/api",
                                  "keep_s": 600}))
    procs = [subprocess.Popen([sys.executable, "-c", START], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        urls = {p.communicate(timeout=180)[0].strip() for p in procs}
        assert len(urls) == 1 and all(p.returncode == 0 for p in procs), urls
        assert urls != {"http://127.0.0.1:9/api"} and _record(home)["url"] in urls
        pid = _record(home)["pid"]
        assert _running_server(pid)
    finally:
        stop = subprocess.run([sys.executable, "-m", "flows.cli", "stop-api"], env=env,
                              capture_output=True, text=True, timeout=60)
        stop_kept_api(home)  # should the command have failed
    assert stop.returncode == 0
    assert stop.stdout.strip() == f"houseprice: stopped 1 local Prefect server(s) of {home}"
    assert not _running_server(pid)
    assert not list(home.glob("houseprice-api-*.json"))


def _record_path(env: dict[str, str]) -> tuple[Path, Path]:
    """kept_record() as the child computes it (same Prefect home and server settings)."""
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        return kept_record()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_each_server_setting_gets_its_own_kept_api_client_settings_share_one(tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    base, lock = kept_record()
    assert base.parent == tmp_path and lock.parent == tmp_path
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "WARNING")  # what --quiet sets: the client's
    assert kept_record()[0] == base
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{tmp_path}/x.db")
    assert kept_record()[0] != base  # another database: another server


@pytest.mark.parametrize("value", ["abc", "-1", "inf", "nan"])
def test_a_bad_keep_value_is_one_line_exit_2_and_starts_nothing(tmp_path, value):
    home = tmp_path / "prefect"
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--artifacts",
                           str(tmp_path / "a")], capture_output=True, text=True,
                          env=_env(home, value), timeout=120)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line == (f"houseprice: error: HOUSEPRICE_API_KEEP_S='{value}' is not a number of "
                    "seconds: set it to 0 (a temporary Prefect API per run) or more "
                    "(default 600)")
    assert not list(home.glob("houseprice-api-*.json")) and not (tmp_path / "a").exists()


def test_a_run_with_its_own_server_stops_it_only_once_its_history_is_recorded(home):
    """HOUSEPRICE_API_KEEP_S=0: the server stops with the run, after the API has recorded
    the end of every task run (no flow run heartbeat to wait for, nothing cut off)."""
    script = FLOW.replace("tiny()\n", """
from flows.commands.run import no_heartbeats, recorded
with no_heartbeats(True):
    state = tiny(return_state=True)
recorded(state.state_details.flow_run_id)
""")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=_env(home, "0"), timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0] == "(['Completed'], ['Completed'])"
    assert "Error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not list(home.glob("houseprice-api-*"))  # nothing kept


def test_a_kept_api_that_cannot_start_is_one_line_naming_its_log(tmp_path):
    home = tmp_path / "prefect"
    env = {**_env(home, "600"), "PREFECT_API_DATABASE_CONNECTION_URL": (
        f"sqlite+aiosqlite:///{tmp_path}/no/such/dir/prefect.db")}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--artifacts",
                           str(tmp_path / "a")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    record, _ = _record_path(env)
    log = record.with_suffix(".log")
    assert line.startswith("houseprice: error: the local Prefect API server exited with code 3 "
                           f"before answering, 3 times; see {log}, or run "), line
    assert "unable to open database file" in log.read_text()  # why, in its log
    assert not record.exists() and not (tmp_path / "a").exists()


def test_a_copied_home_neither_uses_nor_stops_the_other_homes_kept_api(home, tmp_path):
    """The project's tests copy Prefect homes: a copy made while a kept server runs holds
    that server's record, but the server is the original home's."""
    import shutil

    env = _env(home, "600")
    try:
        (url,) = _python(START, env)
        pid = _record(home)["pid"]
        copy = Path(shutil.copytree(home, tmp_path / "copy"))
        copied_record = next(copy.glob("houseprice-api-*.json"))
        assert not _running_server(pid, copied_record)
        assert stop_kept_api(copy) == 0 and _running_server(pid)
        (other,) = _python(START, _env(copy, "600"))  # a kept server of its own
        assert other != url and _record(copy)["pid"] != pid and _running_server(pid)
        assert stop_kept_api(copy) == 1 and _running_server(pid)
    finally:
        stop_kept_api(home)
        stop_kept_api(tmp_path / "copy")
    assert not _running_server(pid)


def test_a_kept_api_that_decides_to_exit_forgets_itself_first_and_refuses_new_requests():
    """The race of a run that finds the kept server just as it goes idle: the server removes
    its record before it stops, and answers 503 (not ready) from then on, so that run's wait
    starts another server instead of running on this one."""
    import asyncio

    from flows.commands.apiserver import IdleExit

    served, closed = [], []

    async def app(scope, receive, send):
        served.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    class FakeServer:
        should_exit = False

    async def request(wrapper, path):
        sent = []

        async def send(message):
            sent.append(message)

        await wrapper({"type": "http", "path": path}, None, send)
        return sent[0]["status"]

    async def scenario():
        wrapper = IdleExit(app, keep_s=0.01, on_close=lambda: closed.append(True))
        assert await request(wrapper, "/health") == 200
        server = FakeServer()
        await asyncio.wait_for(wrapper.watch(server), timeout=5)
        return wrapper, server, await request(wrapper, "/api/health")

    wrapper, server, status = asyncio.run(scenario())
    assert server.should_exit and wrapper.closing and closed == [True]
    assert status == 503 and served == ["/health"]
