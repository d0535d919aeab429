"""Stage 2, preprocess: fit the standardize / one-hot preprocessor (the book's recipe).

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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import get_run_logger, task

from tasks.artifacts import ArtifactRef, write_json
from tasks.config import PreprocessConfig
from tasks.stage import build_stage, stage_task_options

STAGE = "preprocess"
ID = "Id"
TARGET = "SalePrice"
FORMAT = "houseprice-preprocessor/1"


class DataError(ValueError):
    """Input rows that cannot be used, with what is wrong and where."""


def read_csv(path: str | Path) -> pd.DataFrame:
    """Read a raw Kaggle-shaped CSV ('NA' is missing, as in the book)."""
    path = Path(path)
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty: expected a header and rows") from None


def validate_training_frame(df: pd.DataFrame, source: str = "training data") -> None:
    """Raise DataError unless ``df`` has unique Ids and a positive numeric SalePrice."""
    missing = [c for c in (ID, TARGET) if c not in df.columns]
    if missing:
        raise DataError(f"{source} lacks column(s) {', '.join(missing)}")
    if len(df) == 0:
        raise DataError(f"{source} has a header but no rows")
    if not pd.api.types.is_numeric_dtype(df[TARGET]):
        bad = pd.to_numeric(df[TARGET], errors="coerce").isna() & df[TARGET].notna()
        row = df.loc[bad, ID].iloc[0]
        raise DataError(f"{source}: {TARGET} is not numeric (first bad row Id={row})")
    bad = ~(df[TARGET] > 0)
    if bad.any():
        ids = df.loc[bad, ID].head(5).tolist()
        raise DataError(f"{source}: {TARGET} must be positive; bad rows Id={ids}")
    dup = df[ID].duplicated()
    if dup.any():
        raise DataError(f"{source}: duplicate Id values {df.loc[dup, ID].head(5).tolist()}")


@dataclass
class Preprocessor:
    """Standardize numerics and one-hot categoricals; ``fit`` learns, ``transform`` applies.

    Fitted state (attributes ending in ``_``) round-trips through ``to_dict``/``from_dict``
    as plain JSON, so a saved model never needs pickle.
    """

    numeric_: dict[str, tuple[float, float]] = field(default_factory=dict)  # col -> (mean, std)
    categories_: dict[str, list[str]] = field(default_factory=dict)
    columns_: list[str] = field(default_factory=list)  # raw feature columns, in order

    def fit(self, frames: Iterable[pd.DataFrame]) -> Preprocessor:
        """Learn statistics from the feature columns of ``frames`` (no Id, no SalePrice)."""
        features = pd.concat(
            [f.drop(columns=[c for c in (ID, TARGET) if c in f.columns]) for f in frames],
            ignore_index=True,
        )
        self.columns_ = list(features.columns)
        self.numeric_, self.categories_ = {}, {}
        for col in self.columns_:
            values = features[col]
            if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
                std = float(values.std())
                # A constant (or single-valued) column: keep it at 0 rather than divide by 0.
                self.numeric_[col] = (float(values.mean()), std if std > 0 else 1.0)
            else:
                self.categories_[col] = sorted(values.dropna().astype(str).unique().tolist())
        return self

    @property
    def feature_names_(self) -> list[str]:
        names = list(self.numeric_)
        for col, cats in self.categories_.items():
            names += [f"{col}_{c}" for c in cats] + [f"{col}_nan"]
        return names

    def missing_columns(self, df: pd.DataFrame) -> list[str]:
        return [c for c in self.columns_ if c not in df.columns]

    def transform(self, df: pd.DataFrame) -> tuple[np.ndarray, dict[str, int]]:
        """Features of ``df`` as ``(n_rows, n_features) float32`` and per-column counts of
        categories unseen in training (encoded as all zeros)."""
        missing = self.missing_columns(df)
        if missing:
            raise DataError(f"input lacks column(s) {', '.join(missing)}")
        n = len(df)
        out = np.zeros((n, len(self.feature_names_)), dtype=np.float32)
        for j, (col, (mean, std)) in enumerate(self.numeric_.items()):
            values = _numeric(df, col)
            out[:, j] = np.nan_to_num((values - mean) / std, nan=0.0)
        offset = len(self.numeric_)
        unseen: dict[str, int] = {}
        rows = np.arange(n)
        for col, cats in self.categories_.items():
            raw = df[col]
            present = raw.notna().to_numpy()
            codes = pd.Categorical(raw.astype("string"), categories=cats).codes.astype(np.int64)
            hit = codes >= 0
            out[rows[hit], offset + codes[hit]] = 1.0
            out[rows[~present], offset + len(cats)] = 1.0
            n_unseen = int((present & ~hit).sum())
            if n_unseen:
                unseen[col] = n_unseen
            offset += len(cats) + 1
        return out, unseen

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "columns": self.columns_,
            "numeric": {c: {"mean": m, "std": s} for c, (m, s) in self.numeric_.items()},
            "categorical": self.categories_,
            "feature_names": self.feature_names_,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessor:
        if d.get("format") != FORMAT:
            raise DataError(f"not a {FORMAT} preprocessor (format={d.get('format')!r})")
        return cls(
            numeric_={c: (v["mean"], v["std"]) for c, v in d["numeric"].items()},
            categories_={c: list(v) for c, v in d["categorical"].items()},
            columns_=list(d["columns"]),
        )

    def raw_dtypes(self) -> dict[str, str]:
        """dtypes to read raw files with, so a chunk never guesses a category is a number."""
        return {c: "string" for c in self.categories_}


def _numeric(df: pd.DataFrame, col: str) -> np.ndarray:
    values = df[col]
    if pd.api.types.is_numeric_dtype(values):
        return values.to_numpy(dtype=np.float64, na_value=np.nan)
    parsed = pd.to_numeric(values, errors="coerce")
    bad = parsed.isna() & values.notna() & (values.astype("string").str.strip() != "")
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        where = f"Id={df[ID].iloc[pos]}" if ID in df.columns else f"row {pos + 1}"
        raise DataError(
            f"column {col} must be numeric but has {str(values.iloc[pos])!r} at {where}"
        )
    return parsed.to_numpy(dtype=np.float64, na_value=np.nan)


def fit_preprocessor(train: pd.DataFrame, test: pd.DataFrame | None = None) -> Preprocessor:
    """Fit on ``train`` (and ``test`` too when given: the book's recipe)."""
    frames = [train] if test is None else [train, test]
    return Preprocessor().fit(frames)


def load_preprocessor(path: Path) -> Preprocessor:
    return Preprocessor.from_dict(json.loads(Path(path).read_text()))


def preprocess(raw: ArtifactRef, config: PreprocessConfig, out_dir: Path) -> dict[str, Any]:
    """Validate the raw training rows, fit the preprocessor, save it as JSON."""
    train = read_csv(raw.file("train.csv"))
    validate_training_frame(train, "train.csv")
    test = read_csv(raw.file("test.csv")) if config.fit_on == "train+test" else None
    pre = fit_preprocessor(train, test)
    write_json(out_dir / "preprocessor.json", pre.to_dict())
    return {
        "n_rows": len(train),
        "n_numeric": len(pre.numeric_),
        "n_categorical": len(pre.categories_),
        "n_features": len(pre.feature_names_),
    }


@task(**stage_task_options(STAGE))
def preprocess_task(raw: ArtifactRef, config: PreprocessConfig, root: str) -> ArtifactRef:
    """Fit the standardize/one-hot preprocessor on the raw training rows."""
    ref = build_stage(STAGE, root, {"raw": raw, "config": config},
                      lambda out: preprocess(raw, config, out))
    get_run_logger().info("preprocess %s: %s", ref.version, ref.manifest()["metrics"])
    return ref
