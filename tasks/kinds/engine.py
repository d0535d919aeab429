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
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tasks.data.foldmaps import FoldMaps
from tasks.kinds.nets import NetSpec, Regressor, epochs_within

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass
class EngineResult:
    """Per model ``m``: final weights as ``Regressor`` state dicts, target scaling, curves."""

    state_dicts: list[dict[str, torch.Tensor]]
    y_mean: list[float]  # target scaling fitted on model m's training rows
    y_std: list[float]
    pred_log_price: torch.Tensor  # (M, n_rows) float32 on the CPU, the rows scored, at the end
    curves: dict[str, torch.Tensor]  # name -> (M, epochs): train/valid log RMSE, grad norm
    epochs_run: int
    diverged: dict[int, str]  # candidate (group) -> why it stopped, for those that diverged
    # per model: the epochs its curves hold (fewer for a candidate stopped early; the last
    # one partial), and per candidate stopped early: at which step and why
    epochs_of: list[int] | None = None
    stopped: dict[int, dict] | None = None
    # whether scores and ``pred_log_price`` cover only each fold's validation rows and a
    # sample of its training rows (many rows; NaN elsewhere)
    sampled: bool = False


class PerModel:
    """The hyperparameters each stacked model has its own of (several candidates that share
    layer sizes, activation, batch size, epochs and optimizer train as one stack): learning
    rate, weight decay, dropout, gradient clipping (and init, used once). ``uniform`` when all
    models share them, so the single-candidate path stays as fast as before."""

    def __init__(self, specs: list[NetSpec], device: torch.device):
        shared = {(s.hidden, s.activation, s.batch_size, s.epochs, s.max_steps, s.optimizer,
                   s.lr_schedule, s.average_last) for s in specs}
        if len(shared) != 1:
            raise ValueError("stacked models must share hidden, activation, batch_size, "
                             "epochs, max_steps, optimizer, lr_schedule and average_last")
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


def _init_stack(specs: list[NetSpec], n_features: int, seeds: list[int]
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


def _state_dicts(specs: list[NetSpec], n_features: int, weights: list[torch.Tensor],
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


def _per_model(v: torch.Tensor, p: torch.Tensor, shape: tuple[int, ...] | None = None
               ) -> torch.Tensor:
    """``v`` ``(M,)`` shaped to broadcast over ``p``: one value per model. ``shape`` says
    where the model axes of ``p`` are (``(S, 1, C, 1)`` for the first layer's
    ``(S, d, C, out)`` weight); by default its first dimension indexes the models."""
    return v.view(shape if shape is not None else (-1,) + (1,) * (p.dim() - 1))


class StackedOptimizer:
    """Adam or SGD (PyTorch's update rules, L2 weight decay added to the gradient) over
    parameters whose first dimension indexes independent models, each with its own learning
    rate and weight decay.

    While every model has taken the same number of steps, the update is PyTorch's multi-tensor
    (``_foreach``) form with scalar bias corrections; once a model has skipped a step, each
    model's own step count is used."""

    def __init__(self, params: list[torch.Tensor], spec: NetSpec, hyper: PerModel,
                 shapes: list[tuple[int, ...] | None] | None = None):
        self.params, self.spec, self.hyper = params, spec, hyper
        self.shapes = shapes or [None] * len(params)
        self.t = 0  # the common step count, while all models have stepped together
        self.step_count: torch.Tensor | None = None  # (M,) float64 once they differ
        if not hyper.uniform:
            pairs = list(zip(params, self.shapes, strict=True))
            self.lr_views = [_per_model(hyper.lr, p, sh) for p, sh in pairs]
            self.wd_views = [_per_model(hyper.wd, p, sh) for p, sh in pairs]
        if spec.optimizer == "adam":
            self.exp_avg = [torch.zeros_like(p) for p in params]
            self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    def compact(self, params: list[torch.Tensor], hyper: PerModel,
                shapes: list[tuple[int, ...] | None],
                take: Callable[[int, torch.Tensor], torch.Tensor],
                take_models: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Keep only some of the models (candidates stopped early leave the stack):
        ``params``, ``hyper`` and ``shapes`` are the kept ones', ``take(i, t)`` the kept part
        of a tensor laid out as parameter ``i``, ``take_models`` of an ``(M,)`` one."""
        self.params, self.hyper, self.shapes = params, hyper, shapes
        if self.spec.optimizer == "adam":
            self.exp_avg = [take(i, t) for i, t in enumerate(self.exp_avg)]
            self.exp_avg_sq = [take(i, t) for i, t in enumerate(self.exp_avg_sq)]
        if self.step_count is not None:
            self.step_count = take_models(self.step_count)
        if not hyper.uniform:
            pairs = list(zip(params, shapes, strict=True))
            self.lr_views = [_per_model(hyper.lr, p, sh) for p, sh in pairs]
            self.wd_views = [_per_model(hyper.wd, p, sh) for p, sh in pairs]

    def _decay(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.hyper.uniform:
            wd = self.hyper.wd_list[0]
            return torch._foreach_add(grads, self.params, alpha=wd) if wd else grads
        return torch._foreach_add(grads, torch._foreach_mul(self.params, self.wd_views))

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], active: torch.Tensor | None = None,
             scale: float = 1.0) -> None:
        """One update of every model with ``grads`` (one per parameter), or only of the
        ``active`` ``(M,) bool`` ones; ``scale`` multiplies every learning rate (the
        schedule's factor at this step)."""
        spec, params, hyper = self.spec, self.params, self.hyper
        grads = self._decay(grads)
        if spec.optimizer == "sgd":
            if active is not None:
                grads = [g * _per_model(active, p, sh)
                         for g, p, sh in zip(grads, params, self.shapes, strict=True)]
            if hyper.uniform:
                torch._foreach_add_(params, grads, alpha=-hyper.lr_list[0] * scale)
            else:
                torch._foreach_add_(params, torch._foreach_mul(grads, self.lr_views),
                                    alpha=-scale)
            return
        b1, b2 = ADAM_BETAS
        if active is None and self.step_count is None:
            self.t += 1
            bc1, bc2_sqrt = 1 - b1 ** self.t, math.sqrt(1 - b2 ** self.t)
            if len(params) == 1 and hyper.uniform:  # one flat buffer: plain in-place ops
                (p,), (g,), (m,), (v,) = params, grads, self.exp_avg, self.exp_avg_sq
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p.addcdiv_(m, v.sqrt().div_(bc2_sqrt).add_(ADAM_EPS),
                           value=-hyper.lr_list[0] * scale / bc1)
                return
            torch._foreach_lerp_(self.exp_avg, grads, 1 - b1)
            torch._foreach_mul_(self.exp_avg_sq, b2)
            torch._foreach_addcmul_(self.exp_avg_sq, grads, grads, value=1 - b2)
            denom = torch._foreach_sqrt(self.exp_avg_sq)
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, ADAM_EPS)
            if hyper.uniform:
                torch._foreach_addcdiv_(params, self.exp_avg, denom,
                                        value=-hyper.lr_list[0] * scale / bc1)
            else:
                upd = torch._foreach_div(self.exp_avg, denom)
                torch._foreach_mul_(upd, self.lr_views)
                torch._foreach_add_(params, upd, alpha=-scale / bc1)
            return
        if self.step_count is None:
            self.step_count = torch.full((len(active),), float(self.t), dtype=torch.float64)
        if active is None:
            active = torch.ones(len(self.step_count), dtype=torch.bool, device=params[0].device)
        self.step_count += active.cpu().double()
        t = self.step_count.clamp(min=1).to(params[0].device)
        bc1 = (1 - b1 ** t).float()
        bc2_sqrt = (1 - b2 ** t).sqrt().float()
        for p, g, m, v, sh in zip(params, grads, self.exp_avg, self.exp_avg_sq, self.shapes,
                                  strict=True):
            a = _per_model(active, p, sh)
            m.copy_(torch.where(a, m.lerp(g, 1 - b1), m))
            v.copy_(torch.where(a, v * b2 + (1 - b2) * g * g, v))
            upd = m / (v.sqrt() / _per_model(bc2_sqrt, p, sh) + ADAM_EPS)
            p.sub_(torch.where(a, upd * _per_model(hyper.lr * scale / bc1, p, sh), 0.0))


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


@dataclass(frozen=True)
class Streams:
    """How ``M`` models are laid out as ``S`` streams x ``C`` models.

    Models that share a seed, rows and whether they draw dropout masks draw the same
    random numbers alone: the same batch order every epoch and the same dropout draws (each
    thresholded at its own rate). Such models form a *stream*: a batch's rows are gathered
    once per stream, ``X (S, B, d)``, and the first layer of all its models is one matrix
    product ``(B, d) x (d, C * out)``. Streams with fewer than ``C`` models are padded with
    copies of their last model (trained, then discarded)."""

    S: int
    C: int
    pos: torch.Tensor  # (S * C,) the model at each stacked position, stream-major
    first: torch.Tensor  # (M,) the stacked position of each model

    @staticmethod
    def of(seeds: list[int], draws: list[bool], train_mask: torch.Tensor,
           valid_mask: torch.Tensor, features: list[int] | None = None) -> Streams:
        keys: dict[tuple, list[int]] = {}
        rows, valid = train_mask.cpu().numpy(), valid_mask.cpu().numpy()
        features = features or [0] * len(seeds)
        for m, (seed, draw) in enumerate(zip(seeds, draws, strict=True)):
            key = (seed, draw, features[m], rows[m].tobytes(), valid[m].tobytes())
            keys.setdefault(key, []).append(m)
        members = list(keys.values())
        C = max(len(ms) for ms in members)
        pos = [ms + [ms[-1]] * (C - len(ms)) for ms in members]
        flat = [m for ms in pos for m in ms]
        first = [0] * len(seeds)
        for i, m in reversed(list(enumerate(flat))):
            first[m] = i
        return Streams(len(members), C, torch.tensor(flat), torch.tensor(first))


class TorchFolds:
    """``FoldMaps`` on the training device: the base matrix once, and fold ``f``'s features
    of the rows a batch or an evaluation needs, built when read (``K`` fold matrices are
    never held at once): the all-rows features times the fold's scales, plus the few extra
    columns (ones, presence, other forms) times their weights. ``folds[f]`` reads like
    that fold's ``(n, d)`` matrix."""

    def __init__(self, maps: FoldMaps, device: torch.device):
        diag, extra = maps.split
        base = np.asarray(maps.base, dtype=np.float32)
        with warnings.catch_warnings():  # a read-only map: only ever read here
            warnings.simplefilter("ignore", UserWarning)
            # on the CPU the memory-mapped file itself, not a copy of it
            self.base = torch.from_numpy(base).to(device)
        self.diag = torch.from_numpy(diag).to(device)  # (F, d)
        self.extra = torch.from_numpy(extra).to(device)  # (F, E, d)
        self.d = diag.shape[1]
        self.shape = maps.shape
        self.dtype, self.device = torch.float32, device

    def rows(self, f: int, rows: slice | torch.Tensor) -> torch.Tensor:
        B = self.base[rows]
        return torch.addmm(B[:, :self.d] * self.diag[f], B[:, self.d:], self.extra[f])

    def batch(self, feats: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx (S, B)`` of stream ``s`` through fold ``feats[s]``: ``(S, B, d)``."""
        S, n_rows = idx.shape
        B = self.base.index_select(0, idx.reshape(-1)).view(S, n_rows, -1)
        return torch.baddbmm(B[..., :self.d] * self.diag[feats].unsqueeze(1),
                             B[..., self.d:], self.extra[feats])

    def __getitem__(self, f: int) -> _FoldRows:
        return _FoldRows(self, f)


class _FoldRows:
    """Fold ``f``'s ``(n, d)`` matrix, built for the rows sliced."""

    def __init__(self, folds: TorchFolds, f: int):
        self.folds, self.f = folds, f
        self.shape = folds.shape[1:]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.folds.rows(self.f, rows)


def _first_layer(X: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each stream's batch ``X (S, B, d)`` times the first layer's ``w (S, d, C, out)`` plus
    ``b (S * C, 1, out)``: ``(S, B, C, out)``, one product per stream for all its models.
    A stream of one one-column model (the book's linear model) is a multiply and a sum: a
    batched matrix-vector product is several times slower on CPU at these sizes."""
    S, d, C, out = w.shape
    if C * out == 1:
        z = (X * w.view(S, 1, d)).sum(-1, keepdim=True)
    else:
        z = torch.bmm(X, w.view(S, d, C * out))
    return z.view(S, -1, C, out).add_(b.view(S, 1, C, out))


def _first_layer_shared(X: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``X (n, d)`` shared by every stream through the first layer: ``(S, n, C, out)``. Few
    columns per stream are one ``(n, d) x (d, S * C * out)`` product; many are one product
    per stream (no copy of the weights)."""
    S, d, C, out = w.shape
    if C * out < 64:
        z = (X @ w.permute(1, 0, 2, 3).reshape(d, S * C * out)).view(-1, S, C, out)
        return z.permute(1, 0, 2, 3) + b.view(S, 1, C, out)
    return torch.matmul(X, w.view(S, d, C * out)).view(S, -1, C, out).add_(
        b.view(S, 1, C, out))


def _next_layer(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``h (S, B, C, in)`` through a later layer, ``w (S * C, in, out)``, each model its own.
    A one-column layer (the output) is a multiply and a sum, not a matrix-vector product
    (measured several times faster at these sizes on CPU)."""
    S, _, C, n_in = h.shape
    out = w.shape[-1]
    if out == 1:
        return (h * w.view(S, 1, C, n_in)).sum(-1, keepdim=True) + b.view(S, 1, C, 1)
    z = torch.matmul(h.transpose(1, 2), w.view(S, C, n_in, out)).transpose(1, 2)
    return z + b.view(S, 1, C, out)


def _eval_by_features(X: torch.Tensor, weights: list[torch.Tensor],
                      biases: list[torch.Tensor], activation: str,
                      stream_features: list[int], start: int = 0,
                      stop: int | None = None) -> torch.Tensor:
    """``(S * C, stop - start)`` outputs of every model on rows ``start:stop`` of its own
    feature matrix ``X[f] (n, d)`` of ``X (F, n, d)`` (``stream_features[s]``: the matrix of
    stream ``s``'s models), one ``_eval_stacked`` per matrix."""
    S, _, C, _ = weights[0].shape
    stop = X.shape[1] if stop is None else stop
    if len(set(stream_features)) == 1:
        return _eval_stacked(X[stream_features[0]], weights, biases, activation, start, stop)
    out = torch.empty(S * C, stop - start, dtype=X.dtype, device=X.device)
    for f in sorted(set(stream_features)):
        streams = torch.tensor([s for s, g in enumerate(stream_features) if g == f],
                               device=X.device)
        models = (streams[:, None] * C + torch.arange(C, device=X.device)).reshape(-1)
        out[models] = _eval_stacked(
            X[f], [weights[0][streams]] + [w[models] for w in weights[1:]],
            [b[models] for b in biases], activation, start, stop)
    return out


def _eval_stacked(X: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                  activation: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows ``start:stop`` of a shared ``X (n, d)`` -> ``(S * C, stop - start)`` outputs of
    every model (eval mode: no dropout), in chunks of rows that keep the hidden activations
    under about 16 MB."""
    S, _, C, _ = weights[0].shape
    widest = max(w.shape[-1] for w in weights)
    # ... and the chunk's inputs under 64 MB: rows built from fold maps are new memory
    chunk = max(128, min((1 << 22) // (S * C * widest), (1 << 24) // X.shape[1]))
    # One (S * C, n) result, each chunk written into it (not the chunks, their
    # concatenation and its transpose: three copies of every prediction).
    stop = X.shape[0] if stop is None else stop
    out = torch.empty(S, C, stop - start, dtype=weights[0].dtype, device=weights[0].device)
    for lo in range(start, stop, chunk):
        hi = min(stop, lo + chunk)
        h = _first_layer_shared(X[lo:hi], weights[0], biases[0])
        for w, b in zip(weights[1:], biases[1:], strict=True):
            h = _next_layer(_activation(h, activation), w, b)
        out[:, :, lo - start:hi - start] = h.squeeze(-1).transpose(1, 2)  # (S, rows, C)
    return out.view(S * C, stop - start)


def _log_price_(output: torch.Tensor, target: str, y_mean: torch.Tensor,
                y_std: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """``log_price`` in place on ``output`` (the same values, no (M, n) copies), plus each
    model's wide part ``offset`` (a log price) before the clamp."""
    if target == "log":
        output.mul_(y_std).add_(y_mean)
        if offset is not None:
            output.add_(offset)
        return output.clamp_(min=0.0)
    return output.clamp_(min=1.0).log_()


def forward_backward(X: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None,
                     weights: list[torch.Tensor], biases: list[torch.Tensor],
                     activation: str, gens: list[torch.Generator], counts: list[int] | None,
                     rates: torch.Tensor | None, draws: list[bool]) -> list[torch.Tensor]:
    """One training step's gradients, written out rather than taped (autograd's bookkeeping
    costs as much as the arithmetic at these sizes).

    ``X (S, B, d)``: each stream's batch; targets ``y (S, B, C)``; the loss is the sum over
    models of each model's mean squared error over its live rows (``weight (S, B)``:
    1/count on live rows, or None when all B are live). Dropout masks are drawn per stream
    (``draws[s]``) for its ``counts`` live rows from its generator, and thresholded at each
    model's own rate (``rates (S, 1, C, 1)``; None: no dropout anywhere). Returns the
    gradients of weights then biases, in their layouts.
    """
    S, B, d = X.shape
    last = len(weights) - 1
    inputs, outputs, masks = [], [], []
    h = X
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        inputs.append(h)
        h = _first_layer(h, w, b) if i == 0 else _next_layer(h, w, b)
        if i < last:
            h = _activation(h, activation)
            outputs.append(h)
            mask = None
            if rates is not None:  # inverted dropout, as nn.Dropout
                u = _rand((S, B, h.shape[-1]), gens, h.device, counts, draws)
                mask = (u.unsqueeze(2) >= rates).to(h.dtype).div_(1.0 - rates)
                h = h * mask
            masks.append(mask)
    diff = h.squeeze(-1) - y  # (S, B, C)
    g = (diff.mul_(2.0 / B) if weight is None else diff.mul_(weight.unsqueeze(-1)).mul_(2.0))
    g = g.unsqueeze(-1)  # d loss / d output, (S, B, C, 1)
    grad_w: list[torch.Tensor] = [None] * len(weights)  # type: ignore[list-item]
    grad_b: list[torch.Tensor] = [None] * len(weights)  # type: ignore[list-item]
    for i in range(last, -1, -1):
        w = weights[i]
        out = g.shape[-1]
        grad_b[i] = g.sum(1).view(biases[i].shape)
        if i == 0:
            # (S, d, B) x (S, B, C * out): one product per stream for all its models.
            C = w.shape[2]
            if C * out == 1:  # (g^T X)^T: a faster memory layout than X^T g
                grad_w[i] = torch.bmm(g.view(S, 1, B), X).view(w.shape)
            else:
                grad_w[i] = torch.bmm(X.transpose(1, 2), g.reshape(S, B, C * out)).view(w.shape)
            break
        a = inputs[i]
        C, n_in = a.shape[2], a.shape[3]
        if out == 1:
            # A one-column layer's gradients are a weighted sum and an outer product.
            grad_w[i] = (g * a).sum(1).view(w.shape)
            g = g * w.view(S, 1, C, n_in)
        else:
            wv = w.view(S, C, n_in, out)
            grad_w[i] = torch.matmul(a.permute(0, 2, 3, 1), g.transpose(1, 2)).view(w.shape)
            g = torch.matmul(g.transpose(1, 2), wv.transpose(-1, -2)).transpose(1, 2)
        if masks[i - 1] is not None:
            g = g * masks[i - 1]
        g = g * _activation_grad(outputs[i - 1], activation)
    return grad_w + grad_b


def _grad_norms(grads: list[torch.Tensor], M: int) -> torch.Tensor:
    """``(M,)`` each model's gradient norm over all its parameters (the first layer's
    weight is ``(S, d, C, out)``: a model's entries are spread over it)."""
    sq = grads[0].square().sum((1, 3)).view(M)
    for g in grads[1:]:
        sq = sq + g.square().view(M, -1).sum(1)
    return sq.sqrt()


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


# An epoch's targets of every model are held when they fit in this (a batch's are then one
# slice); scores are computed this many rows at a time.
_TARGETS_BYTES = 1 << 28
_SCORE_ROWS = 1 << 14  # a block of base rows and its features: 50 MB at 385 features
# On more training rows than this per fold, scores (the curves, halving's ranks, the final
# predictions) are taken on each fold's validation rows and a seeded sample of this many of
# its training rows, not on every row through every fold's features: at 146,000 rows those
# full passes cost more than the training steps.
_SCORE_TRAIN = 1 << 14


def train_stacked(X: torch.Tensor, y: torch.Tensor, train_mask: torch.Tensor,
                  valid_mask: torch.Tensor, spec: NetSpec | list[NetSpec],
                  target: str, seeds: list[int],
                  on_epoch: Callable[[int, dict[int, float]], None] | None = None,
                  groups: list[int] | None = None,
                  features: list[int] | None = None,
                  wide: tuple[torch.Tensor, torch.Tensor] | None = None,
                  halving: int = 0,
                  ) -> EngineResult:
    """Train M models at once: of ``spec``, or model ``m`` of ``spec[m]`` (candidates that
    share layer sizes, activation, batch size, epochs and optimizer, each with its own
    learning rate, weight decay, dropout, clipping and init).

    ``X`` ``(n, d) float32`` and ``y`` ``(n,) float32`` prices (on the training device); or
    ``X (F, n, d)``, one feature matrix per fold (each from a preprocessor fitted on that
    fold's training rows), model ``m`` seeing ``X[features[m]]``;
    ``train_mask``/``valid_mask`` ``(M, n) bool``: the rows model ``m`` trains and is scored on;
    ``seeds[m]`` seeds its initial weights (CPU, the same on every device), batch order and
    dropout. Models that would draw the same random numbers alone share them (``Streams``).
    Each step's gradient norm is recorded (per-epoch mean), and clipped per model to
    ``clip_grad_norm`` when set. ``groups[m]`` says which candidate model ``m`` belongs to
    (all 0 by default): once a model's loss is not finite its candidate is diverged, with
    the reason, and its models stop updating; the others train on, and the run stops early
    only when every candidate has diverged.

    ``wide``: ``(w (M, d), b (M,))``, a fixed linear function of its features per model (a
    log price; zeros for a model without one), fitted beforehand: model ``m``'s network then
    fits what it leaves, ``log y - (x·w_m + b_m)``, standardized by that residual's own mean
    and spread, and predicts their sum (wide and deep, fitted in stages; log target only).

    Stopping early: a model whose spec has ``stop_share`` stops after that share of the
    steps; with ``halving`` rungs, at 2^-r, ..., 1/2 of the steps every candidate (group)
    still training is scored and the worse half stops (successive halving). A stopped
    candidate keeps its weights and predictions of that step (not a tail average), its
    curves end in that, partial, epoch, and its models leave the stack: the rest train on
    with fewer models per step.
    """
    device = X.device
    folds = X if isinstance(X, TorchFolds) else None  # fold matrices built batch by batch
    if folds is None:
        X = X if X.dim() == 3 else X.unsqueeze(0)
    M0, (F, n, d) = len(seeds), X.shape
    specs0 = list(spec) if isinstance(spec, list | tuple) else [spec] * M0
    groups0 = groups or [0] * M0
    features0 = features or [0] * M0
    if max(features0) >= F:
        raise ValueError(f"a model reads feature matrix {max(features0)} of {F}")
    draws0 = [s.draws_dropout for s in specs0]
    lay = Streams.of(seeds, draws0, train_mask, valid_mask, features0)
    S, C, pos = lay.S, lay.C, lay.pos.tolist()
    M = S * C
    # From here on every per-model list and tensor is in stacked (stream-major) order.
    specs = [specs0[i] for i in pos]
    seeds = [seeds[i] for i in pos]
    spec = specs[0]  # what they all share
    hyper = PerModel(specs, device)
    pos_dev = lay.pos.to(device)
    keep = lay.first  # the stacked model of each of the caller's models
    # The masks stay in the caller's order (model ``m`` of the stack is row ``pos[m]``): a
    # reordered copy would be another (M, n) pair; blocks of rows are reordered when read.
    groups_t = torch.tensor([groups0[i] for i in pos])
    alive = torch.ones(M, dtype=torch.bool)
    diverged: dict[int, str] = {}
    weights, biases = _init_stack(specs, d, seeds)
    # The first layer's weight is laid out (S, d, C, out) so a stream's models are one product.
    weights[0] = weights[0].view(S, C, d, -1).permute(0, 2, 1, 3).contiguous()
    params = [t.to(device) for t in weights + biases]
    shapes: list[tuple[int, ...] | None] = [(S, 1, C, 1)] + [None] * (len(params) - 1)
    flat = None
    if C == 1:
        # One model per stream: each model's parameters are one row of a flat (M, P)
        # buffer, so the optimizer, gradient norm and clipping are one op each per step
        # (at the book's sizes the time per step is the number of ops, not arithmetic).
        flat = torch.cat([p.reshape(M, -1) for p in params], 1)
        views, at = [], 0
        for p in params:
            size = p[0].numel()
            views.append(flat[:, at:at + size].view(p.shape))
            at += size
        params = views
    weights, biases = params[:len(weights)], params[len(weights):]
    opt = (StackedOptimizer([flat], spec, hyper) if flat is not None
           else StackedOptimizer(params, spec, hyper, shapes))
    stream_seeds = [seeds[s * C] for s in range(S)]
    # A stream's rows are gathered from its own feature matrix: rows of X (F * n, d) offset.
    stream_features = [features0[pos[s * C]] for s in range(S)]
    feats = torch.tensor(stream_features, device=device)
    if folds is None:
        X_rows = X.reshape(F * n, d)
        offset = feats.mul(n).view(S, 1)
    gens = [torch.Generator(device=device).manual_seed(sd) for sd in stream_seeds]
    draws = [draws0[pos[s * C]] for s in range(S)]
    rates = None
    if any(draws):
        rates = torch.tensor(hyper.dropout, device=device).view(S, 1, C, 1)

    # Per-model target scaling from its own training rows (log target standardized).
    logy = torch.log(y)
    wide_w = wide_b = None
    if wide is not None:
        if target != "log":
            raise ValueError("a wide part is a log price: it needs train.target = 'log'")
        # Laid out as a one-column first layer (S, d, C, 1), in stacked order.
        wide_w = wide[0].to(device, torch.float32)[lay.pos].view(S, C, d, 1).permute(
            0, 2, 1, 3).contiguous()
        wide_b = wide[1].to(device, torch.float32)[lay.pos].view(M, 1, 1)

    def wide_part(lo: int, hi: int) -> torch.Tensor:
        """``(M, hi - lo)``: each model's wide part of rows ``lo:hi`` of its features."""
        return _eval_by_features(X, [wide_w], [wide_b], spec.activation, stream_features,
                                 lo, hi)

    if wide is not None:
        # The residual's mean and spread on each model's training rows, a block of rows at
        # a time (float64 sums: no (M, n) residuals are held).
        total = torch.zeros(M, dtype=torch.float64, device=device)
        square = torch.zeros(M, dtype=torch.float64, device=device)
        for lo in range(0, n, _SCORE_ROWS):
            hi = min(n, lo + _SCORE_ROWS)
            r = (logy[lo:hi] - wide_part(lo, hi)).double() * train_mask[pos_dev, lo:hi]
            total += r.sum(1)
            square += r.square().sum(1)
        count = train_mask.sum(1)[pos_dev].double()
        y_mean = (total / count).float().view(M, 1)
        y_std = ((square - count * (total / count).square()) / (count - 1)).clamp(
            min=1e-12).sqrt().float().view(M, 1)
    elif target == "log":
        # A model at a time, each one's rows let go before the next's: no (M, n) memory.
        y_mean = torch.empty(M, 1, device=device)
        y_std = torch.empty(M, 1, device=device)
        for m in range(M):
            own = logy[train_mask[pos[m]]]
            y_mean[m] = own.mean()
            y_std[m] = (own - y_mean[m]).square_().sum() / (own.numel() - 1)
        y_std.sqrt_()
        del own
    else:
        y_mean, y_std = torch.zeros(M, 1, device=device), torch.ones(M, 1, device=device)

    def fit_target(rows: torch.Tensor, X_batch: torch.Tensor | None = None) -> torch.Tensor:
        """``(S, B, C)``: each stream's models' targets of its rows ``rows (S, B)`` as they
        fit them (log price, less the wide part of the rows' features ``X_batch`` when
        there is one, standardized by each model's own mean and spread); built when needed,
        never held as an (M, n) matrix."""
        B = rows.shape[1]
        t = (logy if target == "log" else y).index_select(0, rows.reshape(-1)).view(S, B, 1)
        if target != "log":
            return t.expand(S, B, C)
        if wide_w is not None:
            t = t - _first_layer(X_batch, wide_w, wide_b).squeeze(-1)
        return t.sub(y_mean.view(S, 1, C)).div_(y_std.view(S, 1, C))

    # Each stream's training rows, padded to the longest; padding sorts last in every shuffle.
    stream_rows = [pos[s * C] for s in range(S)]  # a stream's models share their rows
    n_train = train_mask.sum(1)[pos_dev]
    n_valid = valid_mask.sum(1)[pos_dev].clamp(min=1)
    sizes = [int(train_mask[r].sum()) for r in stream_rows]
    width = max(sizes)
    # Row numbers are held as int32 (half of int64's bytes per row and stream; a million
    # rows and 15 streams: 60 MB instead of 120, and no (S, n) sort): built a stream at a time.
    index = torch.int32 if F * n < 2**31 else torch.int64
    rows = torch.full((S, width), n - 1, dtype=index, device=device)
    for s in range(S):
        own = train_mask[stream_rows[s]].nonzero().squeeze(1)
        rows[s, :own.numel()] = own.to(index)
    plans = _batch_plans(sizes, spec.batch_size, device)
    epochs = epochs_within(spec, width)  # the step budget cuts epochs on many rows

    # Candidates stopped before the end (successive halving; ``stop_share``) leave the
    # stack there: the others' steps then cost less. ``ids``: each current model's position
    # in the original stack; ``where``: the current position of each original one (-1: gone).
    M_all = M
    ids = torch.arange(M)
    where = torch.arange(M)
    total_steps = epochs * len(plans)
    stops = _stop_steps(specs, groups_t, total_steps, halving)
    if stops.events and not bool((groups_t.view(S, C) == groups_t.view(S, C)[0]).all()):
        raise ValueError("stopping candidates early needs each one's models in one column of "
                         "the stack: the same seeds and dropout draws as the others")
    pred: torch.Tensor | None = None  # (M0, n) every model's final log prices, caller order
    finished: dict[int, tuple] = {}  # original position -> its final weights and scaling
    epochs_of = torch.zeros(M, dtype=torch.int64)
    stopped: dict[int, dict] = {}

    sampled = max(sizes) > _SCORE_TRAIN
    if sampled:  # per stream: the rows it is scored on, and which are training / validation
        score_rows, score_train, score_valid = [], [], []
        for s in range(S):
            own = rows[s, :sizes[s]].long().cpu()
            if len(own) > _SCORE_TRAIN:
                g = torch.Generator().manual_seed(stream_seeds[s])
                own = own[torch.randperm(len(own), generator=g)[:_SCORE_TRAIN]]
            valid_rows = valid_mask[stream_rows[s]].nonzero().squeeze(1).cpu()
            both = torch.cat([valid_rows, own]).unique()  # sorted: the base read in order
            in_sample = torch.zeros(n, dtype=torch.bool)
            in_sample[own] = True
            score_rows.append(both.to(device))
            score_train.append(in_sample[both].to(device, torch.float32))
            score_valid.append(valid_mask[stream_rows[s], both.to(device)].float())
        sample_train = torch.stack([t.sum() for t in score_train])
        sample_valid = torch.stack([v.sum() for v in score_valid]).clamp(min=1)

    def score_streams(out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``score`` on each stream's own scored rows (``sampled``)."""
        if out is not None:
            here = where[keep]
        tr, va = torch.zeros(M, device=device), torch.zeros(M, device=device)
        for s in range(S):
            sl = slice(s * C, (s + 1) * C)
            w = [weights[0][s:s + 1], *(x[sl] for x in weights[1:])]
            b = [x[sl] for x in biases]
            if out is not None:
                callers = ((here >= s * C) & (here < (s + 1) * C)).nonzero().squeeze(1)
                local = (here[callers] - s * C).to(device)
            for lo in range(0, len(score_rows[s]), _SCORE_ROWS):
                idx = score_rows[s][lo:lo + _SCORE_ROWS]
                f = stream_features[s]
                Xs = folds.rows(f, idx) if folds is not None else X[f].index_select(0, idx)
                pred = _eval_stacked(Xs, w, b, spec.activation)
                wide = (None if wide_w is None else
                        _eval_stacked(Xs, [wide_w[s:s + 1]], [wide_b[sl]], spec.activation))
                pred = _log_price_(pred, target, y_mean[sl], y_std[sl], wide)
                if out is not None and len(callers):
                    out[callers.unsqueeze(1), idx.cpu().unsqueeze(0)] = pred[local].cpu()
                err = pred.sub_(logy[idx]).square_()
                tr[sl] += (err * score_train[s][lo:lo + _SCORE_ROWS]).sum(1)
                va[sl] += (err * score_valid[s][lo:lo + _SCORE_ROWS]).sum(1)
        return ((tr / sample_train.repeat_interleave(C)).sqrt_(),
                (va / sample_valid.repeat_interleave(C)).sqrt_())

    def score(out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each model's train and valid log RMSE, its outputs built a block of rows at a
        time (no (M, n) outputs: with many models on many rows those were the engine's
        largest memory); ``out`` ``(M0, n)``, when given, gets each current model's log
        prices in the caller's order (on many rows only on the rows scored: NaN elsewhere)."""
        if sampled:
            with torch.no_grad():
                return score_streams(out)
        if out is not None:  # the caller's models still in the stack, and where they are
            here = where[keep]
            callers = (here >= 0).nonzero().squeeze(1)
            rows_of = here[callers].to(device)
        with torch.no_grad():
            tr, va = torch.zeros(M, device=device), torch.zeros(M, device=device)
            for lo in range(0, n, _SCORE_ROWS):
                hi = min(n, lo + _SCORE_ROWS)
                pred = _eval_by_features(X, weights, biases, spec.activation,
                                         stream_features, lo, hi)
                pred = _log_price_(pred, target, y_mean, y_std,
                                   None if wide_w is None else wide_part(lo, hi))
                if out is not None:
                    out[callers, lo:hi] = pred[rows_of].cpu()
                err = pred.sub_(logy[lo:hi]).square_()
                tr += (err * train_mask[pos_dev, lo:hi]).sum(1)
                va += (err * valid_mask[pos_dev, lo:hi]).sum(1)
        return (tr / n_train).sqrt_(), (va / n_valid).sqrt_()

    def keep_final(models: list[int]) -> None:
        """Put the current models ``models``' weights and target scaling aside, as final."""
        w0 = weights[0].permute(0, 2, 1, 3).reshape(M, d, -1)
        for j in models:
            finished[int(ids[j])] = (
                [w.detach()[j].cpu().clone() for w in [w0, *weights[1:]]],
                [b.detach()[j].cpu().clone() for b in biases],
                float(y_mean[j, 0]), float(y_std[j, 0]))

    curves = {k: torch.full((M, epochs), math.nan, dtype=torch.float64)
              for k in ("train_log_rmse", "valid_log_rmse", "grad_norm")}
    step = 0
    # The tail average of the weights (``average_last`` epochs): a copy, updated at the end
    # of each of those epochs, put in place of the last weights before the final score.
    # Epochs cut by the step budget keep the same share averaged (8 of 24 -> 1 of 2: none),
    # not every epoch from the first, barely trained, one.
    tail = min(epochs, spec.average_last if epochs == spec.epochs
               else round(spec.average_last * epochs / spec.epochs))
    state = [flat] if flat is not None else params
    averaged = [torch.zeros_like(p) for p in state] if tail else []
    n_averaged = 0
    epoch = 0
    done = False  # every candidate stopped early
    for epoch in range(epochs):
        # Minibatches indexed from tensors already in memory: no DataLoader. Each stream
        # draws its own permutation (the same order as each of its models alone); a batch
        # gathers its rows once per stream.
        # (S, width): each stream's rows in this epoch's order, built a stream at a time,
        # so that no int64 (S, n) index is ever held; and, when they fit in 256 MB,
        # (S, width, C) their targets, so that a batch's are one slice (else each batch
        # builds its own: many models on many rows would hold an (M, n) matrix).
        idx = torch.empty_like(rows)
        for s, (g, size) in enumerate(zip(gens, sizes, strict=True)):
            order = torch.randperm(size, generator=g, device=device)
            idx[s, :size] = rows[s].index_select(0, order)
            idx[s, size:] = rows[s, size:]  # padding stays last
        # (a wide part needs each batch's features: its targets are built per batch)
        y_epoch = (fit_target(idx) if M * width * 4 <= _TARGETS_BYTES and wide_w is None
                   else None)
        if folds is None:  # the same rows of the stream's own matrix
            idx_x = idx + offset.to(idx.dtype) if F > 1 else idx
        grad_sum = torch.zeros(M, device=device)
        batches = torch.zeros(M, device=device)  # each model's batches with rows so far
        all_alive = bool(alive.all())
        alive_dev = alive.to(device)
        for lo, hi, weight, active, counts in plans:
            X_batch = (folds.batch(feats, idx[:, lo:hi]) if folds is not None else
                       X_rows.index_select(0, idx_x[:, lo:hi].reshape(-1)).view(S, hi - lo, d))
            # Forward and backward; the sum of each model's own mean loss keeps their
            # gradients apart.
            grads = forward_backward(
                X_batch,
                fit_target(idx[:, lo:hi], X_batch) if y_epoch is None else y_epoch[:, lo:hi],
                weight, weights, biases,
                spec.activation, gens, None if weight is None else counts, rates, draws)
            if flat is not None:
                grads = [torch.cat([g.reshape(M, -1) for g in grads], 1)]
                norm = torch.linalg.vector_norm(grads[0], dim=1)
            else:
                norm = _grad_norms(grads, M)
            if active is not None:
                active = active.repeat_interleave(C)
            grad_sum += norm if active is None else norm * active
            batches += 1 if active is None else active
            if hyper.any_clip:
                scale = (hyper.clip / (norm + 1e-6)).clamp(max=1.0)
                grads = [g * _per_model(scale, g, sh) for g, sh in
                         zip(grads, [None] if flat is not None else shapes, strict=True)]
            if not all_alive:  # a diverged candidate's models update no more
                active = alive_dev if active is None else active & alive_dev
            scale = 1.0
            if spec.lr_schedule == "cosine":  # from lr at the first step to 0 after the last
                scale = 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            opt.step(grads, active, scale)
            step += 1
            if step not in stops.events:
                continue
            # Some candidates stop here: score every model (its predictions so far kept),
            # rank, and take the stopped ones out of the stack.
            if pred is None:
                pred = torch.full((len(keep), n), math.nan, dtype=torch.float32)
            tr, va = score(pred)
            leaving = stops.leaving(step, groups_t, alive, va, n_valid)
            gone = [j for j in range(M) if int(groups_t[j]) in leaving]
            for j in gone:
                at = int(ids[j])
                curves["train_log_rmse"][at, epoch] = float(tr[j])
                curves["valid_log_rmse"][at, epoch] = float(va[j])
                curves["grad_norm"][at, epoch] = float(grad_sum[j] / batches[j].clamp(min=1))
                epochs_of[at] = epoch + 1
            for group, why in leaving.items():
                stopped[group] = {**why, "step": step, "steps": total_steps,
                                  "share": step / total_steps, "epoch": epoch + 1}
            keep_final(gone)
            if len(gone) == M:
                done = True
                break
            # The kept columns of the stack (a candidate is one column: checked above).
            cols = torch.tensor([c for c in range(C) if int(groups_t[c]) not in leaving])
            C_new = len(cols)

            def take_models(t: torch.Tensor, C=C, cols=cols) -> torch.Tensor:
                """The kept models of a stream-major ``(S * C, ...)`` tensor."""
                return t.reshape(S, C, *t.shape[1:])[:, cols.to(t.device)].reshape(
                    S * len(cols), *t.shape[1:]).contiguous()

            def take_param(i: int, t: torch.Tensor, cols=cols) -> torch.Tensor:
                """The kept models of a tensor laid out as parameter ``i``."""
                if i == 0:  # the first layer's weight, (S, d, C, out)
                    return t[:, :, cols.to(t.device)].contiguous()
                return take_models(t)

            params = [take_param(i, p) for i, p in enumerate(params)]
            weights, biases = params[:len(weights)], params[len(weights):]
            averaged = [take_param(i, a) for i, a in enumerate(averaged)]
            state = params
            kept = [j for j in range(M) if int(groups_t[j]) not in leaving]
            specs = [specs[j] for j in kept]
            hyper = PerModel(specs, device)
            shapes = [(S, 1, C_new, 1)] + [None] * (len(params) - 1)
            opt.compact(params, hyper, shapes, take_param, take_models)
            if rates is not None:
                rates = rates[:, :, cols.to(device)].contiguous()
            if wide_w is not None:
                wide_w = wide_w[:, :, cols.to(device)].contiguous()
                wide_b = take_models(wide_b)
            if y_epoch is not None:
                y_epoch = y_epoch[:, :, cols.to(device)].contiguous()
            y_mean, y_std = take_models(y_mean), take_models(y_std)
            n_train, n_valid = take_models(n_train), take_models(n_valid)
            grad_sum, batches = take_models(grad_sum), take_models(batches)
            groups_t, alive, ids = take_models(groups_t), take_models(alive), take_models(ids)
            pos = [pos[j] for j in kept]
            pos_dev = take_models(pos_dev)
            where = torch.full((M_all,), -1, dtype=torch.int64)
            where[ids] = torch.arange(len(ids))
            C, M = C_new, S * C_new
            alive_dev = alive.to(device)
        if done:
            break
        if tail and epoch >= epochs - tail:  # a running mean: no list of snapshots
            n_averaged += 1
            with torch.no_grad():
                for a, p in zip(averaged, state, strict=True):
                    a.add_(p - a, alpha=1.0 / n_averaged)
        tr, va = score()
        curves["train_log_rmse"][ids, epoch] = tr.double().cpu()
        curves["valid_log_rmse"][ids, epoch] = va.double().cpu()
        curves["grad_norm"][ids, epoch] = (grad_sum / batches.clamp(min=1)).double().cpu()
        if on_epoch is not None:  # the epoch, and each group's mean valid log RMSE at it
            valid = curves["valid_log_rmse"][ids, epoch]
            on_epoch(epoch, {int(g): float(valid[groups_t == g].mean())
                             for g in torch.unique(groups_t)})
        bad = alive & (~torch.isfinite(curves["grad_norm"][ids, epoch]) | ~torch.isfinite(
            curves["train_log_rmse"][ids, epoch]))
        for m in bad.nonzero().flatten().tolist():
            group = int(groups_t[m])
            if group not in diverged:
                orig = pos[m]
                first = groups0.index(group)
                diverged[group] = (f"loss or gradient became non-finite at epoch {epoch + 1} "
                                   f"(model {orig - first}); lower the learning rate or clip "
                                   "gradients")
            alive &= groups_t != group
        if not alive.any():
            break
    epochs_run = epoch + 1
    del idx, y_epoch  # before the last evaluation
    if pred is None:
        pred = torch.full((len(keep), n), math.nan, dtype=torch.float32)
    if not done:
        if tail and n_averaged == tail:  # (stopped early, every candidate diverged: the last)
            with torch.no_grad():
                for a, p in zip(averaged, state, strict=True):
                    p.copy_(a)
        score(pred)
        keep_final(list(range(M)))
        epochs_of[ids] = epochs_run
    # Back to one model per row, in the caller's order.
    final = [finished[int(at)] for at in keep]
    flat_w = [torch.stack([f[0][i] for f in final]) for i in range(len(final[0][0]))]
    flat_b = [torch.stack([f[1][i] for f in final]) for i in range(len(final[0][1]))]
    return EngineResult(
        state_dicts=_state_dicts(specs0, d, flat_w, flat_b),
        y_mean=[f[2] for f in final], y_std=[f[3] for f in final],
        pred_log_price=pred,
        curves={k: v[keep, :epochs_run] for k, v in curves.items()},
        epochs_run=epochs_run,
        diverged=diverged,
        epochs_of=epochs_of[keep].tolist(),
        stopped=stopped,
        sampled=sampled,
    )


@dataclass
class _Stops:
    """When candidates (groups) leave a stack early: at a fixed step each (``stop_share``
    of the steps), and at successive halving's rungs, where the better half by pooled valid
    log RMSE (ties: the lower group) goes on."""

    events: set[int]
    fixed: dict[int, int]  # group -> the step it stops after
    rungs: dict[int, int]  # step -> rung number (1-based)
    n_rungs: int

    def leaving(self, step: int, groups: torch.Tensor, alive: torch.Tensor,
                valid: torch.Tensor, n_valid: torch.Tensor) -> dict[int, dict]:
        """The groups that stop after ``step`` (of the current models' ``groups``), each
        with why: its rung, rank and pooled valid log RMSE there (None: diverged)."""
        present = sorted({int(g) for g in groups.tolist()})
        out = {g: {"reason": "stop_share"} for g in present if self.fixed.get(g) == step}
        rung = self.rungs.get(step)
        if rung is None:
            return out
        racing = [g for g in present if g not in out]
        sse = (valid.double().cpu() ** 2) * n_valid.double().cpu()
        score = {}
        for g in racing:
            mine = groups == g
            ok = bool(alive[mine].all()) and bool(torch.isfinite(sse[mine]).all())
            score[g] = (float((sse[mine].sum() / n_valid[mine].double().cpu().sum()).sqrt())
                        if ok else math.inf)
        order = sorted(racing, key=lambda g: (score[g], g))
        goes_on = order[:-(-len(racing) // 2)]
        for rank, g in enumerate(order, 1):
            if g not in goes_on:
                out[g] = {"reason": "halving", "rung": rung, "rungs": self.n_rungs + 1,
                          "rank": rank, "of": len(racing),
                          "valid_log_rmse": score[g] if math.isfinite(score[g]) else None}
        return out


def _stop_steps(specs: list[NetSpec], groups: torch.Tensor, total_steps: int,
                halving: int) -> _Stops:
    """The steps at which candidates may leave: each one's ``stop_share`` of the
    ``total_steps``, and with ``halving`` rungs (fewer when the candidates run out first)
    the steps at 2^-r, ..., 1/4, 1/2 of them."""
    fixed: dict[int, int] = {}
    for m, s in enumerate(specs):
        share = getattr(s, "stop_share", None)
        if share is not None and round(total_steps * share) < total_steps:
            fixed[int(groups[m])] = max(1, round(total_steps * share))
    n_groups = len(set(groups.tolist()))
    n_rungs = min(halving, math.ceil(math.log2(n_groups))) if n_groups > 1 else 0
    rungs: dict[int, int] = {}
    for i in range(n_rungs):
        rungs.setdefault(max(1, round(total_steps * 2.0 ** (i - n_rungs))), i + 1)
    events = {s for s in (*fixed.values(), *rungs) if s < total_steps}
    return _Stops(events, fixed, rungs, n_rungs)
