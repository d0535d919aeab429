"""``linear`` and ``mlp``: the book's networks, trained by the batched K-fold engine.

All K folds x ``seeds`` models of a candidate train together as one stacked model
(``tasks/engine.py``); a fold's seeds are averaged in log space, at validation as at predict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from tasks.kinds.base import CandidateConfig, CVResult, Member, rmse

_CODE = ("kinds/base.py", "kinds/torch_net.py", "engine.py", "models.py")


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

    def cross_validate(self, X, y, train, folds, fitted, on_progress) -> CVResult:
        import torch

        from tasks.engine import train_stacked
        from tasks.models import resolve_device

        device = resolve_device(train.device)
        K, S, n = len(folds), self.seeds, len(X)
        train_mask = torch.zeros(K * S, n, dtype=torch.bool)
        valid_mask = torch.zeros(K * S, n, dtype=torch.bool)
        for k, ((_, va), tr) in enumerate(zip(folds, fitted, strict=True)):
            train_mask[k * S:(k + 1) * S, tr] = True
            valid_mask[k * S:(k + 1) * S, va] = True
        seeds = [train.seed * 1000 + k + 7919 * s for k in range(K) for s in range(S)]
        res = train_stacked(
            torch.tensor(X, dtype=torch.float32, device=device),
            torch.tensor(y, dtype=torch.float32, device=device),
            train_mask.to(device), valid_mask.to(device), self, train.target, seeds,
            on_epoch=lambda e: on_progress((e + 1) / self.epochs),
        )
        # Seeds of a fold are averaged in log space: one model per fold, as at predict time.
        pred = res.pred_log_price.view(K, S, n).mean(1).numpy()
        logy = np.log(y)
        oof = np.full(n, np.nan)
        for k, (_, va) in enumerate(folds):
            oof[va] = pred[k, va]
        members = [[{"state_dict": res.state_dicts[k * S + s], "y_mean": res.y_mean[k * S + s],
                     "y_std": res.y_std[k * S + s]} for s in range(S)] for k in range(K)]
        curves = [{name: c[k * S:(k + 1) * S].mean(0).tolist() for name, c in res.curves.items()}
                  for k in range(K)]
        return CVResult(
            folds=folds, members=members,
            train_log_rmse=[rmse(pred[k, tr], logy[tr]) for k, tr in enumerate(fitted)],
            valid_log_rmse=[rmse(pred[k, va], logy[va]) for k, (_, va) in enumerate(folds)],
            oof_log_price=oof, curves=curves, diverged=res.diverged,
        )

    def load_member(self, member, n_features, target) -> Member:
        from tasks.models import Regressor

        model = Regressor(self, n_features)
        model.load_state_dict(member["state_dict"])
        return TorchMember(model.eval(), member["y_mean"], member["y_std"], target)


@dataclass
class TorchMember:
    model: Any  # tasks.models.Regressor, in eval mode
    y_mean: float
    y_std: float
    target: str

    def log_price(self, X: np.ndarray) -> np.ndarray:
        import torch

        from tasks.models import log_price

        with torch.no_grad():
            out = self.model(torch.from_numpy(X))
            return log_price(out, self.target, self.y_mean, self.y_std).double().numpy()


class LinearConfig(TorchCandidate):
    """The book's linear regression: one ``nn.Linear`` layer."""

    kind: Literal["linear"] = "linear"

    # A linear model has no hidden layers; the engine and Regressor read these.
    hidden: ClassVar[tuple[int, ...]] = ()
    activation: ClassVar[str] = "relu"
    dropout: ClassVar[float] = 0.0


class MLPConfig(TorchCandidate):
    """A multilayer perceptron: hidden layers of the given sizes, each followed by the
    activation and (inverted) dropout."""

    kind: Literal["mlp"] = "mlp"
    hidden: tuple[Annotated[int, Field(gt=0)], ...] = Field(
        (256,), description="hidden layer sizes, input side first")
    activation: Literal["relu", "sigmoid", "tanh"] = "relu"
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0

    @model_validator(mode="after")
    def _needs_layers(self) -> MLPConfig:
        if not self.hidden:
            raise ValueError("an mlp candidate needs at least one hidden layer size "
                             "(use kind = \"linear\" for none)")
        return self
