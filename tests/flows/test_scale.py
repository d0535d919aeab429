"""A run on a generated file of 200,000 training rows (the Kaggle rows resampled with
jitter, as ``benchmarks/scale.py`` makes them), through the real pipeline: the per-fold
features are one base matrix and its maps, not a matrix per fold; the linear kinds fit every
fold from sums; the net's epochs are cut to its step budget."""

from __future__ import annotations

import json

import numpy as np

from benchmarks.scale import make_rows
from tasks.select import lineage
from tasks.storage.artifacts import ArtifactRef, resolve
from tasks.tensorize import read_fold_features
from tests.conftest import small_config

ROWS = 200_000


def test_a_run_on_200_000_rows_keeps_one_matrix_and_fits_every_fold(
        prefect_api, data_server, tmp_path):
    from flows.pipeline import house_price_pipeline

    train = make_rows(ROWS, tmp_path / "train.csv")
    cfg = small_config(
        tmp_path / "arts", data_server.url, tmp_path / "cache", repeats=1,
        candidates=[{"name": "lasso", "kind": "lasso", "alpha": 5e-4, "max_iter": 5000},
                    {"name": "linear", "kind": "linear", "lr": 0.01, "weight_decay": 1e-3,
                     "epochs": 100, "max_steps": 2000}],
        search=[{"base": {"name": "ridge", "kind": "ridge"}, "grid": {"alpha": [10.0]}}],
    )
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": str(train)})})
    result = house_price_pipeline(cfg)
    made_from = lineage(resolve(cfg.artifacts_dir, "select", result["model_version"]))
    (version,) = made_from["tensorize"]
    data = ArtifactRef(root=cfg.artifacts_dir, stage="tensorize", version=version)
    maps = read_fold_features(data, cfg.train.folds)
    F, n, d = maps.shape
    assert (F, n) == (5, ROWS)
    # one base of the matrix and a few columns on disk, not ten matrices
    assert data.file("fold_base.npy").stat().st_size < 1.3 * n * d * 4
    scores = {}
    for v in made_from["train"]:
        ref = ArtifactRef(root=cfg.artifacts_dir, stage="train", version=v)
        metrics = json.loads(ref.file("metrics.json").read_text())
        scores[metrics["candidate"]] = metrics
    # every fold fitted and scored out of fold, on rows that resemble the Kaggle ones
    for name in ("lasso", "ridge-00", "linear"):
        folds = scores[name]["folds"]
        assert len(folds) == F and all(np.isfinite(f["valid_log_rmse"]) for f in folds)
        assert 0.05 < scores[name]["oof_log_rmse_all"] < 0.2
    # 160,000 rows a fold: 2,500 batches of 64, so the budget of 2,000 steps allows 1 epoch
    assert len(scores["linear"]["curves"][0]["valid_log_rmse"]) == 1


def test_stage_seconds_go_on_past_midnight():
    """The log's times carry no date: a run that crosses midnight still gets each stage's
    seconds (this benchmark once reported a download of 86,421 s and a select of -86,265)."""
    import datetime as dt

    from benchmarks.scale import stage_seconds

    start = dt.datetime(2026, 12, 3, 23, 59, 50).timestamp()
    log = "\n".join(
        f"{t} | INFO    | Task run '{stage}' - Finished in state Completed()"
        for t, stage in [("23:59:55.000", "download"), ("23:59:58.500", "preprocess"),
                         ("00:00:04.000", "tensorize"), ("00:10:04.000", "train"),
                         ("00:10:05.000", "select")])
    assert stage_seconds(log, start) == {"download": 5.0, "preprocess": 3.5, "tensorize": 5.5,
                                         "train": 600.0, "select": 1.0}
