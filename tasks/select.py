"""Stage 5, select model: the best single candidate or a non-negative blend of candidates,
whichever has the lower out-of-fold log RMSE.

Every candidate was scored on the same folds, and its out-of-fold (OOF) predictions are
leakage-free. The blend's weights are fitted on those OOF predictions by non-negative least
squares (stacking). Fitting weights and scoring them on the same rows would flatter the blend,
so its score is itself cross-fitted: the weights used on fold k's rows are fitted on the other
folds' rows only. The final weights are then fitted on all rows.

Each component's final form is ``select.final``: ``ensemble`` (its K fold models, predictions
averaged in log space: each was validated as it is), ``refit`` (one model fitted on all rows,
as the book's ``train_and_pred``), or ``mixed`` (linear kinds keep the ensemble, which
collapses into one linear model and costs nothing to predict; other kinds are refitted). The
default, ``auto``, takes ``mixed`` unless its estimated out-of-fold score loses more than
``select.max_loss`` to the ensemble's, and says which it took and why in the model card.
The checkpoint is self-describing: weights, configs, blend weights, preprocessor, metrics and
lineage back to the raw files' SHA-1.

Diverged candidates are left out (and listed); if none is healthy the stage fails saying so.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from prefect import task
from scipy.optimize import nnls

from tasks.config import CandidateConfig, SelectConfig, TrainConfig
from tasks.data.features import read_csv
from tasks.data.folds import cv_label
from tasks.inference import intervals
from tasks.inference.checkpoint import CHECKPOINT_FORMAT, FittedModel
from tasks.inference.plan import TIMING_ROWS, compile_plan, rows_per_s
from tasks.kinds.base import oof_scores, rmse
from tasks.stage import build_stage, stage_task_options
from tasks.storage.artifacts import ArtifactRef, write_json
from tasks.tensorize import FOLD_PREPROCESSORS

STAGE = "select"
BLEND = "blend"


def _score_key(select_on: str) -> str:
    return f"oof_log_rmse_{select_on}"


def leaderboard(metrics: list[dict[str, Any]], select_on: str = "clean"
                ) -> list[dict[str, Any]]:
    """Healthy candidates sorted best first by OOF log RMSE on ``select_on`` rows, then the
    diverged ones (pure; ties keep the given order)."""
    key = _score_key(select_on)
    return sorted(metrics, key=lambda m: (m[key] is None, m[key] or 0.0))


def fit_blend(P: np.ndarray, logy: np.ndarray) -> np.ndarray:
    """Non-negative weights ``(c,)`` minimizing the squared error of ``P (n, c) @ w``."""
    weights, _ = nnls(P, logy)
    return weights


def cross_fitted_blend(P: np.ndarray, logy: np.ndarray, fold: np.ndarray, use: np.ndarray,
                       repeat: np.ndarray | None = None) -> np.ndarray:
    """Blend predictions ``(n,)`` for every row, with weights fitted on the ``use`` rows of
    the other folds of the same repeat only (``fold`` ``(n,)`` int: each row's validation
    fold; ``repeat``: its repeat, the other repeats predict the same houses again)."""
    repeat = np.zeros(len(logy), int) if repeat is None else repeat
    out = np.full(len(logy), np.nan)
    for k in np.unique(fold):
        held = fold == k
        others = use & ~held & (repeat == repeat[held][0])
        w = fit_blend(P[others], logy[others])
        out[held] = P[held] @ w
    return out


def status_text(m: dict[str, Any]) -> str:
    """A candidate's status as the tables show it: ok or why not, and where successive
    halving stopped it."""
    text = m.get("status", "ok") if m.get("reason") is None else f"{m['status']}: {m['reason']}"
    if isinstance(h := m.get("halving"), dict) and h.get("stopped"):
        text += (f"; halving stopped it at rung {h.get('rung')} of {h.get('rungs')} "
                 f"({h.get('share')} of its steps)")
    return text


def fold_table(board: list[dict[str, Any]], chosen: str) -> list[dict[str, Any]]:
    """Rows of the metrics table, columns in reading order: candidate, selected, OOF scores
    (all rows, then without the outliers), mean and spread over folds, each fold's valid log
    RMSE, blend weight, status; the chosen model (a candidate or the blend) marked."""
    rows = []
    spread = any(m.get("oof_log_rmse_all_spread") is not None for m in board)
    for m in board:
        row: dict[str, Any] = {"candidate": m["candidate"],
                               "selected": "yes" if m["candidate"] == chosen else ""}
        for key, col in (("oof_log_rmse_all", "oof all rows"),
                         *([("oof_log_rmse_all_spread", "± over repeats")] if spread else []),
                         ("oof_log_rmse_clean", "oof w/o outliers"),
                         ("mean_valid_log_rmse", "mean"), ("std_valid_log_rmse", "std")):
            row[col] = None if m.get(key) is None else round(m[key], 5)
        folds = m.get("folds", [])
        per_repeat = sum(f.get("repeat", 0) == 0 for f in folds)
        for f in folds:
            v = f["valid_log_rmse"]
            name = (f"r{f['repeat'] + 1} fold {f['fold'] % per_repeat + 1}"
                    if per_repeat < len(folds) else f"fold {f['fold'] + 1}")
            row[name] = None if v is None else round(v, 5)
        row["blend weight"] = round(m["blend_weight"], 4) if "blend_weight" in m else None
        row["predict rows/s"] = m.get("predict_rows_per_s")
        row["status"] = status_text(m)
        rows.append(row)
    return rows


def lineage(ref: ArtifactRef) -> dict[str, Any]:
    """Every upstream artifact of ``ref`` (stage -> versions), walking the manifests, with
    the raw files' SHA-1 from the download manifest."""
    out: dict[str, Any] = {}
    todo = [ref]
    while todo:
        cur = todo.pop()
        manifest = cur.manifest()
        versions = out.setdefault(cur.stage, [])
        if cur.version not in versions:
            versions.append(cur.version)
        if cur.stage == "download":
            out["raw_files"] = manifest["metrics"]["files"]
            out["data_version"] = manifest["metrics"]["data_version"]
        for up in manifest["upstream"].values():
            for item in up if isinstance(up, list) else [up]:
                todo.append(ArtifactRef(root=ref.root, **item))
    return {k: sorted(v) if isinstance(v, list) else v for k, v in sorted(out.items())}


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


def _rate(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}"


def model_card(chosen: dict[str, Any], components: list[dict[str, Any]],
               board: list[dict[str, Any]], config: dict[str, Any], lin: dict[str, Any],
               coverage: list[dict[str, Any]] = ()) -> str:
    """The markdown model card: what was chosen, its scores, its price ranges' coverage,
    every candidate, the lineage."""
    repeats = config.get("repeats", 1)
    k = config["n_splits"] * repeats
    cv = cv_label(config["n_splits"], repeats)
    spread = chosen.get("oof_log_rmse_all_spread")
    final = chosen.get("final", "ensemble")
    each = {"ensemble": f"the ensemble of its {k} fold models, averaged in log space",
            "refit": "one model fitted on all rows",
            "mixed": (f"the ensemble of its {k} fold models for the linear kinds (collapsed "
                      "into one linear model at predict time), one model fitted on all rows "
                      "for the others")}[final]
    if chosen["candidate"] == BLEND:
        title = "blend of " + ", ".join(f"{c['candidate']} ({c['weight']:.3f})"
                                        for c in components)
        how = (f"Final model (select.final = {config.get('select.final', final)}): a "
               "non-negative blend (weights fitted on out-of-fold predictions) of the "
               f"components below, each {each}.")
    else:
        title = chosen["candidate"]
        how = f"Final model (select.final = {config.get('select.final', final)}): {each}."
    if (est := chosen.get("final_estimates")) and repeats > 1:
        how += (" Estimated out-of-fold log RMSE of each final form (a fold ensemble scored "
                f"by each row's mean over the {repeats} repeats, a refit by one repeat's "
                "prediction): " + ", ".join(f"{f} {_fmt(v)}" for f, v in est.items()) + ".")
    if chosen.get("predict_rows_per_s"):
        how += (f" Predicts {chosen['predict_rows_per_s']:,} rows/s (measured at select "
                "time, one process).")
    lines = [
        f"# Selected model: {title}",
        "",
        f"**{cv} out-of-fold log RMSE: {_fmt(chosen['oof_log_rmse_all'])} on all "
        f"{chosen['n_rows_all']} rows**"
        + (f" (± {_fmt(spread)} over repeats)" if spread is not None else "")
        + f", {_fmt(chosen['oof_log_rmse_clean'])} on the "
        f"{chosen['n_rows_clean']} rows without the outliers "
        f"(chosen on: {config['select.on']}). Per fold: mean valid log RMSE "
        f"{_fmt(chosen['mean_valid_log_rmse'])} ± {_fmt(chosen['std_valid_log_rmse'])}.",
        "",
        how,
        "",
        *_ranges_section(coverage, cv),
        "## Configuration",
        "",
    ]
    for c in components:
        lines += [f"### {c['candidate']} (weight {c['weight']:.3f})", "", "| field | value |",
                  "|---|---|", *[f"| {f} | {v} |" for f, v in c["model_config"].items()], ""]
    lines += [
        "| train setting | value |", "|---|---|",
        *[f"| {f} | {v} |" for f, v in config.items()],
        "",
        "## Candidates (best first)",
        "",
        "| candidate | mean ± std valid log RMSE | OOF all rows (± over repeats) "
        "| OOF w/o outliers | blend weight | predict rows/s | status |",
        "|---|---|---|---|---|---|---|",
        *[f"| {m['candidate']} | {_fmt(m['mean_valid_log_rmse'])} ± "
          f"{_fmt(m['std_valid_log_rmse'])} | {_fmt(m['oof_log_rmse_all'])}"
          + (f" ± {_fmt(m['oof_log_rmse_all_spread'])}"
             if m.get("oof_log_rmse_all_spread") is not None else "") + " | "
          f"{_fmt(m['oof_log_rmse_clean'])} | {_fmt(m.get('blend_weight'))} | "
          f"{_rate(m.get('predict_rows_per_s'))} | "
          f"{status_text(m)} |" for m in board],
        "",
        "## Lineage",
        "",
        f"- data version `{lin.get('data_version')}` (the training files' sorted (name, SHA-1))",
        *[f"- raw {role} file `{name}` SHA-1 `{sha}`"
          for role, files in lin.get("raw_files", {}).items() for name, sha in files.items()],
        *[f"- {stage}: " + ", ".join(
            f"`{v}`" + (f" ({lin['train_candidates'][v]})"
                        if v in lin.get("train_candidates", {}) else "") for v in versions)
          for stage, versions in lin.items()
          if stage not in ("raw_files", "data_version", "train_candidates")],
    ]
    return "\n".join(lines) + "\n"


def _ranges_section(coverage: list[dict[str, Any]], cv: str) -> list[str]:
    if not coverage:
        return []
    return [
        "## Price ranges",
        "",
        "`houseprice predict --interval LEVEL` adds `SalePrice_lo` and `SalePrice_hi`: "
        "conformal ranges from the out-of-fold residuals, widths set per predicted price "
        f"band. Coverage is {cv} out of fold on all rows: each fold's rows get ranges "
        "calibrated on the other folds' rows only.",
        "",
        "| level | out-of-fold coverage | median width | median width / price |",
        "|---|---|---|---|",
        *[f"| {c['level']:.0%} | {c['coverage']:.1%} | ${c['median_width']:,.0f} | "
          f"{c['median_relative_width']:.1%} |" for c in coverage],
        "",
    ]


def blend_metrics(P: np.ndarray, names: list[str], oof: pd.DataFrame, select_on: str
                  ) -> dict[str, Any]:
    """The blend as a leaderboard entry: cross-fitted OOF scores, per-fold scores, and the
    final weights (fitted on all selection rows)."""
    logy, fold = oof["log_price"].to_numpy(), oof["fold"].to_numpy()
    repeat = oof["repeat"].to_numpy() if "repeat" in oof else np.zeros(len(oof), int)
    clean = ~oof["outlier"].to_numpy(bool)
    use = clean if select_on == "clean" else np.ones(len(oof), bool)
    pred = cross_fitted_blend(P, logy, fold, use, repeat)
    per_fold = [rmse(pred[fold == k], logy[fold == k]) for k in np.unique(fold)]
    weights = fit_blend(P[use], logy[use])
    return {
        "candidate": BLEND, "kind": BLEND, "status": "ok", "reason": None,
        "mean_valid_log_rmse": float(np.mean(per_fold)),
        "std_valid_log_rmse": float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else 0.0,
        **oof_scores(pred, logy, repeat, clean),
        "folds": [{"fold": int(k), "repeat": int(repeat[fold == k][0]), "valid_log_rmse": v}
                  for k, v in zip(np.unique(fold), per_fold, strict=True)],
        "weights": {n: float(w) for n, w in zip(names, weights, strict=True)},
        "oof_pred": pred,
    }


def fast_enough_blend(P: np.ndarray, names: list[str], oof: pd.DataFrame, select_on: str,
                      rates: dict[str, float], floor: float | None,
                      speed: Callable[[dict[str, float]], float]) -> dict[str, Any] | None:
    """The blend of the candidates in ``rates`` (their predict rows/s), as a leaderboard
    entry with its own measured ``speed``; while it predicts slower than ``floor``, the
    slowest of its components is left out and the blend fitted again. None when fewer than
    two candidates are left."""
    use = list(rates)
    while len(use) > 1:
        cols = [names.index(n) for n in use]
        blend = blend_metrics(P[:, cols], use, oof, select_on)
        blend["predict_rows_per_s"] = round(speed(blend["weights"]))
        if floor is None or blend["predict_rows_per_s"] >= floor:
            return blend
        parts = [n for n, w in blend["weights"].items() if w > 0]
        use.remove(min(parts, key=rates.__getitem__))
    return None


def refitted(spec: CandidateConfig, final: str) -> bool:
    """Whether a component's final model is one refit on all rows under ``final``."""
    return final == "refit" or (final == "mixed" and not spec.linear_in_features)


def auto_final(estimates: dict[str, float], max_loss: float, speed_floor: bool) -> str:
    """``select.final = auto``: the fast ``mixed`` form unless it loses more than
    ``max_loss`` of out-of-fold log RMSE to the fold ensemble; ``mixed`` whenever a speed
    floor is set (the ensemble of every fold model is the slowest form)."""
    if speed_floor or estimates["mixed"] <= estimates["ensemble"] + max_loss:
        return "mixed"
    return "ensemble"


def final_estimates(P: np.ndarray, names: list[str], oof: pd.DataFrame,
                    weights: dict[str, float], specs: dict[str, CandidateConfig],
                    select_on: str) -> dict[str, float]:
    """Out-of-fold log RMSE (``select_on`` rows) of the chosen weights under each final form,
    from the repeats' out-of-fold predictions: a fold ensemble is scored by each row's mean
    over the repeats (an ensemble of models none of which saw the row), a refit by each
    repeat's own prediction (one model; it sees a 1/K smaller share of rows than the refit
    will, which on these data gains nothing measurable: 10 folds score as 5). With one
    repeat the forms cannot be told apart and score the same."""
    frame = oof[["Id"]].copy()
    logy = oof["log_price"].to_numpy()
    rows = (np.ones(len(oof), bool) if select_on == "all"
            else ~oof["outlier"].to_numpy(bool))
    out = {}
    for final in ("ensemble", "mixed", "refit"):
        pred = np.zeros(len(oof))
        for n, w in weights.items():
            p = P[:, names.index(n)]
            if not refitted(specs[n], final):
                p = frame.assign(p=p).groupby("Id")["p"].transform("mean").to_numpy()
            pred += w * p
        out[final] = rmse(pred[rows], logy[rows])
    return out


def select_model(trained: list[ArtifactRef], candidates: list[CandidateConfig],
                 config: TrainConfig, select: SelectConfig, out_dir: Path, *,
                 raw: ArtifactRef, preprocessor: ArtifactRef, data: ArtifactRef
                 ) -> dict[str, Any]:
    """Pick the best candidate or blend by OOF log RMSE on ``select.on`` rows; write
    ``model.pt``, ``leaderboard.json``, ``model_card.md``. ``raw``, ``preprocessor`` and
    ``data`` are the artifacts the candidates were trained from (the preprocessors go into
    the checkpoint; the raw training rows time each plan's predict speed)."""
    metrics = [json.loads(ref.file("metrics.json").read_text()) for ref in trained]
    for m in metrics:
        m.pop("curves", None)
    refs = {m["candidate"]: ref for m, ref in zip(metrics, trained, strict=True)}
    specs = {c.name: c for c in candidates}
    healthy = [m for m in metrics if m["status"] == "ok"]
    if not healthy:
        raise ValueError("no healthy candidate to select from: " + "; ".join(
            f"{m['candidate']} {m['status']} ({m['reason']})" for m in metrics))
    key = _score_key(select.on)
    names = [m["candidate"] for m in healthy]
    # One candidate's out-of-fold frame at a time, its predictions into one column of P:
    # every frame held at once was most of this stage's memory on many rows (33 candidates
    # x 3 repeats x 1,460,000 rows: about 6 GB).
    oof = pd.read_parquet(refs[names[0]].file("oof.parquet"))
    P = np.empty((len(oof), len(names)))
    P[:, 0] = oof.pop("pred_log_price").to_numpy()
    for j, name in enumerate(names[1:], 1):
        f = pd.read_parquet(refs[name].file("oof.parquet"))
        # the same rows, repeats and folds, or blending is meaningless
        if len(f) != len(oof) or not all(f[c].equals(oof[c]) for c in ("Id", "repeat", "fold")
                                         if c in oof):
            raise ValueError("candidates were trained on different rows or folds; rerun the "
                             "train stage")
        P[:, j] = f["pred_log_price"].to_numpy()
        del f
    models = {n: torch.load(refs[n].file("models.pt"), weights_only=True) for n in names}
    if select.final != "ensemble":
        stale = [n for n in names if models[n].get("refit") is None]
        if stale:
            raise ValueError(f"select.final = '{select.final}', but train artifacts of "
                             f"{stale} hold no model fitted on all rows; rerun from train "
                             "('houseprice run --from train')")
    trained_on = {ArtifactRef(root=ref.root, **ref.manifest()["upstream"]["data"])
                  for ref in refs.values()}
    if trained_on != {data}:
        raise ValueError(f"train artifacts were made from {sorted(r.version for r in trained_on)}"
                         f", not the tensorized data {data.version} given; rerun from train")
    pre = json.loads(preprocessor.file("preprocessor.json").read_text())
    # With per-fold preprocessing, fold k's models read rows through fold k's preprocessor.
    per_fold = data.file(FOLD_PREPROCESSORS)
    fold_preprocessors = (json.loads(per_fold.read_text())["preprocessors"]
                          if per_fold.is_file() else None)
    # As many rows as a speed is timed on (not the whole file: it may hold millions).
    timing_rows = read_csv(raw.file("train.csv"), nrows=TIMING_ROWS).drop(columns=["SalePrice"])

    def checkpoint(weights: dict[str, float], final: str,
                   chosen: dict[str, Any] | None = None) -> dict[str, Any]:
        comps = [{"candidate": n, "weight": w, "model_config": specs[n].model_dump(mode="json"),
                  "refit": refitted(specs[n], final)} for n, w in weights.items() if w > 0]
        for c in comps:
            saved = models[c["candidate"]]
            c["folds"] = [{"members": saved["refit"]}] if c["refit"] else saved["folds"]
        return {
            "format": CHECKPOINT_FORMAT,
            "target": config.target,
            "n_features": len(pre["feature_names"]),
            "final": final,
            # [{candidate, weight, model_config, refit, folds: [{members: [...]}]}]: fold
            # members are averaged in log space, then components weighted, at predict time.
            "components": comps,
            "preprocessor": pre,
            "fold_preprocessors": (fold_preprocessors if not all(c["refit"] for c in comps)
                                   else None),
            "metrics": chosen,
        }

    speed: dict[tuple, float] = {}  # plans of one shape predict at one speed: timed once

    # Candidates are timed in the form they take under select.final ('auto': its fast form).
    timed_as = "mixed" if select.final == "auto" else select.final

    def rows_per_s_of(weights: dict[str, float], final: str = timed_as) -> float:
        plan = compile_plan(FittedModel(checkpoint(weights, final)))
        key = plan.signature()
        if key not in speed:
            speed[key] = rows_per_s(plan, timing_rows)
        return speed[key]

    for m in healthy:
        m["predict_rows_per_s"] = round(rows_per_s_of({m["candidate"]: 1.0}))
    floor = select.min_rows_per_s
    pool = [m for m in healthy if floor is None or m["predict_rows_per_s"] >= floor]
    for m in healthy:
        if m not in pool:
            m["reason"] = (f"predicts {m['predict_rows_per_s']:,} rows/s, under "
                           f"select.min_rows_per_s = {floor:,.0f}")
    if not pool:
        raise ValueError(f"no candidate predicts at select.min_rows_per_s = {floor:,.0f} "
                         "rows/s or faster: " + ", ".join(
                             f"{m['candidate']} {m['predict_rows_per_s']:,}" for m in healthy)
                         + "; lower it, or add faster candidates (linear kinds)")
    board = leaderboard(metrics, select.on)
    chosen = leaderboard(pool, select.on)[0]
    blend = fast_enough_blend(P, names, oof, select.on,
                              {m["candidate"]: m["predict_rows_per_s"] for m in pool},
                              floor, rows_per_s_of)
    if blend is not None:
        if blend[key] < chosen[key]:
            chosen = blend
        board = leaderboard([*metrics, blend], select.on)
    weights = chosen["weights"] if chosen["candidate"] == BLEND else {chosen["candidate"]: 1.0}
    for m in metrics:  # each candidate's weight in the selected model, not in a rejected blend
        m["blend_weight"] = weights.get(m["candidate"], 0.0)
    estimates = final_estimates(P, names, oof, weights, specs, select.on)
    chosen["final_estimates"] = estimates
    final = (auto_final(estimates, select.max_loss, floor is not None)
             if select.final == "auto" else select.final)
    chosen["final"] = final
    chosen["predict_rows_per_s"] = round(rows_per_s_of(weights, final))
    # The chosen model's out-of-fold prediction of every row: what the promotion gate
    # compares with the production model on rows neither was fitted on.
    chosen_oof = (chosen.pop("oof_pred") if chosen["candidate"] == BLEND
                  else P[:, names.index(chosen["candidate"])])
    for m in board:
        m.pop("oof_pred", None)
    # One prediction per row for the gate: the mean of its repeats' out-of-fold predictions
    # (each from a model that did not see the row).
    chosen_rows = oof.assign(pred_log_price=chosen_oof)
    if "repeat" in chosen_rows:
        chosen_rows = chosen_rows.groupby("Id", as_index=False, sort=True).agg(
            fold=("fold", "first"), pred_log_price=("pred_log_price", "mean"),
            outlier=("outlier", "first"), log_price=("log_price", "first"))
    chosen_rows.to_parquet(out_dir / "oof.parquet", index=False)
    # Calibrated ranges from the same out-of-fold rows (all of them: the rows a user meets).
    pred, logy = chosen_rows["pred_log_price"].to_numpy(), chosen_rows["log_price"].to_numpy()
    coverage = intervals.oof_coverage(pred, logy, chosen_rows["fold"].to_numpy())
    intervals.save(intervals.fit(pred, logy), coverage, out_dir)
    lin = lineage(data)
    lin["train"] = sorted(r.version for r in trained)
    # Each train version's candidate, so the card and checkpoint name what the hashes are.
    lin["train_candidates"] = {ref.version: name for name, ref in sorted(refs.items())}
    saved = checkpoint(weights, final, chosen)
    components = saved["components"]
    torch.save({**saved, "lineage": lin}, out_dir / "model.pt")
    compile_plan(FittedModel(saved)).save(out_dir)
    table = fold_table(board, chosen["candidate"])
    # The file's keys are sorted (write_json); the reading order of the columns is kept
    # apart, for the dashboard's table.
    write_json(out_dir / "leaderboard.json",
               {"leaderboard": board, "table": table,
                "table_columns": list(dict.fromkeys(k for row in table for k in row))})
    card_components = [{k: c[k] for k in ("candidate", "weight", "model_config")}
                       for c in components]
    (out_dir / "model_card.md").write_text(
        model_card(chosen, card_components, board,
                   {**config.version_params(), "select.on": select.on,
                    "select.final": (final if select.final == final
                                     else f"{final} (auto)"),
                    "select.min_rows_per_s": select.min_rows_per_s}, lin, coverage)
    )
    return {"selected": chosen["candidate"], "data_version": lin["data_version"],
            "n_rows": int(oof["Id"].nunique()),  # training rows (oof has one per repeat)
            "n_predictions": len(oof),
            "components": {c["candidate"]: c["weight"] for c in components},
            "mean_valid_log_rmse": chosen["mean_valid_log_rmse"],
            "std_valid_log_rmse": chosen["std_valid_log_rmse"],
            "oof_log_rmse_all": chosen["oof_log_rmse_all"],
            "oof_log_rmse_clean": chosen["oof_log_rmse_clean"],
            "repeats": config.repeats,
            "oof_log_rmse_all_spread": chosen.get("oof_log_rmse_all_spread"),
            "select_on": select.on,
            "final": final,
            "final_estimates": estimates,
            "predict_rows_per_s": chosen.get("predict_rows_per_s"),
            "interval_coverage": {f"{c['level']:g}": round(c["coverage"], 4) for c in coverage},
            "diverged": [m["candidate"] for m in metrics if m["status"] != "ok"]}


@task(**stage_task_options(STAGE))
def select_task(trained: list[ArtifactRef], candidates: list[CandidateConfig],
                config: TrainConfig, select: SelectConfig, root: str, *, raw: ArtifactRef,
                preprocessor: ArtifactRef, data: ArtifactRef,
                force: bool = False) -> ArtifactRef:
    """Choose the best candidate or blend by OOF log RMSE; save a self-describing checkpoint."""
    inputs = {"trained": trained, "candidates": candidates, "config": config, "select": select,
              "raw": raw, "preprocessor": preprocessor, "data": data}
    return build_stage(STAGE, root, inputs,
                       lambda out: select_model(trained, candidates, config, select, out,
                                                raw=raw, preprocessor=preprocessor,
                                                data=data),
                       force=force)
