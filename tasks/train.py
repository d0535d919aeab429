"""Stage 4, train: K-fold cross-validation of one candidate model.

One Prefect task per candidate, so candidates run in parallel on the task runner and a failed
candidate reruns alone. The artifact holds the K fold models, per-epoch learning curves,
out-of-fold predictions, the split, and a PNG of the curves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from prefect import get_run_logger, task
from torch import nn

from tasks.artifacts import ArtifactRef, write_json
from tasks.config import CandidateConfig, TrainConfig
from tasks.models import Regressor, log_price, log_rmse, make_optimizer, resolve_device
from tasks.stage import build_stage, stage_task_options
from tasks.tensorize import read_matrix

STAGE = "train"


def make_folds(n_rows: int, n_splits: int, seed: int, scheme: str
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_splits`` (train_idx, valid_idx) pairs of int64 row indices.

    'shuffled': a seeded permutation cut into near-equal folds that cover every row.
    'contiguous': the book's ``get_k_fold_data`` (fold size ``n // k``, unshuffled; the last
    ``n % k`` rows are in no fold, exactly as there).
    """
    if n_splits < 2 or n_splits > n_rows:
        raise ValueError(f"cannot make {n_splits} folds from {n_rows} rows")
    if scheme == "shuffled":
        order = np.random.default_rng(seed).permutation(n_rows)
        valids = np.array_split(order, n_splits)
    elif scheme == "contiguous":
        size = n_rows // n_splits
        valids = [np.arange(j * size, (j + 1) * size) for j in range(n_splits)]
    else:
        raise ValueError(f"unknown fold scheme {scheme!r}")
    used = np.concatenate(valids)
    folds = []
    for j, valid in enumerate(valids):
        train = np.concatenate([v for i, v in enumerate(valids) if i != j])
        assert len(np.intersect1d(train, valid)) == 0 and len(train) + len(valid) == len(used)
        folds.append((np.sort(train).astype(np.int64), np.sort(valid).astype(np.int64)))
    return folds


@dataclass
class FoldResult:
    state_dict: dict[str, torch.Tensor]
    y_mean: float  # target scaling fitted on this fold's training rows
    y_std: float
    train_log_rmse: float
    valid_log_rmse: float
    curves: dict[str, list[float]]  # per epoch: train_log_rmse, valid_log_rmse
    valid_pred_log_price: np.ndarray  # (n_valid,) float64


def _target_stats(y: torch.Tensor, target: str) -> tuple[float, float]:
    """Standardize log prices with the fold's own training rows; the raw target is used
    unscaled, as in the book."""
    if target == "raw":
        return 0.0, 1.0
    logy = torch.log(y)
    return float(logy.mean()), float(logy.std())


def train_fold(X_train: torch.Tensor, y_train: torch.Tensor,
               X_valid: torch.Tensor, y_valid: torch.Tensor,
               spec: CandidateConfig, target: str, seed: int) -> FoldResult:
    """Train one model on one fold. ``X_*`` are ``(n, n_features) float32`` on the training
    device, ``y_*`` ``(n,) float32`` prices."""
    device = X_train.device
    init_gen = torch.Generator().manual_seed(seed)  # CPU: the same weights on every device
    gen = torch.Generator(device=device).manual_seed(seed)  # batches and dropout masks
    model = Regressor(spec, X_train.shape[1], generator=init_gen, dropout_generator=gen)
    model = model.to(device)
    optimizer = make_optimizer(spec, model.parameters())
    loss_fn = nn.MSELoss()
    y_mean, y_std = _target_stats(y_train, target)
    y_fit = (torch.log(y_train) - y_mean) / y_std if target == "log" else y_train

    def evaluate(X: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
        model.eval()
        with torch.no_grad():
            pred = log_price(model(X), target, y_mean, y_std)
        model.train()
        return log_rmse(pred, y), pred

    curves: dict[str, list[float]] = {"train_log_rmse": [], "valid_log_rmse": []}
    n = X_train.shape[0]
    model.train()
    for _epoch in range(spec.epochs):
        # Minibatches indexed from tensors already in memory: no DataLoader overhead.
        order = torch.randperm(n, generator=gen, device=device)
        for start in range(0, n, spec.batch_size):
            idx = order[start:start + spec.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(X_train[idx]), y_fit[idx])
            loss.backward()
            optimizer.step()
        curves["train_log_rmse"].append(evaluate(X_train, y_train)[0])
        curves["valid_log_rmse"].append(evaluate(X_valid, y_valid)[0])
    valid_rmse, valid_pred = evaluate(X_valid, y_valid)
    return FoldResult(
        state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        y_mean=y_mean, y_std=y_std,
        train_log_rmse=curves["train_log_rmse"][-1], valid_log_rmse=valid_rmse,
        curves=curves, valid_pred_log_price=valid_pred.double().cpu().numpy(),
    )


def cross_validate(X: np.ndarray, y: np.ndarray, spec: CandidateConfig, config: TrainConfig,
                   on_fold: Callable[[int, FoldResult], None] = lambda k, r: None,
                   ) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[FoldResult]]:
    """Train ``spec`` on each of the K folds of ``X (n, d) float32``, ``y (n,) prices``."""
    device = resolve_device(config.device)
    X_all = torch.tensor(X, dtype=torch.float32, device=device)
    y_all = torch.tensor(y, dtype=torch.float32, device=device)
    folds = make_folds(len(X), config.n_splits, config.seed, config.fold_scheme)
    results = []
    for k, (tr, va) in enumerate(folds):
        tr_t, va_t = torch.as_tensor(tr, device=device), torch.as_tensor(va, device=device)
        result = train_fold(X_all[tr_t], y_all[tr_t], X_all[va_t], y_all[va_t],
                            spec, config.target, seed=config.seed * 1000 + k)
        on_fold(k, result)
        results.append(result)
    return folds, results


def plot_curves(results: list[FoldResult], title: str, path: Path) -> None:
    """The book's learning-curve plot: train and valid log RMSE per epoch, one line a fold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for k, r in enumerate(results):
        epochs = np.arange(1, len(r.curves["train_log_rmse"]) + 1)
        ax.plot(epochs, r.curves["train_log_rmse"], color="C0", alpha=0.6,
                label="train" if k == 0 else None)
        ax.plot(epochs, r.curves["valid_log_rmse"], color="C1", alpha=0.6, linestyle="--",
                label="valid" if k == 0 else None)
    ax.set(xlabel="epoch", ylabel="log RMSE", yscale="log", title=title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train(data: ArtifactRef, candidate: CandidateConfig, config: TrainConfig, out_dir: Path,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Cross-validate ``candidate`` on the tensorized training rows; write the train artifact."""
    m = read_matrix(data.file("train.parquet"))

    def on_fold(k: int, r: FoldResult) -> None:
        log(f"{candidate.name}: fold {k + 1}/{config.n_splits} train log RMSE "
            f"{r.train_log_rmse:.4f}, valid log RMSE {r.valid_log_rmse:.4f}")

    folds, results = cross_validate(m.X, m.y, candidate, config, on_fold)
    valid = np.array([r.valid_log_rmse for r in results])
    torch.save(
        {"folds": [{"state_dict": r.state_dict, "y_mean": r.y_mean, "y_std": r.y_std}
                   for r in results]},
        out_dir / "models.pt",
    )
    oof = pd.concat([
        pd.DataFrame({"Id": m.ids[va], "fold": k, "pred_log_price": r.valid_pred_log_price})
        for k, ((_, va), r) in enumerate(zip(folds, results, strict=True))
    ]).sort_values("Id")
    oof.to_parquet(out_dir / "oof.parquet", index=False)
    write_json(out_dir / "folds.json", {"valid_ids": [m.ids[va].tolist() for _, va in folds]})
    metrics = {
        "candidate": candidate.name,
        "mean_valid_log_rmse": float(valid.mean()),
        "std_valid_log_rmse": float(valid.std(ddof=1)) if len(valid) > 1 else 0.0,
        "mean_train_log_rmse": float(np.mean([r.train_log_rmse for r in results])),
        "folds": [
            {"fold": k, "train_log_rmse": r.train_log_rmse, "valid_log_rmse": r.valid_log_rmse}
            for k, r in enumerate(results)
        ],
    }
    write_json(out_dir / "metrics.json", {**metrics, "curves": [r.curves for r in results]})
    plot_curves(results, f"{candidate.name}: {valid.mean():.4f} mean valid log RMSE",
                out_dir / "learning_curves.png")
    return metrics


@task(**stage_task_options(STAGE))
def train_task(data: ArtifactRef, candidate: CandidateConfig, config: TrainConfig,
               root: str) -> ArtifactRef:
    """K-fold train one candidate; log one line per finished fold."""
    logger = get_run_logger()
    return build_stage(STAGE, root, {"data": data, "candidate": candidate, "config": config},
                       lambda out: train(data, candidate, config, out, log=logger.info))
