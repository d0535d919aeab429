"""Stage 5, select model: the candidate with the lowest mean valid log RMSE wins.

The final model is the ensemble of the winner's K fold models (predictions averaged in log
space), not a refit on all rows: each fold model was validated as it is, so the ensemble needs
no untested choice (such as how many epochs suit 25% more rows), costs no extra training, and
averaging K models lowers variance. The checkpoint is self-describing: weights, model config,
preprocessor, metrics and lineage back to the raw files' SHA-1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import task

from tasks.artifacts import ArtifactRef, write_json
from tasks.config import CandidateConfig, TrainConfig
from tasks.stage import build_stage, stage_task_options

STAGE = "select"
CHECKPOINT_FORMAT = "houseprice-checkpoint/1"


def leaderboard(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Candidates' summaries sorted best first (pure; ties keep the given order)."""
    return sorted(metrics, key=lambda m: m["mean_valid_log_rmse"])


def fold_table(board: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of fold x candidate valid log RMSE, plus mean and std, the winner marked."""
    rows = []
    for rank, m in enumerate(board):
        row: dict[str, Any] = {"candidate": m["candidate"], "selected": "yes" if rank == 0 else ""}
        for f in m["folds"]:
            row[f"fold {f['fold'] + 1}"] = round(f["valid_log_rmse"], 5)
        row["mean"] = round(m["mean_valid_log_rmse"], 5)
        row["std"] = round(m["std_valid_log_rmse"], 5)
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
            out["raw_sha1"] = manifest["metrics"]["sha1"]
        for up in manifest["upstream"].values():
            for item in up if isinstance(up, list) else [up]:
                todo.append(ArtifactRef(root=ref.root, **item))
    return {k: sorted(v) if isinstance(v, list) else v for k, v in sorted(out.items())}


def model_card(best: dict[str, Any], spec: dict[str, Any], board: list[dict[str, Any]],
               config: dict[str, Any], lin: dict[str, Any]) -> str:
    lines = [
        f"# Selected model: {best['candidate']}",
        "",
        f"**{config['n_splits']}-fold mean valid log RMSE: {best['mean_valid_log_rmse']:.4f}** "
        f"(± {best['std_valid_log_rmse']:.4f} std over folds; "
        f"mean train log RMSE {best['mean_train_log_rmse']:.4f}).",
        "",
        f"Final model: the ensemble of its {config['n_splits']} fold models, predictions "
        "averaged in log space.",
        "",
        "## Configuration",
        "",
        "| field | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in spec.items()],
        *[f"| train.{k} | {v} |" for k, v in config.items()],
        "",
        "## Candidates (best first)",
        "",
        "| candidate | mean valid log RMSE | std |",
        "|---|---|---|",
        *[f"| {m['candidate']} | {m['mean_valid_log_rmse']:.4f} | {m['std_valid_log_rmse']:.4f} |"
          for m in board],
        "",
        "## Lineage",
        "",
        *[f"- raw `{role}.csv` SHA-1 `{sha}`" for role, sha in lin.get("raw_sha1", {}).items()],
        *[f"- {stage}: {', '.join(f'`{v}`' for v in versions)}"
          for stage, versions in lin.items() if stage != "raw_sha1"],
    ]
    return "\n".join(lines) + "\n"


def select_model(trained: list[ArtifactRef], candidates: list[CandidateConfig],
                 config: TrainConfig, out_dir: Path) -> dict[str, Any]:
    """Pick the best candidate and write ``model.pt``, ``leaderboard.json``, ``model_card.md``."""
    metrics = [json.loads(ref.file("metrics.json").read_text()) for ref in trained]
    for m in metrics:
        m.pop("curves", None)
    board = leaderboard(metrics)
    if not np.isfinite(board[0]["mean_valid_log_rmse"]):
        raise ValueError("no candidate has a finite validation score")
    best = board[0]
    winner = trained[[m["candidate"] for m in metrics].index(best["candidate"])]
    spec = next(c for c in candidates if c.name == best["candidate"])
    tensorized = ArtifactRef(root=winner.root, **winner.manifest()["upstream"]["data"])
    preprocessor_ref = ArtifactRef(
        root=winner.root, **tensorized.manifest()["upstream"]["preprocessor"]
    )
    preprocessor = json.loads(preprocessor_ref.file("preprocessor.json").read_text())
    folds = torch.load(winner.file("models.pt"), weights_only=True)["folds"]
    lin = lineage(winner)
    lin["train"] = sorted(r.version for r in trained)
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "model_config": spec.model_dump(mode="json"),
            "target": config.target,
            "n_features": len(preprocessor["feature_names"]),
            "folds": folds,  # [{state_dict, y_mean, y_std}] - averaged at predict time
            "preprocessor": preprocessor,
            "metrics": best,
            "lineage": lin,
        },
        out_dir / "model.pt",
    )
    write_json(out_dir / "leaderboard.json", {"leaderboard": board, "table": fold_table(board)})
    (out_dir / "model_card.md").write_text(
        model_card(best, spec.model_dump(mode="json"), board, config.version_params(), lin)
    )
    return {"selected": best["candidate"], "mean_valid_log_rmse": best["mean_valid_log_rmse"],
            "std_valid_log_rmse": best["std_valid_log_rmse"], "train_version": winner.version}


@task(**stage_task_options(STAGE))
def select_task(trained: list[ArtifactRef], candidates: list[CandidateConfig],
                config: TrainConfig, root: str) -> ArtifactRef:
    """Choose the lowest mean valid log RMSE and save a self-describing checkpoint."""
    inputs = {"trained": trained, "candidates": candidates, "config": config}
    return build_stage(STAGE, root, inputs,
                       lambda out: select_model(trained, candidates, config, out))
