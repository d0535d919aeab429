"""``houseprice server``, ``dashboard``, ``automations`` and ``stop-api``: the local Prefect
server, its dashboard, and the automations on the server in use."""

from __future__ import annotations

import argparse
import os

from flows.commands.config import ConfigError


def install_automations(args: argparse.Namespace) -> int:
    from flows.automations import check_webhook, install
    from flows.commands.operate import lasting_api

    check_webhook(args.webhook)
    lasting_api("automations")
    for line in install(args.deployment, args.webhook):
        print(f"houseprice: automation {line}", flush=True)
    if not args.deployment and not args.webhook:
        print("houseprice: nothing to install: give --deployment (retrain on drift) and/or "
              "--webhook (notifications)", flush=True)
    return 0


def stop_api(args: argparse.Namespace) -> int:
    from flows.commands.server import prefect_home, stop_kept_api

    stopped = stop_kept_api()
    print(f"houseprice: stopped {stopped} local Prefect server(s) of {prefect_home()}"
          if stopped else f"houseprice: no local Prefect server is kept for {prefect_home()}")
    return 0


def server_command(args: argparse.Namespace) -> int:
    """``houseprice server status|stop``; status exits 1 when no local server runs."""
    from flows.commands.server import kept_status, prefect_home

    if args.action == "stop":
        return stop_api(args)
    running = kept_status()
    for s in running:
        keep = s["keep_s"]
        kept = f"stops {keep:.0f} s after its last use" if isinstance(keep, int | float) else ""
        print(f"houseprice: a local Prefect server runs for {prefect_home()}: dashboard "
              f"{s['dashboard']}, API {s['url']}, pid {s['pid']}; {kept}".rstrip("; "))
    if not running:
        print(f"houseprice: no local Prefect server runs for {prefect_home()}; 'houseprice "
              "dashboard' or a run starts one")
    return 0 if running else 1


def dashboard(args: argparse.Namespace) -> int:
    """The dashboard's URL: the user's server's (PREFECT_API_URL), or the local server's,
    started when none runs."""
    from flows.commands.server import (
        KEEP,
        dashboard_url,
        keep_seconds,
        start_ephemeral_api,
        user_api,
    )

    user = user_api()
    if user is None and keep_seconds() == 0:
        raise ConfigError(f"{KEEP}=0: runs use a temporary Prefect API with no dashboard; "
                          f"unset {KEEP} to keep a local server with its dashboard")
    if user is None:
        start_ephemeral_api()()  # reuse the kept server, or start it and wait for it
        url = dashboard_url(os.environ["PREFECT_API_URL"])
    else:
        from prefect.settings import get_current_settings

        url = get_current_settings().ui_url or dashboard_url(user)
    print(f"houseprice: the Prefect dashboard: {url}", flush=True)
    if not args.no_open and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        import webbrowser

        webbrowser.open(url)  # a text browser would take the terminal: a display only
    return 0
