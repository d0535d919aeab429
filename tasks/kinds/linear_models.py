"""``ridge``, ``lasso`` and ``enet``: scikit-learn's penalized least squares, each a linear
function of the features (collapsed into the plan's lookups)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from tasks.kinds.base import Linear, Runtime, SklearnCandidate, net_form


class LinearSklearn(SklearnCandidate):
    """A scikit-learn linear model: with a log target it collapses into the plan's linear
    lookups; with a raw-price one it is a one-layer float64 net (its output is clamped)."""

    linear_in_features: ClassVar[bool] = True

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
