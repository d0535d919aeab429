"""Successive halving over a torch stack (``halving``): who goes on, what each result is, and
how the train stage versions, refits and rebuilds such a stack."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tasks.config import TrainConfig, candidate
from tasks.data.folds import make_folds
from tasks.kinds.base import refit_members, rmse
from tasks.kinds.torch_net import MLPConfig, cross_validate_group
from tasks.train import cross_validate
from tests.tasks.test_train import _synthetic


def _stack(specs, X, y, cfg, folds, fitted, progress=lambda f: None):
    return MLPConfig.cross_validate_stack(specs, X, y, cfg, folds, fitted, progress)


def _alone(spec, share, X, y, cfg, folds, fitted):
    """``spec`` trained by itself, no halving, stopped after ``share`` of its steps."""
    update = {"halving": 0, "stop_share": None if share == 1 else share}
    return cross_validate_group([spec.model_copy(update=update)], X, y, cfg, folds, fitted,
                                lambda f: None)[0]


def test_the_better_half_trains_on_and_every_result_is_its_candidate_stopped_alone_there():
    """5 candidates, 2 rungs: 35 steps per model (7 epochs of 5 batches); at step 9 (in
    epoch 2) the best 3 go on, at step 18 (in epoch 4) the best 2. Dropout rates, weight
    decays and wide parts differ between them, so every per-model state is compacted."""
    X, y = _synthetic()
    cfg = TrainConfig(repeats=1, n_splits=3, seed=4)
    folds = make_folds(len(X), 3, 4, "shuffled")
    fitted = [tr for tr, _ in folds]
    tweaks = [{"lr": 3e-3}, {"lr": 1e-2, "weight_decay": 1e-2}, {"lr": 3e-2, "dropout": 0.3},
              {"lr": 1e-3, "wide_alpha": 2e-3}, {"lr": 1e-2, "wide_alpha": 5e-3}]
    specs = [candidate(name=f"m{i}", kind="mlp", hidden=(8,), epochs=7, batch_size=48,
                       average_last=2, lr_schedule="cosine", halving=2,
                       **{"dropout": 0.1, **t}) for i, t in enumerate(tweaks)]
    seen: list[float] = []
    got = _stack(specs, X, y, cfg, folds, fitted, seen.append)

    # By hand, each alone: all 5 stopped at 9 of 35 steps, the best 3 at 18, the best 2 never.
    logy = np.log(y)
    score = lambda cv: rmse(cv.oof_log_price[0], logy)  # noqa: E731 (pooled over folds)
    rung1 = [_alone(s, 9 / 35, X, y, cfg, folds, fitted) for s in specs]
    went = sorted(sorted(range(5), key=lambda j: score(rung1[j]))[:3])
    rung2 = {j: _alone(specs[j], 18 / 35, X, y, cfg, folds, fitted) for j in went}
    final = sorted(sorted(went, key=lambda j: score(rung2[j]))[:2])
    assert len(final) == 2 and len(set(went) - set(final)) == 1
    for j, cv in enumerate(got):
        h = cv.halving
        rung = 3 if j in final else 2 if j in went else 1
        assert h["stopped"] == (rung < 3) and h["rungs"] == 3, j
        expected = rung1[j] if rung == 1 else rung2[j] if rung == 2 else _alone(
            specs[j], 1, X, y, cfg, folds, fitted)
        np.testing.assert_allclose(cv.oof_log_price, expected.oof_log_price, atol=1e-5)
        for ours, theirs in zip(cv.curves, expected.curves, strict=True):
            assert len(ours["valid_log_rmse"]) == len(theirs["valid_log_rmse"])
            np.testing.assert_allclose(ours["valid_log_rmse"], theirs["valid_log_rmse"],
                                       atol=1e-5)
        for k in range(3):
            for key, value in expected.members[k][0]["state_dict"].items():
                torch.testing.assert_close(cv.members[k][0]["state_dict"][key], value,
                                           atol=1e-5, rtol=1e-5)
        if rung < 3:
            assert (h["rung"], h["step"], h["steps"], h["epoch"]) == (
                rung, 9 * rung, 35, 2 * rung)  # steps 9 and 18: epochs 2 and 4
            assert h["of"] == {1: 5, 2: 3}[rung]
            assert h["rank"] == {1: 4, 2: 3}[rung] or (rung == 1 and h["rank"] == 5)
            assert h["valid_log_rmse"] == pytest.approx(score(expected), abs=1e-5)
            assert specs[j].trained_as(cv).stop_share == pytest.approx(h["share"])
            assert len(cv.curves[0]["valid_log_rmse"]) == 2 * rung  # partial last epoch
        else:
            assert h == {"stopped": False, "rungs": 3, "share": 1.0, "of": 2}
            assert specs[j].trained_as(cv) == specs[j].model_copy(update={"halving": 0})
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0)

    # Each refits on all rows as its cross-validation trained: in one stack, stopped ones
    # at their own steps; each equal to its refit alone.
    rows = np.arange(len(y))
    refits = refit_members([s.trained_as(cv) for s, cv in zip(specs, got, strict=True)],
                           X, y, cfg, rows)
    for j in range(5):
        alone = refit_members([specs[j].trained_as(got[j])], X, y, cfg, rows)[0]
        for key, value in alone[0]["state_dict"].items():
            torch.testing.assert_close(refits[j][0]["state_dict"][key], value,
                                       atol=1e-5, rtol=1e-5)


def test_a_diverged_candidate_ranks_last_and_halving_needs_two_candidates():
    X, y = _synthetic()
    cfg = TrainConfig(repeats=1, n_splits=3, seed=1)
    folds = make_folds(len(X), 3, 1, "shuffled")
    fitted = [tr for tr, _ in folds]
    mk = lambda name, lr: candidate(name=name, kind="linear", optimizer="sgd", lr=lr,  # noqa: E731
                                    epochs=6, halving=4)
    hot, ok = mk("hot", 1e6), mk("ok", 1e-3)
    got_hot, got_ok = _stack([hot, ok], X, y, cfg, folds, fitted)
    # 2 candidates: one rung (not 4), at half the steps
    assert got_hot.diverged and got_hot.halving["stopped"]
    assert got_hot.halving["valid_log_rmse"] is None
    assert (got_hot.halving["rung"], got_hot.halving["rungs"], got_hot.halving["rank"],
            got_hot.halving["share"]) == (1, 2, 2, 0.5)
    assert got_ok.halving == {"stopped": False, "rungs": 2, "share": 1.0, "of": 1}
    alone = _alone(ok, 1, X, y, cfg, folds, fitted)
    np.testing.assert_allclose(got_ok.oof_log_price, alone.oof_log_price, atol=1e-5)
    # one candidate: nothing to halve
    (single,) = _stack([ok], X, y, cfg, folds, fitted)
    assert single.halving is None
    np.testing.assert_allclose(single.oof_log_price, alone.oof_log_price, atol=1e-5)


def test_a_stop_share_is_the_first_steps_of_the_planned_training():
    """With a constant rate and no tail average, stopping after half of 6 epochs is training
    3 epochs (each epoch's batch order is drawn the same); with the cosine schedule it is
    not (its rate was planned for all 6)."""
    X, y = _synthetic()
    cfg = TrainConfig(repeats=1, n_splits=3, seed=2)
    base = candidate(name="m", kind="mlp", hidden=(8,), epochs=6, batch_size=32, dropout=0.2,
                     lr=1e-2)
    half = cross_validate(X, y, base.model_copy(update={"stop_share": 0.5}), cfg)
    three = cross_validate(X, y, base.model_copy(update={"epochs": 3}), cfg)
    np.testing.assert_allclose(half.oof_log_price, three.oof_log_price, atol=1e-5)
    assert [len(c["valid_log_rmse"]) for c in half.curves] == [3, 3, 3]
    cosine = {"lr_schedule": "cosine"}
    assert not np.allclose(
        cross_validate(X, y, base.model_copy(update={"stop_share": 0.5, **cosine}), cfg)
        .oof_log_price,
        cross_validate(X, y, base.model_copy(update={"epochs": 3, **cosine}), cfg)
        .oof_log_price, atol=1e-4)
    # halving and stop_share are the stack's business: a stop share does not split stacks
    assert base.model_copy(update={"stop_share": 0.5}).stack_key() == base.stack_key()
    assert base.model_copy(update={"halving": 1}).stack_key() != base.stack_key()


def test_the_engine_refuses_to_stop_candidates_that_do_not_share_streams():
    from tasks.kinds.engine import train_stacked

    X, y = _synthetic()
    X, y = torch.tensor(X), torch.tensor(y, dtype=torch.float32)
    train = torch.ones(2, len(y), dtype=torch.bool)
    spec = candidate(name="m", kind="mlp", hidden=(4,), epochs=2)
    with pytest.raises(ValueError, match="needs each one's models in one column of the stack"):
        train_stacked(X, y, train, train, spec, "log", [1, 2], groups=[0, 1], halving=1)


def test_the_train_stage_versions_refits_and_rebuilds_a_halving_stack_as_one(trained, tmp_path):
    """On the run's real tensorized rows: each candidate's version holds its stack; its
    metrics say where it stopped; a stopped one refits on its own budget; and a stack with
    one artifact missing retrains as a whole."""
    from tasks.select import lineage
    from tasks.storage.artifacts import ArtifactRef, resolve
    from tasks.train import _rows, member_ref, train_group

    cfg, result = trained
    versions = lineage(resolve(cfg.artifacts_dir, "select", result["model_version"]))
    data = ArtifactRef(root=cfg.artifacts_dir, stage="tensorize",
                       version=versions["tensorize"][0])
    fields = {"kind": "mlp", "hidden": (8,), "epochs": 4, "batch_size": 64, "halving": 1}
    specs = [candidate(name=f"h{i}", lr=lr, **fields) for i, lr in enumerate((1e-2, 1e-4, 3e-3))]
    root = str(tmp_path / "artifacts")
    lines: list[str] = []
    refs = train_group(data, specs, cfg.train, root, log=lines.append)

    alone = member_ref(root, data, specs[0], cfg.train)
    assert refs[0] == member_ref(root, data, specs[0], cfg.train, specs)
    assert refs[0].version != alone.version  # its stack is part of its version
    joined = member_ref(root, data, specs[0], cfg.train, [*specs, specs[0].model_copy(
        update={"name": "h3"})])
    assert joined.version != refs[0].version  # and so is a candidate joining it
    plain = specs[0].model_copy(update={"halving": 0})
    assert member_ref(root, data, plain, cfg.train, [plain, specs[1]]).version == \
        member_ref(root, data, plain, cfg.train).version  # without halving: its own only

    metrics = [json.loads(r.file("metrics.json").read_text()) for r in refs]
    halving = [m["halving"] for m in metrics]
    assert sorted(h["stopped"] for h in halving) == [False, False, True]
    stopped = next(j for j, h in enumerate(halving) if h["stopped"])
    h = halving[stopped]
    assert (h["rank"], h["of"], h["share"]) == (3, 3, h["step"] / h["steps"])
    assert h["step"] == round(h["steps"] / 2)
    assert any(line.startswith(f"h{stopped}: successive halving: stopped at rung 1 of 2, "
                               f"after {h['step']:,} of {h['steps']:,} steps (epoch "
                               f"{h['epoch']}); ranked 3 of 3 there, valid log RMSE ")
               for line in lines), lines
    assert sum("trained every step, one of the 2 that went on" in line for line in lines) == 2
    # the stopped candidate's model on all rows was fitted on its own (half) budget
    m, _, X_all, _, excluded = _rows(data, cfg.train, specs[stopped])
    expected = refit_members([specs[stopped].model_copy(update={
        "halving": 0, "stop_share": h["share"]})], X_all, m.y, cfg.train,
                             np.flatnonzero(~excluded))[0]
    saved = torch.load(refs[stopped].file("models.pt"), weights_only=True)["refit"]
    for key, value in expected[0]["state_dict"].items():
        torch.testing.assert_close(saved[0]["state_dict"][key], value, atol=1e-5, rtol=1e-5)

    # One artifact gone: the whole stack retrains (its ranking needs every candidate).
    (tmp_path / "artifacts" / "train" / refs[1].version / "manifest.json").unlink()
    lines.clear()
    again = train_group(data, specs, cfg.train, root, log=lines.append)
    assert again == refs
    assert any(line.startswith("h0, h1, h2: cross-validated") for line in lines)
    assert [json.loads(r.file("metrics.json").read_text())["halving"] for r in again] == halving
