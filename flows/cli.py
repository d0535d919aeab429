"""``houseprice``: the house-price pipeline of Dive into Deep Learning ch. 4, cached.

Run, serve (on a schedule) or retry the pipeline; batch-predict with a model; list, promote
and roll back production models; check the artifact store; score an inbox; write a monthly
feed; stop the local Prefect API that runs keep.

Failures end with a non-zero exit and one line on stderr saying what went wrong, where, and
what to do (``--traceback`` shows the full trace). This module is the entry point: the parser,
and one error-and-exit path for every command; the commands live in ``flows/commands/``, one
module per group (``run``; ``operate``: serve, score, rerun; ``models``: predict, models,
promote, rollback, make-feed), with the configuration (``config``) and the Prefect API
(``server``) they share.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from pathlib import Path

from pydantic import ValidationError

from flows.commands import feed, local, operate, registry, run
from flows.commands.config import ConfigError, config_error
from tasks.layout import STAGES

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
    p.add_argument("--final", choices=["auto", "ensemble", "mixed", "refit"],
                   help="each component's final model: 'ensemble', its fold models averaged; "
                        "'refit', one model fitted on all rows (faster to predict); 'mixed', "
                        "linear kinds as the ensemble, the others refitted; 'auto' (the "
                        "default), 'mixed' when its estimated score is within "
                        "select.max_loss of the ensemble's, else 'ensemble'")
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


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it says it already or has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" not in text and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


class _RawDescriptionHelp(_Help, argparse.RawDescriptionHelpFormatter):
    """The top-level description as written (its two paragraphs), options as ``_Help``."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)


def _parser() -> argparse.ArgumentParser:
    head, _, rest = __doc__.partition("\n\n")
    p = _Parser(prog="houseprice", description=head.replace("``", "") + "\n\n"
                + textwrap.fill(rest.split("\n\n")[0].replace("\n", " "), 79),
                formatter_class=_RawDescriptionHelp)
    p.add_argument("--traceback", action="store_true", help="show the full trace on errors")
    p.add_argument("--verbose", action="store_true",
                   help="Prefect's own log lines on the terminal (default: in a log file under "
                        "<artifacts>/logs, its path printed; warnings still shown)")
    p.add_argument("--version", action="version", version=f"houseprice {_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

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
        help="serve the pipeline as a (scheduled) deployment on the local Prefect server "
             "(or PREFECT_API_URL's), and install the automations")
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
    _webhook_flag(serve)
    _runner_flags(serve)
    auto = sub.add_parser("automations", help="install (or replace) the automations: retrain "
                                              "on drift, notify on a failed run and on a "
                                              "promotion")
    auto.add_argument("--deployment", metavar="FLOW/NAME",
                      help="the training deployment to run on drift (e.g. "
                           "house-price/scheduled); none: no retraining")
    _webhook_flag(auto)

    rerun = sub.add_parser(
        "rerun", help="retry a failed flow run (Prefect's retry): stages that completed come "
                      "back Cached")
    rerun.add_argument("flow_run_id", metavar="FLOW_RUN_ID",
                       help="the failed run's id (a UUID: the dashboard and the failed "
                            "run's last line show it)")
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
    pred.add_argument("--interval", type=float, metavar="LEVEL",
                      help="add SalePrice_lo and SalePrice_hi, a calibrated range that "
                           "holds the price for this share of houses (e.g. 0.9; without it "
                           "the output is Kaggle's Id,SalePrice)")
    pred.add_argument("--device", default="cpu", metavar="DEVICE",
                      help="where the networks' matrix products run: cpu (NumPy, the "
                           "default) or cuda / cuda:N (torch on that GPU; trees stay on "
                           "the CPU)")

    score = sub.add_parser("score", help="run the scoring flow once: score every file of an "
                                         "inbox with the production model")
    score.add_argument("inbox", metavar="SOURCE", help="a file, directory, glob or URL")
    score.add_argument("--model", default="production", metavar="VERSION",
                       help="select-stage version, 'production' (default) or 'latest'")
    score.add_argument("--artifacts", metavar="DIR", help="artifact root")
    score.add_argument("--drift-threshold", type=float, metavar="SHARE",
                       help="share of drifted rows that raises houseprice.drift.detected "
                            "(default 0.05)")
    score.add_argument("--interval", type=float, metavar="LEVEL",
                       help="coverage level of the SalePrice_lo, SalePrice_hi range written "
                            "beside each price (default 0.9)")

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
    feed.add_argument("out_dir", metavar="OUT_DIR", help="folder the monthly files go to")
    feed.add_argument("--until", metavar="YYYY-MM", help="last month to write")
    feed.add_argument("--since", metavar="YYYY-MM", help="first month to write")
    feed.add_argument("--data-url", metavar="URL|DIR", help="where the Kaggle pair is")
    feed.add_argument("--data-dir", metavar="DIR", help="download cache")
    check = sub.add_parser("check", help="verify the artifact store: every version's manifest "
                                         "and hashes, the LATEST and production pointers "
                                         "against the history, cache records, abandoned "
                                         "temporaries (exit 1 if anything is wrong)")
    check.add_argument("--artifacts", metavar="DIR|URL", help="artifact root")
    sub.add_parser("stop-api", help="stop the local Prefect server that runs keep between "
                                     "them (HOUSEPRICE_API_KEEP_S) for this PREFECT_HOME "
                                     "(as 'server stop')")
    server = sub.add_parser("server", help="the local Prefect server (API, dashboard, "
                                           "services) that runs start and keep")
    server.add_argument("action", choices=["status", "stop"],
                        help="status: whether it runs, its dashboard URL; stop: stop it")
    dash = sub.add_parser("dashboard", help="print the Prefect dashboard's URL (starting the "
                                            "local server when none runs), and open it in a "
                                            "browser when this machine has a display")
    dash.add_argument("--no-open", action="store_true", help="only print the URL")
    # Global flags work after the subcommand too (SUPPRESS: absent there, the top level's
    # value stands).
    for command in sub.choices.values():
        command.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                             help="show the full trace on errors")
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="Prefect's own log lines on the terminal")
    return p


def _webhook_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--webhook", metavar="URL", default=os.environ.get("HOUSEPRICE_WEBHOOK"),
                   help="notify a failed or crashed run, and a promotion, with a JSON POST "
                        "to this URL (a Slack or Teams incoming webhook, any HTTP endpoint); "
                        "default: HOUSEPRICE_WEBHOOK")


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
    # Any path that still falls back to Prefect's in-process temporary server: its 20 s
    # start limit is too short for a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Prefect creates its home without parents; a missing parent makes the ephemeral API
    # fail to start and the run time out with an obscure message.
    if os.environ.get("PREFECT_HOME"):
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    try:
        commands = {"run": run.run, "serve": operate.serve, "rerun": operate.rerun,
                    "predict": registry.predict, "score": operate.score,
                    "models": registry.models, "promote": registry.promote,
                    "rollback": registry.rollback, "make-feed": feed.make_feed,
                    "stop-api": local.stop_api, "server": local.server_command,
                    "automations": local.install_automations,
                    "dashboard": local.dashboard, "check": registry.check}
        return commands[args.command](args)
    except ConfigError as exc:
        _trace(args)
        print(f"houseprice: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as exc:
        _trace(args)
        print(f"houseprice: error: {config_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("houseprice: interrupted", file=sys.stderr)
        return 130
    except run.Interrupted as exc:
        _trace(args)
        print(f"houseprice: {exc}", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.traceback:
            raise
        from tasks.stage import one_line

        print(f"houseprice: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED


def entry() -> None:
    """The ``houseprice`` command: ``main``, then out without tearing the interpreter down
    module by module (freeing torch, Prefect and their thread pools takes about 1 s after
    the last line is printed: a sixth of a warm run). What an orderly exit does first still
    happens: other threads are joined and the exit handlers run (logging's flush, the
    temporary API server's stop, Prefect's own)."""
    code = main()
    import atexit
    import threading

    getattr(threading, "_shutdown", lambda: None)()  # as interpreter shutdown does first
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
