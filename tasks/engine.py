"""The batched K-fold training engine: all folds (and seeds) of one torch candidate at once.

On 1460 rows and a few hundred features, one fold's step is a handful of tiny matrix products;
the time goes to Python and dispatch overhead per step, not arithmetic. So the M = K folds x S
seeds models of a candidate are trained together as one stacked model: layer ``l`` holds
weights ``(M, in, out)`` and every step is one batched matrix product (``torch.baddbmm``).

It is the same procedure as training them one by one: model ``m`` keeps its own training rows
(a mask), its own batch order, dropout masks, target scaling, optimizer state and metrics. The
loss is the sum of the models' own mean losses, so model ``m``'s gradient is exactly its own
loss's gradient. Adam and SGD are elementwise, so a stacked optimizer is K optimizers; a model
whose training rows are used up before the others' (folds differ in size by a row) skips the
step, as it would alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tasks.config import CandidateConfig
from tasks.models import ACTIVATIONS, Regressor

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass
class EngineResult:
    """Per model ``m``: final weights as ``Regressor`` state dicts, target scaling, curves."""

    state_dicts: list[dict[str, torch.Tensor]]
    y_mean: list[float]  # target scaling fitted on model m's training rows
    y_std: list[float]
    pred_log_price: torch.Tensor  # (M, n_rows) float64, every row, after the last epoch
    curves: dict[str, torch.Tensor]  # name -> (M, epochs): train/valid log RMSE, grad norm
    epochs_run: int
    diverged: str | None  # why training stopped early, or None


def _init_stack(spec: CandidateConfig, n_features: int, seeds: list[int]
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Stacked ``(M, in, out)`` weights and ``(M, 1, out)`` biases, model ``m`` initialized
    exactly as a lone ``Regressor`` seeded with ``seeds[m]`` would be."""
    per_model = [
        [layer for layer in Regressor(spec, n_features,
                                      generator=torch.Generator().manual_seed(s)).net
         if isinstance(layer, torch.nn.Linear)]
        for s in seeds
    ]
    weights, biases = [], []
    for i in range(len(per_model[0])):
        weights.append(torch.stack([m[i].weight.detach().T for m in per_model]).contiguous())
        biases.append(torch.stack([m[i].bias.detach()[None, :] for m in per_model]).contiguous())
    return weights, biases


def _state_dicts(spec: CandidateConfig, n_features: int, weights: list[torch.Tensor],
                 biases: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Unstack into one ``Regressor`` state dict per model (what predict loads)."""
    out = []
    for m in range(weights[0].shape[0]):
        model = Regressor(spec, n_features)
        linears = [layer for layer in model.net if isinstance(layer, torch.nn.Linear)]
        with torch.no_grad():
            for layer, w, b in zip(linears, weights, biases, strict=True):
                layer.weight.copy_(w[m].T)
                layer.bias.copy_(b[m, 0])
        out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


class StackedOptimizer:
    """Adam or SGD (PyTorch's update rules, L2 weight decay added to the gradient) over
    parameters whose first dimension indexes independent models."""

    def __init__(self, params: list[torch.Tensor], spec: CandidateConfig, n_models: int):
        self.params, self.spec = params, spec
        self.step_count = torch.zeros(n_models, dtype=torch.float64)
        if spec.optimizer == "adam":
            self.exp_avg = [torch.zeros_like(p) for p in params]
            self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, active: torch.Tensor | None) -> None:
        """One update of every model, or only of ``active`` ``(M,) bool`` ones."""
        spec = self.spec
        grads = [p.grad if spec.weight_decay == 0 else p.grad.add(p, alpha=spec.weight_decay)
                 for p in self.params]
        shape = lambda p: (-1,) + (1,) * (p.dim() - 1)  # noqa: E731 - broadcast (M,) over p
        if spec.optimizer == "sgd":
            for p, g in zip(self.params, grads, strict=True):
                if active is not None:
                    g = g * active.view(shape(p))
                p.sub_(g, alpha=spec.lr)
            return
        b1, b2 = ADAM_BETAS
        self.step_count += 1 if active is None else active.cpu().double()
        t = self.step_count.to(self.params[0].device)
        bc1 = (1 - b1 ** t).float()
        bc2_sqrt = (1 - b2 ** t).sqrt().float()
        for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq, strict=True):
            if active is None:
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                upd = m / (v.sqrt() / bc2_sqrt.view(shape(p)) + ADAM_EPS)
                p.sub_(upd * (spec.lr / bc1).view(shape(p)))
            else:
                a = active.view(shape(p))
                m.copy_(torch.where(a, m.lerp(g, 1 - b1), m))
                v.copy_(torch.where(a, v * b2 + (1 - b2) * g * g, v))
                safe_bc1 = torch.where(active, bc1, torch.ones_like(bc1))
                safe_bc2 = torch.where(active, bc2_sqrt, torch.ones_like(bc2_sqrt))
                upd = m / (v.sqrt() / safe_bc2.view(shape(p)) + ADAM_EPS)
                p.sub_(torch.where(a, upd * (spec.lr / safe_bc1).view(shape(p)), 0.0))


def _rand(shape: tuple[int, ...], gens: list[torch.Generator], device: torch.device,
          counts: list[int] | None = None) -> torch.Tensor:
    """``(M, B, ...)`` uniform draws, slice ``m`` from model ``m``'s own generator and only
    for its ``counts[m]`` live rows (the rest 0), so a model draws the same numbers whether
    it trains alone or stacked with others."""
    if counts is None:
        return torch.stack([torch.rand(shape[1:], generator=g, device=device) for g in gens])
    out = torch.zeros(shape, device=device)
    for m, (g, c) in enumerate(zip(gens, counts, strict=True)):
        if c:
            out[m, :c] = torch.rand((c, *shape[2:]), generator=g, device=device)
    return out


def _forward(X: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
             spec: CandidateConfig, gens: list[torch.Generator] | None,
             counts: list[int] | None = None) -> torch.Tensor:
    """``X`` ``(M, B, d)`` or shared ``(n, d)`` -> ``(M, B)`` outputs; dropout when
    generators are given (training), drawn for each model's ``counts`` live rows."""
    h = X
    last = len(weights) - 1
    act = ACTIVATIONS[spec.activation]() if spec.kind == "mlp" else None
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        h = torch.baddbmm(b, h, w) if h.dim() == 3 else torch.matmul(h, w) + b
        if i < last:
            h = act(h)
            if gens is not None and spec.dropout > 0:
                keep = _rand(tuple(h.shape), gens, h.device, counts) >= spec.dropout
                h = h * keep / (1.0 - spec.dropout)
    return h.squeeze(-1)


def train_stacked(X: torch.Tensor, y: torch.Tensor, train_mask: torch.Tensor,
                  valid_mask: torch.Tensor, spec: CandidateConfig, target: str,
                  seeds: list[int],
                  on_epoch: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
                  ) -> EngineResult:
    """Train M models of ``spec`` at once.

    ``X`` ``(n, d) float32`` and ``y`` ``(n,) float32`` prices (on the training device);
    ``train_mask``/``valid_mask`` ``(M, n) bool``: the rows model ``m`` trains and is scored on;
    ``seeds[m]`` seeds its initial weights (CPU, the same on every device), batch order and
    dropout. Each step's gradient norm is recorded (per-epoch mean), and clipped per model to
    ``spec.clip_grad_norm`` when set. Stops early, with the reason, once a model's loss is
    not finite.
    """
    device = X.device
    M, (n, d) = len(seeds), X.shape
    weights, biases = _init_stack(spec, d, seeds)
    params = [t.to(device).requires_grad_() for t in weights + biases]
    weights, biases = params[:len(weights)], params[len(weights):]
    opt = StackedOptimizer(params, spec, M)
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    # Per-model target scaling from its own training rows (log target standardized).
    logy = torch.log(y)
    if target == "log":
        cnt = train_mask.sum(1, keepdim=True).float()
        y_mean = (logy * train_mask).sum(1, keepdim=True) / cnt
        y_std = (((logy - y_mean) ** 2 * train_mask).sum(1, keepdim=True) / (cnt - 1)).sqrt()
        y_fit = (logy - y_mean) / y_std  # (M, n)
    else:
        y_mean, y_std = torch.zeros(M, 1, device=device), torch.ones(M, 1, device=device)
        y_fit = y.expand(M, n)

    # Each model's training rows, padded to the longest; padding sorts last in every shuffle.
    n_train = train_mask.sum(1)
    width = int(n_train.max())
    rows = torch.where(train_mask, torch.arange(n, device=device), n).sort(1).values[:, :width]
    sizes = n_train.tolist()
    rows = rows.clamp(max=n - 1)
    batch = spec.batch_size
    n_batches = math.ceil(width / batch)
    uneven = bool((n_train != width).any()) or width % batch != 0
    own_batches = torch.tensor([max(1, math.ceil(s / batch)) for s in sizes], device=device)

    def to_log_price(out: torch.Tensor) -> torch.Tensor:
        if target == "log":
            return (out * y_std + y_mean).clamp(min=0.0)
        return torch.log(out.clamp(min=1.0))

    def score() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            pred = to_log_price(_forward(X, weights, biases, spec, None))
            err = (pred - logy) ** 2
            tr = ((err * train_mask).sum(1) / train_mask.sum(1)).sqrt()
            va = ((err * valid_mask).sum(1) / valid_mask.sum(1).clamp(min=1)).sqrt()
        return tr, va, pred

    curves = {k: torch.zeros(M, spec.epochs, dtype=torch.float64)
              for k in ("train_log_rmse", "valid_log_rmse", "grad_norm")}
    diverged = None
    epoch = 0
    for epoch in range(spec.epochs):
        # Minibatches indexed from tensors already in memory: no DataLoader.
        # Each model draws keys for its own rows only: the same order as training alone.
        keys = torch.full((M, width), 2.0, device=device)
        for m, g in enumerate(gens):
            keys[m, :sizes[m]] = torch.rand(sizes[m], generator=g, device=device)
        order = keys.argsort(1)
        grad_sum = torch.zeros(M, device=device)
        for b in range(n_batches):
            pos = order[:, b * batch:(b + 1) * batch]  # (M, B) positions into `rows`
            idx = rows.gather(1, pos)
            live = (torch.arange(b * batch, b * batch + pos.shape[1], device=device)[None, :]
                    < n_train[:, None]) if uneven else None
            for p in params:
                p.grad = None
            counts = None if live is None else [
                max(0, min(pos.shape[1], size - b * batch)) for size in sizes]
            out = _forward(X[idx], weights, biases, spec, gens, counts)  # (M, B)
            sq = (out - y_fit.gather(1, idx)) ** 2
            # Each model's own mean loss over its live rows; their sum keeps gradients apart.
            loss_m = sq.mean(1) if live is None else (sq * live).sum(1) / live.sum(1).clamp(min=1)
            loss_m.sum().backward()
            with torch.no_grad():
                norm = torch.sqrt(sum((p.grad.reshape(M, -1) ** 2).sum(1) for p in params))
                grad_sum += norm if live is None else norm * live.any(1)
                if spec.clip_grad_norm is not None:
                    scale = (spec.clip_grad_norm / (norm + 1e-6)).clamp(max=1.0)
                    for p in params:
                        p.grad.mul_(scale.view((-1,) + (1,) * (p.dim() - 1)))
            active = None if live is None or bool(live.any(1).all()) else live.any(1)
            opt.step(active)
        tr, va, _ = score()
        curves["train_log_rmse"][:, epoch] = tr.double().cpu()
        curves["valid_log_rmse"][:, epoch] = va.double().cpu()
        curves["grad_norm"][:, epoch] = (grad_sum / own_batches).double().cpu()
        if on_epoch is not None:
            on_epoch(epoch, {k: v[:, epoch] for k, v in curves.items()})
        bad = ~torch.isfinite(curves["grad_norm"][:, epoch]) | ~torch.isfinite(
            curves["train_log_rmse"][:, epoch])
        if bad.any():
            m = int(bad.nonzero()[0])
            diverged = (f"loss or gradient became non-finite at epoch {epoch + 1} "
                        f"(model {m}); lower the learning rate or clip gradients")
            break
    epochs_run = epoch + 1
    _, _, pred = score()
    return EngineResult(
        state_dicts=_state_dicts(spec, d, [w.detach().cpu() for w in weights],
                                 [b.detach().cpu() for b in biases]),
        y_mean=y_mean.squeeze(1).tolist(), y_std=y_std.squeeze(1).tolist(),
        pred_log_price=pred.double().cpu(),
        curves={k: v[:, :epochs_run] for k, v in curves.items()},
        epochs_run=epochs_run,
        diverged=diverged,
    )
