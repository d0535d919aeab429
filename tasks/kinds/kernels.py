"""``svr`` and ``krr``: scikit-learn's kernel machines (an RBF support vector regressor, and
kernel ridge with a polynomial kernel), each with its compiled form in the plan."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from tasks.kinds.base import Runtime, SampledCandidate


class SVRConfig(SampledCandidate):
    """Support vector regression with an RBF kernel (``sklearn.svm.SVR``): a smooth
    nonlinear model whose epsilon-insensitive loss grows only linearly, so a few extreme
    sales pull it less than squared error does."""

    code_files: ClassVar[tuple[str, ...]] = ("kinds/base.py", "kinds/kernels.py")
    max_rows: ClassVar[int | None] = 20_000
    instead: ClassVar[str] = ("set its max_fit_rows to at most 20,000 (a sample of each "
                             "fold's rows), leave it out of the candidates, or use hgb or mlp")

    kind: Literal["svr"] = "svr"
    C: Annotated[float, Field(gt=0, description="inverse regularization strength")] = 20.0
    epsilon: Annotated[float, Field(ge=0, description="no loss within this of the target "
                                    "(in log price)")] = 0.008
    gamma: Annotated[float, Field(gt=0, description="RBF kernel width, 1/(2 sigma^2)")] = 3e-4

    def make_estimator(self, seed: int) -> Any:
        from sklearn.svm import SVR

        return SVR(C=self.C, epsilon=self.epsilon, gamma=self.gamma)

    def inference_form(self, saved, loaded, n_features, target) -> Runtime:
        est = loaded.estimator
        return Runtime("svr", {"gamma": float(est._gamma), "intercept": float(est.intercept_[0])},
                       {"sv": np.asarray(est.support_vectors_, np.float64),
                        "coef": np.asarray(est.dual_coef_, np.float64).ravel()})


class KernelRidgeConfig(SampledCandidate):
    """Kernel ridge regression (``sklearn.kernel_ridge.KernelRidge``) with a polynomial
    kernel: ridge on every pairwise product of the features, without building them."""

    code_files: ClassVar[tuple[str, ...]] = ("kinds/base.py", "kinds/kernels.py")
    max_rows: ClassVar[int | None] = 20_000  # its n x n kernel: 3.2 GB at the limit
    instead: ClassVar[str] = ("set its max_fit_rows to at most 20,000 (a sample of each "
                             "fold's rows), leave it out of the candidates, or use hgb or mlp")

    kind: Literal["krr"] = "krr"
    alpha: Annotated[float, Field(gt=0, description="L2 penalty strength")] = 0.6
    degree: Annotated[int, Field(ge=1, le=5, description="polynomial degree")] = 2
    coef0: Annotated[float, Field(ge=0, description="polynomial kernel offset")] = 2.5

    def make_estimator(self, seed: int) -> Any:
        from sklearn.kernel_ridge import KernelRidge

        return KernelRidge(alpha=self.alpha, kernel="polynomial", degree=self.degree,
                           coef0=self.coef0)

    def inference_form(self, saved, loaded, n_features, target) -> Runtime:
        est = loaded.estimator
        gamma = est.gamma if est.gamma is not None else 1.0 / est.X_fit_.shape[1]
        return Runtime("krr", {"gamma": float(gamma), "coef0": float(est.coef0),
                               "degree": float(est.degree)},
                       {"X_fit": est.X_fit_, "dual": np.asarray(est.dual_coef_)})
