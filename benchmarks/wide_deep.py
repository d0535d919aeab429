"""A wide-and-deep prototype on a run's own folds: the fold's own lasso (the wide part, fitted
first, from its sums) plus an MLP fitted to that lasso's residuals (the deep part); the
prediction is their sum. Both are fitted on each fold's training rows only, so the scores
are out of fold, as the train stage's.

    python benchmarks/wide_deep.py --artifacts DIR [--only NAME ...]

Reads the newest tensorize artifact under ``--artifacts`` (a default run's per-fold
preprocessors, 3 repeats x 5 folds). Prints one JSON line per variant: all-rows and
without-outliers OOF log RMSE over every repeat, the spread over repeats, and the seconds.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import run_args  # noqa: E402
from benchmarks.kinds import run_features  # noqa: E402
from benchmarks.mlp import reporter  # noqa: E402
from tasks.config import TrainConfig, candidate  # noqa: E402
from tasks.data.foldmaps import FoldMaps  # noqa: E402
from tasks.data.folds import fit_rows, make_folds  # noqa: E402
from tasks.kinds.base import skops_loads  # noqa: E402

WIDE = {"name": "lasso", "kind": "lasso", "alpha": 5e-4, "max_iter": 5000}
DEEP = {"name": "mlp", "kind": "mlp", "hidden": [48], "lr": 3e-3, "weight_decay": 1e-2,
        "dropout": 0.0, "batch_size": 128, "epochs": 24, "seeds": 1, "max_steps": 2400,
        "average_last": 8}
VARIANTS = {
    "lasso alone": None,
    "mlp alone": "alone",
    "lasso + mlp on its residuals": {},
    "lasso + mlp, weight decay 1e-1": {"weight_decay": 1e-1},
    "lasso + mlp, weight decay 3e-1": {"weight_decay": 3e-1},
    "lasso + mlp, lr 1e-3": {"lr": 1e-3},
    "lasso + mlp, lr 1e-3, weight decay 1e-1": {"lr": 1e-3, "weight_decay": 1e-1},
    "lasso + mlp (16), weight decay 1e-1": {"hidden": [16], "weight_decay": 1e-1},
    "lasso + mlp, 4 seeds, weight decay 1e-1": {"seeds": 4, "weight_decay": 1e-1},
    "lasso + mlp, dropout 0.3, weight decay 1e-1": {"dropout": 0.3, "weight_decay": 1e-1},
    "lasso + mlp, lr 3e-4": {"lr": 3e-4},
    "lasso + mlp, lr 1e-3, weight decay 3e-2": {"lr": 1e-3, "weight_decay": 3e-2},
    "lasso + mlp, lr 1e-3, 4 seeds": {"lr": 1e-3, "seeds": 4},
    "lasso + mlp, lr 1e-3, 48 epochs, average_last 16": {"lr": 1e-3, "epochs": 48,
                                                         "average_last": 16},
    "lasso + mlp (32, 16), lr 1e-3": {"lr": 1e-3, "hidden": [32, 16]},
}
# The same, as the mlp kind trains it (``wide_alpha``): every fold of a candidate in one
# stacked model, as in a run.
KIND_VARIANTS = {
    "mlp kind, wide_alpha 5e-4, lr 1e-3": {"wide_alpha": 5e-4, "lr": 1e-3},
    "mlp kind, wide_alpha 5e-4, lr 3e-3": {"wide_alpha": 5e-4},
    "mlp kind, wide_alpha 1e-3, lr 1e-3": {"wide_alpha": 1e-3, "lr": 1e-3},
    "mlp kind, wide_alpha 5e-4, lr 1e-3, weight decay 3e-2": {"wide_alpha": 5e-4, "lr": 1e-3,
                                                              "weight_decay": 3e-2},
    "mlp kind, wide_alpha 5e-4, lr 1e-3, dropout 0.1": {"wide_alpha": 5e-4, "lr": 1e-3,
                                                        "dropout": 0.1},
    "mlp kind (32), wide_alpha 5e-4, lr 1e-3": {"wide_alpha": 5e-4, "lr": 1e-3,
                                                "hidden": [32]},
}


def one_fold(X: FoldMaps, k: int) -> FoldMaps:
    """Fold ``k``'s map alone, as a one-fold ``FoldMaps``."""
    return FoldMaps(base=X.base, src=X.src[k:k + 1], scale=X.scale[k:k + 1],
                    pres=X.pres[k:k + 1], shift=X.shift[k:k + 1])


def main() -> None:
    args = run_args(__doc__, "variant")
    from tasks.train import cross_validate

    _, matrix, train, X = run_features(args.artifacts)
    report = reporter(matrix, train)
    n, y = len(matrix.y), matrix.y
    logy = np.log(y)
    folds = make_folds(n, train.n_splits, train.seed, train.fold_scheme, train.repeats)
    fitted = fit_rows(folds, np.zeros(n, bool))
    wide = cross_validate(X, y, candidate(**WIDE), train, None)
    # Each fold's lasso on every row: in-sample on its training rows (what the deep part is
    # fitted to), out of fold on its validation rows.
    wide_rows = []
    for k, member in enumerate(wide.members):
        est = skops_loads(member[0])
        wide_rows.append(X.predict(k, np.arange(n), np.asarray(est.coef_, np.float64),
                                   float(est.intercept_)))
    one = TrainConfig(repeats=1, n_splits=train.n_splits, seed=train.seed)
    for name, change in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        if change is None:
            oof = wide.oof_log_price
        elif change == "alone":
            oof = cross_validate(X, y, candidate(**DEEP), train, None).oof_log_price
        else:
            deep = candidate(**{**DEEP, **change})
            oof = np.full((train.repeats, n), np.nan)
            for k, ((tr, va), fit) in enumerate(zip(folds, fitted, strict=True)):
                resid = np.exp(logy - wide_rows[k])  # the deep part's "price": exp(residual)
                cv = deep.cross_validate(one_fold(X, k), resid, one, [(tr, va)], [fit],
                                         lambda f: None)
                oof[k // train.n_splits, va] = wide_rows[k][va] + cv.oof_log_price[0, va]
        report(name, oof, start)
    for name, change in KIND_VARIANTS.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        oof = cross_validate(X, y, candidate(**{**DEEP, **change}), train, None).oof_log_price
        report(name, oof, start)


if __name__ == "__main__":
    main()
