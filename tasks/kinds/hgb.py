"""``hgb``: scikit-learn's histogram gradient boosting (``HistGradientBoostingRegressor``)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from tasks.kinds.base import SklearnCandidate


class HGBConfig(SklearnCandidate):
    """Gradient-boosted trees on binned features, a fixed number of rounds (no early
    stopping: every fold fits the same model)."""

    code_files: ClassVar[tuple[str, ...]] = ("kinds/base.py", "kinds/hgb.py")
    # The flat config of old borrowed the network's names for these.
    renamed: ClassVar[dict[str, str]] = {"lr": "learning_rate",
                                         "weight_decay": "l2_regularization"}

    kind: Literal["hgb"] = "hgb"
    learning_rate: Annotated[float, Field(gt=0, description="shrinkage per tree")] = 0.1
    max_iter: Annotated[int, Field(gt=0, le=100_000, description="boosting rounds")] = 500
    max_leaf_nodes: Annotated[int, Field(ge=2, description="leaves per tree")] = 15
    min_samples_leaf: Annotated[int, Field(ge=1, description="rows per leaf, at least")] = 20
    l2_regularization: Annotated[float, Field(ge=0, description="L2 on leaf values")] = 0.0

    def make_estimator(self, seed: int) -> Any:
        from sklearn.ensemble import HistGradientBoostingRegressor

        return HistGradientBoostingRegressor(
            learning_rate=self.learning_rate, max_iter=self.max_iter,
            max_leaf_nodes=self.max_leaf_nodes, min_samples_leaf=self.min_samples_leaf,
            l2_regularization=self.l2_regularization, early_stopping=False, random_state=seed,
        )
