"""The book's models (linear regression and MLPs), their initializations, and the metric.

Every random draw (initialization, dropout masks, batch order) comes from an explicit
``torch.Generator``: candidates train concurrently in threads, which share torch's global RNG,
so seeding that one would not make a run reproducible.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn


class NetSpec(Protocol):
    """What the networks and the engine read of a torch candidate (``TorchCandidate`` is
    one): its layers and how it trains."""

    hidden: tuple[int, ...]
    activation: str
    dropout: float
    init: str
    optimizer: str
    lr: float
    weight_decay: float
    epochs: int
    batch_size: int
    seeds: int
    clip_grad_norm: float | None
    max_steps: int | None
    lr_schedule: str
    average_last: int
    stop_share: float | None

    @property
    def draws_dropout(self) -> bool: ...

def epochs_within(spec: NetSpec, n_rows: int) -> int:
    """The epochs ``spec`` trains on ``n_rows`` rows: its own, or as many as ``max_steps``
    steps of ``batch_size`` rows allow (at least one)."""
    if spec.max_steps is None:
        return spec.epochs
    per_epoch = -(-n_rows // spec.batch_size)
    return max(1, min(spec.epochs, spec.max_steps // max(per_epoch, 1)))


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


class SeededDropout(nn.Module):
    """Inverted dropout, as ``nn.Dropout``, drawing its masks from its own generator."""

    def __init__(self, p: float, generator: torch.Generator | None):
        super().__init__()
        self.p = p
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape, generator=self.generator, device=x.device) >= self.p
        return x * keep / (1.0 - self.p)


class Regressor(nn.Module):
    """``(n, n_features) float32 -> (n,) float32``: linear, or an MLP with dropout."""

    def __init__(self, spec: NetSpec, n_features: int,
                 generator: torch.Generator | None = None,
                 dropout_generator: torch.Generator | None = None):
        """``generator`` (a CPU generator) draws the initial weights, so they are the same on
        every device; ``dropout_generator`` lives on the device the model runs on."""
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for size in spec.hidden:  # none for the linear kind
            layers += [nn.Linear(width, size), ACTIVATIONS[spec.activation]()]
            if spec.dropout > 0:
                layers.append(SeededDropout(spec.dropout, dropout_generator or generator))
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        if generator is not None:
            initialize(self, spec.init, generator)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.net(X).squeeze(-1)


@torch.no_grad()
def initialize(model: nn.Module, scheme: str, generator: torch.Generator) -> None:
    """'default' is PyTorch's own Linear init; 'xavier' and 'normal' (std 0.01) as in the book."""
    for layer in model.modules():
        if not isinstance(layer, nn.Linear):
            continue
        w, b = layer.weight, layer.bias
        if scheme == "default":
            nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(w.shape[1])
            b.uniform_(-bound, bound, generator=generator)
        elif scheme == "xavier":
            nn.init.xavier_uniform_(w, generator=generator)
            b.zero_()
        elif scheme == "normal":
            w.normal_(0.0, 0.01, generator=generator)
            b.zero_()
        else:
            raise ValueError(f"unknown init scheme {scheme!r}")


def log_price(output: torch.Tensor, target: str, y_mean: float | torch.Tensor,
              y_std: float | torch.Tensor) -> torch.Tensor:
    """Model output -> log(price), with the book's clamp of predicted prices to >= 1 (the
    torch form of ``tasks.kinds.base.clamped_log_price``).
    ``y_mean``/``y_std`` may be per-model ``(M, 1)`` tensors for stacked outputs ``(M, n)``."""
    if target == "log":
        return (output * y_std + y_mean).clamp(min=0.0)
    return torch.log(output.clamp(min=1.0))


def log_rmse(pred_log_price: torch.Tensor, price: torch.Tensor) -> float:
    """The book's metric: RMSE between log predicted and log true prices."""
    return float(torch.sqrt(torch.mean((pred_log_price - torch.log(price)) ** 2)))
