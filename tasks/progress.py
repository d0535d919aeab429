"""Training progress for whoever in this process wants it (the command line's terminal
display), without terminal code in the stages: a stage reports ``(candidate, fraction)``, and
each registered hook gets it. On a Dask worker no hook is registered, and nothing happens."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

_HOOKS: list[Callable[[str, float], None]] = []


def add_hook(hook: Callable[[str, float], None]) -> Callable[[], None]:
    """Register ``hook(candidate, fraction)``; returns the function that removes it."""
    _HOOKS.append(hook)
    return lambda: _HOOKS.remove(hook) if hook in _HOOKS else None


def report(candidate: str, fraction: float) -> None:
    """``candidate`` has finished ``fraction`` (0..1) of its training."""
    for hook in list(_HOOKS):
        with contextlib.suppress(Exception):  # progress is advisory; training goes on
            hook(candidate, fraction)
