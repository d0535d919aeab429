"""``houseprice``: run, serve (on a schedule) or retry the pipeline; batch-predict with a model;
list, promote and roll back production models; score an inbox; write a monthly feed.

Failures end with a non-zero exit and one line on stderr saying what went wrong, where, and
what to do (``--traceback`` shows the full trace).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tasks.config import STAGES

EXIT_FAILED = 1
EXIT_USAGE = 2


def _config_flags() -> argparse.ArgumentParser:
    """The flags that build a PipelineConfig (shared by ``run`` and ``serve``)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", metavar="FILE", help="TOML or JSON config (PipelineConfig)")
    p.add_argument("--data-url", metavar="URL|DIR",
                   help="base URL, file:// URL or directory with the raw CSVs "
                        "(env HOUSEPRICE_DATA_URL)")
    p.add_argument("--train", metavar="SOURCE",
                   help="training rows: a CSV/Parquet file, a directory or a glob of them "
                        "(http(s)://, file:// or a path); default: the Kaggle training file")
    p.add_argument("--test", metavar="SOURCE",
                   help="rows to predict, as --train; default: the Kaggle test file")
    p.add_argument("--on-duplicate", choices=["error", "last"],
                   help="the same Id in two training files: an error (default) or the later "
                        "file wins (corrections)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="download cache (env HOUSEPRICE_DATA_DIR; default data/cache)")
    p.add_argument("--artifacts", metavar="DIR",
                   help="artifact root (env HOUSEPRICE_ARTIFACTS; default artifacts/)")
    p.add_argument("--submission", metavar="FILE", help="also copy the Kaggle CSV here")
    p.add_argument("--folds", type=int, metavar="K", help="number of CV folds (default 5)")
    p.add_argument("--repeats", type=int, metavar="R",
                   help="cut the K folds R times with different seeds (default 3)")
    p.add_argument("--epochs", type=int, metavar="N", help="epochs for every torch candidate")
    p.add_argument("--seed", type=int, help="seed for folds, init, dropout and batches")
    p.add_argument("--fit-on", choices=["train", "train+test"],
                   help="rows the preprocessor is fitted on ('train+test' = the book)")
    p.add_argument("--fold-scheme", choices=["shuffled", "contiguous"],
                   help="'contiguous' = the book's unshuffled folds")
    p.add_argument("--target", choices=["log", "raw"], help="'raw' = the book's raw price")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="where torch candidates train (default auto: CUDA when present)")
    p.add_argument("--final", choices=["ensemble", "refit"],
                   help="each component's final model: its fold models averaged (default) "
                        "or one model fitted on all rows (fewer trees and networks: faster "
                        "to predict)")
    p.add_argument("--min-rows-per-s", type=float, metavar="RATE",
                   help="select only candidates and blends that predict at least this many "
                        "rows/s (measured at select time)")
    return p


def _runner_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task-runner", choices=["threads", "dask"], default="threads",
                   help="where candidates train: Prefect's thread pool (default) or Dask")
    p.add_argument("--dask-address", metavar="tcp://HOST:PORT",
                   help="Dask scheduler to use (default: a local cluster of 2 workers); "
                        "every worker must see the artifact root at the same path")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("houseprice")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="houseprice", description=__doc__.splitlines()[0])
    p.add_argument("--traceback", action="store_true", help="show the full trace on errors")
    p.add_argument("--version", action="version", version=f"houseprice {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[_config_flags()],
                         help="run the whole pipeline (download ... predict)")
    run.add_argument("--from", dest="from_stage", choices=STAGES, metavar="STAGE",
                     help="recompute this stage and all after it (refreshing their cache): "
                          + ", ".join(STAGES))
    run.add_argument("--quiet", action="store_true",
                     help="no progress display and only Prefect's warnings and errors: the "
                          "result table and summary line still print")
    _runner_flags(run)

    serve = sub.add_parser(
        "serve", parents=[_config_flags()],
        help="serve the pipeline as a (scheduled) deployment; needs a Prefect server")
    when = serve.add_mutually_exclusive_group()
    when.add_argument("--cron", metavar="EXPR", help="cron schedule, e.g. '0 3 * * *'")
    when.add_argument("--interval", type=float, metavar="SECONDS", help="run every N seconds")
    serve.add_argument("--name", default="scheduled", help="deployment name")
    serve.add_argument("--flow", choices=["train", "score", "both"], default="train",
                       help="serve the training pipeline (house-price), the scoring flow "
                            "(house-price-score, needs --inbox) or both")
    serve.add_argument("--inbox", metavar="SOURCE", help="files the scoring flow scores")
    serve.add_argument("--drift-threshold", type=float, metavar="SHARE",
                       help="share of drifted rows that raises houseprice.drift.detected")
    _runner_flags(serve)

    rerun = sub.add_parser(
        "rerun", help="retry a failed flow run (Prefect's retry): stages that completed come "
                      "back Cached")
    rerun.add_argument("flow_run_id", metavar="FLOW_RUN_ID")
    rerun.add_argument("--timeout", type=float, default=3600, metavar="SECONDS",
                       help="how long to wait for a deployment's run to finish (0: don't)")

    pred = sub.add_parser("predict", help="batch-predict a CSV or Parquet file")
    pred.add_argument("input", metavar="INPUT", help="raw rows shaped like the Kaggle test file")
    pred.add_argument("--out", required=True, metavar="FILE",
                      help="where to write Id,SalePrice: CSV, or Parquet for a .parquet "
                           "name ('-': CSV on standard output; the drift "
                           "summary then goes to standard error)")
    pred.add_argument("--model", default="production", metavar="VERSION",
                      help="select-stage version, 'production' (default) or 'latest'")
    pred.add_argument("--artifacts", metavar="DIR", help="artifact root (env HOUSEPRICE_ARTIFACTS)")
    pred.add_argument("--chunk-size", type=int, default=50_000, metavar="ROWS",
                      help="rows read and predicted at a time: memory is bounded by it "
                           "(default 50000)")

    score = sub.add_parser("score", help="run the scoring flow once: score every file of an "
                                         "inbox with the production model")
    score.add_argument("inbox", metavar="SOURCE", help="a file, directory, glob or URL")
    score.add_argument("--model", default="production", metavar="VERSION",
                       help="select-stage version, 'production' (default) or 'latest'")
    score.add_argument("--artifacts", metavar="DIR", help="artifact root")
    score.add_argument("--drift-threshold", type=float, metavar="SHARE",
                       help="share of drifted rows that raises houseprice.drift.detected "
                            "(default 0.05)")

    models = sub.add_parser("models", help="list the selected models (production marked)")
    models.add_argument("--artifacts", metavar="DIR", help="artifact root")

    promote = sub.add_parser("promote", help="make a model version production by hand")
    promote.add_argument("version", metavar="VERSION", help="a select version (see 'models')")
    promote.add_argument("--artifacts", metavar="DIR", help="artifact root")

    rollback = sub.add_parser("rollback", help="make the previous production model "
                                               "production again")
    rollback.add_argument("--artifacts", metavar="DIR", help="artifact root")

    feed = sub.add_parser("make-feed", help="write the Kaggle training rows as monthly files "
                                            "(YYYY-MM.csv), to try the living-data loop")
    feed.add_argument("out_dir", metavar="OUT_DIR")
    feed.add_argument("--until", metavar="YYYY-MM", help="last month to write")
    feed.add_argument("--since", metavar="YYYY-MM", help="first month to write")
    feed.add_argument("--data-url", metavar="URL|DIR", help="where the Kaggle pair is")
    feed.add_argument("--data-dir", metavar="DIR", help="download cache")
    # Global flags work after the subcommand too (SUPPRESS: absent there, the top level's
    # value stands).
    for command in sub.choices.values():
        command.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                             help="show the full trace on errors")
    return p


def build_config(args: argparse.Namespace):
    """The PipelineConfig for ``houseprice run``: file, then flags on top."""
    from tasks.config import PipelineConfig, load_config_file

    try:
        data: dict[str, Any] = load_config_file(args.config) if args.config else {}
    except (OSError, ValueError) as exc:  # missing, unreadable or malformed: a usage error
        raise ConfigError(str(exc)) from None

    def put(section: str | None, key: str, value: Any) -> None:
        if value is not None:
            (data.setdefault(section, {}) if section else data)[key] = value

    put("data", "url", args.data_url)
    put("data", "train", args.train)
    put("data", "test", args.test)
    put("data", "on_duplicate", args.on_duplicate)
    put("data", "cache_dir", args.data_dir)
    put(None, "artifacts_dir", args.artifacts)
    put(None, "submission", args.submission)
    put("train", "n_splits", args.folds)
    put("train", "repeats", args.repeats)
    put("train", "seed", args.seed)
    put("train", "fold_scheme", args.fold_scheme)
    put("train", "target", args.target)
    put("train", "device", args.device)
    put("preprocess", "fit_on", args.fit_on)
    put("select", "final", args.final)
    put("select", "min_rows_per_s", args.min_rows_per_s)
    try:
        config = PipelineConfig.model_validate(data)
        return config.with_epochs(args.epochs) if args.epochs is not None else config
    except ValidationError as exc:
        raise ConfigError(_config_error(exc, data, args.config)) from None


class ConfigError(ValueError):
    """The run's configuration is invalid (exit 2); the message names the field."""


def _where(loc: tuple[Any, ...], data: dict[str, Any]) -> str:
    """A pydantic error location, a listed candidate named by its name rather than
    ``candidates.0``, and the union's kind tag left out (the message names the kind)."""
    from tasks.kinds import KINDS

    parts = list(loc)
    if len(parts) >= 2 and parts[0] == "candidates" and isinstance(parts[1], int):
        listed = data.get("candidates") or []
        entry = listed[parts[1]] if parts[1] < len(listed) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        if name:
            rest = parts[3:] if len(parts) > 2 and parts[2] in KINDS else parts[2:]
            return f"candidate '{name}'" + "".join(f".{p}" for p in rest)
    return ".".join(str(p) for p in parts) or "config"


def _check_api(url: str) -> None:
    """Fail in one line, before the run, when PREFECT_API_URL names a server that is down."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise ConnectionError(
            f"cannot reach the Prefect API at {url} ({type(problem).__name__}); start it with "
            "'prefect server start' or unset PREFECT_API_URL to use an ephemeral one"
        )


def _start_ephemeral_api() -> Callable[[], None]:
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
                 "PREFECT__SERVER_FINAL": "1", **_skip_block_registration()},
            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
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
                        "'prefect server start' to see why")
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


def _die_with_parent() -> None:
    """In the server's process before it starts (Linux): SIGTERM it when this process dies,
    so a killed run (SIGKILL skips ``atexit``) leaves no server behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1  # noqa: N806 - the kernel's name
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 15)


def _skip_block_registration() -> dict[str, str]:
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


def _user_api() -> str | None:
    """The Prefect API the user chose (not the temporary one this process started)."""
    url = os.environ.get("PREFECT_API_URL")
    return None if url and url == os.environ.get(_EPHEMERAL) else url


def _run(args: argparse.Namespace) -> int:
    api_ready = _start_ephemeral_api()
    config = build_config(args)  # validated before anything starts
    if args.quiet:  # read when Prefect is first imported, just below
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from tasks.models import resolve_device

    resolve_device(config.train.device)  # --device cuda without CUDA: fail now, in one line
    from flows.pipeline import with_task_runner

    where = _user_api()
    if where:
        _check_api(where)
    where = where or "an ephemeral local Prefect API"
    api_ready()
    print(f"houseprice: running on {where}; artifacts in {config.artifacts_dir}", flush=True)
    flow = with_task_runner(args.task_runner, args.dask_address)
    # A live line while candidates train, on a terminal only (not in CI logs or pipes).
    display = (TerminalProgress(len(config.all_candidates())).start()
               if not args.quiet and sys.stderr.isatty() else None)
    try:
        state = flow(config, from_stage=args.from_stage, return_state=True)
    finally:
        if display is not None:
            display.stop()
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, BaseException) or not state.is_completed():
        from tasks.stage import one_line

        run_id = state.state_details.flow_run_id
        hint = (f"; fix the cause, then retry flow run {run_id} with 'houseprice rerun {run_id}'"
                if _user_api() else "")
        if isinstance(outcome, BaseException):
            raise RunFailed(f"{one_line(outcome)}{hint}") from outcome
        raise RunFailed(f"flow run {run_id} ended {state.name}: {state.message}{hint}")
    # The table, then the one-line summary last (what scripts read).
    print(result_table(config, outcome), flush=True)
    _summary(config, outcome)
    return 0


class RunFailed(RuntimeError):
    """The flow run did not complete; the message says why (and how to retry it)."""


NEEDS_SERVER = ("start one with 'prefect server start' and set "
                "PREFECT_API_URL=http://127.0.0.1:4200/api")


def _serve(args: argparse.Namespace) -> int:
    config = build_config(args)
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise RuntimeError("scheduling needs a Prefect server (Prefect cannot schedule on its "
                           f"ephemeral API) and PREFECT_API_URL is not set: {NEEDS_SERVER}")
    if args.flow in ("score", "both") and not args.inbox:
        raise ValueError("serving the scoring flow needs --inbox SOURCE (the files to score)")
    _check_api(url)
    from prefect import serve

    from flows.pipeline import with_task_runner
    from flows.score import house_price_score

    when = {"cron": args.cron, "interval": args.interval}
    deployments = []
    if args.flow in ("train", "both"):
        flow = with_task_runner(args.task_runner, args.dask_address)
        deployments.append(flow.to_deployment(
            name=args.name, parameters={"config": config.model_dump(mode="json")}, **when))
    if args.flow in ("score", "both"):
        score = _score_config(args.inbox, config.artifacts_dir, "production",
                              args.drift_threshold, config.data.cache_dir)
        deployments.append(house_price_score.to_deployment(
            name=args.name, parameters={"config": score.model_dump(mode="json")}, **when))
    names = [f"{d.flow_name}/{d.name}" for d in deployments]
    print(f"houseprice: serving deployment(s) {', '.join(names)} on {url}"
          + (f", cron '{args.cron}'" if args.cron else "")
          + (f", every {args.interval:g} s" if args.interval else ""), flush=True)
    serve(*deployments, print_starting_message=False)
    return 0


def _score_config(inbox: str, artifacts: str | None, model: str, threshold: float | None,
                  cache_dir: str | None = None):
    from tasks.config import ScoreConfig, default_artifacts_dir

    fields: dict[str, Any] = {"inbox": inbox, "model": model,
                              "artifacts_dir": artifacts or default_artifacts_dir()}
    if threshold is not None:
        fields["drift_threshold"] = threshold
    if cache_dir:
        fields["cache_dir"] = cache_dir
    try:
        return ScoreConfig.model_validate(fields)
    except ValidationError as exc:
        raise ConfigError(_config_error(exc)) from None


def _score(args: argparse.Namespace) -> int:
    config = _score_config(args.inbox, args.artifacts, args.model, args.drift_threshold)
    from flows.score import house_price_score

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


def _rerun(args: argparse.Namespace) -> int:
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
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise RuntimeError("rerun needs the Prefect server that holds the run, and "
                           f"PREFECT_API_URL is not set: {NEEDS_SERVER}")
    _check_api(url)
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


class TerminalProgress:
    """Training progress on the terminal: every ``every`` seconds while candidates train,
    one line to standard error (elapsed time, candidates done, the ones in training with
    their percent of epochs or folds). Fed by ``tasks.progress`` hooks, so the stages print
    nothing themselves; candidates trained on Dask workers do not report here."""

    def __init__(self, total: int, every: float = 2.0, out=None):
        import threading

        self.total, self.every, self.out = total, every, out or sys.stderr
        self.fractions: dict[str, float] = {}
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.started: float | None = None
        self.thread = threading.Thread(target=self._loop, name="houseprice-progress",
                                       daemon=True)
        self.remove = lambda: None

    def start(self) -> TerminalProgress:
        from tasks.progress import add_hook

        self.remove = add_hook(self.update)
        self.thread.start()
        return self

    def update(self, candidate: str, fraction: float) -> None:
        import time

        with self.lock:
            if self.started is None:
                self.started = time.monotonic()
            self.fractions[candidate] = max(fraction, self.fractions.get(candidate, 0.0))

    def line(self) -> str | None:
        """The current progress line, or None when nothing is training."""
        import time

        with self.lock:
            if self.started is None:
                return None
            finished = sum(f >= 1.0 for f in self.fractions.values())
            training = sorted((n, f) for n, f in self.fractions.items() if f < 1.0)
            elapsed = time.monotonic() - self.started
        if not training:
            return None
        shown = ", ".join(f"{n} {100 * f:.0f}%" for n, f in training[:4])
        more = f" (+{len(training) - 4} more)" if len(training) > 4 else ""
        return (f"houseprice: training {int(elapsed) // 60}:{int(elapsed) % 60:02d} · "
                f"{finished} of {self.total} candidates trained · {shown}{more}")

    def _loop(self) -> None:
        while not self.done.wait(self.every):
            text = self.line()
            if text is not None:
                print(text, file=self.out, flush=True)

    def stop(self) -> None:
        self.remove()
        self.done.set()
        self.thread.join(timeout=5)


def result_table(config, result: dict[str, Any], shown: int = 12) -> str:
    """The end of ``houseprice run`` as a person reads it: the candidates best first (the
    all-rows score, its spread over repeats, the score without the outliers, blend weight,
    status), the selection, and where everything was written."""
    from tasks.artifacts import ArtifactRef
    from tasks.folds import cv_label

    root = Path(config.artifacts_dir).resolve()
    model = ArtifactRef(root=str(root), stage="select", version=result["model_version"])
    board = json.loads(model.file("leaderboard.json").read_text())["leaderboard"]

    def score(m: dict[str, Any], key: str) -> str:
        return "—" if m.get(key) is None else f"{m[key]:.4f}"

    rows = [("candidate", "all rows", "± repeats", "w/o outliers", "weight", "status")]
    for m in board[:shown]:
        chosen = m["candidate"] == result["selected"]
        weight = m.get("blend_weight")
        rows.append((
            m["candidate"] + (" *" if chosen else ""), score(m, "oof_log_rmse_all"),
            score(m, "oof_log_rmse_all_spread"), score(m, "oof_log_rmse_clean"),
            "" if not weight else f"{weight:.3f}",
            "selected" if chosen else m["status"] + (f": {m['reason']}" if m.get("reason")
                                                     else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    cv = cv_label(config.train.n_splits, config.train.repeats)
    lines = ["", f"{cv} out-of-fold log RMSE, best first "
             f"({len(board)} entries; * = selected):"]
    lines += ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=False)))
              + "  " + r[-1] for r in rows]
    if len(board) > shown:
        lines.append(f"  ... {len(board) - shown} more in {model.file('model_card.md')}")
    lines += [
        "",
        f"  model        {result['model_version']}  ({model.path})",
        f"  submission   {result['submission']}",
        *([f"  copied to    {config.submission}"] if config.submission else []),
        f"  artifacts    {root}",
    ]
    return "\n".join(lines)


def _summary(config, result: dict[str, Any]) -> None:
    from tasks.folds import cv_label

    parts = ", ".join(f"{n} {w:.3f}" for n, w in result["components"].items())
    promotion = result["promotion"]
    if promotion["basis"] == "same model":
        verdict = promotion["reason"]
    elif promotion["promote"]:
        verdict = f"promoted to production ({promotion['reason']})"
    else:
        verdict = (f"not promoted, production stays {promotion['production']} "
                   f"({promotion['reason']})")
    print(
        f"houseprice: selected {result['selected']}"
        + (f" [{parts}]" if result["selected"] == "blend" else "")
        + f" ({cv_label(config.train.n_splits, config.train.repeats)} out-of-fold log RMSE "
        f"{result['oof_log_rmse_all']:.4f}"
        + (f" ± {spread:.4f} over repeats" if (spread := result.get("oof_log_rmse_all_spread"))
           is not None else "")
        + " on all rows, "
        f"{result['oof_log_rmse_clean']:.4f} without the 2 outliers; "
        f"model {result['model_version']}, "
        f"data {result.get('data_version')}); {verdict}; predictions: {result['submission']}"
        + (f"; copied to {config.submission}" if config.submission else ""),
        flush=True,
    )


def _models(args: argparse.Namespace) -> int:
    from tasks.config import default_artifacts_dir

    root = args.artifacts or default_artifacts_dir()
    from tasks.promote import list_models

    rows = list_models(root)
    if not rows:
        print(f"houseprice: no models under {root}; run 'houseprice run' first")
        return 0
    print(f"{'':2}{'version':<17} {'created':<20} {'data':<17} {'rows':>5} "
          f"{'OOF all':>8} {'OOF w/o':>8}  selected")
    for r in rows:
        fmt = (lambda v: "—" if v is None else f"{v:.4f}")  # noqa: E731
        print(f"{'*' if r['production'] else ' ':2}{r['version']:<17} {r['created']:<20} "
              f"{str(r['data_version']):<17} {str(r['n_rows'] or '—'):>5} "
              f"{fmt(r['oof_log_rmse_all']):>8} {fmt(r['oof_log_rmse_clean']):>8}  "
              f"{r['selected']}")
    print("(* production)")
    return 0


def _promote(args: argparse.Namespace) -> int:
    from tasks.config import default_artifacts_dir
    from tasks.promote import promote_by_hand

    entry = promote_by_hand(args.artifacts or default_artifacts_dir(), args.version)
    print(f"houseprice: {entry['model']} is production ({entry['reason']})")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from tasks.config import default_artifacts_dir
    from tasks.promote import rollback

    entry = rollback(args.artifacts or default_artifacts_dir())
    print(f"houseprice: {entry['model']} is production again ({entry['reason']})")
    return 0


def _make_feed(args: argparse.Namespace) -> int:
    from tasks.config import DataConfig
    from tasks.download import fetch
    from tasks.feed import make_feed

    data = DataConfig(**{k: v for k, v in (("url", args.data_url), ("cache_dir", args.data_dir))
                         if v})
    train = fetch(data.files["train"], data.url, Path(data.cache_dir), timeout_s=data.timeout_s,
                  retries=data.retries, backoff_s=data.backoff_s)
    written = make_feed(train, Path(args.out_dir), until=args.until, since=args.since)
    first, last = min(written), max(written)
    print(f"houseprice: wrote {len(written)} monthly file(s) {first} .. {last} "
          f"({sum(written.values())} rows) to {args.out_dir}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from tasks.artifacts import resolve
    from tasks.batch import load_model, predict_file
    from tasks.config import default_artifacts_dir

    if args.chunk_size <= 0:
        raise ValueError("--chunk-size must be a positive number of rows")
    ref = resolve(args.artifacts or default_artifacts_dir(), "select", args.model)
    model = load_model(ref)

    def warn(msg: str) -> None:
        print(f"houseprice: warning: {msg}", file=sys.stderr)

    what = f"(model {ref.version}: {model.describe})"
    if args.out != "-":
        stats = predict_file(model, Path(args.input), Path(args.out), args.chunk_size, warn)
        print(f"houseprice: wrote {stats['rows']} predictions to {args.out} {what}")
        return 0
    # '-': the CSV on standard output, everything a person reads on standard error.
    import shutil
    import tempfile

    from tasks.batch import drift_path

    with tempfile.TemporaryDirectory(prefix="houseprice-predict-") as tmp:
        out = Path(tmp) / "predictions.csv"
        stats = predict_file(model, Path(args.input), out, args.chunk_size, warn)
        with out.open() as f:
            shutil.copyfileobj(f, sys.stdout)
        sys.stdout.flush()
        drift = json.loads(drift_path(out).read_text())
    print(f"houseprice: wrote {stats['rows']} predictions to standard output {what}; drift: "
          f"{json.dumps(drift)}", file=sys.stderr)
    return 0


def _config_error(exc: ValidationError, data: dict[str, Any] | None = None,
                  source: str | None = None) -> str:
    err = exc.errors()[0]
    field = _where(tuple(err["loc"]), data or {})
    msg = err["msg"]
    if err["type"] == "extra_forbidden":  # pydantic's "Extra inputs are not permitted"
        msg = "no such setting" + _did_you_mean(tuple(err["loc"]))
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    where = f" in {source}" if source else ""
    return (f"invalid configuration{where}: {field}: {msg}{more}; fix it in "
            + (f"{source} or the flags" if source else "--config or the flags"))


def _did_you_mean(loc: tuple) -> str:
    """For an unknown setting at ``loc`` of the config tree: the nearest real one, or the
    section's settings."""
    import difflib

    from pydantic import BaseModel

    from tasks.config import PipelineConfig

    cls: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type)
                                 and issubclass(field.annotation, BaseModel)):
            return ""  # candidates are checked by their kind, with its own hint
        cls = field.annotation
    names = list(cls.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (settings here: {', '.join(names)})"


def _trace(args: argparse.Namespace) -> None:
    """With ``--traceback``, the trace of the error being handled (its one line follows)."""
    if getattr(args, "traceback", False):
        import traceback

        traceback.print_exc()


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    finally:
        # The ephemeral API logs "Stopping temporary server" at exit, after our last line;
        # keep the summary or the one-line error last.
        logging.getLogger("prefect").setLevel(logging.WARNING)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    # The ephemeral API's telemetry call fails noisily on machines without internet (and can
    # race the fresh SQLite database); a user who wants it sets the variable to true.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect creates its home without parents; a missing parent makes the ephemeral API
    # fail to start and the run time out with an obscure message.
    if os.environ.get("PREFECT_HOME"):
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    try:
        commands = {"run": _run, "serve": _serve, "rerun": _rerun, "predict": _predict,
                    "score": _score, "models": _models, "promote": _promote,
                    "rollback": _rollback, "make-feed": _make_feed}
        return commands[args.command](args)
    except ConfigError as exc:
        _trace(args)
        print(f"houseprice: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as exc:
        _trace(args)
        print(f"houseprice: error: {_config_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("houseprice: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.traceback:
            raise
        from tasks.stage import one_line

        print(f"houseprice: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
