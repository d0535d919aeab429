"""The model registry's commands: ``houseprice predict`` (with a registered model),
``models``, ``promote``, ``rollback`` and ``check`` (the store they live in)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def predict(args: argparse.Namespace) -> int:
    from flows.commands.config import ConfigError
    from tasks.inference.batch import load_model, load_ranges, predict_file
    from tasks.inference.intervals import check_level
    from tasks.inference.plan import check_device
    from tasks.layout import default_artifacts_dir
    from tasks.storage.artifacts import resolve

    if args.chunk_size <= 0:
        raise ValueError("--chunk-size must be a positive number of rows")
    device = check_device(args.device)  # before anything is read or written
    if args.interval is not None:
        try:
            check_level(args.interval)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    ref = resolve(args.artifacts or default_artifacts_dir(), "select", args.model)
    model = load_model(ref)
    model.torch_device = device
    ranges = None if args.interval is None else load_ranges(ref, args.interval)

    def warn(msg: str) -> None:
        print(f"houseprice: warning: {msg}", file=sys.stderr)

    what = f"(model {ref.version}: {model.describe}" + (
        "" if ranges is None else f"; {ranges[1]:.0%} ranges") + ")"
    if args.out != "-":
        stats = predict_file(model, Path(args.input), Path(args.out), args.chunk_size, warn,
                             ranges)
        print(f"houseprice: wrote {stats['rows']} predictions to {args.out} {what}")
        return 0
    # '-': the CSV on standard output, everything a person reads on standard error.
    import shutil
    import tempfile

    from tasks.inference.batch import drift_path

    with tempfile.TemporaryDirectory(prefix="houseprice-predict-") as tmp:
        out = Path(tmp) / "predictions.csv"
        stats = predict_file(model, Path(args.input), out, args.chunk_size, warn, ranges)
        with out.open() as f:
            shutil.copyfileobj(f, sys.stdout)
        sys.stdout.flush()
        drift = json.loads(drift_path(out).read_text())
    print(f"houseprice: wrote {stats['rows']} predictions to standard output {what}; drift: "
          f"{json.dumps(drift)}", file=sys.stderr)
    return 0


def models(args: argparse.Namespace) -> int:
    from tasks.config import default_artifacts_dir

    root = args.artifacts or default_artifacts_dir()
    from tasks.promote import list_models

    rows = list_models(root)
    if not rows:
        print(f"houseprice: no models under {root}; run 'houseprice run' first")
        return 0
    print(f"{'':2}{'version':<17} {'created':<20} {'data':<17} {'rows':>5} "
          f"{'OOF all':>8} {'OOF w/o':>8}  selected")
    for r in rows:
        fmt = (lambda v: "—" if v is None else f"{v:.4f}")  # noqa: E731
        print(f"{'*' if r['production'] else ' ':2}{r['version']:<17} {r['created']:<20} "
              f"{str(r['data_version']):<17} {str(r['n_rows'] or '—'):>5} "
              f"{fmt(r['oof_log_rmse_all']):>8} {fmt(r['oof_log_rmse_clean']):>8}  "
              f"{r['selected']}")
    print("(* production)")
    return 0


def promote(args: argparse.Namespace) -> int:
    from tasks.config import default_artifacts_dir
    from tasks.promote import promote_by_hand

    root = args.artifacts or default_artifacts_dir()
    before = _production(root)
    entry = promote_by_hand(root, args.version)
    print(f"houseprice: {entry['model']} is production ({entry['reason']})"
          + _announce(root, entry, before), flush=True)
    return 0


def rollback(args: argparse.Namespace) -> int:
    from tasks.config import default_artifacts_dir
    from tasks.promote import rollback

    root = args.artifacts or default_artifacts_dir()
    before = _production(root)
    entry = rollback(root)
    print(f"houseprice: {entry['model']} is production again ({entry['reason']})"
          + _announce(root, entry, before), flush=True)
    return 0


def _production(root: str) -> str | None:
    from tasks.storage.artifacts import read_production

    current = read_production(root)
    return current.get("model") if current else None


def _announce(root: str, entry: dict, before: str | None) -> str:
    """The ``houseprice.model.promoted`` event of a model made production by hand, sent to
    the server whose automations would hear it: the user's (PREFECT_API_URL) or the local
    one kept for this Prefect home. With neither running, nothing could hear it, and none is
    started for it. Returns what the command's line adds."""
    from flows.commands.server import kept_status, user_api

    url = user_api() or next((s["url"] for s in kept_status()), None)
    if url is None:
        return ""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.commands.run import send_events
    from tasks.promote import PROMOTED_EVENT, announce_promotion

    with temporary_settings({PREFECT_API_URL: url}):
        announce_promotion(root, entry["model"], {
            "champion": before, "reason": entry["reason"], "basis": entry["action"],
            "data_version": entry.get("data_version")})
        send_events()
    return f"; {PROMOTED_EVENT} sent to {url}"


def check(args: argparse.Namespace) -> int:
    """Print each problem of the store on its own line; exit 1 if there is any."""
    from tasks.check import check_root
    from tasks.layout import default_artifacts_dir
    from tasks.storage.store import canonical, check

    root = canonical(args.artifacts or default_artifacts_dir())
    check(root)  # a missing bucket or refused credentials: one line, as everywhere
    problems, counts = check_root(root)
    for problem in problems:
        print(f"houseprice: check: {problem}")
    what = (f"{counts['versions']} versions of {counts['stages']} stages, "
            f"{counts['records']} cache records, production and pointers under {root}")
    if problems:
        print(f"houseprice: check: {len(problems)} problem(s) in {what}", file=sys.stderr)
        return 1
    print(f"houseprice: check: ok: {what}")
    return 0

