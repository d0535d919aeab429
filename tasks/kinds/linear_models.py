"""``ridge``, ``lasso`` and ``enet``: scikit-learn's penalized least squares, each a linear
function of the features (collapsed into the plan's lookups)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from tasks.data.foldmaps import FoldGrams, FoldMaps, fold_grams
from tasks.kinds.base import (
    _ROWS,
    _SKLEARN_IMPORT,
    CVResult,
    Linear,
    Runtime,
    SklearnCandidate,
    _import_sklearn,
    clamped_log_price,
    fold_rows,
    net_form,
    rmse,
    skops_dumps,
)
from tasks.progress import report_score


class LinearSklearn(SklearnCandidate):
    """A scikit-learn linear model: with a log target it collapses into the plan's linear
    lookups; with a raw-price one it is a one-layer float64 net (its output is clamped).

    On per-fold features (``FoldMaps``) every fold is fitted from sufficient statistics:
    the sums ``Σx``, ``XᵀX``, ``Xᵀt`` of its training rows, gathered for all folds in one
    pass over the rows by subtraction (``fold_grams``), then centred as scikit-learn
    centres for the intercept. The fit costs ``d³``, not rows: ridge in closed form, lasso
    and elastic net by scikit-learn's own coordinate descent over the Gram matrix. Each
    fold model is a scikit-learn estimator with those coefficients (saved as before)."""

    linear_in_features: ClassVar[bool] = True

    def solve(self, G: np.ndarray, q: np.ndarray, tt: float, n: float, seed: int
              ) -> np.ndarray:
        """Coefficients from centred ``G = XcᵀXc``, ``q = Xcᵀtc``, ``tt = tcᵀtc`` over
        ``n`` rows."""
        raise NotImplementedError

    def cross_validate(self, X, y, train, folds, fitted, on_progress) -> CVResult:
        if not isinstance(X, FoldMaps):
            return super().cross_validate(X, y, train, folds, fitted, on_progress)
        logy = np.log(y)
        t = logy if train.target == "log" else y
        sums = fold_sums(X, t, folds, fitted)
        oof = np.full((train.repeats, len(y)), np.nan)
        members, train_rmse, valid_rmse = [], [], []
        for k, ((_, va), tr) in enumerate(zip(folds, fitted, strict=True)):
            seed = train.seed * 1000 + k
            w, b = self._fit_sums(sums, k, seed)
            p_va = clamped_log_price(X.predict(k, va, w, b), train.target)
            oof[k // train.n_splits, va] = p_va  # folds are repeat-major
            members.append([{"skops": skops_dumps(self._estimator(w, b, seed))}])
            train_rmse.append(self._train_rmse(sums, k, w, b, X, tr, logy, train.target))
            valid_rmse.append(rmse(p_va, logy[va]))
            report_score(self.name, float(np.mean(valid_rmse)))
            on_progress((k + 1) / len(folds))
        return CVResult(folds=folds, members=members, train_log_rmse=train_rmse,
                        valid_log_rmse=valid_rmse, oof_log_price=oof, curves=None)

    def fold_fits(self, X: Any, t: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]],
                  fitted: list[np.ndarray], seed: int) -> list[tuple[np.ndarray, float]]:
        """Each fold's coefficients and intercept ``(w (d,), b)`` for target ``t``, fitted on
        its ``fitted`` rows from their sums (fold ``k`` seeded ``seed * 1000 + k``, as in
        ``cross_validate``)."""
        sums = fold_sums(X, t, folds, fitted)
        return [self._fit_sums(sums, k, seed * 1000 + k) for k in range(len(folds))]

    def _fit_sums(self, sums: FoldGrams, k: int, seed: int) -> tuple[np.ndarray, float]:
        """Fold ``k``'s coefficients and intercept, centred as scikit-learn centres."""
        n = sums.n[k]
        mx, mt = sums.sx[k] / n, sums.st[k] / n
        G = sums.xx[k] - n * np.outer(mx, mx)
        q = sums.xt[k] - n * mx * mt
        w = self.solve(G, q, float(sums.tt[k] - n * mt * mt), float(n), seed)
        return w, float(mt - mx @ w)

    @staticmethod
    def _train_rmse(sums: FoldGrams, k: int, w: np.ndarray, b: float, X: FoldMaps,
                    rows: np.ndarray, logy: np.ndarray, target: str) -> float:
        """Log RMSE on the fitted rows: for a log target from the sums (the book's clamp,
        a log price of at least 0, never binds on prices), else predicted in chunks."""
        if target == "log":
            sse = (sums.tt[k] - 2 * (w @ sums.xt[k] + b * sums.st[k]) + w @ sums.xx[k] @ w
                   + 2 * b * (w @ sums.sx[k]) + sums.n[k] * b * b)
            return float(np.sqrt(max(sse, 0.0) / sums.n[k]))
        return rmse(clamped_log_price(X.predict(k, rows, w, b), target), logy[rows])

    def _estimator(self, w: np.ndarray, b: float, seed: int) -> Any:
        """The scikit-learn estimator these coefficients are (what a fold model saves)."""
        with _SKLEARN_IMPORT:
            _import_sklearn()
            est = self.make_estimator(seed)
        est.coef_ = w.copy()
        est.intercept_ = b
        est.n_features_in_ = len(w)
        return est

    def inference_form(self, saved, loaded, n_features, target) -> Linear | Runtime:
        est = loaded.estimator
        w = np.asarray(est.coef_, np.float64).ravel()
        b = float(np.ravel(est.intercept_)[0])
        if target == "log":
            return Linear(w, b)
        return net_form([(w.reshape(-1, 1), np.array([b]))], "relu", 0.0, 1.0, float64=True)


class RidgeConfig(LinearSklearn):
    """Ridge regression (``sklearn.linear_model.Ridge``)."""

    code_files: ClassVar[tuple[str, ...]] = ("kinds/base.py", "kinds/linear_models.py")

    kind: Literal["ridge"] = "ridge"
    alpha: Annotated[float, Field(gt=0, description="L2 penalty strength")] = 1.0

    def make_estimator(self, seed: int) -> Any:
        from sklearn.linear_model import Ridge

        return Ridge(alpha=self.alpha)

    def solve(self, G, q, tt, n, seed) -> np.ndarray:
        # scikit-learn's cholesky solver: (XcᵀXc + αI) w = Xcᵀtc
        from scipy.linalg import solve

        return solve(G + self.alpha * np.eye(len(q)), q, assume_a="pos")


class LassoConfig(LinearSklearn):
    """Lasso regression (``sklearn.linear_model.Lasso``, coordinate descent)."""

    code_files: ClassVar[tuple[str, ...]] = ("kinds/base.py", "kinds/linear_models.py")

    kind: Literal["lasso"] = "lasso"
    alpha: Annotated[float, Field(gt=0, description="L1 penalty strength")] = 1.0
    max_iter: Annotated[int, Field(gt=0, le=100_000,
                                   description="coordinate descent iterations")] = 1000

    def make_estimator(self, seed: int) -> Any:
        from sklearn.linear_model import Lasso

        # Coordinate descent over the Gram matrix XᵀX (d x d), not over the rows: the same
        # fit to 1e-5 in log price, its cost per iteration independent of the row count.
        return Lasso(alpha=self.alpha, max_iter=self.max_iter, random_state=seed,
                     precompute=True)

    def solve(self, G, q, tt, n, seed) -> np.ndarray:
        return gram_descent(G, q, tt, n, self.alpha, 1.0, self.max_iter, seed)


class ElasticNetConfig(LinearSklearn):
    """Elastic net (``sklearn.linear_model.ElasticNet``): lasso's L1 mixed with ridge's L2,
    which keeps groups of correlated columns (the many area and one-hot columns) together
    where lasso picks one."""

    code_files: ClassVar[tuple[str, ...]] = ("kinds/base.py", "kinds/linear_models.py")

    kind: Literal["enet"] = "enet"
    alpha: Annotated[float, Field(gt=0, description="penalty strength")] = 1e-3
    l1_ratio: Annotated[float, Field(ge=0, le=1, description="share of L1 in the penalty")] = 0.5
    max_iter: Annotated[int, Field(gt=0, le=100_000,
                                   description="coordinate descent iterations")] = 5000

    def make_estimator(self, seed: int) -> Any:
        from sklearn.linear_model import ElasticNet

        return ElasticNet(alpha=self.alpha, l1_ratio=self.l1_ratio, max_iter=self.max_iter,
                          random_state=seed, precompute=True)  # over XᵀX, as lasso

    def solve(self, G, q, tt, n, seed) -> np.ndarray:
        return gram_descent(G, q, tt, n, self.alpha, self.l1_ratio, self.max_iter, seed)


def gram_descent(G: np.ndarray, q: np.ndarray, tt: float, n: float, alpha: float,
                 l1_ratio: float, max_iter: int, seed: int) -> np.ndarray:
    """Elastic-net coefficients by scikit-learn's own coordinate descent over the Gram
    matrix, with its objective's scaling (penalties times the row count) and stopping rule
    (dual gap below 1e-4 of ``tcᵀtc``): what ``ElasticNet(precompute=True).fit`` runs after
    centring. The routine reads the target only for ``tcᵀtc``."""
    from sklearn.linear_model import _cd_fast
    from sklearn.utils import check_random_state

    w = np.zeros(len(q))
    w, _, _, _ = _cd_fast.enet_coordinate_descent_gram(
        w, alpha * l1_ratio * n, alpha * (1.0 - l1_ratio) * n, np.ascontiguousarray(G), q,
        np.array([np.sqrt(max(tt, 0.0))]), max_iter, 1e-4, check_random_state(seed), False,
        False)
    return np.asarray(w)


def fold_sums(X: Any, t: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]],
              fitted: list[np.ndarray]) -> FoldGrams:
    """``FoldGrams`` of each fold's ``fitted`` rows: of fold maps by subtraction
    (``fold_grams``); of a matrix ``(n, d)`` or fold matrices ``(K, n, d)`` summed over each
    fold's rows, a block of rows at a time."""
    if isinstance(X, FoldMaps):
        excluded = np.ones(len(t), dtype=bool)
        for rows in fitted:
            excluded[rows] = False
        return fold_grams(X, t, folds, excluded)
    d = X.shape[-1]
    out = {key: [] for key in ("n", "sx", "xx", "xt", "st", "tt")}
    for k, rows in enumerate(fitted):
        sx, xx, xt = np.zeros(d), np.zeros((d, d)), np.zeros(d)
        for lo in range(0, len(rows), _ROWS):
            part = rows[lo:lo + _ROWS]
            A = fold_rows(X, k, part, np.float64)
            sx += A.sum(0)
            xx += A.T @ A
            xt += A.T @ t[part]
        tk = t[rows]
        for key, v in zip(out, (len(rows), sx, xx, xt, tk.sum(), tk @ tk), strict=True):
            out[key].append(v)
    return FoldGrams(**{key: np.array(v, dtype=np.float64) for key, v in out.items()})
