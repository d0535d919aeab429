"""What each candidate kind scores, alone and in cross-fitted blends, on a run's own folds:
the table in docs/accuracy.md.

Reads the newest tensorize artifact under ``--artifacts`` (a default ``houseprice run``'s:
per-fold preprocessors, 3 repeats x 5 folds), cross-validates each candidate below exactly as
the train stage does (``tasks.train.cross_validate``), and blends them as select does (weights
fitted on the other folds of the same repeat only). Scores are over every repeat's out-of-fold
predictions: on all 1460 rows, and without the two outliers.

    python benchmarks/kinds.py --artifacts DIR

Prints a Markdown table, then one JSON line per candidate and blend.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import DATA, run_args  # noqa: E402
from tasks.config import TrainConfig, candidate  # noqa: E402
from tasks.data.folds import make_folds  # noqa: E402
from tasks.kinds.base import oof_scores  # noqa: E402
from tasks.select import cross_fitted_blend  # noqa: E402
from tasks.storage.artifacts import ArtifactRef  # noqa: E402
from tasks.tensorize import outlier_ids, read_fold_features, read_matrix  # noqa: E402

CANDIDATES = [
    {"name": "lasso", "kind": "lasso", "alpha": 5e-4, "max_iter": 5000},
    {"name": "lasso-clean-fit", "kind": "lasso", "alpha": 5e-4, "max_iter": 5000,
     "exclude_outliers": True},
    {"name": "enet", "kind": "enet", "alpha": 1e-3, "l1_ratio": 0.5, "max_iter": 5000},
    {"name": "ridge", "kind": "ridge", "alpha": 10.0},
    {"name": "svr", "kind": "svr", "C": 20.0, "epsilon": 0.008, "gamma": 3e-4},
    {"name": "krr", "kind": "krr"},
    {"name": "hgb", "kind": "hgb", "max_iter": 100, "learning_rate": 0.2, "min_samples_leaf": 10},
    {"name": "gbr", "kind": "gbr", "n_estimators": 500, "learning_rate": 0.1, "max_depth": 4,
     "max_features": "sqrt"},
    # the default search's best shape, trained longer than the search trains it
    {"name": "mlp", "kind": "mlp", "hidden": [32, 16], "lr": 1e-3, "weight_decay": 3e-2,
     "dropout": 0.0, "seeds": 1, "epochs": 100, "batch_size": 64},
    {"name": "linear", "kind": "linear", "lr": 0.01, "weight_decay": 1e-3},
]
BLENDS = [["lasso", "hgb"], ["lasso-clean-fit", "hgb"],
          ["lasso", "svr", "hgb", "mlp"], ["lasso", "svr", "gbr", "hgb", "mlp"],
          [c["name"] for c in CANDIDATES if not c.get("exclude_outliers")]]


def newest(root: Path) -> Path:
    versions = [p for p in (root / "tensorize").iterdir() if (p / "manifest.json").is_file()]
    if not versions:
        sys.exit(f"no tensorize artifact under {root}: run 'houseprice run --artifacts {root}'")
    return max(versions, key=lambda p: (p / "manifest.json").stat().st_mtime)


def run_features(root: Path):
    """The newest tensorize artifact under ``root``: its folder, rows, the default train
    settings and the features the folds see (the fold maps, or the one matrix)."""
    data = newest(root)
    matrix = read_matrix(data / "train.parquet")
    train = TrainConfig()
    maps = read_fold_features(ArtifactRef(root=str(data.parents[1]), stage="tensorize",
                                          version=data.name), train.folds)
    return data, matrix, train, (matrix.X if maps is None else maps)


def main() -> None:
    args = run_args(__doc__, "candidate")
    data, matrix, train, X = run_features(args.artifacts)
    from tasks.train import cross_validate

    raw = pd.read_csv(DATA / "kaggle_house_pred_train.csv")
    clean = ~np.isin(matrix.ids, outlier_ids(raw))
    folds = make_folds(len(matrix.y), train.n_splits, train.seed, train.fold_scheme,
                       train.repeats)
    fold = np.empty((train.repeats, len(matrix.y)), int)
    for k, (_, valid) in enumerate(folds):
        fold[k // train.n_splits, valid] = k
    repeat = np.repeat(np.arange(train.repeats), len(matrix.y))
    logy = np.tile(np.log(matrix.y), train.repeats)
    clean_all = np.tile(clean, train.repeats)

    rows, oof = [], {}
    for spec in CANDIDATES:
        if args.only and spec["name"] not in args.only:
            continue
        start = time.perf_counter()
        cand = candidate(**spec)
        result = cross_validate(X, matrix.y, cand, train, ~clean if cand.exclude_outliers
                                else None)
        seconds = time.perf_counter() - start
        oof[spec["name"]] = result.oof_log_price.ravel()
        scores = oof_scores(oof[spec["name"]], logy, repeat, clean_all)
        rows.append({"candidate": spec["name"], "all": scores["oof_log_rmse_all"],
                     "clean": scores["oof_log_rmse_clean"], "seconds": round(seconds, 1)})
    for names in BLENDS:
        if not all(n in oof for n in names):
            continue
        P = np.stack([oof[n] for n in names], axis=1)
        pred = cross_fitted_blend(P, logy, fold.ravel(), np.ones(len(logy), bool), repeat)
        scores = oof_scores(pred, logy, repeat, clean_all)
        rows.append({"candidate": "blend " + " + ".join(names),
                     "all": scores["oof_log_rmse_all"], "clean": scores["oof_log_rmse_clean"],
                     "seconds": None})
    print(f"tensorize {data.name} ({X.shape[-1]} features)\n")
    print("| candidate | all rows | w/o outliers | cross-validation time |\n|---|---|---|---|")
    for r in rows:
        took = "" if r["seconds"] is None else f"{r['seconds']} s"
        print(f"| {r['candidate']} | {r['all']:.4f} | {r['clean']:.4f} | {took} |")
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
