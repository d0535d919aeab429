"""``houseprice``: run the pipeline, or batch-predict with a selected model.

Failures end with a non-zero exit and one line on stderr saying what went wrong, where, and
what to do (``--traceback`` shows the full trace).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

EXIT_FAILED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="houseprice", description=__doc__.splitlines()[0])
    p.add_argument("--traceback", action="store_true", help="show the full trace on errors")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole pipeline (download ... predict)")
    run.add_argument("--config", metavar="FILE", help="TOML or JSON config (PipelineConfig)")
    run.add_argument("--data-url", metavar="URL|DIR",
                     help="base URL, file:// URL or directory with the raw CSVs "
                          "(env HOUSEPRICE_DATA_URL)")
    run.add_argument("--data-dir", metavar="DIR",
                     help="download cache (env HOUSEPRICE_DATA_DIR; default data/cache)")
    run.add_argument("--artifacts", metavar="DIR",
                     help="artifact root (env HOUSEPRICE_ARTIFACTS; default artifacts/)")
    run.add_argument("--submission", metavar="FILE", help="also copy the Kaggle CSV here")
    run.add_argument("--folds", type=int, metavar="K", help="number of CV folds (default 5)")
    run.add_argument("--epochs", type=int, metavar="N", help="epochs for every candidate")
    run.add_argument("--seed", type=int, help="seed for folds, init, dropout and batches")
    run.add_argument("--fit-on", choices=["train", "train+test"],
                     help="rows the preprocessor is fitted on ('train+test' = the book)")
    run.add_argument("--fold-scheme", choices=["shuffled", "contiguous"],
                     help="'contiguous' = the book's unshuffled folds")
    run.add_argument("--target", choices=["log", "raw"], help="'raw' = the book's raw price")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"])

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
    config = PipelineConfig.model_validate(data)
    return config.with_epochs(args.epochs) if args.epochs is not None else config


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
    from flows.pipeline import house_price_pipeline

    where = os.environ.get("PREFECT_API_URL")
    if where:
        _check_api(where)
    where = where or "an ephemeral local Prefect API"
    print(f"houseprice: running on {where}; artifacts in {config.artifacts_dir}", flush=True)
    result = house_price_pipeline(config)
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
    return 0


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


def _config_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "config"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"invalid configuration: {field}: {err['msg']}{more}; fix it in --config or the flags"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # The ephemeral API's telemetry call fails noisily on machines without internet (and can
    # race the fresh SQLite database); a user who wants it sets the variable to true.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        return _run(args) if args.command == "run" else _predict(args)
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
