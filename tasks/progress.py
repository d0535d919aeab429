"""Progress for whoever in this process wants it (the command line's terminal display),
without terminal code in the stages: training reports ``(candidate, fraction)``, each stage
its state as it starts and ends (``(stage, "Running" | "Completed" | "Cached" | ...)``), and
each registered hook gets it. On a Dask worker no hook is registered, and nothing happens."""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator


class _Hooks:
    """Functions called with what is reported; a failing one is ignored (progress is
    advisory: training goes on)."""

    def __init__(self) -> None:
        self.hooks: list[Callable[..., None]] = []

    def add(self, hook: Callable[..., None]) -> Callable[[], None]:
        """Register ``hook``; returns the function that removes it."""
        self.hooks.append(hook)
        return lambda: self.hooks.remove(hook) if hook in self.hooks else None

    def call(self, *args: object) -> None:
        for hook in list(self.hooks):
            with contextlib.suppress(Exception):
                hook(*args)


_FRACTIONS, _STAGES, _SCORES, _RUNS = _Hooks(), _Hooks(), _Hooks(), _Hooks()
# Set while fitting what is not cross-validation (the refit on all rows): its "valid" rows are
# its training rows, so its scores are not reported.
_MUTED = contextvars.ContextVar("houseprice_progress_muted", default=False)


@contextlib.contextmanager
def muted() -> Iterator[None]:
    """No scores reported from this thread inside the block."""
    token = _MUTED.set(True)
    try:
        yield
    finally:
        _MUTED.reset(token)


def add_hook(hook: Callable[[str, float], None]) -> Callable[[], None]:
    """Register ``hook(candidate, fraction)``; returns the function that removes it."""
    return _FRACTIONS.add(hook)


class Stopped(RuntimeError):
    """Training was asked to stop (Ctrl-C on the command line)."""


_STOP = threading.Event()


def stop() -> None:
    """Ask every training loop of this process to stop at its next report (an epoch or a
    fold): Ctrl-C then ends a run in seconds, not when the candidates would have finished."""
    _STOP.set()


def resume() -> None:
    """Training may run again (a new run in this process)."""
    _STOP.clear()


def report(candidate: str, fraction: float) -> None:
    """``candidate`` has finished ``fraction`` (0..1) of its training; raises Stopped once
    ``stop()`` was called."""
    if _STOP.is_set():
        raise Stopped(f"{candidate}: stopped by an interrupt")
    _FRACTIONS.call(candidate, fraction)


def add_stage_hook(hook: Callable[[str, str], None]) -> Callable[[], None]:
    """Register ``hook(stage, state)``; returns the function that removes it."""
    return _STAGES.add(hook)


def stage_state(stage: str, state: str) -> None:
    """``stage`` (a task run's name) is now in ``state`` (a Prefect state name)."""
    _STAGES.call(stage, state)


def add_score_hook(hook: Callable[[str, float], None]) -> Callable[[], None]:
    """Register ``hook(candidate, valid_log_rmse)``; returns the function that removes it."""
    return _SCORES.add(hook)


def report_score(candidate: str, valid_log_rmse: float) -> None:
    """``candidate``'s latest validation log RMSE (mean over its folds so far, or at this
    epoch); nothing inside ``muted()``."""
    if not _MUTED.get():
        _SCORES.call(candidate, valid_log_rmse)


def add_run_hook(hook: Callable[[str], None]) -> Callable[[], None]:
    """Register ``hook(flow_run_id)``, called as a flow run of the pipeline starts."""
    return _RUNS.add(hook)


def flow_run_started() -> None:
    """The pipeline's flow run has started (its id, for a message should it be stopped)."""
    from prefect.runtime import flow_run

    _RUNS.call(str(flow_run.id or ""))
