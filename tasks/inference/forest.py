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

