"""Each fold's features as a map of one base matrix equal its own preprocessor's, and the
per-fold sums by subtraction equal those summed fold by fold."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.data.features import Preprocessor, fit_preprocessor, read_csv
from tasks.data.foldmaps import FoldMaps, base_columns, fold_grams, fold_maps, write_base
from tasks.data.folds import fit_rows, make_folds
from tasks.data.settings import PreprocessConfig


def build(train: pd.DataFrame, pre: Preprocessor, splits, tmp_path):
    enc = pre.encode(train)
    X = pre.features(enc, pre.categories_, pre.feature_names_)
    folds = [pre.unfitted().fit([train.iloc[tr]]) for tr, _ in splits]
    numeric = pre.numeric_columns(enc)
    missing, flipped = base_columns(pre, folds, numeric)
    base = write_base(tmp_path / "base.npy", X, pre, numeric, missing, flipped)
    return folds, fold_maps(pre, folds, missing, flipped, base), flipped


def adversarial(n: int = 120, seed: int = 0) -> pd.DataFrame:
    """A constant column, a category in one fold's rows only, missing values, a column
    skewed in some folds only (an extreme value in a few rows), a level seen once."""
    rng = np.random.default_rng(seed)
    area = rng.normal(1000, 100, n).round()
    area[rng.choice(n, 10, replace=False)] = np.nan
    spiky = rng.normal(50, 5, n).clip(0)
    spiky[0] = 5000  # the first row: the fold validating it is not skewed
    zone = rng.choice(["RL", "RM"], n).astype(object)
    zone[1] = "FV"  # one row: the fold validating it never sees the level
    zone[rng.choice(n, 8, replace=False)] = None
    return pd.DataFrame({
        "Id": np.arange(1, n + 1), "Area": area, "Const": 7.0, "Spiky": spiky,
        "Zone": pd.array(zone, dtype="str"),
        "SalePrice": rng.lognormal(12, 0.3, n).round(),
    })


@pytest.mark.parametrize("scheme", ["shuffled", "contiguous"])
def test_fold_maps_equal_each_fold_preprocessor_on_adversarial_rows(tmp_path, scheme):
    train = adversarial()
    pre = Preprocessor(log1p_skewed=True, skew_threshold=0.75).fit([train])
    splits = make_folds(len(train), 5, 0, scheme)
    folds, maps, flipped = build(train, pre, splits, tmp_path)
    assert "Spiky" in flipped  # some fold decides log1p the other way round
    assert any("Zone_FV" not in f.feature_names_ for f in folds)
    for k, f in enumerate(folds):
        want = f.transform_as(train, pre.feature_names_)
        np.testing.assert_allclose(maps[k], want, rtol=1e-5, atol=2e-5)
        rows = np.array([5, 0, 77])
        np.testing.assert_allclose(maps.rows(k, rows), want[rows], rtol=1e-5, atol=2e-5)
    assert maps.shape == (5, len(train), len(pre.feature_names_))


def test_fold_maps_equal_each_fold_preprocessor_on_the_kaggle_rows(real_data, tmp_path):
    train = read_csv(real_data / "kaggle_house_pred_train.csv")
    pre = fit_preprocessor(train, config=PreprocessConfig())
    splits = make_folds(len(train), 5, 0, "shuffled", repeats=2)
    folds, maps, _ = build(train, pre, splits, tmp_path)
    for k in (0, 6):
        want = folds[k].transform_as(train, pre.feature_names_)
        np.testing.assert_allclose(maps[k], want, rtol=1e-5, atol=2e-5)


def test_fold_maps_refuse_a_record_naming_columns_outside_the_base():
    base = np.zeros((3, 4), np.float32)
    good = {"format": "houseprice-fold-maps/1", "src": [[0, 1]], "scale": [[1.0, 1.0]],
            "pres": [[2, 2]], "shift": [[0.0, 0.0]]}
    assert FoldMaps.from_dict(good, base).shape == (1, 3, 2)
    with pytest.raises(ValueError, match="outside 0..3"):
        FoldMaps.from_dict({**good, "src": [[0, 9]]}, base)
    with pytest.raises(ValueError, match="not a houseprice-fold-maps"):
        FoldMaps.from_dict({**good, "format": "x"}, base)
    # feature 0 scaling feature 1's all-rows column: another feature's values, refused
    with pytest.raises(ValueError, match="read another feature's column"):
        FoldMaps.from_dict({**good, "src": [[1, 1]]}, base)
    with pytest.raises(ValueError, match="read another feature's column"):
        FoldMaps.from_dict({**good, "pres": [[0, 2]]}, base)  # a shift by a feature
    with pytest.raises(ValueError, match="differ in shape"):
        FoldMaps.from_dict({**good, "scale": [[1.0]]}, base)


def test_fold_sums_by_subtraction_equal_the_sums_fold_by_fold(tmp_path):
    train = adversarial(200, seed=1)
    pre = Preprocessor(log1p_skewed=True).fit([train])
    splits = make_folds(len(train), 4, 3, "shuffled", repeats=2)
    _, maps, _ = build(train, pre, splits, tmp_path)
    t = np.log(train["SalePrice"].to_numpy())
    excluded = np.zeros(len(train), bool)
    excluded[[4, 50, 51]] = True  # left out of every fit, as outliers are
    sums = fold_grams(maps, t, splits, excluded)
    for k, tr in enumerate(fit_rows(splits, excluded)):
        X = maps.base[tr].astype(np.float64) @ maps.matrix(k)  # maps[k] in float64
        np.testing.assert_allclose(X, maps[k][tr], rtol=1e-5, atol=1e-5)
        assert sums.n[k] == len(tr)
        np.testing.assert_allclose(sums.sx[k], X.sum(0), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(sums.xx[k], X.T @ X, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(sums.xt[k], X.T @ t[tr], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose([sums.st[k], sums.tt[k]], [t[tr].sum(), t[tr] @ t[tr]])


def test_block_sums_of_a_mapped_file_are_computed_once_for_threads_that_ask_together(
        tmp_path, monkeypatch):
    """Lasso and ridge ask for the same sums of the same file at once: one pass, the same
    result for both (equal to the sums of the array in memory); another target, other
    blocks or a slice of the map are not taken for it."""
    import threading

    from tasks.data import foldmaps

    rng = np.random.default_rng(0)
    X = rng.standard_normal((3000, 7)).astype(np.float32)
    np.save(tmp_path / "base.npy", X)
    base = np.load(tmp_path / "base.npy", mmap_mode="r", allow_pickle=False)
    t, blocks = rng.standard_normal(3000), rng.integers(-1, 4, 3000)
    want = foldmaps.block_sums(X, t, blocks, 4)  # in memory: not kept
    passes = []
    real = foldmaps._block_sums
    started = threading.Barrier(3)

    def counted(*args):
        passes.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(foldmaps, "_block_sums", counted)
    got = []

    def ask():
        started.wait()
        got.append(foldmaps.block_sums(base, t, blocks, 4, chunk=512))

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(passes) == 1 and len(got) == 3
    for g in got:
        np.testing.assert_allclose(g, want, rtol=1e-10, atol=1e-8)
    got[0][:] = 0  # each caller has its own copy
    np.testing.assert_allclose(foldmaps.block_sums(base, t, blocks, 4, chunk=512), want,
                               rtol=1e-10, atol=1e-8)
    assert len(passes) == 1
    foldmaps.block_sums(base, t + 1, blocks, 4, chunk=512)
    foldmaps.block_sums(base, t, np.where(blocks == 3, -1, blocks), 4, chunk=512)
    foldmaps.block_sums(base[1:], t[1:], blocks[1:], 4, chunk=512)
    foldmaps.block_sums(base[1:], t[1:], blocks[1:], 4, chunk=512)
    assert len(passes) == 5  # three new keys, and a slice is never kept


def test_a_base_file_is_mapped_once_while_anything_holds_it(tmp_path):
    """Train tasks side by side open the same base: they share one read-only mapping
    (each mapping would count the file in the process's memory again), a rewritten file
    gets its own, and the last holder gone, the mapping is let go."""
    import gc
    import os
    import weakref

    from tasks.data.foldmaps import _BASES, open_base

    path = tmp_path / "fold_base.npy"
    np.save(path, np.arange(12, dtype=np.float32).reshape(4, 3))
    first, second = open_base(path), open_base(path)
    assert first is second and not first.flags.writeable
    np.testing.assert_array_equal(first, np.arange(12).reshape(4, 3))
    np.save(tmp_path / "new.npy", np.ones((4, 3), np.float32))
    (tmp_path / "new.npy").replace(path)  # a new artifact at the same path
    third = open_base(path)
    assert third is not first and float(third.sum()) == 12.0
    gone = weakref.ref(first)
    del first, second
    gc.collect()
    assert gone() is None  # only the rewritten file's mapping is left
    assert [k[1:] for k in _BASES if k[0] == os.path.realpath(path)] == [
        (os.stat(path).st_ino, os.stat(path).st_size, os.stat(path).st_mtime_ns)]
