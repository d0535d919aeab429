"""The house-price pipeline: six cached stages, wired in order. No data code here.

Deployment entrypoint: ``flows/pipeline.py:house_price_pipeline``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.config import PipelineConfig
from tasks.download import download_task
from tasks.predict import predict_task
from tasks.preprocess import preprocess_task
from tasks.report import publish_task
from tasks.select import select_task
from tasks.stage import run_stage, submit_stage
from tasks.tensorize import tensorize_task
from tasks.train import train_task


@flow(name="house-price", log_prints=True)
def house_price_pipeline(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:  # noqa: B008
    """Download, preprocess, tensorize, K-fold train the candidates, select, predict."""
    root = config.artifacts_dir
    raw = run_stage(download_task, root, data=config.data)
    preprocessor = run_stage(preprocess_task, root, raw=raw, config=config.preprocess)
    data = run_stage(tensorize_task, root, raw=raw, preprocessor=preprocessor)
    # One task per candidate, submitted together: they train in parallel on the task
    # runner, and a failed candidate reruns alone.
    futures = [
        submit_stage(train_task, root, data=data, candidate=candidate, config=config.train)
        for candidate in config.all_candidates()
    ]
    trained = [f.result() for f in futures]
    model = run_stage(select_task, root, trained=trained,
                      candidates=list(config.all_candidates()), config=config.train)
    predictions = run_stage(predict_task, root, model=model, raw=raw, config=config.predict)
    return publish_task(model, predictions, config.submission)


if __name__ == "__main__":
    house_price_pipeline()
