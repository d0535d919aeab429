"""Each fold's features as a map of one matrix, instead of one matrix per fold.

A fold's preprocessor differs from the all-rows one only in its statistics: its means and
standard deviations, which columns it takes log1p of, which categories it saw. Standardizing
is affine, so fold ``k``'s feature ``j`` is

    X_k[:, j] = scale[k, j] * B[:, src[k, j]] + shift[k, j] * B[:, pres[k, j]]

of one base matrix ``B (n, D) float32``: the all-rows features ``X (n, d)``, then a column of
ones, a presence column (1 present, 0 missing) per numeric feature with missing values, and
a column per numeric feature that some fold transforms the other way round (log1p or not)
than the all-rows preprocessor (that form's raw value, 0 where missing). A feature the fold
never saw (a category absent from its rows) has scale 0 and shift 0: a column of zeros, as
its own preprocessor gives.

So tensorize writes ``B`` once (``(d + a few) / d`` times the matrix, not ``K * R`` times),
a kind that fits fold by fold builds one fold's matrix at a time (``FoldMaps[k]``), the torch
engine builds each batch's rows, and linear kinds go further: with ``A_k`` the ``(D, d)``
matrix of the map, ``X_kᵀ X_k = A_kᵀ (BᵀB) A_k``, and ``BᵀB`` over a fold's training rows is
the all-rows Gram minus its validation rows' (``fold_grams``), one pass over the rows.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import threading
import weakref
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from tasks.data.features import Preprocessor, interaction_name
from tasks.data.statistics import Moments, category_counts, log_form

MAPS_FORMAT = "houseprice-fold-maps/1"


@dataclass(frozen=True)
class FoldMaps:
    """``(F, n, d)`` fold features of one base matrix; ``maps[k]`` is fold ``k``'s ``(n, d)``
    float32 matrix, built when asked (it reads like the stacked array it replaces)."""

    base: np.ndarray  # (n, D) float32, often memory-mapped
    src: np.ndarray  # (F, d) int64: the base column each feature scales
    scale: np.ndarray  # (F, d) float64
    pres: np.ndarray  # (F, d) int64: the base column its shift is multiplied by
    shift: np.ndarray  # (F, d) float64

    ndim = 3

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.src.shape[0], self.base.shape[0], self.src.shape[1])

    def __len__(self) -> int:
        return self.src.shape[0]

    def __getitem__(self, k: int) -> np.ndarray:
        return self.rows(k, slice(None))

    def rows(self, k: int, rows: Any) -> np.ndarray:
        """Fold ``k``'s features of ``rows`` (a slice or index array), ``(m, d) float32``:
        the all-rows features scaled, plus the few extra columns times their weights."""
        diag, extra = self.split
        B = self.base[rows]
        d = diag.shape[1]
        out = B[:, :d] * diag[k]
        out += B[:, d:] @ extra[k]
        return out

    @cached_property
    def split(self) -> tuple[np.ndarray, np.ndarray]:
        """The maps as ``(F, d)`` scales of the all-rows features (the top of every ``A_k``
        is diagonal) and ``(F, E, d)`` weights of the ``E`` extra columns, float32."""
        F, d = self.src.shape
        A = np.stack([self.matrix(k) for k in range(F)])
        return (np.ascontiguousarray(A[:, np.arange(d), np.arange(d)], dtype=np.float32),
                np.ascontiguousarray(A[:, d:, :], dtype=np.float32))

    @classmethod
    def identity(cls, base: np.ndarray, d: int) -> FoldMaps:
        """One fold whose features are the base's first ``d`` columns (the all-rows
        features) as they are: the all-rows matrix without a copy of it."""
        return cls(base=base, src=np.arange(d)[None, :], scale=np.ones((1, d)),
                   pres=np.full((1, d), d), shift=np.zeros((1, d)))

    def predict(self, k: int, rows: np.ndarray, w: np.ndarray, b: float,
                chunk: int = 16_384) -> np.ndarray:
        """``X_k[rows] @ w + b`` in float64, built a chunk of rows at a time."""
        return np.concatenate([self.rows(k, rows[lo:lo + chunk]).astype(np.float64) @ w + b
                               for lo in range(0, len(rows), chunk)] or [np.zeros(0)])

    def matrix(self, k: int) -> np.ndarray:
        """``A_k (D, d)``: fold ``k``'s features are ``B @ A_k``."""
        A = np.zeros((self.base.shape[1], self.src.shape[1]))
        cols = np.arange(self.src.shape[1])
        np.add.at(A, (self.src[k], cols), self.scale[k])
        np.add.at(A, (self.pres[k], cols), self.shift[k])
        return A

    def to_dict(self) -> dict[str, Any]:
        return {"format": MAPS_FORMAT, "src": self.src.tolist(), "scale": self.scale.tolist(),
                "pres": self.pres.tolist(), "shift": self.shift.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: np.ndarray) -> FoldMaps:
        if d.get("format") != MAPS_FORMAT:
            raise ValueError(f"not a {MAPS_FORMAT} record (format={d.get('format')!r})")
        src = np.asarray(d["src"], dtype=np.int64)
        pres = np.asarray(d["pres"], dtype=np.int64)
        scale = np.asarray(d["scale"], dtype=np.float64)
        shift = np.asarray(d["shift"], dtype=np.float64)
        D = base.shape[1]
        if not (src.shape == pres.shape == scale.shape == shift.shape and src.ndim == 2):
            raise ValueError("fold maps: src, scale, pres and shift differ in shape")
        d = src.shape[1]
        if src.size and (min(src.min(), pres.min()) < 0 or max(src.max(), pres.max()) >= D):
            raise ValueError(f"fold maps name a base column outside 0..{D - 1}")
        # a feature reads its own all-rows column or an extra one; a shift, an extra one
        own = src == np.arange(d)
        if not ((own | (src >= d)).all() and (pres >= d).all()):
            raise ValueError(f"fold maps read another feature's column (of the first {d})")
        return cls(base=base, src=src, scale=scale, pres=pres, shift=shift)


def base_columns(pre: Preprocessor, folds: list[Preprocessor],
                 numeric: dict[str, np.ndarray] | set[str]) -> tuple[list[str], list[str]]:
    """The extra base columns ``B`` needs after the all-rows features: the numeric features
    with missing values (a presence column each; ``numeric``: ``pre.numeric_columns`` of
    the rows, or the names of those with missing values), and those some fold transforms
    the other way round (log1p or not) than ``pre`` (their raw form each)."""
    missing = [c for c in pre.numeric_ if (c in numeric if isinstance(numeric, set)
                                           else np.isnan(numeric[c]).any())]
    flipped = [c for c in pre.numeric_
               if any(c in f.numeric_ and (c in f.log1p_) != (c in pre.log1p_) for f in folds)]
    return missing, flipped


def base_block(X: np.ndarray, pre: Preprocessor, numeric: dict[str, np.ndarray],
               missing: list[str], flipped: list[str]) -> np.ndarray:
    """Rows of ``B`` ``(m, D) float32`` for a block of rows: their features ``X``, ones, a
    presence column per ``missing`` feature, then each ``flipped`` feature in the other form
    (log1p where ``pre`` has none, raw where it has), 0 where missing. ``numeric``: the
    block's ``pre.numeric_columns``."""
    m, d = X.shape
    B = np.empty((m, d + 1 + len(missing) + len(flipped)), dtype=np.float32)
    B[:, :d] = X
    B[:, d] = 1.0
    for i, col in enumerate(missing):
        B[:, d + 1 + i] = ~np.isnan(numeric[col])
    for i, col in enumerate(flipped):
        values = numeric[col]
        other = values if col in pre.log1p_ else log_form(values)
        B[:, d + 1 + len(missing) + i] = np.nan_to_num(other, nan=0.0)
    return B


class BaseWriter:
    """``B (n, D) float32`` written to a ``.npy`` file a block of rows at a time, each block
    mapped only while it is written: the file's pages are not held by this process."""

    def __init__(self, path: Path, n: int, D: int):
        self.path, self.shape = path, (n, D)
        head = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, D))
        self.offset = head.offset
        del head

    def write(self, lo: int, block: np.ndarray) -> None:
        if len(block):
            out = np.memmap(self.path, dtype=np.float32, mode="r+", shape=block.shape,
                            offset=self.offset + lo * self.shape[1] * 4)
            out[:] = block
            out.flush()
            del out

    def open(self) -> np.ndarray:
        """The written base, memory-mapped read-only."""
        return open_base(self.path)


# One read-only mapping per base file while anything holds it (weak values: the last user
# gone, it is unmapped). Every mapping of a file counts the pages read through it in the
# process's resident memory again: train tasks side by side (one fitting, the next loading,
# the last refitting and writing) each with its own mapping of a 2.4 GB base counted it two
# or three times over (measured: three mappings of one file read through, three times its
# size in RSS).
_BASES: weakref.WeakValueDictionary[tuple, np.ndarray] = weakref.WeakValueDictionary()
_BASES_LOCK = threading.Lock()


def open_base(path: Path) -> np.ndarray:
    """The base ``.npy`` at ``path`` memory-mapped read-only, shared with every other user
    of the same file (path, inode, size and change time) in this process."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    with _BASES_LOCK:
        base = _BASES.get(key)
        if base is None:
            base = np.load(path, mmap_mode="r", allow_pickle=False)
            _BASES[key] = base
    return base


def write_base(path: Path, X: np.ndarray, pre: Preprocessor, numeric: dict[str, np.ndarray],
               missing: list[str], flipped: list[str]) -> np.ndarray:
    """``B`` of all rows (``base_block``), written to ``path`` (float32 ``.npy``)."""
    block = base_block(X, pre, numeric, missing, flipped)
    writer = BaseWriter(path, *block.shape)
    writer.write(0, block)
    return writer.open()


def fold_groups(folds: list[tuple[np.ndarray, np.ndarray]], n: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Each fold's validation rows as a group: ``labels (R, n)``, each row's fold in each
    repeat (-1 in none), and ``take (F, F + 1) bool``, the groups a fold trains on: the other
    folds of its repeat, and group ``F`` (rows every fold fits on). Refuses folds whose
    training rows are not exactly the other folds' rows of the repeat."""
    F = len(folds)
    reps = repeats_of(folds, n)
    labels = np.full((len(reps), n), -1, dtype=np.int64)
    take = np.zeros((F, F + 1), dtype=bool)
    take[:, F] = True
    for r, ks in enumerate(reps):
        for k in ks:
            labels[r, folds[k][1]] = k
        used = int((labels[r] >= 0).sum())
        for k in ks:
            tr, va = folds[k]
            if len(tr) + len(va) != used or (labels[r, tr] < 0).any() or (
                    labels[r, tr] == k).any():
                raise ValueError(f"fold {k} does not train on the other folds' rows; "
                                 "per-fold statistics need folds that cut the rows")
            take[k, ks] = True
            take[k, k] = False
    return labels, take


class Sums:
    """What ``Preprocessor.learn`` needs of a set of rows, per group of rows, added a block
    at a time (``tasks.data.statistics``): the moments of ``pre``'s numeric features (and
    of their log form, with ``log1p_skewed``), of its ``interactions`` slopes, and how many
    rows of each group hold each category. ``pre`` gives the columns and the categories
    the rows are encoded against (the all-rows preprocessor, or one with its categories and
    column order and no statistics yet)."""

    def __init__(self, pre: Preprocessor, n_groups: int):
        self.pre, self.G = pre, n_groups
        self.slope_names = [name for *_, name in pre.interaction_levels()]
        slopes = set(self.slope_names)
        self.raw_names = [c for c in pre.numeric_ if c not in slopes]
        self.raw: Moments | None = None
        self.logged: Moments | None = None
        self.slopes: Moments | None = None
        self.counts = {col: np.zeros((n_groups, len(cats) + 2), dtype=np.int64)
                       for col, cats in pre.categories_.items()}

    def add(self, numeric: dict[str, np.ndarray], codes: dict[str, np.ndarray],
            labels: np.ndarray) -> None:
        """A block of rows: ``numeric``, ``pre.numeric_columns`` of it; ``codes``, each
        categorical's codes (missing: one past the categories), as ``pre.encode`` gives
        them; ``labels (R, m)``, each row's group in each of R partitions (-1 for none)."""

        def gather(names: list[str], into: Moments | None, form=None,
                   extremes: tuple[np.ndarray, np.ndarray] | None = None) -> Moments:
            m = Moments.gather({c: numeric[c] for c in names}, labels, self.G, form,
                               None if into is None else into.center,
                               extremes=extremes is None)
            if extremes is not None:
                m = dataclasses.replace(m, lo=extremes[0], hi=extremes[1])
            return m if into is None else into + m

        raw = Moments.gather({c: numeric[c] for c in self.raw_names}, labels, self.G,
                             center=None if self.raw is None else self.raw.center)
        self.raw = raw if self.raw is None else self.raw + raw
        if self.pre.log1p_skewed:  # log_form is monotone: its extremes are the raw ones'
            self.logged = gather(self.raw_names, self.logged, log_form,
                                 (log_form(raw.lo), log_form(raw.hi)))
        self.slopes = gather(self.slope_names, self.slopes)
        for col, cats in self.pre.categories_.items():
            self.counts[col] += category_counts(codes[col], len(cats) + 2, labels, self.G)

    def fitted(self, take: np.ndarray) -> Preprocessor:
        """A preprocessor of ``pre``'s switches fitted on the rows of the groups ``take``
        (``(G,) bool``): what ``pre.unfitted().fit`` on those rows learns."""
        pre = self.pre
        if self.raw is None:  # no rows at all: sums of nothing
            self.add({c: np.zeros(0) for c in self.raw_names + self.slope_names},
                     {c: np.zeros(0, np.int64) for c in pre.categories_},
                     np.zeros((1, 0), np.int64))
        seen = {col: [cats[j] for j in np.flatnonzero(self.counts[col][take].sum(0)[:len(cats)])]
                for col, cats in pre.categories_.items()}
        known = {interaction_name(num, cat, level) for spec in pre.interactions
                 for num, cat in [spec.split("@")] for level in seen.get(cat, ())}
        known = [name for name in self.slope_names if name in known]
        return pre.unfitted().learn(
            pre.columns_, seen, self.raw.over(take),
            None if self.logged is None else self.logged.over(take),
            self.slopes.over(take).only(known))


def fold_preprocessors(pre: Preprocessor, numeric: dict[str, np.ndarray],
                       codes: dict[str, np.ndarray], folds: list[tuple[np.ndarray, np.ndarray]],
                       extra: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None
                       ) -> list[Preprocessor]:
    """Each fold's own preprocessor, as ``pre.unfitted().fit`` on the fold's training rows
    (and on ``extra``'s rows, which every fold fits on: the test rows with ``fit_on =
    "train+test"``) learns it, from statistics per validation block gathered in one pass
    (``Sums``): no copy of the rows per fold.

    ``numeric``: ``pre.numeric_columns`` of the rows; ``codes``: each categorical's codes
    among ``pre``'s categories (missing: one past them), as ``pre.encode`` gives them;
    ``extra``: the same two of the extra rows."""
    F = len(folds)
    labels, take = fold_groups(folds, _n_rows(numeric, codes))
    sums = Sums(pre, F + 1)
    sums.add(numeric, codes, labels)
    if extra is not None:
        sums.add(*extra, np.full((1, _n_rows(*extra)), F, dtype=np.int64))
    return [sums.fitted(take[k]) for k in range(F)]


def _n_rows(numeric: dict[str, np.ndarray], codes: dict[str, np.ndarray]) -> int:
    return len(next(iter({**numeric, **codes}.values()), ()))


def fold_maps(pre: Preprocessor, folds: list[Preprocessor], missing: list[str],
              flipped: list[str], base: np.ndarray) -> FoldMaps:
    """Each fold preprocessor's features as a map of ``base`` (see the module)."""
    names = pre.feature_names_
    d = len(names)
    ones = d
    present = {c: d + 1 + i for i, c in enumerate(missing)}
    other = {c: d + 1 + len(missing) + i for i, c in enumerate(flipped)}
    F = len(folds)
    src = np.tile(np.arange(d, dtype=np.int64), (F, 1))
    pres = np.full((F, d), ones, dtype=np.int64)
    scale = np.zeros((F, d))
    shift = np.zeros((F, d))
    for k, f in enumerate(folds):
        own = set(f.feature_names_)
        for j, name in enumerate(names):
            if name not in own:
                continue  # a category (or its slope) the fold never saw: zeros
            if name not in pre.numeric_:
                scale[k, j] = 1.0  # one-hot: the same 0/1 column
                continue
            m_g, s_g = pre.numeric_[name]
            m_f, s_f = f.numeric_[name]
            pres[k, j] = present.get(name, ones)
            if (name in f.log1p_) == (name in pre.log1p_):
                # (g(v) - m_f) / s_f = X * s_g / s_f + (m_g - m_f) / s_f where present
                scale[k, j] = s_g / s_f
                shift[k, j] = (m_g - m_f) / s_f
            else:
                src[k, j] = other[name]
                scale[k, j] = 1.0 / s_f
                shift[k, j] = -m_f / s_f
    return FoldMaps(base=base, src=src, scale=scale, pres=pres, shift=shift)


@dataclass(frozen=True)
class FoldGrams:
    """Per fold, the sums a penalized least-squares fit needs over its training rows, of
    the features ``X_k`` and the target ``t``: count, ``Σx``, ``XᵀX``, ``Xᵀt``, ``Σt``,
    ``Σt²`` (float64)."""

    n: np.ndarray  # (F,)
    sx: np.ndarray  # (F, d)
    xx: np.ndarray  # (F, d, d)
    xt: np.ndarray  # (F, d)
    st: np.ndarray  # (F,)
    tt: np.ndarray  # (F,)


class _SumsMemo:
    """``block_sums`` of a memory-mapped base, kept for the process: every linear kind (lasso,
    ridge, elastic net) of a run needs the same sums of the same file, and trains at the same
    time in its own thread; the first to ask computes them, the others wait for its result.
    Keyed by the file (path, size, change time), the target's and the blocks' bytes
    (digests), so that nothing else can share an entry; the last few entries are kept."""

    KEEP = 16

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: dict[tuple, concurrent.futures.Future] = {}

    @staticmethod
    def key(base: np.ndarray, t: np.ndarray, blocks: np.ndarray, n_blocks: int,
            chunk: int) -> tuple | None:
        path = getattr(base, "filename", None)
        if not path:
            return None  # an array in memory: no name to know it by
        st = os.stat(path)
        if not base.flags.c_contiguous or base.offset + base.nbytes != st.st_size:
            return None  # not the whole of its file (a slice of a map keeps its file name)
        digest = hashlib.blake2b(np.ascontiguousarray(t).view(np.uint8))
        digest.update(np.ascontiguousarray(blocks).view(np.uint8))
        return (str(path), st.st_size, st.st_mtime_ns, base.shape, str(base.dtype),
                str(t.dtype), n_blocks, chunk, digest.hexdigest())

    def get(self, key: tuple, compute) -> np.ndarray:
        with self.lock:
            future = self.entries.get(key)
            mine = future is None
            if mine:
                future = self.entries[key] = concurrent.futures.Future()
                while len(self.entries) > self.KEEP:
                    self.entries.pop(next(iter(self.entries)))
        if not mine:
            return future.result().copy()
        try:
            result = compute()
        except BaseException as exc:
            with self.lock:
                self.entries.pop(key, None)  # the next caller tries again
            future.set_exception(exc)
            raise
        future.set_result(result)
        return result.copy()


_MEMO = _SumsMemo()


def block_sums(base: np.ndarray, t: np.ndarray, blocks: np.ndarray, n_blocks: int,
               chunk: int = 16_384) -> np.ndarray:
    """``_block_sums``, computed once per process for a memory-mapped base (``_SumsMemo``)."""
    key = _MEMO.key(base, t, blocks, n_blocks, chunk)
    if key is None:
        return _block_sums(base, t, blocks, n_blocks, chunk)
    return _MEMO.get(key, lambda: _block_sums(base, t, blocks, n_blocks, chunk))


def _block_sums(base: np.ndarray, t: np.ndarray, blocks: np.ndarray, n_blocks: int,
                chunk: int = 16_384) -> np.ndarray:
    """``[B t]ᵀ[B t]`` over the rows of each block (``blocks[i]``, -1 for none),
    ``(n_blocks, D + 1, D + 1)`` float64, in one pass over ``base`` in chunks of rows (a
    memory-mapped base is read once, and never held whole as float64; a chunk of 16,384
    rows of 385 features is 50 MB, and two linear kinds sum at once)."""
    D = base.shape[1]
    out = np.zeros((n_blocks, D + 1, D + 1))
    for lo in range(0, base.shape[0], chunk):
        hi = min(lo + chunk, base.shape[0])
        g = blocks[lo:hi]
        Z = np.empty((hi - lo, D + 1))
        Z[:, :D] = base[lo:hi]
        Z[:, D] = t[lo:hi]
        for b in np.unique(g[g >= 0]):
            Zb = Z[g == b]
            out[b] += Zb.T @ Zb
    return out


def repeats_of(folds: list[tuple[np.ndarray, np.ndarray]], n: int) -> list[list[int]]:
    """The folds grouped by repeat: consecutive folds with disjoint validation rows."""
    out: list[list[int]] = []
    seen = np.ones(n, dtype=bool)  # the first fold starts a repeat
    for k, (_, va) in enumerate(folds):
        if seen[va].any():
            out.append([])
            seen[:] = False
        out[-1].append(k)
        seen[va] = True
    return out


def fold_grams(maps: FoldMaps, t: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]],
               excluded: np.ndarray) -> FoldGrams:
    """``FoldGrams`` of each fold's training rows (without the ``excluded`` ones) through its
    own map, by subtraction: per repeat, one pass over the base sums each validation block
    (its fitted rows only); a fold's training sums are the other blocks' sums."""
    n, D = maps.base.shape
    d = maps.src.shape[1]
    F = len(folds)
    out = {key: [] for key in ("n", "sx", "xx", "xt", "st", "tt")}
    per_fold: list[np.ndarray] = [np.empty(0)] * F
    for k, (tr, va) in enumerate(folds):
        if len(tr) + len(va) > n or np.isin(va[:64], tr).any():
            # not a cut (a refit: its rows both fit and score): summed over its rows
            blocks = np.full(n, -1, dtype=np.int64)
            blocks[tr] = 0
            blocks[excluded] = -1
            per_fold[k] = block_sums(maps.base, t, blocks, 1)[0]
    for ks in repeats_of(folds, n):
        if per_fold[ks[0]].size:
            continue
        blocks = np.full(n, -1, dtype=np.int64)
        for i, k in enumerate(ks):
            blocks[folds[k][1]] = i
        blocks[excluded] = -1
        sums = block_sums(maps.base, t, blocks, len(ks))
        total = sums.sum(0)
        for i, k in enumerate(ks):
            per_fold[k] = total - sums[i]
    for k in range(F):
        Z, A = per_fold[k], maps.matrix(k)
        out["n"].append(Z[d, d])  # the ones column: its square sums to the count
        out["sx"].append(A.T @ Z[:D, d])
        out["xx"].append(A.T @ Z[:D, :D] @ A)
        out["xt"].append(A.T @ Z[:D, D])
        out["st"].append(Z[d, D])
        out["tt"].append(Z[D, D])
    return FoldGrams(**{key: np.array(v) for key, v in out.items()})
