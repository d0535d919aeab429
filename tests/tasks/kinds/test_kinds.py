"""The kinds registry: one config class per kind, with only its own fields."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from tasks.config import PipelineConfig, TrainConfig, candidate, load_config_file
from tasks.kinds import KINDS
from tasks.stage import stage_version
from tasks.storage.artifacts import ArtifactRef
from tests.conftest import OWN_FIELDS

# A minimal valid candidate of every kind, and a field that belongs to another kind.
MINIMAL = {
    "linear": ({"epochs": 3}, "hidden"),
    "mlp": ({"hidden": [4], "epochs": 3}, "alpha"),
    "ridge": ({"alpha": 1.0}, "optimizer"),
    "lasso": ({"alpha": 1e-3}, "dropout"),
    "hgb": ({"max_iter": 5, "loss": "absolute_error"}, "alpha"),
    "enet": ({"alpha": 1e-3, "l1_ratio": 0.3}, "hidden"),
    "svr": ({"C": 5.0, "gamma": 0.01}, "alpha"),
    "krr": ({"alpha": 0.5, "degree": 2}, "dropout"),
    "gbr": ({"n_estimators": 10, "loss": "huber"}, "alpha"),
}


def test_every_registered_kind_is_covered_here():
    assert set(MINIMAL) == set(KINDS)


@pytest.mark.parametrize("kind", sorted(MINIMAL))
def test_a_foreign_field_is_rejected_naming_candidate_field_and_kind(kind):
    fields, foreign = MINIMAL[kind]
    with pytest.raises(ValidationError) as err:
        PipelineConfig.model_validate(
            {"candidates": [{"name": "c-1", "kind": kind, **fields, foreign: 1}]})
    msg = err.value.errors()[0]["msg"]
    assert "candidate 'c-1'" in msg and f"'{foreign}'" in msg and f"kind {kind}" in msg


@pytest.mark.parametrize("kind", sorted(MINIMAL))
def test_a_candidate_holds_only_its_own_fields(kind):
    spec = candidate(name="c", kind=kind, **MINIMAL[kind][0])
    if kind in OWN_FIELDS:
        assert set(spec.version_params()) == OWN_FIELDS[kind]
    assert set(spec.version_params()) == set(KINDS[kind].model_fields)
    if kind not in ("linear", "mlp"):
        assert not {"optimizer", "lr", "epochs", "activation"} & set(spec.version_params())


def test_changing_a_field_of_one_kind_leaves_other_kinds_versions_alone():
    data = ArtifactRef(root="/a", stage="tensorize", version="x")

    def versions(cfg: PipelineConfig) -> dict[str, str]:
        return {c.name: stage_version("train", {"data": data, "candidate": c,
                                                 "config": cfg.train})
                for c in cfg.all_candidates()}

    base = PipelineConfig()
    mlp_changed = PipelineConfig(search=(), candidates=(
        *base.candidates, *[c.model_copy(update={"lr": 0.5}) if c.kind == "mlp" else c
                            for s in base.search for c in s.candidates()]))
    before, after = versions(base), versions(mlp_changed)
    for name in before:
        same = before[name] == after[name]
        assert same != name.startswith(("mlp", "wide")), name  # "wide-*": mlp kind too
    # select.on is read by select only: changing it retrains nothing.
    assert versions(PipelineConfig(select={"on": "all"})) == before


def test_a_kind_version_holds_its_own_code_only():
    assert "kinds/boosting.py" not in KINDS["lasso"].code_files
    assert "kinds/engine.py" in KINDS["mlp"].code_files
    assert "kinds/engine.py" not in KINDS["hgb"].code_files
    # an MLP's wide part is the lasso kind's fit
    assert "kinds/linear_models.py" in KINDS["mlp"].code_files
    assert "kinds/linear_models.py" not in KINDS["linear"].code_files
    tasks_dir = Path(__file__).resolve().parents[3] / "tasks"
    for kind, cls in KINDS.items():  # every named file exists (a moved module would not)
        assert all((tasks_dir / f).is_file() for f in cls.code_files), (kind, cls.code_files)


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"name": "old-mlp", "hidden": [512]}, ["'old-mlp' has no kind", "mlp"]),
        ({"name": "old-hgb", "kind": "hgb", "lr": 0.05}, ["'lr'", "'learning_rate'"]),
        ({"name": "old-hgb", "kind": "hgb", "weight_decay": 1.0}, ["'l2_regularization'"]),
        ({"name": "old-lasso", "kind": "lasso", "hidden": []}, ["'hidden'", "kind lasso"]),
        ({"name": "x", "kind": "svm"}, ["unknown kind 'svm'", "lasso"]),
    ],
)
def test_old_flat_candidates_get_an_error_saying_what_moved(entry, words):
    with pytest.raises(ValidationError) as err:
        PipelineConfig.model_validate({"candidates": [entry]})
    msg = err.value.errors()[0]["msg"]
    assert all(w in msg for w in words), msg


def test_moved_select_on_is_named(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"train": {"select_on": "all"}}))
    with pytest.raises(ValidationError, match="train.select_on moved to select.on"):
        PipelineConfig.model_validate(load_config_file(path))


def test_a_search_grid_is_checked_against_its_base_kind():
    with pytest.raises(ValidationError, match="field 'hidden' does not belong to kind ridge"):
        PipelineConfig.model_validate({"search": [
            {"base": {"name": "r", "kind": "ridge"}, "grid": {"hidden": [[8]]}}]})
    space = PipelineConfig.model_validate({"search": [
        {"base": {"name": "h", "kind": "hgb"}, "grid": {"learning_rate": [0.1, 0.2]}}]}).search[0]
    assert [c.learning_rate for c in space.candidates()] == [0.1, 0.2]
    assert all(type(c) is KINDS["hgb"] for c in space.candidates())


@pytest.mark.parametrize("per_fold", [False, True])
@pytest.mark.parametrize("kind", sorted(MINIMAL))
def test_every_kind_round_trips_through_train_checkpoint_and_predict(kind, per_fold, tmp_path):
    """cross_validate -> the saved members (through torch.save's safe loader) -> load_member
    -> the same out-of-fold predictions; with a feature matrix per fold too (each fold's
    model fitted on, and predicting, its own)."""
    import torch

    from tasks.train import cross_validate

    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 5)).astype(np.float32)
    y = np.exp(11 + X @ rng.normal(scale=0.2, size=5) + rng.normal(scale=0.05, size=120))
    spec = candidate(name="c", kind=kind, **MINIMAL[kind][0])
    Xs = np.stack([X, X * 1.3 + 0.1, X[:, ::-1].copy()]) if per_fold else None
    cfg = TrainConfig(repeats=1, n_splits=3, seed=2)
    cv = cross_validate(X if Xs is None else Xs, y, spec, cfg)
    torch.save({"folds": cv.members}, tmp_path / "m.pt")
    saved = torch.load(tmp_path / "m.pt", weights_only=True)["folds"]
    back = candidate(**json.loads(json.dumps(spec.model_dump(mode="json"))))
    for k, (_, va) in enumerate(cv.folds):
        members = [back.load_member(m, X.shape[1], "log") for m in saved[k]]
        Xk = X if Xs is None else Xs[k]
        pred = np.mean([m.log_price(Xk[va]) for m in members], axis=0)
        np.testing.assert_allclose(pred, cv.oof_log_price[0, va], rtol=1e-5, atol=1e-5)
        if Xs is not None and k > 0:  # it really is fold k's own matrix that it fitted
            other = np.mean([m.log_price(X[va]) for m in members], axis=0)
            assert not np.allclose(other, cv.oof_log_price[0, va], rtol=1e-4, atol=1e-4)


def test_scikit_learn_kinds_train_in_parallel_threads_in_a_fresh_process():
    """Candidates train in threads; their first scikit-learn imports (different submodules
    at once) once failed with "cannot import name 'clone' ... circular import"."""
    import subprocess
    import sys

    code = """
import threading, numpy as np
from tasks.config import TrainConfig, candidate
from tasks.train import cross_validate
X = np.random.default_rng(0).normal(size=(60, 3)).astype(np.float32)
y = np.exp(11 + X[:, 0])
errors = []
def go(spec):
    try:
        cross_validate(X, y, spec, TrainConfig(repeats=1, n_splits=2))
    except Exception as exc:
        errors.append(repr(exc))
specs = [candidate(name="r", kind="ridge"), candidate(name="l", kind="lasso", alpha=1e-3),
         candidate(name="h", kind="hgb", max_iter=3)]
threads = [threading.Thread(target=go, args=(s,)) for s in specs]
[t.start() for t in threads]; [t.join() for t in threads]
assert not errors, errors
print("ok")
"""
    # The race was hit about one time in three: three fresh processes, side by side.
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0 and out.strip() == "ok", err[-2000:]


class _Planted:
    """A type an attacker with write access to the store could plant in a checkpoint."""

    def __setstate__(self, state):
        raise AssertionError("an untrusted type was built while loading a checkpoint")


def test_a_checkpoint_member_with_a_foreign_type_is_refused_without_building_it(tmp_path):
    import pickle

    import skops.io
    import torch

    from tasks.kinds.base import UntrustedCheckpoint
    from tasks.train import cross_validate

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4)).astype(np.float32)
    y = np.exp(11 + X @ rng.normal(scale=0.2, size=4))
    spec = candidate(name="c", kind="hgb", **MINIMAL["hgb"][0])
    cv = cross_validate(X, y, spec, TrainConfig(repeats=1, n_splits=2, seed=2))
    member = cv.members[0][0]
    assert set(member) == {"skops"}  # no pickle in what train writes
    est = skops.io.loads(member["skops"], trusted=list(
        skops.io.get_untrusted_types(data=member["skops"])))
    est.planted = _Planted()
    tampered = {"skops": skops.io.dumps(est)}
    torch.save({"m": tampered}, tmp_path / "m.pt")  # still passes torch's safe loader
    back = torch.load(tmp_path / "m.pt", weights_only=True)["m"]
    with pytest.raises(UntrustedCheckpoint, match=r"untrusted type\(s\) .*_Planted: refused"):
        spec.load_member(back, 4, "log")
    with pytest.raises(UntrustedCheckpoint, match="pickled member .* never loaded"):
        spec.load_member({"sklearn": pickle.dumps(est)}, 4, "log")
    assert spec.load_member(member, 4, "log").log_price(X).shape == (60,)


@pytest.mark.parametrize("fields", [{"kind": "lasso", "alpha": 5e-4, "max_iter": 50_000},
                                    {"kind": "enet", "alpha": 1e-3, "l1_ratio": 0.5,
                                     "max_iter": 50_000}])
def test_gram_based_linear_kinds_fit_what_scikit_learn_fits_over_the_rows(fields):
    """Lasso and elastic net run coordinate descent over XᵀX (cost per iteration free of the
    row count): converged, the same model as scikit-learn's descent over the rows."""
    from sklearn.base import clone

    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 40))
    X[:, 5] = X[:, 4] + 0.01 * rng.normal(size=3000)  # correlated, as area columns are
    y = X[:, :8] @ rng.normal(size=8) + 0.3 * rng.normal(size=3000) + 12
    est = candidate(name="c", **fields).make_estimator(seed=0)
    assert est.precompute is True
    est.set_params(tol=1e-10)  # converged: the one optimum, whichever way it is reached
    rows = clone(est).set_params(precompute=False).fit(X, y)
    gram = est.fit(X, y)
    assert np.allclose(gram.coef_, rows.coef_, atol=1e-6)
    assert abs(gram.intercept_ - rows.intercept_) < 1e-6


@pytest.mark.parametrize("kind", ["svr", "krr"])
def test_a_kernel_kind_refuses_more_rows_than_it_can_take_in_one_line(kind):
    from tasks.kinds.base import TooManyRows

    spec = candidate(name="k", kind=kind)
    n = spec.max_rows + 1
    X, y = np.zeros((n, 2), np.float32), np.full(n, 1e5)
    rows = np.arange(n)
    with pytest.raises(TooManyRows) as info:
        spec.cross_validate(X, y, TrainConfig(repeats=1), [(rows, rows)], [rows],
                            lambda f: None)
    assert str(info.value) == (
        f"candidate 'k': kind {kind} takes at most 20,000 training rows, the data has "
        "20,001 (its time and memory grow with their square); set its max_fit_rows to at "
        "most 20,000 (a sample of each fold's rows), leave it out of the candidates, or use "
        "hgb or mlp")


def test_a_torch_kind_says_when_its_step_budget_cuts_its_epochs():
    spec = candidate(name="net", kind="linear", epochs=100, batch_size=64, max_steps=2000)
    assert spec.budget_note(1000) is None  # 16 batches x 100 epochs: within 2,000 steps
    assert spec.budget_note(160_000) == (
        "net: 100 epochs cut to 1 by max_steps=2,000 (2,500 batches of 64 rows per epoch); "
        "set max_steps higher (or none) to train every epoch")
    assert candidate(name="n", kind="linear", max_steps=None).budget_note(10**7) is None
    assert candidate(name="l", kind="lasso", alpha=1e-3).budget_note(10**7) is None


@pytest.mark.parametrize("spec", [
    {"name": "hgb", "kind": "hgb", "max_iter": 15},
    {"name": "gbr", "kind": "gbr", "n_estimators": 15},
    {"name": "svr", "kind": "svr"},
])
def test_scikit_learn_kinds_build_a_folds_rows_a_block_at_a_time(spec, monkeypatch):
    """On fold maps a scikit-learn kind never builds a fold's whole matrix: its training and
    validation rows come a block at a time, and it fits what the stacked fold matrices fit."""
    import tasks.kinds.base as base
    from tasks.data.foldmaps import FoldMaps
    from tasks.train import cross_validate

    rng = np.random.default_rng(0)
    n, d, train = 400, 6, TrainConfig(n_splits=4, repeats=1)
    X = rng.normal(size=(n, d))
    y = np.exp(11 + X @ rng.normal(0.2, 0.1, d) + 0.05 * rng.normal(size=n))
    # Fold k's features: the base's scaled and shifted (a column of ones last), as tensorize's.
    maps = FoldMaps(base=np.hstack([X, np.ones((n, 1))]).astype(np.float32),
                    src=np.tile(np.arange(d), (4, 1)), scale=rng.uniform(0.5, 2, (4, d)),
                    pres=np.full((4, d), d), shift=rng.normal(0, 0.3, (4, d)))
    stacked = np.stack([maps[k] for k in range(4)])
    asked = []

    class Recorded(FoldMaps):
        def rows(self, k, rows):
            asked.append(len(rows))
            return super().rows(k, rows)

    monkeypatch.setattr(base, "_ROWS", 64)
    cand = candidate(**spec)
    on_maps = cross_validate(Recorded(maps.base, maps.src, maps.scale, maps.pres, maps.shift),
                             y, cand, train, None)
    assert asked and max(asked) <= 64 and sum(asked) == 4 * n  # each fold's rows once
    on_matrices = cross_validate(stacked, y, cand, train, None)
    np.testing.assert_allclose(on_maps.oof_log_price, on_matrices.oof_log_price, rtol=1e-6)
    np.testing.assert_allclose(on_maps.valid_log_rmse, on_matrices.valid_log_rmse, rtol=1e-6)


def test_a_scikit_learn_kind_fits_a_seeded_sample_of_max_fit_rows_and_predicts_every_row():
    """Above max_fit_rows each fold fits on a sample of that many of its own training rows
    (the same on every run), logged once; every validation row is still predicted."""
    from tasks.kinds.base import skops_loads
    from tasks.train import cross_validate

    rng = np.random.default_rng(1)
    n, d, train = 400, 5, TrainConfig(n_splits=4, repeats=1)
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = np.exp(11 + X @ rng.normal(0.2, 0.1, d) + 0.05 * rng.normal(size=n))
    cand = candidate(name="h", kind="hgb", max_iter=10, max_fit_rows=150)
    assert candidate(name="h", kind="hgb").max_fit_rows == 200_000  # the kind's default
    assert candidate(name="h", kind="hgb").budget_note(300) is None
    assert cand.budget_note(300) == (
        "h: each fold fits on a sample of 150 of its 300 training rows (max_fit_rows); set "
        "max_fit_rows higher (or none) to fit on all of them")
    cv = cross_validate(X, y, cand, train, None)
    assert not np.isnan(cv.oof_log_price).any()  # every row predicted out of fold
    whole = cross_validate(X, y, candidate(name="h", kind="hgb", max_iter=10,
                                           max_fit_rows=None), train, None)
    assert not np.allclose(cv.oof_log_price, whole.oof_log_price)  # it did fit on fewer rows
    for k, (tr, va) in enumerate(cv.folds):
        sample = cand.fit_sample(tr, seed=train.seed * 1000 + k)
        assert len(sample) == len(np.unique(sample)) == 150 and np.isin(sample, tr).all()
        np.testing.assert_array_equal(sample, cand.fit_sample(tr, seed=train.seed * 1000 + k))
        by_hand = cand.make_estimator(seed=train.seed * 1000 + k).fit(
            X[sample].astype(np.float64), np.log(y[sample]))
        saved = skops_loads(cv.members[k][0])
        np.testing.assert_allclose(saved.predict(X[va]), by_hand.predict(X[va]), rtol=1e-12)
    # A kernel kind over its row limit fits when its sample is within it.
    svr = candidate(name="s", kind="svr", max_fit_rows=100)
    big = 20_001
    Xb, yb = rng.normal(size=(big, 2)).astype(np.float32), np.full(big, 1e5)
    rows = np.arange(big)
    out = svr.cross_validate(Xb, yb, TrainConfig(repeats=1), [(rows, rows)], [rows],
                             lambda f: None)
    assert np.isfinite(out.oof_log_price).all()


def test_a_tail_average_longer_than_training_is_refused_and_epochs_keep_its_share():
    with pytest.raises(ValidationError, match=r"average_last \(5\) is more than epochs \(4\)"):
        candidate(name="m", kind="mlp", hidden=(8,), epochs=4, average_last=5)
    mlp = next(s.base for s in PipelineConfig().search if s.base.kind == "mlp")
    assert (mlp.epochs, mlp.average_last) == (24, 8)
    for epochs, tail in ((3, 1), (12, 4), (48, 16)):  # --epochs: the same third averaged
        cfg = PipelineConfig().with_epochs(epochs)
        mlp = next(s.base for s in cfg.search if s.base.kind == "mlp")
        assert (mlp.epochs, mlp.average_last) == (epochs, tail)


def test_a_wide_mlp_is_its_folds_lasso_plus_a_network_on_what_the_lasso_leaves(tmp_path):
    """``wide_alpha``: each fold's wide part is the lasso kind's own fold model (from the
    fold's sums, on fold maps or on fold matrices alike); it is saved with the network and
    predicts, loaded back, what cross-validation predicted; a plain MLP stacked beside it
    trains as it does alone; a raw-price target is refused in one line."""
    import torch

    from tasks.data.folds import make_folds
    from tasks.kinds.base import skops_loads
    from tasks.kinds.torch_net import MLPConfig
    from tasks.train import cross_validate
    from tests.tasks.kinds.test_linear_models import synthetic_maps

    maps, y = synthetic_maps(n=300)
    cfg = TrainConfig(n_splits=3, repeats=2, seed=4)
    fields = {"kind": "mlp", "hidden": (8,), "lr": 0.01, "epochs": 4, "batch_size": 32}
    wide = candidate(name="w", wide_alpha=2e-3, **fields)
    plain = candidate(name="p", **fields)
    on_maps = cross_validate(maps, y, wide, cfg)
    matrices = np.stack([maps[k] for k in range(maps.shape[0])])
    on_matrices = cross_validate(matrices, y, wide, cfg)
    np.testing.assert_allclose(on_maps.oof_log_price, on_matrices.oof_log_price, atol=1e-4)
    lasso = cross_validate(maps, y, candidate(name="l", kind="lasso", alpha=2e-3,
                                              max_iter=5000), cfg)
    torch.save({"folds": on_maps.members}, tmp_path / "m.pt")
    saved = torch.load(tmp_path / "m.pt", weights_only=True)["folds"]
    for k, (_, va) in enumerate(on_maps.folds):
        est = skops_loads(lasso.members[k][0])
        member = saved[k][0]
        np.testing.assert_allclose(member["wide_w"].numpy(), est.coef_, atol=1e-9)
        assert member["wide_b"] == pytest.approx(float(est.intercept_), abs=1e-9)
        loaded = wide.load_member(member, maps.shape[2], "log")
        np.testing.assert_allclose(loaded.log_price(maps[k][va]),
                                   on_maps.oof_log_price[k // 3, va], atol=1e-4)
    # the wide part is what the network adds to: a plain network's predictions differ
    assert not np.allclose(on_maps.oof_log_price, cross_validate(maps, y, plain, cfg)
                           .oof_log_price, atol=1e-2)
    folds = make_folds(len(y), 3, 4, "shuffled", 2)
    fitted = [tr for tr, _ in folds]
    both = MLPConfig.cross_validate_stack([wide, plain], maps, y, cfg, folds, fitted,
                                          lambda f: None)
    alone = plain.cross_validate(maps, y, cfg, folds, fitted, lambda f: None)
    np.testing.assert_allclose(both[1].oof_log_price, alone.oof_log_price, atol=1e-5)
    np.testing.assert_allclose(both[0].oof_log_price, on_maps.oof_log_price, atol=1e-5)
    bad = {**saved[0][0], "wide_w": torch.zeros(5, dtype=torch.float64)}  # a damaged one
    with pytest.raises(ValueError, match=r"saved wide part has shape \(5,\), the features 12 "):
        wide.load_member(bad, maps.shape[2], "log")
    with pytest.raises(ValueError, match="wide_alpha fits a lasso of the log price"):
        cross_validate(maps, y, wide, cfg.model_copy(update={"target": "raw"}))
