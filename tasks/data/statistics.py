"""Column statistics as sums per group of rows, gathered in one pass.

A preprocessor learns, per numeric column, the count of present values, their mean,
standard deviation, skewness, min and max. All of them follow from a few sums: the count,
``Σd``, ``Σd²``, ``Σd³`` of ``d = x - c`` (``c`` a centre near the mean, so that the sums do
not cancel), and the min and max. Gathered per group of rows (the validation block of each
fold), a fold's training statistics are the sums over the other blocks of its repeat: every
fold of every repeat from one pass over the rows, in place of a pandas fit per fold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

CHUNK = 65_536  # rows per step: a chunk's float64 copy stays small beside the rows


@dataclass(frozen=True)
class Summary:
    """Per column, over some rows: present count, mean, standard deviation (ddof 1; 1.0
    for a constant column, so it standardizes to 0 rather than dividing by 0), skewness
    (pandas' adjusted G1; NaN under 3 values or with no spread), min and max (NaN when no
    value is present)."""

    names: tuple[str, ...]
    n: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    skew: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    def only(self, names: list[str]) -> Summary:
        """These statistics of the columns ``names`` (in that order)."""
        at = {name: j for j, name in enumerate(self.names)}
        pick = [at[name] for name in names]
        return Summary(tuple(names), *(getattr(self, key)[pick] for key in
                                       ("n", "mean", "std", "skew", "lo", "hi")))


def log_form(x: np.ndarray) -> np.ndarray:
    """The form ``log1p_skewed`` takes of a column (chosen only where no value is below 0;
    the clip keeps a negative value of rows to predict finite)."""
    return np.log1p(np.clip(x, 0.0, None))


@dataclass(frozen=True)
class Moments:
    """Per group of rows ``g`` and column ``j``: the count of present values, the sums of
    the first three powers of their distance from ``center[j]``, their min and max."""

    names: tuple[str, ...]
    center: np.ndarray  # (C,)
    n: np.ndarray  # (G, C)
    s1: np.ndarray
    s2: np.ndarray
    s3: np.ndarray
    lo: np.ndarray  # (G, C), NaN where the group has no value
    hi: np.ndarray

    @classmethod
    def gather(cls, columns: dict[str, np.ndarray], labels: np.ndarray, n_groups: int,
               form: Callable[[np.ndarray], np.ndarray] | None = None,
               center: np.ndarray | None = None, chunk: int = CHUNK,
               extremes: bool = True) -> Moments:
        """Sums of ``form(x)`` (NaN where missing) per group. ``labels (R, n)``: each row's
        group in each of ``R`` partitions (a repeat's folds), -1 for none; the groups of
        the partitions are numbered apart, ``0..n_groups-1`` in all. Without ``extremes``
        the min and max are left NaN (the caller knows them otherwise)."""
        names = tuple(columns)
        cols = list(columns.values())
        C, n = len(cols), labels.shape[1]
        form = form or (lambda x: x)
        sums = np.zeros((4, n_groups, C))
        lo = np.full((n_groups, C), np.nan)
        hi = np.full((n_groups, C), np.nan)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            X = form(np.column_stack([c[start:stop] for c in cols]) if C
                     else np.zeros((stop - start, 0)))
            if center is None:  # the first chunk's mean: near enough that sums keep digits
                seen = (~np.isnan(X)).sum(0)
                center = np.where(seen > 0, np.nansum(X, axis=0) / np.maximum(seen, 1), 0.0)
            present = ~np.isnan(X)
            D = np.where(present, X - center, 0.0)
            member = np.zeros((stop - start, n_groups))
            for part in labels[:, start:stop]:
                hit = part >= 0
                member[np.flatnonzero(hit), part[hit]] = 1.0
                if extremes:
                    _extremes(X[hit], part[hit], lo, hi)
            D2 = D * D
            sums[0] += member.T @ present
            sums[1] += member.T @ D
            sums[2] += member.T @ D2
            sums[3] += member.T @ (D2 * D)
        if center is None:
            center = np.zeros(C)
        return cls(names, center, *sums, lo, hi)

    def __add__(self, other: Moments) -> Moments:
        """The sums of two sets of rows, group by group (same columns and centres)."""
        if self.names != other.names or not np.array_equal(self.center, other.center):
            raise ValueError("moments of different columns or centres do not add")
        return Moments(self.names, self.center, self.n + other.n, self.s1 + other.s1,
                       self.s2 + other.s2, self.s3 + other.s3, np.fmin(self.lo, other.lo),
                       np.fmax(self.hi, other.hi))

    def over(self, take: np.ndarray) -> Summary:
        """The statistics of the rows of the groups ``take`` (``(G,) bool``) together."""
        with np.errstate(invalid="ignore", divide="ignore"):
            n = self.n[take].sum(0)
            s1, s2, s3 = self.s1[take].sum(0), self.s2[take].sum(0), self.s3[take].sum(0)
            lo = np.fmin.reduce(self.lo[take], axis=0, initial=np.nan)
            hi = np.fmax.reduce(self.hi[take], axis=0, initial=np.nan)
            mu = s1 / n  # the mean's distance from the centre
            m2 = np.maximum(s2 - s1 * mu, 0.0)  # Σ(x - mean)²
            m3 = s3 - 3 * mu * s2 + 2 * mu * mu * s1  # Σ(x - mean)³
            constant = lo == hi  # exactly: its mean is that value, and it has no spread
            mean = np.where(constant, lo, self.center + mu)
            std = np.sqrt(m2 / (n - 1))
            std = np.where(constant | ~(std > 0), 1.0, std)
            skew = np.where((n > 2) & (m2 > 0) & ~constant,
                            n * np.sqrt(n - 1) / (n - 2) * m3 / m2 ** 1.5, np.nan)
        return Summary(self.names, n, mean, std, skew, lo, hi)


def _extremes(X: np.ndarray, groups: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
    """Fold each group's column-wise min and max of ``X``'s rows into ``lo``, ``hi``
    (missing values ignored), with one sort of the rows by group."""
    if not len(groups):
        return
    if groups[0] == groups[-1] and (groups == groups[0]).all():  # one group: no sort
        g = groups[0]
        lo[g] = np.fmin(lo[g], np.fmin.reduce(X, axis=0))
        hi[g] = np.fmax(hi[g], np.fmax.reduce(X, axis=0))
        return
    # small keys: a radix sort, not a comparison sort of the rows
    order = np.argsort(groups.astype(np.int16 if groups.max() < 2**15 else np.int64),
                       kind="stable")
    g = groups[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    Xs = X[order]
    at = g[starts]
    lo[at] = np.fmin(lo[at], np.fmin.reduceat(Xs, starts, axis=0))
    hi[at] = np.fmax(hi[at], np.fmax.reduceat(Xs, starts, axis=0))


def category_counts(codes: np.ndarray, n_codes: int, labels: np.ndarray, n_groups: int
                    ) -> np.ndarray:
    """``(G, n_codes)``: how many rows of each group have each code (``0..n_codes-1``)."""
    out = np.zeros((n_groups, n_codes), dtype=np.int64)
    for part in labels:
        hit = part >= 0
        out += np.bincount(part[hit] * n_codes + codes[hit],
                           minlength=n_groups * n_codes).reshape(n_groups, n_codes)
    return out
