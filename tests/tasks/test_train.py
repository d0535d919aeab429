from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.config import TrainConfig, candidate
from tasks.kinds.base import skops_loads
from tasks.kinds.nets import Regressor, SeededDropout, log_price, log_rmse
from tasks.train import candidate_metrics, cross_validate, make_folds


def test_shuffled_folds_partition_rows_and_are_seeded():
    folds = make_folds(103, 5, seed=7, scheme="shuffled")
    valid = np.concatenate([v for _, v in folds])
    assert sorted(valid.tolist()) == list(range(103))
    for tr, va in folds:
        assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 103
    again = make_folds(103, 5, seed=7, scheme="shuffled")
    assert all((a[1] == b[1]).all() for a, b in zip(folds, again, strict=True))
    other = make_folds(103, 5, seed=8, scheme="shuffled")
    assert any((a[1] != b[1]).any() for a, b in zip(folds, other, strict=True))


def test_contiguous_folds_match_the_book():
    folds = make_folds(1460, 5, seed=0, scheme="contiguous")
    assert folds[0][1].tolist() == list(range(292))
    assert folds[4][1].tolist() == list(range(1168, 1460))
    assert len(folds[2][0]) == 1168


def test_too_many_folds_is_an_error():
    with pytest.raises(ValueError, match="cannot make 10 folds from 5 rows"):
        make_folds(5, 10, 0, "shuffled")


def test_log_rmse_clamps_prices_at_one_like_the_book():
    price = torch.tensor([1.0, 100.0])
    raw = log_price(torch.tensor([-50.0, 100.0]), "raw", 0.0, 1.0)
    assert log_rmse(raw, price) == pytest.approx(0.0)
    logp = log_price(torch.tensor([-50.0, 0.0]), "log", 0.0, 1.0)
    assert logp.tolist() == [0.0, 0.0]


def test_seeded_dropout_is_reproducible_and_off_in_eval():
    x = torch.ones(4, 100)
    a = SeededDropout(0.5, torch.Generator().manual_seed(1))(x)
    b = SeededDropout(0.5, torch.Generator().manual_seed(1))(x)
    assert torch.equal(a, b) and set(a.unique().tolist()) == {0.0, 2.0}
    drop = SeededDropout(0.5, torch.Generator().manual_seed(1)).eval()
    assert torch.equal(drop(x), x)


@pytest.mark.parametrize("init", ["default", "xavier", "normal"])
def test_init_schemes_are_seeded(init):
    spec = candidate(name="m", kind="mlp", hidden=(8,), init=init)
    a = Regressor(spec, 5, torch.Generator().manual_seed(3))
    b = Regressor(spec, 5, torch.Generator().manual_seed(3))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    if init == "normal":
        assert float(a.net[0].weight.detach().std()) < 0.05


def _synthetic(n=300, d=6, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = np.exp(12 + X @ rng.normal(scale=0.3, size=d) + rng.normal(scale=0.05, size=n))
    return X, y


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_training_learns_and_records_curves(activation):
    X, y = _synthetic()
    spec = candidate(name="m", kind="mlp", hidden=(16,), activation=activation, dropout=0.1,
                           lr=0.01, epochs=30)
    cv = cross_validate(X, y, spec, TrainConfig(repeats=1, n_splits=5))
    baseline = float(np.std(np.log(y)))  # predicting the mean log price
    assert max(cv.valid_log_rmse) < 0.5 * baseline
    for c in cv.curves:
        assert len(c["train_log_rmse"]) == len(c["grad_norm"]) == 30
        assert c["train_log_rmse"][-1] < c["train_log_rmse"][0]
    assert not np.isnan(cv.oof_log_price).any() and cv.diverged is None


def test_cross_validation_is_deterministic_for_a_seed():
    X, y = _synthetic()
    spec = candidate(name="m", kind="mlp", hidden=(8,), dropout=0.2, epochs=5, seeds=2)
    cfg = TrainConfig(repeats=1, n_splits=3, seed=4)
    a = cross_validate(X, y, spec, cfg)
    b = cross_validate(X, y, spec, cfg)
    assert a.valid_log_rmse == b.valid_log_rmse
    np.testing.assert_array_equal(a.oof_log_price, b.oof_log_price)
    c = cross_validate(X, y, spec, TrainConfig(repeats=1, n_splits=3, seed=5))
    assert a.valid_log_rmse != c.valid_log_rmse
    assert all(len(members) == 2 for members in a.members)  # 2 seeds per fold


def test_book_raw_target_with_sgd_and_linear_model():
    X, y = _synthetic()
    spec = candidate(name="lin", kind="linear", optimizer="sgd", lr=1e-3,
                           epochs=3)
    cv = cross_validate(X, y, spec, TrainConfig(repeats=1, n_splits=2, target="raw",
                                                fold_scheme="contiguous"))
    assert all(np.isfinite(v) for v in cv.valid_log_rmse)
    assert cv.members[0][0]["y_mean"] == 0.0 and cv.members[0][0]["y_std"] == 1.0


@pytest.mark.parametrize("kind", ["ridge", "lasso", "hgb"])
def test_sklearn_candidates_use_the_same_folds_and_metric(kind):
    X, y = _synthetic()
    own = {"hgb": {"learning_rate": 0.1}}.get(kind, {"alpha": 1e-3})
    spec = candidate(name="s", kind=kind, **own, **({} if kind == "ridge" else {"max_iter": 50}))
    cv = cross_validate(X, y, spec, TrainConfig(repeats=1, n_splits=4, seed=1))
    torch_cv = cross_validate(X, y, candidate(name="m", kind="linear", epochs=2),
                              TrainConfig(repeats=1, n_splits=4, seed=1))
    assert [v.tolist() for _, v in cv.folds] == [v.tolist() for _, v in torch_cv.folds]
    assert max(cv.valid_log_rmse) < 0.5 * float(np.std(np.log(y)))
    est = skops_loads(cv.members[0][0])
    va = cv.folds[0][1]
    np.testing.assert_allclose(est.predict(X[va]), cv.oof_log_price[0, va])


def test_excluded_rows_are_not_fitted_but_are_scored():
    X, y = _synthetic()
    y = y.copy()
    y[:3] = 1.0  # wild rows: fitting them would drag every fold
    excluded = np.zeros(len(y), bool)
    excluded[:3] = True
    spec = candidate(name="r", kind="ridge", alpha=1.0)
    cfg = TrainConfig(repeats=1, n_splits=3)
    kept = cross_validate(X, y, spec, cfg, excluded)
    used = cross_validate(X, y, spec, cfg)
    assert not np.isnan(kept.oof_log_price[0, :3]).any()  # still predicted out of fold
    clean = ~excluded
    err = lambda cv: np.sqrt(np.mean((cv.oof_log_price[0, clean] - np.log(y[clean])) ** 2))  # noqa: E731
    assert err(kept) < err(used)


def test_candidate_metrics_report_both_row_sets():
    X, y = _synthetic()
    outliers = np.zeros(len(y), bool)
    outliers[[5, 9]] = True
    spec = candidate(name="r", kind="ridge")
    cv = cross_validate(X, y, spec, TrainConfig(repeats=1, n_splits=3))
    m = candidate_metrics(spec, cv, np.log(y), outliers)
    assert (m["n_rows_all"], m["n_rows_clean"]) == (300, 298)
    assert m["status"] == "ok" and m["oof_log_rmse_all"] != m["oof_log_rmse_clean"]
    # By hand, from each row's out-of-fold prediction: every fold's RMSE, their mean, and
    # the RMSE over all rows and over the rows that are not outliers.
    logy, pred = np.log(y), cv.oof_log_price[0]
    per_fold = [np.sqrt(np.mean((pred[va] - logy[va]) ** 2)) for _, va in cv.folds]
    assert m["mean_valid_log_rmse"] == pytest.approx(np.mean(per_fold))
    assert [f["valid_log_rmse"] for f in m["folds"]] == pytest.approx(per_fold)
    assert m["oof_log_rmse_all"] == pytest.approx(np.sqrt(np.mean((pred - logy) ** 2)))
    keep = ~outliers
    assert m["oof_log_rmse_clean"] == pytest.approx(
        np.sqrt(np.mean((pred[keep] - logy[keep]) ** 2)))


def test_worker_that_cannot_see_the_artifact_root_fails_clearly(tmp_path):
    from tasks.stage import StageError
    from tasks.storage.artifacts import ArtifactRef
    from tasks.train import train_task

    missing = tmp_path / "not-mounted-here"
    data = ArtifactRef(root=str(missing), stage="tensorize", version="0" * 16)
    spec = candidate(name="r", kind="ridge")
    with pytest.raises(StageError, match=r"artifact root .*not-mounted-here is not visible on "
                                         r".*; put it on storage every worker mounts"):
        train_task.fn(data, spec, TrainConfig(), root=str(missing))


# Candidates of one shape (hidden, activation, batch size, epochs, optimizer) that differ in
# learning rate, weight decay, dropout (0 included: it draws nothing), init and seeds.
GROUP = [
    {"name": "a", "lr": 1e-3, "weight_decay": 0.0, "dropout": 0.0, "seeds": 1},
    {"name": "b", "lr": 3e-3, "weight_decay": 1e-2, "dropout": 0.2, "seeds": 2,
     "init": "xavier"},
    {"name": "c", "lr": 5e-4, "weight_decay": 1e-3, "dropout": 0.4, "seeds": 1,
     "clip_grad_norm": 0.5},
]


def test_a_stacked_group_equals_each_candidate_trained_alone():
    from tasks.kinds.torch_net import cross_validate_group

    X, y = _synthetic()
    config = TrainConfig(repeats=1, n_splits=3, seed=4)
    specs = [candidate(kind="mlp", hidden=(8,), epochs=6, batch_size=32, **g) for g in GROUP]
    folds = make_folds(len(X), 3, 4, "shuffled")
    fitted = [tr for tr, _ in folds]
    together = cross_validate_group(specs, X, y, config, folds, fitted, lambda f: None)
    for spec, got in zip(specs, together, strict=True):
        alone = cross_validate(X, y, spec, config)
        np.testing.assert_allclose(got.oof_log_price, alone.oof_log_price, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.curves[0]["valid_log_rmse"],
                                   alone.curves[0]["valid_log_rmse"], rtol=1e-5, atol=1e-5)
        assert got.diverged is None and len(got.members[0]) == spec.seeds


def test_a_diverged_member_of_a_group_stops_alone():
    from tasks.kinds.torch_net import cross_validate_group

    X, y = _synthetic()
    config = TrainConfig(repeats=1, n_splits=3, seed=1)
    ok = candidate(name="ok", kind="linear", optimizer="sgd", lr=1e-3, epochs=5)
    hot = candidate(name="hot", kind="linear", optimizer="sgd", lr=1e6, epochs=5)
    folds = make_folds(len(X), 3, 1, "shuffled")
    fitted = [tr for tr, _ in folds]
    good, bad = cross_validate_group([ok, hot], X, y, config, folds, fitted, lambda f: None)
    assert bad.diverged and "non-finite" in bad.diverged
    assert good.diverged is None
    alone = cross_validate(X, y, ok, config)
    np.testing.assert_allclose(good.oof_log_price, alone.oof_log_price, rtol=1e-5, atol=1e-5)


def test_candidates_that_would_need_padding_are_grouped_apart():
    """A group shares a shape and lines its random streams up one model per candidate: the
    same number of seeds, and all drawing dropout masks or none."""
    from tasks.train import stack_groups

    mk = lambda name, **kw: candidate(name=name, kind="mlp", hidden=(8,), epochs=3, **kw)  # noqa: E731
    cands = [mk("a", dropout=0.1), mk("b", dropout=0.3, lr=1e-2), mk("c", dropout=0.0),
             mk("d", dropout=0.1, seeds=2), mk("e", dropout=0.0, weight_decay=1e-3),
             candidate(name="l", kind="lasso")]
    groups = [[c.name for c in g] for g in stack_groups(cands)]
    assert groups == [["a", "b"], ["c", "e"], ["d"], ["l"]]


def test_every_fit_runs_on_the_one_fit_thread_and_logs_its_time():
    import threading

    from tasks.train import _fit

    lines: list[str] = []
    names = [_fit(lambda: threading.current_thread().name, "x", lines.append) for _ in range(2)]
    assert names[0] == names[1] and names[0].startswith("houseprice-fit")
    assert names[0] != threading.current_thread().name
    assert len(lines) == 2 and lines[0].startswith("x: cross-validated in ")
    with pytest.raises(ZeroDivisionError):  # a fit's error reaches the task
        _fit(lambda: 1 / 0, "y", lines.append)


def test_progress_is_sent_in_the_background_and_reads_100_when_done(prefect_api):
    from prefect.client.orchestration import get_client

    from tasks.progress import DashboardProgress

    bar = DashboardProgress("progress-test")
    bar.MIN_INTERVAL_S = 0.0
    for fraction in (0.25, 0.5, 1.0):
        bar.update(fraction)  # 1.0 waits until every value given so far has been sent
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

    with get_client(sync_client=True) as client:  # by id: a full harness holds many artifacts
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[bar.id])))
    assert len(arts) == 1 and float(arts[0].data) == 100.0


@pytest.mark.parametrize("kind", ["ridge", "mlp"])
def test_repeated_folds_give_each_row_one_prediction_per_repeat(kind):
    """train.repeats: R passes of K folds, each cut with its own seed; every row is
    predicted out of fold once per repeat, and the score and its spread come from all."""
    X, y = _synthetic()
    own = {"mlp": {"hidden": [8], "epochs": 2}}.get(kind, {})
    spec = candidate(name="c", kind=kind, **own)
    cfg = TrainConfig(n_splits=3, repeats=2, seed=7)
    cv = cross_validate(X, y, spec, cfg)
    assert len(cv.folds) == 6 and cv.oof_log_price.shape == (2, len(y))
    assert not np.isnan(cv.oof_log_price).any()
    for r in range(2):  # each repeat's folds cover every row exactly once
        valid = np.concatenate([va for _, va in cv.folds[3 * r:3 * (r + 1)]])
        assert sorted(valid.tolist()) == list(range(len(y)))
        single = cross_validate(X, y, spec, TrainConfig(n_splits=3, repeats=1, seed=7 + r))
        assert [v.tolist() for _, v in single.folds] == [
            v.tolist() for _, v in cv.folds[3 * r:3 * (r + 1)]]
        if kind == "ridge":  # deterministic: repeat r is the one-pass run with seed + r
            np.testing.assert_allclose(cv.oof_log_price[r], single.oof_log_price[0])
    assert not np.allclose(cv.oof_log_price[0], cv.oof_log_price[1])  # other folds
    m = candidate_metrics(spec, cv, np.log(y), np.zeros(len(y), bool))
    assert m["repeats"] == 2 and m["n_rows_all"] == len(y)
    per = m["oof_log_rmse_all_per_repeat"]
    assert len(per) == 2 and m["oof_log_rmse_all_spread"] == pytest.approx(np.std(per, ddof=1))
    assert m["oof_log_rmse_all"] == pytest.approx(np.sqrt(np.mean(np.square(per))))
    assert [f["repeat"] for f in m["folds"]] == [0, 0, 0, 1, 1, 1]


def test_repeats_need_shuffled_folds():
    with pytest.raises(ValueError, match="repeats > 1 needs fold_scheme = 'shuffled'"):
        TrainConfig(fold_scheme="contiguous", repeats=3)


def test_learning_curves_are_drawn_with_gaps_and_for_a_candidate_diverged_at_once(tmp_path):
    import matplotlib.image as plt_image

    from tasks.report import plot_curves

    nan, inf = float("nan"), float("inf")
    fine = {"train_log_rmse": [0.5, 0.4, 0.3, 0.25, 0.2],
            "valid_log_rmse": [0.6, 0.5, inf, 0.3, 0.25],  # a gap at epoch 3
            "grad_norm": [2.0, 1.5, 1.0, 0.7, 0.5]}
    dead = {"train_log_rmse": [nan, inf], "valid_log_rmse": [nan, nan], "grad_norm": [inf, nan]}
    other = {k: [2 * x for x in v] for k, v in fine.items()}  # a second fold's, apart
    for name, curves in (("fine", [fine, other]), ("dead", [dead])):
        path = tmp_path / f"{name}.png"
        plot_curves(curves, name, path)
        image = plt_image.imread(path)[..., :3] * 255  # a PNG that decodes
        assert image.shape == (320, 800, 3)  # 10 x 4 inches at 80 dpi
        left, right = image[:, :400], image[:, 400:]
        # Drawn curves: the series' colours at alpha 0.6 over white, train and valid on the
        # left, the gradient norm on the right; a candidate dead at once has none.
        want = {"train": (left, "#1f77b4"), "valid": (left, "#ff7f0e"),
                "grad": (right, "#2ca02c")}
        for series, (half, color) in want.items():
            rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
            blended = 0.6 * rgb + 0.4 * 255
            n = int((np.abs(half - blended).max(axis=-1) < 6).sum())
            assert (n > 30) == (name == "fine"), (name, series, n)


def test_oof_and_folds_files_are_what_the_frame_sort_and_json_gave(tmp_path):
    """``oof.parquet`` is built in its order (no frame sorted and copied) and ``folds.json``
    a line per fold: the same rows, values and order as the pandas frame sorted by (repeat,
    Id), and the same JSON object."""
    import json
    from types import SimpleNamespace

    import pandas as pd

    from tasks.kinds.base import CVResult
    from tasks.train import folds_json, write_oof

    rng = np.random.default_rng(3)
    n = 50
    folds = make_folds(n, 5, seed=4, scheme="shuffled", repeats=3)
    ids = rng.permutation(np.arange(1000, 1000 + n))  # not in row order
    m = SimpleNamespace(ids=ids, y=rng.uniform(5e4, 5e5, n))
    outliers = rng.random(n) < 0.1
    oof = rng.normal(12, 0.3, (3, n))
    cv = CVResult(folds=folds, members=[], train_log_rmse=[], valid_log_rmse=[],
                  oof_log_price=oof, curves=None)
    write_oof(tmp_path / "oof.parquet", m, outliers, cv, 5)
    got = pd.read_parquet(tmp_path / "oof.parquet")
    rows = [(k, k // 5, va) for k, (_, va) in enumerate(folds)]
    want = pd.DataFrame({
        "Id": np.concatenate([ids[va] for *_, va in rows]),
        "repeat": np.concatenate([np.full(len(va), r) for _, r, va in rows]),
        "fold": np.concatenate([np.full(len(va), k) for k, _, va in rows]),
        "pred_log_price": np.concatenate([oof[r, va] for _, r, va in rows]),
        "outlier": np.concatenate([outliers[va] for *_, va in rows]),
        "log_price": np.concatenate([np.log(m.y[va]) for *_, va in rows]),
    }).sort_values(["repeat", "Id"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)
    assert len(got) == 3 * n and got.groupby("repeat")["Id"].is_monotonic_increasing.all()
    excluded = np.zeros(n, dtype=bool)
    excluded[[3, 17]] = True
    assert json.loads(folds_json(ids, folds, excluded)) == {
        "excluded_from_fit": ids[excluded].tolist(),
        "valid_ids": [ids[va].tolist() for _, va in folds]}
