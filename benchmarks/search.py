"""A search of N candidates x 5 folds: stacked (one engine run for the group) vs separate (one
engine run per candidate), on the book's configuration (linear model, Adam, batch 64, 100
epochs, contiguous folds, raw-price target), each candidate with its own learning rate and
weight decay drawn from a seeded grid.

    python benchmarks/search.py [--candidates 64] [--device cpu|cuda] [--epochs 100]
    python benchmarks/search.py --save-features f.npz   # then, where pandas is missing:
    python benchmarks/search.py --features f.npz --device cuda --candidates 512

Prints both times and the speedup, then one JSON line with ``candidates``, ``stacked_s``,
``separate_s``, ``speedup``, ``device``. ``--separate-sample K`` times K of the separate runs
and scales to N (separate runs of one configuration take the same time each).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.config import TrainConfig, candidate  # noqa: E402
from tasks.data.folds import fit_rows, make_folds  # noqa: E402
from tasks.kinds.torch_net import cross_validate_group  # noqa: E402


def features(data: str, cache: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The book's features of the training rows and their prices: from ``cache`` (an
    ``.npz`` written by ``--save-features``, for a machine without Prefect or pandas), or
    preprocessed from the CSVs in ``data``."""
    if cache and Path(cache).exists():
        with np.load(cache) as f:
            return f["X"], f["y"]
    from tasks.data.features import fit_preprocessor, read_csv

    train = read_csv(Path(data) / "kaggle_house_pred_train.csv")
    test = read_csv(Path(data) / "kaggle_house_pred_test.csv")
    X, _ = fit_preprocessor(train, test).transform(train)
    return X, train["SalePrice"].to_numpy(float)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--separate-sample", type=int, default=None, metavar="K",
                        help="time only K separate runs and scale (default: all N)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/kaggle_house"))
    parser.add_argument("--features", metavar="NPZ",
                        help="read X and y from this file (when it exists) instead of the CSVs")
    parser.add_argument("--save-features", metavar="NPZ", help="write X and y here and exit")
    args = parser.parse_args()
    X, y = features(args.data, args.features)
    if args.save_features:
        np.savez_compressed(args.save_features, X=X, y=y)
        return
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    specs = [candidate(name=f"c-{i}", kind="linear", optimizer="adam", batch_size=64,
                       epochs=args.epochs, lr=float(rng.choice([1.0, 2.0, 5.0, 10.0])),
                       weight_decay=float(rng.choice([0.0, 1e-4, 1e-3, 1e-2])))
             for i in range(args.candidates)]
    config = TrainConfig(repeats=1, n_splits=5, seed=0, fold_scheme="contiguous", target="raw",
                         device=args.device, exclude_outliers=False)
    folds = make_folds(len(X), 5, 0, "contiguous")
    fitted = fit_rows(folds, np.zeros(len(X), bool))
    print(f"{args.candidates} candidates x 5 folds, {X.shape[0]} rows x {X.shape[1]} "
          f"features, {args.epochs} epochs; device {device}", flush=True)

    # Warm-up (not timed): CUDA context, kernels and allocator caches.
    warm = [specs[0].model_copy(update={"epochs": 2})]
    cross_validate_group(warm * 2, X, y, config, folds, fitted, lambda f: None)
    cross_validate_group(warm, X, y, config, folds, fitted, lambda f: None)
    _sync(device)
    t0 = time.perf_counter()
    stacked = cross_validate_group(specs, X, y, config, folds, fitted, lambda f: None)
    _sync(device)
    stacked_s = time.perf_counter() - t0
    print(f"stacked: {stacked_s:.2f} s", flush=True)

    timed = specs[: args.separate_sample] if args.separate_sample else specs
    _sync(device)
    t0 = time.perf_counter()
    separate = [cross_validate_group([s], X, y, config, folds, fitted, lambda f: None)[0]
                for s in timed]
    _sync(device)
    separate_s = (time.perf_counter() - t0) * len(specs) / len(timed)
    worst = max(float(np.nanmax(np.abs(a.oof_log_price - b.oof_log_price)))
                for a, b in zip(stacked, separate, strict=False))
    print(f"separate: {separate_s:.2f} s ({len(timed)} timed); speedup "
          f"{separate_s / stacked_s:.1f}x; largest OOF difference {worst:.2e}", flush=True)
    print(json.dumps({
        "candidates": len(specs), "folds": 5, "epochs": args.epochs,
        "stacked_s": round(stacked_s, 3), "separate_s": round(separate_s, 3),
        "speedup": round(separate_s / stacked_s, 2), "separate_timed": len(timed),
        "max_oof_diff": worst, "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
