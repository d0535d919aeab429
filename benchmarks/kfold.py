"""K-fold training: the book's reference procedure vs this project's batched engine.

Both train the book's configuration on the same feature matrix (the book's preprocessing:
statistics over train+test, plain standardize/one-hot): linear model, Adam lr 5, weight decay
0, batch 64, 100 epochs, 5 contiguous folds, raw-price target, train and valid log RMSE
recorded every epoch. (a) is the book's code: a DataLoader over a TensorDataset, folds one
after another. (b) is ``tasks.train.cross_validate`` (all folds as one stacked model).

    python benchmarks/kfold.py [--device cpu|cuda] [--repeat N] [--data DIR]

Prints both times, the speedup and both mean valid log RMSEs, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils import data as tud

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.config import TrainConfig, candidate  # noqa: E402
from tasks.data.features import fit_preprocessor, read_csv  # noqa: E402
from tasks.train import cross_validate  # noqa: E402

EPOCHS, LR, WD, BATCH, K = 100, 5.0, 0.0, 64, 5


# ---- (a) the book's reference procedure (d2l, "Predicting House Prices on Kaggle") ----
def book_log_rmse(net, features, labels):
    loss = nn.MSELoss()
    clipped_preds = torch.clamp(net(features), 1, float("inf"))
    return torch.sqrt(loss(torch.log(clipped_preds), torch.log(labels))).item()


def book_train(net, train_features, train_labels, test_features, test_labels,
               num_epochs, learning_rate, weight_decay, batch_size):
    loss = nn.MSELoss()
    train_ls, test_ls = [], []
    dataset = tud.TensorDataset(train_features, train_labels)
    train_iter = tud.DataLoader(dataset, batch_size, shuffle=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate, weight_decay=weight_decay)
    for _epoch in range(num_epochs):
        for X, y in train_iter:
            optimizer.zero_grad()
            ls = loss(net(X), y)
            ls.backward()
            optimizer.step()
        with torch.no_grad():
            train_ls.append(book_log_rmse(net, train_features, train_labels))
            test_ls.append(book_log_rmse(net, test_features, test_labels))
    return train_ls, test_ls


def book_get_k_fold_data(k, i, X, y):
    fold_size = X.shape[0] // k
    X_train, y_train = None, None
    for j in range(k):
        idx = slice(j * fold_size, (j + 1) * fold_size)
        X_part, y_part = X[idx, :], y[idx]
        if j == i:
            X_valid, y_valid = X_part, y_part
        elif X_train is None:
            X_train, y_train = X_part, y_part
        else:
            X_train = torch.cat([X_train, X_part], 0)
            y_train = torch.cat([y_train, y_part], 0)
    return X_train, y_train, X_valid, y_valid


def book_k_fold(k, X_train, y_train, num_epochs, learning_rate, weight_decay, batch_size):
    valid_l_sum = 0.0
    for i in range(k):
        data = book_get_k_fold_data(k, i, X_train, y_train)
        net = nn.Sequential(nn.Linear(X_train.shape[1], 1)).to(X_train.device)
        _, valid_ls = book_train(net, *data, num_epochs, learning_rate, weight_decay,
                                 batch_size)
        valid_l_sum += valid_ls[-1]
    return valid_l_sum / k


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the fastest counts")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/kaggle_house"))
    args = parser.parse_args()
    device = torch.device(args.device)
    train = read_csv(Path(args.data) / "kaggle_house_pred_train.csv")
    test = read_csv(Path(args.data) / "kaggle_house_pred_test.csv")
    pre = fit_preprocessor(train, test)  # the book's recipe: plain, over train+test
    X, _ = pre.transform(train)
    y = train["SalePrice"].to_numpy(float)
    print(f"data: {X.shape[0]} rows x {X.shape[1]} features; device {device}; "
          f"torch {torch.__version__}; {platform.processor() or platform.machine()}", flush=True)

    X_t = torch.tensor(X, device=device)
    y_t = torch.tensor(y, dtype=torch.float32, device=device).reshape(-1, 1)
    ref_times, ref_scores = [], []
    for r in range(args.repeat):
        torch.manual_seed(r)
        _sync(device)
        t0 = time.perf_counter()
        ref_scores.append(book_k_fold(K, X_t, y_t, EPOCHS, LR, WD, BATCH))
        _sync(device)
        ref_times.append(time.perf_counter() - t0)
        print(f"reference run {r + 1}: {ref_times[-1]:.2f} s, mean valid log RMSE "
              f"{ref_scores[-1]:.4f}", flush=True)

    spec = candidate(name="book-linear", kind="linear", optimizer="adam",
                           lr=LR, weight_decay=WD, batch_size=BATCH, epochs=EPOCHS)
    eng_times, eng_scores = [], []
    for r in range(args.repeat):
        cfg = TrainConfig(repeats=1, n_splits=K, seed=r, fold_scheme="contiguous", target="raw",
                          device=args.device, exclude_outliers=False)
        _sync(device)
        t0 = time.perf_counter()
        cv = cross_validate(X, y, spec, cfg)
        _sync(device)
        eng_times.append(time.perf_counter() - t0)
        eng_scores.append(float(np.mean(cv.valid_log_rmse)))
        print(f"engine run {r + 1}: {eng_times[-1]:.2f} s, mean valid log RMSE "
              f"{eng_scores[-1]:.4f}", flush=True)

    ref_s, eng_s = min(ref_times), min(eng_times)
    ref_v, eng_v = float(np.mean(ref_scores)), float(np.mean(eng_scores))
    print(f"reference {ref_s:.2f} s, engine {eng_s:.2f} s, speedup {ref_s / eng_s:.1f}x; "
          f"mean valid log RMSE {ref_v:.4f} vs {eng_v:.4f} (|diff| {abs(ref_v - eng_v):.4f})")
    print(json.dumps({
        "reference_s": round(ref_s, 3), "engine_s": round(eng_s, 3),
        "speedup": round(ref_s / eng_s, 2), "reference_valid_log_rmse": round(ref_v, 5),
        "engine_valid_log_rmse": round(eng_v, 5), "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "repeat": args.repeat,
    }))


if __name__ == "__main__":
    main()
