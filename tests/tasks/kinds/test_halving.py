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
from tests.tasks.test_train import _synthetic


def _alone(spec, share, X, y, cfg, folds, fitted):
    """``spec`` trained by itself on ``share`` of its budget, no halving."""
    return cross_validate_group([spec.with_budget(share)], X, y, cfg, folds, fitted,
                                lambda f: None)[0]


def test_the_better_half_goes_on_and_every_result_is_its_last_rung_trained_alone():
    X, y = _synthetic()
    cfg = TrainConfig(repeats=1, n_splits=3, seed=4)
    folds = make_folds(len(X), 3, 4, "shuffled")
    fitted = [tr for tr, _ in folds]
    lrs = [3e-3, 1e-2, 3e-2, 1e-3, 1e-4]
    specs = [candidate(name=f"m{i}", kind="mlp", hidden=(8,), epochs=8, batch_size=32,
                       average_last=2, lr=lr, halving=2) for i, lr in enumerate(lrs)]
    seen: list[float] = []
    got = MLPConfig.cross_validate_stack(specs, X, y, cfg, folds, fitted, seen.append)

    # By hand: 5 candidates on a quarter of the budget, the best 3 on half, the best 2 on all.
    logy = np.log(y)
    score = lambda cv: rmse(cv.oof_log_price[0], logy)  # noqa: E731
    rung1 = [_alone(s, 0.25, X, y, cfg, folds, fitted) for s in specs]
    went = sorted(sorted(range(5), key=lambda j: score(rung1[j]))[:3])
    rung2 = {j: _alone(specs[j], 0.5, X, y, cfg, folds, fitted) for j in went}
    final = sorted(sorted(went, key=lambda j: score(rung2[j]))[:2])
    assert len(set(went) - set(final)) == 1 and len(final) == 2
    for j, cv in enumerate(got):
        h = cv.halving
        rung = 3 if j in final else 2 if j in went else 1
        assert (h["rung"], h["rungs"], h["stopped"]) == (rung, 3, rung < 3), j
        assert (h["epochs"], h["budget"]) == {1: (2, 0.25), 2: (4, 0.5), 3: (8, 1.0)}[rung]
        assert h["of"] == {1: 5, 2: 3, 3: 2}[rung]
        expected = rung1[j] if rung == 1 else rung2[j] if rung == 2 else _alone(
            specs[j], 1.0, X, y, cfg, folds, fitted)
        np.testing.assert_allclose(cv.oof_log_price, expected.oof_log_price, atol=1e-5)
        assert h["rung_oof_log_rmse_all"] == pytest.approx(score(expected), abs=1e-5)
        assert len(cv.curves[0]["valid_log_rmse"]) == h["epochs"]
        assert specs[j].trained_as(cv).epochs == h["epochs"]
        assert specs[j].trained_as(cv).halving == 0
    # the survivors are exactly the candidates trained without any halving
    for j in final:
        plain = specs[j].model_copy(update={"halving": 0})
        assert plain.trained_as(got[j]) == plain
    # progress rises to the end over the rungs' work (5/4 + 3/2 + 2 full trainings)
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0)

    # Each refits on all rows on the budget its cross-validation had.
    rows = np.arange(len(y))
    refits = refit_members([s.trained_as(cv) for s, cv in zip(specs, got, strict=True)],
                           X, y, cfg, rows)
    for j in (0, 4):  # one stack per budget; compare two of them with a refit alone
        alone = refit_members([specs[j].trained_as(got[j])], X, y, cfg, rows)[0]
        for key, value in alone[0]["state_dict"].items():
            torch.testing.assert_close(refits[j][0]["state_dict"][key], value,
                                       atol=1e-5, rtol=1e-5)


def test_a_diverged_candidate_ranks_last_and_halving_stops_when_one_is_left():
    X, y = _synthetic()
    cfg = TrainConfig(repeats=1, n_splits=3, seed=1)
    folds = make_folds(len(X), 3, 1, "shuffled")
    fitted = [tr for tr, _ in folds]
    mk = lambda name, lr: candidate(name=name, kind="linear", optimizer="sgd", lr=lr,  # noqa: E731
                                    epochs=6, halving=4)
    hot, ok = mk("hot", 1e6), mk("ok", 1e-3)
    got_hot, got_ok = MLPConfig.cross_validate_stack([hot, ok], X, y, cfg, folds, fitted,
                                                     lambda f: None)
    # 2 candidates: one halving (not 4), at half the budget, then the whole one
    assert got_hot.diverged and got_hot.halving["stopped"]
    assert got_hot.halving["rung_oof_log_rmse_all"] is None
    assert (got_hot.halving["rung"], got_hot.halving["rungs"], got_hot.halving["epochs"]) == (
        1, 2, 3)
    assert got_ok.halving == {**got_ok.halving, "rung": 2, "rank": 1, "of": 1, "epochs": 6,
                              "stopped": False}
    alone = _alone(ok, 1.0, X, y, cfg, folds, fitted)
    np.testing.assert_allclose(got_ok.oof_log_price, alone.oof_log_price, atol=1e-5)


def test_a_budget_share_scales_epochs_steps_and_the_average():
    spec = candidate(name="m", kind="mlp", hidden=(8,), epochs=24, max_steps=2_400,
                     average_last=8, halving=2)
    quarter = spec.with_budget(0.25)
    assert (quarter.epochs, quarter.max_steps, quarter.average_last, quarter.halving) == (
        6, 600, 2, 0)
    tiny = spec.with_budget(1 / 64)
    assert (tiny.epochs, tiny.max_steps, tiny.average_last) == (1, 38, 0)
    assert spec.with_budget(1.0) == spec.model_copy(update={"halving": 0})
    # a stack shares its halving: candidates that differ in it train apart
    assert spec.stack_key() != spec.model_copy(update={"halving": 0}).stack_key()


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
    assert halving[stopped]["epochs"] == 2 and halving[stopped]["rank"] == 3
    assert any(line.startswith(f"h{stopped}: successive halving: stopped at rung 1 of 2 "
                               "(2 epochs; ranked 3 of 3 there") for line in lines)
    # the stopped candidate's model on all rows was fitted on its own (half) budget
    m, _, X_all, _, excluded = _rows(data, cfg.train, specs[stopped])
    expected = refit_members([specs[stopped].with_budget(0.5)], X_all, m.y, cfg.train,
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
