"""Progress for whoever in this process wants it (the command line's terminal display),
without terminal code in the stages: training reports ``(candidate, fraction)``, each stage
its state as it starts and ends (``(stage, "Running" | "Completed" | "Cached" | ...)``), and
each registered hook gets it. On a Dask worker no hook is registered, and nothing happens."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

_HOOKS: list[Callable[[str, float], None]] = []
_STAGE_HOOKS: list[Callable[[str, str], None]] = []


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
