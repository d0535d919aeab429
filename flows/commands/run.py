"""``houseprice run``: the pipeline, a progress line on a terminal, the result table and the
one-line summary."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows.commands.config import build_config
from flows.commands.server import (
    KEEP,
    check_api,
    dashboard_url,
    keep_seconds,
    run_link,
    start_ephemeral_api,
    user_api,
)


def run(args: argparse.Namespace) -> int:
    api_ready = start_ephemeral_api()
    config = build_config(args)  # validated before anything starts
    if args.quiet:  # read when Prefect is first imported, just below
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from tasks.storage.store import check

    check(config.artifacts_dir)  # a missing bucket or refused credentials: now, in one line
    from tasks.kinds.settings import resolve_device

    resolve_device(config.train.device)  # --device cuda without CUDA: fail now, in one line
    from flows.pipeline import with_task_runner

    where = user_api()
    if where:
        check_api(where)
    # A local server (none when ephemeral mode is off): kept this long, or 0: the run's own.
    keep = 0.0 if where or "PREFECT_API_URL" not in os.environ else keep_seconds()
    where = where or (f"a local Prefect server (dashboard "
                      f"{dashboard_url(os.environ['PREFECT_API_URL'])}), kept "
                      f"{keep:.0f} s after its last use ({KEEP}=0: one per run)" if keep
                      else "an ephemeral local Prefect API")
    local = not user_api()
    if local:
        warm_up_flow_engine()  # while a local server started just now boots in its process
    api_ready()
    log = None if args.verbose else prefect_log_to_file(config.artifacts_dir)
    print(f"houseprice: running on {where}; artifacts in {config.artifacts_dir}"
          + (f"; Prefect's log: {log}" if log else ""), flush=True)
    flow = with_task_runner(args.task_runner, args.dask_address)
    # A live line while candidates train, on a terminal only (not in CI logs or pipes).
    display = (TerminalProgress(len(config.all_candidates())).start()
               if not args.quiet and sys.stderr.isatty() else None)
    run_id: list[str] = []
    from tasks.progress import add_run_hook, shown_by_caller

    forget_run = add_run_hook(run_id.append)
    forget_link = add_run_hook(announce_link)
    try:
        with shown_by_caller(), no_heartbeats(local), interruptible(
                lambda: run_id[-1] if run_id else None, rerun_hint(args, local)):
            state = flow(config, from_stage=args.from_stage, return_state=True)
    finally:
        forget_run()
        forget_link()
        if display is not None:
            display.stop()
    send_events()
    if local and not keep:
        # Before the run's own server stops at exit. The history may then miss a state;
        # the run's own outcome stands either way.
        with contextlib.suppress(Exception):
            recorded(state.state_details.flow_run_id, final=state.is_completed())
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, BaseException) or not state.is_completed():
        from tasks.stage import one_line

        flow_run_id = state.state_details.flow_run_id
        error = outcome if isinstance(outcome, BaseException) else None
        hint = failure_hint(error, flow_run_id, args, local)
        where = f"; trace in {log}" if log else ""
        if error is not None:
            logging.getLogger("houseprice").error("the run failed", exc_info=error)
            raise RunFailed(f"{one_line(error)}{hint}{where}") from error
        raise RunFailed(f"flow run {flow_run_id} ended {state.name}: {state.message}{hint}"
                        f"{where}")
    from tasks.report import result_table, summary_line

    # The table, then the one-line summary last (what scripts read).
    print(result_table(config, outcome, log=log), flush=True)
    print(summary_line(config, outcome), flush=True)
    return 0


def send_events(timeout: float = 10.0) -> None:
    """Send the events the run emitted (promotion, failure) now, before the result lines:
    left to the exit, Prefect's events worker logs "Still processing items" after them (and a
    temporary server may be gone before they reach it)."""
    from prefect.events.worker import EventsWorker

    quiet = logging.getLogger("EventsWorker")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its progress note; a failure to send still shows
    try:
        EventsWorker.drain_all(timeout=timeout)
    finally:
        quiet.setLevel(level)


def announce_link(flow_run_id: str) -> None:
    """The flow run's dashboard page, on the terminal as the run starts (written, not
    print()ed: this runs inside the flow, whose log_prints would send it to Prefect's log)."""
    link = run_link(flow_run_id)
    if link:
        sys.stdout.write(f"houseprice: flow run {flow_run_id}: {link}\n")
        sys.stdout.flush()


def run_again(args: argparse.Namespace) -> str:
    """The command that runs the pipeline again with the user's config file."""
    config = getattr(args, "config", None)
    return f"'houseprice run --config {config}'" if config else "the same 'houseprice run'"


def retryable(error: BaseException | None) -> bool:
    """Whether retrying the flow run as it was (its parameters frozen) can succeed once the
    cause is gone: an environment or network failure (a file in the way, a store or server
    that did not answer), not a config or data error (a retry fails the same way)."""
    from tasks.download import DownloadError
    from tasks.storage.store import StoreError

    chain, seen = [], error
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if any(isinstance(e, ValueError) for e in chain):  # DataError, ValidationError, ...
        return False
    return error is None or any(isinstance(e, OSError | TimeoutError | DownloadError |
                                           StoreError) for e in chain)


def failure_hint(error: BaseException | None, flow_run_id: Any, args: argparse.Namespace,
                 local: bool) -> str:
    """What to do after a failed run: retry the very flow run (on a user's API, when a retry
    can succeed), else fix the config or data and run again (finished stages are Cached)."""
    if not local and retryable(error):
        return (f"; fix the cause, then retry flow run {flow_run_id} with "
                f"'houseprice rerun {flow_run_id}'")
    return (f"; fix it, then run {run_again(args)} again (completed stages come back "
            "Cached)")


def rerun_hint(args: argparse.Namespace, local: bool) -> Callable[[str | None], str]:
    def hint(flow_run_id: str | None) -> str:
        if flow_run_id and not local:
            return f"resume it with 'houseprice rerun {flow_run_id}'"
        return f"resume it with {run_again(args)} (completed stages come back Cached)"
    return hint


@contextlib.contextmanager
def interruptible(current_run: Callable[[], str | None], hint: Callable[[str | None], str]):
    """Ctrl-C: at once, a line naming the flow run and how to resume it, then Prefect records
    the interruption (the running tasks end first); a second Ctrl-C exits at once."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from tasks.progress import resume, stop

    resume()
    pressed: list[float] = []

    def on_interrupt(signum, frame):
        if pressed:
            sys.stderr.write("houseprice: interrupted again: exiting now\n")
            sys.stderr.flush()
            os._exit(130)
        pressed.append(1.0)
        stop()  # training threads end at their next epoch or fold
        run = current_run()
        sys.stderr.write(f"houseprice: interrupted{f': flow run {run}' if run else ''}; "
                         f"stopping (Ctrl-C again to exit at once); {hint(run)}\n")
        sys.stderr.flush()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    except KeyboardInterrupt:
        run = current_run()
        raise Interrupted(f"interrupted{f': flow run {run}' if run else ''}; {hint(run)}"
                          ) from None
    finally:
        signal.signal(signal.SIGINT, previous)


class Interrupted(RuntimeError):
    """The run was stopped by Ctrl-C; the message names the flow run and how to resume."""


def warm_up_flow_engine() -> None:
    """Import what Prefect imports only at a flow's first call (its flow and task engines;
    FastAPI, for the parameters' JSON form: about 0.5 s here). Done while a local API server
    boots in its own process, it is off the run's critical path."""
    import fastapi.encoders  # noqa: F401
    import prefect.flow_engine  # noqa: F401
    import prefect.task_engine  # noqa: F401


def no_heartbeats(local: bool):
    """Flow run heartbeats let a server's services find crashed runs. The local servers
    (kept, or the run's own) run none of the services that read them; and the heartbeat
    thread, which sleeps in 1 s steps, is joined at the flow's end: up to 1 s added to every
    run. Off on a local API; as set on the user's server."""
    if not local:
        return contextlib.nullcontext()
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def recorded(flow_run_id: Any, final: bool = True, wait_s: float = 15.0,
             every_s: float = 0.02) -> list[Any]:
    """The task runs of a flow run, read from the API once it has recorded the end of every
    one (or after ``wait_s``, as they are then). Task runs report their states as events,
    which the server records a moment later; a local server stopped before that (at this
    process's exit) cancels the write, prints its traceback and leaves the runs Running in
    the history. ``final=False`` (a failed flow, whose never-started tasks stay Pending)
    waits only for the Running ones."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs_of = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    done = ((lambda s: s is not None and s.is_final()) if final
            else (lambda s: s is not None and not s.is_running()))
    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=runs_of)
            if all(done(r.state) for r in runs) or time.monotonic() > deadline:
                return runs
            time.sleep(every_s)


def prefect_log_to_file(artifacts: str) -> Path:
    """Prefect's own log lines (each task's start, finish and messages) to a file under
    ``<artifacts>/logs`` (with an object store root, under this machine's cache of it), not
    the terminal, which keeps its warnings and errors; returns the file's path."""
    import datetime as dt

    from prefect.logging.configuration import setup_logging

    from tasks.storage.store import canonical, local_cache, open_store

    setup_logging()  # Prefect's console handler on the root logger (a no-op if done)
    root = canonical(artifacts)
    path = ((local_cache(root) if open_store(root).remote else Path(root)) / "logs"
            / f"run-{dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log")
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    root = logging.getLogger()
    # Prefect's own formatter (it names the flow and task run of each line), as on the
    # terminal.
    console = next((h for h in root.handlers if h.formatter is not None), None)
    handler.setFormatter(console.formatter if console else logging.Formatter(
        "%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
    for h in root.handlers:
        h.setLevel(max(h.level, logging.WARNING))
        h.addFilter(_no_errors)  # a failure is one line at the end, its trace in the file
    root.addHandler(handler)
    return path


def _no_errors(record: logging.LogRecord) -> bool:
    """Terminal handlers keep warnings, not errors: Prefect logs each failed task and flow
    run with its trace (about 145 lines for one failure); the command ends with one line
    saying what failed and where the log with those traces is."""
    return record.levelno < logging.ERROR


class RunFailed(RuntimeError):
    """The flow run did not complete; the message says why (and how to retry it)."""


class TerminalProgress:
    """Progress on the terminal (standard error), fed by ``tasks.progress`` hooks, so the
    stages print nothing themselves (candidates trained on Dask workers do not report here):

    - a line as each stage ends (Completed in how long, Cached, Failed), and one while a
      stage has run for ``every`` seconds or more (``houseprice: select running 0:04``);
    - while candidates train, a block redrawn in place every ``every`` seconds: a header
      (elapsed time, candidates done) and one row per candidate in training with its percent
      of epochs or folds, its time so far and its latest valid log RMSE (mean over its folds).
    """

    SHOWN = 8  # rows of candidates in training; the rest are counted

    def __init__(self, total: int, every: float = 2.0, out=None):
        import threading

        self.total, self.every, self.out = total, every, out or sys.stderr
        self.fractions: dict[str, float] = {}
        self.scores: dict[str, float] = {}
        self.first_seen: dict[str, float] = {}
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.started: float | None = None
        self.drawn = 0  # lines of the block now on the screen
        self.thread = threading.Thread(target=self._loop, name="houseprice-progress",
                                       daemon=True)
        self.removers: list = []
        self.stage_started: dict[str, float] = {}

    def start(self) -> TerminalProgress:
        from tasks.progress import add_hook, add_score_hook, add_stage_hook

        self.removers = [add_hook(self.update), add_stage_hook(self.stage),
                         add_score_hook(self.score)]
        self.thread.start()
        return self

    def update(self, candidate: str, fraction: float) -> None:
        import time

        with self.lock:
            now = time.monotonic()
            if self.started is None:
                self.started = now
            if fraction > 0:  # under way (at 0% it waits for the fit thread)
                self.first_seen.setdefault(candidate, now)
            self.fractions[candidate] = max(fraction, self.fractions.get(candidate, 0.0))

    def score(self, candidate: str, valid_log_rmse: float) -> None:
        with self.lock:
            self.scores[candidate] = valid_log_rmse

    def stage(self, name: str, state: str) -> None:
        """A stage's line as it ends: ``select · Completed in 3.1 s``, ``download · Cached``."""
        import time

        with self.lock:
            if state == "Running":
                self.stage_started[name] = time.monotonic()
                return
            took = time.monotonic() - self.stage_started.pop(name, time.monotonic())
            # Written, not print()ed: this runs inside the flow, whose log_prints would
            # send a print to Prefect's log instead of the terminal.
            from tasks.report import stage_line

            self.out.write(self._erase() + stage_line(name, state, took) + "\n")
            self.out.flush()

    def line(self) -> str | None:
        """The header of the training block, or None when nothing is training."""
        return next((b for b in self.block() if b.startswith("houseprice: training")), None)

    def block(self) -> list[str]:
        """The lines of the training block (empty when nothing is training)."""
        import time

        with self.lock:
            now = time.monotonic()
            running = [f"houseprice: {n} running {_clock(now - t)}"
                       for n, t in self.stage_started.items() if now - t >= self.every]
            if self.started is None:
                return running
            finished = sum(f >= 1.0 for f in self.fractions.values())
            training = sorted((n, f) for n, f in self.fractions.items() if f < 1.0)
            scores, seen = dict(self.scores), dict(self.first_seen)
            elapsed = now - self.started
        if not training:
            return running
        # The training block stands for the train stage's own "running" line.
        running = [line for line in running if not line.startswith("houseprice: train ")]
        shown = ", ".join(f"{n} {100 * f:.0f}%" for n, f in training[:4])
        more = f" (+{len(training) - 4} more)" if len(training) > 4 else ""
        lines = [f"houseprice: training {_clock(elapsed)} · {finished} of {self.total} "
                 f"candidates trained · {shown}{more}"]
        # The ones under way first (a candidate at 0% waits for the fit thread).
        rows = sorted(training, key=lambda nf: (nf[1] == 0.0, nf[0]))[:self.SHOWN]
        width = max(len(n) for n, _ in rows)
        for n, f in rows:
            if n not in seen:
                lines.append(f"  {n:<{width}}  waiting")
                continue
            valid = f"valid {scores[n]:.4f}" if n in scores else ""
            lines.append(f"  {n:<{width}}  {100 * f:3.0f}%  {_clock(now - seen[n])}  {valid}")
        if len(training) > self.SHOWN:
            lines.append(f"  ... {len(training) - self.SHOWN} more training")
        return running + lines

    def _erase(self) -> str:
        """Terminal codes that remove the block drawn last (cursor up, clear below)."""
        codes = f"\x1b[{self.drawn}F\x1b[J" if self.drawn else ""
        self.drawn = 0
        return codes

    def _loop(self) -> None:
        while not self.done.wait(self.every):
            lines = self.block()
            with self.lock:
                text = self._erase() + "".join(line + "\n" for line in lines)
                self.drawn = len(lines)
                if text:
                    self.out.write(text)
                    self.out.flush()

    def stop(self) -> None:
        for remove in self.removers:
            remove()
        self.done.set()
        self.thread.join(timeout=5)
        with self.lock:  # the block is done with: the result table follows
            if self.drawn:
                self.out.write(self._erase())
                self.out.flush()


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"
