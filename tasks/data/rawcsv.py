"""Raw Kaggle-shaped CSV files read as Arrow record batches: a block of rows at a time, so
preprocess and tensorize hold a few megabytes of the file, never all of it.

Column types are fixed before a pass, as a streaming reader needs them: a column whose
values in the first block are numbers is read as float64, every other one as text
(dictionary-encoded: a category column holds a few dozen distinct values), the Id as text
(parsed by us: "7", "7.0" and "007" are one Id). A float64 column that meets text further
down is read again as text (the pass starts over; ``read_all``), and the scan decides what
it is from all its values, as pandas does reading a whole file: numbers if every value is
one, a category column otherwise (numbers but for a few stray values: an error naming the
first one's row).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pcsv
from pandas._libs.parsers import STR_NA_VALUES

from tasks.data.features import (
    ID,
    MAX_ABS,
    ORDINAL_COLUMNS,
    TARGET,
    DataError,
    Preprocessor,
    _codes,
)
from tasks.data.foldmaps import Sums
from tasks.data.settings import DERIVED_SUMS, PreprocessConfig

BLOCK_BYTES = 16 << 20  # about 45,000 Kaggle rows a batch; larger blocks read slower
NA_VALUES = sorted(STR_NA_VALUES)  # pandas' missing-value markers ("NA", "", "NaN", ...)
TEXT = pa.dictionary(pa.int32(), pa.string())
_COLUMN = re.compile(r"In CSV column #(\d+)")


class _Retype(Exception):
    """A column typed float64 met text: read it as text, from the start."""

    def __init__(self, column: str, message: str):
        self.column, self.message = column, message


def header(path: Path, name: str) -> list[str]:
    """The column names of a CSV file (a DataError naming it when it has none)."""
    try:
        reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=1 << 16),
                               convert_options=pcsv.ConvertOptions(column_types={}))
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            raise DataError(f"{name} is empty: expected a header and rows") from None
        raise DataError(f"{name} is not a readable CSV file ({exc}); fix or re-export "
                        "it") from None
    return list(reader.schema.names)


def guess_types(path: Path, name: str, block_bytes: int = BLOCK_BYTES
                ) -> dict[str, pa.DataType]:
    """Types to read ``path`` with, from its first block (see the module)."""
    try:
        schema = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=block_bytes),
                               convert_options=_convert({})).schema
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            raise DataError(f"{name} is empty: expected a header and rows") from None
        raise DataError(f"{name} is not a valid CSV file ({exc}); fix or re-export "
                        "it") from None
    types = {f.name: pa.float64() if _is_number(f.type) else TEXT for f in schema}
    if ID in types:
        types[ID] = pa.string()
    return types


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _convert(types: dict[str, pa.DataType], columns: list[str] | None = None
             ) -> pcsv.ConvertOptions:
    return pcsv.ConvertOptions(column_types=types, null_values=NA_VALUES,
                               strings_can_be_null=True, include_columns=columns or [])


def batches(path: Path, name: str, types: dict[str, pa.DataType],
            columns: list[str] | None = None, block_bytes: int = BLOCK_BYTES
            ) -> Iterator[tuple[int, pa.Table]]:
    """``(first row, rows)`` of ``path`` a block at a time, read with ``types`` (only
    ``columns``, when given). Raises ``_Retype`` when a column meets a value its type cannot
    hold, a DataError naming the file when it is not CSV."""
    lo = 0
    try:
        reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=block_bytes),
                               convert_options=_convert(types, columns))
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            yield lo, pa.Table.from_batches([batch])
            lo += batch.num_rows
    except pa.ArrowInvalid as exc:
        at = _COLUMN.search(str(exc))
        if at is not None and "conversion error" in str(exc):
            # the file's column number, not among ``columns``
            raise _Retype(header(path, name)[int(at[1])], str(exc)) from None
        if "Empty CSV file" in str(exc):
            raise DataError(f"{name} is empty: expected a header and rows") from None
        raise DataError(f"{name} is not a valid CSV file after data row {lo} ({exc}); "
                        "fix or re-export it") from None


class Pass(Protocol):
    def add(self, lo: int, rows: pa.Table) -> None: ...


def read_all(path: Path, name: str, types: dict[str, pa.DataType],
             start: Callable[[dict[str, pa.DataType]], Pass],
             columns: list[str] | None = None, block_bytes: int = BLOCK_BYTES
             ) -> tuple[Any, dict[str, pa.DataType]]:
    """One pass of ``start(types)`` over every batch of ``path``; when a float64 column
    meets text, that column becomes text and the pass starts over. Returns the pass and
    the types that read the whole file."""
    types = dict(types)
    while True:
        state = start(types)
        try:
            for lo, rows in batches(path, name, types, columns, block_bytes):
                state.add(lo, rows)
            return state, types
        except _Retype as change:
            if types.get(change.column) in (TEXT, pa.string()):  # not even text (UTF-8)
                raise DataError(f"{name} is not a valid CSV file ({change.message}); fix "
                                "or re-export it") from None
            types[change.column] = TEXT


def id_values(ids: pa.ChunkedArray, name: str, lo: int) -> np.ndarray:
    """A batch's training Ids as int64: whole numbers ("7", "7.0" and "007" are 7), every
    row one; otherwise a DataError naming the data row."""
    if ids.null_count == 0:
        try:
            return np.asarray(ids.cast(pa.int64()), dtype=np.int64)  # plain digits
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    text = pd.Series(ids.to_pandas(), dtype="string").str.strip()
    blank = (text.isna() | (text == "")).to_numpy(dtype=bool)
    if blank.any():
        pos = int(np.flatnonzero(blank)[0])
        raise DataError(f"{name}: a row has no Id (data row {lo + pos + 1}); give every row "
                        "a whole-number Id")
    whole = text.str.fullmatch(r"[+-]?\d{1,18}(\.0*)?").to_numpy(dtype=bool)
    if not whole.all():
        pos = int(np.flatnonzero(~whole)[0])
        raise DataError(f"{name}: Id must be a whole number but is {text.iloc[pos]!r} at "
                        f"data row {lo + pos + 1}; fix that Id")
    return pd.to_numeric(text).to_numpy().astype(np.int64)


@dataclass
class _Values:
    """A text column's distinct values: rows holding each, and where each first is."""

    count: dict[str, int] = field(default_factory=dict)
    first: dict[str, tuple[int, str]] = field(default_factory=dict)  # row, its Id's text

    def add(self, column: pa.ChunkedArray, ids: pa.ChunkedArray, lo: int) -> None:
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
        if not pa.types.is_dictionary(column.type):
            column = column.dictionary_encode()
        index = np.asarray(column.indices.fill_null(-1), dtype=np.int64)
        hit = index >= 0
        if not hit.any():
            return
        words = column.dictionary.to_pylist()
        counts = np.bincount(index[hit], minlength=len(words))
        used = np.flatnonzero(counts)
        new = [j for j in used.tolist() if words[j] not in self.count]
        if len(new) > 64:  # many new values (numbers read as text): one sort finds them
            found, at = np.unique(index[hit], return_index=True)
            first = dict(zip(found.tolist(), np.flatnonzero(hit)[at].tolist(), strict=True))
        else:  # the usual case: none after the first batch
            first = {j: int(np.flatnonzero(index == j)[0]) for j in new}
        for j in new:
            self.count[words[j]] = 0
            self.first[words[j]] = (lo + first[j], str(ids[first[j]]))
        for j in used.tolist():
            self.count[words[j]] += int(counts[j])

    def numbers(self) -> tuple[np.ndarray, np.ndarray]:
        """(each distinct value parsed as a number, NaN where it is not one; its rows)."""
        words = list(self.count)
        parsed = pd.to_numeric(pd.Series(words, dtype="string"), errors="coerce")
        return (parsed.to_numpy(dtype=np.float64, na_value=np.nan),
                np.array([self.count[w] for w in words], dtype=np.int64))


class Scan:
    """One pass over a raw file of rows: its columns and which are numbers, the distinct
    values of its text columns, and, for a training file (``training``), its checks: unique
    whole-number Ids, a positive numeric SalePrice, no empty column, no stray text in a
    numeric column, no value beyond ±MAX_ABS. Each error names the column and the row."""

    def __init__(self, name: str, types: dict[str, pa.DataType], training: bool,
                 codes: tuple[str, ...] = ()):
        self.name, self.types, self.training = name, types, training
        self.codes = codes  # numeric columns whose distinct values are wanted (as_category)
        self.n = 0
        self.present = dict.fromkeys(types, 0)
        self.text = {c: _Values() for c, t in types.items() if t == TEXT}
        self.distinct: dict[str, set[float]] = {c: set() for c in codes if c in types}
        self.ids: list[np.ndarray] = []
        self.not_positive: list[int] = []
        self.numeric: list[str] = []

    def add(self, lo: int, rows: pa.Table) -> None:
        self.n += rows.num_rows
        for col in rows.column_names:
            self.present[col] += rows.num_rows - rows.column(col).null_count
        ids = rows.column(ID) if ID in rows.column_names else pa.chunked_array(
            [pa.array([str(lo + i + 1) for i in range(rows.num_rows)])])
        for col, values in self.text.items():
            if col != ID:
                values.add(rows.column(col), ids, lo)
        for col in self.distinct:
            if self.types[col] != TEXT:
                v = rows.column(col).to_numpy()
                self.distinct[col].update(np.unique(v[~np.isnan(v)]).tolist())
        if not self.training:
            return
        self.ids.append(id_values(ids, self.name, lo))
        for col, t in self.types.items():
            if col != ID and t != TEXT:
                self._in_bounds(col, rows.column(col).to_numpy(), ids)
        if self.types[TARGET] != TEXT:
            bad = np.flatnonzero(~(rows.column(TARGET).to_numpy() > 0))  # NaN too
        else:  # prices read as text: the missing ones here, the values at the end
            bad = np.flatnonzero(np.asarray(rows.column(TARGET).is_null()))
        self.not_positive += [int(self.ids[-1][i]) for i in bad[:5 - len(self.not_positive)]]

    def _in_bounds(self, col: str, values: np.ndarray, ids: pa.ChunkedArray) -> None:
        with np.errstate(invalid="ignore"):
            bad = np.isinf(values) | (np.abs(values) > MAX_ABS)
        if bad.any():
            pos = int(np.flatnonzero(bad)[0])
            raise DataError(f"{self.name}: column {col} has {values[pos]:g} at Id={ids[pos]}, "
                            f"beyond ±{MAX_ABS:g}; fix or blank that value")

    def finish(self) -> Scan:
        """Decide which text columns are numbers; for a training file, the checks that
        need every row. Raises DataError naming the column and row."""
        source = self.name
        if self.training:
            if self.n == 0:
                raise DataError(f"{source} has a header but no rows")
            empty = [c for c, k in self.present.items() if k == 0]
            if empty:
                raise DataError(f"{source}: column(s) {', '.join(empty)} have no values at "
                                "all; fill them or drop them from both files")
        numeric = [c for c, t in self.types.items() if t != TEXT and c != ID]
        for col, values in self.text.items():
            if col == ID or not values.count:
                continue
            parsed, rows = values.numbers()
            number = ~np.isnan(parsed)
            if number.all():
                numeric.append(col)  # numbers written so that the reader took them as text
                if self.training:
                    self._text_in_bounds(col, values, parsed)
                if col in self.distinct:
                    self.distinct[col] = set(parsed.tolist())
            elif col == TARGET and self.training:
                bad = min((values.first[w] for w, ok in zip(values.count, number, strict=True)
                           if not ok), key=lambda f: f[0])
                raise DataError(f"{source}: {TARGET} is not numeric (first bad row "
                                f"Id={bad[1]})")
            elif self.training and rows[number].sum() >= 0.9 * rows.sum():
                word, (_, at) = min(((w, values.first[w]) for w, ok in zip(
                    values.count, number, strict=True) if not ok), key=lambda x: x[1][0])
                raise DataError(f"{source}: column {col} is numeric but has {word!r} at "
                                f"Id={at}; fix or blank that value")
        self.numeric = [c for c in self.types if c in set(numeric)]
        if self.training:
            self._check_target_and_ids()
        return self

    def _text_in_bounds(self, col: str, values: _Values, parsed: np.ndarray) -> None:
        with np.errstate(invalid="ignore"):
            bad = np.isinf(parsed) | (np.abs(parsed) > MAX_ABS)
        if bad.any():
            word = min((w for w, b in zip(values.count, bad, strict=True) if b),
                       key=lambda w: values.first[w][0])
            raise DataError(f"{self.name}: column {col} has {float(word):g} at "
                            f"Id={values.first[word][1]}, beyond ±{MAX_ABS:g}; fix or blank "
                            "that value")

    def _check_target_and_ids(self) -> None:
        if self.types[TARGET] == TEXT:  # numbers read as text: parsed from the values
            values = self.text[TARGET]
            parsed, _ = values.numbers()
            for word, v in zip(values.count, parsed, strict=True):
                if not v > 0 and len(self.not_positive) < 5:  # its first row's Id
                    self.not_positive.append(int(values.first[word][1].strip().split(".")[0]))
        if self.not_positive:
            raise DataError(f"{self.name}: {TARGET} must be positive; bad rows "
                            f"Id={self.not_positive}")
        ids = self.all_ids()
        dup = pd.Series(ids).duplicated().to_numpy()
        if dup.any():
            raise DataError(f"{self.name}: duplicate Id values {ids[dup][:5].tolist()}")

    def all_ids(self) -> np.ndarray:
        return np.concatenate(self.ids) if self.ids else np.zeros(0, np.int64)

    def categories(self, col: str) -> list[str]:
        """A category column's values, sorted as text (what ``Preprocessor.fit`` learns)."""
        if col in self.distinct:  # a numeric code column (as_category): its codes as text
            values = _codes(np.array(sorted(self.distinct[col])), col, None)
            return sorted({str(int(round(v))) for v in values})
        return sorted(self.text[col].count)


def scan(path: Path, name: str, training: bool = True, expected: list[str] | None = None,
         codes: tuple[str, ...] = (), types: dict[str, pa.DataType] | None = None,
         block_bytes: int = BLOCK_BYTES) -> Scan:
    """Read ``path`` once (see ``Scan``), with ``types`` (guessed from its first block
    when not given) and, where a column meets text, that column as text."""
    types = types or guess_types(path, name, block_bytes)
    if training:  # what the header alone shows, before reading the rows
        missing = [c for c in (ID, TARGET) if c not in types]
        if missing:
            raise DataError(f"{name} lacks column(s) {', '.join(missing)}")
        absent = [c for c in (expected or []) if c not in types]
        if absent:
            raise DataError(f"{name} lacks feature column(s) {', '.join(absent)} that "
                            "the test file has; supply the full Kaggle training file")
    result, _ = read_all(path, name, types,
                         lambda types: Scan(name, types, training, codes),
                         block_bytes=block_bytes)
    return result.finish()


def scan_types(scan: Scan, columns: list[str]) -> dict[str, pa.DataType]:
    """Types to read another file of ``columns`` with as ``scan``'s file was read: its
    category columns as text, the rest as numbers (text where that file has text)."""
    numeric = set(scan.numeric)
    return {c: pa.string() if c == ID else pa.float64() if c in numeric else TEXT
            for c in columns}


def preprocessor_types(pre: Preprocessor, columns: list[str]) -> dict[str, pa.DataType]:
    """Types to read rows with for a fitted preprocessor: its category columns as text."""
    text = set(pre.raw_dtypes())
    return {c: pa.string() if c == ID else TEXT if c in text else pa.float64()
            for c in columns}


def skeleton(pre: Preprocessor, scans: list[Scan]) -> Preprocessor:
    """``pre`` (switches only) with the columns, categories and feature order that
    ``fit`` on the scanned rows learns, and no statistics yet: what rows are encoded
    against while the statistics are gathered (``fit_streamed``). The order is
    ``_engineer``'s: raw columns, then the derived, ordinal and code columns it adds."""
    train = scans[0]
    columns = [c for c in train.types if c not in (ID, TARGET)]
    numeric = set(train.numeric)
    added: list[tuple[str, bool]] = []  # (name, numeric)
    if pre.derived:
        added += [(name, True) for name, parts in DERIVED_SUMS.items()
                  if all(c in columns for c in parts)]
    if pre.ordinal:
        added += [(f"{col}Score", True) for col in ORDINAL_COLUMNS if col in columns]
    added += [(col, False) for col in pre.as_category if col in columns]
    names = {name for name, _ in added}
    order = [(c, c in numeric) for c in columns if c not in names] + added
    out = pre.unfitted()
    out.columns_ = columns
    out.numeric_ = {name: (0.0, 1.0) for name, is_number in order if is_number}
    out.categories_ = {}
    for name, is_number in order:
        if not is_number:
            values = set()
            for s in scans:
                if name in s.distinct or name in s.text:
                    values.update(s.categories(name))
            out.categories_[name] = sorted(values)
    return out


def fit_streamed(files: list[tuple[Path, Scan]], config: PreprocessConfig | None = None,
                 block_bytes: int = BLOCK_BYTES) -> Preprocessor:
    """``fit_preprocessor`` of scanned files (the training file first; the test file too
    with ``fit_on = "train+test"``), read a batch at a time: the statistics are sums
    gathered batch by batch, so the rows are never whole in memory."""
    opts = {} if config is None else config.model_dump(exclude={"fit_on", "per_fold"})
    skel = skeleton(Preprocessor(**opts), [s for _, s in files])
    sums = Sums(skel, len(files))
    for group, (path, s) in enumerate(files):
        # s.types read the whole file when it was scanned: no type changes on the way
        for _, rows in batches(path, s.name, s.types, block_bytes=block_bytes):
            enc = skel.encode_table(rows)
            sums.add(skel.numeric_columns(enc), enc.codes,
                     np.full((1, enc.n), group, dtype=np.int64))
    return sums.fitted(np.ones(len(files), dtype=bool))
