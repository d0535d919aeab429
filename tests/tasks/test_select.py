from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tasks.config import SelectConfig, TrainConfig, candidate
from tasks.select import (
    CHECKPOINT_FORMAT,
    auto_final,
    blend_metrics,
    cross_fitted_blend,
    fast_enough_blend,
    fit_blend,
    fold_table,
    leaderboard,
    select_model,
)
from tasks.storage.artifacts import ArtifactRef
from tests.conftest import OWN_FIELDS


def _m(name, scores, oof=None, status="ok"):
    import numpy as np

    ok = status == "ok"
    return {"candidate": name, "status": status, "reason": None if ok else "nan at epoch 3",
            "mean_valid_log_rmse": float(np.mean(scores)) if ok else None,
            "std_valid_log_rmse": float(np.std(scores, ddof=1)) if ok else None,
            "oof_log_rmse_all": oof if ok else None, "oof_log_rmse_clean": oof if ok else None,
            "folds": [{"fold": k, "valid_log_rmse": s if ok else None} for k, s in
                      enumerate(scores)]}


def test_leaderboard_ranks_by_oof_score_and_puts_diverged_last():
    board = leaderboard([_m("a", [0.2, 0.2], 0.2), _m("d", [0.0, 0.0], status="diverged"),
                         _m("b", [0.1, 0.14], 0.12), _m("c", [0.25, 0.1], 0.17)])
    assert [m["candidate"] for m in board] == ["b", "c", "a", "d"]
    table = fold_table(board, chosen="b")
    assert table[0]["selected"] == "yes" and table[0]["fold 2"] == 0.14
    assert list(table[0]) == ["candidate", "selected", "oof all rows", "oof w/o outliers",
                              "mean", "std", "fold 1", "fold 2", "blend weight",
                              "predict rows/s", "status"]
    assert table[0]["mean"] == 0.12 and table[0]["oof all rows"] == 0.12
    assert [r["selected"] for r in table] == ["yes", "", "", ""]
    assert table[3]["status"] == "diverged: nan at epoch 3" and table[3]["mean"] is None


def test_a_candidate_halving_stopped_says_so_in_its_status():
    stopped = {**_m("s", [0.2, 0.2], 0.2), "halving": {
        "rung": 1, "rungs": 3, "share": 0.25, "stopped": True}}
    whole = {**_m("w", [0.1, 0.1], 0.1), "halving": {
        "rungs": 3, "share": 1.0, "stopped": False}}
    odd = {**_m("o", [0.3, 0.3], 0.3), "halving": "not a dict"}  # a damaged metrics file
    table = fold_table(leaderboard([stopped, whole, odd]), chosen="w")
    assert [r["status"] for r in table] == [
        "ok", "ok; halving stopped it at rung 1 of 3 (0.25 of its steps)", "ok"]
    from tasks.select import model_card

    chosen = {"candidate": "w", "oof_log_rmse_all": 0.1, "oof_log_rmse_clean": 0.1,
              "n_rows_all": 10, "n_rows_clean": 9, "mean_valid_log_rmse": 0.1,
              "std_valid_log_rmse": 0.01}
    card = model_card(chosen, [], leaderboard([stopped, whole]),
                      {"n_splits": 2, "select.on": "all"}, {})
    row = "| 0.2000 | 0.2000 | — | — | ok; halving stopped it at rung 1 of 3 (0.25 of its steps) |"
    assert row in card.replace("0.2000 ± 0.0000", "0.2000"), card


def test_blend_weights_are_non_negative_and_its_score_is_cross_fitted():
    rng = np.random.default_rng(0)
    n = 400
    logy = 12 + rng.normal(0, 0.4, n)
    good_a = logy + rng.normal(0, 0.1, n)
    good_b = logy + rng.normal(0, 0.1, n)  # independent errors: averaging helps
    doubled = 2 * good_a - logy  # good_a's error twice: 2*a - doubled would be exact
    P = np.column_stack([good_a, good_b, doubled])
    assert np.linalg.lstsq(P, logy, rcond=None)[0][2] < -0.5  # what a free fit would do
    w = fit_blend(P, logy)
    assert (w >= 0).all() and w[2] == pytest.approx(0, abs=1e-6)
    assert w[0] == pytest.approx(0.5, abs=0.1) and w[1] == pytest.approx(0.5, abs=0.1)
    fold = np.arange(n) % 4
    crossed = cross_fitted_blend(P, logy, fold, np.ones(n, bool))
    rmse = lambda p: np.sqrt(np.mean((p - logy) ** 2))  # noqa: E731
    assert rmse(crossed) < min(rmse(good_a), rmse(good_b))
    assert rmse(crossed) >= rmse(P @ w)  # honest: no better than in-sample weights


def _three_members(n=300, seed=1):
    rng = np.random.default_rng(seed)
    logy = 12 + rng.normal(0, 0.4, n)
    P = np.column_stack([logy + rng.normal(0, s, n) for s in (0.08, 0.12, 0.2)])
    return P, logy


def test_a_folds_blended_prediction_does_not_move_when_that_folds_prices_do():
    """Cross-fitting: the weights that predict fold k's rows never saw fold k's prices."""
    P, logy = _three_members()
    fold = np.arange(len(logy)) % 5
    use = np.ones(len(logy), bool)
    before = cross_fitted_blend(P, logy, fold, use)
    moved = logy.copy()
    moved[fold == 2] += np.random.default_rng(2).normal(0, 0.5, (fold == 2).sum())
    after = cross_fitted_blend(P, moved, fold, use)
    np.testing.assert_array_equal(after[fold == 2], before[fold == 2])
    # ... while every other fold's weights did see them, and moved.
    assert not np.allclose(after[fold != 2], before[fold != 2])


def test_the_blends_score_is_that_of_weights_fitted_on_the_other_folds():
    """An independent computation of the headline score: per fold, scikit-learn's
    non-negative least squares on the other folds' selection rows, then the RMSE."""
    from sklearn.linear_model import LinearRegression

    P, logy = _three_members()
    n = len(logy)
    fold = np.arange(n) % 4
    outlier = np.zeros(n, bool)
    outlier[::37] = True
    oof = pd.DataFrame({"Id": np.arange(n), "fold": fold, "outlier": outlier, "log_price": logy})
    got = blend_metrics(P, ["a", "b", "c"], oof, "clean")
    want = np.empty(n)
    for k in range(4):
        rows = (fold != k) & ~outlier
        fit = LinearRegression(positive=True, fit_intercept=False).fit(P[rows], logy[rows])
        want[fold == k] = P[fold == k] @ fit.coef_
    np.testing.assert_allclose(got["oof_pred"], want, rtol=1e-6)
    assert got["oof_log_rmse_all"] == pytest.approx(np.sqrt(np.mean((want - logy) ** 2)))
    clean = ~outlier
    assert got["oof_log_rmse_clean"] == pytest.approx(
        np.sqrt(np.mean((want[clean] - logy[clean]) ** 2)))
    full = LinearRegression(positive=True, fit_intercept=False).fit(P[clean], logy[clean])
    assert list(got["weights"].values()) == pytest.approx(full.coef_.tolist(), abs=1e-6)


@pytest.mark.parametrize(("floor", "want"), [
    (None, {"a", "b", "c"}),  # no floor: every candidate blended
    (50, {"a", "b", "c"}),  # fast enough as it is (1 / (1/1000 + 1/100 + 1/500) = 76)
    (300, {"a", "c"}),  # too slow: the slowest, b, left out (333 rows/s)
    (400, None),  # still too slow without c: one candidate is no blend
])
def test_a_blend_too_slow_for_the_floor_leaves_out_its_slowest_component(floor, want):
    P, logy = _three_members()
    n = len(logy)
    oof = pd.DataFrame({"Id": np.arange(n), "fold": np.arange(n) % 4,
                        "outlier": np.zeros(n, bool), "log_price": logy})
    rates = {"a": 1000.0, "b": 100.0, "c": 500.0}
    # A blend predicts as its components one after another.
    speed = lambda w: 1 / sum(1 / rates[c] for c, x in w.items() if x > 0)  # noqa: E731
    blend = fast_enough_blend(P, ["a", "b", "c"], oof, "all", rates, floor, speed)
    if want is None:
        assert blend is None
    else:
        assert {c for c, w in blend["weights"].items() if w > 0} == want
        assert floor is None or blend["predict_rows_per_s"] >= floor


@pytest.mark.parametrize(("mixed", "max_loss", "floor", "want"), [
    (0.1100, 0.0, False, "mixed"),  # no worse: the fast form
    (0.1104, 0.0005, False, "mixed"),  # worse, within max_loss
    (0.1106, 0.0005, False, "ensemble"),  # worse by more than max_loss
    (0.1106, 0.0005, True, "mixed"),  # a speed floor: never the slowest form
])
def test_auto_picks_mixed_unless_it_loses_more_than_max_loss(mixed, max_loss, floor, want):
    estimates = {"ensemble": 0.1100, "mixed": mixed, "refit": 0.1200}
    assert auto_final(estimates, max_loss, floor) == want


def _fake_train(root, name, pred, logy, outlier, kind="ridge", status="ok", folds=3):
    ref = ArtifactRef(root=str(root), stage="train", version=f"{name:0<16}"[:16])
    ref.path.mkdir(parents=True)
    n = len(logy)
    pd.DataFrame({"Id": np.arange(n), "fold": np.arange(n) % folds, "pred_log_price": pred,
                  "outlier": outlier, "log_price": logy}).to_parquet(ref.file("oof.parquet"))
    ok = status == "ok"
    rm = float(np.sqrt(np.mean((pred - logy) ** 2)))
    (ref.path / "metrics.json").write_text(json.dumps({
        "candidate": name, "kind": kind, "status": status,
        "reason": None if ok else "loss became nan", "mean_valid_log_rmse": rm if ok else None,
        "std_valid_log_rmse": 0.0 if ok else None, "mean_train_log_rmse": rm,
        "oof_log_rmse_all": rm if ok else None, "oof_log_rmse_clean": rm if ok else None,
        "n_rows_all": n, "n_rows_clean": n, "folds": []}))
    return ref


# The upstream artifacts of a select that fails before it reads them.
UNREAD = {"raw": None, "preprocessor": None, "data": None}


def test_no_healthy_candidate_fails_with_the_reasons(tmp_path):
    logy = np.full(30, 12.0)
    refs = [_fake_train(tmp_path, n, logy, logy, np.zeros(30, bool), status="diverged")
            for n in ("a", "b")]
    specs = [candidate(name=n, kind="ridge") for n in ("a", "b")]
    with pytest.raises(ValueError, match=r"no healthy candidate.*a diverged \(loss became nan\)"):
        select_model(refs, specs, TrainConfig(n_splits=3), SelectConfig(), tmp_path / "out",
                     **UNREAD)


def _weights_by_hand(cfg, ckpt, selected) -> dict[str, float]:
    """The selected model's weights from the train artifacts: 1 for a single candidate;
    for the blend, scikit-learn's non-negative least squares of the candidates' out-of-fold
    predictions on the selection rows (those with weight 0 left out)."""
    from sklearn.linear_model import LinearRegression

    if selected != "blend":
        return {selected: 1.0}
    refs = {name: ArtifactRef(root=cfg.artifacts_dir, stage="train", version=v)
            for v, name in ckpt["lineage"]["train_candidates"].items()}
    frames = {n: pd.read_parquet(ref.file("oof.parquet")) for n, ref in refs.items()
              if json.loads(ref.file("metrics.json").read_text())["status"] == "ok"}
    names = list(frames)
    first = frames[names[0]]
    rows = ~first["outlier"].to_numpy(bool) if cfg.select.on == "clean" else slice(None)
    P = np.column_stack([frames[n]["pred_log_price"].to_numpy() for n in names])[rows]
    fit = LinearRegression(positive=True, fit_intercept=False).fit(
        P, first["log_price"].to_numpy()[rows])
    return {n: float(w) for n, w in zip(names, fit.coef_, strict=True) if w > 1e-9}


def test_candidates_cut_into_other_folds_are_not_blended(tmp_path):
    logy = 12 + np.random.default_rng(0).normal(0, 0.3, 30)
    refs = [_fake_train(tmp_path, "a", logy, logy, np.zeros(30, bool), folds=3),
            _fake_train(tmp_path, "b", logy, logy, np.zeros(30, bool), folds=5)]
    specs = [candidate(name=n, kind="ridge") for n in ("a", "b")]
    with pytest.raises(ValueError, match="trained on different rows or folds; rerun the train"):
        select_model(refs, specs, TrainConfig(n_splits=3), SelectConfig(), tmp_path / "out",
                     **UNREAD)


@pytest.mark.parametrize("final", ["mixed", "refit", "auto"])
def test_a_final_form_needing_refits_that_train_did_not_keep_says_rerun(tmp_path, final):
    logy = 12 + np.random.default_rng(0).normal(0, 0.3, 30)
    ref = _fake_train(tmp_path, "a", logy, logy, np.zeros(30, bool))
    torch.save({"folds": []}, ref.file("models.pt"))  # an artifact from before refits
    with pytest.raises(ValueError, match=rf"select.final = '{final}', but train artifacts of "
                                         r"\['a'\] hold no model fitted on all rows; rerun "
                                         "from train"):
        select_model([ref], [candidate(name="a", kind="ridge")], TrainConfig(n_splits=3),
                     SelectConfig(final=final), tmp_path / "out", **UNREAD)


def test_checkpoint_is_self_describing(trained):
    cfg, result = trained
    ref = ArtifactRef(root=cfg.artifacts_dir, stage="select", version=result["model_version"])
    ckpt = torch.load(ref.file("model.pt"), weights_only=True)
    assert ckpt["format"] == CHECKPOINT_FORMAT
    assert {c["candidate"]: c["weight"] for c in ckpt["components"]} == result["components"]
    weights = {c["candidate"]: c["weight"] for c in ckpt["components"]}
    assert weights == pytest.approx(_weights_by_hand(cfg, ckpt, result["selected"]),
                                    abs=1e-6)
    for comp in ckpt["components"]:
        assert comp["model_config"]["name"] == comp["candidate"]
        # only the component's own kind's fields
        assert set(comp["model_config"]) == OWN_FIELDS[comp["model_config"]["kind"]]
        # a fold ensemble, or (select.final) one model fitted on all rows
        assert len(comp["folds"]) == (1 if comp["refit"] else
                                      cfg.train.n_splits * cfg.train.repeats)
        assert comp["refit"] == (ckpt["final"] == "refit" or (
            ckpt["final"] == "mixed" and comp["model_config"]["kind"] not in
            ("linear", "lasso", "ridge", "enet")))
    assert ckpt["final"] == ckpt["metrics"]["final"] in ("ensemble", "mixed", "refit")
    assert ckpt["metrics"]["mean_valid_log_rmse"] == result["mean_valid_log_rmse"]
    assert len(ckpt["preprocessor"]["feature_names"]) == ckpt["n_features"]
    lineage = ckpt["lineage"]
    assert lineage["raw_files"]["train"] == {
        "kaggle_house_pred_train.csv": "585e9cc93e70b39160e7921475f9bcd7d31219ce"}
    # The data version by hand: SHA-256 of the sorted [name, SHA-1] pairs as compact JSON.
    pairs = json.dumps([["kaggle_house_pred_train.csv",
                         "585e9cc93e70b39160e7921475f9bcd7d31219ce"]], separators=(",", ":"))
    assert lineage["data_version"] == hashlib.sha256(pairs.encode()).hexdigest()[:8]
    assert result["data_version"] == lineage["data_version"]
    assert set(lineage) >= {"download", "preprocess", "tensorize", "train"}
    assert len(lineage["train"]) == len(cfg.all_candidates())
    # Hashes with names: the lineage says which candidate each train version is, and each
    # candidate's folder is found by name on disk.
    names = {c.name for c in cfg.all_candidates()}
    assert set(lineage["train_candidates"].values()) == names
    assert set(lineage["train_candidates"]) == set(lineage["train"])
    for version, name in lineage["train_candidates"].items():
        alias = Path(cfg.artifacts_dir) / "by-name" / "train" / name
        assert alias.is_symlink()  # to the latest built artifact of that name
        assert json.loads((alias / "metrics.json").read_text())["candidate"] == name
        assert f"`{version}` ({name})" in ref.file("model_card.md").read_text()
    board = json.loads(ref.file("leaderboard.json").read_text())["leaderboard"]
    assert board[0]["candidate"] == result["selected"]
    key = f"oof_log_rmse_{cfg.select.on}"  # the leaderboard is ordered by what selects
    assert board[0][key] == min(m[key] for m in board if m[key] is not None)
    card = ref.file("model_card.md").read_text()
    assert result["selected"] in card and "585e9cc93e70b39160e7921475f9bcd7d31219ce" in card
    assert "OOF w/o outliers" in card and "1458 rows without the outliers" in card
    # The headline leads with every row, what a user meets.
    assert card.index("on all 1460 rows") < card.index("1458 rows without the outliers")


def test_model_card_shows_only_each_components_own_fields():
    from tasks.select import model_card

    lasso = candidate(name="lasso", kind="lasso", alpha=5e-4)
    mlp = candidate(name="mlp", kind="mlp", hidden=(8,))
    chosen = {"candidate": "blend", "oof_log_rmse_all": 0.12, "oof_log_rmse_clean": 0.11,
              "n_rows_all": 10, "n_rows_clean": 9, "mean_valid_log_rmse": 0.12,
              "std_valid_log_rmse": 0.01}
    comps = [{"candidate": c.name, "weight": 0.5, "model_config": c.model_dump(mode="json")}
             for c in (lasso, mlp)]
    card = model_card(chosen, comps, [], {"n_splits": 5, "select.on": "clean"}, {})
    lasso_part, mlp_part = card.split("### mlp")
    lasso_part = lasso_part.split("### lasso")[1]
    assert "| alpha | 0.0005 |" in lasso_part and "| max_iter |" in lasso_part
    assert not any(f"| {f} |" in lasso_part for f in ("optimizer", "lr", "epochs", "hidden"))
    assert "| optimizer | adam |" in mlp_part and "| alpha |" not in mlp_part


def test_an_old_checkpoint_is_refused_in_one_line(tmp_path):
    from tasks.predict import DataError, FittedModel

    path = tmp_path / "model.pt"
    torch.save({"format": "houseprice-checkpoint/2", "components": []}, path)
    with pytest.raises(DataError) as err:
        FittedModel.load(path)
    msg = str(err.value)
    assert "houseprice-checkpoint/2" in msg and "rerun select" in msg and "\n" not in msg


def test_final_estimates_score_ensembles_by_the_mean_over_repeats():
    """A fold ensemble is scored by each row's mean over the repeats, a refit by each
    repeat's own prediction; 'mixed' keeps the ensemble for linear kinds only."""
    from tasks.select import final_estimates

    rng = np.random.default_rng(0)
    n, R = 200, 3
    logy = np.tile(rng.normal(12, 0.4, n), R)
    oof = pd.DataFrame({"Id": np.tile(np.arange(n), R), "repeat": np.repeat(np.arange(R), n),
                        "log_price": logy, "outlier": False})
    P = np.column_stack([logy + rng.normal(0, 0.1, n * R), logy + rng.normal(0, 0.2, n * R)])
    specs = {"lasso": candidate(name="lasso", kind="lasso"),
             "hgb": candidate(name="hgb", kind="hgb")}
    w = {"lasso": 0.7, "hgb": 0.3}
    est = final_estimates(P, ["lasso", "hgb"], oof, w, specs, "all")
    mean = oof.assign(a=P[:, 0], b=P[:, 1]).groupby("Id")[["a", "b"]].transform("mean")
    rmse = lambda p: float(np.sqrt(np.mean((p - logy) ** 2)))  # noqa: E731
    assert est["ensemble"] == pytest.approx(rmse(0.7 * mean["a"] + 0.3 * mean["b"]))
    assert est["refit"] == pytest.approx(rmse(0.7 * P[:, 0] + 0.3 * P[:, 1]))
    assert est["mixed"] == pytest.approx(rmse(0.7 * mean["a"] + 0.3 * P[:, 1]))
    assert est["ensemble"] < est["mixed"] < est["refit"]  # averaging independent errors


def _reselect(trained, tmp_path, keep=None, **select):
    cfg, _ = trained
    upstream = ArtifactRef(root=cfg.artifacts_dir, stage="select",
                           version=trained[1]["model_version"]).manifest()["upstream"]
    refs = [ArtifactRef(root=cfg.artifacts_dir, **u) for u in upstream["trained"]]
    if keep is not None:
        refs = refs[:keep]
    out = tmp_path / (json.dumps(select, sort_keys=True).replace('"', "")[:60] + f"-{keep}")
    out.mkdir()
    inputs = {k: ArtifactRef(root=cfg.artifacts_dir, **upstream[k])
              for k in ("raw", "preprocessor", "data")}
    result = select_model(refs, cfg.all_candidates(), cfg.train,
                          SelectConfig(**select), out, **inputs)
    return result, json.loads((out / "leaderboard.json").read_text())["leaderboard"]


def test_min_rows_per_s_leaves_out_slower_candidates(trained, tmp_path):
    """Each candidate's measured speed is on the leaderboard; with select.min_rows_per_s
    between the linear kinds' speed and the networks' (fold ensembles), only the fast ones
    are selected, the others say why; a floor nothing meets is a one-line error."""
    _, board = _reselect(trained, tmp_path, final="ensemble")
    rates = {m["candidate"]: m["predict_rows_per_s"] for m in board if m["status"] == "ok"
             and m["candidate"] != "blend"}
    assert all(r > 0 for r in rates.values())
    fast, slow = rates["lasso"], rates["mlp"]
    # a collapsed linear ensemble vs 10 networks on 10 matrices (at least 3x on a machine busy
    # with the other tests: the floor between them is then 1.7x from each)
    assert fast > 3 * slow
    floor = (fast * slow) ** 0.5
    result, board = _reselect(trained, tmp_path, final="ensemble", min_rows_per_s=floor)
    kinds = {c.name: c.kind for c in trained[0].all_candidates()}
    assert result["components"] and all(kinds[n] in ("linear", "lasso", "ridge")
                                        for n in result["components"])
    reasons = {m["candidate"]: m.get("reason") or "" for m in board}
    assert "under select.min_rows_per_s" in reasons["mlp"]
    with pytest.raises(ValueError, match="no candidate predicts at select.min_rows_per_s"):
        _reselect(trained, tmp_path, min_rows_per_s=1e12)


def test_a_refit_final_model_predicts_from_one_model_per_component(trained, tmp_path):
    result, _ = _reselect(trained, tmp_path, final="refit")
    assert result["final"] == "refit" and result["predict_rows_per_s"] > 0
    ckpt = torch.load(tmp_path.glob("*refit*").__next__() / "model.pt", weights_only=True)
    assert all(c["refit"] and len(c["folds"]) == 1 for c in ckpt["components"])
    assert ckpt["fold_preprocessors"] is None


def test_weights_are_those_of_the_selected_model(trained, tmp_path):
    """A candidate selected alone has weight 1 and the others 0, not the weights of the
    blend it beat; a selected blend's are its own (non-negative least squares)."""
    singles = 0
    for keep in (1, 2, 3, None):
        result, board = _reselect(trained, tmp_path, keep=keep, final="ensemble")
        weights = {m["candidate"]: m.get("blend_weight") for m in board
                   if m["candidate"] != "blend" and m["status"] == "ok"}
        if result["selected"] != "blend":
            singles += 1
            assert weights == {n: float(n == result["selected"]) for n in weights}, weights
        else:
            blend = next(m for m in board if m["candidate"] == "blend")
            assert weights == {n: blend["weights"].get(n, 0.0) for n in weights}
    assert singles  # (keep=1: one candidate, selected alone)


def test_models_lists_training_rows_not_out_of_fold_predictions(trained, capsys):
    """Cut twice (repeats = 2), 1460 rows have 2920 out-of-fold predictions: 'houseprice
    models' says 1460."""
    from flows.cli import main

    cfg, result = trained
    assert cfg.train.repeats == 2
    assert main(["models", "--artifacts", cfg.artifacts_dir]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines()
                if result["model_version"] in x)
    assert " 1460 " in line and "2920" not in line, line


def test_the_selected_models_ranges_cover_their_levels_out_of_fold(trained):
    from tasks.inference import intervals

    cfg, result = trained
    ref = ArtifactRef(root=cfg.artifacts_dir, stage="select", version=result["model_version"])
    saved = json.loads(ref.file(intervals.INTERVALS_JSON).read_text())
    # Each fold's rows with ranges calibrated on the other folds: within 1.5 points.
    assert [row["level"] for row in saved["coverage"]] == [0.8, 0.9, 0.95]
    for row in saved["coverage"]:
        assert abs(row["coverage"] - row["level"]) <= 0.015, saved["coverage"]
        assert 0 < row["median_relative_width"] < 1
    meta = ref.manifest()["metrics"]
    assert meta["interval_coverage"] == {
        f"{row['level']:g}": round(row["coverage"], 4) for row in saved["coverage"]}
    card = ref.file("model_card.md").read_text()
    assert "## Price ranges" in card
    assert f"| 90% | {saved['coverage'][1]['coverage']:.1%} | $" in card
    # The calibration is the one the selected model's out-of-fold rows give.
    oof = pd.read_parquet(ref.file("oof.parquet"))
    assert len(oof) == oof["Id"].nunique() == 1460  # one prediction per house
    again = intervals.fit(oof["pred_log_price"], oof["log_price"])
    stored = intervals.load(ref.file(intervals.INTERVALS_JSON))
    grid = np.linspace(10.5, 13.5, 61)
    np.testing.assert_array_equal(stored.half_width(grid, 0.9), again.half_width(grid, 0.9))
    assert len(stored.bands) == 5 and stored.bands[0].n == 292
