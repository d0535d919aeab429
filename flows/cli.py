"""``houseprice``: run, serve (on a schedule) or retry the pipeline; batch-predict with a model.

Failures end with a non-zero exit and one line on stderr saying what went wrong, where, and
what to do (``--traceback`` shows the full trace).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
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
    p.add_argument("--data-dir", metavar="DIR",
                   help="download cache (env HOUSEPRICE_DATA_DIR; default data/cache)")
    p.add_argument("--artifacts", metavar="DIR",
                   help="artifact root (env HOUSEPRICE_ARTIFACTS; default artifacts/)")
    p.add_argument("--submission", metavar="FILE", help="also copy the Kaggle CSV here")
    p.add_argument("--folds", type=int, metavar="K", help="number of CV folds (default 5)")
    p.add_argument("--epochs", type=int, metavar="N", help="epochs for every torch candidate")
    p.add_argument("--seed", type=int, help="seed for folds, init, dropout and batches")
    p.add_argument("--fit-on", choices=["train", "train+test"],
                   help="rows the preprocessor is fitted on ('train+test' = the book)")
    p.add_argument("--fold-scheme", choices=["shuffled", "contiguous"],
                   help="'contiguous' = the book's unshuffled folds")
    p.add_argument("--target", choices=["log", "raw"], help="'raw' = the book's raw price")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    return p


def _runner_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task-runner", choices=["threads", "dask"], default="threads",
                   help="where candidates train: Prefect's thread pool (default) or Dask")
    p.add_argument("--dask-address", metavar="tcp://HOST:PORT",
                   help="Dask scheduler to use (default: a local cluster of 2 workers); "
                        "every worker must see the artifact root at the same path")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="houseprice", description=__doc__.splitlines()[0])
    p.add_argument("--traceback", action="store_true", help="show the full trace on errors")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[_config_flags()],
                         help="run the whole pipeline (download ... predict)")
    run.add_argument("--from", dest="from_stage", choices=STAGES, metavar="STAGE",
                     help="recompute this stage and all after it (refreshing their cache): "
                          + ", ".join(STAGES))
    _runner_flags(run)

    serve = sub.add_parser(
        "serve", parents=[_config_flags()],
        help="serve the pipeline as a (scheduled) deployment; needs a Prefect server")
    when = serve.add_mutually_exclusive_group()
    when.add_argument("--cron", metavar="EXPR", help="cron schedule, e.g. '0 3 * * *'")
    when.add_argument("--interval", type=float, metavar="SECONDS", help="run every N seconds")
    serve.add_argument("--name", default="scheduled", help="deployment name")
    _runner_flags(serve)

    rerun = sub.add_parser(
        "rerun", help="retry a failed flow run (Prefect's retry): stages that completed come "
                      "back Cached")
    rerun.add_argument("flow_run_id", metavar="FLOW_RUN_ID")
    rerun.add_argument("--timeout", type=float, default=3600, metavar="SECONDS",
                       help="how long to wait for a deployment's run to finish (0: don't)")

    pred = sub.add_parser("predict", help="batch-predict a CSV or Parquet file")
    pred.add_argument("input", metavar="INPUT", help="raw rows shaped like the Kaggle test file")
    pred.add_argument("--out", required=True, metavar="FILE", help="where to write Id,SalePrice")
    pred.add_argument("--model", default="latest", metavar="VERSION",
                      help="select-stage version (default: the latest run's)")
    pred.add_argument("--artifacts", metavar="DIR", help="artifact root (env HOUSEPRICE_ARTIFACTS)")
    pred.add_argument("--chunk-size", type=int, default=50_000, metavar="ROWS")
    return p


def build_config(args: argparse.Namespace):
    """The PipelineConfig for ``houseprice run``: file, then flags on top."""
    from tasks.config import PipelineConfig, load_config_file

    data: dict[str, Any] = load_config_file(args.config) if args.config else {}

    def put(section: str | None, key: str, value: Any) -> None:
        if value is not None:
            (data.setdefault(section, {}) if section else data)[key] = value

    put("data", "url", args.data_url)
    put("data", "cache_dir", args.data_dir)
    put(None, "artifacts_dir", args.artifacts)
    put(None, "submission", args.submission)
    put("train", "n_splits", args.folds)
    put("train", "seed", args.seed)
    put("train", "fold_scheme", args.fold_scheme)
    put("train", "target", args.target)
    put("train", "device", args.device)
    put("preprocess", "fit_on", args.fit_on)
    try:
        config = PipelineConfig.model_validate(data)
        return config.with_epochs(args.epochs) if args.epochs is not None else config
    except ValidationError as exc:
        raise ConfigError(_config_error(exc, data)) from None


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


def _run(args: argparse.Namespace) -> int:
    config = build_config(args)  # validated before anything starts
    from flows.pipeline import with_task_runner

    where = os.environ.get("PREFECT_API_URL")
    if where:
        _check_api(where)
    where = where or "an ephemeral local Prefect API"
    print(f"houseprice: running on {where}; artifacts in {config.artifacts_dir}", flush=True)
    flow = with_task_runner(args.task_runner, args.dask_address)
    state = flow(config, from_stage=args.from_stage, return_state=True)
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, BaseException) or not state.is_completed():
        from tasks.stage import one_line

        run_id = state.state_details.flow_run_id
        hint = (f"; fix the cause, then retry flow run {run_id} with 'houseprice rerun {run_id}'"
                if os.environ.get("PREFECT_API_URL") else "")
        if isinstance(outcome, BaseException):
            raise RunFailed(f"{one_line(outcome)}{hint}") from outcome
        raise RunFailed(f"flow run {run_id} ended {state.name}: {state.message}{hint}")
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
    _check_api(url)
    from flows.pipeline import with_task_runner

    flow = with_task_runner(args.task_runner, args.dask_address)
    print(f"houseprice: serving deployment house-price/{args.name} on {url}"
          + (f", cron '{args.cron}'" if args.cron else "")
          + (f", every {args.interval:g} s" if args.interval else ""), flush=True)
    flow.serve(name=args.name, cron=args.cron, interval=args.interval,
               parameters={"config": config.model_dump(mode="json")})
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

    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise RuntimeError("rerun needs the Prefect server that holds the run, and "
                           f"PREFECT_API_URL is not set: {NEEDS_SERVER}")
    _check_api(url)
    try:
        run_id = uuid.UUID(args.flow_run_id)
    except ValueError:
        raise ValueError(f"{args.flow_run_id!r} is not a flow run id (a UUID, as shown in "
                         "the dashboard)") from None
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


def _summary(config, result: dict[str, Any]) -> None:
    parts = ", ".join(f"{n} {w:.3f}" for n, w in result["components"].items())
    print(
        f"houseprice: selected {result['selected']}"
        + (f" [{parts}]" if result["selected"] == "blend" else "")
        + f" ({config.train.n_splits}-fold mean valid log RMSE "
        f"{result['mean_valid_log_rmse']:.4f}; out-of-fold log RMSE "
        f"{result['oof_log_rmse_clean']:.4f} without the outliers, "
        f"{result['oof_log_rmse_all']:.4f} on all rows; model {result['model_version']}); "
        f"predictions: {result['submission']}"
        + (f"; copied to {config.submission}" if config.submission else ""),
        flush=True,
    )


def _predict(args: argparse.Namespace) -> int:
    from tasks.artifacts import resolve
    from tasks.config import default_artifacts_dir
    from tasks.predict import FittedModel, predict_file

    if args.chunk_size <= 0:
        raise ValueError("--chunk-size must be a positive number of rows")
    ref = resolve(args.artifacts or default_artifacts_dir(), "select", args.model)
    model = FittedModel.load(ref.file("model.pt"))
    stats = predict_file(model, Path(args.input), Path(args.out), args.chunk_size,
                         warn=lambda msg: print(f"houseprice: warning: {msg}", file=sys.stderr))
    print(f"houseprice: wrote {stats['rows']} predictions to {args.out} "
          f"(model {ref.version}: {model.metrics['candidate']})")
    return 0


def _config_error(exc: ValidationError, data: dict[str, Any] | None = None) -> str:
    err = exc.errors()[0]
    field = _where(tuple(err["loc"]), data or {})
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"invalid configuration: {field}: {err['msg']}{more}; fix it in --config or the flags"


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
        commands = {"run": _run, "serve": _serve, "rerun": _rerun, "predict": _predict}
        return commands[args.command](args)
    except ConfigError as exc:
        print(f"houseprice: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as exc:
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
