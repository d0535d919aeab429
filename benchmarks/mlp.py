"""MLP variants on a run's own folds: the tail-average and schedule table in docs/accuracy.md.

Reads the newest tensorize artifact under ``--artifacts`` (a default ``houseprice run``'s:
per-fold preprocessors, 3 repeats x 5 folds) and cross-validates the default search's best
MLP (mlp-22) with each change below exactly as the train stage does
(``tasks.train.cross_validate``). Scores are over every repeat's out-of-fold predictions, on
all 1460 rows and without the two outliers; "spread" is the standard deviation over repeats.

    python benchmarks/mlp.py --artifacts DIR [--only NAME ...]

Prints one JSON line per variant.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import run_args  # noqa: E402
from benchmarks.kinds import DATA, run_features  # noqa: E402
from tasks.config import candidate  # noqa: E402
from tasks.kinds.base import oof_scores  # noqa: E402
from tasks.tensorize import outlier_ids  # noqa: E402
from tasks.train import cross_validate  # noqa: E402

BASE = {"name": "mlp", "kind": "mlp", "hidden": [48], "lr": 3e-3, "weight_decay": 1e-2,
        "dropout": 0.0, "batch_size": 128, "epochs": 24, "seeds": 1, "max_steps": 2400}
VARIANTS = {
    "none": {},
    "average_last 8": {"average_last": 8},
    "average_last 12": {"average_last": 12},
    "average_last 16": {"average_last": 16},
    "cosine": {"lr_schedule": "cosine"},
    "cosine, average_last 8": {"lr_schedule": "cosine", "average_last": 8},
    "36 epochs, average_last 12": {"epochs": 36, "average_last": 12},
    "48 epochs lr 1e-3, average_last 12": {"epochs": 48, "lr": 1e-3, "average_last": 12},
    "(32, 16), average_last 8": {"hidden": [32, 16], "average_last": 8},
    "tanh, average_last 8": {"activation": "tanh", "average_last": 8},
    "4 seeds, average_last 8": {"seeds": 4, "average_last": 8},
    "weight decay 3e-2, average_last 8": {"weight_decay": 3e-2, "average_last": 8},
    "128 wide, weight decay 3e-2, average_last 8": {"hidden": [128], "weight_decay": 3e-2,
                                                    "average_last": 8},
    "dropout 0.1, average_last 12": {"dropout": 0.1, "average_last": 12},
}


def reporter(matrix, train):
    """A function that prints a variant's JSON line from its ``(repeats, n)`` out-of-fold
    log prices: all rows, the spread over repeats, without the outliers, seconds."""
    raw = pd.read_csv(DATA / "kaggle_house_pred_train.csv")
    clean = np.tile(~np.isin(matrix.ids, outlier_ids(raw)), train.repeats)
    repeat = np.repeat(np.arange(train.repeats), len(matrix.y))
    logy = np.tile(np.log(matrix.y), train.repeats)

    def report(name: str, oof: np.ndarray, start: float) -> None:
        scores = oof_scores(oof.ravel(), logy, repeat, clean)
        print(json.dumps({"variant": name, "all": round(scores["oof_log_rmse_all"], 4),
                          "spread": round(float(np.std(
                              scores["oof_log_rmse_all_per_repeat"])), 4),
                          "clean": round(scores["oof_log_rmse_clean"], 4),
                          "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    return report


def main() -> None:
    args = run_args(__doc__, "variant")
    _, matrix, train, X = run_features(args.artifacts)
    report = reporter(matrix, train)
    for name, change in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        result = cross_validate(X, matrix.y, candidate(**{**BASE, **change}), train, None)
        report(name, result.oof_log_price, start)


if __name__ == "__main__":
    main()
