"""The Prefect API a command talks to: the user's server (checked before anything runs), or a
temporary one started first thing in its own process."""

from __future__ import annotations

import contextlib
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


def start_ephemeral_api() -> Callable[[], None]:
    """Without ``PREFECT_API_URL`` Prefect would start a temporary API server at the flow's
    first API call, after this process has imported everything (about 14 s before the first
    task on 2 cores). Start the same server (Prefect's own uvicorn app, as its
    ``SubprocessASGIServer`` runs it) first thing, so it boots in its own process while this
    one imports and validates, and point ``PREFECT_API_URL`` at it. The returned function
    waits until it answers; the server stops when this process exits."""
    allow = os.environ.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true").lower()
    if os.environ.get("PREFECT_API_URL") or allow in ("0", "false", "no"):
        return lambda: None
    import atexit
    import importlib.util
    import socket
    import subprocess
    import time
    import urllib.request

    app_dir = Path(importlib.util.find_spec("prefect").origin).parent.parent
    server: dict[str, Any] = {}

    def start() -> None:
        # A free port now may be taken before uvicorn binds it: wait() starts again then.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server["proc"] = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port",
             str(port), "--log-level", "error", "--lifespan", "on"],
            env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                 "PREFECT__SERVER_FINAL": "1", **skip_block_registration()},
            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        server["url"] = os.environ["PREFECT_API_URL"] = os.environ[_EPHEMERAL] = (
            f"http://127.0.0.1:{port}/api")

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

    def wait(timeout: float = 120.0, attempts: int = 3) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if server["proc"].poll() is not None:
                attempts -= 1
                if attempts == 0:
                    raise RuntimeError(
                        f"the temporary Prefect API server exited with code "
                        f"{server['proc'].returncode} before answering, 3 times; run "
                        f"'{PREFECT} server start' to see why")
                start()
                continue
            with contextlib.suppress(OSError), urllib.request.urlopen(
                    f"{server['url']}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"the temporary Prefect API server did not answer within "
                           f"{timeout:.0f} s; {NEEDS_SERVER}")

    return wait


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


# Set (to the URL) while PREFECT_API_URL points at the temporary server this process started.
_EPHEMERAL = "HOUSEPRICE_EPHEMERAL_API"


def user_api() -> str | None:
    """The Prefect API the user chose (not the temporary one this process started)."""
    url = os.environ.get("PREFECT_API_URL")
    return None if url and url == os.environ.get(_EPHEMERAL) else url
