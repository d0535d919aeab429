from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tasks.config import candidate
from tasks.kinds.engine import PerModel, StackedOptimizer, train_stacked
from tasks.kinds.nets import Regressor


def _data(n=120, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    y = torch.exp(12 + X @ (0.3 * torch.randn(d, generator=g)) + 0.05 * torch.randn(n, generator=g))
    return X, y


def _masks(n, parts):
    """Models whose training rows differ in number (uneven last batches) and validation."""
    train = torch.zeros(len(parts), n, dtype=torch.bool)
    valid = torch.zeros(len(parts), n, dtype=torch.bool)
    for m, (lo, hi) in enumerate(parts):
        valid[m, lo:hi] = True
        train[m] = ~valid[m]
    return train, valid


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_stacked_training_equals_training_each_model_alone(optimizer):
    X, y = _data()
    spec = candidate(name="m", kind="mlp", hidden=(8, 4), dropout=0.2, optimizer=optimizer,
                           lr=0.01, weight_decay=1e-3, epochs=4, batch_size=16)
    train, valid = _masks(len(X), [(0, 30), (30, 61), (61, 120)])  # 90, 89 and 61 rows
    seeds = [11, 12, 13]
    stacked = train_stacked(X, y, train, valid, spec, "log", seeds)
    for m, seed in enumerate(seeds):
        alone = train_stacked(X, y, train[m:m + 1], valid[m:m + 1], spec, "log", [seed])
        for key, value in alone.state_dicts[0].items():
            torch.testing.assert_close(stacked.state_dicts[m][key], value, rtol=1e-4, atol=1e-5)
        for name, curve in alone.curves.items():
            np.testing.assert_allclose(stacked.curves[name][m], curve[0], rtol=1e-4)
        assert stacked.y_mean[m] == pytest.approx(alone.y_mean[0])


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize(("schedule", "tail"), [("constant", 0), ("cosine", 2)])
def test_written_out_backward_equals_autograd_training(activation, optimizer, schedule, tail):
    """The engine's loop (explicit gradients, stacked optimizer) against the textbook loop:
    nn.Module, autograd, torch.optim, the same batches and dropout draws; and the cosine
    schedule and the tail average against torch's own (LambdaLR, AveragedModel)."""
    from torch.optim.lr_scheduler import LambdaLR
    from torch.optim.swa_utils import AveragedModel

    X, y = _data(n=100)
    spec = candidate(name="m", kind="mlp", hidden=(8, 6), activation=activation, dropout=0.25,
                     optimizer=optimizer, lr=0.01, weight_decay=1e-2, epochs=3,
                     batch_size=20, lr_schedule=schedule, average_last=tail)
    train, valid = _masks(len(X), [(0, 20)])  # 80 training rows: 4 full batches
    res = train_stacked(X, y, train, valid, spec, "log", [5])

    rows = torch.arange(20, 100)
    logy = torch.log(y[rows])
    y_fit = (logy - logy.mean()) / logy.std()
    gen = torch.Generator().manual_seed(5)
    model = Regressor(spec, X.shape[1], generator=torch.Generator().manual_seed(5),
                      dropout_generator=gen)
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(
        model.parameters(), lr=0.01, weight_decay=1e-2)
    steps = 3 * 4
    sched = LambdaLR(opt, (lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
                     if schedule == "cosine" else (lambda t: 1.0))
    averaged = AveragedModel(model)
    model.train()
    for epoch in range(3):
        order = rows[torch.randperm(80, generator=gen)]
        for lo in range(0, 80, 20):
            batch = order[lo:lo + 20]
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(X[batch]),
                                                y_fit[batch - 20])
            loss.backward()
            opt.step()
            sched.step()
        if epoch >= 3 - tail:
            averaged.update_parameters(model)
    final = averaged.module if tail else model
    for key, value in final.state_dict().items():
        torch.testing.assert_close(res.state_dicts[0][key], value, rtol=1e-4, atol=1e-5)
    if tail:  # the average is not the last weights
        assert not torch.equal(res.state_dicts[0]["net.0.weight"],
                               model.state_dict()["net.0.weight"])


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("per_model", [False, True])
def test_stacked_optimizer_matches_torch_including_skipped_steps(optimizer, per_model):
    """One optimizer for three models, each with its own learning rate and weight decay
    when ``per_model``, against three torch.optim optimizers."""
    torch.manual_seed(0)
    rates = [(0.1, 0.01), (0.03, 0.0), (0.2, 0.05)] if per_model else [(0.1, 0.01)] * 3
    specs = [candidate(name="m", kind="linear", lr=lr, weight_decay=wd, optimizer=optimizer)
             for lr, wd in rates]
    stacked = torch.randn(3, 4, 2)
    lone = [torch.nn.Parameter(stacked[m].clone()) for m in range(3)]
    make = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
    opts = [make([p], lr=lr, weight_decay=wd) for p, (lr, wd) in zip(lone, rates, strict=True)]
    param = stacked.clone().requires_grad_()
    ours = StackedOptimizer([param], specs[0], PerModel(specs, torch.device("cpu")))
    for step in range(5):
        grad = torch.randn(3, 4, 2)
        active = torch.tensor([True, step % 2 == 0, True])
        ours.step([grad.clone()], None if bool(active.all()) else active)
        for m in range(3):
            if active[m]:
                lone[m].grad = grad[m].clone()
                opts[m].step()
    for m in range(3):
        torch.testing.assert_close(param.detach()[m], lone[m].detach(), rtol=1e-5, atol=1e-6)


def test_diverging_candidate_stops_with_the_reason():
    X, y = _data()
    spec = candidate(name="m", kind="linear", optimizer="sgd", lr=1e6,
                           epochs=50)
    train, valid = _masks(len(X), [(0, 60), (60, 120)])
    res = train_stacked(X, y, train, valid, spec, "raw", [0, 1])
    assert "non-finite" in res.diverged[0]
    assert res.epochs_run < 50


@pytest.mark.parametrize(("max_steps", "same_as"), [(12, (3, 2)), (8, (2, 0))])
def test_epochs_cut_by_the_step_budget_average_the_same_share(max_steps, same_as):
    """6 epochs of 4 steps, the last 3 averaged: cut to 3 epochs, the last 2 (1.5 rounded);
    cut to 2, the last 1, i.e. the last weights (never the first, barely trained, epoch)."""
    X, y = _data(n=100)
    train, valid = _masks(len(X), [(0, 20)])  # 80 training rows: 4 batches of 20
    common = {"name": "m", "kind": "mlp", "hidden": (8,), "lr": 0.01, "batch_size": 20}
    cut = train_stacked(X, y, train, valid, candidate(
        **common, epochs=6, average_last=3, max_steps=max_steps), "log", [5])
    epochs, tail = same_as
    plain = train_stacked(X, y, train, valid, candidate(
        **common, epochs=epochs, average_last=tail, max_steps=None), "log", [5])
    assert cut.epochs_run == epochs
    for key, value in plain.state_dicts[0].items():
        torch.testing.assert_close(cut.state_dicts[0][key], value)


def test_gradient_norm_is_recorded_and_clipping_bounds_each_step():
    X, y = _data()
    spec = candidate(name="m", kind="mlp", hidden=(16,), optimizer="sgd", lr=1.0, epochs=1,
                           batch_size=1000, clip_grad_norm=1e-3)  # one step in all
    train, valid = _masks(len(X), [(0, 60)])
    res = train_stacked(X, y, train, valid, spec, "log", [7])
    start = Regressor(spec, X.shape[1], generator=torch.Generator().manual_seed(7))
    moved = torch.sqrt(sum(((res.state_dicts[0][k] - v) ** 2).sum()
                           for k, v in start.state_dict().items()))
    assert float(res.curves["grad_norm"][0, 0]) > 1e-2  # recorded before clipping
    assert float(moved) == pytest.approx(1e-3, rel=1e-3)  # lr x clipped norm
    unclipped = train_stacked(X, y, train, valid, spec.model_copy(update={"clip_grad_norm": None}),
                              "log", [7])
    assert float(unclipped.curves["grad_norm"][0, 0]) == float(res.curves["grad_norm"][0, 0])


def test_models_that_draw_the_same_numbers_share_a_stream():
    """Same seed, rows and dropout-or-not: one stream (one batch gather, one first-layer
    product); a short stream is padded with a copy of its last model."""
    from tasks.kinds.engine import Streams

    train, valid = _masks(10, [(0, 5), (0, 5), (5, 10), (0, 5), (0, 5)])
    lay = Streams.of([1, 1, 1, 2, 1], [True, True, True, True, False], train, valid)
    # streams: {0, 1} (seed 1, rows A, dropout), {2} (rows B), {3} (seed 2), {4} (no dropout)
    assert (lay.S, lay.C) == (4, 2)
    assert lay.pos.tolist() == [0, 1, 2, 2, 3, 3, 4, 4]
    assert lay.first.tolist() == [0, 1, 2, 4, 6]


@pytest.mark.parametrize("hidden", [(), (8,)])
def test_models_on_their_own_fold_features_equal_each_trained_alone(hidden):
    """Per-fold preprocessing: model m reads X[features[m]] of X (F, n, d); stacked, each
    (and its curves and predictions) equals it trained alone on that matrix."""
    X, y = _data()
    g = torch.Generator().manual_seed(5)
    Xf = torch.stack([X, X * 1.5 + 0.2, X + 0.3 * torch.randn(X.shape, generator=g)])
    kind = {"kind": "mlp", "hidden": hidden, "dropout": 0.2} if hidden else {"kind": "linear"}
    specs = [candidate(name=f"c{i}", lr=lr, weight_decay=1e-3, epochs=3, batch_size=16, **kind)
             for i, lr in enumerate((0.01, 0.003))]
    train, valid = _masks(len(X), [(0, 40), (40, 80), (80, 120)])
    models = [(c, k) for c in range(2) for k in range(3)]
    seeds = [100 + k for _, k in models]
    stacked = train_stacked(Xf, y, train[[k for _, k in models]], valid[[k for _, k in models]],
                            [specs[c] for c, _ in models], "log", seeds,
                            groups=[c for c, _ in models], features=[k for _, k in models])
    for m, (c, k) in enumerate(models):
        alone = train_stacked(Xf[k], y, train[k:k + 1], valid[k:k + 1], specs[c], "log",
                              [seeds[m]])
        for key, value in alone.state_dicts[0].items():
            torch.testing.assert_close(stacked.state_dicts[m][key], value, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stacked.curves["valid_log_rmse"][m],
                                   alone.curves["valid_log_rmse"][0], rtol=1e-4)
        torch.testing.assert_close(stacked.pred_log_price[m], alone.pred_log_price[0],
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="feature matrix 3 of 3"):
        train_stacked(Xf, y, train[:1], valid[:1], specs[0], "log", [1], features=[3])


@pytest.mark.parametrize("target", ["log", "raw"])
def test_targets_built_per_batch_and_scores_by_blocks_train_what_held_ones_train(
        target, monkeypatch):
    """Many models on many rows: each batch builds its own targets and the scores and final
    predictions come a block of rows at a time (no (M, n) matrix); the models, scores and
    predictions are those of holding the epoch's targets and scoring all rows at once."""
    import tasks.kinds.engine as engine

    X, y = _data(n=150)
    spec = [candidate(name=f"c{i}", kind="mlp", hidden=(8,), dropout=0.1 * i, lr=0.01 * (i + 1),
                      weight_decay=1e-3, epochs=3, batch_size=16) for i in range(2)
            for _ in range(3)]
    train, valid = _masks(150, [(0, 50), (50, 100), (100, 150)] * 2)
    args = (X, y, train, valid, spec, target, [1, 2, 3] * 2)
    held = train_stacked(*args)
    monkeypatch.setattr(engine, "_TARGETS_BYTES", 0)
    monkeypatch.setattr(engine, "_SCORE_ROWS", 7)
    built = train_stacked(*args)
    assert built.pred_log_price.dtype == torch.float32 and built.pred_log_price.shape == (6, 150)
    torch.testing.assert_close(built.pred_log_price, held.pred_log_price, rtol=1e-6, atol=1e-6)
    for name in ("train_log_rmse", "valid_log_rmse", "grad_norm"):
        torch.testing.assert_close(built.curves[name], held.curves[name], rtol=1e-5, atol=1e-7)
    for a, b in zip(built.state_dicts, held.state_dicts, strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("hidden", [(), (8,)])
def test_fold_maps_built_batch_by_batch_train_what_the_fold_matrices_train(hidden):
    """Per-fold features as maps of one base (``TorchFolds``): each batch's rows are built
    for its stream's fold; the models equal those trained on the materialized matrices."""
    from tasks.data.foldmaps import FoldMaps
    from tasks.kinds.engine import TorchFolds

    X, y = _data()
    n, d = X.shape
    rng = np.random.default_rng(3)
    base = np.concatenate([X.numpy(), np.ones((n, 1), np.float32),
                           (rng.random((n, 1)) > 0.2).astype(np.float32)], 1)
    F = 3
    pres = np.full((F, d), d)
    pres[:, 0] = d + 1
    maps = FoldMaps(base, np.tile(np.arange(d), (F, 1)), rng.uniform(0.5, 2, (F, d)), pres,
                    rng.normal(size=(F, d)))
    Xf = torch.from_numpy(np.stack([maps[k] for k in range(F)]))
    kind = {"kind": "mlp", "hidden": hidden, "dropout": 0.2} if hidden else {"kind": "linear"}
    spec = candidate(name="c", lr=0.01, weight_decay=1e-3, epochs=3, batch_size=16, **kind)
    train, valid = _masks(n, [(0, 40), (40, 80), (80, 120)])
    args = (y, train, valid, spec, "log", [7, 8, 9])
    built = train_stacked(TorchFolds(maps, torch.device("cpu")), *args, features=[0, 1, 2])
    held = train_stacked(Xf, *args, features=[0, 1, 2])
    torch.testing.assert_close(built.pred_log_price, held.pred_log_price, rtol=1e-5, atol=1e-5)
    for a, b in zip(built.state_dicts, held.state_dicts, strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_a_wide_part_trains_the_network_on_what_it_leaves():
    """A fixed linear part per model (zeros for a plain one, stacked beside them): each
    network trains as it would alone on the residual prices ``exp(log y - x·w - b)``, scaled
    by the residual's own mean and spread, and predicts the residual plus the linear part."""
    X, y = _data(n=150)
    spec = [candidate(name=f"c{i}", kind="mlp", hidden=(8,), dropout=0.1, lr=0.01,
                      weight_decay=1e-3, epochs=3, batch_size=16) for i in range(3)]
    train, valid = _masks(150, [(0, 50), (50, 100), (100, 150)])
    g = torch.Generator().manual_seed(5)
    w = 0.3 * torch.randn(3, X.shape[1], generator=g, dtype=torch.float64)
    b = torch.tensor([11.5, 12.0, 0.0], dtype=torch.float64)
    w[2] = 0.0  # the third model has no wide part
    seeds = [4, 5, 6]
    both = train_stacked(X, y, train, valid, spec, "log", seeds, wide=(w, b))
    for m in range(3):
        part = (X.double() @ w[m] + b[m]).float()
        # the residual shifted up by 5 (standardizing takes it off again), so that the
        # clamp at a log price of 0 never binds on it alone
        resid = torch.exp(torch.log(y) - part + 5.0)
        alone = train_stacked(X, resid, train[m:m + 1], valid[m:m + 1], spec[m], "log",
                              [seeds[m]])
        assert both.y_mean[m] == pytest.approx(alone.y_mean[0] - 5.0, abs=1e-5)
        assert both.y_std[m] == pytest.approx(alone.y_std[0], rel=1e-4)
        for key, value in alone.state_dicts[0].items():
            torch.testing.assert_close(both.state_dicts[m][key], value, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(both.pred_log_price[m],
                                   alone.pred_log_price[0] - 5.0 + part, rtol=1e-5, atol=1e-4)
    plain = train_stacked(X, y, train[2:], valid[2:], spec[2], "log", [6])
    torch.testing.assert_close(both.pred_log_price[2], plain.pred_log_price[0], rtol=1e-5,
                               atol=1e-4)
    with pytest.raises(ValueError, match="needs train.target = 'log'"):
        train_stacked(X, y, train, valid, spec, "raw", seeds, wide=(w, b))


@pytest.mark.parametrize("built_from_maps", [False, True])
def test_on_many_rows_scores_take_the_validation_rows_and_a_sample_of_the_training_rows(
        monkeypatch, built_from_maps):
    """Above ``_SCORE_TRAIN`` training rows a model is scored (curves, halving's ranks, its
    final predictions) on its validation rows and a seeded sample of its training rows: the
    training, the validation scores and predictions are those of scoring every row; the
    training curve is the sample's; the other rows get no prediction (NaN)."""
    from tasks.data.foldmaps import FoldMaps
    from tasks.kinds import engine
    from tasks.kinds.engine import TorchFolds

    X, y = _data(n=150)
    n, d = X.shape
    rng = np.random.default_rng(4)
    base = np.concatenate([X.numpy(), np.ones((n, 1), np.float32)], 1)
    maps = FoldMaps(base, np.tile(np.arange(d), (3, 1)), rng.uniform(0.5, 2, (3, d)),
                    np.full((3, d), d), np.zeros((3, d)))
    Xf = torch.from_numpy(np.stack([maps[k] for k in range(3)]))
    specs = [candidate(name=f"c{i}", kind="mlp", hidden=(8,), dropout=0.1, lr=lr,
                       weight_decay=1e-3, epochs=4, batch_size=16, halving=1)
             for i, lr in enumerate((1e-2, 3e-3))]
    train, valid = _masks(n, [(0, 50), (50, 100), (100, 150)] * 2)
    g = torch.Generator().manual_seed(2)
    wide = (0.1 * torch.randn(6, d, generator=g, dtype=torch.float64),
            torch.full((6,), 11.0, dtype=torch.float64))
    features = [0, 1, 2] * 2
    args = (y, train, valid, [specs[0]] * 3 + [specs[1]] * 3, "log", [7, 8, 9] * 2)
    kw = {"features": features, "groups": [0, 0, 0, 1, 1, 1], "wide": wide, "halving": 1}
    every = train_stacked(Xf, *args, **kw)
    monkeypatch.setattr(engine, "_SCORE_TRAIN", 30)  # 100 training rows per fold
    few = train_stacked(TorchFolds(maps, torch.device("cpu")) if built_from_maps else Xf,
                        *args, **kw)
    assert few.sampled and not every.sampled
    assert few.stopped.keys() == every.stopped.keys() == {1} or \
        few.stopped.keys() == every.stopped.keys() == {0}
    for a, b in zip(few.state_dicts, every.state_dicts, strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(few.curves["valid_log_rmse"], every.curves["valid_log_rmse"],
                               rtol=1e-5, equal_nan=True)
    assert not np.allclose(few.curves["train_log_rmse"][:, 0], every.curves["train_log_rmse"]
                           [:, 0])  # a sample's
    for m in range(6):
        scored = ~torch.isnan(few.pred_log_price[m])
        assert bool(scored[valid[m]].all())
        assert int((scored & train[m]).sum()) == 30
        torch.testing.assert_close(few.pred_log_price[m][scored],
                                   every.pred_log_price[m][scored], rtol=1e-5, atol=1e-5)
    # the sample is seeded: the same rows every time
    again = train_stacked(Xf, *args, **kw)
    assert torch.equal(torch.isnan(again.pred_log_price), torch.isnan(few.pred_log_price))
