"""After the stages: publish a run's results (the flow run's dashboard artifacts, the
submission copy). Not cached: every run, cached or not, shows its results."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks import progress
from tasks.storage.artifacts import ArtifactRef, require

METRICS_KEY = "house-price-metrics"
MODEL_CARD_KEY = "house-price-model-card"
CURVES_KEY = "house-price-learning-curves"


CURVES_SHOWN = 6


def in_reading_order(board: dict[str, Any]) -> list[dict[str, Any]]:
    """The leaderboard's table rows with their columns in reading order (candidate, selected,
    scores, folds, weight, speed, status): the dashboard shows a table's columns in the
    order of its first row's keys, and the JSON file has them sorted."""
    columns = board.get("table_columns") or []
    return [{**{c: row[c] for c in columns if c in row}, **row} for row in board["table"]]


def curves_markdown(trained: list[ArtifactRef], shown: int = CURVES_SHOWN) -> str:
    """The learning-curve PNGs of the best ``shown`` torch candidates (by out-of-fold log
    RMSE on all rows) embedded as data URIs: Prefect's UI renders markdown images, and a
    data URI needs no file server the browser could reach. All of a wide search's curves
    (24 × 70 KB) would pass Prefect's event size limit and make a slow page; every PNG stays
    in its train artifact."""
    curves = []
    for ref in trained:
        png = ref.path / "learning_curves.png"
        if not png.is_file():
            continue  # scikit-learn candidates have no epochs
        metrics = json.loads(ref.file("metrics.json").read_text())
        score = metrics.get("oof_log_rmse_all")
        curves.append((score if score is not None else float("inf"), metrics["candidate"], png))
    curves.sort(key=lambda c: (c[0], c[1]))
    parts = ["# Learning curves", "",
             "Train (solid) and valid (dashed) log RMSE per epoch, one line per fold; right: "
             "the mean gradient norm per epoch.", ""]
    if len(curves) > shown:
        parts += [f"The best {shown} of {len(curves)} torch candidates by out-of-fold log RMSE "
                  "on all rows; each candidate's PNG is in its train artifact.", ""]
    for score, name, png in curves[:shown]:
        data = base64.b64encode(png.read_bytes()).decode()
        label = f"{name} (out-of-fold log RMSE {score:.4f})" if score != float("inf") else name
        parts += [f"## {label}", "", f"![{name} learning curves](data:image/png;base64,{data})",
                  "", f"`{png}`", ""]
    return "\n".join(parts)


def copy_atomic(src: Path, dest: Path) -> None:
    dest = dest.expanduser().resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def name_run(config, data_version: str, result: dict[str, Any] | None = None) -> None:
    """Rename the running flow run after its data version, known once the sources are
    listed (a run of a changing source starts with the source's name); and, with the run's
    ``result``, after what it selected and scored and whether it promoted, so that a list of
    runs tells them apart."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    from tasks.config import run_name

    if flow_run.id is None:
        return
    name = run_name(config, data_version)
    if result is not None:
        name += f" · {result_label(result)}"
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, name=name)


FAILED_EVENT = "houseprice.run.failed"


def announce_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """A flow's ``on_failure`` hook: a ``houseprice.run.failed`` event about the run, which
    the notify-on-failure automation hears at once. Prefect's own state events of a served
    run can reach the server's triggers up to 15 minutes late: its runner reports the
    Submitting state outside the server's event stream, and the triggers hold each later
    event of the run until they have seen the one it follows."""
    from prefect.events import emit_event

    emit_event(
        event=FAILED_EVENT,
        resource={"prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
                  "prefect.resource.name": flow_run.name},
        related=[{"prefect.resource.id": f"prefect.flow.{flow_run.flow_id}",
                  "prefect.resource.role": "flow", "prefect.resource.name": flow.name}],
        payload={"flow": flow.name, "state": state.name, "message": state.message or ""},
    )


def result_label(result: dict[str, Any]) -> str:
    """``lasso 0.1130 · promoted``: the selected candidate, its all-rows out-of-fold log
    RMSE, and the gate's verdict (none when the model was production already)."""
    promotion = result["promotion"]
    verdict = ("" if promotion["basis"] == "same model"
               else " · promoted" if promotion["promote"] else " · not promoted")
    return f"{result['selected']} {result['oof_log_rmse_all']:.4f}{verdict}"


def show_on_run(model: ArtifactRef, trained: list[ArtifactRef]) -> None:
    """The result table, the model card and the learning curves as artifacts of the flow
    run itself (called from the flow, not a task: the dashboard's run page lists only the
    artifacts of no task run in its Artifacts tab)."""
    require(model)
    board = json.loads(model.file("leaderboard.json").read_text())
    create_table_artifact(
        key=METRICS_KEY, table=in_reading_order(board),
        description="Valid log RMSE per fold and candidate (best first)",
    )
    create_markdown_artifact(
        key=MODEL_CARD_KEY, markdown=model.file("model_card.md").read_text(),
        description="The selected model",
    )
    create_markdown_artifact(
        key=CURVES_KEY, markdown=curves_markdown(trained),
        description="Learning curves of the best torch candidates (PNG, as in the book)",
    )


@task(name="publish", task_run_name="publish", cache_policy=NO_CACHE)
def publish_task(model: ArtifactRef, predictions: ArtifactRef, submission: str | None,
                 promotion: dict[str, Any]) -> dict[str, Any]:
    """Copy the submission; the result says what the promotion gate decided."""
    require(model)
    require(predictions)
    if submission:
        copy_atomic(predictions.file("submission.csv"), Path(submission))
    metrics = model.manifest()["metrics"]
    return {
        **metrics,
        "model_version": model.version,
        "predictions_version": predictions.version,
        "submission": str(predictions.file("submission.csv")),
        "promotion": promotion,
    }


# Matplotlib is not thread-safe (its font-config parsing with pyparsing fails at random when
# two candidates' threads plot at once: "ParseException ... in parse action"), so one plot
# at a time per process.
_PLOT_LOCK = threading.Lock()
def plot_curves(curves: list[dict[str, list[float]]], title: str, path: Path) -> None:
    """The book's learning-curve plot (train and valid log RMSE per epoch, one line a fold),
    and beside it the mean gradient norm per epoch (vanishing or exploding gradients)."""
    with _PLOT_LOCK:
        _plot_curves(curves, title, path)


def _plot_curves(curves: list[dict[str, list[float]]], title: str, path: Path) -> None:
    # One LineCollection per series and fixed margins instead of a line per fold and
    # tight_layout: half the time, and a default run draws some 25 of these.
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(10, 4), dpi=80)
    ax, gx = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.91, wspace=0.28)
    series = (("train_log_rmse", ax, {"color": "C0"}),
              ("valid_log_rmse", ax, {"color": "C1", "linestyle": "--"}),
              ("grad_norm", gx, {"color": "C2"}))
    for key, axes, style in series:
        lines = []
        for c in curves:
            v = np.asarray(c[key], dtype=np.float64)
            v[~(np.isfinite(v) & (v > 0))] = np.nan  # a diverged epoch: a gap, not a scale
            lines.append(np.column_stack([np.arange(1, len(v) + 1), v]))
        axes.add_collection(LineCollection(lines, alpha=0.6, **style))
    for axes, keys in ((ax, ("train_log_rmse", "valid_log_rmse")), (gx, ("grad_norm",))):
        v = np.array([x for c in curves for k in keys for x in c[k]], dtype=np.float64)
        v = v[np.isfinite(v) & (v > 0)]
        longest = max((len(c[keys[0]]) for c in curves), default=1)
        axes.set_xlim(1, max(longest, 2))
        # Nothing finite (a candidate diverged at once): an empty log axis, not an error.
        axes.set_ylim(*((v.min() / 1.1, v.max() * 1.1) if v.size else (0.01, 1.0)))
        axes.set_yscale("log")
        axes.grid(True, alpha=0.3)
    ax.set(xlabel="epoch", ylabel="log RMSE", title=title)
    gx.set(xlabel="epoch", ylabel="gradient norm (mean per step)",
           title="gradient norm, one line a fold")
    ax.legend(handles=[Line2D([], [], color="C0", label="train"),
                       Line2D([], [], color="C1", linestyle="--", label="valid")])
    fig.savefig(path)


def stage_line(name: str, state: str, took: float) -> str:
    """A stage's line as it ends: ``select · Completed in 3.1 s``, ``download · Cached``."""
    return (f"houseprice: {name} · {state}"
            + (f" in {took:.1f} s" if state == "Completed" else ""))


@contextlib.contextmanager
def own_output() -> Iterator[Callable[[Any, dict[str, Any]], None]]:
    """For the pipeline's flow: when no command of this process shows the run (a served
    run, a worker's, a retry from the dashboard), its stage lines as ``houseprice run``
    prints them; yields the function that prints the result table and summary line (a
    no-op when a command shows them)."""
    if progress.caller_shows():
        yield lambda config, result: None
        return
    remove = progress.add_stage_hook(StageLines())

    def show(config, result: dict[str, Any]) -> None:
        sys.stdout.write(result_table(config, result) + "\n" + summary_line(config, result)
                         + "\n")
        sys.stdout.flush()

    try:
        yield show
    finally:
        remove()


class StageLines:
    """A ``tasks.progress`` stage hook writing each stage's line as it ends, for a run no
    terminal display watches (one started by ``houseprice serve``, a worker, the dashboard's
    Retry): the runner passes the flow process's output on to its own."""

    def __init__(self, out=None) -> None:
        self.out, self.clock, self.started = out or sys.stdout, time.monotonic, {}

    def __call__(self, name: str, state: str) -> None:
        if state == "Running":
            self.started[name] = self.clock()
            return
        took = self.clock() - self.started.pop(name, self.clock())
        # Written, not print()ed: the flow's log_prints would send a print to its log.
        self.out.write(stage_line(name, state, took) + "\n")
        self.out.flush()


def result_table(config, result: dict[str, Any], shown: int = 12,
                 log: Path | None = None) -> str:
    """The end of ``houseprice run`` as a person reads it: the candidates best first (the
    all-rows score, its spread over repeats, the score without the outliers, blend weight,
    predict speed of its compiled plan alone, status), the selection, and where everything
    was written."""
    from tasks.data.folds import cv_label
    from tasks.storage.artifacts import ArtifactRef

    root = config.artifacts_dir
    model = ArtifactRef(root=root, stage="select", version=result["model_version"])
    board = json.loads(model.file("leaderboard.json").read_text())["leaderboard"]
    meta = model.manifest()["metrics"]

    def score(m: dict[str, Any], key: str) -> str:
        return "—" if m.get(key) is None else f"{m[key]:.4f}"

    rows = [("candidate", "all rows", "± repeats", "w/o outliers", "weight", "rows/s",
             "status")]
    for m in board[:shown]:
        chosen = m["candidate"] == result["selected"]
        weight = m.get("blend_weight")
        rows.append((
            m["candidate"] + (" *" if chosen else ""), score(m, "oof_log_rmse_all"),
            score(m, "oof_log_rmse_all_spread"), score(m, "oof_log_rmse_clean"),
            "" if not weight else f"{weight:.3f}",
            f"{m['predict_rows_per_s']:,}" if m.get("predict_rows_per_s") else "—",
            "selected" if chosen else m["status"] + (f": {m['reason']}" if m.get("reason")
                                                     else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    cv = cv_label(config.train.n_splits, config.train.repeats)
    lines = ["", f"{cv} out-of-fold log RMSE, best first "
             f"({len(board)} entries; * = selected):"]
    lines += ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=False)))
              + "  " + r[-1] for r in rows]
    if len(board) > shown:
        lines.append(f"  ... {len(board) - shown} more in {model.file('model_card.md')}")
    lines += [
        "",
        f"  model        {result['model_version']}  ({model.location})",
        *([f"  final form   {meta['final']} (select.final; see the model card)"
           + (f", predicts {meta['predict_rows_per_s']:,} rows/s"
              if meta.get("predict_rows_per_s") else "")] if meta.get("final") else []),
        *(["  ranges       out-of-fold coverage " + ", ".join(
            f"{float(level):.0%} {cov:.1%}" for level, cov in meta["interval_coverage"].items())
           + " ('houseprice predict --interval 0.9')"] if meta.get("interval_coverage") else []),
        f"  submission   {result['submission']}",
        *([f"  copied to    {config.submission}"] if config.submission else []),
        f"  artifacts    {model.root}",
        *([f"  log          {log}"] if log else []),
    ]
    return "\n".join(lines)


def summary_line(config, result: dict[str, Any]) -> str:
    """The run's last line, what scripts read: the selection, its score, the gate's verdict
    and where the predictions are."""
    from tasks.data.folds import cv_label

    parts = ", ".join(f"{n} {w:.3f}" for n, w in result["components"].items())
    promotion = result["promotion"]
    if promotion["basis"] == "same model":
        verdict = promotion["reason"]
    elif promotion["promote"]:
        verdict = f"promoted to production ({promotion['reason']})"
    else:
        verdict = (f"not promoted, production stays {promotion['production']} "
                   f"({promotion['reason']})")
    return (
        f"houseprice: selected {result['selected']}"
        + (f" [{parts}]" if result["selected"] == "blend" else "")
        + f" ({cv_label(config.train.n_splits, config.train.repeats)} out-of-fold log RMSE "
        f"{result['oof_log_rmse_all']:.4f}"
        + (f" ± {spread:.4f} over repeats" if (spread := result.get("oof_log_rmse_all_spread"))
           is not None else "")
        + " on all rows, "
        f"{result['oof_log_rmse_clean']:.4f} without the 2 outliers; "
        f"model {result['model_version']}, "
        f"data {result.get('data_version')}); {verdict}; predictions: {result['submission']}"
        + (f"; copied to {config.submission}" if config.submission else "")
    )
