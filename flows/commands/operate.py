"""``houseprice serve``, ``score`` and ``rerun``: the pipeline on a schedule, the scoring flow,
and Prefect's retry of a failed run."""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any

from pydantic import ValidationError

from flows.commands.config import ConfigError, build_config, config_error
from flows.commands.run import RunFailed
from flows.commands.server import (
    KEEP,
    NEEDS_SERVER,
    check_api,
    keep_seconds,
    page_link,
    start_ephemeral_api,
    user_api,
)


def lasting_api(what: str) -> str:
    """The API of a server that outlives this command: the user's (PREFECT_API_URL, checked),
    or the local one kept for this Prefect home (started when none runs). Its URL."""
    url = user_api()
    if url:
        check_api(url)
        return url
    if keep_seconds() == 0:
        raise RuntimeError(f"{what} needs a Prefect server that outlives this command, and "
                           f"{KEEP}=0 asks for a temporary one: unset {KEEP} (a local server "
                           f"is kept) or {NEEDS_SERVER}")
    start_ephemeral_api()()
    return os.environ["PREFECT_API_URL"]


def serve(args: argparse.Namespace) -> int:
    config = build_config(args)
    if args.flow in ("score", "both") and not args.inbox:
        raise ValueError("serving the scoring flow needs --inbox SOURCE (the files to score)")
    from flows.automations import check_webhook

    check_webhook(args.webhook)
    url = lasting_api("scheduling")
    from prefect import serve

    from flows.inbox import house_price_score
    from flows.pipeline import with_task_runner

    when = {"cron": args.cron, "interval": args.interval}
    deployments = []
    if args.flow in ("train", "both"):
        flow = with_task_runner(args.task_runner, args.dask_address)
        deployments.append(flow.to_deployment(
            name=args.name, parameters={"config": config.model_dump(mode="json")}, **when))
    if args.flow in ("score", "both"):
        score = score_config(args.inbox, config.artifacts_dir, "production",
                              args.drift_threshold, config.data.cache_dir)
        deployments.append(house_price_score.to_deployment(
            name=args.name, parameters={"config": score.model_dump(mode="json")}, **when))
    names = [f"{d.flow_name}/{d.name}" for d in deployments]
    print(f"houseprice: serving deployment(s) {', '.join(names)} on {url}"
          + (f", cron '{args.cron}'" if args.cron else "")
          + (f", every {args.interval:g} s" if args.interval else ""), flush=True)
    for deployment in deployments:
        print(f"houseprice: {deployment.flow_name}/{deployment.name}: "
              f"{deployment_line(deployment, url)}", flush=True)
    from flows.automations import install

    trained = f"{deployments[0].flow_name}/{args.name}" if args.flow != "score" else None
    for line in install(trained, args.webhook):
        print(f"houseprice: automation {line}", flush=True)
    print("houseprice: Ctrl-C stops serving (the server keeps running: 'houseprice server "
          "stop' stops a local one)", flush=True)
    forced = False
    with ctrl_c_as_sigterm():
        try:
            serve(*deployments, print_starting_message=False)
        except SystemExit:  # a second Ctrl-C: Prefect's SIGTERM handler exits at once
            forced = True
    print("houseprice: stopped serving " + (
        "at once (a second Ctrl-C: the schedules may not be paused; pause them in the "
        "dashboard, or serve again)" if forced else
        "(Prefect paused the deployments' schedules until they are served again)"), flush=True)
    return 0


@contextlib.contextmanager
def ctrl_c_as_sigterm():
    """Inside the block, Ctrl-C takes the path SIGTERM takes once Prefect's runner has
    started: its own handler stops the polling loops, which pauses the schedules, and a
    second one exits at once. (asyncio's own Ctrl-C cancels the runner's main task instead;
    seen in the parallel test suite, that left ``serve`` running.) Before the runner
    handles SIGTERM, Ctrl-C interrupts as anywhere else."""
    import signal

    def on_ctrl_c(signum, frame):
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def deployment_line(deployment, url: str) -> str:
    """A deployment, registered now: its next scheduled run and its dashboard page."""
    import asyncio

    from prefect.server.schemas import schedules

    deployment_id = deployment.apply()  # serve() registers it again: the same deployment
    next_runs = []
    for entry in deployment.schedules or []:
        plan = entry.schedule.model_dump()
        kind = (schedules.CronSchedule if "cron" in plan else schedules.IntervalSchedule
                if "interval" in plan else schedules.RRuleSchedule)
        next_runs += asyncio.run(kind.model_validate(plan).get_dates(n=1))
    when = (f"next run {min(next_runs).strftime('%Y-%m-%d %H:%M:%S %Z')}" if next_runs
            else "no schedule")
    return f"{when}; {page_link('deployment', deployment_id) or url}"


def score_config(inbox: str, artifacts: str | None, model: str, threshold: float | None,
                 cache_dir: str | None = None, interval: float | None = None):
    from tasks.config import ScoreConfig, default_artifacts_dir

    fields: dict[str, Any] = {"inbox": inbox, "model": model,
                              "artifacts_dir": artifacts or default_artifacts_dir()}
    if threshold is not None:
        fields["drift_threshold"] = threshold
    if cache_dir:
        fields["cache_dir"] = cache_dir
    if interval is not None:
        fields["interval"] = interval
    try:
        return ScoreConfig.model_validate(fields)
    except ValidationError as exc:
        raise ConfigError(config_error(exc)) from None


def score(args: argparse.Namespace) -> int:
    # Prefect's own temporary server gives up after 20 s, which a busy 2-core machine can
    # exceed; the run command's local API (kept or per-run, waited for 120 s) serves here too.
    api_ready = start_ephemeral_api()
    config = score_config(args.inbox, args.artifacts, args.model, args.drift_threshold,
                          interval=args.interval)
    from flows.inbox import house_price_score

    api_ready()
    state = house_price_score(config, return_state=True)
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, BaseException):
        from tasks.stage import one_line

        raise RunFailed(one_line(outcome)) from outcome
    drifting = outcome["drifting"]
    print(f"houseprice: scored {len(outcome['scored'])} file(s) with model {outcome['model']}"
          + (f"; drift over the threshold in {', '.join(drifting)}" if drifting else "")
          + "; predictions: " + ", ".join(outcome["predictions"].values()), flush=True)
    return 0


def rerun(args: argparse.Namespace) -> int:
    """Prefect's retry of a finished, unsuccessful flow run: a deployment's run is set to
    AwaitingRetry for its runner or worker to pick up; a run started by ``houseprice run``
    (no deployment) is executed again here, under the same flow run id."""
    import time
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import AwaitingRetry

    try:  # the argument first: a typo is reported before any server is looked for
        run_id = uuid.UUID(args.flow_run_id)
    except ValueError:
        raise ValueError(f"{args.flow_run_id!r} is not a flow run id (a UUID, as shown in "
                         "the dashboard)") from None
    url = lasting_api("rerun")  # the local server of this Prefect home holds its runs
    with get_client(sync_client=True) as client:
        try:
            flow_run = client.read_flow_run(run_id)
        except ObjectNotFound:
            raise LookupError(f"no flow run {run_id} on {url}") from None
        state = flow_run.state
        if state is not None and state.is_completed():
            print(f"houseprice: flow run {run_id} already completed; nothing to retry")
            return 0
        if state is not None and not state.is_final():
            raise RuntimeError(f"flow run {run_id} is {state.name}, not finished; "
                               "retry it once it has failed")
        client.set_flow_run_state(run_id, AwaitingRetry(), force=True)
        if flow_run.deployment_id is None:
            from prefect.flow_engine import run_flow

            from flows.pipeline import house_price_pipeline

            print(f"houseprice: retrying flow run {run_id} here", flush=True)
            flow_run = client.read_flow_run(run_id)
            params = house_price_pipeline.validate_parameters(flow_run.parameters)
            result = run_flow(house_price_pipeline, flow_run=flow_run, parameters=params)
            print(f"houseprice: flow run {run_id} completed: selected {result['selected']}")
            return 0
        print(f"houseprice: flow run {run_id} set to AwaitingRetry for its deployment's "
              "runner", flush=True)
        deadline = time.monotonic() + args.timeout
        while args.timeout > 0:
            state = client.read_flow_run(run_id).state
            if state.is_final():
                if state.is_completed():
                    print(f"houseprice: flow run {run_id} completed")
                    return 0
                raise RuntimeError(f"flow run {run_id} ended {state.name}: {state.message}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {run_id} is still {state.name} after "
                                   f"{args.timeout:g} s; is its deployment served?")
            time.sleep(1.0)
    return 0
