"""The compiled inference plan predicts what the checkpoint's members predict one by one."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tasks.config import TrainConfig, candidate
from tasks.data.features import DataError, Preprocessor
from tasks.data.folds import make_folds
from tasks.inference.checkpoint import CHECKPOINT_FORMAT, FittedModel
from tasks.inference.plan import PLAN_ARRAYS, Plan, compile_plan
from tests.tasks.kinds.test_kinds import MINIMAL

OPTIONS = {"log1p_skewed": True, "derived": True, "ordinal": True,
           "as_category": ("MSSubClass", "MoSold"),
           "interactions": ("TotalSF@Neighborhood", "GrLivArea@MSSubClass")}


@pytest.fixture(scope="module")
def kaggle(real_data):
    train = pd.read_csv(real_data / "kaggle_house_pred_train.csv")
    test = pd.read_csv(real_data / "kaggle_house_pred_test.csv")
    return train, test


# Forms of a kind beside MINIMAL's: an MLP with a wide part (a lasso it adds to).
VARIANTS = {"wide": {"kind": "mlp", "hidden": [4], "epochs": 3, "wide_alpha": 1e-3}}


@pytest.fixture(scope="module")
def fitted(kaggle):
    """Every kind cross-validated on the real rows, 3 folds, each fold's own preprocessor;
    and each refitted on all rows."""
    train, _ = kaggle
    pre = Preprocessor(**OPTIONS).fit([train])
    X, _ = pre.transform(train)
    folds = make_folds(len(train), 3, 0, "shuffled")
    fold_pres = [pre.unfitted().fit([train.iloc[rows]]) for rows, _ in folds]
    Xs = np.stack([p.transform_as(train, pre.feature_names_) for p in fold_pres])
    cfg = TrainConfig(repeats=1, n_splits=3, seed=0)
    y = train["SalePrice"].to_numpy(float)
    out = {}
    for kind, fields in [*((k, f) for k, (f, _) in MINIMAL.items()), *VARIANTS.items()]:
        spec = candidate(name=kind, **{"kind": kind, **fields})
        cv = spec.cross_validate(Xs, y, cfg, folds, [tr for tr, _ in folds], lambda f: None)
        refit = spec.refit(X, y, cfg, np.arange(len(y)))
        out[kind] = (spec, cv.members, refit)
    return pre, fold_pres, out


def _checkpoint(pre, fold_pres, parts, refit=False, target="log"):
    return {
        "format": CHECKPOINT_FORMAT, "target": target, "n_features": len(pre.feature_names_),
        "components": [{"candidate": spec.name, "weight": w,
                        "model_config": spec.model_dump(mode="json"),
                        "folds": [{"members": r}] if refit else [{"members": m} for m in mem]}
                       for w, (spec, mem, r) in parts],
        "preprocessor": pre.to_dict(),
        "fold_preprocessors": None if refit else [p.to_dict() for p in fold_pres],
        "metrics": None,
    }


@pytest.mark.parametrize("refit", [False, True], ids=["ensemble", "refit"])
@pytest.mark.parametrize("kind", [*sorted(MINIMAL), *VARIANTS, "blend"])
def test_plan_equals_the_members_predicted_one_by_one(fitted, kaggle, kind, refit, tmp_path):
    """For every kind and a blend of all of them, with each fold's own preprocessor or one
    refit: the compiled plan, saved and loaded back, predicts the Kaggle test rows as the
    reference path does (each member on its own, averaged) to 1e-6 relative in price."""
    pre, fold_pres, out = fitted
    _, test = kaggle
    # an interaction's numeric missing on some rows, its category unseen or missing on others
    test = test.copy()
    test.loc[test.index[:5], "GrLivArea"] = np.nan
    test.loc[test.index[5:8], "MSSubClass"] = 999
    test.loc[test.index[8:10], "Neighborhood"] = np.nan
    parts = ([(w, out[k]) for w, k in zip(np.linspace(0.05, 0.2, len(out)), sorted(out),
                                          strict=True)]
             if kind == "blend" else [(1.0, out[kind])])
    reference = FittedModel(_checkpoint(pre, fold_pres, parts, refit))
    compile_plan(reference).save(tmp_path)
    plan = Plan.load(tmp_path)
    want, want_report = reference.predict_frame(test)
    got, report = plan.predict_frame(test)
    np.testing.assert_allclose(np.exp(got), np.exp(want), rtol=1e-6)
    assert report == want_report and report.unseen  # the same drift seen
    linear = kind in ("linear", "lasso", "ridge", "enet") or kind == "blend"
    assert bool(plan.linear_num) == linear  # linear members collapsed, not walked
    # the interactions too: one lookup per pair, not a column per category
    assert sorted(plan.linear_inter) == (sorted(OPTIONS["interactions"]) if linear else [])
    assert not any("@" in col for col in plan.linear_num)
    if kind in ("linear", "lasso", "ridge", "enet"):
        assert not plan.members  # no feature matrix is built at all


RAW_KINDS = ("ridge", "hgb", "mlp")


@pytest.fixture(scope="module")
def fitted_raw(kaggle):
    """A few kinds trained on the raw price (``train.target = raw``), 3 folds."""
    train, _ = kaggle
    pre = Preprocessor(**OPTIONS).fit([train])
    folds = make_folds(len(train), 3, 0, "shuffled")
    fold_pres = [pre.unfitted().fit([train.iloc[rows]]) for rows, _ in folds]
    Xs = np.stack([p.transform_as(train, pre.feature_names_) for p in fold_pres])
    cfg = TrainConfig(repeats=1, n_splits=3, seed=0, target="raw")
    y = train["SalePrice"].to_numpy(float)
    out = {}
    for kind in RAW_KINDS:
        spec = candidate(name=kind, kind=kind, **MINIMAL[kind][0])
        cv = spec.cross_validate(Xs, y, cfg, folds, [tr for tr, _ in folds], lambda f: None)
        out[kind] = (spec, cv.members, None)
    return pre, fold_pres, out


@pytest.mark.parametrize("kind", [*RAW_KINDS, "blend"])
def test_a_plan_of_raw_price_members_equals_them_predicted_one_by_one(fitted_raw, kaggle,
                                                                      kind, tmp_path):
    pre, fold_pres, out = fitted_raw
    _, test = kaggle
    parts = ([(w, out[k]) for w, k in zip((0.3, 0.3, 0.4), RAW_KINDS, strict=True)]
             if kind == "blend" else [(1.0, out[kind])])
    reference = FittedModel(_checkpoint(pre, fold_pres, parts, target="raw"))
    compile_plan(reference).save(tmp_path)
    got, _ = Plan.load(tmp_path).predict_frame(test)
    want, _ = reference.predict_frame(test)
    # Within a cent: a raw price is a sum of terms ~1e5 that can cancel to a few hundred, so
    # float64 rounding in another summation order shows relatively there.
    np.testing.assert_allclose(np.exp(got), np.exp(want), rtol=1e-6, atol=0.01)
    if kind in ("ridge", "hgb"):  # fitted enough to price houses (3 epochs of the mlp: not)
        assert 11.5 < np.median(got) < 12.5


def test_a_plan_holding_an_object_array_is_refused(fitted, tmp_path):
    pre, fold_pres, out = fitted
    compile_plan(FittedModel(_checkpoint(pre, fold_pres, [(1.0, out["hgb"])]))).save(tmp_path)
    with np.load(tmp_path / PLAN_ARRAYS) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["m0_value"] = np.array([{"__reduce__": "os.system"}], dtype=object)
    np.savez(tmp_path / PLAN_ARRAYS, **arrays)
    with pytest.raises(DataError, match="not a plain-array plan.*rerun select"):
        Plan.load(tmp_path)


def test_a_plan_of_another_format_is_refused(fitted, tmp_path):
    pre, fold_pres, out = fitted
    compile_plan(FittedModel(_checkpoint(pre, fold_pres, [(1.0, out["lasso"])]))).save(tmp_path)
    spec = json.loads((tmp_path / "plan.json").read_text())
    (tmp_path / "plan.json").write_text(json.dumps({**spec, "format": "houseprice-plan/0"}))
    with pytest.raises(DataError, match="houseprice-plan/0.*rerun select"):
        Plan.load(tmp_path)


def test_predict_loads_no_checkpoint_pickles_a_version_without_a_plan_is_refused(tmp_path):
    from tasks.inference.batch import load_model
    from tasks.storage.artifacts import ArtifactRef

    (tmp_path / "select" / "0123456789abcdef").mkdir(parents=True)
    (tmp_path / "select" / "0123456789abcdef" / "model.pt").write_bytes(b"pickles")
    ref = ArtifactRef(root=str(tmp_path), stage="select", version="0123456789abcdef")
    with pytest.raises(DataError, match="0123456789abcdef has no compiled plan.*--from select"):
        load_model(ref)


@pytest.mark.parametrize("refit", [False, True], ids=["ensemble", "refit"])
def test_the_torch_path_for_a_gpu_and_arrow_batches_predict_the_same(fitted, kaggle, refit,
                                                                    real_data, tmp_path):
    """``--device cuda`` runs the networks in torch: checked here with torch on the CPU
    (the same code, another device) against NumPy; and rows as batch predict reads them
    (Arrow, no pandas frame) against the frame."""
    from tasks.data.features import ID
    from tasks.inference.batch import normalize, open_rows

    pre, fold_pres, out = fitted
    _, test = kaggle
    parts = [(w, out[k]) for w, k in zip(np.linspace(0.05, 0.2, len(out)), sorted(out),
                                         strict=True)]
    compile_plan(FittedModel(_checkpoint(pre, fold_pres, parts, refit))).save(tmp_path)
    plan = Plan.load(tmp_path)
    assert any(m.kind == "net" for m in plan.members)
    want, want_report = plan.predict_frame(test)
    _, chunks = open_rows(real_data / "kaggle_house_pred_test.csv", plan.preprocessor, 400)
    tables = [normalize(t.select([ID, *plan.preprocessor.columns_])) for t in chunks]
    got = np.concatenate([plan.predict_table(t)[0] for t in tables])
    # float32 products over other batch sizes: equal to 1e-6, as the plan to its members
    np.testing.assert_allclose(np.exp(got), np.exp(want), rtol=1e-6)
    plan.torch_device = "cpu"
    on_torch, report = plan.predict_frame(test)
    np.testing.assert_allclose(np.exp(on_torch), np.exp(want), rtol=1e-6)
    assert report == want_report


def test_a_device_that_is_not_there_is_one_line():
    import torch

    from tasks.inference.plan import check_device

    assert check_device("cpu") is None  # NumPy: torch never needed
    with pytest.raises(ValueError, match="unknown device 'tpu': use cpu or cuda"):
        check_device("tpu")
    assert not torch.cuda.is_available()  # the suite hides any GPU (tests/conftest.py)
    with pytest.raises(RuntimeError, match="CUDA is not available here; use --device cpu"):
        check_device("cuda")


def _one_split(threshold: float, leaves) -> object:
    """A trees member of one tree: feature 0 <= ``threshold`` -> ``leaves[0]``, else
    ``leaves[1]``."""
    from tasks.inference.plan import Term
    from tasks.kinds.base import forest_arrays

    tree = {"feature": np.zeros(3, np.int32), "threshold": np.array([threshold, 0.0, 0.0]),
            "left": np.array([1, -1, -1], np.int32), "right": np.array([2, -1, -1], np.int32),
            "value": np.array([0.0, *leaves]), "missing_left": np.zeros(3, np.uint8)}
    return Term("trees", 0, 1.0, {"base": 0.0}, forest_arrays([tree]))


def test_a_tree_compares_the_float32_row_with_the_float64_threshold():
    """A split at 0.1 (float64): float32(0.1) is above it and goes right, as scikit-learn's
    own predictor sends it. Rounding the threshold to the nearest float32 would send it left."""
    from sklearn.tree import DecisionTreeRegressor

    from tasks.inference.plan import _predict_forests

    member = _one_split(0.1, (1.0, 2.0))
    x = np.array([np.float32(0.1), np.nextafter(np.float32(0.1), np.float32(0)), 0.0, 0.2],
                 np.float32)
    got = _predict_forests([member], x[:, None], "log")
    want = np.where(x.astype(np.float64) <= 0.1, 1.0, 2.0)  # by hand: float64 comparison
    np.testing.assert_array_equal(got, want)
    assert list(want) == [2.0, 1.0, 1.0, 2.0]
    # scikit-learn's own trees: splits at float64 midpoints between float32 values, some of
    # which round up to a float32 the row on the right may hold.
    rounded_up = 0
    for a in np.float32([0.1, 0.3, 1.7, 12.345, 1000.1]):
        b = np.float32(a + np.float32(1e-3))
        sk = DecisionTreeRegressor(max_depth=1).fit(np.array([[a], [b]]), [1.0, 2.0])
        thr = sk.tree_.threshold[0]
        up = np.float32(thr) if np.float32(thr) > thr else np.nextafter(np.float32(thr),
                                                                         np.float32(np.inf))
        down = np.nextafter(up, np.float32(-np.inf))
        rounded_up += np.float32(thr) > thr
        pair = np.array([[down], [up]], np.float32)
        member = _one_split(thr, (1.0, 2.0))
        np.testing.assert_array_equal(_predict_forests([member], pair, "log"),
                                      sk.predict(pair))
        assert list(sk.predict(pair)) == [1.0, 2.0]
    assert rounded_up  # the case that needs the round-down was among them


@pytest.mark.parametrize(("target", "leaves", "want"), [
    ("log", [-5.0, 11.0], [0.0, 11.0]),  # a log price below 0 is a price below 1
    ("raw", [0.25, 1e5], [0.0, np.log(1e5)]),  # a raw price below 1 -> 1
])
def test_a_members_price_is_clamped_at_1_as_the_book_clamps(target, leaves, want):
    from tasks.inference.plan import _predict_forests

    member = _one_split(0.0, leaves)
    got = _predict_forests([member], np.array([[-1.0], [1.0]], np.float32), target)
    np.testing.assert_allclose(got, want)
