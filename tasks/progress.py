"""Progress for whoever in this process wants it (the command line's terminal display),
without terminal code in the stages: training reports ``(candidate, fraction)``, each stage
its state as it starts and ends (``(stage, "Running" | "Completed" | "Cached" | ...)``), and
each registered hook gets it. On a Dask worker no hook is registered, and nothing happens."""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any


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


_SHOWN = [0]  # commands in this process showing the run's stages and results


@contextlib.contextmanager
def shown_by_caller() -> Iterator[None]:
    """Inside the block, a command of this process (``houseprice run``) shows the run's stage
    lines and results; outside it, the flow prints them itself."""
    _SHOWN[0] += 1
    try:
        yield
    finally:
        _SHOWN[0] -= 1


def caller_shows() -> bool:
    return _SHOWN[0] > 0


def flow_run_started() -> None:
    """The pipeline's flow run has started (its id, for a message should it be stopped)."""
    from prefect.runtime import flow_run

    _RUNS.call(str(flow_run.id or ""))


# --- the dashboard's progress bars ----------------------------------------------------


class _ProgressSender:
    """Sends progress-artifact updates from one background thread, so a training loop never
    waits on the API (a blocking update per bar every 5% cost a group of 7 candidates about
    as much as its training on 2 cores). The latest value per artifact wins; ``flush``
    waits until every value given so far has been sent."""

    def __init__(self) -> None:
        self._pending: dict[Any, float] = {}
        self._busy = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def put(self, artifact_id: Any, percent: float) -> None:
        with self._cond:
            self._pending[artifact_id] = percent
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="progress-sender",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._pending, timeout=60):
                    self._thread = None
                    return
                artifact_id, percent = self._pending.popitem()
                self._busy += 1
            try:
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(artifact_id, percent)
            except Exception:  # noqa: BLE001 - progress is advisory; training goes on
                pass
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()


_SENDER = _ProgressSender()


class DashboardProgress:
    """A dashboard progress artifact for one candidate, updated at most every 5% and every
    2 s (each update is an API call, and a group updates all its candidates' bars at once),
    sent in the background (``_ProgressSender``)."""

    MIN_INTERVAL_S = 2.0

    def __init__(self, name: str):
        self.name = name
        self.last = 0.0
        self.last_at = time.monotonic()
        report(name, 0.0)
        from prefect.artifacts import create_progress_artifact

        self.id = create_progress_artifact(
            progress=0.0, key=f"train-progress-{name}"[:64].rstrip("-"),
            description=f"K-fold training of {name}: percent of epochs (or folds) done",
        )

    def update(self, fraction: float) -> None:
        report(self.name, fraction)  # this process's terminal display, if any
        percent = round(100 * fraction, 1)
        now = time.monotonic()
        done = percent >= 100 > self.last
        if done or (percent - self.last >= 5 and now - self.last_at >= self.MIN_INTERVAL_S):
            self.last, self.last_at = percent, now
            _SENDER.put(self.id, percent)
            if done:
                _SENDER.flush()  # the dashboard shows 100% before the task ends
