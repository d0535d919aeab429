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
from typing import TYPE_CHECKING

import torch

from tasks.models import Regressor, log_price

if TYPE_CHECKING:
    from tasks.kinds.torch_net import TorchCandidate

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


def _init_stack(spec: TorchCandidate, n_features: int, seeds: list[int]
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


def _state_dicts(spec: TorchCandidate, n_features: int, weights: list[torch.Tensor],
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


def _per_model(v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``v`` ``(M,)`` shaped to broadcast over ``p`` ``(M, ...)``: one value per model."""
    return v.view((-1,) + (1,) * (p.dim() - 1))


class StackedOptimizer:
    """Adam or SGD (PyTorch's update rules, L2 weight decay added to the gradient) over
    parameters whose first dimension indexes independent models.

    While every model has taken the same number of steps, the update is PyTorch's multi-tensor
    (``_foreach``) form with scalar bias corrections; once a model has skipped a step, each
    model's own step count is used."""

    def __init__(self, params: list[torch.Tensor], spec: TorchCandidate):
        self.params, self.spec = params, spec
        self.t = 0  # the common step count, while all models have stepped together
        self.step_count: torch.Tensor | None = None  # (M,) float64 once they differ
        if spec.optimizer == "adam":
            self.exp_avg = [torch.zeros_like(p) for p in params]
            self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], active: torch.Tensor | None = None) -> None:
        """One update of every model with ``grads`` (one per parameter), or only of the
        ``active`` ``(M,) bool`` ones."""
        spec, params = self.spec, self.params
        if spec.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=spec.weight_decay)
        if spec.optimizer == "sgd":
            if active is not None:
                grads = [g * _per_model(active, p) for g, p in zip(grads, params,
                                                                        strict=True)]
            torch._foreach_add_(params, grads, alpha=-spec.lr)
            return
        b1, b2 = ADAM_BETAS
        if active is None and self.step_count is None:
            self.t += 1
            bc1, bc2_sqrt = 1 - b1 ** self.t, math.sqrt(1 - b2 ** self.t)
            torch._foreach_lerp_(self.exp_avg, grads, 1 - b1)
            torch._foreach_mul_(self.exp_avg_sq, b2)
            torch._foreach_addcmul_(self.exp_avg_sq, grads, grads, value=1 - b2)
            denom = torch._foreach_sqrt(self.exp_avg_sq)
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, ADAM_EPS)
            torch._foreach_addcdiv_(params, self.exp_avg, denom, value=-spec.lr / bc1)
            return
        if self.step_count is None:
            self.step_count = torch.full((len(active),), float(self.t), dtype=torch.float64)
        if active is None:
            active = torch.ones(len(self.step_count), dtype=torch.bool, device=params[0].device)
        self.step_count += active.cpu().double()
        t = self.step_count.clamp(min=1).to(params[0].device)
        bc1 = (1 - b1 ** t).float()
        bc2_sqrt = (1 - b2 ** t).sqrt().float()
        for p, g, m, v in zip(params, grads, self.exp_avg, self.exp_avg_sq, strict=True):
            a = _per_model(active, p)
            m.copy_(torch.where(a, m.lerp(g, 1 - b1), m))
            v.copy_(torch.where(a, v * b2 + (1 - b2) * g * g, v))
            upd = m / (v.sqrt() / _per_model(bc2_sqrt, p) + ADAM_EPS)
            p.sub_(torch.where(a, upd * _per_model(spec.lr / bc1, p), 0.0))


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


def _activation(z: torch.Tensor, name: str) -> torch.Tensor:
    return torch.relu(z) if name == "relu" else torch.tanh(z) if name == "tanh" else \
        torch.sigmoid(z)


def _activation_grad(a: torch.Tensor, name: str) -> torch.Tensor:
    """d act / d z, from the activation's output ``a``."""
    if name == "relu":
        return (a > 0).to(a.dtype)
    return 1 - a * a if name == "tanh" else a * (1 - a)


def predict_stacked(X: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                    spec: TorchCandidate) -> torch.Tensor:
    """Shared ``X (n, d)`` -> ``(M, n)`` outputs of every model (eval mode: no dropout)."""
    h = X
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        h = torch.matmul(h, w) + b
        if i < len(weights) - 1:
            h = _activation(h, spec.activation)
    return h.squeeze(-1)


def forward_backward(X: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None,
                     weights: list[torch.Tensor], biases: list[torch.Tensor],
                     spec: TorchCandidate, gens: list[torch.Generator],
                     counts: list[int] | None) -> list[torch.Tensor]:
    """One training step's gradients, written out rather than taped (autograd's bookkeeping
    costs as much as the arithmetic at these sizes).

    ``X (M, B, d)``, targets ``y (M, B)``; the loss is the sum over models of each model's
    mean squared error over its live rows (``weight (M, B)``: 1/count on live rows, or None
    when all B are live). Returns the gradients of weights then biases; dropout masks are
    drawn for each model's ``counts`` live rows from its own generator.
    """
    last = len(weights) - 1
    inputs, outputs, masks = [], [], []
    h = X
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        inputs.append(h)
        h = torch.baddbmm(b, h, w)
        if i < last:
            h = _activation(h, spec.activation)
            outputs.append(h)
            mask = None
            if spec.dropout > 0:  # inverted dropout, as nn.Dropout
                mask = (_rand(tuple(h.shape), gens, h.device, counts) >= spec.dropout)
                mask = mask.to(h.dtype).div_(1.0 - spec.dropout)
                h = h * mask
            masks.append(mask)
    diff = h.squeeze(-1) - y  # (M, B)
    g = (diff.mul_(2.0 / y.shape[1]) if weight is None else diff.mul_(weight).mul_(2.0))
    g = g.unsqueeze(-1)  # d loss / d output, (M, B, 1)
    grad_w: list[torch.Tensor] = [None] * len(weights)  # type: ignore[list-item]
    grad_b: list[torch.Tensor] = [None] * len(weights)  # type: ignore[list-item]
    for i in range(last, -1, -1):
        # (g^T X)^T rather than X^T g: the same numbers, a faster memory layout.
        grad_w[i] = torch.bmm(g.transpose(1, 2), inputs[i]).transpose(1, 2)
        grad_b[i] = g.sum(1, keepdim=True)
        if i > 0:
            g = torch.bmm(g, weights[i].transpose(1, 2))
            if masks[i - 1] is not None:
                g = g * masks[i - 1]
            g = g * _activation_grad(outputs[i - 1], spec.activation)
    return grad_w + grad_b


def _batch_plans(sizes: list[int], batch: int, device: torch.device
                 ) -> list[tuple[int, int, torch.Tensor | None, torch.Tensor | None, list[int]]]:
    """Per batch position of an epoch: ``(lo, hi, weight, active, counts)``. A model with
    ``sizes[m]`` rows has ``counts[m]`` live rows in it; ``weight`` ``(M, B)`` is 1/count on
    live rows (None when every model's batch is full), ``active`` ``(M,) bool`` marks models
    with any row (None when all have). The same every epoch, so computed once."""
    width = max(sizes)
    plans = []
    for lo in range(0, width, batch):
        hi = min(lo + batch, width)
        counts = [max(0, min(hi, s) - lo) for s in sizes]
        if all(c == hi - lo for c in counts):
            plans.append((lo, hi, None, None, counts))
            continue
        live = torch.arange(hi - lo)[None, :] < torch.tensor(counts)[:, None]
        weight = (live / torch.tensor(counts).clamp(min=1)[:, None]).to(device)
        active = None if all(counts) else torch.tensor(counts, device=device) > 0
        plans.append((lo, hi, weight, active, counts))
    return plans


def train_stacked(X: torch.Tensor, y: torch.Tensor, train_mask: torch.Tensor,
                  valid_mask: torch.Tensor, spec: TorchCandidate, target: str,
                  seeds: list[int],
                  on_epoch: Callable[[int], None] | None = None,
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
    params = [t.to(device) for t in weights + biases]
    weights, biases = params[:len(weights)], params[len(weights):]
    opt = StackedOptimizer(params, spec)
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
    n_valid = valid_mask.sum(1).clamp(min=1)
    width = int(n_train.max())
    rows = torch.where(train_mask, torch.arange(n, device=device), n).sort(1).values[:, :width]
    rows = rows.clamp(max=n - 1)
    sizes = n_train.tolist()
    plans = _batch_plans(sizes, spec.batch_size, device)
    own_batches = torch.tensor([sum(c[m] > 0 for *_, c in plans) for m in range(M)],
                               device=device).clamp(min=1)

    def score() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            pred = log_price(predict_stacked(X, weights, biases, spec), target, y_mean, y_std)
            err = (pred - logy) ** 2
            tr = ((err * train_mask).sum(1) / n_train).sqrt()
            va = ((err * valid_mask).sum(1) / n_valid).sqrt()
        return tr, va, pred

    curves = {k: torch.zeros(M, spec.epochs, dtype=torch.float64)
              for k in ("train_log_rmse", "valid_log_rmse", "grad_norm")}
    diverged = None
    epoch = 0
    for epoch in range(spec.epochs):
        # Minibatches indexed from tensors already in memory: no DataLoader. Each model
        # draws its own permutation (the same order as training alone); a batch gathers its
        # rows for all models at once.
        order = torch.stack([
            torch.cat([torch.randperm(size, generator=g, device=device),
                       torch.arange(size, width, device=device)])  # padding stays last
            for g, size in zip(gens, sizes, strict=True)])
        idx = rows.gather(1, order)  # (M, width) each model's rows in this epoch's order
        y_epoch = y_fit.gather(1, idx)
        grad_sum = torch.zeros(M, device=device)
        for lo, hi, weight, active, counts in plans:
            X_batch = X.index_select(0, idx[:, lo:hi].reshape(-1)).view(M, hi - lo, d)
            # Forward and backward; the sum of each model's own mean loss keeps their
            # gradients apart.
            grads = forward_backward(X_batch, y_epoch[:, lo:hi], weight, weights, biases,
                                     spec, gens, None if weight is None else counts)
            norm = torch.linalg.vector_norm(torch.cat([g.reshape(M, -1) for g in grads], 1), dim=1)
            grad_sum += norm if active is None else norm * active
            if spec.clip_grad_norm is not None:
                scale = (spec.clip_grad_norm / (norm + 1e-6)).clamp(max=1.0)
                grads = [g * _per_model(scale, g) for g in grads]
            opt.step(grads, active)
        tr, va, _ = score()
        curves["train_log_rmse"][:, epoch] = tr.double().cpu()
        curves["valid_log_rmse"][:, epoch] = va.double().cpu()
        curves["grad_norm"][:, epoch] = (grad_sum / own_batches).double().cpu()
        if on_epoch is not None:
            on_epoch(epoch)
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
