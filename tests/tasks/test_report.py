"""The dashboard's learning-curves artifact."""

from __future__ import annotations

import json

from tasks.report import curves_markdown
from tasks.storage.artifacts import ArtifactRef


def _trained(root, name: str, score: float | None, png: bool = True) -> ArtifactRef:
    ref = ArtifactRef(root=str(root), stage="train", version=name)
    ref.path.mkdir(parents=True)
    ref.file("metrics.json").write_text(json.dumps({"candidate": name, "oof_log_rmse_all": score}))
    if png:
        ref.file("learning_curves.png").write_bytes(name.encode())
    return ref


def test_curves_show_the_best_torch_candidates_only(tmp_path):
    scores = {f"mlp-{i:02d}": 0.12 + 0.001 * ((7 * i) % 10) for i in range(10)}
    trained = [_trained(tmp_path, name, score) for name, score in scores.items()]
    trained.append(_trained(tmp_path, "hgb", 0.11, png=False))  # no epochs, no curves
    md = curves_markdown(trained, shown=3)
    best = sorted(scores, key=scores.get)[:3]
    shown = [line[3:].split(" ")[0] for line in md.splitlines() if line.startswith("## ")]
    assert shown == best
    assert md.count("data:image/png;base64,") == 3
    assert "The best 3 of 10 torch candidates" in md
    assert "hgb" not in md


def test_curves_of_a_small_search_are_all_shown(tmp_path):
    trained = [_trained(tmp_path, "mlp", 0.13), _trained(tmp_path, "linear", None)]
    md = curves_markdown(trained)
    assert md.count("data:image/png;base64,") == 2
    assert "The best" not in md
