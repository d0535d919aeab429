"""Progress for whoever in this process wants it (the command line's terminal display),
without terminal code in the stages: training reports ``(candidate, fraction)``, each stage
its state as it starts and ends (``(stage, "Running" | "Completed" | "Cached" | ...)``), and
each registered hook gets it. On a Dask worker no hook is registered, and nothing happens."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

_HOOKS: list[Callable[[str, float], None]] = []
_STAGE_HOOKS: list[Callable[[str, str], None]] = []
_SCORE_HOOKS: list[Callable[[str, float], None]] = []
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
    _HOOKS.append(hook)
    return lambda: _HOOKS.remove(hook) if hook in _HOOKS else None


def report(candidate: str, fraction: float) -> None:
    """``candidate`` has finished ``fraction`` (0..1) of its training."""
    for hook in list(_HOOKS):
        with contextlib.suppress(Exception):  # progress is advisory; training goes on
            hook(candidate, fraction)


def add_stage_hook(hook: Callable[[str, str], None]) -> Callable[[], None]:
    """Register ``hook(stage, state)``; returns the function that removes it."""
    _STAGE_HOOKS.append(hook)
    return lambda: _STAGE_HOOKS.remove(hook) if hook in _STAGE_HOOKS else None


def stage_state(stage: str, state: str) -> None:
    """``stage`` (a task run's name) is now in ``state`` (a Prefect state name)."""
    for hook in list(_STAGE_HOOKS):
        with contextlib.suppress(Exception):
            hook(stage, state)


def add_score_hook(hook: Callable[[str, float], None]) -> Callable[[], None]:
    """Register ``hook(candidate, valid_log_rmse)``; returns the function that removes it."""
    _SCORE_HOOKS.append(hook)
    return lambda: _SCORE_HOOKS.remove(hook) if hook in _SCORE_HOOKS else None


def report_score(candidate: str, valid_log_rmse: float) -> None:
    """``candidate``'s latest validation log RMSE (mean over its folds so far, or at this
    epoch)."""
    if _MUTED.get():
        return
    for hook in list(_SCORE_HOOKS):
        with contextlib.suppress(Exception):
            hook(candidate, valid_log_rmse)
