"""The book's preprocessing (standardize numerics, one-hot categoricals) and its switches:
fitted on rows, applied to any rows. Pure: no Prefect, so ``houseprice predict`` loads fast.

Numeric columns are standardized with mean and std (ddof=1, as pandas' ``std``), then missing
values become 0 (the mean). Categorical columns are one-hot encoded with a missing-value
indicator, categories sorted. Statistics and categories are fitted on the training rows by
default; ``fit_on="train+test"`` reproduces the book (which leaks test statistics).

Under pandas 3 text columns have dtype ``str``, not ``object``, so the book's
``dtypes != 'object'`` test would call every column numeric; we ask pandas whether a column
is numeric instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tasks.data.settings import DERIVED_SUMS, PreprocessConfig
from tasks.data.statistics import Moments, Summary, log_form

ID = "Id"
TARGET = "SalePrice"
FORMAT = "houseprice-preprocessor/2"


# The sale date moves forward by itself: new listings are sold after every training row, so
# being out of its training range is not drift (still counted per column in the report).
TIME_COLUMNS = frozenset({"YrSold", "MoSold"})
# No measure of a house comes near this; a value beyond it is a typing or unit error (and
# its square would swamp the statistics it is standardized with). Refused in training rows
# and in rows to predict, with ±inf.
MAX_ABS = 1e12
# Rows to predict: a numeric value farther outside the training range than this many
# times the range's width is refused (a unit or typing error: a year of -5000, a lot of
# 1e300 square feet), not extrapolated into a price nobody could use.
FAR_OUTSIDE = 10.0


class DataError(ValueError):
    """Input rows that cannot be used, with what is wrong and where."""


def read_csv(path: str | Path, nrows: int | None = None) -> pd.DataFrame:
    """Read a raw Kaggle-shaped CSV ('NA' is missing, as in the book); its first ``nrows``
    rows only, when given."""
    path = Path(path)
    try:
        return pd.read_csv(path, nrows=nrows)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty: expected a header and rows") from None


# Quality/condition scales of the Ames data (De Cock's documentation); NA = no such thing.
QUALITY_SCALE = {"Po": 1, "Fa": 2, "TA": 3, "Gd": 4, "Ex": 5}
ORDINAL_COLUMNS = ("ExterQual", "ExterCond", "BsmtQual", "BsmtCond", "HeatingQC", "KitchenQual",
                   "FireplaceQu", "GarageQual", "GarageCond", "PoolQC")
# Well-known derived features: name -> (weights of the source columns), missing counted as 0.


@dataclass
class TransformReport:
    """What ``transform`` saw that a person should know about (counts per column)."""

    unseen: dict[str, int] = field(default_factory=dict)  # categories unseen in training
    out_of_range: dict[str, int] = field(default_factory=dict)  # numerics outside train range
    missing: dict[str, int] = field(default_factory=dict)  # numerics imputed
    rows_drifted: int = 0  # rows with an out-of-range numeric (but the sale date) or unseen
    # category


@dataclass
class Encoded:
    """A chunk of rows, engineered and encoded (see ``Preprocessor.encode``)."""

    n: int
    numeric: dict[str, np.ndarray]  # column -> (n,) float64, NaN where missing
    # column -> (n,) int64 position among the categories; len(categories) = missing,
    # len(categories) + 1 = a value never seen in training
    codes: dict[str, np.ndarray]
    report: TransformReport

    def rows(self, lo: int, hi: int) -> Encoded:
        """Rows ``lo:hi`` (views, no copy; the report stays the whole one's)."""
        return Encoded(n=len(range(lo, min(hi, self.n))),
                       numeric={c: v[lo:hi] for c, v in self.numeric.items()},
                       codes={c: v[lo:hi] for c, v in self.codes.items()}, report=self.report)


def column_map(col: str, encoded_as: list[str], own: list[str], at: dict[str, int]
               ) -> np.ndarray:
    """For a categorical column encoded against ``encoded_as``: where each code's one-hot
    column sits among the features ``at`` (name -> index) of a preprocessor whose categories
    are ``own``; -1 for a category it never saw, and for an unseen value."""
    known = set(own)
    where = [at[f"{col}_{c}"] if c in known else -1 for c in encoded_as]
    return np.array([*where, at[f"{col}_nan"], -1], dtype=np.int64)


@dataclass
class Preprocessor:
    """Feature switches, then standardize numerics and one-hot categoricals; ``fit`` learns,
    ``transform`` applies.

    Fitted state (attributes ending in ``_``) round-trips through ``to_dict``/``from_dict``
    as plain JSON, so a saved model never needs pickle.
    """

    log1p_skewed: bool = False
    skew_threshold: float = 0.75
    derived: bool = False
    ordinal: bool = False
    as_category: tuple[str, ...] = ()
    interactions: tuple[str, ...] = ()  # "numeric@categorical": a slope per category
    numeric_: dict[str, tuple[float, float]] = field(default_factory=dict)  # col -> (mean, std)
    range_: dict[str, tuple[float, float]] = field(default_factory=dict)  # col -> (min, max)
    log1p_: list[str] = field(default_factory=list)  # numeric columns taken log1p first
    categories_: dict[str, list[str]] = field(default_factory=dict)
    columns_: list[str] = field(default_factory=list)  # raw feature columns, in order

    def _engineer(self, df: pd.DataFrame) -> pd.DataFrame:
        """Raw feature columns -> the columns that get encoded (a new frame; ``df`` is not
        changed): derived sums, ordinal scores, numeric codes as text categories."""
        out = df.drop(columns=[c for c in (ID, TARGET) if c in df.columns])
        extra: dict[str, Any] = {}
        if self.derived:
            for name, parts in DERIVED_SUMS.items():
                if all(c in out.columns for c in parts):
                    extra[name] = sum(w * np.nan_to_num(_numeric(df, c)) for c, w in parts.items())
        if self.ordinal:
            scale = list(QUALITY_SCALE)
            for col in ORDINAL_COLUMNS:
                if col in out.columns:
                    codes = category_codes(out[col], scale).astype(np.float64) + 1.0
                    codes[codes == 0] = np.nan  # an unknown grade: imputed like a missing one
                    codes[out[col].isna().to_numpy()] = 0.0  # NA: there is none
                    extra[f"{col}Score"] = codes
        for col in self.as_category:
            if col in out.columns:
                # Codes, not quantities: 60 and 60.0 (a float column) must be the same text.
                values = pd.Series(_codes(_numeric(df, col), col, df.get(ID)), index=out.index)
                extra[col] = values.round().astype("Int64").astype("string")
        if extra:
            out = out.drop(columns=[c for c in extra if c in out.columns])
            out = pd.concat([out, pd.DataFrame(extra, index=out.index)], axis=1)
        return out

    def fit(self, frames: Iterable[pd.DataFrame]) -> Preprocessor:
        """Learn statistics from the feature columns of ``frames`` (no Id, no SalePrice)."""
        raw = pd.concat(list(frames), ignore_index=True)
        features = self._engineer(raw)
        numeric: dict[str, np.ndarray] = {}
        self.categories_ = {}
        for col in features.columns:
            values = features[col]
            if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
                numeric[col] = values.to_numpy(dtype=np.float64, na_value=np.nan)
            else:
                self.categories_[col] = sorted(values.dropna().astype(str).unique().tolist())
        slopes: dict[str, np.ndarray] = {}
        if self.interactions:
            codes = {col: category_codes(features[col], cats)
                     for col, cats in self.categories_.items()}
            slopes = self._interact(numeric, codes, self.categories_)
        one, every = np.zeros((1, len(raw)), dtype=np.int64), np.ones(1, dtype=bool)
        return self.learn(
            [c for c in raw.columns if c not in (ID, TARGET)], self.categories_,
            Moments.gather(numeric, one, 1).over(every),
            Moments.gather(numeric, one, 1, log_form).over(every) if self.log1p_skewed
            else None,
            Moments.gather(slopes, one, 1).over(every))

    def learn(self, columns: list[str], categories: dict[str, list[str]], raw: Summary,
              logged: Summary | None, slopes: Summary) -> Preprocessor:
        """Set the fitted state from column statistics (``fit``'s of all the rows, or a
        fold's): ``raw`` of the numeric features, ``logged`` of their ``log_form`` (given
        with ``log1p_skewed``), ``slopes`` of the ``interactions`` columns."""
        self.columns_ = list(columns)
        self.categories_ = categories
        self.numeric_, self.range_, self.log1p_ = {}, {}, []
        for j, col in enumerate(raw.names):
            lo, hi = float(raw.lo[j]), float(raw.hi[j])
            self.range_[col] = (lo, hi)
            stats = raw
            # Right skew only: log1p compresses the long right tail, and would stretch a
            # left-skewed column's tail further (basement quality: skew -1.29 -> -3.61).
            if logged is not None and lo >= 0 and raw.skew[j] > self.skew_threshold:
                self.log1p_.append(col)
                stats = logged
            self.numeric_[col] = (float(stats.mean[j]), float(stats.std[j]))
        for j, name in enumerate(slopes.names):  # never log1p: a slope, 0 for other levels
            self.range_[name] = (float(slopes.lo[j]), float(slopes.hi[j]))
            self.numeric_[name] = (float(slopes.mean[j]), float(slopes.std[j]))
        return self

    def interaction_levels(self, categories: dict[str, list[str]] | None = None
                           ) -> Iterator[tuple[str, str, str, int, str]]:
        """``(spec, num, cat, code, name)`` for each ``interactions`` column: one per
        category of ``cat`` this preprocessor knows, ``code`` its position among
        ``categories[cat]`` (the codes rows were encoded with; default this one's)."""
        categories = categories or self.categories_
        for spec in self.interactions:
            num, cat = spec.split("@")
            at = {c: j for j, c in enumerate(categories.get(cat, ()))}
            for level in self.categories_.get(cat, ()):
                yield spec, num, cat, at[level], interaction_name(num, cat, level)

    def _interact(self, numeric: dict[str, np.ndarray], codes: dict[str, np.ndarray],
                  categories: dict[str, list[str]]) -> dict[str, np.ndarray]:
        """The ``interactions`` columns: for ``num@cat``, one column per category of ``cat``
        this preprocessor knows, ``num`` where the row has that category and 0 elsewhere
        (missing where ``num`` is; 0 for a missing or unseen category). With the category's
        one-hot column, a linear model gets an intercept *and* a slope per category: a price
        per square foot by neighbourhood. ``codes`` are positions among ``categories``."""
        for spec in self.interactions:
            num, cat = spec.split("@")
            for col, what, known in ((num, "numeric", numeric), (cat, "categorical",
                                                                self.categories_)):
                if col not in known:
                    raise DataError(f"preprocess.interactions {spec!r}: the rows have no "
                                    f"{what} feature {col!r}; fix the config")
        return {name: np.where(codes[cat] == code, numeric[num], 0.0)
                for _, num, cat, code, name in self.interaction_levels(categories)}

    def numeric_columns(self, enc: Encoded) -> dict[str, np.ndarray]:
        """Every numeric feature of encoded rows before its standardizing (float64, NaN
        where missing): the engineered numerics and the ``interactions`` slopes."""
        return {**enc.numeric, **self._interact(enc.numeric, enc.codes, self.categories_)}

    @property
    def feature_names_(self) -> list[str]:
        names = list(self.numeric_)
        for col, cats in self.categories_.items():
            names += [f"{col}_{c}" for c in cats] + [f"{col}_nan"]
        return names

    def unfitted(self) -> Preprocessor:
        """A new preprocessor with this one's switches, not fitted (for a fold's rows)."""
        return Preprocessor(log1p_skewed=self.log1p_skewed, skew_threshold=self.skew_threshold,
                            derived=self.derived, ordinal=self.ordinal,
                            as_category=self.as_category, interactions=self.interactions)

    def layout_index(self, names: list[str]) -> np.ndarray:
        """Where each of this preprocessor's features sits among ``names`` (the all-rows
        preprocessor's features: a fold's are a subset, as its rows hold a subset of the
        categories)."""
        at = {name: j for j, name in enumerate(names)}
        missing = [f for f in self.feature_names_ if f not in at]
        if missing:
            raise DataError(f"features {missing[:5]} are not in the model's feature list")
        return np.array([at[f] for f in self.feature_names_], dtype=np.int64)

    def transform_as(self, df: pd.DataFrame, names: list[str]) -> np.ndarray:
        """``transform``, laid out as the features ``names``: a category this preprocessor
        never saw is a column of zeros, as an unseen category is."""
        return self.features(self.encode(df), self.categories_, names)

    def missing_columns(self, df: pd.DataFrame) -> list[str]:
        return [c for c in self.columns_ if c not in df.columns]

    def transform(self, df: pd.DataFrame) -> tuple[np.ndarray, TransformReport]:
        """Features of ``df`` as ``(n_rows, n_features) float32``, and a report of unseen
        categories (encoded as all zeros), out-of-range and imputed numerics."""
        enc = self.encode(df)
        return self.features(enc, self.categories_, self.feature_names_), enc.report

    def encode(self, df: pd.DataFrame) -> Encoded:
        """Raw rows -> their engineered numerics (float64, NaN where missing) and each
        categorical's codes among this preprocessor's categories, with the drift report: the
        step every preprocessor fitted with the same switches shares (a fold's categories
        are a subset of the all-rows ones, so one encoding serves every fold)."""
        missing = self.missing_columns(df)
        if missing:
            raise DataError(f"input lacks column(s) {', '.join(missing)}")
        features = self._engineer(df)
        numeric = {col: _numeric(features, col, ids=df.get(ID)) for col in self.numeric_
                   if col in features.columns}
        codes, present = {}, {}
        for col, cats in self.categories_.items():
            present[col] = features[col].notna().to_numpy()
            codes[col] = category_codes(features[col], cats)
        return self._encoded(len(df), numeric, codes, present)

    def encode_table(self, table: pa.Table) -> Encoded:
        """``encode`` straight from Arrow (what batch predict reads), no pandas: the same
        engineered columns, codes and report, column by column in NumPy. Text columns are
        expected with missing values as nulls (``tasks.inference.batch.normalize``)."""
        names = set(table.column_names)
        missing = [c for c in self.columns_ if c not in names]
        if missing:
            raise DataError(f"input lacks column(s) {', '.join(missing)}")
        ids = table.column(ID) if ID in names else None
        raw: dict[str, np.ndarray] = {}

        def num(col: str) -> np.ndarray:
            if col not in raw:
                raw[col] = _arrow_numeric(table.column(col), col, ids)
            return raw[col]

        n = table.num_rows
        engineered: dict[str, np.ndarray] = {}  # numeric features made from raw columns
        as_text: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # col -> (codes, present)
        if self.derived:
            for name, parts in DERIVED_SUMS.items():
                if all(c in names for c in parts):
                    engineered[name] = sum(w * np.nan_to_num(num(c)) for c, w in parts.items())
        if self.ordinal:
            scale = list(QUALITY_SCALE)
            for col in ORDINAL_COLUMNS:
                if col in names:
                    code, there = _arrow_codes(table.column(col), scale)
                    score = code.astype(np.float64) + 1.0
                    score[score == 0] = np.nan  # an unknown grade: imputed like a missing one
                    score[~there] = 0.0  # NA: there is none
                    engineered[f"{col}Score"] = score
        for col in self.as_category:
            if col in names and col in self.categories_:
                # Codes, not quantities: 60 and 60.0 are the text "60", as in ``_engineer``.
                values = _codes(num(col), col, None if ids is None else ids.to_pandas())
                there = ~np.isnan(values)
                text = pc.cast(pa.array(np.round(values[there]).astype(np.int64)), pa.string())
                code = np.full(n, -1, dtype=np.int64)
                code[there] = np.asarray(pc.index_in(text, value_set=pa.array(
                    self.categories_[col], pa.string())).fill_null(-1), dtype=np.int64)
                as_text[col] = (code, there)
        numeric = {col: engineered[col] if col in engineered else num(col)
                   for col in self.numeric_ if col in engineered or col in names}
        codes, present = {}, {}
        for col, cats in self.categories_.items():
            codes[col], present[col] = (as_text[col] if col in as_text
                                        else _arrow_codes(table.column(col), cats))
        return self._encoded(n, numeric, codes, present)

    def implausible(self, table: pa.Table) -> tuple[str, int, float] | None:
        """The first value of rows to predict that no house has: (column, row, value) of a
        raw numeric that is ±inf, beyond ±MAX_ABS, or more than FAR_OUTSIDE widths of its
        training range outside it; None when there is none. Checked before predicting, so
        no path (plan or checkpoint) extrapolates it into a price."""
        ids = table.column(ID) if ID in table.column_names else None
        for col in self.columns_:
            if col not in self.range_ or col not in table.column_names:
                continue
            values = _arrow_numeric(table.column(col), col, ids)
            lo, hi = self.range_[col]
            span = hi - lo if hi > lo else 1.0
            with np.errstate(invalid="ignore"):
                far = (np.abs(values) > MAX_ABS) | (values < lo - FAR_OUTSIDE * span) | (
                    values > hi + FAR_OUTSIDE * span)
            if far.any():
                pos = int(np.flatnonzero(far)[0])
                return col, pos, float(values[pos])
        return None

    def _encoded(self, n: int, numeric: dict[str, np.ndarray], codes: dict[str, np.ndarray],
                 present: dict[str, np.ndarray]) -> Encoded:
        """The drift report of encoded rows, and missing/unseen categories as their codes."""
        report = TransformReport()
        drifted = np.zeros(n, dtype=bool)  # rows with any out-of-range or unseen value
        for col in self.numeric_:
            if col not in numeric:
                continue  # an interaction column: made by ``features`` from reported ones
            values = numeric[col]
            lo, hi = self.range_.get(col, (-np.inf, np.inf))
            outside = (values < lo) | (values > hi)
            if col not in TIME_COLUMNS:
                drifted |= outside
            if n_out := int(outside.sum()):
                report.out_of_range[col] = n_out
            if n_nan := int(np.isnan(values).sum()):
                report.missing[col] = n_nan
        for col, cats in self.categories_.items():
            code, there = codes[col], present[col]
            unseen = there & (code < 0)
            if n_unseen := int(unseen.sum()):
                report.unseen[col] = n_unseen
                drifted |= unseen
            code[~there] = len(cats)  # the missing-value indicator
            code[unseen] = len(cats) + 1  # no column: all zeros
        report.rows_drifted = int(drifted.sum())
        return Encoded(n=n, numeric=numeric, codes=codes, report=report)

    def numeric_feature(self, col: str, values: np.ndarray) -> np.ndarray:
        """One numeric column's feature: log1p (if chosen), standardized, missing -> 0."""
        mean, std = self.numeric_[col]
        if col in self.log1p_:
            values = log_form(values)
        return np.nan_to_num((values - mean) / std, nan=0.0)

    def features(self, enc: Encoded, categories: dict[str, list[str]],
                 names: list[str], contiguous: bool = True) -> np.ndarray:
        """This preprocessor's features of ``enc`` (encoded against ``categories``, this
        one's or a superset), laid out as ``names`` ``(n, len(names)) float32``; without
        ``contiguous``, column-major (a transposed view, no copy: for readers that do not
        care, such as the compiled plan)."""
        at = {name: j for j, name in enumerate(names)}
        # Feature-major while filling (each feature a contiguous row), transposed at the end.
        out = np.zeros((len(names), enc.n), dtype=np.float32)
        numeric = {**enc.numeric, **self._interact(enc.numeric, enc.codes, categories)}
        for col in self.numeric_:
            out[at[col]] = self.numeric_feature(col, numeric[col])
        rows = np.arange(enc.n)
        for col, cats in self.categories_.items():
            where = column_map(col, categories[col], cats, at)
            pos = where[enc.codes[col]]
            hit = pos >= 0
            out[pos[hit], rows[hit]] = 1.0
        return np.ascontiguousarray(out.T) if contiguous else out.T

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "options": {"log1p_skewed": self.log1p_skewed, "skew_threshold": self.skew_threshold,
                        "derived": self.derived, "ordinal": self.ordinal,
                        "as_category": list(self.as_category),
                        "interactions": list(self.interactions)},
            "columns": self.columns_,
            "numeric": {c: {"mean": m, "std": s, "min": self.range_[c][0],
                            "max": self.range_[c][1], "log1p": c in self.log1p_}
                        for c, (m, s) in self.numeric_.items()},
            "categorical": self.categories_,
            "feature_names": self.feature_names_,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessor:
        if d.get("format") != FORMAT:
            raise DataError(f"not a {FORMAT} preprocessor (format={d.get('format')!r})")
        opts = d["options"]
        return cls(
            log1p_skewed=opts["log1p_skewed"], skew_threshold=opts["skew_threshold"],
            derived=opts["derived"], ordinal=opts["ordinal"],
            as_category=tuple(opts["as_category"]),
            interactions=tuple(opts.get("interactions", ())),
            numeric_={c: (v["mean"], v["std"]) for c, v in d["numeric"].items()},
            range_={c: (v["min"], v["max"]) for c, v in d["numeric"].items()},
            log1p_=[c for c, v in d["numeric"].items() if v["log1p"]],
            categories_={c: list(v) for c, v in d["categorical"].items()},
            columns_=list(d["columns"]),
        )

    def raw_dtypes(self) -> dict[str, str]:
        """dtypes to read raw files with, so a chunk never guesses a category is a number."""
        return {c: "string" for c in self.categories_ if c in self.columns_}


def interaction_name(num: str, cat: str, level: str) -> str:
    return f"{num}@{cat}={level}"


def category_codes(values: pd.Series, categories: list[str]) -> np.ndarray:
    """``(n,) int64`` position of each value's text in ``categories``; -1 for missing or
    unseen values (a vectorized lookup in Arrow, not a Python loop). A pandas categorical
    (text read dictionary-encoded) is looked up once per distinct value."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        lookup = category_codes(pd.Series(values.cat.categories.astype(str)), categories)
        lookup = np.append(lookup, -1)  # code -1 (missing) reads the last entry
        return lookup[values.cat.codes.to_numpy()]
    arr = pa.array(values.astype("string[pyarrow]"), type=pa.string())  # no copy if Arrow
    codes = pc.index_in(arr, value_set=pa.array(categories, type=pa.string()))
    return codes.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def _is_text(t: pa.DataType) -> bool:
    return (pa.types.is_string(t) or pa.types.is_large_string(t)
            or (pa.types.is_dictionary(t) and pa.types.is_string(t.value_type)))


def _arrow_numeric(column: pa.ChunkedArray, col: str,
                   ids: pa.ChunkedArray | None) -> np.ndarray:
    """An Arrow column as float64, NaN where null; text goes through ``_numeric`` (its
    parse and its error naming the first bad row)."""
    t = column.type
    if pa.types.is_null(t):
        return np.full(len(column), np.nan)
    if pa.types.is_dictionary(t) and column.num_chunks:
        try:  # numbers read as text (a CSV column typed text): each distinct value once
            return np.concatenate([np.append(np.asarray(
                pc.cast(c.dictionary, pa.float64()), dtype=np.float64), np.nan)[
                _indices(c)] for c in column.chunks])
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass  # not plain numbers: pandas' parse, and its error naming the row
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return column.cast(pa.float64()).to_numpy()  # a null is NaN
    frame = pd.DataFrame({col: column.to_pandas()})
    return _numeric(frame, col, ids=None if ids is None else ids.to_pandas())


def _indices(chunk: pa.DictionaryArray) -> np.ndarray:
    """A dictionary array's indices as NumPy, -1 where null (no copy when there is none)."""
    index = chunk.indices
    return np.asarray(index if index.null_count == 0 else index.fill_null(-1))


def _arrow_codes(column: pa.ChunkedArray, categories: list[str]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(position of each value among ``categories``, -1 for missing or unseen; present)
    of an Arrow text column; dictionary-encoded text is looked up once per distinct value.
    Other types go through pandas' text form, as ``category_codes`` does."""
    if not _is_text(column.type):
        values = column.to_pandas()
        return category_codes(values, categories), values.notna().to_numpy()
    value_set = pa.array(categories, pa.string())
    codes, present = [], []
    for chunk in column.chunks:
        if pa.types.is_dictionary(chunk.type):
            lookup = np.empty(len(chunk.dictionary) + 1, dtype=np.int64)
            lookup[:-1] = np.asarray(pc.index_in(chunk.dictionary.cast(pa.string()),
                                                 value_set=value_set).fill_null(-1))
            lookup[-1] = -1  # a null index (-1) reads the last entry
            index = _indices(chunk)
            codes.append(lookup.take(index))
            if chunk.dictionary.null_count:  # a null among the values themselves
                valid = np.append(np.asarray(chunk.dictionary.is_valid(), dtype=bool), False)
                present.append(valid.take(index))
            else:
                present.append(index >= 0)
            continue
        present.append(np.asarray(chunk.is_valid(), dtype=bool))
        codes.append(np.asarray(pc.index_in(chunk.cast(pa.string()),
                                            value_set=value_set).fill_null(-1), dtype=np.int64))
    if not codes:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    return np.concatenate(codes), np.concatenate(present)


def _codes(values: np.ndarray, col: str, ids: pd.Series | None) -> np.ndarray:
    """A numeric code column (``as_category``) as float64 codes; a value no code can be
    (±inf, beyond ±MAX_ABS) is an error naming the column and the row."""
    with np.errstate(invalid="ignore"):
        bad = np.isinf(values) | (np.abs(values) > MAX_ABS)
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        where = f"Id={ids.iloc[pos]}" if ids is not None else f"row {pos + 1}"
        raise DataError(f"column {col} holds codes but has {values[pos]:g} at {where}; fix "
                        "or blank that value")
    return values


def _numeric(df: pd.DataFrame, col: str, ids: pd.Series | None = None) -> np.ndarray:
    """``df[col]`` as float64 (NaN where missing); text that is not a number is an error
    naming the column and the first bad row (by Id when known)."""
    values = df[col]
    if isinstance(values.dtype, pd.CategoricalDtype):  # text read dictionary-encoded
        values = values.astype("string")
    if ids is None and ID in df.columns:
        ids = df[ID]
    if pd.api.types.is_numeric_dtype(values):
        return values.to_numpy(dtype=np.float64, na_value=np.nan)
    parsed = pd.to_numeric(values, errors="coerce")
    bad = parsed.isna() & values.notna() & (values.astype("string").str.strip() != "")
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        where = f"Id={ids.iloc[pos]}" if ids is not None else f"row {pos + 1}"
        raise DataError(
            f"column {col} must be numeric but has {str(values.iloc[pos])!r} at {where}"
        )
    return parsed.to_numpy(dtype=np.float64, na_value=np.nan)


def fit_preprocessor(train: pd.DataFrame, test: pd.DataFrame | None = None,
                     config: PreprocessConfig | None = None) -> Preprocessor:
    """Fit on ``train`` (and ``test`` too when given: the book's recipe). Without a config,
    the book's plain standardize/one-hot."""
    frames = [train] if test is None else [train, test]
    opts = {} if config is None else config.model_dump(exclude={"fit_on", "per_fold"})
    return Preprocessor(**opts).fit(frames)


def load_preprocessor(path: Path) -> Preprocessor:
    return Preprocessor.from_dict(json.loads(Path(path).read_text()))


