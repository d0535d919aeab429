"""Stage 2, preprocess: fit the standardize / one-hot preprocessor (the book's recipe) on the
training rows and save it as JSON. The preprocessing itself is ``tasks/data/features.py``;
the rows are read as Arrow record batches (``tasks/data/rawcsv.py``): one pass checks them,
one gathers the statistics, and neither holds the file whole."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from tasks.config import PreprocessConfig
from tasks.data.features import ID
from tasks.data.rawcsv import fit_streamed, header, scan, scan_types
from tasks.stage import build_stage, stage_task_options
from tasks.storage.artifacts import ArtifactRef, write_json

STAGE = "preprocess"


def preprocess(raw: ArtifactRef, config: PreprocessConfig, out_dir: Path) -> dict[str, Any]:
    """Validate the raw training rows, fit the preprocessor, save it as JSON."""
    train_csv, test_csv = raw.file("train.csv"), raw.file("test.csv")
    test_columns = header(test_csv, "test.csv")
    train = scan(train_csv, "train.csv", expected=[c for c in test_columns if c != ID],
                 codes=config.as_category)
    files = [(train_csv, train)]
    if config.fit_on == "train+test":
        files.append((test_csv, scan(test_csv, "test.csv", training=False,
                                     codes=config.as_category,
                                     types=scan_types(train, test_columns))))
    pre = fit_streamed(files, config)
    write_json(out_dir / "preprocessor.json", pre.to_dict())
    return {
        "n_rows": train.n,
        "n_numeric": len(pre.numeric_),
        "n_categorical": len(pre.categories_),
        "n_features": len(pre.feature_names_),
        "n_log1p": len(pre.log1p_),
    }


@task(**stage_task_options(STAGE))
def preprocess_task(raw: ArtifactRef, config: PreprocessConfig, root: str,
                    force: bool = False) -> ArtifactRef:
    """Fit the standardize/one-hot preprocessor on the raw training rows."""
    ref = build_stage(STAGE, root, {"raw": raw, "config": config},
                      lambda out: preprocess(raw, config, out), force=force)
    get_run_logger().info("preprocess %s: %s", ref.version, ref.manifest()["metrics"])
    return ref
