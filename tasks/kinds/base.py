"""The contract every model kind implements, and what its cross-validation returns.

A kind is its config class: the pydantic model with only its own fields (and ``kind`` as the
tag of the discriminated union), plus two methods, in the spirit of scikit-learn's estimator
contract:

- ``cross_validate(X, y, train, folds, fitted, on_progress) -> CVResult``: fit one model per
  fold (on that fold's ``fitted`` rows), predict its validation rows (``folds`` holds
  ``train.repeats`` passes of ``train.n_splits`` folds, repeat-major); the fitted members come
  back as plain dicts of tensors/bytes that ``torch.save`` can store in the checkpoint.
- ``load_member(member, n_features) -> Member``: a saved member back as something with
  ``log_price(X)``.
- ``inference_form(saved, loaded, n_features, target) -> Linear | Runtime``: a member as
  the compiled plan predicts it (``tasks/inference/plan.py`` keeps the runtimes): a
  ``Linear`` form collapses into the plan's lookups; a ``Runtime`` form names one of the
  plan's predictors (``net``, ``trees``, ``svr``, ``krr``) with its arrays. The default is
  the ``generic`` runtime: the saved member itself, loaded by its kind at predict time, so a
  new kind predicts end to end the day it is written (and its measured predict speed shows
  what a compiled form would save).
- ``stack_key()``: candidates of one kind with equal keys train together in one call of
  ``cross_validate_stack`` (the torch kinds' stacked networks); ``None`` (the default): alone.

``code_files`` names the source files (under ``tasks/``) whose text defines what the kind
computes: they are part of its candidates' train version, so editing one kind's module retrains
only that kind. ``renamed`` maps a field of the old flat candidate config to this kind's own
name for it, so an old config gets an error that says where the value went.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Protocol

import numpy as np
from pydantic import Field

from tasks.frozen import Frozen, Name
from tasks.kinds.settings import TrainConfig
from tasks.progress import muted, report_score

Folds = list[tuple[np.ndarray, np.ndarray]]  # per fold: (train_idx, valid_idx) int64


def rmse(pred_log_price: np.ndarray, log_price_true: np.ndarray) -> float:
    """The book's log RMSE on NumPy arrays of log prices ``(n,)``."""
    return float(np.sqrt(np.mean((pred_log_price - log_price_true) ** 2)))


def oof_scores(pred: np.ndarray, logy: np.ndarray, repeat: np.ndarray, clean: np.ndarray
               ) -> dict[str, Any]:
    """Out-of-fold scores of ``pred (m,)``, one log-price prediction per row and repeat (NaN:
    the row is in no fold), against ``logy (m,)``; ``repeat (m,)`` says each one's repeat,
    ``clean (m,)`` that its row is no outlier. The log RMSE over all of them and without the
    outliers, each repeat's own, the spread of the all-rows one over repeats (None with one
    repeat), and the rows per repeat."""
    scored = ~np.isnan(pred)
    reps = np.unique(repeat)
    out: dict[str, Any] = {"repeats": len(reps)}
    for name, rows in (("all", scored), ("clean", scored & clean)):
        out[f"oof_log_rmse_{name}"] = rmse(pred[rows], logy[rows])
        out[f"oof_log_rmse_{name}_per_repeat"] = [
            rmse(pred[rows & (repeat == r)], logy[rows & (repeat == r)]) for r in reps]
        out[f"n_rows_{name}"] = int((rows & (repeat == reps[0])).sum())
    per = out["oof_log_rmse_all_per_repeat"]
    out["oof_log_rmse_all_spread"] = float(np.std(per, ddof=1)) if len(reps) > 1 else None
    return out


def refit_members(specs: list[CandidateConfig], X: np.ndarray, y: np.ndarray,
                  train: TrainConfig, rows: np.ndarray) -> list[list[dict[str, Any]]]:
    """Each of ``specs`` (one kind) fitted once on ``rows``: one fold whose validation rows
    are its training rows (their score is not used). Specs of one ``stack_key`` fit as one
    stack (those a search cut to different budgets are different stacks)."""
    one = train.model_copy(update={"repeats": 1})
    fold = [(rows, rows)]
    stacks: dict[Any, list[int]] = {}
    for i, s in enumerate(specs):
        key = s.stack_key()
        stacks.setdefault(("alone", i) if key is None else key, []).append(i)
    out: list[list[dict[str, Any]]] = [[] for _ in specs]
    with muted():  # its "valid" rows are its training rows: no score to show
        for at in stacks.values():
            cvs = type(specs[at[0]]).cross_validate_stack([specs[i] for i in at], X, y, one,
                                                          fold, [rows], lambda f: None)
            for i, cv in zip(at, cvs, strict=True):
                out[i] = cv.members[0]
    return out


@dataclass(frozen=True)
class Linear:
    """A member that is a linear function of the features: ``w (d,) . x + b`` in log price
    (no clamp: the plan sums every linear member into one lookup table)."""

    w: np.ndarray
    b: float


@dataclass(frozen=True)
class Runtime:
    """A member as one of the plan's runtime predictors: ``kind`` names it, ``params`` (plain
    JSON) and ``arrays`` (plain NumPy arrays) are all it reads."""

    kind: str
    params: dict[str, Any]
    arrays: dict[str, np.ndarray]


def net_form(layers: list[tuple[np.ndarray, np.ndarray]], activation: str, y_mean: float,
             y_std: float, float64: bool = False) -> Runtime:
    """A feed-forward net as the plan's ``net`` runtime: ``layers`` as ``(W (in, out), b)``,
    the activation between them, the output de-standardized by ``y_std``, ``y_mean``."""
    arrays = {}
    for i, (W, b) in enumerate(layers):
        arrays[f"W{i}"], arrays[f"b{i}"] = W, b
    params = {"activation": activation, "layers": len(layers), "y_mean": float(y_mean),
              "y_std": float(y_std)}
    return Runtime("net", {**params, "float64": True} if float64 else params, arrays)


def forest_arrays(trees: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One member's trees (each ``feature, threshold, left, right, value, missing_left``,
    rooted at node 0) as one forest."""
    return join([{**t, "roots": np.zeros(1, np.int64)} for t in trees])


def join(forests: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Forests concatenated: children indexes and ``roots`` shifted by where each forest's
    nodes now start (a child of -1, a leaf's, stays -1)."""
    sizes = [len(f["left"]) for f in forests]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    out = {k: np.concatenate([f[k] for f in forests]) for k in forests[0]}
    for key in ("left", "right"):
        out[key] = np.concatenate([np.where(f[key] >= 0, f[key] + o, -1) for f, o in
                                   zip(forests, offsets, strict=True)]).astype(np.int32)
    out["roots"] = np.concatenate([f["roots"] + o for f, o in zip(forests, offsets,
                                                                  strict=True)])
    return out


def trees_form(trees: list[dict[str, np.ndarray]], base: float) -> Runtime:
    """Boosted trees as the plan's ``trees`` runtime: each tree's ``feature, threshold, left,
    right, value, missing_left`` (rooted at node 0), and the base score they add to."""
    return Runtime("trees", {"base": base}, forest_arrays(trees))


def generic_form(spec: CandidateConfig, saved: dict[str, Any], n_features: int) -> Runtime:
    """The saved member itself, as plain arrays (bytes as ``uint8``, tensors as arrays), with
    the candidate's config: the plan loads it through ``spec.load_member`` when it predicts
    (skops members load only trusted types, as from the checkpoint)."""
    fields, arrays = {}, {}
    for key, value in saved.items():
        if isinstance(value, bytes | bytearray):
            fields[key], arrays[key] = "bytes", np.frombuffer(value, np.uint8).copy()
        elif hasattr(value, "detach"):  # a torch tensor
            fields[key], arrays[key] = "tensor", value.detach().cpu().numpy()
        elif isinstance(value, np.ndarray):
            fields[key], arrays[key] = "array", value
        else:
            raise TypeError(f"kind {spec.kind}: member field {key!r} is a "
                            f"{type(value).__name__}; a member without a compiled form must "
                            "hold bytes or arrays, or the kind must define inference_form")
    return Runtime("generic", {"config": spec.model_dump(mode="json"), "fields": fields,
                               "n_features": n_features}, arrays)


class TooManyRows(ValueError):
    """A kind was given more training rows than it can take."""


def check_rows(spec: CandidateConfig, n: int) -> None:
    """One line when ``spec``'s kind cannot take ``n`` training rows."""
    if spec.max_rows is not None and n > spec.max_rows:
        raise TooManyRows(f"candidate '{spec.name}': kind {spec.kind} takes at most "
                          f"{spec.max_rows:,} training rows, the data has {n:,} (its time and "
                          f"memory grow with their square); {spec.instead}")


@dataclass
class CVResult:
    """One candidate's K-fold cross-validation."""

    folds: Folds
    members: list[list[dict[str, Any]]]  # per fold: its models (seeds), as saved
    train_log_rmse: list[float]  # per fold, on the rows it was fitted on
    valid_log_rmse: list[float]  # per fold, on all its validation rows
    # (repeats, n_rows) float64: each repeat's out-of-fold prediction, NaN if in no fold
    oof_log_price: np.ndarray
    curves: list[dict[str, list[float]]] | None  # per fold, per epoch (epoch-trained kinds)
    diverged: str | None = None
    # Where a search over its stack cut this candidate's budget (the torch kinds' successive
    # halving): its last rung, that rung's budget and rank; None: trained as configured.
    halving: dict[str, Any] | None = None


class Member(Protocol):
    """One fitted fold model, loaded for prediction."""

    def log_price(self, X: np.ndarray) -> np.ndarray:
        """``(n, n_features) float32 -> (n,) float64`` predicted log price."""
        ...


class CandidateConfig(Frozen):
    """One candidate model: its name, its kind (the union's tag) and the kind's own fields."""

    name: Name
    kind: str
    exclude_outliers: bool | None = Field(
        None, description="this candidate's own train.exclude_outliers (None: that one), so "
        "whether to fit the two outliers is a choice a search cross-validates and select "
        "scores on all rows")
    code_files: ClassVar[tuple[str, ...]] = ()
    renamed: ClassVar[dict[str, str]] = {}
    # The most training rows this kind takes (None: no limit): a kernel machine's time and
    # memory grow with the square of the rows, so above it the kind refuses in one line.
    max_rows: ClassVar[int | None] = None
    instead: ClassVar[str] = ""  # what to use above max_rows
    # A linear function of the features: its fold ensemble collapses into one linear model
    # at predict time, so select.final = "mixed" keeps it (see tasks/inference/plan.py).
    linear_in_features: ClassVar[bool] = False

    def cross_validate(self, X: np.ndarray, y: np.ndarray, train: TrainConfig, folds: Folds,
                       fitted: list[np.ndarray],
                       on_progress: Callable[[float], None]) -> CVResult:
        """K-fold cross-validate on ``X (n, d) float32`` (or ``(K, n, d)``: fold ``k``'s rows
        through the preprocessor fitted on its own training rows) and prices ``y (n,)``."""
        raise NotImplementedError

    def load_member(self, member: dict[str, Any], n_features: int, target: str) -> Member:
        """A member saved by ``cross_validate`` back as a predictor."""
        raise NotImplementedError

    def inference_form(self, saved: dict[str, Any], loaded: Member, n_features: int,
                       target: str) -> Linear | Runtime:
        """How the compiled plan predicts this member (``saved``, as ``cross_validate``
        saved it; ``loaded``, as ``load_member`` returned it): by default the ``generic``
        runtime, which loads it with this kind at predict time."""
        return generic_form(self, saved, n_features)

    def budget_note(self, n_rows: int) -> str | None:
        """A line saying how this candidate's training is cut to its budget on ``n_rows``
        fitted rows (None: it is not)."""
        return None

    def stack_key(self) -> tuple | None:
        """Candidates whose keys are equal (not None) train as one ``cross_validate_stack``
        call; None: this candidate trains alone."""
        return None

    @property
    def depends_on_stack(self) -> bool:
        """Whether this candidate's result depends on the other candidates of its stack (a
        search among them, as successive halving): its version then holds theirs, and its
        stack retrains as a whole."""
        return False

    def trained_as(self, cv: CVResult) -> CandidateConfig:
        """The configuration ``cv`` was trained with: this one, or the smaller budget a
        search over its stack stopped it at (what its refit on all rows must use)."""
        return self

    @classmethod
    def cross_validate_stack(cls, specs: list[CandidateConfig], X: np.ndarray, y: np.ndarray,
                             train: TrainConfig, folds: Folds, fitted: list[np.ndarray],
                             on_progress: Callable[[float], None]) -> list[CVResult]:
        """``cross_validate`` of every candidate of ``specs`` (one ``stack_key``); a kind
        that trains many at once (one stacked model) overrides this."""
        return [s.cross_validate(X, y, train, folds, fitted, lambda f, i=i: on_progress(
            (i + f) / len(specs))) for i, s in enumerate(specs)]

    def refit(self, X: np.ndarray, y: np.ndarray, train: TrainConfig, rows: np.ndarray
              ) -> list[dict[str, Any]]:
        """The model(s) of one fold fitted on ``rows`` of the all-rows features ``X (n, d)``,
        as saved: the final model when ``select.final = "refit"`` (the book's
        ``train_and_pred``), fitted exactly as a fold model is."""
        return refit_members([self], X, y, train, rows)[0]

    @property
    def epochs_field(self) -> bool:
        """Whether ``--epochs`` applies to this kind."""
        return "epochs" in type(self).model_fields


def clamped_log_price(out: np.ndarray, target: str) -> np.ndarray:
    """A model's output ``(n,)`` (a log price, or a price with ``target = "raw"``) as a
    ``float64`` log price with the book's clamp: a predicted price of at least 1. The one
    NumPy form of the rule (``tasks.kinds.nets.log_price`` is its torch form)."""
    out = np.asarray(out, dtype=np.float64)
    return np.maximum(out, 0.0) if target == "log" else np.log(np.maximum(out, 1.0))


_ROWS = 65_536  # rows of a fold's features built at a time


def fold_rows(X: Any, k: int, rows: np.ndarray, dtype: type) -> np.ndarray:
    """Fold ``k``'s features of ``rows`` as one ``(len(rows), d)`` array of ``dtype``: of the
    fold maps (``X.rows``) a block of rows at a time, of stacked fold matrices ``X[k]``, or of
    the one matrix ``X (n, d)``."""
    if not hasattr(X, "rows"):
        Xk = X[k] if X.ndim == 3 else X
        return np.asarray(Xk[rows], dtype=dtype)
    out = np.empty((len(rows), X.shape[2]), dtype)
    for lo in range(0, len(rows), _ROWS):
        out[lo:lo + _ROWS] = X.rows(k, rows[lo:lo + _ROWS])
    return out


def sklearn_log_price(estimator: Any, X: np.ndarray, target: str) -> np.ndarray:
    """A fitted regressor's predictions ``(n,) float64`` as clamped log prices."""
    return clamped_log_price(estimator.predict(X), target)


@dataclass
class SklearnMember:
    estimator: Any
    target: str

    def log_price(self, X: np.ndarray) -> np.ndarray:
        return sklearn_log_price(self.estimator, X, self.target)


# scikit-learn is imported on first use (config validation need not pay for it), but two
# threads importing different sklearn submodules at once can see a partly initialized
# ``sklearn.base`` ("cannot import name 'clone' ... circular import"): candidates train in
# parallel threads, so first imports and unpickling go through this lock.
_SKLEARN_IMPORT = threading.Lock()


def _import_sklearn() -> None:
    """Import, once and under the lock, every scikit-learn module the kinds use, so no
    thread imports one while another is half-way through importing another."""
    import sklearn.ensemble  # noqa: F401
    import sklearn.kernel_ridge  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import sklearn.svm  # noqa: F401


# The only types a checkpoint's scikit-learn members may hold beyond skops' own trusted set
# (scikit-learn estimators, NumPy arrays, builtins): the tree objects of the boosting kinds.
# Anything else in a member is refused before it is built: a checkpoint is data, and whoever
# can write the artifact store must not be able to run code where it is loaded.
TRUSTED_TYPES = (
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.tree._tree.Tree",
)


class UntrustedCheckpoint(RuntimeError):
    """A checkpoint member holds a type that loading could run code with."""


def skops_dumps(estimator: Any) -> bytes:
    import skops.io

    return skops.io.dumps(estimator)


def skops_loads(member: dict[str, Any]) -> Any:
    """A member's estimator, built only from trusted types; one-line error otherwise."""
    import skops.io

    if "skops" not in member:
        raise UntrustedCheckpoint(
            f"checkpoint member holds {sorted(member)} instead of skops bytes (a pickled "
            "member from an older version, which is never loaded): retrain with --from train")
    data = member["skops"]
    try:
        untrusted = set(skops.io.get_untrusted_types(data=data)) - set(TRUSTED_TYPES)
    except Exception as exc:  # not a skops archive at all
        raise UntrustedCheckpoint(f"checkpoint member is not a readable skops archive "
                                  f"({type(exc).__name__}: {exc})") from None
    if untrusted:
        raise UntrustedCheckpoint(
            f"checkpoint member holds untrusted type(s) {', '.join(sorted(untrusted))}: "
            "refused (nothing was loaded); rebuild it with --from train")
    return skops.io.loads(data, trusted=list(TRUSTED_TYPES))


MaxFitRows = Annotated[int | None, Field(ge=1, description=(
    "fit each fold on a uniform sample of at most this many of its training rows (seeded; "
    "every validation row is still predicted); None: all of them"))]


class SklearnCandidate(CandidateConfig):
    """A kind backed by a scikit-learn regressor: cross-validated fold by fold on the same
    folds and target as every other kind; each fold's fitted estimator goes into the
    checkpoint as skops bytes (``skops_dumps``), which load without running code."""

    code_files: ClassVar[tuple[str, ...]] = ("kinds/base.py",)
    # The dtype the estimator fits in (scikit-learn's trees: float32; the rest float64): a
    # fold's training rows are built in it, so scikit-learn does not copy them again.
    fit_dtype: ClassVar[type] = np.float64

    def make_estimator(self, seed: int) -> Any:
        """The unfitted scikit-learn regressor this config names."""
        raise NotImplementedError

    def fit_sample(self, rows: np.ndarray, seed: int) -> np.ndarray:
        """The training rows a fold fits on: all of ``rows`` (``SampledCandidate``: a
        sample)."""
        return rows

    def n_fit_rows(self, n: int) -> int:
        """How many of ``n`` training rows a fold fits on."""
        return n

    def cross_validate(self, X, y, train, folds, fitted, on_progress) -> CVResult:
        # before any fit: the refit on all rows would take them all
        check_rows(self, self.n_fit_rows(len(y)))
        logy = np.log(y)
        target = logy if train.target == "log" else y
        oof = np.full((train.repeats, len(y)), np.nan)
        members, train_rmse, valid_rmse = [], [], []
        for k, ((_, va), tr) in enumerate(zip(folds, fitted, strict=True)):
            with _SKLEARN_IMPORT:
                _import_sklearn()
                est = self.make_estimator(seed=train.seed * 1000 + k)
            # Fold k's rows (its own preprocessing, when there is one) as scikit-learn takes
            # them: built a block of rows at a time, never the fold's whole matrix.
            fit = self.fit_sample(tr, seed=train.seed * 1000 + k)
            X_tr = fold_rows(X, k, fit, self.fit_dtype)
            est.fit(X_tr, target[fit])
            p_tr = sklearn_log_price(est, X_tr, train.target)
            del X_tr
            p_va = np.concatenate([
                sklearn_log_price(est, fold_rows(X, k, va[lo:lo + _ROWS], self.fit_dtype),
                                  train.target) for lo in range(0, len(va), _ROWS)]
                or [np.zeros(0)])
            oof[k // train.n_splits, va] = p_va  # folds are repeat-major
            members.append([{"skops": skops_dumps(est)}])
            train_rmse.append(rmse(p_tr, logy[fit]))
            valid_rmse.append(rmse(p_va, logy[va]))
            report_score(self.name, float(np.mean(valid_rmse)))
            on_progress((k + 1) / len(folds))
        return CVResult(folds=folds, members=members, train_log_rmse=train_rmse,
                        valid_log_rmse=valid_rmse, oof_log_price=oof, curves=None)

    def load_member(self, member, n_features, target) -> Member:
        with _SKLEARN_IMPORT:
            _import_sklearn()
            estimator = skops_loads(member)
        return SklearnMember(estimator, target)


class SampledCandidate(SklearnCandidate):
    """A scikit-learn kind fitted fold by fold, that can fit each fold on a sample of its
    rows (``max_fit_rows``): boosting's and the kernels' cost grows with every row."""

    max_fit_rows: MaxFitRows = None

    def fit_sample(self, rows: np.ndarray, seed: int) -> np.ndarray:
        """``rows``, or a sorted uniform sample of ``max_fit_rows`` of them (sorted, so the
        base is read in order)."""
        if self.n_fit_rows(len(rows)) == len(rows):
            return rows
        pick = np.random.default_rng(seed).choice(len(rows), self.max_fit_rows, replace=False)
        return rows[np.sort(pick)]

    def n_fit_rows(self, n: int) -> int:
        return n if self.max_fit_rows is None else min(n, self.max_fit_rows)

    def budget_note(self, n_rows: int) -> str | None:
        if self.n_fit_rows(n_rows) == n_rows:
            return None
        return (f"{self.name}: each fold fits on a sample of {self.max_fit_rows:,} of its "
                f"{n_rows:,} training rows (max_fit_rows); set max_fit_rows higher (or none) "
                "to fit on all of them")
