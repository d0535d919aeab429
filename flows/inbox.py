"""The scoring flow: every file of an inbox scored by the production model. Wiring only.

Deployment entrypoint: ``flows/inbox.py:house_price_score`` (see ``prefect.yaml``).
"""

# No ``from __future__ import annotations``: Prefect builds the parameter model from these
# annotations when a runner loads this file by path.
from typing import Any

from prefect import flow

from tasks.config import ScoreConfig
from tasks.report import announce_failure
from tasks.score import drift_task, inbox_task, score_task
from tasks.stage import StageError, one_line, submit_stage


def _flow_run_name() -> str:
    """``inbox <name> · model <version or production>``: what a run in the list scored."""
    from pathlib import Path

    from prefect.runtime import flow_run

    config = flow_run.parameters.get("config")
    config = config.model_dump() if isinstance(config, ScoreConfig) else (config or {})
    inbox = Path(str(config.get("inbox", "?")).rstrip("/")).name or "?"
    return f"inbox {inbox} · model {config.get('model', 'production')}"


@flow(name="house-price-score", log_prints=True, flow_run_name=_flow_run_name,
      on_failure=[announce_failure])
def house_price_score(config: ScoreConfig) -> dict[str, Any]:
    """Score each inbox file with the production model (Cached when already scored), report
    drift; a file that cannot be scored fails alone, after the others are scored."""
    root = config.artifacts_dir
    model, files = inbox_task(config)
    futures = {f.name: submit_stage(score_task, root, model=model, file=f,
                                    chunk_size=config.chunk_size,
                                    threshold=config.drift_threshold,
                                    interval=config.interval) for f in files}
    scored, failed = [], {}
    for name, future in futures.items():
        state = future.wait() or future.state
        if state.is_completed():
            scored.append(future.result())
        else:
            failed[name] = one_line(future.result(raise_on_failure=False))
    result = drift_task(scored, failed, config.drift_threshold)
    if failed:
        raise StageError(f"{len(failed)} of {len(files)} inbox file(s) could not be scored: "
                         + "; ".join(f"{n}: {why}" for n, why in failed.items()))
    return {**result, "model": model.version}
