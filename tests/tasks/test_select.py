from __future__ import annotations

import json

import torch

from tasks.artifacts import ArtifactRef
from tasks.select import CHECKPOINT_FORMAT, fold_table, leaderboard


def _m(name, scores):
    import numpy as np

    return {"candidate": name, "mean_valid_log_rmse": float(np.mean(scores)),
            "std_valid_log_rmse": float(np.std(scores, ddof=1)), "mean_train_log_rmse": 0.1,
            "folds": [{"fold": k, "valid_log_rmse": s, "train_log_rmse": 0.1}
                      for k, s in enumerate(scores)]}


def test_leaderboard_picks_lowest_mean_and_table_marks_it():
    board = leaderboard([_m("a", [0.2, 0.2]), _m("b", [0.1, 0.14]), _m("c", [0.25, 0.1])])
    assert [m["candidate"] for m in board] == ["b", "c", "a"]
    table = fold_table(board)
    assert table[0] == {"candidate": "b", "selected": "yes", "fold 1": 0.1, "fold 2": 0.14,
                        "mean": 0.12, "std": round(board[0]["std_valid_log_rmse"], 5)}
    assert [r["selected"] for r in table] == ["yes", "", ""]


def test_checkpoint_is_self_describing(trained):
    cfg, result = trained
    ref = ArtifactRef(root=cfg.artifacts_dir, stage="select", version=result["model_version"])
    ckpt = torch.load(ref.file("model.pt"), weights_only=True)
    assert ckpt["format"] == CHECKPOINT_FORMAT
    assert ckpt["model_config"]["name"] == result["selected"]
    assert len(ckpt["folds"]) == cfg.train.n_splits
    assert ckpt["metrics"]["mean_valid_log_rmse"] == result["mean_valid_log_rmse"]
    assert len(ckpt["preprocessor"]["feature_names"]) == ckpt["n_features"]
    lineage = ckpt["lineage"]
    assert lineage["raw_sha1"]["train"] == "585e9cc93e70b39160e7921475f9bcd7d31219ce"
    assert set(lineage) >= {"download", "preprocess", "tensorize", "train"}
    assert len(lineage["train"]) == len(cfg.candidates)
    board = json.loads(ref.file("leaderboard.json").read_text())["leaderboard"]
    assert board[0]["candidate"] == result["selected"]
    assert board[0]["mean_valid_log_rmse"] == min(m["mean_valid_log_rmse"] for m in board)
    card = ref.file("model_card.md").read_text()
    assert result["selected"] in card and "585e9cc93e70b39160e7921475f9bcd7d31219ce" in card
