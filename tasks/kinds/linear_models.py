"""``ridge`` and ``lasso``: scikit-learn's L2- and L1-penalized least squares."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from tasks.kinds.base import SklearnCandidate


class RidgeConfig(SklearnCandidate):
    """Ridge regression (``sklearn.linear_model.Ridge``)."""

    code_files: ClassVar[tuple[str, ...]] = ("kinds/base.py", "kinds/linear_models.py")

    kind: Literal["ridge"] = "ridge"
    alpha: Annotated[float, Field(gt=0, description="L2 penalty strength")] = 1.0

    def make_estimator(self, seed: int) -> Any:
        from sklearn.linear_model import Ridge

        return Ridge(alpha=self.alpha)


class LassoConfig(SklearnCandidate):
    """Lasso regression (``sklearn.linear_model.Lasso``, coordinate descent)."""

    code_files: ClassVar[tuple[str, ...]] = ("kinds/base.py", "kinds/linear_models.py")

    kind: Literal["lasso"] = "lasso"
    alpha: Annotated[float, Field(gt=0, description="L1 penalty strength")] = 1.0
    max_iter: Annotated[int, Field(gt=0, le=100_000,
                                   description="coordinate descent iterations")] = 1000

    def make_estimator(self, seed: int) -> Any:
        from sklearn.linear_model import Lasso

        return Lasso(alpha=self.alpha, max_iter=self.max_iter, random_state=seed)
