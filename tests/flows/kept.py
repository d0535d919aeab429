"""Shared by the local server's browser and automation tests: the ``houseprice`` command in
a subprocess, ``serve`` started and read, the browser, a user's environment with the kept
local server, and the dashboard's Retry pressed in it.

Screenshots go to ``HOUSEPRICE_SCREENSHOTS`` (default ``.pytest-screenshots/`` in the
repository), kept whether the test passes or fails, so a failure can be looked at."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

CHROMIUM = os.environ.get("HOUSEPRICE_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("HOUSEPRICE_SCREENSHOTS", REPO / ".pytest-screenshots"))


def cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def serve(*args: str, env: dict[str, str]) -> tuple[subprocess.Popen, list[str]]:
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


def playwright():
    """Playwright's Chromium: Debian's binary (no browser download is reachable here)."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install it with 'apt-get install -y "
                    "chromium' (.ci/run does) or set HOUSEPRICE_CHROMIUM to its path")
    from playwright.sync_api import sync_playwright

    return sync_playwright()


def retry_in_browser(url: str, shots: Path) -> None:
    """Open a failed run's page and press the dashboard's Retry (and confirm it when the
    dashboard asks); screenshots before and after go to ``shots``-*.png."""
    shots.parent.mkdir(parents=True, exist_ok=True)
    with playwright() as p:
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
