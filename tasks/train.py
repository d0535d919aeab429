"""Stage 4, train: K-fold cross-validation of the candidates.

One Prefect task per stack (candidates of one kind with equal ``stack_key``, trained as one
model: the torch kinds' searches) and per other candidate, so tasks run in parallel on the
task runner and a failed one reruns alone. How a candidate is cross-validated is its kind's
business (``tasks/kinds``); this stage cuts the folds, scores the result and writes each
candidate's own artifact: the K fold models, per-epoch learning curves, out-of-fold
predictions, the split, and a PNG of the curves.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import socket
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from tasks import progress as progress_hooks
from tasks.config import CandidateConfig, TrainConfig
from tasks.data.foldmaps import FoldMaps
from tasks.data.folds import fit_rows, make_folds  # noqa: F401 - part of this module's API
from tasks.kinds.base import CVResult, oof_scores, refit_members
from tasks.progress import DashboardProgress
from tasks.report import plot_curves
from tasks.stage import (
    StageError,
    build_stage,
    failing_as,
    results_storage,
    stage_task_options,
    stage_version,
    submit_stage,
)
from tasks.storage.artifacts import ArtifactRef, is_complete, link_name, write_json, write_text
from tasks.storage.store import open_store, root_key
from tasks.tensorize import read_fold_features, read_matrix

STAGE = "train"


def cross_validate(X: np.ndarray, y: np.ndarray, spec: CandidateConfig, config: TrainConfig,
                   excluded: np.ndarray | None = None,
                   on_progress: Callable[[float], None] = lambda f: None,
                   folds: list[tuple[np.ndarray, np.ndarray]] | None = None) -> CVResult:
    """K-fold cross-validate ``spec`` on ``X (n, d) float32`` (or ``(K, n, d)``: fold
    ``k``'s rows through its own preprocessor), ``y (n,) prices``.

    ``excluded`` ``(n,) bool`` rows are left out of fitting but still validated and predicted
    out of fold. ``on_progress`` gets the finished fraction (per epoch or per fold).
    ``folds``: ``config``'s, when the caller has cut them already.
    """
    n = X.shape[-2]  # X (n, d), or (K, n, d) with a preprocessor per fold
    excluded = np.zeros(n, bool) if excluded is None else excluded
    if folds is None:
        folds = make_folds(n, config.n_splits, config.seed, config.fold_scheme,
                           config.repeats)
    return spec.cross_validate(X, y, config, folds, fit_rows(folds, excluded), on_progress)


# Every fit of this process runs on one thread, one at a time. Each fit uses every core
# (torch's and OpenMP's thread pools), so fits side by side only slow each other down; and
# OpenMP keeps a team of threads per calling thread: with a team for each of the task
# runner's threads, libgomp sees more threads than cores and puts waiting threads to sleep
# at every barrier (measured on 2 cores: boosting 2.5x slower, 60k context switches/s).
_FIT_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="houseprice-fit")


class _FitSlot:
    """The flow's hold on the fit thread for one submitted train task (thread runner only):
    the flow takes the slot before it submits the task and the task gives it back when only
    its short refit on all rows is left (or it ends: cached, failed), so the next task is
    submitted then. A task thus enters Running when the fit thread is (nearly) free for it,
    and its dashboard duration is its own work (loading, fitting, writing), not a wait
    behind every other candidate's cross-validation; the next task's loading and this one's
    writing still overlap the fits."""

    _slots = threading.Semaphore(1)

    def __init__(self) -> None:
        self._slots.acquire()
        self._lock = threading.Lock()
        self._held = True

    def release(self) -> None:
        with self._lock:
            if self._held:
                self._held = False
                self._slots.release()


_SLOT: contextvars.ContextVar[_FitSlot | None] = contextvars.ContextVar(
    "houseprice_fit_slot", default=None)


# The files with a line per training row (a few hundred MB of buffers at a million rows)
# are written by one candidate at a time: threads that finish together do not add up.
_ROW_FILES = threading.Lock()


def _fits_done() -> None:
    """This task's fits are over: the next train task may be submitted."""
    slot = _SLOT.get()
    if slot is not None:
        slot.release()


def _fit(fn: Callable[[], Any], what: str, log: Callable[[str], None],
         done: str = "cross-validated") -> Any:
    """``fn()`` on the fit thread; its result (or its exception) here. Logs how long the fit
    itself took (a task's duration also holds its wait for the fit thread)."""

    def timed() -> Any:
        start = time.perf_counter()
        out = fn()
        log(f"{what}: {done} in {time.perf_counter() - start:.1f} s")
        return out

    return _FIT_THREAD.submit(timed).result()


def candidate_metrics(spec: CandidateConfig, cv: CVResult, logy: np.ndarray,
                      outliers: np.ndarray) -> dict[str, Any]:
    """The candidate's summary: per-fold scores, mean and spread, and the out-of-fold log
    RMSE on all rows and on the rows without the ``outliers`` ``(n,) bool``: over every
    repeat's predictions (each row once per repeat), with each repeat's own and their
    spread."""
    valid = np.array(cv.valid_log_rmse)
    ok = cv.diverged is None and bool(np.isfinite(valid).all())
    R, n = cv.oof_log_price.shape
    with warnings.catch_warnings():  # a diverged candidate's predictions may be inf or none
        warnings.simplefilter("ignore", RuntimeWarning)
        scores = oof_scores(cv.oof_log_price.reshape(-1), np.tile(logy, R),
                            np.repeat(np.arange(R), n), np.tile(~outliers, R))
    if not ok:  # a diverged candidate has no scores, only its row counts
        scores = {k: v if k.startswith("n_rows") or k == "repeats" else None
                  for k, v in scores.items()}
    n_splits = len(cv.folds) // R
    return {
        "candidate": spec.name,
        "kind": spec.kind,
        "status": "ok" if ok else "diverged",
        "reason": None if ok else (cv.diverged or "non-finite validation score"),
        "mean_valid_log_rmse": float(valid.mean()) if ok else None,
        "std_valid_log_rmse": float(valid.std(ddof=1)) if ok and len(valid) > 1 else
        (0.0 if ok else None),
        "mean_train_log_rmse": float(np.mean(cv.train_log_rmse)) if ok else None,
        # all rows and without the outliers, per repeat, and the spread over repeats: how far
        # a choice between two candidates can be trusted
        **scores,
        "folds": [
            {"fold": k, "repeat": k // n_splits, "train_log_rmse": tr if ok else None,
             "valid_log_rmse": va if ok else None}
            for k, (tr, va) in enumerate(zip(cv.train_log_rmse, cv.valid_log_rmse, strict=True))
        ],
        **({"halving": cv.halving} if cv.halving is not None else {}),
    }


def train(data: ArtifactRef, candidate: CandidateConfig, config: TrainConfig, out_dir: Path,
          log: Callable[[str], None] = print,
          progress: Callable[[float], None] = lambda f: None) -> dict[str, Any]:
    """Cross-validate ``candidate`` on the tensorized training rows; write the train artifact:
    ``models.pt`` (fold models), ``metrics.json`` (scores, curves), ``oof.parquet``,
    ``folds.json`` and, for torch candidates, ``learning_curves.png``."""
    m, X, X_all, outliers, excluded = _rows(data, config, candidate)
    folds = make_folds(len(m.y), config.n_splits, config.seed, config.fold_scheme,
                       config.repeats)
    _note_budget([candidate], fit_rows(folds, excluded), log)
    cv = _fit(lambda: cross_validate(X, m.y, candidate, config, excluded, progress, folds),
              candidate.name, log)
    _fits_done()  # only the short refit is left: the next task may start loading
    refit = _fit(lambda: candidate.refit(X_all, m.y, config, np.flatnonzero(~excluded)),
                 candidate.name, log, "refitted on all rows")
    return write_artifact(m, outliers, excluded, candidate, config, cv, out_dir, log, refit)


def _rows(data: ArtifactRef, config: TrainConfig, candidate: CandidateConfig):
    """The tensorized rows; the features the folds see (``(K, n, d)``, each fold's own
    preprocessing, or the all-rows ``(n, d)``) and the all-rows features (with per-fold
    maps, the base's first columns: not read again from Parquet, and not copied); which
    rows are outliers, and which are left out of ``candidate``'s fitting."""
    per_fold = read_fold_features(data, config.folds)
    m = read_matrix(data.file("train.parquet"), features=per_fold is None)
    X_all = m.X if per_fold is None else FoldMaps.identity(per_fold.base, per_fold.shape[2])
    outliers = np.isin(m.ids, m.meta.get("outlier_ids", []))
    exclude = (config.exclude_outliers if candidate.exclude_outliers is None
               else candidate.exclude_outliers)
    excluded = outliers if exclude else np.zeros(len(m.ids), bool)
    return m, (m.X if per_fold is None else per_fold), X_all, outliers, excluded


def _note_budget(candidates: list[CandidateConfig], fitted: list[np.ndarray],
                 log: Callable[[str], None]) -> None:
    """Log each candidate's training cut to its budget on a fold's ``fitted`` rows."""
    n_fit = max(len(rows) for rows in fitted)
    for c in candidates:
        if note := c.budget_note(n_fit):
            log(note)


def write_artifact(m, outliers: np.ndarray, excluded: np.ndarray, candidate: CandidateConfig,
                   config: TrainConfig, cv: CVResult, out_dir: Path,
                   log: Callable[[str], None] = print,
                   refit: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A candidate's train artifact from its cross-validation: ``models.pt`` (the fold
    models, and ``refit``: the model fitted on all rows), ``metrics.json``, ``oof.parquet``,
    ``folds.json`` and, for epoch-trained kinds, ``learning_curves.png``."""
    metrics = candidate_metrics(candidate, cv, np.log(m.y), outliers)
    if metrics["status"] == "ok":
        for f in metrics["folds"]:
            rep = (f"repeat {f['repeat'] + 1}/{config.repeats} " if config.repeats > 1 else "")
            log(f"{candidate.name}: {rep}fold {f['fold'] % config.n_splits + 1}/"
                f"{config.n_splits} train log RMSE {f['train_log_rmse']:.4f}, valid log RMSE "
                f"{f['valid_log_rmse']:.4f}")
    else:
        log(f"{candidate.name}: diverged: {metrics['reason']}")
    if (h := cv.halving) is not None:
        log(f"{candidate.name}: successive halving: " + (
            f"stopped at rung {h['rung']} of {h['rungs']}, after {h['step']:,} of "
            f"{h['steps']:,} steps (epoch {h['epoch']}); ranked {h['rank']} of {h['of']} there, "
            + ("diverged" if h["valid_log_rmse"] is None
               else f"valid log RMSE {h['valid_log_rmse']:.4f}")
            if h["stopped"] else f"trained every step, one of the {h['of']} that went on"))
    torch.save({"kind": candidate.kind, "folds": [{"members": mem} for mem in cv.members],
                "refit": refit}, out_dir / "models.pt")
    with _ROW_FILES:
        write_oof(out_dir / "oof.parquet", m, outliers, cv, config.n_splits)
        write_text(out_dir / "folds.json", folds_json(m.ids, cv.folds, excluded))
    write_json(out_dir / "metrics.json", {**metrics, "curves": cv.curves})
    if cv.curves is not None:
        score = metrics["mean_valid_log_rmse"]
        plot_curves(cv.curves, f"{candidate.name}: " + (
            f"{score:.4f} mean valid log RMSE" if score is not None else "diverged"),
            out_dir / "learning_curves.png")
    return {k: metrics[k] for k in ("candidate", "status", "mean_valid_log_rmse",
                                    "oof_log_rmse_all", "oof_log_rmse_clean")}


def folds_json(ids: np.ndarray, folds, excluded: np.ndarray) -> str:
    """``folds.json``: ``{"excluded_from_fit": [Id...], "valid_ids": [[Id...] per fold]}``,
    an Id list per line (indented, a million rows took seconds and hundreds of MB in json's
    pure-Python encoder)."""
    lists = ",\n".join("    " + json.dumps(ids[va].tolist()) for _, va in folds)
    return (f'{{\n  "excluded_from_fit": {json.dumps(ids[excluded].tolist())},\n'
            f'  "valid_ids": [\n{lists}\n  ]\n}}\n')


def write_oof(path: Path, m, outliers: np.ndarray, cv: CVResult, n_splits: int) -> None:
    """``oof.parquet``: one row per (repeat, Id), in that order; ``fold`` numbers the folds
    over all repeats (repeat-major). Built in its order (rows gathered once per column, no
    frame sorted and copied)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folds = [(k, k // n_splits, va) for k, (_, va) in enumerate(cv.folds)]
    rows = np.concatenate([va for *_, va in folds])
    fold = np.concatenate([np.full(len(va), k) for k, _, va in folds])
    repeat = fold // n_splits
    order = np.lexsort((m.ids[rows], repeat))
    rows, fold, repeat = rows[order], fold[order], repeat[order]
    pq.write_table(pa.table({
        "Id": m.ids[rows], "repeat": repeat, "fold": fold,
        "pred_log_price": cv.oof_log_price[repeat, rows], "outlier": outliers[rows],
        "log_price": np.log(m.y[rows]),
    }), path)


def _check_root(root: str) -> None:
    if not open_store(root).remote and not Path(root).is_dir():
        # On a Dask worker of another machine: the artifact root must be shared storage.
        raise StageError(f"stage 'train' failed: artifact root {root} is not visible on "
                         f"{socket.gethostname()}; put it on storage every worker mounts, or "
                         "use a bucket (--artifacts s3://bucket/prefix)")


@task(**stage_task_options(STAGE))
def train_task(data: ArtifactRef, candidate: CandidateConfig, config: TrainConfig,
               root: str, force: bool = False) -> ArtifactRef:
    """K-fold train one candidate: a progress artifact while it trains, one log line per
    finished fold."""
    _check_root(root)
    logger = get_run_logger()
    progress = DashboardProgress(candidate.name)
    ref = build_stage(STAGE, root, {"data": data, "candidate": candidate, "config": config},
                      lambda out: train(data, candidate, config, out, log=logger.info,
                                        progress=progress.update), force=force)
    link_name(ref, candidate.name)
    progress.update(1.0)
    return ref


def stack_groups(candidates: list[CandidateConfig]) -> list[list[CandidateConfig]]:
    """Candidates that can train as one stack (one kind, equal ``stack_key``: the torch kinds
    of one shape) grouped, in first-seen order; every other candidate alone."""
    groups: dict[Any, list[CandidateConfig]] = {}
    for c in candidates:
        stack = c.stack_key()
        key = ("stack", c.kind, stack) if stack is not None else ("alone", c.name)
        groups.setdefault(key, []).append(c)
    return list(groups.values())


def version_inputs(data: ArtifactRef, candidate: CandidateConfig, config: TrainConfig,
                   stack: list[CandidateConfig] | None = None) -> dict[str, Any]:
    """What ``candidate``'s train version is made of; with the ``stack`` it trains in, when
    its result depends on the others there (a search among them)."""
    inputs: dict[str, Any] = {"data": data, "candidate": candidate, "config": config}
    if stack is not None and len(stack) > 1 and candidate.depends_on_stack:
        inputs["stack"] = list(stack)  # in order: ties go to the first listed
    return inputs


def member_ref(root: str, data: ArtifactRef, candidate: CandidateConfig,
               config: TrainConfig, stack: list[CandidateConfig] | None = None
               ) -> ArtifactRef:
    """Where ``candidate``'s train artifact is (whether or not it exists yet)."""
    return ArtifactRef(root=root, stage=STAGE, version=stage_version(
        STAGE, version_inputs(data, candidate, config, stack)))


def train_group(data: ArtifactRef, candidates: list[CandidateConfig], config: TrainConfig,
                root: str, force: bool = False, log: Callable[[str], None] = print,
                progress: Callable[[float], None] = lambda f: None) -> list[ArtifactRef]:
    """Train the candidates of one group whose artifacts are missing (all with ``force``)
    as one stacked model, then write each one's own artifact; returns every candidate's
    reference. A cached candidate is not retrained when another joins its group, unless
    its result depends on the group (a search among them): then the whole group retrains."""
    refs = [member_ref(root, data, c, config, candidates) for c in candidates]
    todo = [c for c, r in zip(candidates, refs, strict=True) if force or not is_complete(r)]
    if todo and any(c.depends_on_stack for c in candidates):
        todo = list(candidates)  # (a complete artifact is kept: the same result, not rewritten)
    if todo:
        m, X, X_all, outliers, excluded = _rows(data, config, todo[0])  # one rule per stack
        folds = make_folds(len(m.y), config.n_splits, config.seed, config.fold_scheme,
                           config.repeats)
        fitted = fit_rows(folds, excluded)
        _note_budget(todo, fitted, log)
        names = ", ".join(c.name for c in todo)
        cvs = _fit(lambda: type(todo[0]).cross_validate_stack(todo, X, m.y, config, folds, fitted,
                                                             progress), names, log)
        _fits_done()  # only the short refits are left: the next task may start loading
        # each on the budget its cross-validation had (a search may have cut it)
        refits = _fit(lambda: refit_members([c.trained_as(cv) for c, cv in
                                             zip(todo, cvs, strict=True)],
                                            X_all, m.y, config, np.flatnonzero(~excluded)),
                      names, log, "refitted on all rows")
        for c, cv, refit in zip(todo, cvs, refits, strict=True):
            ref = build_stage(
                STAGE, root, version_inputs(data, c, config, candidates),
                lambda out, c=c, cv=cv, refit=refit: write_artifact(
                    m, outliers, excluded, c, config, cv, out, log, refit), force=force)
            link_name(ref, c.name)
    return refs


class GroupVersionPolicy(CachePolicy):
    """The cache key of a group's task: its members' train versions (each holding its own
    kind's fields and code), and the artifact root."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any],
                    flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        group = inputs["candidates"]
        versions = [member_ref(inputs["root"], inputs["data"], c, inputs["config"],
                               group).version for c in group]
        digest = hashlib.sha256(json.dumps(versions).encode()).hexdigest()[:16]
        return f"houseprice-train-group-{digest}-{root_key(inputs['root'])}"


@task(name=STAGE, cache_policy=GroupVersionPolicy(), persist_result=True,
      result_serializer="json")
def train_group_task(data: ArtifactRef, candidates: list[CandidateConfig],
                     config: TrainConfig, root: str, force: bool = False) -> list[ArtifactRef]:
    """K-fold train a group of candidates of one shape as one stacked model: a progress
    artifact per candidate, one log line per finished fold of each."""
    _check_root(root)
    logger = get_run_logger()
    bars = [DashboardProgress(c.name) for c in candidates]

    def progress(fraction: float) -> None:
        for bar in bars:
            bar.update(fraction)

    with failing_as(STAGE):
        refs = train_group(data, candidates, config, root, force, logger.info, progress)
    progress(1.0)
    return refs


def submit_train(root: str, *, force: bool, data: ArtifactRef,
                 candidates: list[CandidateConfig], config: TrainConfig):
    """Submit one group's training (or one candidate's, alone) to the task runner; a future
    of its references (a list for a group)."""
    if len(candidates) == 1:
        return submit_stage(train_task, root, force=force, data=data, candidate=candidates[0],
                            config=config)
    refs = [member_ref(root, data, c, config, candidates) for c in candidates]
    names = ", ".join(c.name for c in candidates)
    task = train_group_task.with_options(
        result_storage=results_storage(root),
        refresh_cache=force or not all(is_complete(r) for r in refs),
        task_run_name=f"train[{names if len(names) <= 60 else names[:57] + '...'}]",
    )
    return task.submit(data=data, candidates=candidates, config=config, root=root,
                       **({"force": True} if force else {}))


def _runs_here() -> bool:
    """Whether the flow's task runner runs tasks on threads of this process (where they
    share the one fit thread), not on Dask workers (each with its own)."""
    from prefect.context import FlowRunContext
    from prefect.task_runners import ThreadPoolTaskRunner

    ctx = FlowRunContext.get()
    return ctx is not None and isinstance(ctx.task_runner, ThreadPoolTaskRunner)


def train_all(root: str, *, force: bool, data: ArtifactRef,
              candidates: list[CandidateConfig], config: TrainConfig) -> list[ArtifactRef]:
    """Every candidate trained (groups of one shape stacked, in parallel on the task
    runner); their references in the candidates' order."""
    groups = stack_groups(candidates)
    progress_hooks.stage_state("train", "Running")
    for c in candidates:  # all of them waiting, for the terminal display, before any starts
        progress_hooks.report(c.name, 0.0)
    futures = []
    one_at_a_time = _runs_here()
    for group in groups:
        slot = _FitSlot() if one_at_a_time else None  # waits for the previous task's fits
        token = _SLOT.set(slot)
        try:
            future = submit_train(root, force=force, data=data, candidates=group,
                                  config=config)
        except BaseException:
            if slot is not None:
                slot.release()
            raise
        finally:
            _SLOT.reset(token)
        if slot is not None:
            future.add_done_callback(lambda _, slot=slot: slot.release())
        futures.append(future)
    by_name: dict[str, ArtifactRef] = {}
    try:
        for group, future in zip(groups, futures, strict=True):
            result = future.result()
            by_name.update(zip((c.name for c in group),
                               result if isinstance(result, list) else [result], strict=True))
    except BaseException:
        progress_hooks.stage_state("train", "Failed")
        raise
    # One line for the stage: Cached when every group was.
    cached = all(f.state.name == "Cached" for f in futures)
    progress_hooks.stage_state("train", "Cached" if cached else "Completed")
    return [by_name[c.name] for c in candidates]
