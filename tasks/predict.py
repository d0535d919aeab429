"""Stage 6, batch predict: raw Kaggle-shaped rows -> ``Id,SalePrice`` (Kaggle's format).

Rows are read, preprocessed and predicted one chunk at a time, so memory is bounded by the
chunk size, not the file size. Output is written to a temporary file and renamed into place.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from prefect import get_run_logger, task
from pydantic import ValidationError

from tasks.artifacts import ArtifactRef, write_json
from tasks.config import PredictConfig
from tasks.kinds import CandidateConfig, Member, candidate
from tasks.preprocess import ID, DataError, Preprocessor, TransformReport
from tasks.select import CHECKPOINT_FORMAT
from tasks.stage import build_stage, stage_task_options

STAGE = "predict"
# Format 3 has no per-fold preprocessors; 4 may (both read the same otherwise).
READABLE_FORMATS = ("houseprice-checkpoint/3", CHECKPOINT_FORMAT)
HEADER = "Id,SalePrice\n"


class FittedModel:
    """A loaded checkpoint: the preprocessor and its components (a single candidate, or a
    weighted blend), each the average of its fold models in log space. Each component's kind
    loads its own members. With per-fold preprocessing each fold model reads the rows through
    its own fold's preprocessor (as it was trained and scored); the all-rows preprocessor
    then only checks columns and reports drift."""

    def __init__(self, checkpoint: dict[str, Any], source: str = "the checkpoint"):
        if checkpoint.get("format") not in READABLE_FORMATS:
            raise DataError(f"{source} is a {checkpoint.get('format') or 'pre-format'} "
                            f"checkpoint, this code reads {CHECKPOINT_FORMAT}; rerun select "
                            "to rebuild it ('houseprice run --from select')")
        self.target = checkpoint["target"]
        self.preprocessor = Preprocessor.from_dict(checkpoint["preprocessor"])
        self.metrics = checkpoint["metrics"]
        self.components: list[tuple[float, CandidateConfig, list[list[Member]]]] = []
        for comp in checkpoint["components"]:
            try:
                spec = candidate(**comp["model_config"])
            except ValidationError as exc:
                raise DataError(f"{source}: component {comp.get('candidate')!r} has a config "
                                f"this code cannot read ({exc.errors()[0]['msg']}); rerun "
                                "select ('houseprice run --from select')") from None
            folds = [[spec.load_member(m, checkpoint["n_features"], self.target)
                      for m in fold["members"]] for fold in comp["folds"]]
            self.components.append((comp["weight"], spec, folds))
        self.fold_preprocessors = [Preprocessor.from_dict(d) for d in
                                   checkpoint.get("fold_preprocessors") or []]
        for p in self.fold_preprocessors:
            p.layout_index(self.preprocessor.feature_names_)  # a fold's features fit the model's
        if self.fold_preprocessors and any(len(folds) != len(self.fold_preprocessors)
                                           for _, _, folds in self.components):
            raise DataError(f"{source}: {len(self.fold_preprocessors)} fold preprocessors "
                            "but components with another number of folds; rerun select")

    @classmethod
    def load(cls, path: str | Path) -> FittedModel:
        return cls(torch.load(path, map_location="cpu", weights_only=True), str(path))

    def predict_log_price(self, X: np.ndarray) -> np.ndarray:
        """All-rows features ``(n, n_features) float32 -> (n,) float64`` log price (a model
        without per-fold preprocessors; see ``predict_frame``)."""
        if self.fold_preprocessors:
            raise ValueError("this model reads each fold's own features: use predict_frame")
        total = np.zeros(len(X))
        for weight, _, folds in self.components:
            per_fold = [np.mean([m.log_price(X) for m in members], axis=0) for members in folds]
            total += weight * np.mean(per_fold, axis=0)
        return total

    def predict_frame(self, df: pd.DataFrame) -> tuple[np.ndarray, TransformReport]:
        """Raw rows -> ``(n,) float64`` log price, and the drift report (of the all-rows
        preprocessor). With per-fold preprocessors one fold's matrix at a time, so memory
        holds one ``(n, n_features)`` matrix, not one per fold."""
        X, report = self.preprocessor.transform(df)
        if not self.fold_preprocessors:
            return self.predict_log_price(X), report
        del X
        names = self.preprocessor.feature_names_
        sums = np.zeros((len(self.components), len(df)))
        for k, pre in enumerate(self.fold_preprocessors):
            Xk = pre.transform_as(df, names)
            for c, (_, _, folds) in enumerate(self.components):
                sums[c] += np.mean([m.log_price(Xk) for m in folds[k]], axis=0)
        weights = np.array([w for w, _, _ in self.components])
        return weights @ sums / len(self.fold_preprocessors), report


def iter_chunks(path: Path, chunk_size: int, dtypes: dict[str, str]) -> Iterator[pd.DataFrame]:
    """Raw rows of a CSV or Parquet file, ``chunk_size`` at a time."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"input file not found: {path}")
    if suffix == ".csv":
        try:
            yield from pd.read_csv(path, chunksize=chunk_size, dtype=dtypes)
        except pd.errors.EmptyDataError:
            raise DataError(f"{path} is empty: expected at least a header line") from None
    elif suffix in (".parquet", ".pq"):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_size):
            yield batch.to_pandas()
    else:
        raise DataError(f"cannot read {path}: use a .csv or .parquet file")


def predict_file(model: FittedModel, input_path: str | Path, out_path: str | Path,
                 chunk_size: int = 50_000, warn: Callable[[str], None] = print) -> dict[str, Any]:
    """Write ``Id,SalePrice`` for every row of ``input_path`` to ``out_path``."""
    input_path, out_path = Path(input_path), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    pre = model.preprocessor
    rows, drifted, unseen, extra = 0, 0, Counter(), None
    out_of_range, imputed = Counter(), Counter()
    try:
        with open(tmp, "w", newline="") as fh:
            fh.write(HEADER)
            for chunk in iter_chunks(input_path, chunk_size, pre.raw_dtypes()):
                missing = [c for c in [ID, *pre.columns_] if c not in chunk.columns]
                if missing:
                    shown = ", ".join(missing[:10]) + (
                        f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
                    raise DataError(
                        f"{input_path} lacks {len(missing)} column(s): {shown}; it must have "
                        "the Kaggle test file's columns"
                    )
                if extra is None:
                    extra = [c for c in chunk.columns if c not in pre.columns_ and c != ID]
                if len(chunk) == 0:  # a header-only file: an output with just its header
                    continue
                log_price, report = model.predict_frame(chunk)
                unseen.update(report.unseen)
                out_of_range.update(report.out_of_range)
                drifted += report.rows_drifted
                imputed.update(report.missing)
                price = np.exp(log_price)
                pd.DataFrame({ID: chunk[ID].to_numpy(), "SalePrice": price}).to_csv(
                    fh, header=False, index=False
                )
                rows += len(chunk)
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
                 "ignored_columns": extra or []}
        write_json(drift_path(out_path), drift)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
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


def predict(model: ArtifactRef, raw: ArtifactRef, config: PredictConfig, out_dir: Path,
            warn: Callable[[str], None] = print) -> dict[str, Any]:
    """Predict the raw Kaggle test rows into ``submission.csv``."""
    fitted = FittedModel.load(model.file("model.pt"))
    return predict_file(fitted, raw.file("test.csv"), out_dir / "submission.csv",
                        config.chunk_size, warn)


@task(**stage_task_options(STAGE))
def predict_task(model: ArtifactRef, raw: ArtifactRef, config: PredictConfig,
                 root: str, force: bool = False) -> ArtifactRef:
    """Batch-predict the Kaggle test file with the selected model."""
    logger = get_run_logger()
    return build_stage(STAGE, root, {"model": model, "raw": raw, "config": config},
                       lambda out: predict(model, raw, config, out, warn=logger.warning),
                       force=force)
