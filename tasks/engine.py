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
    diverged: dict[int, str]  # candidate (group) -> why it stopped, for those that diverged


class PerModel:
    """The hyperparameters each stacked model has its own of (several candidates that share
    layer sizes, activation, batch size, epochs and optimizer train as one stack): learning
    rate, weight decay, dropout, gradient clipping (and init, used once). ``uniform`` when all
    models share them, so the single-candidate path stays as fast as before."""

    def __init__(self, specs: list[TorchCandidate], device: torch.device):
        shared = {(s.hidden, s.activation, s.batch_size, s.epochs, s.optimizer) for s in specs}
        if len(shared) != 1:
            raise ValueError("stacked models must share hidden, activation, batch_size, "
                             "epochs and optimizer")
        self.specs = specs
        self.lr_list = [s.lr for s in specs]
        self.wd_list = [s.weight_decay for s in specs]
        self.dropout = [float(s.dropout) for s in specs]
        clip = [math.inf if s.clip_grad_norm is None else s.clip_grad_norm for s in specs]
        self.uniform = len({(s.lr, s.weight_decay, s.dropout, s.clip_grad_norm)
                            for s in specs}) == 1
        self.lr = torch.tensor(self.lr_list, device=device)
        self.wd = torch.tensor(self.wd_list, device=device)
        self.clip = torch.tensor(clip, device=device)
        self.any_clip = any(math.isfinite(c) for c in clip)


def _init_stack(specs: list[TorchCandidate], n_features: int, seeds: list[int]
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Stacked ``(M, in, out)`` weights and ``(M, 1, out)`` biases, model ``m`` initialized
    exactly as a lone ``Regressor`` of ``specs[m]`` seeded with ``seeds[m]`` would be."""
    per_model = [
        [layer for layer in Regressor(spec, n_features,
                                      generator=torch.Generator().manual_seed(s)).net
         if isinstance(layer, torch.nn.Linear)]
        for spec, s in zip(specs, seeds, strict=True)
    ]
    weights, biases = [], []
    for i in range(len(per_model[0])):
        weights.append(torch.stack([m[i].weight.detach().T for m in per_model]).contiguous())
        biases.append(torch.stack([m[i].bias.detach()[None, :] for m in per_model]).contiguous())
    return weights, biases


def _state_dicts(specs: list[TorchCandidate], n_features: int, weights: list[torch.Tensor],
                 biases: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Unstack into one ``Regressor`` state dict per model (what predict loads)."""
    out = []
    for m in range(weights[0].shape[0]):
        model = Regressor(specs[m], n_features)
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
    parameters whose first dimension indexes independent models, each with its own learning
    rate and weight decay.

    While every model has taken the same number of steps, the update is PyTorch's multi-tensor
    (``_foreach``) form with scalar bias corrections; once a model has skipped a step, each
    model's own step count is used."""

    def __init__(self, params: list[torch.Tensor], spec: TorchCandidate, hyper: PerModel):
        self.params, self.spec, self.hyper = params, spec, hyper
        self.t = 0  # the common step count, while all models have stepped together
        self.step_count: torch.Tensor | None = None  # (M,) float64 once they differ
        if not hyper.uniform:
            self.lr_views = [_per_model(hyper.lr, p) for p in params]
            self.wd_views = [_per_model(hyper.wd, p) for p in params]
        if spec.optimizer == "adam":
            self.exp_avg = [torch.zeros_like(p) for p in params]
            self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    def _decay(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.hyper.uniform:
            wd = self.hyper.wd_list[0]
            return torch._foreach_add(grads, self.params, alpha=wd) if wd else grads
        return torch._foreach_add(grads, torch._foreach_mul(self.params, self.wd_views))

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], active: torch.Tensor | None = None) -> None:
        """One update of every model with ``grads`` (one per parameter), or only of the
        ``active`` ``(M,) bool`` ones."""
        spec, params, hyper = self.spec, self.params, self.hyper
        grads = self._decay(grads)
        if spec.optimizer == "sgd":
            if active is not None:
                grads = [g * _per_model(active, p) for g, p in zip(grads, params,
                                                                        strict=True)]
            if hyper.uniform:
                torch._foreach_add_(params, grads, alpha=-hyper.lr_list[0])
            else:
                torch._foreach_sub_(params, torch._foreach_mul(grads, self.lr_views))
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
            if hyper.uniform:
                torch._foreach_addcdiv_(params, self.exp_avg, denom,
                                        value=-hyper.lr_list[0] / bc1)
            else:
                upd = torch._foreach_div(self.exp_avg, denom)
                torch._foreach_mul_(upd, self.lr_views)
                torch._foreach_add_(params, upd, alpha=-1.0 / bc1)
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
            p.sub_(torch.where(a, upd * _per_model(hyper.lr / bc1, p), 0.0))


def _rand(shape: tuple[int, ...], gens: list[torch.Generator], device: torch.device,
          counts: list[int] | None = None, draw: list[bool] | None = None) -> torch.Tensor:
    """``(M, B, ...)`` uniform draws, slice ``m`` from model ``m``'s own generator and only
    for its ``counts[m]`` live rows (the rest 0), so a model draws the same numbers whether
    it trains alone or stacked with others; models with ``draw[m]`` False draw nothing
    (zeros), as a model without dropout alone draws nothing."""
    if counts is None and draw is None:
        return torch.stack([torch.rand(shape[1:], generator=g, device=device) for g in gens])
    out = torch.zeros(shape, device=device)
    for m, g in enumerate(gens):
        c = shape[1] if counts is None else counts[m]
        if c and (draw is None or draw[m]):
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
    M, (n, d) = weights[0].shape[0], X.shape
    h = X
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        if i == 0:
            # The input is shared: one (n, d) x (d, M * out) product for all models, rather
            # than broadcasting X to (M, n, d).
            out = w.shape[-1]
            h = (X @ w.permute(1, 0, 2).reshape(d, M * out)).view(n, M, out).transpose(0, 1)
            h = h + b
        else:
            h = _layer(h, w, b)
        if i < len(weights) - 1:
            h = _activation(h, spec.activation)
    return h.squeeze(-1)


def _layer(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``h (M, B, in) @ w (M, in, out) + b (M, 1, out)``. A one-column layer (the output) is
    a batched matrix-vector product, which ``baddbmm`` runs several times slower than a
    multiply and a sum (measured: 76 vs 22 us at 5 x 64 x 330 on 2 CPU cores)."""
    if w.shape[-1] == 1:
        return (h * w.transpose(1, 2)).sum(-1, keepdim=True) + b
    return torch.baddbmm(b, h, w)


def forward_backward(X: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None,
                     weights: list[torch.Tensor], biases: list[torch.Tensor],
                     spec: TorchCandidate, gens: list[torch.Generator],
                     counts: list[int] | None, hyper: PerModel | None = None
                     ) -> list[torch.Tensor]:
    """One training step's gradients, written out rather than taped (autograd's bookkeeping
    costs as much as the arithmetic at these sizes).

    ``X (M, B, d)``, targets ``y (M, B)``; the loss is the sum over models of each model's
    mean squared error over its live rows (``weight (M, B)``: 1/count on live rows, or None
    when all B are live). Returns the gradients of weights then biases; dropout masks are
    drawn for each model's ``counts`` live rows from its own generator, at its own rate
    (``hyper``; ``spec.dropout`` for all when None).
    """
    last = len(weights) - 1
    rates = [spec.dropout] * len(gens) if hyper is None else hyper.dropout
    uniform = len(set(rates)) == 1
    if not uniform:
        p = torch.tensor(rates, device=X.device).view(-1, 1, 1)
    inputs, outputs, masks = [], [], []
    h = X
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        inputs.append(h)
        h = _layer(h, w, b)
        if i < last:
            h = _activation(h, spec.activation)
            outputs.append(h)
            mask = None
            if uniform and rates[0] > 0:  # inverted dropout, as nn.Dropout
                mask = (_rand(tuple(h.shape), gens, h.device, counts) >= rates[0])
                mask = mask.to(h.dtype).div_(1.0 - rates[0])
                h = h * mask
            elif not uniform:  # each model at its own rate; rate 0 draws nothing, keeps all
                draws = _rand(tuple(h.shape), gens, h.device, counts, [r > 0 for r in rates])
                mask = (draws >= p).to(h.dtype).div_(1.0 - p)
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
            # A one-column layer's input gradient is an outer product: broadcast, not bmm.
            w_t = weights[i].transpose(1, 2)
            g = g * w_t if g.shape[-1] == 1 else torch.bmm(g, w_t)
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
                  valid_mask: torch.Tensor, spec: TorchCandidate | list[TorchCandidate],
                  target: str, seeds: list[int],
                  on_epoch: Callable[[int], None] | None = None,
                  groups: list[int] | None = None,
                  ) -> EngineResult:
    """Train M models at once: of ``spec``, or model ``m`` of ``spec[m]`` (candidates that
    share layer sizes, activation, batch size, epochs and optimizer, each with its own
    learning rate, weight decay, dropout, clipping and init).

    ``X`` ``(n, d) float32`` and ``y`` ``(n,) float32`` prices (on the training device);
    ``train_mask``/``valid_mask`` ``(M, n) bool``: the rows model ``m`` trains and is scored on;
    ``seeds[m]`` seeds its initial weights (CPU, the same on every device), batch order and
    dropout. Each step's gradient norm is recorded (per-epoch mean), and clipped per model to
    ``clip_grad_norm`` when set. ``groups[m]`` says which candidate model ``m`` belongs to
    (all 0 by default): once a model's loss is not finite its candidate is diverged, with
    the reason, and its models stop updating; the others train on, and the run stops early
    only when every candidate has diverged.
    """
    device = X.device
    M, (n, d) = len(seeds), X.shape
    specs = list(spec) if isinstance(spec, list | tuple) else [spec] * M
    spec = specs[0]  # what they all share
    hyper = PerModel(specs, device)
    groups_t = torch.tensor(groups or [0] * M)
    alive = torch.ones(M, dtype=torch.bool)
    diverged: dict[int, str] = {}
    weights, biases = _init_stack(specs, d, seeds)
    params = [t.to(device) for t in weights + biases]
    weights, biases = params[:len(weights)], params[len(weights):]
    opt = StackedOptimizer(params, spec, hyper)
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
        all_alive = bool(alive.all())
        alive_dev = alive.to(device)
        for lo, hi, weight, active, counts in plans:
            X_batch = X.index_select(0, idx[:, lo:hi].reshape(-1)).view(M, hi - lo, d)
            # Forward and backward; the sum of each model's own mean loss keeps their
            # gradients apart.
            grads = forward_backward(X_batch, y_epoch[:, lo:hi], weight, weights, biases,
                                     spec, gens, None if weight is None else counts, hyper)
            norm = torch.linalg.vector_norm(torch.cat([g.reshape(M, -1) for g in grads], 1), dim=1)
            grad_sum += norm if active is None else norm * active
            if hyper.any_clip:
                scale = (hyper.clip / (norm + 1e-6)).clamp(max=1.0)
                grads = [g * _per_model(scale, g) for g in grads]
            if not all_alive:  # a diverged candidate's models update no more
                active = alive_dev if active is None else active & alive_dev
            opt.step(grads, active)
        tr, va, _ = score()
        curves["train_log_rmse"][:, epoch] = tr.double().cpu()
        curves["valid_log_rmse"][:, epoch] = va.double().cpu()
        curves["grad_norm"][:, epoch] = (grad_sum / own_batches).double().cpu()
        if on_epoch is not None:
            on_epoch(epoch)
        bad = alive & (~torch.isfinite(curves["grad_norm"][:, epoch]) | ~torch.isfinite(
            curves["train_log_rmse"][:, epoch]))
        for m in bad.nonzero().flatten().tolist():
            group = int(groups_t[m])
            if group not in diverged:
                first = int((groups_t == group).nonzero()[0])
                diverged[group] = (f"loss or gradient became non-finite at epoch {epoch + 1} "
                                   f"(model {m - first}); lower the learning rate or clip "
                                   "gradients")
            alive &= groups_t != group
        if not alive.any():
            break
    epochs_run = epoch + 1
    _, _, pred = score()
    return EngineResult(
        state_dicts=_state_dicts(specs, d, [w.detach().cpu() for w in weights],
                                 [b.detach().cpu() for b in biases]),
        y_mean=y_mean.squeeze(1).tolist(), y_std=y_std.squeeze(1).tolist(),
        pred_log_price=pred.double().cpu(),
        curves={k: v[:, :epochs_run] for k, v in curves.items()},
        epochs_run=epochs_run,
        diverged=diverged,
    )
