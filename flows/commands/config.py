"""The run's configuration from a file and the flags, and what a bad one is told."""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import ValidationError


def build_config(args: argparse.Namespace):
    """The PipelineConfig for ``houseprice run``: file, then flags on top."""
    from tasks.config import PipelineConfig, load_config_file

    try:
        data: dict[str, Any] = load_config_file(args.config) if args.config else {}
    except (OSError, ValueError) as exc:  # missing, unreadable or malformed: a usage error
        raise ConfigError(str(exc)) from None

    def put(section: str | None, key: str, value: Any) -> None:
        if value is not None:
            (data.setdefault(section, {}) if section else data)[key] = value

    put("data", "url", args.data_url)
    put("data", "train", args.train)
    put("data", "test", args.test)
    put("data", "on_duplicate", args.on_duplicate)
    put("data", "cache_dir", args.data_dir)
    put(None, "artifacts_dir", args.artifacts)
    put(None, "submission", args.submission)
    put("train", "n_splits", args.folds)
    put("train", "repeats", args.repeats)
    put("train", "seed", args.seed)
    put("train", "fold_scheme", args.fold_scheme)
    put("train", "target", args.target)
    put("train", "device", args.device)
    put("preprocess", "fit_on", args.fit_on)
    put("select", "final", args.final)
    put("select", "min_rows_per_s", args.min_rows_per_s)
    try:
        config = PipelineConfig.model_validate(data)
        return config.with_epochs(args.epochs) if args.epochs is not None else config
    except ValidationError as exc:
        raise ConfigError(config_error(exc, data, args.config)) from None


class ConfigError(ValueError):
    """The run's configuration is invalid (exit 2); the message names the field."""


def where_in_config(loc: tuple[Any, ...], data: dict[str, Any]) -> str:
    """A pydantic error location, a listed candidate named by its name rather than
    ``candidates.0``, and the union's kind tag left out (the message names the kind)."""
    from tasks.kinds import KINDS

    parts = list(loc)
    if len(parts) >= 2 and parts[0] == "candidates" and isinstance(parts[1], int):
        listed = data.get("candidates") or []
        entry = listed[parts[1]] if parts[1] < len(listed) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        if name:
            rest = parts[3:] if len(parts) > 2 and parts[2] in KINDS else parts[2:]
            return f"candidate '{name}'" + "".join(f".{p}" for p in rest)
    return ".".join(str(p) for p in parts) or "config"


def config_error(exc: ValidationError, data: dict[str, Any] | None = None,
                  source: str | None = None) -> str:
    err = exc.errors()[0]
    field = where_in_config(tuple(err["loc"]), data or {})
    msg = err["msg"]
    if err["type"] == "extra_forbidden":  # pydantic's "Extra inputs are not permitted"
        msg = "no such setting" + did_you_mean(tuple(err["loc"]))
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    where = f" in {source}" if source else ""
    return (f"invalid configuration{where}: {field}: {msg}{more}; fix it in "
            + (f"{source} or the flags" if source else "--config or the flags"))


def did_you_mean(loc: tuple) -> str:
    """For an unknown setting at ``loc`` of the config tree: the nearest real one, or the
    section's settings."""
    import difflib

    from pydantic import BaseModel

    from tasks.config import PipelineConfig

    cls: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type)
                                 and issubclass(field.annotation, BaseModel)):
            return ""  # candidates are checked by their kind, with its own hint
        cls = field.annotation
    names = list(cls.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (settings here: {', '.join(names)})"
