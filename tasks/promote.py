"""After select and predict: the promotion gate. This run's model (the challenger) replaces the
production model (the champion) only if it is better on rows neither was fitted on.

Those rows are the ones that are new since the champion was trained: the champion never saw
them, and the challenger's out-of-fold prediction of each comes from a fold model that did not
see it either. When there are none (same data, another config), both models' out-of-fold
predictions on the rows they share are compared instead. The first healthy model is promoted.
Every decision is appended to the history, under a lock, so two runs racing to promote leave
one history and a whole pointer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.config import PromoteConfig
from tasks.data.features import ID, DataError
from tasks.data.rawcsv import header, id_values, preprocessor_types, read_all
from tasks.kinds.base import rmse
from tasks.storage.artifacts import (
    ArtifactError,
    ArtifactRef,
    production_lock,
    read_production,
    record,
    require,
    set_latest,
)
from tasks.storage.store import canonical

PROMOTION_KEY = "house-price-promotion"
PROMOTED_EVENT = "houseprice.model.promoted"


@dataclass
class Decision:
    promote: bool
    reason: str
    basis: str  # "new rows", "shared rows", "first model", "same model", "champion unusable"
    rows: int = 0
    challenger_log_rmse: float | None = None
    champion_log_rmse: float | None = None
    champion: str | None = None


class _Picked:
    """The training rows of some Ids, picked from the file a batch at a time."""

    def __init__(self, ids: np.ndarray):
        self.ids, self.found, self.parts = ids, [], []

    def add(self, lo: int, rows: pa.Table) -> None:
        have = id_values(rows.column(ID), "train.csv", lo)
        keep = np.isin(have, self.ids)
        if keep.any():
            self.found.append(have[keep])
            self.parts.append(rows.filter(pa.array(keep)))


def _champion_predictions(champion: ArtifactRef, raw: ArtifactRef, ids: np.ndarray
                          ) -> np.ndarray:
    """The champion's log-price prediction ``(len(ids),) float64`` of the training rows
    ``ids`` of this run's data, through its own preprocessor (the rows read a batch at a
    time, only those kept: the file may hold millions)."""
    from tasks.inference.batch import load_model

    model = load_model(champion)
    path = raw.file("train.csv")
    picked, _ = read_all(path, "train.csv",
                         preprocessor_types(model.preprocessor, header(path, "train.csv")),
                         lambda _: _Picked(ids))
    found = np.concatenate(picked.found) if picked.found else np.zeros(0, np.int64)
    at = pd.Index(found).get_indexer(ids)
    if (at < 0).any():
        raise DataError(f"train.csv has no row with {ID} {ids[at < 0][0]}, which the "
                        "challenger was scored on; rerun from download")
    return model.predict_table(pa.concat_tables(picked.parts))[0][at]


def compare(challenger: ArtifactRef, champion: ArtifactRef, raw: ArtifactRef,
            min_improvement: float) -> Decision:
    """Score both on the rows new since the champion was trained (or, with none, on the
    rows both were cross-validated on); promote if the challenger's log RMSE is lower by at
    least ``min_improvement``."""
    new = pd.read_parquet(challenger.file("oof.parquet"))
    try:
        require(champion)
        old = pd.read_parquet(champion.file("oof.parquet"))
        fresh = new[~new[ID].isin(old[ID])]
        if len(fresh):
            basis = "new rows"
            champ_pred = _champion_predictions(champion, raw, fresh[ID].to_numpy())
            rows = fresh
        else:
            basis = "shared rows"
            both = new.merge(old[[ID, "pred_log_price"]], on=ID, suffixes=("", "_champion"))
            champ_pred = both["pred_log_price_champion"].to_numpy()
            rows = both
    except (ArtifactError, DataError, FileNotFoundError, KeyError) as exc:
        return Decision(True, f"production model {champion.version} is not usable "
                        f"({str(exc).splitlines()[0]}); the challenger replaces it",
                        "champion unusable", champion=champion.version)
    truth = rows["log_price"].to_numpy()
    ours = rmse(rows["pred_log_price"].to_numpy(), truth)
    theirs = rmse(champ_pred, truth)
    better = theirs - ours >= min_improvement
    where = (f"the {len(rows)} rows new since it was trained" if basis == "new rows" else
             f"the {len(rows)} rows both were cross-validated on (no new rows)")
    verdict = "better" if better else "not better enough" if ours < theirs else "worse"
    reason = (f"challenger log RMSE {ours:.4f} vs production {theirs:.4f} on {where}: "
              f"{verdict}" + (f" (needs an improvement of {min_improvement:g})"
                              if min_improvement and not better else ""))
    return Decision(better, reason, basis, len(rows), ours, theirs, champion.version)


def gate(model: ArtifactRef, predictions: ArtifactRef, raw: ArtifactRef,
         config: PromoteConfig, flow_run_id: str | None = None) -> dict[str, Any]:
    """Decide, record and (if better) promote, under the production lock; also point LATEST
    at this run's versions there, so concurrent runs cannot leave them torn."""
    require(model)
    data = model.manifest()["metrics"].get("data_version")
    with production_lock(model.root):
        current = read_production(model.root)
        if current is None:
            decision = Decision(True, "first healthy model: promoted", "first model")
        elif current["model"] == model.version:
            same = current.get("data_version") == data
            decision = Decision(False, ("no new data: " if same else "") + "this run's model "
                                f"{model.version} is the production model already",
                                "same model", champion=model.version)
        else:
            champion = ArtifactRef(root=model.root, stage="select", version=current["model"])
            decision = compare(model, champion, raw, config.min_improvement)
        record(model.root, {"action": "gate", "model": model.version,
                            "predictions": predictions.version, "data_version": data,
                            "flow_run_id": flow_run_id, **asdict(decision)},
               promote=decision.promote and decision.basis != "same model")
        set_latest(model)
        set_latest(predictions)
        production = read_production(model.root)
    return {**asdict(decision), "production": production["model"] if production else None,
            "data_version": data}


def promotion_markdown(model: ArtifactRef, result: dict[str, Any]) -> str:
    fmt = (lambda v: "—" if v is None else f"{v:.4f}")  # noqa: E731
    verdict = "**promoted**" if result["promote"] else "**not promoted**"
    return "\n".join([
        f"# Promotion: {verdict}", "",
        f"{result['reason']}", "",
        "| | model | log RMSE |", "|---|---|---|",
        f"| challenger (this run) | `{model.version}` | {fmt(result['challenger_log_rmse'])} |",
        f"| production before | `{result['champion'] or '—'}` | "
        f"{fmt(result['champion_log_rmse'])} |", "",
        f"Compared on: {result['basis']} ({result['rows']} rows). Production now: "
        f"`{result['production']}`. Data version `{result['data_version']}`.", "",
    ])


@task(name="promote", task_run_name="promote", cache_policy=NO_CACHE)
def promote_task(model: ArtifactRef, predictions: ArtifactRef, raw: ArtifactRef,
                 config: PromoteConfig) -> dict[str, Any]:
    """Compare this run's model with production on unseen rows; promote it if better."""
    from prefect.runtime import flow_run

    result = gate(model, predictions, raw, config, flow_run_id=str(flow_run.id or ""))
    get_run_logger().info(("promoted: " if result["promote"] else "not promoted: ")
                          + result["reason"])
    if result["promote"] and result["basis"] != "same model":
        announce_promotion(model.root, model.version, result)
    return result


def announce_promotion(root: str, version: str, result: dict[str, Any]) -> None:
    """A ``houseprice.model.promoted`` event, for automations to act on (notify, deploy)."""
    from prefect.events import emit_event

    emit_event(
        event=PROMOTED_EVENT,
        resource={"prefect.resource.id": f"houseprice.model.{version}",
                  "prefect.resource.name": version},
        payload={"model": version, "production_before": result.get("champion") or "none",
                 "reason": result["reason"], "basis": result["basis"],
                 "data_version": result.get("data_version"),
                 "log_rmse": result.get("challenger_log_rmse"),
                 "production_log_rmse": result.get("champion_log_rmse"), "root": root},
    )


def show_promotion(model: ArtifactRef, result: dict[str, Any]) -> None:
    """The gate's decision as an artifact of the flow run itself (called from the flow)."""
    create_markdown_artifact(key=PROMOTION_KEY, markdown=promotion_markdown(model, result),
                             description="This run's model vs the production model")


def _predictions_of(root: str, model_version: str) -> str | None:
    """The newest complete predict artifact made from ``model_version``, if any."""
    from tasks.storage.artifacts import manifests

    found = [(manifest["created"], ref.version) for ref, manifest in manifests(root, "predict")
             if manifest["upstream"].get("model", {}).get("version") == model_version]
    return max(found)[1] if found else None


def promote_by_hand(root: str, version: str, reason: str = "promoted by hand") -> dict:
    """Make select ``version`` production (it must be intact and loadable), logged."""
    from tasks.inference.batch import load_model
    from tasks.storage.artifacts import resolve

    root = canonical(root)
    try:
        ref = resolve(root, "select", version)
    except ArtifactError:
        known = [r["version"] for r in list_models(root)]
        close = [v for v in known if v.startswith(version)]
        hint = (f"did you mean {', '.join(close[:3])}?" if close else
                f"known: {', '.join(known[-5:])}" if known else
                "no models yet: run 'houseprice run' first")
        raise ArtifactError(f"no intact model {version} under {root} ({hint}); see "
                            "'houseprice models'") from None
    load_model(ref)  # refuses an unreadable or old-format model
    entry = {"action": "promote", "model": ref.version, "reason": reason,
             "predictions": _predictions_of(root, ref.version),
             "data_version": ref.manifest()["metrics"].get("data_version")}
    with production_lock(root):
        record(root, entry, promote=True)
    return entry


def rollback(root: str) -> dict:
    """Make the production model before the current one production again, logged: a walk
    back through the promotions (C, then B, then A), then a clear "nothing earlier"."""
    from tasks.storage.artifacts import production_stack, read_history

    root = canonical(root)
    with production_lock(root):
        stack = production_stack(read_history(root))
        if not stack:
            raise ArtifactError(f"no production model under {root}: nothing to roll back; "
                                "run 'houseprice run' first")
        current = stack[-1]
        if len(stack) < 2:
            raise ArtifactError(f"{current['model']} is the first model promoted under "
                                f"{root}: there is nothing earlier to roll back to")
        back = stack[-2]
        entry = {"action": "rollback", "model": back["model"],
                 "predictions": back.get("predictions"), "data_version": back.get("data_version"),
                 "reason": f"rolled back from {current['model']}"}
        require(ArtifactRef(root=root, stage="select", version=back["model"]))
        record(root, entry, promote=True)
    return entry


def list_models(root: str) -> list[dict]:
    """Every intact select artifact, oldest first: data version, scores, production mark."""
    from tasks.storage.artifacts import manifests

    current = read_production(root) or {}
    rows = []
    for ref, manifest in manifests(root, "select"):
        m = manifest.get("metrics", {})
        rows.append({"version": ref.version, "created": manifest["created"][:19],
                     "data_version": m.get("data_version"), "n_rows": m.get("n_rows"),
                     "oof_log_rmse_all": m.get("oof_log_rmse_all"),
                     "oof_log_rmse_clean": m.get("oof_log_rmse_clean"),
                     "selected": m.get("selected"),
                     "production": ref.version == current.get("model")})
    return sorted(rows, key=lambda r: r["created"])
