"""``linear`` and ``mlp``: the book's networks, trained by the batched K-fold engine.

All K folds x ``seeds`` models of a candidate train together as one stacked model
(``tasks/kinds/engine.py``); a fold's seeds are averaged in log space, at validation as at predict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from tasks.kinds.base import CandidateConfig, CVResult, Linear, Member, Runtime, net_form, rmse

_CODE = ("kinds/base.py", "kinds/torch_net.py", "kinds/engine.py", "kinds/nets.py")


class TorchCandidate(CandidateConfig):
    """The network-training fields every torch kind has."""

    code_files: ClassVar[tuple[str, ...]] = _CODE

    init: Literal["default", "xavier", "normal"] = Field(
        "default", description="initial weights: PyTorch's, Xavier, or normal(0, 0.01)")
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: Annotated[float, Field(gt=0, description="learning rate")] = 1e-3
    weight_decay: Annotated[float, Field(ge=0, description="L2 added to the gradient")] = 0.0
    epochs: Annotated[int, Field(gt=0, le=100_000)] = 100
    batch_size: Annotated[int, Field(gt=0)] = 64
    seeds: Annotated[int, Field(ge=1, le=32)] = Field(
        1, description="train this many seeds per fold and average them (one candidate)")
    clip_grad_norm: Annotated[float, Field(gt=0)] | None = Field(
        None, description="clip each step's gradient norm to this value")
    max_steps: Annotated[int, Field(gt=0)] | None = Field(
        20_000, description="at most this many optimizer steps per model: on a file with more "
        "rows the epochs are cut to fit (never below one; logged), so a bigger file does not "
        "multiply a search's cost. The book's 100 epochs of 64 rows fit below 12,800 rows. "
        "None: always every epoch")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="the learning rate through training: constant, or cosine "
        "decay from lr to 0 over every step")
    average_last: Annotated[int, Field(ge=0)] = Field(
        0, description="keep the mean of the weights at the end of the last this many "
        "epochs instead of the last weights (0: the last weights): cheaper than more seeds, "
        "and it lowers a network's variance the same way. When max_steps cuts the epochs, "
        "the same share of them is averaged")
    halving: Annotated[int, Field(ge=0, le=8)] = Field(
        0, description="successive halving over the candidates of its stack (those of one "
        "shape, trained as one model): 0 off. With r rungs, at 2^-r, ..., 1/4, 1/2 of the "
        "steps every candidate still training is scored (its pooled validation log RMSE "
        "over its fold models) and the worse half stops there, keeping its weights of that "
        "step; the better half trains on (fewer rungs when the candidates run out first). "
        "metrics.json 'halving' says where each one stopped")
    stop_share: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, description="stop after this share of the training steps, keeping the "
        "weights of that step (the learning-rate schedule and the tail average still "
        "planned for every step): where successive halving stopped a candidate, which its "
        "refit on all rows then repeats. None: train every step")

    @model_validator(mode="after")
    def _tail_within_epochs(self) -> TorchCandidate:
        if self.average_last > self.epochs:
            raise ValueError(f"average_last ({self.average_last}) is more than epochs "
                             f"({self.epochs}): average at most every epoch")
        return self

    def cross_validate(self, X, y, train, folds, fitted, on_progress) -> CVResult:
        return cross_validate_group([self], X, y, train, folds, fitted, on_progress)[0]

    @classmethod
    def cross_validate_stack(cls, specs, X, y, train, folds, fitted, on_progress
                             ) -> list[CVResult]:
        return cross_validate_group(specs, X, y, train, folds, fitted, on_progress)

    @property
    def depends_on_stack(self) -> bool:
        return self.halving > 0

    def trained_as(self, cv: CVResult) -> TorchCandidate:
        if cv.halving is None:
            return self
        if not cv.halving["stopped"]:
            return self.model_copy(update={"halving": 0})
        return self.model_copy(update={"halving": 0, "stop_share": cv.halving["share"]})

    def inference_form(self, saved, loaded, n_features, target) -> Linear | Runtime:
        from torch import nn

        layers = [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy())
                  for m in loaded.model.modules() if isinstance(m, nn.Linear)]
        std, mean = float(loaded.y_std), float(loaded.y_mean)
        if len(layers) == 1 and target == "log":
            (W, b), = layers
            return Linear(std * W[:, 0].astype(np.float64), std * float(b[0]) + mean)
        acts = [type(m).__name__.lower() for m in loaded.model.modules()
                if isinstance(m, nn.ReLU | nn.Sigmoid | nn.Tanh)]
        form = net_form(layers, acts[0] if acts else "relu", mean, std)
        if loaded.wide is None:
            return form
        w, b = loaded.wide
        return Runtime(form.kind, {**form.params, "wide_b": b}, {**form.arrays, "wide_w": w})

    def budget_note(self, n_rows: int) -> str | None:
        from tasks.kinds.nets import epochs_within

        epochs = epochs_within(self, n_rows)
        if epochs == self.epochs:
            return None
        per_epoch = -(-n_rows // self.batch_size)
        return (f"{self.name}: {self.epochs} epochs cut to {epochs} by max_steps="
                f"{self.max_steps:,} ({per_epoch:,} batches of {self.batch_size} rows per "
                "epoch); set max_steps higher (or none) to train every epoch")

    def stack_key(self) -> tuple:
        """Candidates with equal keys train as one stack: what the engine's models share,
        plus what makes their random streams line up without padding (the number of seeds,
        and whether dropout masks are drawn), so each stream holds one model of each."""
        return (self.hidden, self.activation, self.batch_size, self.epochs, self.max_steps,
                self.optimizer, self.lr_schedule, self.average_last, self.seeds,
                self.draws_dropout, self.exclude_outliers, self.halving)

    @property
    def draws_dropout(self) -> bool:
        """Whether training draws dropout masks (which moves its random stream on)."""
        return bool(self.hidden) and self.dropout > 0

    def load_member(self, member, n_features, target) -> Member:
        from tasks.kinds.nets import Regressor

        model = Regressor(self, n_features)
        model.load_state_dict(member["state_dict"])
        wide = None
        if "wide_w" in member:
            w = np.asarray(member["wide_w"], np.float64)
            if w.shape != (n_features,):
                raise ValueError(f"candidate '{self.name}': its saved wide part has shape "
                                 f"{w.shape}, the features {n_features} columns; retrain "
                                 "with --from train")
            wide = (w, float(member["wide_b"]))
        return TorchMember(model.eval(), member["y_mean"], member["y_std"], target, wide)


def cross_validate_group(specs: list[TorchCandidate], X, y, train, folds, fitted,
                         on_progress) -> list[CVResult]:
    """Every candidate of ``specs`` (one ``stack_key``), K folds x its seeds each, trained as
    one stacked model; each candidate's result is exactly what training it alone gives (the
    same seeds, batch order and dropout draws). With ``halving``, the stack's successive
    halving: a stopped candidate's result is what training it alone with ``stop_share`` at
    that step's share gives."""
    import torch

    from tasks.kinds.engine import train_stacked
    from tasks.kinds.nets import epochs_within
    from tasks.kinds.settings import resolve_device

    device = resolve_device(train.device)
    # X (n, d), or (K, n, d): fold k's rows through the preprocessor fitted on its own rows.
    K, n = len(folds), X.shape[-2]
    wides = _wide_parts(specs, X, y, train, folds, fitted)
    models, seeds, groups = [], [], []  # per stacked model: its spec, seed, candidate
    for c, spec in enumerate(specs):
        for k in range(K):
            for s in range(spec.seeds):
                models.append((c, k, s))
                seeds.append(train.seed * 1000 + k + 7919 * s)
                groups.append(c)
    epochs = epochs_within(specs[0], max(len(rows) for rows in fitted))
    train_mask = torch.zeros(len(models), n, dtype=torch.bool)
    valid_mask = torch.zeros(len(models), n, dtype=torch.bool)
    for m, (_, k, _) in enumerate(models):
        train_mask[m, fitted[k]] = True
        valid_mask[m, folds[k][1]] = True
    wide = None
    if wides:  # per stacked model its fold's wide part; zeros for a plain network
        d = X.shape[-1]
        wide = (torch.zeros(len(models), d, dtype=torch.float64),
                torch.zeros(len(models), dtype=torch.float64))
        for m, (c, k, _) in enumerate(models):
            if specs[c].wide_alpha is not None:
                w, b = wides[specs[c].wide_alpha][k]
                wide[0][m], wide[1][m] = torch.from_numpy(w), b
    res = train_stacked(
        _features_on(X, device),
        torch.tensor(y, dtype=torch.float32, device=device),
        train_mask.to(device), valid_mask.to(device), [specs[c] for c, _, _ in models],
        train.target, seeds, on_epoch=lambda e, valid: _epoch_done(
            specs, valid, lambda: on_progress((e + 1) / epochs)),
        groups=groups, features=[k for _, k, _ in models] if X.ndim == 3 else None,
        wide=wide, halving=specs[0].halving,
    )
    logy = np.log(y)
    out, first = [], 0
    for c, spec in enumerate(specs):
        S = spec.seeds
        sl = slice(first, first + K * S)
        first += K * S
        # Seeds of a fold are averaged in log space: one model per fold, as at predict time.
        pred = res.pred_log_price[sl].double().view(K, S, n).mean(1).numpy()
        # the fitted rows scored (on many rows, a sample of them: the others are NaN)
        scored = [tr[np.isfinite(pred[k, tr])] if res.sampled else tr
                  for k, tr in enumerate(fitted)]
        oof = np.full((train.repeats, n), np.nan)
        for k, (_, va) in enumerate(folds):
            oof[k // train.n_splits, va] = pred[k, va]  # folds are repeat-major
        base = sl.start
        members = [[{"state_dict": res.state_dicts[base + k * S + s],
                     "y_mean": res.y_mean[base + k * S + s],
                     "y_std": res.y_std[base + k * S + s],
                     **_wide_member(spec, wides, k)} for s in range(S)]
                   for k in range(K)]
        ran = res.epochs_of[base]  # a candidate's models stop together
        curves = [{name: cv[base + k * S: base + (k + 1) * S, :ran].mean(0).tolist()
                   for name, cv in res.curves.items()} for k in range(K)]
        out.append(CVResult(
            folds=folds, members=members,
            train_log_rmse=[rmse(pred[k, tr], logy[tr]) for k, tr in enumerate(scored)],
            valid_log_rmse=[rmse(pred[k, va], logy[va]) for k, (_, va) in enumerate(folds)],
            oof_log_price=oof, curves=curves, diverged=res.diverged.get(c),
            halving=_halving_note(spec, res.stopped.get(c), res.stopped, len(specs)),
        ))
    return out


def _halving_note(spec: TorchCandidate, stop: dict | None, stopped: dict, n: int
                  ) -> dict | None:
    """What metrics.json says of a candidate's successive halving (None without any)."""
    if not spec.halving or n < 2:
        return None
    if stop is None or stop["reason"] != "halving":
        rungs = max((s["rungs"] for s in stopped.values() if s["reason"] == "halving"),
                    default=1)
        return {"stopped": False, "rungs": rungs, "share": 1.0,
                "of": n - sum(s["reason"] == "halving" for s in stopped.values())}
    return {"stopped": True, **{k: stop[k] for k in (
        "rung", "rungs", "rank", "of", "valid_log_rmse", "share", "step", "steps", "epoch")}}


def _wide_parts(specs: list[TorchCandidate], X, y, train, folds, fitted
                ) -> dict[float, list[tuple[np.ndarray, float]]]:
    """Per wide penalty of ``specs``, each fold's lasso of log price on its own fitted rows,
    from their sums (``wide_alpha``; what the networks then fit the residuals of)."""
    from tasks.kinds.linear_models import LassoConfig

    alphas = sorted({s.wide_alpha for s in specs if getattr(s, "wide_alpha", None)})
    if alphas and train.target != "log":
        raise ValueError(f"candidate '{specs[0].name}': wide_alpha fits a lasso of the log "
                         "price, so it needs train.target = 'log'")
    return {a: LassoConfig(name="wide", alpha=a, max_iter=WIDE_MAX_ITER).fold_fits(
        X, np.log(y), folds, fitted, train.seed) for a in alphas}


def _wide_member(spec: TorchCandidate, wides: dict, k: int) -> dict[str, Any]:
    """What a fold's member saves of its wide part (nothing without one)."""
    import torch

    alpha = getattr(spec, "wide_alpha", None)
    if alpha is None:
        return {}
    w, b = wides[alpha][k]
    return {"wide_w": torch.from_numpy(np.asarray(w, np.float64)), "wide_b": float(b)}


# Coordinate descent sweeps of a wide part's lasso (the default lasso candidate's).
WIDE_MAX_ITER = 5000

# Fold matrices up to this size are built once and held: a batch is then one gather (about
# 4x faster than building its rows from the base, measured at 15 x 64 rows x 330 features).
# Above it (more rows) each batch's rows are built from the base: memory stays one matrix.
HOLD_BYTES = 1 << 30


def _features_on(X, device):
    """``X`` as the engine reads it on ``device``: a tensor, or ``TorchFolds`` for fold
    maps too big to hold as matrices."""
    import torch

    from tasks.data.foldmaps import FoldMaps
    from tasks.kinds.engine import TorchFolds

    if not isinstance(X, FoldMaps):
        return torch.tensor(X, dtype=torch.float32, device=device)
    F, n, d = X.shape
    if F * n * d * 4 > HOLD_BYTES:
        return TorchFolds(X, device)
    held = torch.empty((F, n, d), dtype=torch.float32, device=device)
    for k in range(F):  # a block of rows at a time: a whole fold built at once is 3 copies
        for lo in range(0, n, _HOLD_ROWS):
            held[k, lo:lo + _HOLD_ROWS] = torch.from_numpy(X.rows(k, slice(lo, lo + _HOLD_ROWS)))
    return held


_HOLD_ROWS = 65_536


def _epoch_done(specs: list[TorchCandidate], valid: dict[int, float], progress) -> None:
    """Each candidate's valid log RMSE at this epoch to the progress hooks, then the group's
    progress."""
    from tasks.progress import report_score

    for c, score in valid.items():
        report_score(specs[c].name, score)
    progress()


@dataclass
class TorchMember:
    model: Any  # tasks.kinds.nets.Regressor, in eval mode
    y_mean: float
    y_std: float
    target: str
    wide: tuple[np.ndarray, float] | None = None  # (w (d,), b) float64: the linear part

    def log_price(self, X: np.ndarray) -> np.ndarray:
        import torch

        from tasks.kinds.nets import log_price

        with torch.no_grad():
            out = self.model(torch.from_numpy(X))
            if self.wide is None:
                return log_price(out, self.target, self.y_mean, self.y_std).double().numpy()
            w, b = self.wide
            y = out.double().numpy() * self.y_std + self.y_mean
            return np.maximum(y + (X.astype(np.float64) @ w + b), 0.0)


class LinearConfig(TorchCandidate):
    """The book's linear regression: one ``nn.Linear`` layer."""

    kind: Literal["linear"] = "linear"
    linear_in_features: ClassVar[bool] = True

    # A linear model has no hidden layers; the engine and Regressor read these.
    hidden: ClassVar[tuple[int, ...]] = ()
    activation: ClassVar[str] = "relu"
    dropout: ClassVar[float] = 0.0


class MLPConfig(TorchCandidate):
    """A multilayer perceptron: hidden layers of the given sizes, each followed by the
    activation and (inverted) dropout."""

    kind: Literal["mlp"] = "mlp"
    # its wide part is the lasso kind's fit: an edit there retrains the MLPs too
    code_files: ClassVar[tuple[str, ...]] = (*_CODE, "kinds/linear_models.py")
    hidden: tuple[Annotated[int, Field(gt=0)], ...] = Field(
        (256,), description="hidden layer sizes, input side first")
    activation: Literal["relu", "sigmoid", "tanh"] = "relu"
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    wide_alpha: Annotated[float, Field(gt=0)] | None = Field(
        None, description="wide and deep, fitted in stages: each fold first fits a lasso of "
        "this penalty to the log price (from its rows' sums), the network then fits that "
        "lasso's residuals, and the prediction is their sum (None: the network alone). "
        "Needs train.target = 'log'")

    @model_validator(mode="after")
    def _needs_layers(self) -> MLPConfig:
        if not self.hidden:
            raise ValueError("an mlp candidate needs at least one hidden layer size "
                             "(use kind = \"linear\" for none)")
        return self
