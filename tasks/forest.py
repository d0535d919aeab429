"""The tree walk of the compiled plan, compiled by numba (imported only when a model has
trees). Every tree of every member in one pass over the rows: row-parallel, each row's
features in cache while it goes down every tree; 6x scikit-learn's own predictor for the
default boosting candidate on 2 cores (its predictor converts the rows to float64 and walks
one tree at a time over all rows)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# Compiled once per machine, then loaded from this cache (the package may not be writable).
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "houseprice-numba"))

from numba import njit, prange  # noqa: E402 - after the cache directory is set


@njit(parallel=True, cache=True, nogil=True)
def walk(X, feature, threshold, left, right, value, missing_left, roots, owner, out):
    """``out[owner[t], i] += `` the leaf value of tree ``t`` for row ``i``. A node goes left
    when ``x <= threshold`` (as scikit-learn compares, the float32 row against the float64
    threshold), a missing value where ``missing_left`` says; ``left < 0`` marks a leaf."""
    for i in prange(X.shape[0]):
        for t in range(roots.shape[0]):
            j = roots[t]
            while left[j] >= 0:
                x = X[i, feature[j]]
                go_left = x <= threshold[j] or (np.isnan(x) and missing_left[j])
                j = left[j] if go_left else right[j]
            out[owner[t], i] += value[j]


def forest_arrays(trees: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One member's trees (each ``feature, threshold, left, right, value, missing_left``,
    rooted at node 0) as one forest."""
    return join([{**t, "roots": np.zeros(1, np.int64)} for t in trees])


def join(forests: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Forests concatenated: children indexes and ``roots`` shifted by where each forest's
    nodes now start (a child of -1, a leaf's, stays -1)."""
    sizes = [len(f["left"]) for f in forests]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    out = {k: np.concatenate([f[k] for f in forests]) for k in forests[0]}
    for key in ("left", "right"):
        out[key] = np.concatenate([np.where(f[key] >= 0, f[key] + o, -1) for f, o in
                                   zip(forests, offsets, strict=True)]).astype(np.int32)
    out["roots"] = np.concatenate([f["roots"] + o for f, o in zip(forests, offsets,
                                                                  strict=True)])
    return out
