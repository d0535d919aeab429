"""``hgb``: scikit-learn's histogram gradient boosting (``HistGradientBoostingRegressor``);
``gbr``: its exact gradient boosting, which has the Huber loss."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from tasks.kinds.base import MaxFitRows, Runtime, SampledCandidate, trees_form


def _hgb_tree(nodes: np.ndarray) -> dict[str, np.ndarray]:
    leaf = nodes["is_leaf"].astype(bool)
    return {"feature": nodes["feature_idx"].astype(np.int32),
            "threshold": nodes["num_threshold"].astype(np.float64),
            "left": np.where(leaf, -1, nodes["left"]).astype(np.int32),
            "right": np.where(leaf, -1, nodes["right"]).astype(np.int32),
            "value": nodes["value"].astype(np.float64),
            "missing_left": nodes["missing_go_to_left"].astype(np.uint8)}


def _sk_tree(tree: Any, lr: float) -> dict[str, np.ndarray]:
    left = tree.children_left.astype(np.int32)
    missing = getattr(tree, "missing_go_to_left", np.zeros(len(left), np.uint8))
    return {"feature": np.maximum(tree.feature, 0).astype(np.int32),
            "threshold": tree.threshold.astype(np.float64),
            "left": left, "right": tree.children_right.astype(np.int32),
            "value": lr * tree.value[:, 0, 0].astype(np.float64),
            "missing_left": np.asarray(missing).astype(np.uint8)}


class HGBConfig(SampledCandidate):
    """Gradient-boosted trees on binned features, a fixed number of rounds (no early
    stopping: every fold fits the same model)."""

    code_files: ClassVar[tuple[str, ...]] = ("kinds/base.py", "kinds/boosting.py")
    # The flat config of old borrowed the network's names for these.
    renamed: ClassVar[dict[str, str]] = {"lr": "learning_rate",
                                         "weight_decay": "l2_regularization"}

    kind: Literal["hgb"] = "hgb"
    learning_rate: Annotated[float, Field(gt=0, description="shrinkage per tree")] = 0.1
    max_iter: Annotated[int, Field(gt=0, le=100_000, description="boosting rounds")] = 500
    max_leaf_nodes: Annotated[int, Field(ge=2, description="leaves per tree")] = 15
    min_samples_leaf: Annotated[int, Field(ge=1, description="rows per leaf, at least")] = 20
    l2_regularization: Annotated[float, Field(ge=0, description="L2 on leaf values")] = 0.0
    loss: Literal["squared_error", "absolute_error"] = Field(
        "squared_error", description="'absolute_error' is robust: a few extreme sales pull "
        "the trees less")
    # Its fit bins every row it is given, and its time grows with them; 200,000 rows bin a
    # feature's 255 levels as finely as a million do (see docs/benchmarks.md).
    max_fit_rows: MaxFitRows = 200_000

    def make_estimator(self, seed: int) -> Any:
        from sklearn.ensemble import HistGradientBoostingRegressor

        return HistGradientBoostingRegressor(
            learning_rate=self.learning_rate, max_iter=self.max_iter,
            max_leaf_nodes=self.max_leaf_nodes, min_samples_leaf=self.min_samples_leaf,
            l2_regularization=self.l2_regularization, early_stopping=False, random_state=seed,
            loss=self.loss,
        )

    def inference_form(self, saved, loaded, n_features, target) -> Runtime:
        est = loaded.estimator
        return trees_form([_hgb_tree(p[0].nodes) for p in est._predictors],
                           float(np.ravel(est._baseline_prediction)[0]))


class GBRConfig(SampledCandidate):
    """scikit-learn's exact gradient boosting (``GradientBoostingRegressor``), which has the
    Huber loss (squared near the target, linear far from it) and per-split feature sampling.
    Several times slower than ``hgb`` on 2 cores, so not in the default search."""

    code_files: ClassVar[tuple[str, ...]] = ("kinds/base.py", "kinds/boosting.py")

    fit_dtype: ClassVar[type] = np.float32  # its trees' own dtype

    kind: Literal["gbr"] = "gbr"
    loss: Literal["squared_error", "huber", "absolute_error"] = "huber"
    learning_rate: Annotated[float, Field(gt=0, description="shrinkage per tree")] = 0.05
    n_estimators: Annotated[int, Field(gt=0, le=100_000, description="boosting rounds")] = 1000
    max_depth: Annotated[int, Field(ge=1, le=32, description="depth of each tree")] = 4
    max_features: Literal["sqrt", "log2"] | None = Field(
        "sqrt", description="features tried per split (None: all)")
    min_samples_leaf: Annotated[int, Field(ge=1, description="rows per leaf, at least")] = 15
    subsample: Annotated[float, Field(gt=0, le=1, description="rows per tree")] = 1.0

    def make_estimator(self, seed: int) -> Any:
        from sklearn.ensemble import GradientBoostingRegressor

        return GradientBoostingRegressor(
            loss=self.loss, learning_rate=self.learning_rate, n_estimators=self.n_estimators,
            max_depth=self.max_depth, max_features=self.max_features,
            min_samples_leaf=self.min_samples_leaf, subsample=self.subsample,
            random_state=seed,
        )

    def inference_form(self, saved, loaded, n_features, target) -> Runtime:
        est = loaded.estimator
        probe = np.zeros((1, est.n_features_in_), np.float32)
        return trees_form([_sk_tree(t[0].tree_, est.learning_rate) for t in est.estimators_],
                           float(est._raw_predict_init(probe)[0, 0]))
