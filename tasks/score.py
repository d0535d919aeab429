"""The scoring flow's stages: list an inbox, score each new file with a model, report drift.

Each (model version, file) is one cached, versioned ``score`` artifact (``predictions.csv``,
``drift.json``): the same file scored by the same model again comes back Cached, and a new
production model scores every file again. A file over the drift threshold emits a
``houseprice.drift.detected`` Prefect event that an Automation can act on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from tasks.config import ScoreConfig
from tasks.data.sources import SourceError, list_source
from tasks.download import SourceFile, fetch_source, source_folder
from tasks.inference.batch import load_model, load_ranges, predict_file
from tasks.inference.intervals import INTERVALS_JSON
from tasks.stage import build_stage, failing_as, stage_task_options, stage_version
from tasks.storage.artifacts import ArtifactRef, is_complete, resolve, write_json

STAGE = "score"
DRIFT_KEY = "house-price-drift"
DRIFT_EVENT = "houseprice.drift.detected"


@task(name="inbox", task_run_name="inbox", cache_policy=NO_CACHE)
def inbox_task(config: ScoreConfig) -> tuple[ArtifactRef, tuple[SourceFile, ...]]:
    """Resolve the model (production by default) and fetch the inbox's files (only what
    changed since the last run)."""
    logger = get_run_logger()
    with failing_as(STAGE):
        model = resolve(config.artifacts_dir, "select", config.model)
        try:
            listed = list_source(config.inbox, config.timeout_s)
        except SourceError as exc:
            raise SourceError(f"inbox: {exc}") from None
        folder, memo = source_folder(Path(config.cache_dir), config.inbox)
        files = fetch_source(config.inbox, listed, folder, memo, {}, config,
                             log=logger.warning)
    logger.info(f"scoring {len(files)} file(s) of {config.inbox} with model {model.version}")
    return model, files


def score(model: ArtifactRef, file: SourceFile, chunk_size: int, out_dir: Path,
          warn=print, interval: float | None = None) -> dict[str, Any]:
    """Predict every row of ``file`` into ``predictions.csv`` (``Id,SalePrice``, and the
    range at level ``interval`` in ``SalePrice_lo,SalePrice_hi``), with its drift summary
    in ``drift.json``."""
    fitted = load_model(model)
    ranges = None
    if interval is not None:
        if model.file(INTERVALS_JSON).is_file():
            ranges = load_ranges(model, interval)
        else:  # a production model from before ranges still scores, without them
            warn(f"model {model.version} has no calibrated ranges (it predates them): prices "
                 "without SalePrice_lo, SalePrice_hi; rebuild it with 'houseprice run --from "
                 "select' and promote it")
    # predict_file names errors after the input path; the inbox file's name says more.
    local = Path(file.path)
    drift = predict_file(fitted, local, out_dir / "predictions.csv", chunk_size, warn, ranges)
    (out_dir / "predictions.drift.json").unlink()  # written again below, with its file
    drift = {"file": file.name, "sha1": file.sha1, "model": model.version, **drift}
    write_json(out_dir / "drift.json", drift)
    return {k: drift[k] for k in ("file", "rows", "rows_drifted", "share_drifted")}


@task(**stage_task_options(STAGE))
def score_task(model: ArtifactRef, file: SourceFile, chunk_size: int, threshold: float,
               root: str, interval: float | None = None, force: bool = False) -> ArtifactRef:
    """Score one inbox file with one model (cached on both); a newly scored file over the
    drift threshold emits a ``houseprice.drift.detected`` event (once per model and file,
    not on every run that finds it Cached)."""
    logger = get_run_logger()
    # The same inputs as the task's cache key (chunk_size, threshold: how, not what).
    inputs = {"model": model, "file": file, "chunk_size": chunk_size, "threshold": threshold,
              "interval": interval}
    fresh = force or not is_complete(ArtifactRef(root=root, stage=STAGE,
                                                 version=stage_version(STAGE, inputs)))
    ref = build_stage(STAGE, root, inputs,
                      lambda out: score(model, file, chunk_size, out, warn=logger.warning,
                                        interval=interval),
                      force=force)
    drift = json.loads(ref.file("drift.json").read_text())
    if fresh and drift["share_drifted"] > threshold:
        emit_event(
            event=DRIFT_EVENT,
            resource={"prefect.resource.id": f"houseprice.inbox-file.{file.sha1}",
                      "prefect.resource.name": file.name},
            payload={"file": file.name, "sha1": file.sha1, "rows": drift["rows"],
                     "rows_drifted": drift["rows_drifted"], "share": drift["share_drifted"],
                     "threshold": threshold, "model": model.version},
        )
        logger.warning(f"{file.name}: {drift['share_drifted']:.1%} of rows out of the training "
                       f"range or in unseen categories (threshold {threshold:.1%}); event "
                       f"{DRIFT_EVENT} emitted")
    return ref


@task(name="drift", task_run_name="drift", cache_policy=NO_CACHE)
def drift_task(scored: list[ArtifactRef], failed: dict[str, str],
               threshold: float) -> dict[str, Any]:
    """The drift table artifact: one row per file, those over ``threshold`` marked."""
    rows, drifting = [], []
    for ref in scored:
        d = json.loads(ref.file("drift.json").read_text())
        over = d["share_drifted"] > threshold
        rows.append({"file": d["file"], "rows": d["rows"], "rows drifted": d["rows_drifted"],
                     "share drifted": round(d["share_drifted"], 4),
                     "drift": "over threshold" if over else "ok",
                     "out of range": sum(d["out_of_training_range"].values()),
                     "unseen categories": sum(d["unseen_categories"].values()),
                     "model": d["model"], "predictions": str(ref.file("predictions.csv"))})
        if over:
            drifting.append(d["file"])
    rows += [{"file": name, "rows": None, "rows drifted": None, "share drifted": None,
              "drift": f"failed: {why}", "out of range": None, "unseen categories": None,
              "model": None, "predictions": None} for name, why in failed.items()]
    if rows:
        create_table_artifact(key=DRIFT_KEY, table=rows,
                              description="Drift of each scored inbox file")
    return {"scored": [r["file"] for r in rows if r["rows"] is not None],
            "drifting": drifting, "failed": failed,
            "predictions": {r["file"]: r["predictions"] for r in rows if r["predictions"]}}
