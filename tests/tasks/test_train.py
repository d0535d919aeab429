from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.config import CandidateConfig, TrainConfig
from tasks.models import Regressor, SeededDropout, log_price, log_rmse
from tasks.train import cross_validate, make_folds, train_fold


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
    spec = CandidateConfig(name="m", hidden=(8,), init=init)
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
    spec = CandidateConfig(name="m", hidden=(16,), activation=activation, dropout=0.1,
                           lr=0.01, epochs=30)
    X_t, y_t = torch.tensor(X), torch.tensor(y, dtype=torch.float32)
    r = train_fold(X_t[:240], y_t[:240], X_t[240:], y_t[240:], spec, "log", seed=0)
    baseline = float(np.std(np.log(y[240:])))  # predicting the mean log price
    assert r.valid_log_rmse < 0.5 * baseline
    assert len(r.curves["train_log_rmse"]) == 30
    assert r.curves["train_log_rmse"][-1] < r.curves["train_log_rmse"][0]
    assert r.valid_pred_log_price.shape == (60,)


def test_cross_validation_is_deterministic_for_a_seed():
    X, y = _synthetic()
    spec = CandidateConfig(name="m", hidden=(8,), dropout=0.2, epochs=5)
    cfg = TrainConfig(n_splits=3, seed=4)
    _, a = cross_validate(X, y, spec, cfg)
    _, b = cross_validate(X, y, spec, cfg)
    assert [r.valid_log_rmse for r in a] == [r.valid_log_rmse for r in b]
    _, c = cross_validate(X, y, spec, TrainConfig(n_splits=3, seed=5))
    assert [r.valid_log_rmse for r in a] != [r.valid_log_rmse for r in c]


def test_book_raw_target_with_sgd_and_linear_model():
    X, y = _synthetic()
    spec = CandidateConfig(name="lin", kind="linear", hidden=(), optimizer="sgd", lr=1e-3,
                           epochs=3)
    _, results = cross_validate(X, y, spec, TrainConfig(n_splits=2, target="raw",
                                                        fold_scheme="contiguous"))
    assert all(np.isfinite(r.valid_log_rmse) for r in results)
    assert results[0].y_mean == 0.0 and results[0].y_std == 1.0
