"""Batch prediction: raw Kaggle-shaped rows -> ``Id,SalePrice`` (Kaggle's format), CSV or
Parquet in and out.

One reader for both formats and one rule for missing values, the one training uses (pandas'
``read_csv``): an empty field or one of pandas' missing-value strings ("NA", "None", ...) is
missing, whether it came from a CSV file or a Parquet file's text column. Rows are read with
pyarrow in record batches of ``chunk_size`` rows, the next batch read on a thread while the
current one is predicted, and the output written as it goes to a temporary file renamed into
place at the end: memory is bounded by the chunk size, not the file size, and a failed run
leaves nothing behind. Pure: no Prefect, no torch (the model is the compiled plan).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from tasks.data.features import ID, DataError, Preprocessor, _numeric
from tasks.inference import intervals
from tasks.inference.intervals import Calibration, check_level
from tasks.inference.plan import PLAN_JSON, Plan
from tasks.storage.artifacts import ArtifactRef, write_json

# pandas' default missing-value strings (``pandas.read_csv``'s ``na_values``), which the
# training rows are read with.
NA_STRINGS = ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
              "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]
_NA = pa.array(NA_STRINGS, pa.string())
_DICT = pa.dictionary(pa.int32(), pa.string())


def load_model(ref: ArtifactRef) -> Plan:
    """The model of a select artifact: its compiled plan, plain JSON and arrays. Predict
    never unpickles anything (the checkpoint's scikit-learn members are pickles: whoever can
    write the artifacts could make them run code), so a version from before plans is an
    error, not a fallback."""
    if not ref.file(PLAN_JSON).is_file():
        raise DataError(f"model {ref.version} has no compiled plan ({PLAN_JSON}; it predates "
                        "them): rebuild it with 'houseprice run --from select'")
    return Plan.load(ref.path)


def load_ranges(ref: ArtifactRef, level: float) -> tuple[Calibration, float]:
    """The model's calibrated ranges at ``level`` (a one-line error for a model from before
    ranges; ``predict_file`` checks the level against them before reading a row)."""
    cal = intervals.load(ref.file(intervals.INTERVALS_JSON))
    if cal is None:
        raise DataError(f"model {ref.version} has no calibrated ranges (it predates them): "
                        "rebuild it with 'houseprice run --from select', or predict without "
                        "--interval")
    return cal, level


def _string_typed(t: pa.DataType) -> bool:
    return (pa.types.is_string(t) or pa.types.is_large_string(t)
            or (pa.types.is_dictionary(t) and pa.types.is_string(t.value_type)))


def normalize(table: pa.Table) -> pa.Table:
    """Missing-value strings in text columns -> null (the one rule, whatever the format).
    Dictionary-encoded text stays encoded: only the dictionary is looked at."""
    for i, f in enumerate(table.schema):
        if _string_typed(f.type):
            table = table.set_column(i, f.name, pa.chunked_array(
                [_null_na(a) for a in table.column(i).chunks], _text_type(f.type)))
    return table


def _text_type(t: pa.DataType) -> pa.DataType:
    return pa.dictionary(t.index_type, pa.string()) if pa.types.is_dictionary(t) else pa.string()


def _null_na(arr: pa.Array) -> pa.Array:
    if not pa.types.is_dictionary(arr.type):
        arr = arr.cast(pa.string())
        return pc.if_else(pc.is_in(arr, _NA), None, arr)
    words = arr.dictionary.cast(pa.string())
    na = np.flatnonzero(pc.is_in(words, _NA).to_numpy(zero_copy_only=False))
    indices = arr.indices
    if len(na):
        hit = pc.is_in(indices, pa.array(na, indices.type))
        indices = pc.if_else(hit, None, indices)
    return pa.DictionaryArray.from_arrays(indices, words)


def _rebatch(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Tables of exactly ``rows`` rows (the last one fewer) from batches of any size."""
    held: list[pa.RecordBatch] = []
    n = 0
    for batch in batches:
        held.append(batch)
        n += batch.num_rows
        while n >= rows:
            table = pa.Table.from_batches(held)
            yield table.slice(0, rows)
            rest = table.slice(rows)
            held, n = rest.to_batches(), rest.num_rows
    if n:
        yield pa.Table.from_batches(held)


def open_rows(path: Path, pre: Preprocessor, chunk_size: int
              ) -> tuple[list[str], Iterator[pa.Table]]:
    """The column names of a CSV or Parquet file and its rows, ``chunk_size`` at a time."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"input file not found: {path}")
    text = set(pre.raw_dtypes())
    if suffix == ".csv":
        if path.stat().st_size == 0:
            raise DataError(f"{path} is empty: expected at least a header line")
        types = {c: (_DICT if c in text else pa.float64()) for c in pre.columns_}
        types[ID] = pa.string()  # keys come back as given: 001461 stays 001461
        try:
            reader = pacsv.open_csv(
                path, read_options=pacsv.ReadOptions(block_size=1 << 24),
                convert_options=pacsv.ConvertOptions(
                    column_types=types, null_values=NA_STRINGS, strings_can_be_null=True))
        except pa.ArrowInvalid as exc:
            raise _csv_error(path, pre, exc) from None
        names = reader.schema.names

        def batches() -> Iterator[pa.RecordBatch]:
            try:
                yield from reader
            except pa.ArrowInvalid as exc:
                raise _csv_error(path, pre, exc) from None

        return names, _rebatch(batches(), chunk_size)
    if suffix in (".parquet", ".pq"):
        try:
            names = pq.read_schema(path).names
            # Text read dictionary-encoded: each distinct value looked up once per chunk.
            f = pq.ParquetFile(path, read_dictionary=[c for c in names if c in text])
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"cannot read {path} as Parquet: {exc}") from None
        return f.schema_arrow.names, (pa.Table.from_batches([b]) for b in
                                      f.iter_batches(batch_size=chunk_size))
    raise DataError(f"cannot read {path}: use a .csv or .parquet file")


def _csv_error(path: Path, pre: Preprocessor, exc: Exception) -> DataError:
    """Arrow's conversion error as the one-line error training gives: the column and the
    first bad value with its row's Id (found again with pandas; this is the error path)."""
    import pandas as pd

    if "conversion error" in str(exc):
        for chunk in pd.read_csv(path, chunksize=100_000, dtype=pre.raw_dtypes()):
            for col in pre.columns_:
                if col in chunk.columns and col not in pre.raw_dtypes():
                    _numeric(chunk, col)  # raises the DataError naming column and Id
    return DataError(f"cannot read {path} as CSV: {str(exc).splitlines()[0]}")


def _prefetch(chunks: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """``chunks``, the next one read on a thread while the caller works on this one."""
    with ThreadPoolExecutor(1, thread_name_prefix="houseprice-read") as pool:
        ahead = pool.submit(next, chunks, None)
        while (chunk := ahead.result()) is not None:
            ahead = pool.submit(next, chunks, None)
            yield chunk


class _Writer:
    """``Id,SalePrice`` rows (and ``SalePrice_lo,SalePrice_hi`` with ranges) as CSV or
    Parquet (by the output's suffix)."""

    def __init__(self, path: Path, parquet: bool, ranges: bool = False):
        self.path, self.parquet, self.pq = path, parquet, None
        self.columns = ["SalePrice", *(["SalePrice_lo", "SalePrice_hi"] if ranges else [])]
        if not parquet:
            self.fh = open(path, "wb")  # noqa: SIM115 - closed in close()
            self.fh.write((",".join([ID, *self.columns]) + "\n").encode())

    def write(self, ids: pa.Array, *prices: np.ndarray) -> None:
        table = pa.table({ID: ids, **{c: pa.array(v, pa.float64())
                                      for c, v in zip(self.columns, prices, strict=True)}})
        if self.parquet:
            if self.pq is None:
                self.pq = pq.ParquetWriter(self.path, table.schema)
            self.pq.write_table(table)
        else:
            # Text Ids as given: unquoted (1461, 001461) unless one needs quotes (a comma, a
            # quote, a line break), as pandas and Kaggle write them.
            plain = not _string_typed(ids.type) or not pc.any(
                pc.match_substring_regex(ids, '[",\r\n]')).as_py()
            pacsv.write_csv(table, self.fh, pacsv.WriteOptions(
                include_header=False, quoting_style="none" if plain else "needed"))

    def close(self, ids_type: pa.DataType) -> None:
        if self.parquet:
            if self.pq is None:  # no rows: an empty file with the columns
                pq.write_table(pa.table({ID: pa.array([], ids_type),
                                         **{c: pa.array([], pa.float64())
                                            for c in self.columns}}), self.path)
            else:
                self.pq.close()
        else:
            self.fh.close()


def _check_ids(ids: list[np.ndarray], path: Path) -> None:
    """Every row has an Id, and no Id is there twice (predictions are keyed by it)."""
    if not ids:
        return
    every = np.concatenate(ids)
    values, counts = np.unique(every, return_counts=True)
    dup = values[counts > 1]
    if len(dup):
        shown = ", ".join(str(v) for v in dup[:5]) + (f" (and {len(dup) - 5} more)"
                                                      if len(dup) > 5 else "")
        raise DataError(f"{path}: {len(dup)} Id value(s) appear more than once: {shown}; "
                        "each row needs its own Id")


@contextlib.contextmanager
def _naming(path: Path):
    """A DataError that does not say which file it is about starts with the file's path."""
    try:
        yield
    except DataError as exc:
        if str(path) in str(exc):
            raise
        raise DataError(f"{path}: {exc}") from None


def _named(chunks: Iterator[pa.Table], path: Path) -> Iterator[pa.Table]:
    while True:
        with _naming(path):
            chunk = next(chunks, None)
        if chunk is None:
            return
        yield chunk


def _check_output(out_path: Path) -> None:
    """Where the predictions go must be a file name whose folder can exist: checked before
    anything is read or written."""
    for path in (out_path, drift_path(out_path)):
        if path.is_dir():
            raise DataError(f"--out {out_path}: {path} is a directory; give a file name, "
                            f"such as {out_path / 'predictions.csv'}")
    parent = next((p for p in out_path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise DataError(f"--out {out_path}: {parent} is a file, not a folder; give a path "
                        "whose folders are folders")


def _refuse_implausible(pre: Preprocessor, table: pa.Table, ids: pa.Array, path: Path) -> None:
    """A value no house has (±inf, beyond ±1e12, or many training ranges outside it) is an
    error naming the column, the value and the row's Id: a price from it is noise."""
    found = pre.implausible(table)
    if found is None:
        return
    col, pos, value = found
    raise DataError(f"{path}: column {col} has {value:g} at Id={ids[pos]}, far outside what "
                    "the model was trained on (a typing or unit error?); fix the value, or "
                    "leave it empty to have it imputed")


def predict_file(model: Any, input_path: str | Path, out_path: str | Path,
                 chunk_size: int = 50_000, warn: Callable[[str], None] = print,
                 ranges: tuple[Calibration, float] | None = None) -> dict[str, Any]:
    """Write ``Id,SalePrice`` for every row of ``input_path`` to ``out_path`` (Parquet when
    it ends in .parquet or .pq, else CSV), and the drift summary beside it. ``model`` is a
    ``Plan`` (or the reference ``FittedModel``): anything with ``preprocessor`` and
    ``predict_frame``. With ``ranges`` (a calibration and a level), each row's range at
    that level follows in ``SalePrice_lo,SalePrice_hi``."""
    input_path, out_path = Path(input_path), Path(out_path)
    if ranges is not None:
        ranges[0].check(check_level(ranges[1]))
    _check_output(out_path)
    pre = model.preprocessor
    with _naming(input_path):
        names, chunks = open_rows(input_path, pre, chunk_size)
    missing = [c for c in [ID, *pre.columns_] if c not in names]
    if missing:
        shown = ", ".join(missing[:10]) + (
            f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
        raise DataError(f"{input_path} lacks {len(missing)} column(s): {shown}; it must have "
                        "the Kaggle test file's columns")
    extra = [c for c in names if c not in pre.columns_ and c != ID]
    wanted = [ID, *pre.columns_]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    writer = _Writer(tmp, out_path.suffix.lower() in (".parquet", ".pq"), ranges is not None)
    rows, drifted, unseen, seen_ids = 0, 0, Counter(), []
    out_of_range, imputed = Counter(), Counter()
    ids_type = pa.int64()
    try:
        try:
            for table in _named(_prefetch(chunks), input_path):
                table = normalize(table.select(wanted))
                ids = table.column(ID).combine_chunks()
                ids_type = ids.type
                if ids.null_count:
                    first = rows + int(np.flatnonzero(ids.is_null().to_numpy(
                        zero_copy_only=False))[0]) + 1
                    raise DataError(f"{input_path}: {ids.null_count} row(s) have no Id (the "
                                    f"first is data row {first}); give every row an Id")
                seen_ids.append(ids.to_numpy(zero_copy_only=False))
                with _naming(input_path):
                    _refuse_implausible(pre, table, ids, input_path)
                    log_price, report = model.predict_table(table)
                if not np.isfinite(log_price).all():
                    pos = int(np.flatnonzero(~np.isfinite(log_price))[0])
                    raise DataError(f"{input_path}: the prediction for Id={ids[pos]} is not "
                                    "a finite price; check that row's values")
                unseen.update(report.unseen)
                out_of_range.update(report.out_of_range)
                drifted += report.rows_drifted
                imputed.update(report.missing)
                writer.write(ids, np.exp(log_price),
                             *(ranges[0].bounds(log_price, ranges[1]) if ranges else ()))
                rows += table.num_rows
        finally:
            writer.close(ids_type)
        _check_ids(seen_ids, input_path)
        # Keyed by the user's own columns; what the model derives from them (total floor
        # area, ages, quality scores) is reported apart, as it is no column of their file.
        own = set(pre.columns_)
        out_of_range_own = {c: n for c, n in out_of_range.items() if c in own}
        drift = {"rows": rows, "rows_drifted": drifted,
                 "share_drifted": drifted / rows if rows else 0.0,
                 "out_of_training_range": out_of_range_own,
                 "imputed_missing": {c: n for c, n in imputed.items() if c in own},
                 "unseen_categories": dict(unseen),
                 "derived_features": {
                     "out_of_training_range": {c: n for c, n in out_of_range.items()
                                               if c not in own},
                     "imputed_missing": {c: n for c, n in imputed.items() if c not in own}},
                 "ignored_columns": extra}
        # Both files complete before either is in place; the predictions go in first, so
        # a drift summary never stands beside no (or older) predictions.
        drift_tmp = tmp.with_name(tmp.name + ".drift")
        write_json(drift_tmp, drift)
        os.replace(tmp, out_path)
        os.replace(drift_tmp, drift_path(out_path))
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".drift").unlink(missing_ok=True)
    if extra:
        warn(f"{input_path}: ignored {len(extra)} column(s) not used by the model: "
             f"{', '.join(extra[:10])}")
    if unseen:
        warn(f"{input_path}: {sum(unseen.values())} value(s) in categories unseen in training, "
             f"encoded as all zeros: {dict(unseen)}")
    if out_of_range_own:
        warn(f"{input_path}: {sum(out_of_range_own.values())} numeric value(s) outside the "
             f"training range, predicted anyway: {out_of_range_own}; see "
             f"{drift_path(out_path).name}")
    return drift


def drift_path(out_path: Path) -> Path:
    """Where the drift summary of predictions written to ``out_path`` goes (beside them)."""
    return out_path.with_name(out_path.stem + ".drift.json")
