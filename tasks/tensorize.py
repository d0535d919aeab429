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
from tasks.data.features import ID, TARGET, load_preprocessor, read_csv, validate_training_frame
from tasks.data.foldmaps import (
    BaseWriter,
    FoldMaps,
    base_block,
    base_columns,
    fold_maps,
    fold_preprocessors,
    open_base,
)
from tasks.data.folds import make_folds
from tasks.stage import build_stage, stage_task_options
from tasks.storage.artifacts import ArtifactRef, write_json

STAGE = "tensorize"
META_KEY = b"houseprice"
FOLD_BASE = "fold_base.npy"
FOLD_MAPS = "fold_maps.json"
FOLD_PREPROCESSORS = "fold_preprocessors.json"
BLOCK = 65_536  # rows encoded and written at a time


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


def tensorize(raw: ArtifactRef, preprocessor: ArtifactRef, out_dir: Path,
              folds: FoldSpec | None = None, fit_on: str = "train") -> dict[str, Any]:
    """Write ``train.parquet``: the preprocessed training rows as float32; with ``folds``,
    also each fold's own preprocessor and matrix (``fit_on="train+test"``: each fitted on
    the fold's training rows and the test rows, as the book fits on both)."""
    train = read_csv(raw.file("train.csv"))
    validate_training_frame(train, "train.csv")
    pre = load_preprocessor(preprocessor.file("preprocessor.json"))
    enc = pre.encode(train)
    n_rows, ids, outliers = len(train), training_ids(train), outlier_ids(train)
    y = train[TARGET].to_numpy(float)
    del train  # what follows reads the encoded rows: the frame's memory goes back first
    names = pre.feature_names_
    out = {"n_rows": n_rows, "n_features": len(names), "n_outliers": len(outliers),
           "fold_preprocessors": 0}
    numeric = pre.numeric_columns(enc)
    base = None
    if folds is not None:
        extra = None
        if fit_on == "train+test":
            tenc = pre.encode(read_csv(raw.file("test.csv")))
            extra = (pre.numeric_columns(tenc), tenc.codes)
        splits = make_folds(n_rows, folds.n_splits, folds.seed, folds.fold_scheme,
                            folds.repeats)
        fitted = fold_preprocessors(pre, numeric, enc.codes, splits, extra)
        missing, flipped = base_columns(pre, fitted, numeric)
        base = BaseWriter(out_dir / FOLD_BASE, n_rows, len(names) + 1 + len(missing)
                          + len(flipped))
    # A block of rows at a time: the matrix is never whole in memory, only on disk.
    with MatrixWriter(out_dir / "train.parquet", names,
                      {"preprocessor_version": preprocessor.version, "outlier_ids": outliers},
                      n_rows) as matrix:
        for lo in range(0, n_rows, BLOCK):
            hi = lo + BLOCK
            # column-major: Parquet takes each feature's column with no copy
            X = pre.features(enc.rows(lo, hi), pre.categories_, names, contiguous=False)
            matrix.write(ids[lo:hi], X, y[lo:hi])
            if base is not None:
                base.write(lo, base_block(X, pre, {c: v[lo:hi] for c, v in numeric.items()},
                                          missing, flipped))
    if base is not None:
        maps = fold_maps(pre, fitted, missing, flipped, base.open())
        write_json(out_dir / FOLD_MAPS, {**maps.to_dict(), "presence": missing,
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
    area = pd.to_numeric(train["GrLivArea"], errors="coerce")
    flagged = (area > 4000) & (train[TARGET] < 300_000)
    return sorted(int(i) for i in training_ids(train)[flagged.to_numpy(dtype=bool)])


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
