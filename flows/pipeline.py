"""The house-price pipeline: six cached stages, wired in order. No data code here.

Deployment entrypoint: ``flows/pipeline.py:house_price_pipeline`` (see ``prefect.yaml``).
"""

# No ``from __future__ import annotations``: Prefect builds the parameter model from these
# annotations when a runner loads this file by path, and string annotations do not resolve.
from typing import Any

from prefect import flow

from tasks import progress
from tasks.config import STAGES, PipelineConfig, Stage, run_name
from tasks.download import download_task, fetch_task
from tasks.predict import predict_task
from tasks.preprocess import preprocess_task
from tasks.promote import promote_task, show_promotion
from tasks.report import announce_failure, name_run, own_output, publish_task, show_on_run
from tasks.select import select_task
from tasks.stage import run_stage
from tasks.storage.store import check
from tasks.tensorize import tensorize_task
from tasks.train import train_all


def _flow_run_name() -> str:
    """``data <version> · config <hash>``: a list of runs reads as what each one computed."""
    from prefect.runtime import flow_run

    config = flow_run.parameters.get("config")
    try:
        config = config if isinstance(config, PipelineConfig) else (
            PipelineConfig.model_validate(config or {}))
    except ValueError:  # an invalid config fails the run with its own message, below
        return "invalid config"
    return run_name(config)


@flow(name="house-price", log_prints=True, flow_run_name=_flow_run_name,
      on_failure=[announce_failure])
def house_price_pipeline(
    config: PipelineConfig = PipelineConfig(),  # noqa: B008
    from_stage: Stage | None = None,
) -> dict[str, Any]:
    """Download, preprocess, tensorize, K-fold train the candidates, select, predict, then
    promote the model if it beats production on rows neither was fitted on.

    ``from_stage`` recomputes that stage and every stage after it on purpose (their cache
    entries are refreshed); the stages before it come back Cached as usual.
    """
    progress.flow_run_started()
    # A served or retried run prints its stage lines and result table as `run` does.
    with own_output() as show_result:
        root = config.artifacts_dir
        check(root)  # an object store that cannot be used: one line, before anything is written
        force = {s: from_stage is not None and STAGES.index(s) >= STAGES.index(from_stage)
                 for s in STAGES}
        snapshot = fetch_task(config.data, root, force=force["download"])
        name_run(config, snapshot.data_version)
        raw = run_stage(download_task, root, force=force["download"], snapshot=snapshot,
                        on_duplicate=config.data.on_duplicate)
        preprocessor = run_stage(preprocess_task, root, force=force["preprocess"], raw=raw,
                                 config=config.preprocess)
        data = run_stage(tensorize_task, root, force=force["tensorize"], raw=raw,
                         preprocessor=preprocessor, **config.tensorize_inputs())
        # One task per group of torch candidates of one shape (trained as one stacked model) and
        # per other candidate, submitted together: they train in parallel on the task runner
        # (threads, or Dask workers), and a failed group reruns alone.
        trained = train_all(root, force=force["train"], data=data,
                            candidates=list(config.all_candidates()), config=config.train)
        model = run_stage(select_task, root, force=force["select"], trained=trained,
                          candidates=list(config.all_candidates()), config=config.train,
                          select=config.select, raw=raw, preprocessor=preprocessor, data=data)
        predictions = run_stage(predict_task, root, force=force["predict"], model=model, raw=raw,
                                config=config.predict)
        promotion = promote_task(model, predictions, raw, config.promote)
        result = publish_task(model, predictions, config.submission, promotion)
        # The results as artifacts of the flow run itself, on its page in the dashboard.
        show_on_run(model, trained)
        show_promotion(model, promotion)
        name_run(config, snapshot.data_version, result)
        show_result(config, result)
    return result


def with_task_runner(kind: str = "threads", address: str | None = None):
    """The pipeline flow on the chosen task runner: Prefect's default thread pool, or Dask
    (a local cluster of ``LocalCluster`` workers, or the scheduler at ``address``)."""
    if kind == "threads":
        return house_price_pipeline
    from prefect_dask import DaskTaskRunner

    runner = (DaskTaskRunner(address=address) if address else DaskTaskRunner(
        cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True,
                        "dashboard_address": None}))
    return house_price_pipeline.with_options(task_runner=runner)


if __name__ == "__main__":
    house_price_pipeline()
