"""The Prefect API a command talks to: the user's server (checked before anything runs), or a
local one started first thing in its own process: kept for the next runs and stopped when
idle (``flows.commands.apiserver``), or the run's own (``HOUSEPRICE_API_KEEP_S=0``)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _prefect_command() -> str:
    """``prefect`` as it runs from here: the one beside this Python (a virtual environment's
    ``bin/prefect`` is not on PATH unless the environment is active)."""
    beside = Path(sys.executable).parent / "prefect"
    if not beside.is_file():
        return "prefect"
    with contextlib.suppress(ValueError):
        return str(beside.relative_to(Path.cwd()))
    return str(beside)


PREFECT = _prefect_command()
NEEDS_SERVER = (f"start one with '{PREFECT} server start' and set "
                "PREFECT_API_URL=http://127.0.0.1:4200/api")


def check_api(url: str) -> None:
    """Fail in one line, before the run, when PREFECT_API_URL names a server that is down."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise ConnectionError(
            f"cannot reach the Prefect API at {url} ({type(problem).__name__}); start it with "
            f"'{PREFECT} server start' or unset PREFECT_API_URL to use an ephemeral one"
        )


# Seconds the local API stays up after its last request; 0: a temporary server per run.
KEEP = "HOUSEPRICE_API_KEEP_S"
KEEP_DEFAULT_S = 600.0
# The settings that shape the server it starts (a server is kept per distinct set of them).
_SERVER_SETTINGS = ("PREFECT_SERVER_", "PREFECT_API_DATABASE_", "PREFECT_API_SERVICES_",
                    "PREFECT_PROFILE", "PREFECT_MEMO_STORE_PATH")
# ... except how a client starts and waits for Prefect's own temporary server (the CLI sets
# its start limit): no setting of a kept server.
_CLIENT_SETTINGS = ("PREFECT_SERVER_EPHEMERAL_",)


def keep_seconds() -> float:
    """``HOUSEPRICE_API_KEEP_S``, checked: seconds a local API is kept after its last use."""
    raw = os.environ.get(KEEP, "").strip()
    if not raw:
        return KEEP_DEFAULT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        from flows.commands.config import ConfigError

        raise ConfigError(f"{KEEP}={raw!r} is not a number of seconds: set it to 0 (a "
                          f"temporary Prefect API per run) or more (default "
                          f"{KEEP_DEFAULT_S:.0f})")
    return value


def start_ephemeral_api() -> Callable[[], None]:
    """Without ``PREFECT_API_URL`` Prefect would start a temporary API server at the flow's
    first API call, after this process has imported everything (about 14 s before the first
    task on 2 cores). Instead, first thing, use the local API a run of this Prefect home
    started in the last ``HOUSEPRICE_API_KEEP_S`` seconds (default 600), or start one (Prefect's
    own app, as its ``SubprocessASGIServer`` runs it) that boots in its own process while
    this one imports and validates; point ``PREFECT_API_URL`` at it. The returned function
    waits until it answers.

    A kept server outlives the run: the next run skips its start (3-4 s of a 5 s cached run
    here), and the runs' history stays readable through its API meanwhile; it exits on its own
    once idle. With ``HOUSEPRICE_API_KEEP_S=0`` the server is the run's own and stops with
    it."""
    allow = os.environ.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true").lower()
    if os.environ.get("PREFECT_API_URL") or allow in ("0", "false", "no"):
        return lambda: None
    keep = keep_seconds()
    return _kept_api(keep) if keep > 0 else _temporary_api()


def _server_env() -> dict[str, str]:
    """The run's own temporary server: the API only (it stops with the run, so a dashboard
    link to it would not open afterwards)."""
    return {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1", **skip_block_registration()}


def _kept_env(port: int) -> dict[str, str]:
    """The kept server is a whole Prefect server, as ``prefect server start`` runs it: the
    API, the dashboard (pointed at this port) and the services: the scheduler for served
    deployments, the triggers and actions of automations, late runs, the event persister."""
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **os.environ,
           "PREFECT_UI_ENABLED": "1", "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
           # the dashboard's address, for the links in notifications (``ui_url``)
           "PREFECT_UI_URL": f"http://127.0.0.1:{port}",
           "PREFECT__SERVER_FINAL": "1", **skip_block_registration()}
    env.pop("PREFECT__SERVER_EPHEMERAL", None)
    return env


def dashboard_url(api_url: str) -> str:
    """The dashboard of a local server: its API URL without ``/api``."""
    return api_url.removesuffix("/").removesuffix("/api")


# Where the dashboard shows each kind of object (Prefect's own UI routes).
_PAGES = {"flow-run": "runs/flow-run", "deployment": "deployments/deployment"}


def run_link(flow_run_id: str) -> str | None:
    """The dashboard page of a flow run on the API this process uses (a user's server,
    Prefect Cloud, or the kept local one); None for the run's own temporary server (it has
    no dashboard, and stops with the run)."""
    return page_link("flow-run", flow_run_id)


def page_link(kind: str, obj_id: Any) -> str | None:
    """The dashboard page of a ``kind`` (flow-run, deployment) object, as ``run_link``."""
    url = os.environ.get("PREFECT_API_URL")
    if not url or not obj_id:
        return None
    if url == os.environ.get(_KEPT):
        return f"{dashboard_url(url)}/{_PAGES[kind]}/{obj_id}"
    if url == os.environ.get(_EPHEMERAL):
        return None
    from prefect.utilities.urls import url_for

    return url_for(kind, obj_id=obj_id)


def _free_port() -> int:
    import socket

    # A free port now may be taken before the server binds it: the wait starts again then.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _point_at(url: str) -> None:
    os.environ["PREFECT_API_URL"] = os.environ[_EPHEMERAL] = url


def _answers(url: str, timeout: float = 2.0) -> bool:
    import urllib.request

    with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health",
                                                              timeout=timeout) as resp:
        return resp.status == 200
    return False


def _waiter(alive: Callable[[], int | None], url: Callable[[], str],
            restart: Callable[[], None], log: Path | None = None) -> Callable[..., None]:
    """Wait until the server answers; one that exits first is started again (twice). With
    ``log``, the server is a kept one, whose output is in that file."""
    import time

    what = "the local Prefect API server" if log else "the temporary Prefect API server"

    def wait(timeout: float = 120.0, attempts: int = 3) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = alive()
            if code is not None:
                attempts -= 1
                if attempts == 0:
                    see = (f"see {log}, or run '{PREFECT} server start'" if log
                           else f"run '{PREFECT} server start' to see why")
                    raise RuntimeError(f"{what} exited with code {code} before answering, "
                                       f"3 times; {see}")
                restart()
                continue
            if _answers(url()):
                return
            time.sleep(0.1)
        hint = (f"stop it with 'houseprice stop-api' and run again, or set {KEEP}=0 for a "
                f"server per run" if log else NEEDS_SERVER)
        raise RuntimeError(f"{what} at {url()} did not answer within {timeout:.0f} s; {hint}")

    return wait


def _temporary_api() -> Callable[[], None]:
    """The run's own server: stopped at exit, and killed with the run (Linux)."""
    import atexit
    import importlib.util
    import subprocess

    app_dir = Path(importlib.util.find_spec("prefect").origin).parent.parent
    server: dict[str, Any] = {}

    def start() -> None:
        port = _free_port()
        server["proc"] = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port",
             str(port), "--log-level", "error", "--lifespan", "on"],
            env=_server_env(), stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        server["url"] = f"http://127.0.0.1:{port}/api"
        _point_at(server["url"])

    def stop() -> None:
        proc = server.get("proc")
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()

    start()
    atexit.register(stop)
    return _waiter(lambda: server["proc"].poll(), lambda: server["url"], start)


def kept_record(home: Path | None = None) -> tuple[Path, Path]:
    """(record, lock) of the local API kept for this Prefect home and server settings: the
    record holds its pid and URL while it runs."""
    import hashlib
    from importlib.metadata import version

    home = (home or prefect_home()).absolute()  # the server's argument: one spelling
    shaping = sorted((k, v) for k, v in os.environ.items()
                     if k.startswith(_SERVER_SETTINGS) and not k.startswith(_CLIENT_SETTINGS))
    key = hashlib.sha256(json.dumps([version("prefect"), sys.executable, shaping]).encode())
    return (home / f"houseprice-api-{key.hexdigest()[:12]}.json",
            home / "houseprice-api.lock")


def _kept_api(keep: float) -> Callable[[], None]:
    """Use the kept server of this home and settings, or start one, detached (its own
    session: Ctrl-C and the run's end leave it running), under a lock so that runs started
    together share one."""
    import subprocess

    record, lock = kept_record()
    record.parent.mkdir(parents=True, exist_ok=True)
    server: dict[str, Any] = {}

    def find_or_start() -> None:
        with _locked(lock):
            found = _read(record)
            if found and _running_server(found.get("pid"), record):
                server.update(proc=None, pid=found["pid"], url=found["url"])
            else:
                port = _free_port()
                with open(record.with_suffix(".log"), "ab") as log:
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "flows.commands.apiserver", str(port),
                         repr(keep), str(record), str(lock)],
                        env=_kept_env(port), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                        start_new_session=True, cwd=Path(__file__).resolve().parents[2])
                server.update(proc=proc, pid=proc.pid, url=f"http://127.0.0.1:{port}/api")
                _write(record, {"pid": proc.pid, "url": server["url"], "keep_s": keep})
        _point_at(server["url"])
        os.environ[_KEPT] = server["url"]

    def exited() -> int | None:
        if server["proc"] is not None:
            return server["proc"].poll()
        return None if _running_server(server["pid"], record) else -1

    find_or_start()
    return _waiter(exited, lambda: server["url"], find_or_start, record.with_suffix(".log"))


def stop_kept_api(home: Path | None = None, timeout: float = 10.0) -> int:
    """Stop the local APIs kept for a Prefect home (every settings' one); returns how many."""
    import glob
    import signal
    import time

    stopped = 0
    for path in glob.glob(str((home or prefect_home()).absolute() / "houseprice-api-*.json")):
        found = _read(Path(path))
        pid = found.get("pid") if found else None
        if not _running_server(pid, Path(path)):
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _running_server(pid, Path(path)) and time.monotonic() < deadline:
            time.sleep(0.05)
        stopped += 1
    return stopped


def forget(record: Path, lock: Path) -> None:
    """The kept server's last act: remove its record if the record still names it."""
    with _locked(lock):
        found = _read(record)
        if found and found.get("pid") == os.getpid():
            record.unlink(missing_ok=True)


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _read(record: Path) -> dict[str, Any] | None:
    try:
        found = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # none, or torn by a crash mid-write: a new server replaces it
    return found if isinstance(found, dict) else None


def _write(record: Path, data: dict[str, Any]) -> None:
    tmp = record.with_name(f".{record.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    tmp.replace(record)


def _running_server(pid: Any, record: Path | None = None) -> bool:
    """A live kept server with this pid (not a zombie, nor another program that reuses a dead
    server's pid: its command line is checked where /proc has it), and, given ``record``,
    the one started for that record: a Prefect home copied from another holds a copy of the
    other home's record, whose server is not this home's to use or stop."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    proc = Path(f"/proc/{pid}")
    if proc.parent.is_dir():
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0]
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        ours = record is None or os.fsencode(str(record)) in args
        return state != "Z" and b"flows.commands.apiserver" in args and ours
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def die_with_parent() -> None:
    """In the server's process before it starts (Linux): SIGTERM it when this process dies,
    so a killed run (SIGKILL skips ``atexit``) leaves no server behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1  # noqa: N806 - the kernel's name
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 15)


def skip_block_registration() -> dict[str, str]:
    """Settings for the temporary server that skip registering Prefect's block types when a
    server has registered them in this Prefect home before (its memo store says so). Even
    when nothing changed, checking imports every installed collection (Dask: about 0.5 s of a
    4 s start). A collection installed later is registered by the next
    ``prefect server start``; this pipeline saves only the built-in LocalFileSystem block."""
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    memo = Path(os.environ.get("PREFECT_MEMO_STORE_PATH") or home / "memo_store.toml")
    try:
        registered = "block_auto_registration" in memo.read_text(encoding="utf-8")
    except OSError:
        registered = False
    if not registered or "PREFECT_SERVER_REGISTER_BLOCKS_ON_START" in os.environ:
        return {}
    return {"PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "false",
            "PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false"}


# Set (to the URL) while PREFECT_API_URL points at the temporary server this process started;
# and _KEPT too when that server is the kept one.
_EPHEMERAL = "HOUSEPRICE_EPHEMERAL_API"
_KEPT = "HOUSEPRICE_KEPT_API"


def kept_status(home: Path | None = None) -> list[dict[str, Any]]:
    """The local servers kept for a Prefect home that are running: pid, API URL, dashboard
    URL and how long each is kept after its last use."""
    import glob

    found = []
    for path in sorted(glob.glob(str((home or prefect_home()).absolute()
                                     / "houseprice-api-*.json"))):
        record = _read(Path(path))
        if record and _running_server(record.get("pid"), Path(path)) and isinstance(
                record.get("url"), str):
            found.append({"pid": record["pid"], "url": record["url"],
                          "dashboard": dashboard_url(record["url"]),
                          "keep_s": record.get("keep_s")})
    return found


def user_api() -> str | None:
    """The Prefect API the user chose (not the temporary one this process started)."""
    url = os.environ.get("PREFECT_API_URL")
    return None if url and url == os.environ.get(_EPHEMERAL) else url
