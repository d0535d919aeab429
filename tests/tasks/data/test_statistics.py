"""Column statistics from sums per group equal pandas' column by column, and each fold's
preprocessor learned from them equals the one fitted on the fold's own rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.data.features import Preprocessor, fit_preprocessor, read_csv
from tasks.data.foldmaps import fold_groups, fold_preprocessors
from tasks.data.folds import make_folds
from tasks.data.settings import PreprocessConfig
from tasks.data.statistics import Moments

from .test_foldmaps import adversarial


def pandas_summary(x: np.ndarray) -> tuple[float, ...]:
    """What pandas says of one column: count, mean, std (1.0 when there is none), skew,
    min, max."""
    s = pd.Series(x).dropna()
    std = s.std()
    return (len(s), s.mean(), std if std > 0 else 1.0, s.skew(), s.min(), s.max())


def test_moments_per_group_equal_pandas_column_by_column():
    rng = np.random.default_rng(3)
    n = 1000
    cols = {
        "normal": rng.normal(5, 2, n),
        "skewed": rng.lognormal(0, 1, n),
        "far": 1e9 + rng.normal(0, 1, n),  # far from 0: the centre keeps its digits
        "holes": np.where(rng.random(n) < 0.3, np.nan, rng.normal(0, 1, n)),
    }
    labels = np.stack([rng.integers(-1, 3, n), rng.integers(3, 5, n)])  # two partitions
    m = Moments.gather(cols, labels, 5, chunk=97)  # chunks that cut the groups
    for take in ([True, False, True, False, False], [False, False, False, True, True],
                 [False, True, False, False, False]):  # within a partition: no row twice
        rows = np.zeros(n, bool)
        for g in np.flatnonzero(take):
            rows |= (labels == g).any(0)
        got = m.over(np.array(take))
        for j, (name, x) in enumerate(cols.items()):
            want = pandas_summary(x[rows])
            have = (got.n[j], got.mean[j], got.std[j], got.skew[j], got.lo[j], got.hi[j])
            np.testing.assert_allclose(have, want, rtol=1e-7, err_msg=name)


def test_moments_of_a_constant_column_keep_its_value_and_no_spread():
    # pandas' std of [0.7] * 3 is 1.4e-16, and its mean is off by 1e-16: a feature
    # divided by it would blow a different value up to 1e15. Here: the value, std 1.
    x = {"const": np.array([0.7, 0.7, np.nan, 0.7]), "empty": np.full(4, np.nan),
         "one": np.array([np.nan, 3.0, np.nan, np.nan])}
    s = Moments.gather(x, np.zeros((1, 4), np.int64), 1).over(np.ones(1, bool))
    assert s.mean[0] == 0.7 and s.std[0] == 1.0 and np.isnan(s.skew[0])
    assert s.n[1] == 0 and np.isnan(s.mean[1]) and s.std[1] == 1.0 and np.isnan(s.lo[1])
    assert (s.mean[2], s.std[2], s.lo[2], s.hi[2]) == (3.0, 1.0, 3.0, 3.0)


def test_moments_of_other_centres_do_not_add():
    one = np.zeros((1, 3), np.int64)
    a = Moments.gather({"x": np.array([1.0, 2, 3])}, one, 1)
    b = Moments.gather({"x": np.array([7.0, 8, 9])}, one, 1)
    with pytest.raises(ValueError, match="do not add"):
        a + b


def reference_fit(pre: Preprocessor, frames: list[pd.DataFrame]) -> dict:
    """The fitted state as pandas computes it, column by column (how ``fit`` worked before
    sums): each numeric column's range, skew, mean and std; each text column's values."""
    raw = pd.concat(frames, ignore_index=True)
    features = pre._engineer(raw)
    numeric, rng, logged, cats = {}, {}, [], {}
    for col in features.columns:
        v = features[col]
        if pd.api.types.is_numeric_dtype(v) and not pd.api.types.is_bool_dtype(v):
            x = v.to_numpy(np.float64, na_value=np.nan)
            n, mean, std, skew, lo, hi = pandas_summary(x)
            rng[col] = (lo, hi)
            if pre.log1p_skewed and lo >= 0 and skew > pre.skew_threshold:
                logged.append(col)
                _, mean, std, *_ = pandas_summary(np.log1p(x))
            numeric[col] = (mean, std)
        else:
            cats[col] = sorted(v.dropna().astype(str).unique().tolist())
    for spec in pre.interactions:
        num, cat = spec.split("@")
        x = features[num].to_numpy(np.float64, na_value=np.nan)
        for level in cats[cat]:
            s = np.where(features[cat].astype(str).to_numpy() == level, x, 0.0)
            s[features[cat].isna().to_numpy()] = 0.0
            n, mean, std, _, lo, hi = pandas_summary(s)
            name = f"{num}@{cat}={level}"
            rng[name], numeric[name] = (lo, hi), (mean, std)
    return {"numeric": numeric, "range": rng, "log1p": logged, "categories": cats}


def assert_same_fit(got: Preprocessor, want: Preprocessor | dict) -> None:
    if isinstance(want, Preprocessor):
        assert got.columns_ == want.columns_
        want = {"numeric": want.numeric_, "range": want.range_, "log1p": want.log1p_,
                "categories": want.categories_}
    assert got.categories_ == want["categories"]
    assert got.log1p_ == want["log1p"]
    assert list(got.numeric_) == list(want["numeric"])  # the same features, in order
    for key, have in (("numeric", got.numeric_), ("range", got.range_)):
        np.testing.assert_allclose(np.array(list(have.values())),
                                   np.array(list(want[key].values())), rtol=1e-9, atol=1e-12,
                                   err_msg=key)


def test_fit_equals_pandas_column_by_column_on_the_kaggle_rows(real_data):
    train = read_csv(real_data / "kaggle_house_pred_train.csv")
    test = read_csv(real_data / "kaggle_house_pred_test.csv")
    pre = fit_preprocessor(train, test, PreprocessConfig())
    assert pre.interactions and pre.log1p_
    assert_same_fit(pre, reference_fit(pre.unfitted(), [train, test]))


def fold_fits(train, pre, splits, test=None):
    """Each fold's preprocessor from sums, and the one fitted on its own rows."""
    enc = pre.encode(train)
    extra = None
    if test is not None:
        tenc = pre.encode(test)
        extra = (pre.numeric_columns(tenc), tenc.codes)
    got = fold_preprocessors(pre, pre.numeric_columns(enc), enc.codes, splits, extra)
    want = [pre.unfitted().fit([train.iloc[tr]] + ([] if test is None else [test]))
            for tr, _ in splits]
    return got, want


@pytest.mark.parametrize(("scheme", "repeats"), [("shuffled", 2), ("contiguous", 1)])
def test_fold_preprocessors_from_sums_equal_the_ones_fitted_fold_by_fold(scheme, repeats):
    train = adversarial(123)  # 123 rows: contiguous folds leave 3 rows in no fold
    train["Code"] = np.where(np.arange(123) % 2, 20, 60)
    pre = Preprocessor(log1p_skewed=True, as_category=("Code",),
                       interactions=("Area@Zone",)).fit([train])
    splits = make_folds(len(train), 5, 0, scheme, repeats)
    got, want = fold_fits(train, pre, splits)
    assert len(got) == 5 * repeats
    assert any("Zone_FV" not in f.feature_names_ for f in got)  # a level one fold never sees
    assert any("Area@Zone=FV" not in f.numeric_ for f in got)  # nor its slope
    assert len({tuple(f.log1p_) for f in got}) > 1  # folds decide log1p differently
    assert all(f.numeric_["Const"] == (7.0, 1.0) for f in got)  # constant: value, no scale
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_same_fit(g, w)
        for rows in (splits[k][0], splits[k][1]):
            sample = train.iloc[rows]
            np.testing.assert_array_equal(g.transform(sample)[0], w.transform(sample)[0])


def test_fold_preprocessors_with_the_test_rows_equal_the_ones_fitted_fold_by_fold(real_data):
    train = read_csv(real_data / "kaggle_house_pred_train.csv")
    test = read_csv(real_data / "kaggle_house_pred_test.csv")
    config = PreprocessConfig(fit_on="train+test")
    pre = fit_preprocessor(train, test, config)
    splits = make_folds(len(train), 5, 0, "shuffled", repeats=3)
    got, want = fold_fits(train, pre, splits, test)
    for g, w in zip(got, want, strict=True):
        assert_same_fit(g, w)
    # the rows without the test rows: a category only the test rows have is in no fold
    pre = fit_preprocessor(train, None, PreprocessConfig())
    got, want = fold_fits(train, pre, splits[:5])
    for g, w in zip(got, want, strict=True):
        assert_same_fit(g, w)


def test_folds_that_do_not_cut_the_rows_are_refused():
    splits = make_folds(20, 4, 0, "shuffled")
    tr, va = splits[1]
    splits[1] = (tr[1:], va)  # a training row left out: not the other folds' rows
    with pytest.raises(ValueError, match="fold 1 does not train on the other folds' rows"):
        fold_groups(splits, 20)
