"""Stage 6, batch predict: the Kaggle test rows -> ``submission.csv`` (``Id,SalePrice``), with
the selected model's compiled plan (``tasks/inference/batch.py`` does the work)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from tasks.config import PredictConfig
from tasks.data.features import DataError  # noqa: F401 - re-exported
from tasks.inference.batch import drift_path, load_model, predict_file  # noqa: F401 - re-exported
from tasks.inference.checkpoint import FittedModel  # noqa: F401 - re-exported
from tasks.stage import build_stage, stage_task_options
from tasks.storage.artifacts import ArtifactRef

STAGE = "predict"


def predict(model: ArtifactRef, raw: ArtifactRef, config: PredictConfig, out_dir: Path,
            warn: Callable[[str], None] = print) -> dict[str, Any]:
    """Predict the raw Kaggle test rows into ``submission.csv``."""
    return predict_file(load_model(model), raw.file("test.csv"), out_dir / "submission.csv",
                        config.chunk_size, warn)


@task(**stage_task_options(STAGE))
def predict_task(model: ArtifactRef, raw: ArtifactRef, config: PredictConfig,
                 root: str, force: bool = False) -> ArtifactRef:
    """Batch-predict the Kaggle test file with the selected model."""
    logger = get_run_logger()
    return build_stage(STAGE, root, {"model": model, "raw": raw, "config": config},
                       lambda out: predict(model, raw, config, out, warn=logger.warning),
                       force=force)
