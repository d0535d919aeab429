"""Stage 3, tensorize: apply the preprocessor and write the training matrix to Parquet.

``train.parquet`` holds ``Id`` (int64), ``SalePrice`` (float64) and one float32 column per
feature; its schema metadata (key ``houseprice``) names the features and the preprocessor
version, so the file describes itself.

With per-fold preprocessing (``preprocess.per_fold``, the default) the artifact also holds,
for the folds train will cut, one preprocessor fitted on each fold's training rows
(``fold_preprocessors.json``), and every row through each of them as a map of one base
matrix (``fold_base.npy``, ``(n_rows, n_features + a few) float32``, and ``fold_maps.json``;
see ``tasks.data.foldmaps``): laid out as ``train.parquet``'s features, a category a fold
never saw is a zero column. Cross-validation then fits nothing on a fold's validation rows,
and the artifact holds the matrix about twice (Parquet and base), not once per fold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from tasks.config import FoldSpec
from tasks.data.features import (
    ID,
    TARGET,
    Encoded,
    Preprocessor,
    _arrow_numeric,
    load_preprocessor,
)
from tasks.data.foldmaps import (
    BaseWriter,
    FoldMaps,
    Sums,
    base_block,
    base_columns,
    fold_groups,
    fold_maps,
    open_base,
)
from tasks.data.folds import make_folds
from tasks.data.rawcsv import (
    BLOCK_BYTES,
    batches,
    header,
    id_values,
    preprocessor_types,
    read_all,
)
from tasks.stage import build_stage, stage_task_options
from tasks.storage.artifacts import ArtifactRef, write_json

STAGE = "tensorize"
META_KEY = b"houseprice"
FOLD_BASE = "fold_base.npy"
FOLD_MAPS = "fold_maps.json"
FOLD_PREPROCESSORS = "fold_preprocessors.json"


@dataclass(frozen=True)
class Matrix:
    ids: np.ndarray  # (n_rows,) int64
    X: np.ndarray  # (n_rows, n_features) float32
    y: np.ndarray  # (n_rows,) float64 SalePrice
    meta: dict[str, Any]


class MatrixWriter:
    """``train.parquet`` written a block of rows at a time (a row group each): Ids, prices
    and the float32 features, with the metadata ``read_matrix`` reads."""

    def __init__(self, path: Path, feature_names: list[str], meta: dict[str, Any], n: int):
        if len(set(feature_names)) != len(feature_names):
            raise ValueError("feature names are not unique")
        self.names = feature_names
        meta = {**meta, "feature_names": feature_names, "n_rows": n}
        schema = pa.schema([(ID, pa.int64()), (TARGET, pa.float64())]
                           + [(name, pa.float32()) for name in feature_names],
                           metadata={META_KEY: json.dumps(meta).encode()})
        self.writer = pq.ParquetWriter(path, schema)

    def write(self, ids: np.ndarray, X: np.ndarray, y: np.ndarray) -> None:
        columns = [pa.array(ids, pa.int64()), pa.array(y, pa.float64())]
        columns += [pa.array(X[:, j], pa.float32()) for j in range(len(self.names))]
        self.writer.write_table(pa.Table.from_arrays(columns, schema=self.writer.schema))

    def __enter__(self) -> MatrixWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.writer.close()


def write_matrix(path: Path, ids: np.ndarray, X: np.ndarray, y: np.ndarray,
                 feature_names: list[str], meta: dict[str, Any]) -> None:
    with MatrixWriter(path, feature_names, meta, len(ids)) as out:
        out.write(ids, X, y)


def read_matrix(path: Path, features: bool = True) -> Matrix:
    """The matrix ``write_matrix`` wrote; without ``features``, its Ids, prices and metadata
    only (``X`` has no columns: the caller reads the features elsewhere)."""
    meta = json.loads(pq.read_schema(path).metadata[META_KEY])
    names = meta["feature_names"]
    table = pq.read_table(path, columns=None if features else [ID, TARGET])
    if not features:
        return Matrix(ids=table.column(ID).to_numpy(), X=np.empty((table.num_rows, 0),
                      np.float32), y=table.column(TARGET).to_numpy(), meta=meta)
    X = np.empty((table.num_rows, len(names)), dtype=np.float32)
    for j, name in enumerate(names):
        X[:, j] = table.column(name).to_numpy()
    return Matrix(
        ids=table.column(ID).to_numpy(), X=X, y=table.column(TARGET).to_numpy(), meta=meta
    )


def training_ids(train: pd.DataFrame) -> np.ndarray:
    """The training Ids as int64 (validated as whole numbers: 7, 7.0 and "007" are 7)."""
    return pd.to_numeric(train[ID].astype("string").str.strip()).to_numpy().astype(np.int64)


def flagged(area: np.ndarray, price: np.ndarray) -> np.ndarray:
    """The outlier rule (see ``outlier_ids``) of living areas and prices, NaN never."""
    with np.errstate(invalid="ignore"):
        return (area > 4000) & (price < 300_000)


class _Rows:
    """The first pass: each row's Id and price, and the outlier rule's rows."""

    def __init__(self, types: dict[str, pa.DataType]):
        self.ids: list[np.ndarray] = []
        self.y: list[np.ndarray] = []
        self.outliers: list[np.ndarray] = []

    def add(self, lo: int, rows: pa.Table) -> None:
        ids = id_values(rows.column(ID), "train.csv", lo)
        y = _arrow_numeric(rows.column(TARGET), TARGET, None)
        self.ids.append(ids)
        self.y.append(y)
        if "GrLivArea" in rows.column_names:
            area = _arrow_numeric(rows.column("GrLivArea"), "GrLivArea", None)
            self.outliers.append(ids[flagged(area, y)])


class _Encoder:
    """A pass over rows encoded by ``pre`` (``step(lo, enc)`` per batch), that restarts
    cleanly: ``read_all`` starts it over when a column meets text."""

    def __init__(self, pre: Preprocessor, step):
        self.pre, self.step = pre, step

    def add(self, lo: int, rows: pa.Table) -> None:
        self.step(lo, self.pre.encode_table(rows))


def tensorize(raw: ArtifactRef, preprocessor: ArtifactRef, out_dir: Path,
              folds: FoldSpec | None = None, fit_on: str = "train",
              block_bytes: int = BLOCK_BYTES) -> dict[str, Any]:
    """Write ``train.parquet``: the preprocessed training rows as float32; with ``folds``,
    also each fold's own preprocessor and matrix (``fit_on="train+test"``: each fitted on
    the fold's training rows and the test rows, as the book fits on both).

    The file is read as Arrow record batches (``tasks.data.rawcsv``), never whole: a pass
    for the Ids and prices (the folds need the row count), one that writes the matrix and
    gathers each fold's statistics, and, with folds, one that writes the fold base."""
    pre = load_preprocessor(preprocessor.file("preprocessor.json"))
    path = raw.file("train.csv")
    types = preprocessor_types(pre, header(path, "train.csv"))
    keep = [c for c in (ID, TARGET, "GrLivArea") if c in types]
    first, _ = read_all(path, "train.csv", {c: types[c] for c in keep}, _Rows, keep,
                        block_bytes)
    ids, y = np.concatenate(first.ids), np.concatenate(first.y)
    outliers = sorted(int(i) for part in first.outliers for i in part)
    n_rows, names = len(ids), pre.feature_names_
    out = {"n_rows": n_rows, "n_features": len(names), "n_outliers": len(outliers),
           "fold_preprocessors": 0}
    labels = sums = None
    if folds is not None:
        splits = make_folds(n_rows, folds.n_splits, folds.seed, folds.fold_scheme,
                            folds.repeats)
        labels, take = fold_groups(splits, n_rows)
        F = len(splits)
    missing: set[str] = set()  # numeric features some row lacks: a presence column each
    target = out_dir / "train.parquet"

    def write_matrix_pass(_: dict[str, pa.DataType]) -> _Encoder:
        nonlocal sums
        sums = None if folds is None else Sums(pre, F + 1)
        missing.clear()
        if writers:  # a column met text: the pass starts over, and the file with it
            writers.pop().close()
        writer = MatrixWriter(target, names, {"preprocessor_version": preprocessor.version,
                                              "outlier_ids": outliers}, n_rows)

        def step(lo: int, enc: Encoded) -> None:
            hi = lo + enc.n
            numeric = pre.numeric_columns(enc)
            missing.update(c for c, v in numeric.items() if np.isnan(v).any())
            # column-major: Parquet takes each feature's column with no copy
            X = pre.features(enc, pre.categories_, names, contiguous=False)
            writer.write(ids[lo:hi], X, y[lo:hi])
            if sums is not None:
                sums.add(numeric, enc.codes, labels[:, lo:hi])
        writers.append(writer)
        return _Encoder(pre, step)

    writers: list[MatrixWriter] = []
    try:
        _, types = read_all(path, "train.csv", types, write_matrix_pass,
                            block_bytes=block_bytes)
    finally:
        for writer in writers:
            writer.close()
    if folds is None:
        return out
    if fit_on == "train+test":  # every fold also fits on the test rows (group F)
        test = raw.file("test.csv")
        read_all(test, "test.csv", preprocessor_types(pre, header(test, "test.csv")),
                 lambda _: _Encoder(pre, lambda lo, enc: sums.add(
                     pre.numeric_columns(enc), enc.codes,
                     np.full((1, enc.n), F, dtype=np.int64))), block_bytes=block_bytes)
    fitted = [sums.fitted(take[k]) for k in range(F)]
    extra_missing, flipped = base_columns(pre, fitted, missing)
    base = BaseWriter(out_dir / FOLD_BASE, n_rows, len(names) + 1 + len(extra_missing)
                      + len(flipped))

    def write_base(lo: int, enc: Encoded) -> None:
        X = pre.features(enc, pre.categories_, names, contiguous=False)  # B copies it
        base.write(lo, base_block(X, pre, pre.numeric_columns(enc), extra_missing, flipped))

    # the types the last pass settled on: no column changes type now
    for lo, rows in batches(path, "train.csv", types, block_bytes=block_bytes):
        write_base(lo, pre.encode_table(rows))
    maps = fold_maps(pre, fitted, extra_missing, flipped, base.open())
    write_json(out_dir / FOLD_MAPS, {**maps.to_dict(), "presence": extra_missing,
                                     "other_form": flipped})
    write_json(out_dir / FOLD_PREPROCESSORS,
               {"folds": folds.model_dump(mode="json"),
                "preprocessors": [f.to_dict() for f in fitted]})
    out["fold_preprocessors"] = len(fitted)
    return out


def read_fold_features(data: ArtifactRef, folds: FoldSpec) -> FoldMaps | None:
    """``(K, n, d)`` each fold's rows through its own preprocessor (maps of one base
    matrix), or None when the artifact has none (``preprocess.per_fold = false``). The folds
    must be train's."""
    if not data.file(FOLD_MAPS).is_file():
        return None
    saved = json.loads(data.file(FOLD_PREPROCESSORS).read_text())["folds"]
    if saved != folds.model_dump(mode="json"):
        raise ValueError(f"tensorize {data.version} holds folds {saved}, train cuts "
                         f"{folds.model_dump(mode='json')}; rerun from tensorize")
    # Memory-mapped: a fold's matrix is built when asked, from the rows it needs.
    base = open_base(data.file(FOLD_BASE))  # one mapping, shared by the tasks side by side
    return FoldMaps.from_dict(json.loads(data.file(FOLD_MAPS).read_text()), base)


def outlier_ids(train: pd.DataFrame) -> list[int]:
    """Ids of the very large partial sales De Cock's documentation of the Ames data flags
    (GrLivArea > 4000 and SalePrice < 300000): two rows of the Kaggle training file."""
    if "GrLivArea" not in train.columns:
        return []
    area = pd.to_numeric(train["GrLivArea"], errors="coerce").to_numpy(np.float64)
    rows = flagged(area, train[TARGET].to_numpy(np.float64))
    return sorted(int(i) for i in training_ids(train)[rows])


@task(**stage_task_options(STAGE))
def tensorize_task(raw: ArtifactRef, preprocessor: ArtifactRef, root: str,
                   folds: FoldSpec | None = None, fit_on: str = "train",
                   force: bool = False) -> ArtifactRef:
    """Write the float32 training matrix, target and Ids to Parquet (and, given the folds,
    each fold's own preprocessor and matrix)."""
    inputs = {"raw": raw, "preprocessor": preprocessor, "folds": folds, "fit_on": fit_on}
    return build_stage(STAGE, root, inputs,
                       lambda out: tensorize(raw, preprocessor, out, folds, fit_on),
                       force=force)
