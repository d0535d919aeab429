"""Linear kinds on per-fold features fit from sufficient statistics, gathered by
subtraction: the same fold models as scikit-learn fitted on each fold's own rows."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.config import TrainConfig, candidate
from tasks.data.foldmaps import FoldMaps
from tasks.data.folds import fit_rows, make_folds


def synthetic_maps(n: int = 900, d: int = 12, F: int = 6, seed: int = 0):
    """A base of ``d`` features, ones and two presence columns; each fold's own scales,
    shifts and a zeroed column (a category it never saw)."""
    rng = np.random.default_rng(seed)
    base = np.empty((n, d + 3), np.float32)
    base[:, :d] = rng.normal(size=(n, d))
    base[:, 3] = base[:, 2] + 0.05 * rng.normal(size=n)  # correlated columns
    base[:, d] = 1.0
    base[:, d + 1:] = rng.random((n, 2)) > 0.1
    src = np.tile(np.arange(d), (F, 1))
    pres = np.full((F, d), d)
    pres[:, :2] = [d + 1, d + 2]
    scale = rng.uniform(0.7, 1.4, (F, d))
    shift = rng.normal(scale=0.2, size=(F, d))
    scale[1, 5] = shift[1, 5] = 0.0
    y = np.exp(12 + base[:, :d] @ rng.normal(scale=0.1, size=d) + 0.05 * rng.normal(size=n))
    return FoldMaps(base, src, scale, pres, shift), y


@pytest.mark.parametrize("fields", [{"kind": "ridge", "alpha": 3.0},
                                    {"kind": "lasso", "alpha": 2e-3, "max_iter": 5000},
                                    {"kind": "enet", "alpha": 2e-3, "l1_ratio": 0.5}])
@pytest.mark.parametrize("target", ["log", "raw"])
def test_gram_fits_equal_scikit_learn_fitted_fold_by_fold(fields, target):
    from sklearn.base import clone

    from tasks.train import cross_validate

    maps, y = synthetic_maps()
    cfg = TrainConfig(n_splits=3, repeats=2, seed=4, target=target, exclude_outliers=True)
    spec = candidate(name="c", **fields)
    excluded = np.zeros(len(y), bool)
    excluded[[3, 400]] = True
    folds = make_folds(len(y), 3, 4, "shuffled", 2)
    cv = cross_validate(maps, y, spec, cfg, excluded)
    t = np.log(y) if target == "log" else y
    for k, tr in enumerate(fit_rows(folds, excluded)):
        Xk = maps.base.astype(np.float64) @ maps.matrix(k)
        est = clone(spec.make_estimator(seed=0)).fit(Xk[tr], t[tr])
        va = folds[k][1]
        want = est.predict(Xk[va])
        want = want if target == "log" else np.log(np.maximum(want, 1.0))
        np.testing.assert_allclose(cv.oof_log_price[k // 3, va], want, atol=2e-5)
        pred_tr = est.predict(Xk[tr])
        pred_tr = pred_tr if target == "log" else np.log(np.maximum(pred_tr, 1.0))
        assert cv.train_log_rmse[k] == pytest.approx(
            np.sqrt(np.mean((pred_tr - np.log(y[tr])) ** 2)), rel=1e-4)
        saved = spec.load_member(cv.members[k][0], maps.shape[2], target)
        np.testing.assert_allclose(saved.log_price(Xk[va].astype(np.float32)),
                                   cv.oof_log_price[k // 3, va], atol=1e-4)


@pytest.mark.parametrize("kind", ["ridge", "lasso"])
def test_a_refit_on_the_all_rows_map_equals_scikit_learn_on_the_matrix(kind):
    """The final model on every kept row, from the base's all-rows columns without a copy
    (one fold whose rows both fit and score): scikit-learn's fit on that matrix."""
    maps, y = synthetic_maps()
    d = maps.shape[2]
    X_all = FoldMaps.identity(maps.base, d)
    spec = candidate(name="c", kind=kind, alpha=2e-3 if kind == "lasso" else 3.0)
    rows = np.setdiff1d(np.arange(len(y)), [3, 400])
    member = spec.refit(X_all, y, TrainConfig(), rows)
    X = maps.base[:, :d]
    want = spec.make_estimator(seed=0).fit(X[rows].astype(np.float64), np.log(y[rows]))
    got = spec.load_member(member[0], d, "log")
    np.testing.assert_allclose(got.log_price(X), want.predict(X), atol=2e-5)
