"""Fixtures of the flow tests that run against the kept local server."""

from __future__ import annotations

import os

import pytest

from flows.commands.server import stop_kept_api


@pytest.fixture(scope="module")
def kept_env(tmp_path_factory):
    """The environment of a user with no Prefect server of their own: a fresh Prefect home,
    the local server kept between runs (started by the first command that needs it)."""
    home = tmp_path_factory.mktemp("kept") / "prefect"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), HOUSEPRICE_API_KEEP_S="300")
    yield env
    stop_kept_api(home)
