"""K-fold splits: which rows each fold trains and validates on (numpy only, so that tools
such as ``benchmarks/search.py`` run where neither Prefect nor pandas is installed)."""

from __future__ import annotations

import numpy as np

from tasks.frozen import Frozen


def make_folds(n_rows: int, n_splits: int, seed: int, scheme: str, repeats: int = 1
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``repeats * n_splits`` (train_idx, valid_idx) pairs of int64 row indices: repeat
    ``r``'s folds are ``[r * n_splits, (r + 1) * n_splits)``, cut with seed ``seed + r``, so
    each repeat predicts every row once.

    'shuffled': a seeded permutation cut into near-equal folds that cover every row.
    'contiguous': the book's ``get_k_fold_data`` (fold size ``n // k``, unshuffled; the last
    ``n % k`` rows are in no fold, exactly as there).
    """
    if repeats > 1:
        if scheme != "shuffled":
            raise ValueError("repeated folds need fold_scheme 'shuffled' (contiguous folds "
                             "are the same every repeat)")
        return [f for r in range(repeats)
                for f in make_folds(n_rows, n_splits, seed + r, scheme)]
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
    used = np.zeros(n_rows, dtype=bool)
    for valid in valids:
        used[valid] = True
    folds = []
    for valid in valids:
        train = used.copy()
        train[valid] = False  # every other fold's rows: sorted, no sort needed
        folds.append((np.flatnonzero(train).astype(np.int64), np.sort(valid).astype(np.int64)))
    return folds


def cv_label(n_splits: int, repeats: int = 1) -> str:
    """How a person names the cross-validation: ``5-fold``, or ``3 x 5-fold`` with repeats."""
    return f"{repeats} x {n_splits}-fold" if repeats > 1 else f"{n_splits}-fold"


def fit_rows(folds: list[tuple[np.ndarray, np.ndarray]], excluded: np.ndarray
             ) -> list[np.ndarray]:
    """Each fold's training rows without the ``excluded`` ``(n,) bool`` rows (the same
    array where the fold excludes none: at a million rows a copy is 6 MB a fold)."""
    return [tr[~drop] if (drop := excluded[tr]).any() else tr for tr, _ in folds]


class FoldSpec(Frozen):
    """How the training rows are cut into folds: what train and, with ``per_fold``
    preprocessing, tensorize must agree on."""

    n_splits: int
    seed: int
    fold_scheme: str
    repeats: int = 1
