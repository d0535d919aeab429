"""Stage 3, tensorize: apply the preprocessor and write the training matrix to Parquet.

``train.parquet`` holds ``Id`` (int64), ``SalePrice`` (float64) and one float32 column per
feature; its schema metadata (key ``houseprice``) names the features and the preprocessor
version, so the file describes itself.
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

from tasks.artifacts import ArtifactRef
from tasks.preprocess import ID, TARGET, load_preprocessor, read_csv, validate_training_frame
from tasks.stage import build_stage, stage_task_options

STAGE = "tensorize"
META_KEY = b"houseprice"


@dataclass(frozen=True)
class Matrix:
    ids: np.ndarray  # (n_rows,) int64
    X: np.ndarray  # (n_rows, n_features) float32
    y: np.ndarray  # (n_rows,) float64 SalePrice
    meta: dict[str, Any]


def write_matrix(path: Path, ids: np.ndarray, X: np.ndarray, y: np.ndarray,
                 feature_names: list[str], meta: dict[str, Any]) -> None:
    if len(set(feature_names)) != len(feature_names):
        raise ValueError("feature names are not unique")
    columns = {ID: pa.array(ids, pa.int64()), TARGET: pa.array(y, pa.float64())}
    columns.update({name: pa.array(X[:, j]) for j, name in enumerate(feature_names)})
    table = pa.table(columns)
    meta = {**meta, "feature_names": feature_names, "n_rows": len(ids)}
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    pq.write_table(table, path)


def read_matrix(path: Path) -> Matrix:
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[META_KEY])
    names = meta["feature_names"]
    X = np.empty((table.num_rows, len(names)), dtype=np.float32)
    for j, name in enumerate(names):
        X[:, j] = table.column(name).to_numpy()
    return Matrix(
        ids=table.column(ID).to_numpy(), X=X, y=table.column(TARGET).to_numpy(), meta=meta
    )


def tensorize(raw: ArtifactRef, preprocessor: ArtifactRef, out_dir: Path) -> dict[str, Any]:
    """Write ``train.parquet``: the preprocessed training rows as float32."""
    train = read_csv(raw.file("train.csv"))
    validate_training_frame(train, "train.csv")
    pre = load_preprocessor(preprocessor.file("preprocessor.json"))
    X, _ = pre.transform(train)
    outliers = outlier_ids(train)
    write_matrix(
        out_dir / "train.parquet", train[ID].to_numpy(), X, train[TARGET].to_numpy(float),
        pre.feature_names_,
        {"preprocessor_version": preprocessor.version, "outlier_ids": outliers},
    )
    return {"n_rows": int(X.shape[0]), "n_features": int(X.shape[1]),
            "n_outliers": len(outliers)}


def outlier_ids(train: pd.DataFrame) -> list[int]:
    """Ids of the very large partial sales De Cock's documentation of the Ames data flags
    (GrLivArea > 4000 and SalePrice < 300000): two rows of the Kaggle training file."""
    if "GrLivArea" not in train.columns:
        return []
    area = pd.to_numeric(train["GrLivArea"], errors="coerce")
    flagged = (area > 4000) & (train[TARGET] < 300_000)
    return sorted(int(i) for i in train.loc[flagged, ID])


@task(**stage_task_options(STAGE))
def tensorize_task(raw: ArtifactRef, preprocessor: ArtifactRef, root: str,
                   force: bool = False) -> ArtifactRef:
    """Write the float32 training matrix, target and Ids to Parquet."""
    return build_stage(STAGE, root, {"raw": raw, "preprocessor": preprocessor},
                       lambda out: tensorize(raw, preprocessor, out), force=force)
